"""Reading structures and writing results.

:func:`read_structures` reads anything ASE can read (POSCAR/CONTCAR, CIF, extxyz with all frames, ...) and
checks every structure with :func:`validate_structure`, so that a bad input stops with one clear
:class:`~mattersim.errors.InputError` line instead of a NaN or a traceback deep inside the model.

:func:`write_results` writes predictions either as extended XYZ (readable back with ``ase.io.read``: the
energy, forces and 3x3 stress come back through ``atoms.get_potential_energy()``, ``atoms.get_forces()``
and ``atoms.get_stress(voigt=False)``) or as a JSON document. Any further per-atom arrays (``magmoms``,
``charges``, ``born_effective_charges`` ...) and per-structure tensors (``dielectric_tensor`` ...) found in
the result dictionaries are passed through by both writers.

Units: energies in eV, forces in eV/Å, stress in eV/Å^3 with ASE's sign convention (positive = tensile).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from mattersim.errors import InputError

__all__ = [
    "MIN_DISTANCE",
    "RESULT_FORMATS",
    "check_result_path",
    "file_sha256",
    "read_structures",
    "validate_structure",
    "write_results",
]

#: Atoms closer than this (Å) are rejected as unphysical (overlapping atoms, duplicated sites).
MIN_DISTANCE = 0.5

#: Extensions :func:`write_results` understands.
RESULT_FORMATS = (".extxyz", ".json")

# Result keys that describe the whole structure even when their first dimension happens to equal the
# number of atoms (e.g. a 3x3 stress of a 3-atom cell).
_PER_STRUCTURE_KEYS = {
    "energy",
    "free_energy",
    "stress",
    "virial",
    "dipole",
    "magmom",
    "polarization",
    "dielectric_tensor",
    "dielectric_tensor_std",
    "pressure",
}
# Result keys that are always per atom.
_PER_ATOM_KEYS = {
    "forces",
    "energies",
    "stresses",
    "magmoms",
    "charges",
    "born_effective_charges",
    "born_effective_charges_std",
}
# Keys that ASE's extxyz reader turns into calculator results (and would therefore vanish from
# ``atoms.info``/``atoms.arrays`` on reading back). We write them under their own name, so reading back
# gives ``atoms.calc.results[key]``.
_RESERVED_ARRAY_NAMES = {"numbers", "positions", "species", "pos", "Z", "mass", "masses", "momenta"}


# ---------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    reason = text[0] if text else ""
    if not reason:
        reason = f"{type(exc).__name__}: the content does not match the expected format"
    if len(reason) > 160:
        reason = reason[:157] + "..."
    return reason.rstrip(".")


def read_structures(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    format: str | None = None,
    max_z: int = 94,
    validate: bool = True,
) -> list[tuple[str, Atoms]]:
    """Read every structure of every file.

    Parameters
    ----------
    paths:
        One path or several. Any format ASE reads; the format comes from the extension or ASE's
        detection (``POSCAR``/``CONTCAR`` by name), or from ``format`` for all files.
        Multi-frame files (extxyz, traj, ...) contribute all their frames.
    max_z:
        Largest atomic number the model knows (MatterSim v1: 94, Pu).
    validate:
        Run :func:`validate_structure` on each structure.

    Returns
    -------
    list of ``(label, atoms)``
        The label is the path as given for a single-structure file and ``path@i`` (ASE's index
        notation, 0-based) for frame ``i`` of a multi-frame file. ``atoms.info["label"]`` is set to it.

    Raises
    ------
    InputError
        A file is missing, unreadable or empty, or a structure fails validation.
    """
    import ase.io

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise InputError("No structure file was given; pass at least one file ASE can read (POSCAR, CIF, extxyz, ...).")

    out: list[tuple[str, Atoms]] = []
    for p in paths:
        name = os.fspath(p)
        path = Path(name)
        if not path.exists():
            raise InputError(f"Structure file '{name}' does not exist; check the path.")
        if path.is_dir():
            raise InputError(f"'{name}' is a directory, not a structure file; pass the file inside it (e.g. {name}/POSCAR).")
        try:
            if path.stat().st_size == 0:
                raise InputError(f"Structure file '{name}' is empty; it contains no structure.")
        except OSError as exc:  # pragma: no cover - permission problems etc.
            raise InputError(f"Structure file '{name}' cannot be read ({_short_reason(exc)}).") from exc
        try:
            frames = ase.io.read(name, index=":", format=format)
        except InputError:
            raise
        except Exception as exc:  # ASE raises many different exception types
            raise InputError(
                f"Structure file '{name}' could not be read by ASE ({_short_reason(exc)}); "
                "check the file and its extension (e.g. .cif, .vasp/POSCAR, .extxyz)."
            ) from exc
        if isinstance(frames, Atoms):
            frames = [frames]
        frames = list(frames)
        if not frames:
            raise InputError(f"Structure file '{name}' contains no structures.")
        for i, atoms in enumerate(frames):
            label = name if len(frames) == 1 else f"{name}@{i}"
            if len(atoms) == 0:
                raise InputError(f"Structure {label!r} contains no atoms.")
            # predictions attached by a previous run are not inputs
            atoms.calc = None
            atoms.info["label"] = label
            if validate:
                validate_structure(atoms, max_z=max_z, label=label)
            out.append((label, atoms))
    return out


def validate_structure(atoms: Atoms, *, max_z: int = 94, label: str | None = None, min_distance: float = MIN_DISTANCE) -> None:
    """Check that a structure is something the model can evaluate.

    Rejects (with one :class:`InputError` line): no atoms, NaN/inf coordinates or cell, an element outside
    ``1..max_z`` (what an element embedding can hold at all; the elements a model was *trained* on are
    checked once it is loaded, :func:`mattersim.registry.check_trained_elements`), a periodic cell with
    (near) zero volume, and two atoms (or an atom and a periodic image) closer than ``min_distance`` Å
    (minimum-image distances).
    """
    where = f"structure {label!r}" if label else "the structure"
    n = len(atoms)
    if n == 0:
        raise InputError(f"{where.capitalize()} contains no atoms.")

    numbers = np.asarray(atoms.numbers)
    bad = [int(z) for z in numbers if z < 1 or z > max_z]
    if bad:
        z = bad[0]
        sym = chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"
        sym_max = chemical_symbols[max_z] if max_z < len(chemical_symbols) else f"Z={max_z}"
        if z < 1:
            raise InputError(f"{where.capitalize()} contains a dummy atom/vacancy (Z={z}); remove it, the model only knows real elements H..{sym_max}.")
        holder = "no model here can evaluate: element embeddings end at" if max_z == 94 else \
            "the model cannot evaluate: its element embedding ends at"
        raise InputError(
            f"{where.capitalize()} contains {sym} (Z={z}), which {holder} {sym_max} (Z <= {max_z}); remove it."
        )

    pos = np.asarray(atoms.positions, dtype=float)
    if not np.all(np.isfinite(pos)):
        idx = int(np.where(~np.isfinite(pos).all(axis=1))[0][0])
        raise InputError(f"{where.capitalize()} has a NaN or infinite coordinate (atom {idx}, {atoms[idx].symbol}); fix the positions in the file.")
    cell = np.asarray(atoms.cell[:], dtype=float)
    if not np.all(np.isfinite(cell)):
        raise InputError(f"{where.capitalize()} has a NaN or infinite lattice vector; fix the cell in the file.")

    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any():
        vecs = cell[pbc]
        lengths = np.linalg.norm(vecs, axis=1)
        if np.any(lengths < 1e-6):
            raise InputError(
                f"{where.capitalize()} is periodic but has a zero-length lattice vector; "
                "give a proper cell (or set pbc=False for a molecule)."
            )
        # volume (3D), area (2D) or length (1D) spanned by the periodic vectors, relative to the vector lengths
        gram = vecs @ vecs.T
        measure = math.sqrt(max(float(np.linalg.det(gram)), 0.0))
        if measure < 1e-6 * float(np.prod(lengths)) or (pbc.all() and measure < 1e-3):
            raise InputError(
                f"{where.capitalize()} has a periodic cell with zero volume (collinear or coplanar lattice vectors); "
                "fix the lattice vectors in the file."
            )

    close = _closest_pair_below(atoms, min_distance)
    if close is not None:
        i, j, d = close
        si, sj = atoms[i].symbol, atoms[j].symbol
        if i == j:
            raise InputError(
                f"{where.capitalize()}: atom {i} ({si}) is only {d:.3f} Å from its own periodic image "
                f"(minimum allowed {min_distance} Å); the cell is too small."
            )
        raise InputError(
            f"{where.capitalize()}: atoms {i} ({si}) and {j} ({sj}) are only {d:.3f} Å apart "
            f"(minimum allowed {min_distance} Å); remove the duplicate or fix the positions."
        )


def _closest_pair_below(atoms: Atoms, cutoff: float) -> tuple[int, int, float] | None:
    """Closest pair (minimum image, periodic images included) with distance < cutoff, or None."""
    if len(atoms) == 0:
        return None
    i = j = d = None
    pbc = np.asarray(atoms.pbc, dtype=bool)
    try:
        if pbc.all() or not pbc.any():
            from vesin import NeighborList

            box = np.asarray(atoms.cell[:], dtype=float) if pbc.all() else np.zeros((3, 3))
            nl = NeighborList(cutoff=cutoff, full_list=False)
            i, j, d = nl.compute(points=np.asarray(atoms.positions, dtype=float), box=box, periodic=bool(pbc.all()), quantities="ijd")
        else:
            raise ImportError("mixed periodicity")
    except Exception:  # vesin missing, mixed pbc or a vesin limitation: ASE handles every case
        from ase.neighborlist import neighbor_list

        i, j, d = neighbor_list("ijd", atoms, cutoff, self_interaction=False)
    if len(d) == 0:
        return None
    k = int(np.argmin(d))
    a, b = sorted((int(i[k]), int(j[k])))
    return a, b, float(d[k])


# ---------------------------------------------------------------------------------------------------------
# file identity
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file, memoised on (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_cached(str(p), st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------


def _write_problem(folder: Path) -> str | None:
    """Why files cannot be created in the existing folder ``folder`` (None: they can). Tries it for real:
    permission bits say nothing about read-only mounts, and nothing to root."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".mattersim-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def ensure_writable_dir(path: str | os.PathLike, *, option: str = "-o", what: str = "Output folder") -> Path:
    """Create the folder ``path`` (and its parents) if needed and check that files can be written in it,
    before any expensive work; :class:`InputError` naming the folder, the reason and ``option`` otherwise."""
    folder = Path(os.fspath(path))
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} '{folder}' exists and is not a folder; choose another {option}.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{what} '{folder}' cannot be created ({exc.strerror or type(exc).__name__}); "
                         f"choose another {option} (a folder you can write to).") from None
    problem = _write_problem(folder)
    if problem:
        raise InputError(f"{what} '{folder}' is not writable ({problem}); choose another {option} "
                         "(a folder you can write to).")
    return folder


def ensure_writable_file(path: str | os.PathLike, *, option: str = "-o") -> Path:
    """Check (before any work) that the file ``path`` can be written: its folder exists or can be created
    and accepts new files, and ``path`` is not a folder."""
    target = Path(os.fspath(path))
    if target.is_dir():
        raise InputError(f"Output file '{target}' is a folder; give a file name to {option}.")
    ensure_writable_dir(target.parent, option=option, what=f"The folder of output file '{target.name}'")
    return target


def check_result_path(path: str | os.PathLike) -> str:
    """Return the result format (``"extxyz"`` or ``"json"``) for ``path``, or raise :class:`InputError`."""
    suffix = Path(os.fspath(path)).suffix.lower()
    if suffix == ".extxyz":
        return "extxyz"
    if suffix == ".json":
        return "json"
    raise InputError(
        f"Output file '{os.fspath(path)}' has an unsupported extension '{suffix or '(none)'}'; "
        f"use one of {', '.join(RESULT_FORMATS)}."
    )


def _split_result(result: dict[str, Any], n_atoms: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Split a result dict into per-structure values and per-atom arrays."""
    per_structure: dict[str, Any] = {}
    per_atom: dict[str, np.ndarray] = {}
    for key, value in result.items():
        if value is None:
            continue
        if key in _PER_ATOM_KEYS:
            per_atom[key] = np.asarray(value)
            continue
        if key in _PER_STRUCTURE_KEYS:
            per_structure[key] = value
            continue
        if isinstance(value, (np.ndarray, list, tuple)) and not isinstance(value, str):
            arr = np.asarray(value)
            if arr.ndim >= 1 and arr.shape[0] == n_atoms and arr.dtype.kind in "biufc":
                per_atom[key] = arr
                continue
        per_structure[key] = value
    return per_structure, per_atom


def full_stress(stress: Any) -> np.ndarray:
    """A stress as a 3x3 array: 6 Voigt numbers (xx yy zz yz xz xy) expanded, 9 numbers or a 3x3 reshaped."""
    from ase.stress import voigt_6_to_full_3x3_stress

    s = np.asarray(stress, dtype=float).reshape(-1)
    return voigt_6_to_full_3x3_stress(s) if s.size == 6 else s.reshape(3, 3)


def to_builtin(value: Any) -> Any:
    """numpy/torch scalars and arrays -> JSON-serialisable Python objects (non-finite floats -> None)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_builtin(value.tolist())
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_builtin(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` that replaces ``path`` when the ``with`` block succeeds.

    Readers never see a half-written file, and an exception (or an interrupt) leaves the old file as it
    was. The temporary name keeps ``path``'s suffix (numpy's ``savez`` appends ``.npz`` otherwise); the
    file gets the usual permissions (0666 minus the umask) and is flushed to disk before the rename.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=directory)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _labels_for(atoms_list: Sequence[Atoms], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        labels = [str(x) for x in labels]
        if len(labels) != len(atoms_list):
            raise ValueError(f"got {len(labels)} labels for {len(atoms_list)} structures")
        return labels
    return [str(a.info.get("label", f"structure_{i}")) for i, a in enumerate(atoms_list)]


def _model_info_builtin(model_info: dict[str, Any] | None) -> dict[str, Any]:
    return to_builtin(dict(model_info or {}))


def write_results(
    path: str | os.PathLike,
    atoms_list: Sequence[Atoms],
    results: Sequence[dict[str, Any]],
    model_info: dict[str, Any] | None = None,
    *,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write predictions for ``atoms_list`` to ``path`` (``.extxyz`` or ``.json``), atomically.

    ``results[i]`` is the dict for ``atoms_list[i]`` (keys ``energy`` (eV), ``forces`` (n, 3) eV/Å,
    ``stress`` (3, 3) eV/Å^3, and any others). Per-atom arrays (first dimension = number of atoms, or a
    known per-atom name such as ``magmoms``, ``charges``, ``born_effective_charges``) and per-structure
    values/tensors (``dielectric_tensor`` ...) are passed through.

    * ``.extxyz``: one frame per structure; ``energy`` and ``stress`` (written by ASE as 9 numbers) in the
      comment line and ``forces`` as per-atom columns, so ``ase.io.read(path, ":")`` gives them back via
      ``atoms.get_potential_energy()``, ``atoms.get_forces()``, ``atoms.get_stress(voigt=False)``. Arrays
      with more than 2 dimensions per atom (e.g. ``born_effective_charges`` (n, 3, 3)) are stored
      flattened as (n, 9), and per-structure 3x3 tensors (``dielectric_tensor``) as 9 numbers, both
      row-major (ASE's reader puts the names it knows, such as ``born_effective_charges`` and
      ``dielectric_tensor``, into ``atoms.calc.results``; the others stay in ``info`` / ``arrays``). The model is recorded as ``model_name``/``model_sha256``/... in each frame's info.
    * ``.json``: ``{"model": {...}, "units": {...}, "structures": [{label, formula, n_atoms, energy,
      energy_per_atom, forces, stress, ..., cell, pbc, numbers, positions}]}``.

    Returns the path written. Raises :class:`InputError` for an unsupported extension.
    """
    fmt = check_result_path(path)
    path = Path(os.fspath(path))
    atoms_list = list(atoms_list)
    results = list(results)
    if len(atoms_list) != len(results):
        raise ValueError(f"got {len(results)} results for {len(atoms_list)} structures")
    labels = _labels_for(atoms_list, labels)
    info = _model_info_builtin(model_info)
    if fmt == "extxyz":
        _write_extxyz(path, atoms_list, results, info, labels)
    else:
        _write_json(path, atoms_list, results, info, labels)
    return path


def _write_extxyz(path: Path, atoms_list, results, model_info, labels) -> None:
    import io as _io

    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for atoms, result, label in zip(atoms_list, results, labels):
        n = len(atoms)
        frame = atoms.copy()
        frame.calc = None
        # drop stale results a previous run may have left in info/arrays
        for key in list(frame.info):
            if key in ("energy", "free_energy", "stress", "virial") or key.startswith("model_"):
                del frame.info[key]
        for key in list(frame.arrays):
            if key in ("forces", "energies", "stresses"):
                del frame.arrays[key]
        per_structure, per_atom = _split_result(result, n)
        frame.info["label"] = label
        calc_results: dict[str, Any] = {}
        for key, value in per_structure.items():
            if key == "energy":
                calc_results["energy"] = float(value)
            elif key == "stress":
                calc_results["stress"] = np.asarray(value, dtype=float).reshape(3, 3) if np.size(value) == 9 else np.asarray(value, dtype=float)
            else:
                v = to_builtin(value) if not isinstance(value, (str, int, float, bool)) else value
                if isinstance(v, list):
                    v = np.asarray(v)
                    if v.shape == (3, 3) and v.dtype.kind in "biuf":
                        v = v.reshape(9)  # 3x3 tensors (dielectric_tensor ...): 9 numbers, row-major
                frame.info[key] = v
        for key, arr in per_atom.items():
            if key in _RESERVED_ARRAY_NAMES:
                continue
            arr = np.asarray(arr)
            if arr.dtype.kind == "c":
                arr = arr.real
            if arr.ndim > 2:
                arr = arr.reshape(n, -1)
            if key == "forces":
                calc_results["forces"] = np.asarray(arr, dtype=float)
            else:
                frame.arrays[key] = arr
        for key, value in model_info.items():
            if isinstance(value, (str, int, float, bool)):
                frame.info[f"model_{key}"] = value
        if calc_results:
            frame.calc = SinglePointCalculator(frame, **calc_results)
        frames.append(frame)

    buf = _io.StringIO()
    ase.io.write(buf, frames, format="extxyz")
    _atomic_write_text(path, buf.getvalue())


def _write_json(path: Path, atoms_list, results, model_info, labels) -> None:
    structures = []
    for atoms, result, label in zip(atoms_list, results, labels):
        n = len(atoms)
        per_structure, per_atom = _split_result(result, n)
        entry: dict[str, Any] = {
            "label": label,
            "formula": atoms.get_chemical_formula(mode="hill", empirical=False),
            "n_atoms": n,
        }
        if "energy" in per_structure:
            energy = float(per_structure["energy"])
            entry["energy"] = energy
            entry["energy_per_atom"] = energy / n
        if "forces" in per_atom:
            forces = np.asarray(per_atom["forces"], dtype=float).reshape(n, 3)
            entry["forces"] = forces
            entry["max_force"] = float(np.linalg.norm(forces, axis=1).max())
        if "stress" in per_structure:
            stress = full_stress(per_structure["stress"])
            entry["stress"] = stress
            from ase.units import GPa

            entry["pressure_GPa"] = float(-np.trace(stress) / 3.0 / GPa)
        for key, value in per_structure.items():
            if key not in ("energy", "stress"):
                entry[key] = value
        for key, value in per_atom.items():
            if key != "forces":
                entry[key] = value
        pbc = np.asarray(atoms.pbc, dtype=bool)
        entry["volume"] = float(atoms.get_volume()) if pbc.all() else None
        entry["cell"] = np.asarray(atoms.cell[:], dtype=float)
        entry["pbc"] = pbc.tolist()
        entry["numbers"] = np.asarray(atoms.numbers)
        entry["positions"] = np.asarray(atoms.positions, dtype=float)
        structures.append(to_builtin(entry))
    document = {
        "model": model_info,
        "units": {
            "energy": "eV",
            "forces": "eV/Å",
            "stress": "eV/Å^3 (3x3, ASE sign convention: positive = tensile)",
            "pressure_GPa": "GPa (-trace(stress)/3)",
            "positions": "Å",
        },
        "structures": structures,
    }
    _atomic_write_text(path, json.dumps(document, indent=2, allow_nan=False) + "\n")


def safe_filename(label: str, taken: set[str] | None = None) -> str:
    """A file-system safe, unique (within ``taken``) name derived from a structure label."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(label)).strip("._") or "structure"
    stem = stem[:100]
    if taken is None:
        return stem
    name = stem
    k = 2
    while name in taken:
        name = f"{stem}_{k}"
        k += 1
    taken.add(name)
    return name


# ---------------------------------------------------------------------------------------------------------
# logs and progress bars of long runs (workflows, benchmarks)
# ---------------------------------------------------------------------------------------------------------


class RunLog:
    """Timestamped lines to a log file (appended; none when ``path`` is None) and to ``logger``."""

    def __init__(self, path: str | os.PathLike | None, logger: Any = None):
        import logging

        self.path = Path(path) if path is not None else None
        self.logger = logger if logger is not None else logging.getLogger("mattersim")
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
            self._fh.write("\n")

    def _write(self, level: str, message: str) -> None:
        if self._fh is not None:
            import time

            self._fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {level:7s} {message}\n")
            self._fh.flush()

    def info(self, message: str) -> None:
        self._write("INFO", message)
        self.logger.info(message)

    def warning(self, message: str) -> None:
        self._write("WARNING", message)
        self.logger.warning(message)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _NullBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, n: int) -> None:
        pass

    def status(self, text: str) -> None:
        pass


def terminal_flag(stream) -> bool | None:
    """rich's ``force_terminal`` for ``stream``: None (rich decides) on a terminal, else False. Colours and
    other escape codes only ever go to a terminal, never into a file, a pipe or a log, even where
    FORCE_COLOR, PY_COLORS or GITHUB_ACTIONS is set."""
    try:
        return None if stream.isatty() else False
    except (AttributeError, ValueError, OSError):
        return False


def console(*, stderr: bool = False, **kwargs):
    """A rich Console on stdout or stderr that writes escape codes only to a terminal (:func:`terminal_flag`)."""
    import sys

    from rich.console import Console

    return Console(stderr=stderr, force_terminal=terminal_flag(sys.stderr if stderr else sys.stdout), **kwargs)


class _RichBar:
    def __init__(self, total: int, description: str):
        self.total, self.description = total, description

    def __enter__(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                 console=console(stderr=True))
        self.progress.__enter__()
        self.task = self.progress.add_task(self.description, total=self.total, status="")
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def status(self, text: str) -> None:
        """Text after the bar (e.g. a rate such as '12 ns/day')."""
        self.progress.update(self.task, status=text)


def progress_bar(enabled: bool, total: int, description: str):
    """A context manager with ``.advance(n)`` and ``.status(text)``: a rich progress bar on stderr (elapsed
    time, ETA, the status text), or a no-op when disabled."""
    if not enabled or total == 0:
        return _NullBar()
    return _RichBar(total, description)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON through a temporary file and a rename (never a half-written file)."""
    _atomic_write_text(Path(path), json.dumps(to_builtin(data), indent=2, ensure_ascii=False) + "\n")
