"""ASE <-> phonopy cells, one converter each way for every workflow and benchmark.

- :func:`to_phonopy_atoms`: an ``ase.Atoms`` (or a ``PhonopyAtoms``, returned as is) as ``PhonopyAtoms``;
  masses are passed only when set explicitly on the Atoms (isotopes), otherwise phonopy uses its own table,
  as phonopy does for a POSCAR;
- :func:`to_ase_atoms`: a ``PhonopyAtoms`` (or an ``ase.Atoms``, returned as is) as a periodic
  ``ase.Atoms`` with phonopy's masses.

- :func:`structure_record`: the JSON record of a structure (numbers, cell, positions, explicit masses),
  rounded to 1e-10, as summaries and the resumable stores' keys hold it.

Scaled positions are kept as they are (not wrapped), so atom order and images match phonopy's cells.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms

__all__ = ["structure_record", "to_ase_atoms", "to_phonopy_atoms"]


def to_phonopy_atoms(atoms):
    """phonopy's cell of ``atoms``: the masses set on ``atoms``, else phonopy's own, and for the elements that
    phonopy has no mass for (Po, At, Rn, Fr, Ra, Pu and beyond) ASE's (the longest-lived isotope's)."""
    from phonopy.structure.atoms import PhonopyAtoms

    if isinstance(atoms, PhonopyAtoms):
        return atoms
    kwargs = dict(symbols=atoms.get_chemical_symbols(), cell=np.array(atoms.cell[:], dtype=float),
                  scaled_positions=atoms.get_scaled_positions(wrap=False))
    if atoms.has("masses"):
        return PhonopyAtoms(masses=atoms.get_masses(), **kwargs)
    try:
        return PhonopyAtoms(**kwargs)
    except RuntimeError:  # "Masses of {...} are undefined"
        known = {sym: _phonopy_mass(sym) for sym in set(kwargs["symbols"])}
        masses = [known[sym] or ase_mass for sym, ase_mass in zip(kwargs["symbols"], atoms.get_masses())]
        return PhonopyAtoms(masses=masses, **kwargs)


def _phonopy_mass(symbol: str) -> float | None:
    """phonopy's mass of ``symbol`` (None where it has none)."""
    from phonopy.structure.atoms import PhonopyAtoms

    try:
        return float(PhonopyAtoms(symbols=[symbol], cell=np.eye(3), scaled_positions=np.zeros((1, 3))).masses[0])
    except RuntimeError:
        return None


def to_ase_atoms(cell) -> Atoms:
    if isinstance(cell, Atoms):
        return cell
    masses = None if cell.masses is None else np.array(cell.masses, dtype=float)
    return Atoms(symbols=list(cell.symbols), cell=np.array(cell.cell, dtype=float),
                 scaled_positions=np.array(cell.scaled_positions, dtype=float), masses=masses, pbc=True)


def _rounded(arr) -> list:
    # + 0.0 turns -0.0 into 0.0: a coordinate of ±1e-43 from a relaxation must not change a run's key
    return (np.round(np.asarray(arr, dtype=float), 10) + 0.0).tolist()


def structure_record(atoms: Atoms) -> dict:
    """Atomic numbers, cell and positions (Å, rounded to 1e-10) and explicitly set masses (else None)."""
    return {
        "numbers": [int(z) for z in atoms.numbers],
        "cell": _rounded(atoms.cell[:]),
        "positions": _rounded(atoms.positions),
        "masses": _rounded(atoms.get_masses()) if atoms.has("masses") else None,
    }


def unique_labels(labels) -> list[str]:
    """``labels`` with repeats told apart in order of appearance: ``[LaH10, LaH10, La]`` -> ``[LaH10, LaH10-2, La]``."""
    seen: dict[str, int] = {}
    out = []
    for x in labels:
        seen[x] = seen.get(x, 0) + 1
        out.append(x if seen[x] == 1 else f"{x}-{seen[x]}")
    return out
