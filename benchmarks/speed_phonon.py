"""Wall time of the phonon workflow: relaxation, force evaluation and post-processing.

    python -m benchmarks.speed_phonon [--checkpoint PATH] [-o results.json]

3C-SiC (4x4x4 supercell of the 2-atom primitive cell, 128 atoms) and tetragonal BaTiO3 (3x3x3 supercell
of the 5-atom P4mm cell, 135 atoms), with the 1M-architecture fixture checkpoint in float32 on the CPU:

- the workflow with all displaced supercells evaluated in batched model calls (the default), against the
  same workflow with a calculator that can only evaluate one supercell per call (the reference run, in this
  process, same displacements, the two alternated, best of ``--repeats``); the ratio of force-evaluation
  times is the batching speed-up;
- a relaxation (positions and cell, at most ``--relax-steps`` FIRE steps; the fixture has random weights,
  so this times the machinery, not a physical minimum), reported separately.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes

from benchmarks.common import DEFAULT_CHECKPOINT, write_report
from mattersim.calculator import MatterSimCalculator
from mattersim.potential import Potential
from mattersim.relax import relax
from workflows.phonon import run_phonon



class OneAtATime(Calculator):
    """Wraps a calculator and hides its batched path: one model call per structure."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, inner: Calculator):
        super().__init__()
        self.inner = inner
        self.model_info = getattr(inner, "model_info", None)

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.inner.calculate(self.atoms, properties, system_changes)
        self.results = dict(self.inner.results)


def batio3_tetragonal() -> Atoms:
    a, c = 3.99, 4.04
    return Atoms(
        "BaTiO3",
        cell=[a, a, c],
        scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.515], [0.5, 0.5, -0.025], [0.5, 0, 0.485], [0, 0.5, 0.485]],
        pbc=True,
    )


CASES = {
    "3C-SiC": (lambda: bulk("SiC", "zincblende", a=4.36), (4, 4, 4)),
    "BaTiO3-P4mm": (batio3_tetragonal, (3, 3, 3)),
}


def run(checkpoint: Path, relax_steps: int, repeats: int = 2, device: str = "cpu") -> dict:
    pot = Potential.from_checkpoint(checkpoint, dtype="float32", device=device)
    batched = MatterSimCalculator(pot)
    single = OneAtATime(MatterSimCalculator(pot))
    report = {"checkpoint": str(checkpoint), "device": device, "cases": {}}
    for name, (build, supercell) in CASES.items():
        atoms = build()
        t0 = time.perf_counter()
        relaxed = relax(atoms, batched, fmax=0.01, steps=relax_steps)
        t_relax = time.perf_counter() - t0
        row = {"supercell": supercell, "relaxation_seconds": t_relax, "relaxation_steps": relaxed.steps}
        # alternate the two modes and keep each one's fastest of ``repeats`` runs, so that neither pays
        # alone for the first touch of the memory a large batch needs
        for _ in range(repeats):
            for label, calc in (("one_at_a_time", single), ("batched", batched)):
                with tempfile.TemporaryDirectory() as tmp:
                    res = run_phonon(atoms, calc, relax=False, supercell=supercell, output_dir=tmp, progress=False)
                timings = res.summary["timings_s"]
                best = row.get(label)
                if best is None or timings["force_evaluation"] < best["force_evaluation"]:
                    row[label] = {k: timings[k] for k in ("force_evaluation", "post_processing", "total")}
            row["displacements"] = len(res.phonopy.supercells_with_displacements)
            row["supercell_atoms"] = len(res.phonopy.supercell)
        row["force_evaluation_speedup"] = row["one_at_a_time"]["force_evaluation"] / row["batched"]["force_evaluation"]
        report["cases"][name] = row
        print(json.dumps({name: row}), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--relax-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    report = run(args.checkpoint, args.relax_steps, args.repeats, args.device)
    write_report(report, args.output)


if __name__ == "__main__":
    main()
