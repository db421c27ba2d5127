"""Space-group symmetry of a structure from one spglib analysis, and ASE's ``FixSymmetry`` built from it.

ASE's ``FixSymmetry(atoms, symprec)`` analyses the structure four times (``refine_symmetry``: cell, positions
and a final check; ``prep_symmetry``: the operations); spglib 2.x takes 8-15 ms per analysis of a small cubic
cell, which is more than a model call on the CPU for the near-relaxed structures of an elastic or phonon
workflow. :func:`fix_symmetry` gives the same constraint from one analysis:

* the cell is set to spglib's idealised lattice, turned back to the input's orientation (as ASE does);
* the positions are set to spglib's idealised (standardised) positions, turned back likewise, each atom at the
  lattice image nearest to where it was (ASE's procedure, from the same analysis);
* the operations and their atom maps are those of that same analysis, the translations made exact.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from ase import Atoms

__all__ = ["symmetry_dataset", "symmetrize", "fix_symmetry"]


def symmetry_dataset(atoms: Atoms, symprec: float = 1e-5) -> Any:
    """spglib's symmetry dataset of ``atoms`` at tolerance ``symprec`` (Å), or None when it finds none."""
    import spglib

    try:  # spglib >= 2.5 raises this (in its new error mode) where older versions returned None
        from spglib.error import SpglibError
    except ImportError:  # pragma: no cover - spglib < 2.5 only returns None
        SpglibError = ()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # spglib 2.5's notice about its error handling
        try:
            return spglib.get_symmetry_dataset(
                (np.array(atoms.cell[:]), atoms.get_scaled_positions(), atoms.numbers), symprec=symprec)
        except SpglibError:
            return None


def _atom_maps(frac: np.ndarray, rotations: np.ndarray, translations: np.ndarray, numbers: np.ndarray):
    """For each operation (R, t) the map ``perm`` (G x N) that sends atom i onto atom perm[i] (the same element
    at the nearest periodic image of R f_i + t), or None when an operation does not map the atoms one to one.
    One operation at a time (a supercell has many)."""
    other = numbers[:, None] != numbers[None, :]
    perms = []
    for r, t in zip(rotations, translations):
        d = (frac @ r.T + t)[:, None, :] - frac[None, :, :]  # (N, N, 3)
        d -= np.round(d)
        dist = np.einsum("ijk,ijk->ij", d, d)
        dist[other] = np.inf
        p = np.argmin(dist, axis=1)
        if np.unique(p).size != p.size:
            return None
        perms.append(p)
    return np.array(perms)


def symmetrize(atoms: Atoms, dataset: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Make ``atoms`` (in place) exactly symmetric under the space group of spglib's ``dataset`` of it, as
    ASE's ``refine_symmetry`` does but from this one analysis: the cell becomes spglib's idealised lattice and
    the atoms its idealised (standardised) positions, both turned back into the input's orientation, each atom
    placed at the lattice image nearest to where it was. Returns the operations' exact translations and atom
    maps (``perm[g][i]``: the atom that operation g sends atom i onto), or None (``atoms`` untouched) when an
    operation of ``dataset`` does not map the atoms one to one (a tolerance too loose for this structure)."""
    rotations = np.asarray(dataset.rotations, dtype=float)
    perm = _atom_maps(atoms.get_scaled_positions(wrap=False), rotations,
                      np.asarray(dataset.translations, dtype=float), atoms.numbers)
    if perm is None:
        return None
    site = list(dataset.mapping_to_primitive)  # primitive site of each atom
    # spglib's primitive lattice is the input's (not idealised): in the input cell's basis its vectors are
    # multiples of 1/n (n = cells of the primitive one in the input), exact once rounded so
    n = len(atoms) // (max(site) + 1)
    in_cell = np.round(np.asarray(dataset.primitive_lattice, dtype=float) @ np.linalg.inv(atoms.cell[:]) * n) / n
    turn = np.asarray(dataset.std_rotation_matrix, dtype=float)  # standard frame -> the input's orientation
    std_lattice = np.asarray(dataset.std_lattice, dtype=float)
    atoms.set_cell(np.asarray(dataset.transformation_matrix, dtype=float).T @ std_lattice @ turn, scale_atoms=True)
    std_positions = np.asarray(dataset.std_positions, dtype=float) @ std_lattice @ turn
    primitive = in_cell @ atoms.cell[:]
    std_site = list(dataset.std_mapping_to_primitive)
    ideal = std_positions[[std_site.index(k) for k in site]]  # a standardised atom of each atom's site
    ideal += atoms.positions[site.index(0)] - std_positions[std_site.index(0)]  # the same origin as the input
    ideal += np.round((atoms.positions - ideal) @ np.linalg.inv(primitive)) @ primitive  # nearest image
    atoms.positions = ideal
    # the translations of the now exact positions (spglib's carry the input's noise): R f_0 + t = f_perm[0]
    frac = atoms.get_scaled_positions(wrap=False)
    translations = np.mod(frac[perm[:, 0]] - np.einsum("gij,j->gi", rotations, frac[0]), 1.0)
    return translations, perm


def fix_symmetry(atoms: Atoms, symprec: float = 1e-5, dataset: Any = None):
    """ASE's ``FixSymmetry`` constraint for ``atoms`` (which it symmetrises in place, as ASE's does), from one
    spglib analysis (``dataset``, when already at hand, must be of ``atoms`` at ``symprec``). Falls back to
    ASE's own construction when the analysis does not give a one-to-one map of the atoms."""
    from ase.constraints import FixSymmetry

    dataset = symmetry_dataset(atoms, symprec) if dataset is None else dataset
    exact = None if dataset is None else symmetrize(atoms, dataset)
    if exact is None:
        return FixSymmetry(atoms, symprec=symprec)
    constraint = FixSymmetry.__new__(FixSymmetry)
    constraint.atoms = atoms.copy()
    constraint.symprec = symprec
    constraint.verbose = False
    constraint.rotations = np.array(dataset.rotations)
    constraint.translations = exact[0]
    constraint.symm_map = [list(p) for p in exact[1]]
    constraint.do_adjust_positions = True
    constraint.do_adjust_cell = True
    return constraint
