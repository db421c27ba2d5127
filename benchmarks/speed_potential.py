"""Single-point throughput and peak memory of the MatterSim v1 potential (energy + forces + stress).

    python -m benchmarks.speed_potential [--checkpoint PATH] [--repeats 7] [-o results.json] [--no-memory]

Measures, with one checkpoint (default: the 1M-architecture fixture in ../shared), in float32 on the CPU:

- diamond Si cells of 8, 64, 216 and 512 atoms, one structure per call: median wall time, ms/atom, the
  time spent building the graph, and the ratio to the official implementation: to its medians measured on
  this 2-core machine (given in the project's issue #2) and, with ``--official DIR``, to the official code
  run now, right before ours, on the same structures (the fair comparison on a machine whose speed drifts);
- 64 rattled 8-atom cells evaluated in one batched call against the same 64 evaluated one call each
  (the reference run, in this process);
- peak resident memory of each case of :data:`MEMORY_CASES` (up to a 2000-atom cell, the goal of issue
  #11 being <= 1.5 GB), each measured in a fresh subprocess so that peaks are separable: ``peak_rss_mib``
  of the whole process (Python, torch and the weights included; VmHWM, see :func:`benchmarks.common.peak_rss_mib`, with
  ``ru_maxrss`` beside it), ``working_mib`` = peak minus the resident memory just before
  ``Potential.predict``, the memory mode the budget chose, and the
  estimate of :meth:`Potential.memory_estimate` with its ratio to ``working_mib`` (the check of the
  per-model coefficients). The 2000-atom cell is also run with budgets that select the ``lean`` and the
  ``recompute`` modes.

The floor is the issue's 120 MFLOP/atom of matmul work divided by the float32 GEMM rate measured in this
process (this virtual machine's speed drifts by +-20 % over minutes, so ratios measured in the same run are
the numbers to compare). The model's own matmul work with the per-atom/per-edge layout used here is
reported too (``model_gflop``), with the fraction of the GEMM rate it attains.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from ase.build import bulk

from benchmarks.common import DEFAULT_CHECKPOINT, REPO, peak_rss_mib as _peak_mib, rss_mib as _rss_mib, write_report
from mattersim.graph import build_structure_graph
from mattersim.memory import GB
from mattersim.potential import Potential

#: official MatterSim 1.2.3, same checkpoint, float32, medians on this 2-core CPU (issue #2)
OFFICIAL_SECONDS = {8: 0.022, 64: 0.16, 216: 0.44, 512: 0.72}
#: matmul work of the plain (concatenated-input) formulation of this architecture, per atom of diamond Si,
#: forward and backward (issue #2); the floor is this divided by the machine's GEMM rate measured here
FLOOR_FLOP_PER_ATOM = 120e6


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_rate(n: int = 1024, repeats: int = 5) -> float:
    """Attained float32 matmul rate of this machine (FLOP/s) on one large square GEMM."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median_time(lambda: a @ b, repeats)
    return 2 * n**3 / t


def model_flops(pot: Potential, n_atoms: int, n_edges: int) -> float:
    """Multiply-add FLOPs of one energy+forces+stress evaluation with the per-atom/per-edge layer layout
    used here (forward, plus the input-gradient backward which costs about the same)."""
    u = pot.model.model_args["units"]
    blocks = pot.model.model_args["num_blocks"]
    per_edge = blocks * 2 * (2 * (u * u) + 2 * (u * u))  # two gated MLPs: edge block of layer 1 + layer 2, g and sigma
    per_atom = blocks * 2 * (2 * 2 * u * u)  # atom blocks of layer 1 (centre + neighbour), g and sigma
    forward = 2 * (n_edges * per_edge + n_atoms * per_atom)
    return 2 * forward


OFFICIAL_SCRIPT = r"""
import json, statistics, sys, time, warnings
warnings.filterwarnings("ignore")
from ase.build import bulk
from ase.calculators.calculator import all_changes
from mattersim.forcefield import MatterSimCalculator
checkpoint, repeats, sizes = sys.argv[1], int(sys.argv[2]), [int(n) for n in sys.argv[3:]]
calc = MatterSimCalculator(load_path=checkpoint, device="cpu")
out = {}
for n in sizes:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(n)
    atoms.rattle(0.01, seed=n)
    def once():
        calc.calculate(atoms, ["energy", "forces", "stress"], all_changes)
    once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); once(); times.append(time.perf_counter() - t0)
    out[len(atoms)] = statistics.median(times)
print(json.dumps(out))
"""


def official_seconds(official_path: Path, checkpoint: Path, repeats: int, sizes: list[int]) -> dict[int, float]:
    """Medians of the official implementation (installed under ``official_path``, e.g. with
    ``pip install --no-deps --target DIR mattersim==1.2.3`` plus torch_runstats, torch-ema, deprecated,
    loguru, torchmetrics), run in a subprocess because it shares our import name."""
    env = dict(os.environ, PYTHONPATH=str(official_path))
    proc = subprocess.run(
        [sys.executable, "-c", OFFICIAL_SCRIPT, str(checkpoint), str(repeats), *map(str, sizes)],
        env=env, capture_output=True, text=True, check=True, cwd="/",
    )
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


#: memory cases: name -> structure spec (``si:AxBxC``: diamond Si conventional cell repeated, rattled;
#: ``si-cells:N``: N rattled 8-atom cells in one call)
MEMORY_CASES = {
    "Si 8 atoms": "si:1x1x1",
    "Si 64 atoms": "si:2x2x2",
    "Si 512 atoms": "si:4x4x4",
    "Si 2000 atoms": "si:5x5x10",
    "64 Si cells of 8 atoms": "si-cells:64",
}
GOAL_CASE, GOAL_GB = "Si 2000 atoms", 1.5


def memory_structures(spec: str):
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    kind, arg = spec.split(":")
    if kind == "si":
        atoms = si.repeat(tuple(int(x) for x in arg.split("x")))
        atoms.rattle(0.01, seed=len(atoms))
        return [atoms]
    if kind == "si-cells":
        cells = []
        for k in range(int(arg)):
            a = si.copy()
            a.rattle(0.05, seed=100 + k)
            cells.append(a)
        return cells
    raise ValueError(f"unknown memory case {spec!r}")


def memory_case(checkpoint: Path, spec: str, budget_gb: float | None) -> dict:
    """One memory case in this (fresh) process: peak RSS of ``Potential.predict`` with forces and stress."""
    pot = Potential.from_checkpoint(checkpoint, dtype="float32", memory_budget_gb=budget_gb)
    structures = memory_structures(spec)
    graphs = pot.graphs(structures)
    sizes = [pot.graph_size(g, pot.threebody_cutoff) for g in graphs]
    batches = list(pot.batches(graphs))
    del graphs
    per_batch = [[sum(sizes[k][i] for k in b) for i in range(3)] for b in batches]
    modes = [pot.memory_mode_for(*n) for n in per_batch]
    estimate = max(pot.memory_estimate(*n, mode=m) for n, m in zip(per_batch, modes))
    size = [sum(n[i] for n in per_batch) for i in range(3)]
    rss_before = _rss_mib()
    peak_before = _peak_mib()
    t0 = time.perf_counter()
    pot.predict(structures)
    first = time.perf_counter() - t0
    peak = _peak_mib()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    pot.predict(structures)
    second = time.perf_counter() - t0
    return {
        "atoms": size[0], "edges": size[1], "triplets": size[2], "structures": len(structures),
        "batches": len(batches), "memory_mode": ",".join(sorted(set(modes))),
        "budget_gb": pot.memory_budget / GB,
        "peak_rss_mib": peak, "ru_maxrss_mib": maxrss, "rss_before_predict_mib": rss_before,
        "peak_before_predict_mib": peak_before,
        "working_mib": peak - rss_before,
        "estimate_mib": estimate / 2**20, "estimate_over_working": estimate / 2**20 / max(peak - rss_before, 1e-9),
        "first_call_seconds": first, "second_call_seconds": second,
    }


def _memory_case_subprocess(checkpoint: Path, spec: str, budget_gb: float | None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.speed_potential", "--checkpoint", str(checkpoint), "--memory-case", spec]
    if budget_gb is not None:
        cmd += ["--memory-budget-gb", repr(budget_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_memory(checkpoint: Path) -> dict:
    """Every memory case in its own fresh process; the 2000-atom cell also with the budgets that select
    the lean and the recompute modes (each budget = that mode's estimate)."""
    cases = {}
    for name, spec in MEMORY_CASES.items():
        cases[name] = _memory_case_subprocess(checkpoint, spec, None)
        print(json.dumps({name: cases[name]}))
    pot = Potential.from_checkpoint(checkpoint, dtype="float32")
    (graph,) = pot.graphs(memory_structures(MEMORY_CASES[GOAL_CASE]))
    size = pot.graph_size(graph, pot.threebody_cutoff)
    for mode in ("lean", "recompute"):
        budget = pot.memory_estimate(*size, mode=mode) / GB
        name = f"{GOAL_CASE}, budget {budget:.2f} GB"
        cases[name] = _memory_case_subprocess(checkpoint, MEMORY_CASES[GOAL_CASE], budget)
        print(json.dumps({name: cases[name]}))
    # the figures are GiB (its "3.5 GB" for the code before is 3.5 * 2**30 bytes: 3589 MiB measured)
    peak = cases[GOAL_CASE]["peak_rss_mib"] * 2**20
    goal = {"case": GOAL_CASE, "peak_rss_gib": peak / GB, "peak_rss_bytes_over_1e9": peak / 1e9,
            "limit_gib": GOAL_GB, "met": peak / GB <= GOAL_GB}
    return {"cases": cases, "goal": goal}


def run(checkpoint: Path, repeats: int, sizes: list[int], official_path: Path | None = None) -> dict:
    torch.manual_seed(0)
    pot = Potential.from_checkpoint(checkpoint, dtype="float32")
    rate = gemm_rate()
    print(f"float32 GEMM rate here: {rate / 1e9:.0f} GFLOP/s")
    official_now = official_seconds(official_path, checkpoint, repeats, sizes) if official_path else {}
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    single = []
    for n in sizes:
        atoms = si.repeat(n)
        atoms.rattle(0.01, seed=n)
        t = median_time(lambda: pot.predict([atoms]), repeats)
        t_graph = median_time(lambda: build_structure_graph(atoms, pot.cutoff, pot.threebody_cutoff), repeats)
        n_edges = build_structure_graph(atoms).edge_index.shape[1]
        flops = model_flops(pot, len(atoms), n_edges)
        row = {
            "atoms": len(atoms),
            "edges": int(n_edges),
            "seconds": t,
            "ms_per_atom": 1e3 * t / len(atoms),
            "graph_seconds": t_graph,
            "model_gflop": flops / 1e9,
            "attained_fraction_of_gemm_rate": flops / t / rate,
            "floor_seconds": FLOOR_FLOP_PER_ATOM * len(atoms) / rate,
            "ratio_to_floor": t / (FLOOR_FLOP_PER_ATOM * len(atoms) / rate),
        }
        if len(atoms) in official_now:
            row["official_seconds_this_run"] = official_now[len(atoms)]
            row["speedup_vs_official_this_run"] = official_now[len(atoms)] / t
        if len(atoms) in OFFICIAL_SECONDS:
            row["official_seconds"] = OFFICIAL_SECONDS[len(atoms)]
            row["speedup_vs_official"] = OFFICIAL_SECONDS[len(atoms)] / t
        single.append(row)
        print(json.dumps(row))

    cells = []
    for k in range(64):
        a = si.copy()
        a.rattle(0.05, seed=100 + k)
        cells.append(a)
    t_batched = median_time(lambda: pot.predict(cells), repeats)
    t_loop = median_time(lambda: [pot.predict([a]) for a in cells], max(1, repeats // 2))
    batch = {
        "structures": 64,
        "atoms_each": 8,
        "batched_seconds": t_batched,
        "one_by_one_seconds": t_loop,
        "speedup": t_loop / t_batched,
    }
    print(json.dumps(batch))
    return {
        "checkpoint": str(checkpoint),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gemm_gflops": rate / 1e9,
        "single": single,
        "batched_8_atom_cells": batch,
        "linear_scaling_ms_per_atom_512_over_216": (
            next((r["ms_per_atom"] for r in single if r["atoms"] == 512), float("nan"))
            / next((r["ms_per_atom"] for r in single if r["atoms"] == 216), float("nan"))
        ),
        "peak_rss_mib_all_timings_in_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3, 4], help="Si cubic cell repeats")
    parser.add_argument("-o", "--output", type=Path, default=None)
    parser.add_argument("--official", type=Path, default=None, help="folder where the official mattersim is installed")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory cases")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory cases")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)  # one case, in a subprocess
    parser.add_argument("--memory-budget-gb", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        print(json.dumps(memory_case(args.checkpoint, args.memory_case, args.memory_budget_gb)))
        return
    result = {} if args.memory_only else run(args.checkpoint, args.repeats, args.sizes, args.official)
    if not args.no_memory:
        result["memory"] = run_memory(args.checkpoint)
    write_report(result, args.output)


if __name__ == "__main__":
    main()
