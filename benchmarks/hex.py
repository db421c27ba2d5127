"""HEX (High-pressure Elemental Xstals): energies, forces and stresses of elemental crystals under pressure.

HEX holds DFT (PBE) calculations of crystals of the first 57 elements at 0-300 GPa. The data are not
distributed with this package; give :func:`run_hex` (or ``mattersim bench run hex --data FILE``) any
ASE-readable file (normally extended XYZ) with, per frame, the total ``energy`` (eV), per-atom ``forces``
(eV/Å) and the ``stress`` (3x3 or Voigt, eV/Å^3 with ASE's sign, or ``stress_unit=GPa``/``kbar`` in the
frame's info), as described in :mod:`benchmarks.datasets`. The pressure of a frame is its ``pressure``
info value (GPa) when every frame has one, otherwise -tr(stress)/3 of the reference stress.

The metrics are those of every energy/force/stress set (:mod:`benchmarks.metrics`), for the whole set and
per pressure bin (:data:`PRESSURE_BINS_GPA`; frames outside 0-300 GPa get open bins of their own).
"""

from __future__ import annotations

import os
from typing import Sequence

from benchmarks.datasets import read_reference_file
from benchmarks.efs import run_efs

__all__ = ["PRESSURE_BINS_GPA", "run_hex"]

#: bin edges (GPa) of the per-pressure breakdown
PRESSURE_BINS_GPA = (0.0, 25.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0)


def run_hex(path: str | os.PathLike, calculator, output_dir: str | os.PathLike, *,
            bins: Sequence[float] = PRESSURE_BINS_GPA, max_items: int | None = None, progress: bool = True,
            energy_convention: str | None = None, runner=None, spec=None) -> dict:
    """Run the HEX benchmark from the reference file ``path``; returns the ``metrics.json`` document.
    ``energy_convention``, ``runner``, ``spec``: as in :func:`benchmarks.efs.run_efs` (elements carry no
    MP2020 correction)."""
    data = read_reference_file(path, name="HEX")
    if max_items:
        data = data.subset(range(min(int(max_items), len(data))))
    elements = sorted({int(z) for atoms in data.structures for z in set(atoms.numbers)})
    if any(len(set(atoms.numbers)) > 1 for atoms in data.structures):
        data.notes.append("the file contains compounds; HEX is a set of elemental crystals")
    if elements and elements[-1] > 57:
        data.notes.append(f"elements beyond Z = 57 present (up to Z = {elements[-1]})")
    return run_efs(data, calculator, output_dir, benchmark="HEX", pressure_bins=bins, progress=progress, kind="hex",
                   energy_convention=energy_convention, runner=runner, spec=spec)
