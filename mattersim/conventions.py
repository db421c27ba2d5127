"""Energy reference conventions: which DFT energies a model was trained on, and converting between them.

Two conventions are in use among the universal potentials:

- ``raw``: the DFT total energy as computed (PBE, or PBE+U for the oxides and fluorides of Co, Cr, Fe, Mn,
  Mo, Ni, V and W, with the Materials Project's U values). MatterSim v1, SevenNet-0 and the reference sets
  of :mod:`benchmarks.datasets` are ``raw``.
- ``mp2020``: the same energy plus the Materials Project 2020 compatibility corrections (anion corrections
  for oxides, peroxides, superoxides, sulfides, fluorides, chlorides, ... and the GGA/GGA+U mixing
  corrections of the U elements), as pymatgen's ``MaterialsProject2020Compatibility`` applies them.
  CHGNet 0.3.0 was trained on these corrected MPtrj energies.

The MP2020 correction of a structure is computed by pymatgen (not by us) from a
``ComputedStructureEntry`` whose calculation is labelled the way the Materials Project's relaxation set
(``MPRelaxSet``) would have run it: GGA+U with MP's U values when the most electronegative element is O or F
and one of the U elements is present, GGA otherwise. The structure is passed too, so that pymatgen tells
oxides from peroxides and superoxides by the O-O distances and sulfides from polysulfides.

Units: eV, total energy of the structure (not per atom). A correction is usually negative (O: -0.687 eV
per atom of O in an oxide; Fe in a GGA+U oxide: -2.256 eV per Fe).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Sequence

import numpy as np
from ase import Atoms

from mattersim.errors import InputError

__all__ = ["ENERGY_CONVENTIONS", "check_convention", "mp2020_correction", "mp2020_corrections",
           "convention_offsets"]

#: the known conventions and what each means (recorded in benchmark outputs)
ENERGY_CONVENTIONS: dict[str, str] = {
    "raw": "DFT total energies as computed (PBE/PBE+U with the Materials Project's U values), no corrections",
    "mp2020": "DFT total energies plus the Materials Project 2020 compatibility corrections (pymatgen "
              "MaterialsProject2020Compatibility: anion and GGA/GGA+U mixing corrections)",
}


def check_convention(name: str | None, what: str = "energy_convention") -> str:
    """``name`` if it is a known convention, else an InputError naming ``what`` and the known ones."""
    if name not in ENERGY_CONVENTIONS:
        raise InputError(f"{what}={name!r} is not a known energy convention; use one of "
                         f"{', '.join(ENERGY_CONVENTIONS)}.")
    return str(name)


@lru_cache(maxsize=1)
def _compatibility():
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

    # check_potcar=False: there is no POTCAR to check; the calculation is labelled as MP's relax set ran it
    return MaterialsProject2020Compatibility(check_potcar=False)


def _entry(atoms: Atoms):
    from pymatgen.entries.computed_entries import ComputedStructureEntry
    from pymatgen.io.ase import AseAtomsAdaptor

    compat = _compatibility()
    structure = AseAtomsAdaptor.get_structure(Atoms(numbers=atoms.numbers, positions=atoms.positions,
                                                    cell=atoms.cell, pbc=atoms.pbc))
    elements = structure.composition.elements
    most_electronegative = max(elements, key=lambda el: el.X).symbol
    u_values = compat.u_settings.get(most_electronegative, {})
    hubbards = {el.symbol: float(u_values[el.symbol]) for el in elements if el.symbol in u_values}
    return ComputedStructureEntry(structure, 0.0, parameters={"run_type": "GGA+U" if hubbards else "GGA",
                                                               "hubbards": hubbards})


def mp2020_correction(atoms: Atoms) -> float:
    """The MP2020 correction of ``atoms`` in eV (total): ``E_mp2020 = E_raw + correction``.

    Raises ``ValueError`` when pymatgen's scheme rejects the structure (it then has no MP2020 energy).
    """
    from pymatgen.entries.compatibility import CompatibilityError

    if len(atoms) == 0:
        raise ValueError("an empty structure has no MP2020 correction")
    entry = _entry(atoms)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Failed to guess oxidation states ..." for intermetallics
        try:
            adjustments = _compatibility().get_adjustments(entry)
        except CompatibilityError as exc:
            raise ValueError(f"pymatgen's MaterialsProject2020Compatibility rejects it: {exc}") from None
    return float(sum(adj.value for adj in adjustments))


def mp2020_corrections(structures: Sequence[Atoms]) -> tuple[np.ndarray, dict[int, str]]:
    """The MP2020 correction (eV, total) of every structure, NaN where the scheme rejects one, with the
    reasons ``{index: text}``."""
    values = np.full(len(structures), np.nan)
    errors: dict[int, str] = {}
    for i, atoms in enumerate(structures):
        try:
            values[i] = mp2020_correction(atoms)
        except ValueError as exc:
            errors[i] = str(exc)[:300]
    return values, errors


def convention_offsets(structures: Sequence[Atoms], source: str, target: str) -> tuple[np.ndarray, dict[int, str]]:
    """What to add to total energies in convention ``source`` to express them in ``target`` (eV, one per
    structure; NaN where the conversion is undefined, with the reasons)."""
    check_convention(source, "source convention")
    check_convention(target, "target convention")
    if source == target:
        return np.zeros(len(structures)), {}
    corrections, errors = mp2020_corrections(structures)
    return (corrections if target == "mp2020" else -corrections), errors
