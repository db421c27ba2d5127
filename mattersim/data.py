"""Labelled structures for training: extended XYZ files and PhononDB Born charges / dielectric tensors.

A :class:`Sample` is one structure with any subset of the labels :data:`LABELS`:

========================== ============ =========================================================
label                      shape        unit
========================== ============ =========================================================
``energy``                 float        eV (total of the cell)
``forces``                 (n, 3)       eV/Å
``stress``                 (3, 3)       eV/Å^3, ASE sign convention (positive = tensile)
``magmoms``                (n,)         μB
``charges``                (n,)         e
``born_effective_charges`` (n, 3, 3)    e, ``Z*[atom][field][displacement]`` (phonopy's order)
``dielectric_tensor``      (3, 3)       1 (electronic ε∞)
========================== ============ =========================================================

A label missing from a frame is simply absent: training counts every label where it exists.

Readers:

- :func:`read_extxyz`: any file ASE reads (extended XYZ above all). Labels come from the frame's
  ``info`` (``energy``, ``stress`` as 3x3 / 9 / 6-Voigt numbers, ``dielectric_tensor`` as 9 numbers or
  3x3) and per-atom ``arrays`` (``forces``, ``magmoms``, ``charges``, ``born_effective_charges`` as 9
  numbers per atom, row-major), or from the results of ASE's ``SinglePointCalculator`` (what
  ``ase.io.write`` stores for an ``Atoms`` with a calculator, and where ``ase.io.read`` puts these keys).
- :func:`read_phonondb`: PhononDB entries (``<root>/<id>/POSCAR-unitcell``, ``phonopy.conf`` with ``DIM``
  and ``PRIMITIVE_AXIS``, ``BORN``); one sample per entry on phonopy's primitive cell, with
  ``born_effective_charges`` expanded to every primitive atom by phonopy's own BORN parser, and
  ``dielectric_tensor``. Entries without ``BORN`` are skipped and listed in ``.skipped``.

Both return a :class:`SampleList` (a list of samples that also knows the files it was read from), and
:func:`data_hash` gives the sha256 of those files for the checkpoint's provenance.

Data: A. Togo, PhononDB (2018-04-17, VASP PBEsol), CC BY 4.0.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from ase import Atoms

from mattersim.errors import InputError
from mattersim.io import full_stress
from mattersim.settings import parse_primitive, parse_supercell

__all__ = ["LABELS", "STRESS_UNITS", "Sample", "SampleList", "data_hash", "read_extxyz", "read_phonondb"]

#: every label a sample may carry
LABELS = ("energy", "forces", "stress", "magmoms", "charges", "born_effective_charges", "dielectric_tensor")
#: stress units a data file may use (converted to eV/Å^3 on reading)
STRESS_UNITS = ("eV/A3", "eV/A^3", "eV/Å3", "eV/Å^3", "GPa", "kbar")


def _stress_factor(unit: str) -> float:
    from ase.units import GPa

    factors = {"GPa": GPa, "kbar": 0.1 * GPa}
    if unit not in STRESS_UNITS:
        raise InputError(f"stress_unit {unit!r} is not known; use one of {', '.join(STRESS_UNITS)}.")
    return factors.get(unit, 1.0)


@dataclass
class Sample:
    """One labelled structure. ``labels`` holds float64 numpy arrays (``energy`` a float)."""

    atoms: Atoms
    labels: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    _graphs: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def graph(self, cutoff: float, threebody_cutoff: float):
        """The structure's neighbour graph (:func:`mattersim.graph.build_structure_graph`), built once."""
        key = (float(cutoff), float(threebody_cutoff))
        if key not in self._graphs:
            from mattersim.graph import build_structure_graph

            self._graphs[key] = build_structure_graph(self.atoms, cutoff, threebody_cutoff)
        return self._graphs[key]


class SampleList(list):
    """A list of :class:`Sample` with ``files`` (the paths read) and ``skipped`` (entry ids left out)."""

    def __init__(self, samples: Iterable[Sample] = (), files: Sequence[Path] = (), skipped: Sequence[str] = ()):
        super().__init__(samples)
        self.files = [Path(f) for f in files]
        self.skipped = list(skipped)


# ---------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------


def _label_array(value: Any, name: str, where: str, shapes: Sequence[tuple], expected: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{where}: field '{name}' is not numeric ({str(value)[:60]!r}); write {expected}.") from None
    for shape in shapes:
        if arr.shape == shape:
            break
    else:
        raise InputError(f"{where}: field '{name}' has shape {arr.shape}; it needs {expected}, fix it in the file.")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{where}: field '{name}' contains NaN or infinite values; fix them or remove the label.")
    return arr


def check_labels(labels: dict[str, Any], n: int, where: str, stress_factor: float = 1.0) -> dict[str, Any]:
    """Labels with their canonical shapes (float64), or :class:`InputError` naming ``where`` and the field."""
    out: dict[str, Any] = {}
    for name, value in labels.items():
        if value is None:
            continue
        if name == "energy":
            arr = _label_array(value, name, where, [(), (1,)], "one number (eV)")
            out[name] = float(arr.reshape(()))
        elif name == "forces":
            out[name] = _label_array(value, name, where, [(n, 3)], f"(n_atoms, 3) = ({n}, 3) numbers (eV/Å)")
        elif name == "stress":
            arr = _label_array(value, name, where, [(3, 3), (9,), (6,)], "a 3x3 tensor, 9 or 6 (Voigt xx yy zz yz xz xy) numbers")
            out[name] = full_stress(arr) * stress_factor
        elif name in ("magmoms", "charges"):
            arr = _label_array(value, name, where, [(n,), (n, 1)], f"one number per atom ({n})")
            out[name] = arr.reshape(n)
        elif name == "born_effective_charges":
            arr = _label_array(value, name, where, [(n, 9), (n, 3, 3)], f"9 numbers per atom ({n}, 9), row-major Z*[field][displacement]")
            out[name] = arr.reshape(n, 3, 3)
        elif name == "dielectric_tensor":
            arr = _label_array(value, name, where, [(3, 3), (9,)], "9 numbers (a 3x3 tensor, row by row)")
            out[name] = arr.reshape(3, 3)
        else:
            raise InputError(f"{where}: unknown label '{name}'; labels are {', '.join(LABELS)}.")
    return out


# ---------------------------------------------------------------------------------------------------------
# extended XYZ (and anything else ASE reads)
# ---------------------------------------------------------------------------------------------------------


def read_extxyz(path: str | os.PathLike, stress_unit: str = "eV/A3", keys: dict[str, str] | None = None,
                max_z: int = 94) -> SampleList:
    """Every frame of ``path`` as a :class:`Sample`.

    ``stress_unit`` is the unit of the file's stress (``eV/A3``, ``GPa`` or ``kbar``; the sign convention
    must be ASE's, positive = tensile). ``keys`` maps a label to the name it has in the file, e.g.
    ``{"energy": "REF_energy"}``. Each structure is checked (:func:`mattersim.io.validate_structure`).
    Raises :class:`InputError` naming the file, the frame and the field for anything unusable.
    """
    import ase.io

    from mattersim.io import validate_structure

    name = os.fspath(path)
    p = Path(name)
    factor = _stress_factor(stress_unit)
    keys = {label: label for label in LABELS} | dict(keys or {})
    unknown = sorted(set(keys) - set(LABELS))
    if unknown:
        raise InputError(f"Data file '{name}': keys maps unknown labels {unknown}; labels are {', '.join(LABELS)}.")
    if not p.is_file():
        raise InputError(f"Data file '{name}' does not exist; check the path.")
    if p.stat().st_size == 0:
        raise InputError(f"Data file '{name}' is empty; it contains no structure.")
    fmt = "extxyz" if p.suffix.lower() in (".xyz", ".extxyz") else None
    try:
        frames = ase.io.read(name, index=":", format=fmt)
    except Exception as exc:  # ASE raises many exception types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(f"Data file '{name}' could not be read by ASE ({reason}); check the file's format.") from None
    if isinstance(frames, Atoms):
        frames = [frames]
    if not frames:
        raise InputError(f"Data file '{name}' contains no structures.")
    samples = []
    for i, atoms in enumerate(frames):
        where = f"Data file '{name}' frame {i}"
        n = len(atoms)
        validate_structure(atoms, max_z=max_z, label=f"{name}@{i}")
        results = dict(getattr(atoms.calc, "results", None) or {})
        raw = {}
        for label, key in keys.items():
            for store in (results, atoms.info, atoms.arrays):
                if key in store:
                    raw[label] = store[key]
                    break
        labels = check_labels(raw, n, where, factor)
        clean = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        samples.append(Sample(clean, labels, f"{name}@{i}"))
    return SampleList(samples, files=[p])


# ---------------------------------------------------------------------------------------------------------
# PhononDB
# ---------------------------------------------------------------------------------------------------------

_SETTINGS_NAMES = ("phonopy.conf", "phonon.conf")


def parse_phonopy_conf(text: str, label: str, n_unit: int) -> tuple[np.ndarray, Any]:
    """``DIM`` (3x3 int) and ``PRIMITIVE_AXIS``/``PRIMITIVE_AXES`` (3x3, or ``"auto"``; the identity when
    absent, phonopy's traditional default) of a phonopy settings file ``text`` named ``label`` (for
    messages), for a unit cell of ``n_unit`` atoms. Other tags are ignored."""
    tags: dict[str, tuple[int, str]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].split("!", 1)[0]
        if "=" not in line:
            continue
        key, value = line.split("=", 1)
        tags[key.strip().upper()] = (lineno, value.strip())
    if "DIM" not in tags:
        raise InputError(f"'{label}' has no DIM line; add the supercell, e.g. \"DIM = 2 2 2\" (3 integers) or "
                         "\"DIM = 2 0 0 0 2 0 0 0 2\" (9).")
    lineno, value = tags["DIM"]
    smat = parse_supercell(value, f"'{label}' line {lineno}: DIM")

    key = "PRIMITIVE_AXIS" if "PRIMITIVE_AXIS" in tags else "PRIMITIVE_AXES"
    if key not in tags:
        return smat, np.eye(3)  # phonopy's traditional default: the unit cell is the primitive cell
    lineno, value = tags[key]
    pmat = parse_primitive(value, f"'{label}' line {lineno}: {key}")
    if isinstance(pmat, str):  # "auto" or a centring letter: phonopy derives the axes
        return smat, pmat
    det_p = abs(float(np.linalg.det(pmat)))
    n_prim = n_unit * det_p
    if det_p < 1e-8 or abs(n_prim - round(n_prim)) > 1e-6 or round(n_prim) < 1:
        raise InputError(f"'{label}' line {lineno}: {key} = {value} gives a primitive cell of {n_prim:.4g} atoms "
                         f"from a unit cell of {n_unit}; give the primitive axes that belong to POSCAR-unitcell, or 'auto'.")
    return smat, pmat


def _read_ids(ids: str | os.PathLike | Sequence[str]) -> list[str]:
    if isinstance(ids, (str, os.PathLike)):
        p = Path(ids)
        if not p.is_file():
            raise InputError(f"PhononDB id list '{ids}' does not exist; give a file with one entry id per line, or a list.")
        lines = [line.split("#", 1)[0].strip() for line in p.read_text().splitlines()]
        return [line for line in lines if line]
    return [str(x) for x in ids]


def read_phonondb_entry(folder: str | os.PathLike, symprec: float = 1e-5) -> tuple[Sample | None, list[Path]]:
    """One PhononDB entry as a :class:`Sample` on the primitive cell, or ``None`` when it has no ``BORN``."""
    import ase.io
    from phonopy import Phonopy
    from phonopy.file_IO import parse_BORN
    from phonopy.structure.atoms import PhonopyAtoms

    folder = Path(folder)
    poscar = folder / "POSCAR-unitcell"
    if not poscar.is_file():
        raise InputError(f"PhononDB entry '{folder}' has no POSCAR-unitcell; restore the entry or leave it out of ids.")
    conf = next((folder / n for n in _SETTINGS_NAMES if (folder / n).is_file()), None)
    born = folder / "BORN"
    if not born.is_file():
        return None, []
    try:
        unit = ase.io.read(poscar, format="vasp")
    except Exception as exc:
        raise InputError(f"PhononDB file '{poscar}' is not a readable POSCAR ({type(exc).__name__}: {exc}); restore it.") from None
    smat, pmat = (parse_phonopy_conf(conf.read_text(), str(conf), len(unit)) if conf is not None
                  else (np.eye(3, dtype=int), np.eye(3)))
    cell = PhonopyAtoms(symbols=unit.get_chemical_symbols(), cell=unit.cell[:], scaled_positions=unit.get_scaled_positions())
    try:
        phonon = Phonopy(cell, supercell_matrix=smat, primitive_matrix=pmat, symprec=symprec)
    except Exception as exc:
        raise InputError(f"PhononDB entry '{folder}': phonopy cannot build the primitive cell from {conf} "
                         f"({type(exc).__name__}: {exc}); fix DIM / PRIMITIVE_AXIS.") from None
    prim = phonon.primitive
    try:
        params = parse_BORN(prim, symprec=symprec, is_symmetry=True, filename=born)
    except Exception as exc:
        raise InputError(f"PhononDB file '{born}' could not be parsed by phonopy ({type(exc).__name__}: {exc}); "
                         "check its format (eps_inf, then one line of 9 numbers per independent atom).") from None
    atoms = Atoms(symbols=list(prim.symbols), cell=np.asarray(prim.cell), scaled_positions=np.asarray(prim.scaled_positions), pbc=True)
    raw = {"born_effective_charges": np.asarray(params["born"]), "dielectric_tensor": np.asarray(params["dielectric"])}
    labels = check_labels(raw, len(atoms), f"PhononDB file '{born}'")
    files = [poscar, born] + ([conf] if conf is not None else [])
    return Sample(atoms, labels, str(folder)), files


def read_phonondb(root: str | os.PathLike, ids: str | os.PathLike | Sequence[str] | None = None, *,
                  symprec: float = 1e-5, progress: bool = False) -> SampleList:
    """Samples (primitive cell, ``born_effective_charges``, ``dielectric_tensor``) of PhononDB entries.

    ``root`` holds one folder per entry; ``ids`` selects entries (a list, or a file with one id per line;
    default: every folder with a ``POSCAR-unitcell``, sorted). Entries without ``BORN`` are skipped and
    listed in the result's ``.skipped``.
    """
    from mattersim.io import progress_bar

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"PhononDB folder '{root}' does not exist or is not a folder; give the folder holding the entries.")
    if ids is None:
        names = sorted(p.name for p in root.iterdir() if (p / "POSCAR-unitcell").is_file())
        if not names:
            raise InputError(f"PhononDB folder '{root}' holds no entry (no <id>/POSCAR-unitcell); check the path.")
    else:
        names = _read_ids(ids)
        missing = [n for n in names if not (root / n).is_dir()]
        if missing:
            raise InputError(f"PhononDB entry '{missing[0]}' is not in '{root}' ({len(missing)} of {len(names)} ids missing); "
                             "fix the ids or the folder.")
    samples, files, skipped = [], [], []
    with progress_bar(progress, len(names), "PhononDB") as bar:
        for name in names:
            sample, used = read_phonondb_entry(root / name, symprec=symprec)
            if sample is None:
                skipped.append(name)
            else:
                samples.append(sample)
                files.extend(used)
            bar.advance(1)
    return SampleList(samples, files=files, skipped=skipped)


# ---------------------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------------------


def data_hash(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the contents of ``paths`` (sorted by path; each file's own sha256 is hashed in)."""
    from mattersim.io import file_sha256

    total = hashlib.sha256()
    for path in sorted({os.fspath(p) for p in paths}):
        total.update(bytes.fromhex(file_sha256(path)))
    return total.hexdigest()
