"""Energy / force / stress reference sets: where they live, how they are read and checked.

Known sets (:data:`SETS`), the test sets of the MatterSim paper published in the public MatterSim
repository (``data/benchmarks/``, MIT licence):

====================== ======= ==================================================================
name                   frames  what
====================== ======= ==================================================================
mpf-TP                 1069    MPF structures from MD at 0-5000 K and 0-1000 GPa
mpf-alkali-TP          460     the same for alkali-metal compounds
random-TP              693     random structures at 0-5000 K and 0-1000 GPa
alexandria-random-1k   1000    random Alexandria structures (near equilibrium)
mptrj-random-1k        1000    random MPtrj frames
mptrj-highest-stress-1k 1000   the 1000 MPtrj frames with the largest stress
====================== ======= ==================================================================

Where a set is looked for, in order: ``data_dir`` (``--data``), ``$MATTERSIM_BENCHMARK_DATA``, the cache
(``<cache>/benchmarks/``, see :func:`mattersim.registry.cache_dir`); if absent it is downloaded into the
cache (progress bar, sha256 and frame count checked, written atomically).

File format (also for your own sets and for HEX): any ASE-readable file, normally extended XYZ, one frame
per structure with the DFT reference as

- ``energy`` (eV, total, not per atom) in the comment line (or as a calculator result),
- ``forces`` (eV/Å) per-atom columns,
- ``stress`` (3x3 or 6 Voigt numbers) in the comment line, ASE sign convention (negative = compressive),
  in eV/Å^3 unless ``stress_unit`` says ``GPa`` or ``kbar``; a ``virial`` (eV) is accepted instead,
- optionally an id (``internal_id``, ``alexandria_id``, ``mptrj_snapshot_id``, ``id`` or ``label``) and
  a ``pressure`` (GPa) used for pressure bins instead of -tr(stress)/3,
- optionally ``energy_convention=raw`` or ``mp2020`` (the same in every frame; see
  :mod:`mattersim.conventions`): whether the reference energies are raw DFT or carry the Materials Project
  2020 corrections. Without it they are taken as ``raw``, which all the known sets are.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.units import GPa

from mattersim.errors import InputError
from mattersim.registry import file_sha256

__all__ = ["DATA_URL_PREFIX", "ENV_DATA", "SETS", "Dataset", "SetSpec", "load_set", "locate_set", "read_reference_file"]

#: Where the public MatterSim repository publishes the benchmark sets.
DATA_URL_PREFIX = "https://raw.githubusercontent.com/microsoft/mattersim/main/data/benchmarks/"
#: Environment variable naming a folder that holds the set files.
ENV_DATA = "MATTERSIM_BENCHMARK_DATA"

_ID_KEYS = ("internal_id", "alexandria_id", "mptrj_snapshot_id", "id", "label", "name")
_ENERGY_KEYS = ("energy", "REF_energy", "dft_energy", "total_energy")
_FORCE_KEYS = ("forces", "REF_forces", "dft_forces")
_STRESS_KEYS = ("stress", "REF_stress", "dft_stress")
_STRESS_UNITS = {"ev/a^3": 1.0, "ev/å^3": 1.0, "ev/ang^3": 1.0, "gpa": GPa, "kbar": 0.1 * GPa}


@dataclasses.dataclass(frozen=True)
class SetSpec:
    """A published reference set: file name, number of frames, sha256 and size of the published file."""

    name: str
    filename: str
    n_frames: int
    sha256: str
    size: int
    description: str

    @property
    def url(self) -> str:
        return DATA_URL_PREFIX + self.filename


SETS: dict[str, SetSpec] = {s.name: s for s in (
    SetSpec("mpf-TP", "mpf-TP.xyz", 1069,
            "5d07c81a4061ee314c84d6e5fb5913dc527e8536bc359fa00090bd206965d516", 1706262,
            "MPF structures from MD at 0-5000 K and 0-1000 GPa"),
    SetSpec("mpf-alkali-TP", "mpf-alkali-TP.xyz", 460,
            "52a7d4b202e2abd5b294f5bbcdb73072a1f2813d301ec878a5bf0641b1c15c8c", 674768,
            "alkali-metal compounds from MD at 0-5000 K and 0-1000 GPa"),
    SetSpec("random-TP", "random-TP.xyz", 693,
            "c14473dcf4bd71e1ed11556ac9ff12b68e7a423d813f939bc9eedaef663054d9", 1514015,
            "random structures from MD at 0-5000 K and 0-1000 GPa"),
    SetSpec("alexandria-random-1k", "alexandria-random-1k.xyz", 1000,
            "067b94bde28b2c88b57c3e38cab72bee7e551820b7eb3489eaf49d1595f538d2", 1185218,
            "1000 random Alexandria structures"),
    SetSpec("mptrj-random-1k", "mptrj-random-1k.xyz", 1000,
            "8e48469016e5baf69d765580416238c81ea84887db61dc424c43936ebf50f7e5", 3731695,
            "1000 random MPtrj frames"),
    SetSpec("mptrj-highest-stress-1k", "mptrj-highest-stress-1k.xyz", 1000,
            "20ce1cd8da3ccdc45c1904a8b3bf9583f03c595b914682661de221a633170249", 2224764,
            "the 1000 MPtrj frames with the highest stress"),
)}


@dataclasses.dataclass
class Dataset:
    """Structures with their DFT reference. Units: eV (total energy), eV/Å, eV/Å^3 (ASE sign), GPa."""

    name: str
    path: Path
    sha256: str
    structures: list[Atoms]
    energy: np.ndarray
    forces: list[np.ndarray]
    stress: np.ndarray
    ids: list[str]
    pressure_GPa: np.ndarray
    notes: list[str] = dataclasses.field(default_factory=list)
    energy_convention: str = "raw"  # of the reference energies (mattersim.conventions.ENERGY_CONVENTIONS)

    def __len__(self) -> int:
        return len(self.structures)

    @property
    def n_atoms(self) -> np.ndarray:
        return np.array([len(a) for a in self.structures], dtype=int)

    def describe(self) -> dict[str, Any]:
        """The dataset record of ``metrics.json``."""
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256, "n_items": len(self),
                "n_atoms": int(self.n_atoms.sum()), "energy_convention": self.energy_convention,
                "notes": list(self.notes)}

    def subset(self, indices) -> "Dataset":
        idx = [int(i) for i in indices]
        return dataclasses.replace(
            self, structures=[self.structures[i] for i in idx], energy=self.energy[idx],
            forces=[self.forces[i] for i in idx], stress=self.stress[idx], ids=[self.ids[i] for i in idx],
            pressure_GPa=self.pressure_GPa[idx], notes=self.notes + [f"subset of {len(idx)} of {len(self)} frames"])


def _spec(name: str) -> SetSpec | None:
    lowered = {k.lower(): v for k, v in SETS.items()}
    return lowered.get(name.strip().lower())


def locate_set(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True,
               progress: bool = True) -> Path:
    """The file of the known set ``name``: in ``data_dir``, ``$MATTERSIM_BENCHMARK_DATA`` or the cache,
    else downloaded into the cache (``download=True``)."""
    spec = _spec(name)
    if spec is None:
        raise InputError(f"Unknown benchmark set '{name}'; known sets: {', '.join(SETS)} (or pass the path of "
                         "an extxyz file with energy, forces and stress).")
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise InputError(f"Benchmark data folder '{folder}' does not exist; pass the folder that holds "
                             f"{spec.filename}.")
        path = folder / spec.filename
        if not path.is_file():
            raise InputError(f"'{path}' does not exist; put {spec.filename} (from {spec.url}) there or leave "
                             "out the data folder to use the cache.")
        return path
    candidates = []
    if os.environ.get(ENV_DATA):
        candidates.append(Path(os.environ[ENV_DATA]).expanduser() / spec.filename)
    from mattersim.registry import cache_dir, download_file

    cached = cache_dir() / "benchmarks" / spec.filename
    candidates.append(cached)
    for path in candidates:
        if path.is_file():
            return path
    if not download:
        raise InputError(f"Benchmark set '{spec.name}' is not on this machine (looked in "
                         f"{', '.join(str(p) for p in candidates)}); download {spec.url} to {cached} or pass "
                         "its folder with --data.")
    path, _ = download_file(spec.url, cached, label=f"benchmark set '{spec.name}'", size=spec.size,
                            sha256=spec.sha256, progress=progress, unavailable=InputError, invalid=InputError,
                            offline_hint=" (or pass the folder that holds it with --data)")
    return path


def _frame_lines(frames: list[Atoms]) -> list[int]:
    """First line (1-based) of each frame in an XYZ file."""
    lines, line = [], 1
    for atoms in frames:
        lines.append(line)
        line += len(atoms) + 2
    return lines


def _first(mapping: dict, keys) -> Any:
    for key in keys:
        if key in mapping:
            return mapping[key]
    return None


def _reference(atoms: Atoms, where: str) -> tuple[float, np.ndarray, np.ndarray]:
    """(energy eV, forces eV/Å, stress 3x3 eV/Å^3) of one frame, or an InputError naming the field."""
    calc_results = dict(getattr(atoms.calc, "results", {}) or {})
    info, arrays = atoms.info, atoms.arrays
    energy = _first(calc_results, ("energy",))
    if energy is None:
        energy = _first(info, _ENERGY_KEYS)
    if energy is None:
        raise InputError(f"{where} has no energy; write the DFT total energy (eV) as energy=... in the "
                         "comment line.")
    unit = str(info.get("energy_unit", "eV")).strip().lower()
    if unit != "ev":
        raise InputError(f"{where} has energy_unit={info.get('energy_unit')!r}; only eV is understood, "
                         "convert the energies to eV.")
    forces = _first(calc_results, ("forces",))
    if forces is None:
        forces = _first(arrays, _FORCE_KEYS)
    if forces is None:
        raise InputError(f"{where} has no forces; add per-atom forces (eV/Å) as a 'forces:R:3' column.")
    forces = np.asarray(forces, dtype=float)
    if forces.shape != (len(atoms), 3):
        raise InputError(f"{where} has forces of shape {forces.shape}, expected ({len(atoms)}, 3).")
    stress = _first(calc_results, ("stress",))
    scale = 1.0
    if stress is None:
        stress = _first(info, _STRESS_KEYS)
        unit = str(info.get("stress_unit", "eV/A^3")).strip().lower()
        if unit not in _STRESS_UNITS:
            raise InputError(f"{where} has stress_unit={info.get('stress_unit')!r}; use eV/A^3, GPa or kbar.")
        scale = _STRESS_UNITS[unit]
    elif str(info.get("stress_unit", "eV/A^3")).strip().lower() in ("gpa", "kbar"):
        scale = _STRESS_UNITS[str(info["stress_unit"]).strip().lower()]
    if stress is None and "virial" in info:
        if not atoms.pbc.all():
            raise InputError(f"{where} has a virial but is not periodic in all directions.")
        stress = -np.asarray(info["virial"], dtype=float).reshape(3, 3) / atoms.get_volume()
    if stress is None:
        raise InputError(f"{where} has no stress; write the DFT stress (3x3, eV/Å^3, ASE sign) as stress=\"...\" "
                         "in the comment line.")
    stress = np.asarray(stress, dtype=float) * scale
    if stress.shape == (6,):
        from ase.stress import voigt_6_to_full_3x3_stress

        stress = voigt_6_to_full_3x3_stress(stress)
    elif stress.size == 9:
        stress = stress.reshape(3, 3)
    else:
        raise InputError(f"{where} has a stress with {stress.size} numbers; give 9 (3x3) or 6 (Voigt).")
    values = [float(energy)], forces, stress
    if not all(np.all(np.isfinite(v)) for v in values):
        raise InputError(f"{where} has a non-finite (NaN or inf) energy, force or stress in its reference.")
    return float(energy), forces, stress


def read_reference_file(path: str | os.PathLike, name: str | None = None, *, expected_frames: int | None = None,
                        index: str = ":") -> Dataset:
    """Read and check a reference file (see the module docstring for its format)."""
    import ase.io

    from mattersim.io import validate_structure

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"Benchmark file '{path}' does not exist; pass an extxyz file with energy, forces and stress.")
    try:
        frames = ase.io.read(path, index=index)
    except Exception as exc:  # ASE raises many types for truncated or foreign files
        raise InputError(f"'{path}' could not be read ({type(exc).__name__}: {str(exc)[:200]}); the file is "
                         "truncated or not extended XYZ - download it again or check its format.") from None
    if isinstance(frames, Atoms):
        frames = [frames]
    if not frames:
        raise InputError(f"'{path}' holds no structures.")
    if expected_frames is not None and len(frames) != expected_frames:
        raise InputError(f"'{path}' holds {len(frames)} frames, but this set has {expected_frames}: the file is "
                         "truncated or a different version; delete it and run again to download a fresh copy.")
    is_xyz = path.suffix.lower() in (".xyz", ".extxyz")
    lines = _frame_lines(frames) if is_xyz else None
    structures, energies, forces, stresses, ids, pressures = [], [], [], [], [], []
    pressure_info = all("pressure" in a.info for a in frames)
    for i, atoms in enumerate(frames):
        where = f"'{path}', frame {i}" + (f" (line {lines[i]})" if lines else "")
        e, f, s = _reference(atoms, where)
        clean = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        try:
            validate_structure(clean, label=where)
        except InputError as exc:
            raise InputError(f"{exc} ({where})") from None
        structures.append(clean)
        energies.append(e)
        forces.append(f)
        stresses.append(s)
        label = _first(atoms.info, _ID_KEYS)
        ids.append(str(label) if label is not None else str(i))
        pressures.append(float(atoms.info["pressure"]) if pressure_info else -np.trace(s) / 3 / GPa)
    return Dataset(name=name or path.stem, path=path, sha256=file_sha256(path), structures=structures,
                   energy=np.array(energies), forces=forces, stress=np.array(stresses), ids=ids,
                   pressure_GPa=np.array(pressures), energy_convention=_energy_convention(frames, path))


def _energy_convention(frames: list[Atoms], path: Path) -> str:
    """The ``energy_convention`` the frames state (all the same), ``raw`` when none states one."""
    from mattersim.conventions import ENERGY_CONVENTIONS

    stated = {str(a.info["energy_convention"]).strip().lower() for a in frames if "energy_convention" in a.info}
    if not stated:
        return "raw"
    unknown = sorted(stated - set(ENERGY_CONVENTIONS))
    if unknown or len(stated) > 1:
        problem = (f"energy_convention={unknown[0]!r} is not known" if unknown
                   else f"frames state different energy conventions ({', '.join(sorted(stated))})")
        raise InputError(f"'{path}': {problem}; write energy_convention=raw (DFT as computed) or "
                         "energy_convention=mp2020 (Materials Project 2020 corrections added) in every frame, "
                         "or leave it out for raw.")
    return stated.pop()


def load_set(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, download: bool = True,
             progress: bool = True, name: str | None = None) -> Dataset:
    """A known set by name (:data:`SETS`; located with :func:`locate_set`) or any reference file by path."""
    text = os.fspath(name_or_path)
    spec = _spec(text) if not Path(text).expanduser().is_file() else None
    if spec is None:
        if not Path(text).expanduser().is_file():
            raise InputError(f"'{text}' is neither a known benchmark set ({', '.join(SETS)}) nor an existing "
                             "file; pass a set name or the path of an extxyz file with energy, forces and stress.")
        return read_reference_file(text, name=name)
    path = locate_set(spec.name, data_dir, download=download, progress=progress)
    data = read_reference_file(path, name=spec.name, expected_frames=spec.n_frames)
    if data.sha256 != spec.sha256:
        data.notes.append(f"sha256 {data.sha256} differs from the published file's {spec.sha256} "
                          "(same number of frames)")
    return data
