"""MD throughput: ASE's own MD loop vs ``run_md`` plain vs ``run_md`` in a field (Z* every 1, 10, 50 steps).

    python -m benchmarks.speed_md [--model sevennet-0+mattersim-dielectric] [--supercell 2] [--steps 50]
                                  [--device cpu] [-o results.json]

In one process, the same calculator (loaded and warmed up once), the same structure (tetragonal BaTiO3,
``--supercell`` n x n x n of the 5-atom cell), NVT Nosé-Hoover chain at 300 K, 2 fs, ``--steps`` steps,
a frame and a log line every 10 steps:

- ``ase``: ``NoseHooverChainNVT.run(steps)`` with ASE's ``MDLogger`` and ``Trajectory`` attached (the loop
  a user writes by hand);
- ``plain``: ``run_md`` (trajectory, md.csv, checkpoints every 100 steps);
- ``field_every_K``: ``run_md`` with ``--efield sin:Emax=4MV/cm,period=200ps,axis=z`` and Z* predicted every
  K steps.

Reported: atom-steps/s and ns/day of each, the ratio of each to ``plain`` and to ``ase``, the field
overhead (``field_every_10`` time / ``plain`` time - 1; goal of issue 18: under 20 %), the share of time in
the Z* predictions, and the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.common import software_versions, utc_now, write_report

FIELD = "sin:Emax=4MV/cm,period=200ps,axis=z"


def _ase_loop(atoms, calc, steps: int, folder: Path) -> float:
    from ase import units
    from ase.io import Trajectory
    from ase.md import MDLogger
    from ase.md.nose_hoover_chain import NoseHooverChainNVT
    from ase.md.velocitydistribution import Stationary, thermalize_momenta
    import numpy as np

    a = atoms.copy()
    a.calc = calc
    thermalize_momenta(a, 300.0, rng=np.random.default_rng(0))
    Stationary(a)
    dyn = NoseHooverChainNVT(a, timestep=2 * units.fs, temperature_K=300.0, tdamp=200 * units.fs)
    traj = Trajectory(folder / "ase.traj", "w", a)
    dyn.attach(traj.write, interval=10)
    dyn.attach(MDLogger(dyn, a, str(folder / "ase.log")), interval=10)
    t0 = time.perf_counter()
    dyn.run(steps)
    elapsed = time.perf_counter() - t0
    traj.close()
    return elapsed


def run(model: str, supercell: int, steps: int, device: str = "cpu") -> dict:
    from ase.build import make_supercell
    import numpy as np

    from benchmarks.ferroelectric import perovskite
    from mattersim.registry import load_calculator
    from workflows.md import run_md

    calc = load_calculator(model, device=device)
    atoms = make_supercell(perovskite(3.99, 4.06, 0.015, -0.02), supercell * np.eye(3, dtype=int))
    warm = atoms.copy()
    warm.calc = calc
    warm.get_forces()
    calc.predict_dielectric(atoms)
    n = len(atoms)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wall = _ase_loop(atoms, calc, steps, tmp)
        rows["ase"] = {"wall_s": wall}
        common = dict(ensemble="nvt", temperature=300.0, timestep=2.0, steps=steps, every=10, seed=0)
        for name, extra in [("plain", {}), ("field_every_1", {"born_every": 1}), ("field_every_10", {"born_every": 10}),
                            ("field_every_50", {"born_every": 50})]:
            if extra:
                extra = {**extra, "efield": FIELD}
            t0 = time.perf_counter()
            result = run_md(atoms, calc, output_dir=tmp / name, **common, **extra)
            rows[name] = {"wall_s": time.perf_counter() - t0, "md_loop_s": result.summary["results"]["wall_s"],
                          "born_evaluations": result.summary["results"].get("born_evaluations")}
    t_born = {}
    for _ in range(3):
        t0 = time.perf_counter()
        calc.predict_dielectric(atoms)
        t_born.setdefault("s", []).append(time.perf_counter() - t0)
    z_time = min(t_born["s"])
    for name, row in rows.items():
        row["atom_steps_per_s"] = n * steps / row["wall_s"]
        row["ns_per_day"] = steps * 2.0 * 1e-6 / row["wall_s"] * 86400
        row["time_vs_plain"] = row["wall_s"] / rows["plain"]["wall_s"]
        row["time_vs_ase"] = row["wall_s"] / rows["ase"]["wall_s"]
        if row.get("born_evaluations"):
            row["zstar_share_estimate"] = row["born_evaluations"] * z_time / row["wall_s"]
    return {
        "created": utc_now(), "software": software_versions(), "model": model, "device": device,
        "structure": f"BaTiO3 P4mm {supercell}x{supercell}x{supercell} ({n} atoms)", "steps": steps,
        "one_zstar_prediction_s": z_time,
        "variants": rows,
        "field_overhead_every_10": rows["field_every_10"]["wall_s"] / rows["plain"]["wall_s"] - 1.0,
        "goal_field_overhead_below": 0.20,
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sevennet-0+mattersim-dielectric")
    parser.add_argument("--supercell", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args(argv)
    write_report(run(args.model, args.supercell, args.steps, args.device), args.output)


if __name__ == "__main__":
    main()
