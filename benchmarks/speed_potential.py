"""Single-point throughput of the MatterSim v1 potential (energy + forces + stress).

    python -m benchmarks.speed_potential [--checkpoint PATH] [--repeats 7] [-o results.json]

Measures, with one checkpoint (default: the 1M-architecture fixture in ../shared), in float32 on the CPU:

- diamond Si cells of 8, 64, 216 and 512 atoms, one structure per call: median wall time, ms/atom, the
  time spent building the graph, and the ratio to the official implementation: to its medians measured on
  this 2-core machine (given in the project's issue #2) and, with ``--official DIR``, to the official code
  run now, right before ours, on the same structures (the fair comparison on a machine whose speed drifts);
- 64 rattled 8-atom cells evaluated in one batched call against the same 64 evaluated one call each
  (the reference run, in this process);
- peak resident memory of the process.

The floor is the issue's 120 MFLOP/atom of matmul work divided by the float32 GEMM rate measured in this
process (this virtual machine's speed drifts by +-20 % over minutes, so ratios measured in the same run are
the numbers to compare). The model's own matmul work with the per-atom/per-edge layout used here is
reported too (``model_gflop``), with the fraction of the GEMM rate it attains.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from ase.build import bulk

from benchmarks.common import DEFAULT_CHECKPOINT, write_report
from mattersim.graph import build_structure_graph
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
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(official_path))
    proc = subprocess.run(
        [sys.executable, "-c", OFFICIAL_SCRIPT, str(checkpoint), str(repeats), *map(str, sizes)],
        env=env, capture_output=True, text=True, check=True, cwd="/",
    )
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


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
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3, 4], help="Si cubic cell repeats")
    parser.add_argument("-o", "--output", type=Path, default=None)
    parser.add_argument("--official", type=Path, default=None, help="folder where the official mattersim is installed")
    args = parser.parse_args()
    result = run(args.checkpoint, args.repeats, args.sizes, args.official)
    write_report(result, args.output)


if __name__ == "__main__":
    main()
