"""Convex-hull benchmarks: the La-H example under pressure, and MgO B1 -> B2.

    python -m benchmarks.hull [--cases lah,mgo] [--models sevennet-0,chgnet] [--pressures 0:200:20]
                              [--workers N | --scheduler ADDRESS] [-o results.json]

- ``lah``: :func:`workflows.hull.run_hull` on the 14 La-H candidates of ``../shared/data/structures/La-H``
  (La, LaH2 ... LaH16, three solid-H phases) at 0-200 GPa (11 pressures, chained down): the stable phases
  per pressure, LaH10's distance above the hull against pressure, the flags, wall time and peak memory
  (issue 16's goal: under 10 minutes on the 2-core machine with the default model). For comparison the
  same relaxations one structure at a time through plain ASE (FrechetCellFilter + BFGS, independent start
  at every pressure) on a sample of (phase, pressure) pairs, extrapolated to the whole example.
- ``mgo``: MgO rock salt (B1) and CsCl (B2) from 0 to 800 GPa: the B1 -> B2 transition pressure (static
  PBE literature: about 500 GPa).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.common import parse_cases, peak_rss_mib, software_versions, utc_now, write_report
from mattersim.distributed import TaskRunner, add_dask_options

CASES = ("lah", "mgo")
LAH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "structures" / "La-H"


def run_lah(model: str, pressures: str, device: str, work: Path, ase_sample: int, runner=None) -> dict:
    from mattersim.distributed import ModelSpec
    from mattersim.registry import load_calculator
    from workflows.hull import load_candidates, run_hull

    calc = load_calculator(model, device=device)
    cands = load_candidates([LAH], ["La", "H"])
    spec = ModelSpec(model=model, device=device) if runner is not None and runner.distributed else None
    t0 = time.perf_counter()
    res = run_hull(cands, calc, system="La-H", pressures=pressures, output_dir=work / f"lah-{model}", progress=False,
                   runner=runner, spec=spec)
    wall = time.perf_counter() - t0
    lah10 = res.distance("LaH10")
    row = {"model": model, "wall_s": wall, "peak_rss_mib": peak_rss_mib(),
           "workers": runner.workers if runner is not None and runner.distributed else None,
           "timings_s": res.summary["timings_s"],
           "stable": {f"{p:g}": res.stable(p) for p in res.pressures},
           "lah10_above_hull_meV_per_atom": dict(zip([f"{p:g}" for p in res.pressures], (1000 * lah10).round(1).tolist())),
           "transitions": res.summary["transitions"],
           "flags": {ph["label"]: {f"{p:g}": f for p, f in zip(res.pressures, ph["flags"]) if f}
                     for ph in res.summary["phases"] if any(ph["flags"])},
           "steps": {ph["label"]: ph["steps"] for ph in res.summary["phases"]}}
    print(f"La-H {model}: {wall:.0f} s, peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
    for p in res.pressures:
        print(f"  {p:6g} GPa: {', '.join(res.stable(p))}; LaH10 {1000 * lah10[res.pressures.index(p)]:.0f} meV/atom above",
              flush=True)
    for ph, flags in row["flags"].items():
        print(f"  FLAG {ph}: {flags}", flush=True)
    if ase_sample:
        row["ase_one_by_one"] = _ase_sample(calc, cands, res, ase_sample)
        s = row["ase_one_by_one"]
        print(f"  plain ASE one at a time: {s['per_relaxation_s']:.1f} s per relaxation on {s['n']} samples -> "
              f"{s['extrapolated_s']:.0f} s for the {s['n_total']} relaxations (ours {wall:.0f} s)", flush=True)
    return row


def _ase_sample(calc, cands, res, n: int) -> dict:
    """Plain ASE relaxations (FrechetCellFilter + BFGS, fmax 0.02, 500 steps, from the input structure) of
    ``n`` (phase, pressure) pairs spread over the example; the mean time per relaxation times the number of
    relaxations of the example."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS
    from ase.units import GPa

    rng = np.random.default_rng(0)
    pairs = [(k, p) for k in range(len(cands)) for p in res.pressures]
    pick = [pairs[i] for i in rng.choice(len(pairs), size=min(n, len(pairs)), replace=False)]
    t0 = time.perf_counter()
    steps = []
    for k, p in pick:
        a = cands[k][1].copy()
        a.calc = calc
        with BFGS(FrechetCellFilter(a, scalar_pressure=p * GPa), logfile=None) as opt:
            opt.run(fmax=0.02, steps=500)
            steps.append(opt.nsteps)
    per = (time.perf_counter() - t0) / len(pick)
    return {"n": len(pick), "per_relaxation_s": per, "n_total": len(pairs), "extrapolated_s": per * len(pairs),
            "mean_steps": float(np.mean(steps)), "pairs": [[cands[k][0], p] for k, p in pick]}


def run_mgo(model: str, device: str, work: Path) -> dict:
    from ase.build import bulk

    from mattersim.registry import load_calculator
    from workflows.hull import run_hull

    calc = load_calculator(model, device=device)
    cands = [("B1", bulk("MgO", "rocksalt", a=4.21)), ("B2", bulk("MgO", "cesiumchloride", a=2.65)),
             ("Mg", bulk("Mg", "hcp", a=3.21, c=5.21)), ("O2", _solid_oxygen())]
    scan = {lab: _pv_scan(calc, a) for lab, a in cands[:2]}
    for lab, sc in scan.items():
        print(f"MgO {model} {lab}: P(V) rises monotonically under compression up to {sc['monotonic_up_to_GPa']:.0f} GPa "
              f"(V/V0 {sc['monotonic_down_to_fraction']:.2f}); beyond it the model's equation of state is unphysical", flush=True)
    t0 = time.perf_counter()
    res = run_hull(cands, calc, system="Mg-O", pressures="0:800:50", output_dir=work / f"mgo-{model}", progress=False)
    trans = [t for t in res.summary["transitions"] if t["phase"] in ("B1", "B2")]
    b1 = next(ph for ph in res.summary["phases"] if ph["label"] == "B1")
    b2 = next(ph for ph in res.summary["phases"] if ph["label"] == "B2")
    dh = (np.array(b2["enthalpy_eV_per_atom"]) - np.array(b1["enthalpy_eV_per_atom"])) * 1000
    row = {"model": model, "wall_s": time.perf_counter() - t0, "transitions": trans,
           "H_B2_minus_B1_meV_per_atom": dict(zip([f"{p:g}" for p in res.pressures], dh.round(1).tolist())),
           "flags": {ph["label"]: {f"{p:g}": f for p, f in zip(res.pressures, ph["flags"]) if f}
                     for ph in (b1, b2) if any(ph["flags"])},
           "static_pbe_literature_GPa": 500.0, "pv_scan": scan}
    print(f"MgO {model}: B1/B2 transitions {[(t['phase'], t['kind'], round(t['pressure_GPa'])) for t in trans]}; "
          f"H(B2) - H(B1) {row['H_B2_minus_B1_meV_per_atom']} meV/atom; flags {row['flags']}", flush=True)
    return row


def _pv_scan(calc, atoms, fractions=np.linspace(1.05, 0.45, 25)) -> dict:
    """The pressure -trace(stress)/3 of ``atoms`` scaled to V/V0 = ``fractions`` (no relaxation: B1 and B2
    have no free parameter), and how far it rises monotonically under compression: a model whose P(V) turns
    over cannot place a transition beyond that pressure."""
    from ase.units import GPa

    pressures = []
    for f in fractions:
        a = atoms.copy()
        a.set_cell(atoms.cell[:] * f ** (1 / 3), scale_atoms=True)
        a.calc = calc
        pressures.append(float(-np.trace(a.get_stress(voigt=False)) / 3 / GPa))
    k = 0
    while k + 1 < len(pressures) and pressures[k + 1] > pressures[k]:
        k += 1
    return {"volume_fractions": [float(f) for f in fractions], "pressures_GPa": pressures,
            "monotonic_up_to_GPa": pressures[k], "monotonic_down_to_fraction": float(fractions[k])}


def _solid_oxygen():
    """A molecular O2 crystal (simple cubic packing of O2 molecules, 1.21 Å bonds): the oxygen end member; its
    enthalpy sets formation enthalpies only, not the B1/B2 comparison."""
    from ase import Atoms

    return Atoms("O2", positions=[[0, 0, 0], [1.21, 0, 0]], cell=np.eye(3) * 3.5, pbc=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="lah,mgo")
    parser.add_argument("--models", default="sevennet-0,chgnet")
    parser.add_argument("--pressures", default="0:200:20")
    parser.add_argument("--ase-sample", type=int, default=6, help="plain-ASE relaxations timed for comparison (0: none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("hull-benchmark"))
    parser.add_argument("-o", "--output", type=Path, default=None)
    add_dask_options(parser)
    args = parser.parse_args(argv)
    cases = parse_cases(parser, args.cases, CASES)
    report = {"date": utc_now(), "software": software_versions(), "results": {c: [] for c in cases}}
    for case in cases:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            if case == "lah":
                with TaskRunner(workers=args.workers, scheduler=args.scheduler) as runner:
                    report["results"][case].append(run_lah(model, args.pressures, args.device, args.work,
                                                           args.ase_sample, runner))
            else:
                report["results"][case].append(run_mgo(model, args.device, args.work))
    report["peak_rss_mib"] = peak_rss_mib()
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
