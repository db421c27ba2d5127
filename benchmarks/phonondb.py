"""PhononDB phonon benchmark: harmonic phonons of a model against the DFT (VASP PBEsol) force sets of PhononDB.

Public functions::

    entries = find_entries("../shared/data/phonondb/entries", subset="../shared/data/phonondb/benchmark_subset.txt")
    doc = run_phonondb(entries, calculator, "results/phonondb")     # the metrics.json document
    entry = load_entry("mp-8062-20180417.tar.lzma")                  # or a folder
    ph = reference_phonopy(entry, nac=True)                          # the DFT reference, a phonopy.Phonopy
    props = phonon_properties(ph, mesh)                              # workflows.phonon.phonon_properties

Command line: ``python -m benchmarks.phonondb --model NAME_OR_PATH --entries DIR [--subset FILE] [--max N]
[--at-dft-volume | --qha [VOLUMES] [--harmonic-from DIR]] -o OUT``.

**QHA variant** (``--qha``, :func:`_qha_record`): the model's quasi-harmonic G(900 K) - G(300 K) at P = 0 from
:func:`workflows.qha.run_qha` on the entry's unit cell and supercell, against the DFT's harmonic ΔF at the
DFT volume (``free_energy_change_qha_mae_meV_per_atom``, with the mean quasi-harmonic part of the model's
change and the entries left out by reason). It is computed only for the entries the harmonic metrics count
(no imaginary mode in the DFT reference, nor in the model's harmonic phonons at its relaxed V0); the others
record why (``{"skipped": reason}``), which spares about 60 % of its cost on the 312-entry subset.
:func:`stable_reference_ids` (``--stable-reference-ids FILE``, no model) lists the entries whose DFT
reference has no imaginary mode, so that a ``--qha --subset FILE`` run skips the others altogether.

**Entries.** A PhononDB entry is a folder ``<id>/`` or an archive ``<id>.tar.lzma`` / ``<id>.tar.xz`` of the
public PhononDB mirror (a folder ``<id>/`` inside; only the needed members are read, in memory, nothing is
extracted) with ``POSCAR-unitcell``, the phonopy settings ``phonopy.conf`` (or ``phonon.conf``: ``DIM`` = 3 or
9 integers, ``PRIMITIVE_AXIS``/``PRIMITIVE_AXES`` = 9 numbers, fractions allowed, or ``auto``; without it
the unit cell is the primitive cell), ``FORCE_SETS`` (phonopy's type-1 format: DFT forces of the supercells
with one atom displaced by 0.01 Å) and optionally ``BORN`` (phonopy format: eps_inf and Z*).

**Reference** (:func:`reference_phonopy`): phonopy on the DFT structure and ``FORCE_SETS``, exactly as
``phonopy.load(supercell_matrix=DIM, primitive_matrix=PRIMITIVE_AXIS, unitcell_filename=...,
force_sets_filename=..., born_filename=...)`` does it: compact force constants
(``produce_force_constants``), ``symmetrize_force_constants()``; NAC parameters from ``BORN`` read with
phonopy's own parser (:func:`workflows.nac.read_born`), Gonze-Lee method.

**Prediction**: :func:`workflows.phonon.run_phonon` on the DFT unit cell with the entry's supercell and
primitive matrices: full relaxation (positions and cell, ``fmax`` = :data:`FMAX` eV/Å, at most
:data:`RELAX_STEPS` FIRE steps), displacements of :data:`DISPLACEMENT` Å, no NAC. The NAC variant uses the
*same* force constants (no new forces) with ``nac_params`` set from the model's own Z*/eps_inf predictor when
it has one (:func:`workflows.nac.find_predictor`; ``"nac": "model"``), otherwise from the entry's DFT
``BORN`` (``"nac": "dft-born"``): phonopy's parser expands the file on the DFT primitive cell (whose symmetry
the file was written for), the tensors are carried over atom by atom to the relaxed primitive cell (same
atom order; the relaxation does not rotate the cell) and symmetrised there with
:func:`workflows.nac.symmetrize`. Entries without ``BORN`` have no NAC variant (``"nac": "no BORN"``; the
NAC properties are those without NAC) and are left out of the NAC metrics.

**Properties** of both sides come from the same function, :func:`workflows.phonon.phonon_properties`, on
the same mesh: ω_max (THz, the maximum over the mesh and the seekpath band path), the mean group velocity
|v| (m/s, mesh weights, all branches), the harmonic free energy F (kJ/mol), entropy S and heat capacity Cv
(J/K/mol) at 300 K, all per mole of *primitive cells* (same primitive matrix on both sides), and the
imaginary modes (below -0.01 THz on the mesh or the band path, the three acoustic modes at Γ excepted).
Mesh: phonopy's length-based Γ-centred mesh of :data:`DEFAULT_MESH_LENGTH` Å, the same definition (the
length) for the reference and the prediction, without and with NAC. For body-centred and other non-simple
cells phonopy then builds a generalized regular grid and reports its diagonal (e.g. ``[1, 9, 72]``) as the
mesh numbers; feeding those numbers back as a plain regular mesh samples another grid (a perfect model
scored errors of 4 kJ/mol in F on mp-3527), so the length itself is passed every time. Each entry records
the numbers phonopy used on both sides (``mesh``, ``mesh_prediction``) and the definition
(``mesh_definition``).

**Metrics** (``metrics.json``): MAEs of ω_max (THz), mean group velocity (m/s), F (kJ/mol), S and Cv
(J/K/mol) without NAC (``omega_max_mae_THz``, ``group_velocity_mae_m_per_s``, ``free_energy_mae_kJ_per_mol``,
``entropy_mae_J_per_K_per_mol``, ``heat_capacity_mae_J_per_K_per_mol``) and with NAC (the same keys with
``_nac``), over the entries that succeeded and have no imaginary mode in the reference nor in the
prediction (of the variant concerned); the entries with imaginary modes get the same MAEs in the group
``"with imaginary modes"``, so nothing is hidden. Counts: entries, succeeded, failed, counted, with
imaginary modes in the reference, in the prediction. ``parity.npz``: ``<quantity>__ref`` and
``<quantity>__pred`` over the counted entries for ``omega_max``, ``group_velocity``, ``free_energy``,
``entropy``, ``heat_capacity`` (and ``<quantity>_nac__ref/__pred`` for the NAC variant).

**Files** (layout of :mod:`benchmarks.common`): ``OUT/benchmark.json``; ``OUT/<model-slug>/metrics.json``,
``parity.npz``, ``run.log`` and ``entries/<id>.json`` (one per entry: reference and predicted properties of
both variants, relaxation, timings, or the error); ``OUT/reference/<id>.json``: the DFT reference's
properties, which do not depend on the model, kept for the next model run into the same folder (keyed on the
entry's input files, the mesh, symprec, the NAC method and phonopy's version). A rerun with the same output
folder resumes: entries
whose json was computed with the same model (name, version, sha256), settings and input files are not
evaluated again (failed ones neither, unless ``retry_failed=True``). A failing entry never stops the run: it
is listed in ``failures`` with its exception type and message.

**Dataset identity**: ``dataset["sha256"]`` is the sha256 of the sorted lines ``"<id> <input_sha256>"``, where
an entry's ``input_sha256`` hashes the contents of its ``POSCAR-unitcell``, settings file, ``FORCE_SETS`` and
``BORN`` (see :func:`entry_input_sha256`), so the same data as folders or archives hash the same.

Data: A. Togo, PhononDB (2018-04-17, VASP PBEsol), CC BY 4.0.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import logging
import lzma
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from ase import Atoms

from benchmarks.common import (compute_times, entry_key, load_json, metric, metrics_document, model_folder,
                               peak_rss_mib, print_metrics_main, run_entry_tasks, utc_now, write_benchmark_json)
from mattersim.calculator import model_info
from mattersim.data import parse_phonopy_conf
from mattersim.errors import InputError
from mattersim.distributed import ModelSpec, TaskRunner, add_dask_options
from mattersim.io import RunLog, atomic_path, atomic_write_json
from mattersim.settings import parse_mesh
from workflows.cells import to_phonopy_atoms
from workflows.outputs import model_identity
from workflows.phonon import phonon_properties

__all__ = [
    "DEFAULT_MESH_LENGTH",
    "PhononDBEntry",
    "QUANTITIES",
    "entry_input_sha256",
    "find_entries",
    "load_entry",
    "main",
    "phonon_properties",
    "reference_phonopy",
    "run_phonondb",
    "stable_reference_ids",
]

logger = logging.getLogger("mattersim.bench")

#: phonopy length-based mesh density (Å) for both sides; the mesh numbers are chosen on the reference primitive cell
DEFAULT_MESH_LENGTH = 50.0
#: relaxation of the prediction: force threshold (eV/Å) and maximum number of FIRE steps
FMAX = 0.02
RELAX_STEPS = 500
#: finite displacement (Å), as in PhononDB
DISPLACEMENT = 0.01
#: NAC method on both sides (phonopy's default, Gonze-Lee)
NAC_METHOD = "gonze"
#: symmetry tolerance (Å), phonopy's default
SYMPREC = 1e-5
#: ``relax_mode`` of a run at the DFT volume (positions relaxed at the DFT cell, space group kept)
AT_DFT_VOLUME = "positions-symmetric (DFT cell)"
#: the QHA variant (``--qha``): default volume grid (V/V0 - 1; 7 volumes, wider on the expanded side, where
#: 900 K takes soft crystals), temperature grid (K) and the two temperatures of the free-energy change
QHA_VOLUMES = "-0.03:0.09:7"
QHA_TMAX, QHA_TSTEP = 1000.0, 50.0
QHA_T_LOW, QHA_T_HIGH = 300.0, 900.0
#: layout version of ``entries/<id>.json``
ENTRY_SCHEMA = "mattersim-benchmark/phonondb-entry/1"
#: schema of the model-independent reference properties kept in ``OUT/reference/<id>.json``
REFERENCE_SCHEMA = "mattersim-benchmark/phonondb-reference/1"
#: archive suffixes accepted as entries
ARCHIVE_SUFFIXES = (".tar.lzma", ".tar.xz", ".tlz", ".txz")
#: largest archive member read (bytes)
_MAX_MEMBER_BYTES = 512 * 1024 * 1024
_SETTINGS_NAMES = ("phonopy.conf", "phonon.conf")
_FILES = ("POSCAR-unitcell", "settings", "FORCE_SETS", "BORN")

#: (parity name, key in the per-entry property record, metric-key unit tag, unit, label)
QUANTITIES = (
    ("omega_max", "omega_max_THz", "THz", "THz", "ω_max MAE"),
    ("group_velocity", "group_velocity_m_per_s", "m_per_s", "m/s", "Mean group velocity MAE"),
    ("group_velocity_max", "group_velocity_max_m_per_s", "m_per_s", "m/s", "Maximum group velocity MAE"),
    ("free_energy_change", "free_energy_change_300_900_meV_per_atom", "meV_per_atom", "meV/atom",
     "ΔF(300→900 K) MAE (harmonic, at the DFT / relaxed volume)"),
    ("free_energy", "free_energy_kJ_per_mol", "kJ_per_mol", "kJ/mol", "Free energy F(300 K) MAE"),
    ("entropy", "entropy_J_per_K_per_mol", "J_per_K_per_mol", "J/K/mol", "Entropy S(300 K) MAE"),
    ("heat_capacity", "heat_capacity_J_per_K_per_mol", "J_per_K_per_mol", "J/K/mol", "Heat capacity Cv(300 K) MAE"),
)


# ---------------------------------------------------------------------------------------------------------
# entries
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PhononDBEntry:
    """One PhononDB material, parsed and checked.

    ``supercell_matrix`` (3x3 int, phonopy's ``DIM``) and ``primitive_matrix`` (3x3 float, phonopy's
    ``PRIMITIVE_AXIS``, or ``"auto"``) are relative to ``unitcell``. ``force_sets`` is phonopy's type-1
    displacement dataset (``{"natom", "first_atoms": [{"number", "displacement", "forces"}]}``, 0-based atom
    numbers, Å and eV/Å). ``force_sets_path`` / ``born_path`` say where the files are (a path, or
    ``ARCHIVE:MEMBER`` for archives); ``born_text`` is the BORN file's text (None without BORN).
    """

    id: str
    unitcell: Atoms
    supercell_matrix: np.ndarray
    primitive_matrix: Any
    force_sets: dict
    force_sets_path: str
    born_path: str | None
    born_text: str | None
    source: Path
    settings_path: str
    input_sha256: str = ""
    files: dict = field(default_factory=dict)

    @property
    def has_born(self) -> bool:
        return self.born_text is not None

    @property
    def n_supercell(self) -> int:
        return int(round(len(self.unitcell) * abs(np.linalg.det(self.supercell_matrix))))


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES) or (path.is_file() and tarfile.is_tarfile(path))


def entry_id(path: str | os.PathLike) -> str:
    """The entry id of a folder (its name) or an archive (its name without ``.tar.lzma`` / ``.tar.xz``)."""
    name = Path(path).name
    for suffix in ARCHIVE_SUFFIXES + (".tar",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_folder(path: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    texts, where = {}, {}
    for name in ("POSCAR-unitcell", "FORCE_SETS", "BORN") + _SETTINGS_NAMES:
        f = path / name
        if f.is_file():
            key = "settings" if name in _SETTINGS_NAMES else name
            if key in texts:  # phonopy.conf wins over phonon.conf
                continue
            try:
                texts[key] = f.read_bytes()
            except OSError as exc:
                raise InputError(f"'{f}' cannot be read ({exc.strerror or exc}); check its permissions.") from None
            where[key] = str(f)
    return texts, where


def _read_archive(path: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """The needed members of a PhononDB archive, read in memory (no extraction: no path traversal possible)."""
    wanted = {"POSCAR-unitcell": "POSCAR-unitcell", "FORCE_SETS": "FORCE_SETS", "BORN": "BORN",
              "phonopy.conf": "settings", "phonon.conf": "settings"}
    texts, where, depth = {}, {}, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = member.name.rstrip("/").split("/")[-1]
                key = wanted.get(base)
                if key is None or not member.isfile():  # links, devices and folders are never read
                    continue
                d = member.name.count("/")
                rank = (d, 0 if base != "phonon.conf" else 1)  # shallowest first; phonopy.conf before phonon.conf
                if key in texts and depth[key] <= rank:
                    continue
                if member.size > _MAX_MEMBER_BYTES:
                    raise InputError(f"'{path}:{member.name}' is {member.size / 1e6:.0f} MB, more than a PhononDB "
                                     "file can be; check the archive.")
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                texts[key] = fh.read()
                where[key] = f"{path}:{member.name}"
                depth[key] = rank
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as exc:
        raise InputError(f"'{path}' is not a readable tar archive ({type(exc).__name__}: {exc}); download the "
                         "entry's .tar.lzma again or give its unpacked folder.") from None
    return texts, where


def _read_entry_files(path: str | os.PathLike) -> tuple[str, Path, dict[str, bytes], dict[str, str]]:
    """(id, path, raw file contents by role, where each one is) of a folder or archive entry."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"PhononDB entry '{path}' does not exist; pass an entry folder (with POSCAR-unitcell, "
                         "phonopy.conf and FORCE_SETS) or its <id>.tar.lzma archive.")
    if path.is_dir():
        texts, where = _read_folder(path)
    elif _is_archive(path):
        texts, where = _read_archive(path)
    else:
        raise InputError(f"PhononDB entry '{path}' is neither a folder nor a .tar.lzma/.tar.xz archive; pass the "
                         "entry folder or its archive.")
    return entry_id(path), path, texts, where


def entry_input_sha256(texts: dict[str, bytes]) -> str:
    """sha256 over the entry's inputs: for POSCAR-unitcell, the settings file, FORCE_SETS and BORN in this
    order, the line ``"<role> <sha256 of the content>"`` (``-`` for a missing file)."""
    h = hashlib.sha256()
    for role in _FILES:
        content = texts.get(role)
        h.update(f"{role} {hashlib.sha256(content).hexdigest() if content is not None else '-'}\n".encode())
    return h.hexdigest()


def _decode(raw: bytes, label: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            return raw.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
            raise InputError(f"'{label}' is not a text file; restore the original PhononDB file.") from None


def _numbers(line: str, count: int, label: str, lineno: int, what: str, hint: str) -> list[float]:
    tokens = line.split()
    if len(tokens) != count:
        raise InputError(f"'{label}' line {lineno}: expected {what} ({count} numbers), found {len(tokens)}; {hint}.")
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        raise InputError(f"'{label}' line {lineno}: {what} has a token that is not a number; {hint}.") from None
    if not all(np.isfinite(values)):
        raise InputError(f"'{label}' line {lineno}: {what} contains NaN or infinity; {hint}.")
    return values


def _parse_force_sets(text: str, label: str, n_supercell: int, dim_label: str) -> dict:
    """phonopy's type-1 FORCE_SETS, checked line by line (phonopy's own parser does not report truncation)."""
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    hint = ("a type-1 FORCE_SETS has the number of supercell atoms, the number of displacements, then per "
            "displacement the displaced atom (1-based), its displacement (3 numbers) and one force line per atom; "
            "restore the complete file")
    if not lines:
        raise InputError(f"'{label}' is empty; {hint}.")
    first = lines[0][1].split()
    if len(first) == 6:  # type 2: displacement and force of every atom on every line
        from phonopy.file_IO import parse_FORCE_SETS_from_strings

        n_lines = len(lines)
        if n_lines % n_supercell:
            raise InputError(f"'{label}' (type-2 FORCE_SETS) has {n_lines} lines, not a multiple of the "
                             f"{n_supercell} atoms of the supercell ({dim_label}); the file is truncated or belongs "
                             "to another supercell.")
        try:
            return parse_FORCE_SETS_from_strings(text, natom=n_supercell)
        except Exception as exc:
            raise InputError(f"'{label}' (type-2 FORCE_SETS) could not be read ({exc}); {hint}.") from None
    pos = 0

    def take(what: str) -> tuple[int, str]:
        nonlocal pos
        if pos >= len(lines):
            last = lines[-1][0]
            raise InputError(f"'{label}' is truncated: it ends after line {last} where {what} was expected; {hint}.")
        item = lines[pos]
        pos += 1
        return item

    def integer(what: str) -> int:
        lineno, line = take(what)
        tokens = line.split()
        try:
            if len(tokens) != 1:
                raise ValueError
            return int(tokens[0])
        except ValueError:
            raise InputError(f"'{label}' line {lineno}: expected {what} (one integer), found {line.strip()[:60]!r}; "
                             f"{hint}.") from None

    natom = integer("the number of atoms of the supercell")
    if natom != n_supercell:
        raise InputError(f"'{label}' has forces for {natom}-atom supercells but the supercell {dim_label} has "
                         f"{n_supercell} atoms; check DIM in the settings file or use this entry's own FORCE_SETS.")
    n_disp = integer("the number of displacements")
    if n_disp < 1:
        raise InputError(f"'{label}' announces {n_disp} displacements; {hint}.")
    first_atoms = []
    for k in range(n_disp):
        where = f"displacement {k + 1} of {n_disp}"
        atom = integer(f"the displaced atom of {where}")
        if not 1 <= atom <= natom:
            raise InputError(f"'{label}': {where} moves atom {atom}, outside 1..{natom}; {hint}.")
        lineno, line = take(f"the displacement vector of {where}")
        disp = _numbers(line, 3, label, lineno, f"the displacement vector of {where}", hint)
        forces = np.empty((natom, 3))
        for a in range(natom):
            lineno, line = take(f"the force on atom {a + 1} of {where}")
            forces[a] = _numbers(line, 3, label, lineno, f"the force on atom {a + 1} of {where}", hint)
        first_atoms.append({"number": atom - 1, "displacement": np.array(disp, dtype="double"),
                            "forces": forces})
    if pos < len(lines):
        raise InputError(f"'{label}' line {lines[pos][0]}: more lines than the {n_disp} displacements its header "
                         f"announces; {hint}.")
    return {"natom": natom, "first_atoms": first_atoms}


def _read_poscar(text: str, label: str) -> Atoms:
    import ase.io

    try:
        atoms = ase.io.read(io.StringIO(text), format="vasp")
    except Exception as exc:
        raise InputError(f"'{label}' is not a readable VASP POSCAR ({type(exc).__name__}: {exc}); restore the "
                         "entry's POSCAR-unitcell.") from None
    if len(atoms) == 0 or abs(atoms.cell.volume) < 1e-6:
        raise InputError(f"'{label}' has no atoms or no cell volume; restore the entry's POSCAR-unitcell.")
    atoms.pbc = True
    return atoms


def _entry_from_files(eid: str, path: Path, texts: dict[str, bytes], where: dict[str, str]) -> PhononDBEntry:
    for role, hint in (("POSCAR-unitcell", "the DFT unit cell"), ("settings", "DIM and PRIMITIVE_AXIS"),
                       ("FORCE_SETS", "the DFT forces of the displaced supercells")):
        if role not in texts:
            name = "phonopy.conf (or phonon.conf)" if role == "settings" else role
            inside = "archive" if path.is_file() else "folder"
            extra = (" (only the 312 entries of benchmark_subset.txt have one)" if role == "FORCE_SETS" else "")
            raise InputError(f"PhononDB entry '{path}' has no {name} ({hint}) in its {inside}{extra}; "
                             "give an entry with POSCAR-unitcell, phonopy.conf and FORCE_SETS.")
    unit = _read_poscar(_decode(texts["POSCAR-unitcell"], where["POSCAR-unitcell"]), where["POSCAR-unitcell"])
    smat, pmat = parse_phonopy_conf(_decode(texts["settings"], where["settings"]), where["settings"], len(unit))
    n_sc = int(round(len(unit) * abs(np.linalg.det(smat))))
    dim_label = f"DIM {smat.tolist()} of {where['settings']} ({len(unit)} x {n_sc // len(unit)} atoms)"
    dataset = _parse_force_sets(_decode(texts["FORCE_SETS"], where["FORCE_SETS"]), where["FORCE_SETS"], n_sc, dim_label)
    born_text = _decode(texts["BORN"], where["BORN"]) if "BORN" in texts else None
    return PhononDBEntry(
        id=eid, unitcell=unit, supercell_matrix=smat, primitive_matrix=pmat, force_sets=dataset,
        force_sets_path=where["FORCE_SETS"], born_path=where.get("BORN"), born_text=born_text, source=path,
        settings_path=where["settings"], input_sha256=entry_input_sha256(texts), files=dict(where),
    )


def load_entry(path: str | os.PathLike) -> PhononDBEntry:
    """Read and check one PhononDB entry: a folder ``<id>/`` or an archive ``<id>.tar.lzma`` / ``.tar.xz``.

    Raises :class:`~mattersim.errors.InputError` naming the file and the field for a missing
    ``POSCAR-unitcell`` / settings file / ``FORCE_SETS``, a ``DIM`` without 3 or 9 integers, an unreadable
    ``PRIMITIVE_AXIS``, a ``FORCE_SETS`` for another supercell size, or a truncated ``FORCE_SETS``.
    """
    return _entry_from_files(*_read_entry_files(path))


def _read_list(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"Subset file '{path}' cannot be read ({exc.strerror or exc}); pass a text file with one "
                         "entry id per line.") from None
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def find_entries(root_or_list: str | os.PathLike | Iterable[str | os.PathLike],
                 subset: str | os.PathLike | Iterable[str] | None = None) -> list[Path]:
    """The entry paths to benchmark, sorted by id (nothing is read yet: a bad entry fails alone later).

    ``root_or_list`` is a folder of entries (sub-folders ``<id>/`` and/or archives ``<id>.tar.lzma``; an
    entry present as both is taken once, the folder) or an explicit list of entry paths (kept in the
    given order). ``subset`` (a file with one id per line, ``#`` comments allowed, or a list of ids) keeps
    only those ids; with a folder, an id of the subset that is not there raises
    :class:`~mattersim.errors.InputError`.
    """
    wanted = None
    if subset is not None:
        wanted = _read_list(Path(subset)) if isinstance(subset, (str, os.PathLike)) else [str(s) for s in subset]
    if isinstance(root_or_list, (str, os.PathLike)):
        root = Path(root_or_list).expanduser()
        if not root.is_dir():
            raise InputError(f"PhononDB entries folder '{root}' does not exist; pass the folder holding the <id>/ "
                             "folders or <id>.tar.lzma archives (e.g. ../shared/data/phonondb/entries).")
        found: dict[str, Path] = {}
        for p in sorted(root.iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_dir() or p.name.lower().endswith(ARCHIVE_SUFFIXES):
                eid = entry_id(p)
                if eid not in found or p.is_dir():
                    found[eid] = p
        if wanted is None:
            return [found[k] for k in sorted(found)]
        missing = [w for w in wanted if w not in found]
        if missing:
            raise InputError(f"{len(missing)} entries of the subset are not in '{root}' (first: {missing[0]}); "
                             "check the subset file or the entries folder.")
        return [found[w] for w in wanted]
    paths = [Path(p).expanduser() for p in root_or_list]
    if wanted is not None:
        keep = set(wanted)
        paths = [p for p in paths if entry_id(p) in keep]
    return paths


# ---------------------------------------------------------------------------------------------------------
# reference and NAC parameters
# ---------------------------------------------------------------------------------------------------------


def _dft_born(entry: PhononDBEntry, primitive, symprec: float = SYMPREC):
    """The entry's BORN expanded by phonopy's parser on ``primitive`` (:func:`workflows.nac.read_born`)."""
    from workflows.nac import read_born

    if entry.born_text is None:
        raise InputError(f"PhononDB entry '{entry.source}' has no BORN file; NAC needs eps_inf and Z*, use nac=False.")
    with tempfile.TemporaryDirectory(prefix="phonondb-born-") as tmp:
        path = Path(tmp) / "BORN"
        path.write_text(entry.born_text, encoding="utf-8")
        try:
            born = read_born(path, primitive, symprec=symprec)
        except InputError as exc:
            raise InputError(str(exc).replace(str(path), str(entry.born_path))) from None
    born.source = f"BORN file {entry.born_path}"
    return born


def reference_phonopy(entry: PhononDBEntry, nac: bool = False, *, symprec: float = SYMPREC):
    """The DFT reference: a ``phonopy.Phonopy`` with the force constants of the entry's ``FORCE_SETS``.

    Same steps as ``phonopy.load`` and :func:`workflows.phonon.run_phonon`: compact force constants
    (``produce_force_constants``), then ``symmetrize_force_constants()``. With ``nac=True`` the NAC
    parameters come from the entry's ``BORN`` (phonopy's parser, unit factor of its first line, Gonze-Lee
    method); an entry without ``BORN`` raises :class:`~mattersim.errors.InputError`.
    """
    from phonopy import Phonopy

    if nac and entry.born_text is None:
        raise InputError(f"PhononDB entry '{entry.source}' has no BORN file; NAC needs eps_inf and Z*, use nac=False.")
    ph = Phonopy(to_phonopy_atoms(entry.unitcell), supercell_matrix=entry.supercell_matrix,
                 primitive_matrix=entry.primitive_matrix, symprec=symprec, log_level=0)
    if len(ph.supercell) != entry.force_sets["natom"]:  # pragma: no cover - checked by load_entry
        raise InputError(f"'{entry.force_sets_path}' is for {entry.force_sets['natom']}-atom supercells, not {len(ph.supercell)}.")
    ph.dataset = {"natom": entry.force_sets["natom"],
                  "first_atoms": [{k: (np.array(v) if k != "number" else v) for k, v in d.items()}
                                  for d in entry.force_sets["first_atoms"]]}
    ph.produce_force_constants(calculate_full_force_constants=False, show_drift=False)
    ph.symmetrize_force_constants(show_drift=False)
    if nac:
        ph.nac_params = _dft_born(entry, ph.primitive, symprec).to_phonopy_nac_params(method=NAC_METHOD)
    return ph


def _prediction_nac(entry: PhononDBEntry, calculator, ph_pred, ph_ref, symprec: float) -> tuple[dict, str, dict]:
    """NAC parameters for the predicted force constants: the model's Z*/eps_inf, else the entry's DFT BORN."""
    from workflows import nac as nac_module

    prim_pred = ph_pred.primitive
    if nac_module.find_predictor(calculator) is not None:
        born = nac_module.resolve_born(calculator=calculator, primitive_atoms=prim_pred, symprec=symprec)
        source = "model"
    else:
        dft = _dft_born(entry, ph_ref.primitive, symprec)
        if list(ph_ref.primitive.numbers) != list(ph_pred.primitive.numbers):
            raise RuntimeError("the relaxed primitive cell lists other atoms than the DFT one; cannot carry the DFT "
                               "Born charges over")
        born = nac_module.BornCharges(dft.born, dft.epsilon, source=f"dft-born {entry.born_path}", factor=dft.factor)
        source = "dft-born"
    born_sym, report = nac_module.symmetrize(born, prim_pred, symprec)
    return born_sym.to_phonopy_nac_params(method=NAC_METHOD), source, report


# ---------------------------------------------------------------------------------------------------------
# one entry
# ---------------------------------------------------------------------------------------------------------


def _record(props: dict) -> dict:
    """The compact per-entry record of :func:`workflows.phonon.phonon_properties`' output."""
    imag = props["imaginary_modes"]
    thermal = props["thermal_300K"]
    return {
        "omega_max_THz": props["frequencies"]["omega_max_THz"],
        "group_velocity_m_per_s": props["group_velocity"]["mean_m_per_s"],
        "group_velocity_max_m_per_s": props["group_velocity"].get("max_m_per_s"),
        "free_energy_change_300_900_meV_per_atom": props["free_energy_change"]["delta_meV_per_atom"],
        "free_energy_kJ_per_mol": thermal["free_energy_kJ_per_mol"],
        "entropy_J_per_K_per_mol": thermal["entropy_J_per_K_per_mol"],
        "heat_capacity_J_per_K_per_mol": thermal["heat_capacity_J_per_K_per_mol"],
        "acoustic_group_velocity_m_per_s": props["group_velocity"]["acoustic_mean_m_per_s"],
        "imaginary_modes": int(imag["count"]),
        "most_negative_THz": imag["most_negative_THz"],
        "most_negative_at": imag["most_negative_at"],
        "lowest_THz": props["frequencies"]["lowest_THz"],
        "gamma_THz": props["frequencies"]["gamma_THz"],
        "mesh": props["mesh"]["numbers"],
    }


def _reference_key(entry: "PhononDBEntry", settings: dict) -> str:
    """What the reference properties depend on: the entry's input files, the mesh, symprec, the NAC method
    and phonopy's version (not the model)."""
    import phonopy

    doc = {"schema": REFERENCE_SCHEMA, "input_sha256": entry.input_sha256, "phonopy": phonopy.__version__,
           **{k: settings.get(k) for k in ("mesh_length_A", "mesh", "symprec", "nac_method", "temperature_K")}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _load_reference(folder: Path | None, entry: "PhononDBEntry", settings: dict) -> dict | None:
    """The reference properties another model's run stored for this entry and these settings, or None."""
    if folder is None or not entry.input_sha256:
        return None
    old = load_json(folder / f"{_safe(entry.id)}.json")
    return old if old is not None and old.get("key") == _reference_key(entry, settings) else None


def _save_reference(folder: Path | None, entry: "PhononDBEntry", settings: dict, reference: dict, mesh: list) -> None:
    if folder is not None and entry.input_sha256:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / f"{_safe(entry.id)}.json", {"key": _reference_key(entry, settings), "id": entry.id,
                                                              "reference": reference, "mesh": mesh})


def _reference_properties(entry: PhononDBEntry, ref, settings: dict, cache: Path | None) -> tuple[dict, list, bool]:
    """The DFT reference's properties of ``entry`` (``ref``: its :func:`reference_phonopy` without NAC), without
    and with NAC (the entry's BORN), on the settings' mesh: ``(reference, mesh numbers, taken from the cache)``.
    Computed once per entry and settings and kept in the folder ``cache`` (None: not kept)."""
    cached = _load_reference(cache, entry, settings)
    if cached is not None:
        return cached["reference"], cached["mesh"], True
    mesh = _mesh(settings)
    ref_props = phonon_properties(ref, mesh)
    reference, ref_mesh = {"no_nac": _record(ref_props), "nac": None}, [int(n) for n in ref_props["mesh"]["numbers"]]
    if entry.has_born:
        ref.nac_params = _dft_born(entry, ref.primitive, settings["symprec"]).to_phonopy_nac_params(method=NAC_METHOD)
        reference["nac"] = _record(phonon_properties(ref, mesh))
    _save_reference(cache, entry, settings, reference, ref_mesh)
    return reference, ref_mesh, False


def _reference_settings(mesh_length: float | None, mesh_numbers) -> dict:
    """The settings the reference's properties depend on (a run's settings hold these and more)."""
    return {"mesh_length_A": mesh_length, "mesh": mesh_numbers, "nac_method": NAC_METHOD, "symprec": SYMPREC,
            "temperature_K": 300.0}


def stable_reference_ids(entries: Sequence[str | os.PathLike | PhononDBEntry], output_dir: str | os.PathLike, *,
                         mesh: float | Sequence[int] = DEFAULT_MESH_LENGTH, progress: bool = True) -> list[str]:
    """The ids of the ``entries`` (in their order) whose DFT phonons, without NAC, have no imaginary mode: the
    only ones whose free-energy change the metrics count, so the only ones worth the QHA variant's 7 phonon
    runs per entry (``--stable-reference-ids FILE``, then ``--qha --subset FILE``). The reference's
    properties are computed as :func:`run_phonondb` computes them and kept in ``output_dir/reference/``,
    where a run into the same ``output_dir`` takes them. No model is involved."""
    from mattersim.io import progress_bar

    parsed = parse_mesh(mesh, "mesh")
    settings = _reference_settings(*((parsed, None) if isinstance(parsed, float) else (None, parsed)))
    cache = Path(output_dir) / "reference"
    stable = []
    items = list(entries)
    with progress_bar(progress, len(items), "DFT references") as bar:
        for item in items:
            entry = item if isinstance(item, PhononDBEntry) else load_entry(item)
            reference, _, _ = _reference_properties(entry, reference_phonopy(entry, nac=False, symprec=SYMPREC),
                                                    settings, cache)
            if reference["no_nac"]["imaginary_modes"] == 0:
                stable.append(entry.id)
            bar.advance(1)
    return stable


#: the bookkeeping fields of an entry's json (set by the runner); the rest are the entry's results
_BOOKKEEPING = ("schema", "id", "index", "source", "key", "input_sha256", "model", "settings", "date", "status",
                "timings_s", "peak_rss_mib", "worker", "traceback", "harmonic_from")


def _mesh(settings: dict):
    """One mesh definition for all evaluations of an entry (reference and prediction, without and with NAC,
    the QHA's volumes): the length (or the given numbers). For a length phonopy may build a generalized
    regular grid (body-centred and other non-simple cells) whose diagonal it reports as the mesh numbers;
    those numbers fed back as a plain regular mesh would be another grid, so the length itself is passed
    every time."""
    return settings["mesh_length_A"] if settings["mesh"] is None else settings["mesh"]


def _add_qha(entry: PhononDBEntry, calculator, settings: dict, reference: dict, prediction: dict,
             timings: dict) -> None:
    """``prediction["qha"]`` of an entry with the harmonic ``reference`` and ``prediction``: the QHA record,
    the reason it is skipped, or the error of a QHA that failed (the harmonic results are kept)."""
    t = time.perf_counter()
    skip = _qha_skip_reason(reference, prediction)
    if skip is not None:  # it could not be counted: its 7 phonon runs are not spent
        prediction["qha"] = {"skipped": skip}
    else:
        try:
            prediction["qha"] = _qha_record(entry, calculator, settings, _mesh(settings))
        except Exception as exc:  # noqa: BLE001 - a QHA that fails keeps the entry's harmonic results
            prediction["qha"] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    timings["qha"] = time.perf_counter() - t


def _evaluate_entry(item, calculator, settings: dict, files=None, reference_cache: Path | None = None,
                    harmonic: dict | None = None) -> dict:
    """Reference and prediction of one entry (``files``: what :func:`_read_entry_files` read for a path
    ``item``); exceptions propagate to the caller. ``reference_cache``: a folder where the DFT reference's
    properties are kept for the next model (they do not depend on the model). ``harmonic``: for the QHA
    variant, the entry's json from a harmonic run of the same model and settings (``harmonic_from`` of
    :func:`run_phonondb`): its results are taken as they are and only the QHA is computed."""
    from workflows.phonon import run_phonon

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    entry = item if isinstance(item, PhononDBEntry) else _entry_from_files(*files)
    timings["load"] = time.perf_counter() - t0
    if harmonic is not None:
        doc = {k: copy.deepcopy(v) for k, v in harmonic["record"].items() if k not in _BOOKKEEPING}
        _add_qha(entry, calculator, settings, doc["reference"], doc["prediction"], timings)
        timings["total"] = time.perf_counter() - t0
        return {"status": "ok", **doc, "harmonic_from": {"path": harmonic["path"], "key": harmonic["key"],
                                                           "timings_s": harmonic["record"].get("timings_s")},
                "timings_s": timings}

    t = time.perf_counter()
    ref = reference_phonopy(entry, nac=False, symprec=settings["symprec"])
    mesh = _mesh(settings)
    reference, ref_mesh, cached = _reference_properties(entry, ref, settings, reference_cache)
    timings["reference"] = time.perf_counter() - t
    timings["reference_cached"] = float(cached)

    t = time.perf_counter()
    at_dft_volume = settings["relax_mode"] == AT_DFT_VOLUME
    result = run_phonon(entry.unitcell, calculator, relax=True, fmax=settings["fmax_eV_per_A"],
                        relax_mode="fixed_cell" if at_dft_volume else "full",
                        relax_steps=settings["relax_steps"], supercell=entry.supercell_matrix,
                        primitive=entry.primitive_matrix, displacement=settings["displacement_A"], nac=False,
                        mesh=mesh, group_velocities=True, tmax=300.0, tstep=300.0, symprec=settings["symprec"],
                        output_dir=None, progress=False)
    timings["prediction"] = time.perf_counter() - t
    inner = result.summary.get("timings_s") or {}
    timings["relaxation"] = float(inner.get("relaxation", 0.0))
    timings["force_evaluation"] = float(inner.get("force_evaluation", 0.0))
    t = time.perf_counter()
    ph = result.phonopy
    # run_phonon's summary holds phonon_properties(ph, mesh) of these force constants (same function, same mesh)
    prediction = {"no_nac": _record(result.summary), "nac": None}
    nac_info: dict[str, Any] = {"source": "no BORN"}
    if entry.has_born:
        params, source, report = _prediction_nac(entry, calculator, ph, ref, settings["symprec"])
        ph.nac_params = params
        prediction["nac"] = _record(phonon_properties(ph, mesh))
        nac_info = {"source": source, "method": NAC_METHOD, "symmetrization": report}
    else:
        reference["nac"] = dict(reference["no_nac"])
        prediction["nac"] = dict(prediction["no_nac"])
    timings["prediction_nac"] = time.perf_counter() - t
    if settings.get("qha_volumes"):
        _add_qha(entry, calculator, settings, reference, prediction, timings)
    timings["total"] = time.perf_counter() - t0

    relax = result.summary.get("relaxation") or {}
    v0, v1 = relax.get("initial_volume"), relax.get("volume")
    return {
        "status": "ok",
        "formula": entry.unitcell.get_chemical_formula(mode="hill", empirical=False),
        "structure": {
            "n_atoms_unitcell": len(entry.unitcell),
            "n_atoms_primitive": len(ref.primitive),
            "n_atoms_supercell": len(ref.supercell),
            "n_displacements": len(entry.force_sets["first_atoms"]),
            "supercell_matrix": np.asarray(entry.supercell_matrix).tolist(),
            "primitive_matrix": entry.primitive_matrix if isinstance(entry.primitive_matrix, str)
            else np.asarray(entry.primitive_matrix).tolist(),
            "spacegroup_reference": ref.symmetry.get_international_table(),
            "spacegroup_prediction": result.summary["structure"]["spacegroup"],
        },
        "mesh": ref_mesh,
        "mesh_prediction": [int(n) for n in result.summary["mesh"]["numbers"]],
        "mesh_definition": mesh,
        "has_born": entry.has_born,
        "nac": nac_info["source"],
        "nac_details": nac_info,
        "reference": reference,
        "prediction": prediction,
        "relaxation": {
            "converged": relax.get("converged"),
            "steps": relax.get("steps"),
            "fmax_eV_per_A": relax.get("fmax"),
            "initial_volume_A3": v0,
            "volume_A3": v1,
            "volume_change_percent": (100.0 * (v1 - v0) / v0) if v0 and v1 is not None else None,
            "pressure_GPa": relax.get("pressure"),
        },
        "forces": {k: result.summary["forces"][k] for k in ("n_supercells", "residual_force_max_eV_per_A",
                                                             "drift_max_eV_per_A")},
        "timings_s": timings,
    }


#: why an entry's QHA is not computed (or, computed by an earlier version, not counted): the QHA metric
#: counts the entries of the harmonic one (no imaginary mode in the DFT reference, nor in the model's
#: harmonic phonons at its relaxed V0: a crystal unstable at its own equilibrium has no quasi-harmonic G)
QHA_SKIP_REFERENCE = "reference imaginary modes"
QHA_SKIP_PREDICTION = "prediction imaginary modes at V0"


def _qha_skip_reason(reference: dict, prediction: dict) -> str | None:
    """The reason the QHA of an entry cannot be counted, from its harmonic results without NAC (the records
    of :func:`_record`), or None."""
    if reference["no_nac"]["imaginary_modes"] > 0:
        return QHA_SKIP_REFERENCE
    if prediction["no_nac"]["imaginary_modes"] > 0:
        return QHA_SKIP_PREDICTION
    return None


def _qha_record(entry: PhononDBEntry, calculator, settings: dict, mesh) -> dict:
    """The model's quasi-harmonic free-energy change G(900 K) - G(300 K) at P = 0 (meV/atom) of one entry:
    :func:`workflows.qha.run_qha` on the entry's unit cell and supercell (V0 relaxed, positions and cell
    shape relaxed at each volume, the space group kept), with its checks; None where the equilibrium volume
    leaves the sampled volumes before 900 K."""
    from workflows.qha import run_qha

    res = run_qha(entry.unitcell, calculator, volumes=settings["qha_volumes"], tmax=QHA_TMAX, tstep=QHA_TSTEP,
                  supercell=entry.supercell_matrix, mesh=mesh, displacement=settings["displacement_A"],
                  fmax=settings["fmax_eV_per_A"], relax_steps=settings["relax_steps"], symprec=settings["symprec"],
                  output_dir=None, progress=False)
    temps, _, g = res.gibbs()
    at = {t: g[0, i] for i, t in enumerate(temps)}
    g_low, g_high = at.get(QHA_T_LOW, np.nan), at.get(QHA_T_HIGH, np.nan)
    delta = 1000.0 * (g_high - g_low)
    phase = res.phase()
    checks = phase["checks"]
    curves = phase["curves"]
    alpha = None
    if curves["temperatures_K"] and curves["temperatures_K"][-1] >= QHA_T_LOW:
        alpha = res.value_at("thermal_expansion_per_K", QHA_T_LOW)
    return {
        "free_energy_change_300_900_meV_per_atom": float(delta) if np.isfinite(delta) else None,
        "imaginary_volumes": len(checks["imaginary_modes"]),
        "free_energy_monotonic": bool(checks["free_energy_monotonic"]["ok"]),
        "volume_left_range_at_K": phase["pressures"][0]["volume_left_range_at_K"],
        "v0_A3_per_atom": phase["static"]["v0_A3_per_atom"],
        "b0_GPa": phase["static"]["b0_GPa"],
        "thermal_expansion_300K_per_K": alpha,
        "mesh_numbers": phase["mesh_numbers"],
        "warnings": phase["warnings"],
    }


# ---------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _mae(ref: Sequence[float], pred: Sequence[float]) -> float | None:
    ref, pred = np.asarray(ref, dtype=float), np.asarray(pred, dtype=float)
    return float(np.mean(np.abs(pred - ref))) if ref.size else None


def _variant_ok(rec: dict, variant: str) -> bool:
    """Both sides of ``variant`` are free of imaginary modes."""
    return rec["reference"][variant]["imaginary_modes"] == 0 and rec["prediction"][variant]["imaginary_modes"] == 0


def _selection(records: list[dict], variant: str, imaginary: bool) -> list[dict]:
    """Succeeded entries (with BORN for the NAC variant) without (or with) imaginary modes in ``variant``."""
    out = []
    for rec in records:
        if rec.get("status") != "ok" or (variant == "nac" and not rec.get("has_born")):
            continue
        if _variant_ok(rec, variant) != imaginary:
            out.append(rec)
    return out


def _mae_metrics(records: list[dict], variant: str, imaginary: bool) -> tuple[list[dict], dict[str, np.ndarray]]:
    sel = _selection(records, variant, imaginary)
    suffix = "_nac" if variant == "nac" else ""
    label_suffix = " (NAC)" if variant == "nac" else ""
    metrics, parity = [], {}
    for name, key, tag, unit, label in QUANTITIES:
        ref = np.array([_float(r["reference"][variant][key]) for r in sel], dtype=float)
        pred = np.array([_float(r["prediction"][variant][key]) for r in sel], dtype=float)
        finite = np.isfinite(ref) & np.isfinite(pred)  # a non-finite value (stored as null) spoils only itself
        ref, pred = ref[finite], pred[finite]
        metrics.append(metric(f"{name}_mae_{tag}{suffix}", label + label_suffix, unit, _mae(ref, pred)))
        parity[f"{name}{suffix}__ref"] = ref
        parity[f"{name}{suffix}__pred"] = pred
    metrics.append(metric(f"n_counted{suffix}", f"Entries in the MAEs{label_suffix}", None, len(sel), None))
    return metrics, parity


def read_entry_records(model_dir: Path) -> dict[str, dict]:
    """``{entry id: record}`` of a model's results folder (``entries/<id>.json``); unreadable files skipped."""
    records = {path.stem: load_json(path) for path in sorted((Path(model_dir) / "entries").glob("*.json"))}
    return {eid: rec for eid, rec in records.items() if rec is not None}


def common_entry_metrics(records_by_model: dict[str, dict[str, dict]]) -> tuple[dict[str, list[str]], dict[str, list[dict]]]:
    """The MAEs of every model on the entries that **all** models count (succeeded, with BORN for the NAC
    variant, no imaginary mode on either side of the variant), so that models are ranked on the same
    entries: a model that fails or has imaginary modes on hard entries does not look better for it.

    ``records_by_model``: ``{model: {entry id: record}}`` (:func:`read_entry_records`). Returns
    ``({variant: common ids}, {model: metrics})`` with the metric keys of ``metrics.json`` (and
    ``n_counted`` / ``n_counted_nac`` = the size of the common set). Runs of the QHA variant add ``"qha"``:
    the entries every model's QHA metric counts (:func:`_qha_selection`), and its MAE on them."""
    common: dict[str, list[str]] = {}
    for variant in ("no_nac", "nac"):
        sets = [{eid for eid, rec in recs.items() if _selection([rec], variant, imaginary=False)}
                for recs in records_by_model.values()]
        common[variant] = sorted(set.intersection(*sets)) if sets else []
    with_qha = bool(records_by_model) and all(
        any((r.get("prediction") or {}).get("qha") is not None for r in recs.values() if r.get("status") == "ok")
        for recs in records_by_model.values())
    if with_qha:
        sets = [{eid for eid, rec in recs.items() if _qha_selection([rec])[0]} for recs in records_by_model.values()]
        common["qha"] = sorted(set.intersection(*sets))
    out: dict[str, list[dict]] = {}
    for model, recs in records_by_model.items():
        metrics: list[dict] = []
        for variant in ("no_nac", "nac"):
            metrics += _mae_metrics([recs[eid] for eid in common[variant]], variant, imaginary=False)[0]
        if with_qha:
            chosen = [recs[eid] for eid in common["qha"]]
            metrics += _qha_metrics(chosen)[0] if chosen else [
                metric("n_counted_qha", "Entries in the QHA MAE", None, 0, None)]
        out[model] = metrics
    return common, out


def _metrics(records: list[dict], n_entries: int, n_failed: int) -> tuple[list[dict], dict, dict]:
    """(metrics, groups, parity arrays) from the per-entry records."""
    ok = [r for r in records if r.get("status") == "ok"]
    m_plain, p_plain = _mae_metrics(records, "no_nac", imaginary=False)
    m_nac, p_nac = _mae_metrics(records, "nac", imaginary=False)
    counts = [
        metric("n_entries", "Entries", None, n_entries, None),
        metric("n_succeeded", "Succeeded entries", None, len(ok), None),
        metric("n_failed", "Failed entries", None, n_failed, None),
        metric("n_imaginary_reference", "Entries with imaginary modes in the DFT reference", None,
               sum(r["reference"]["no_nac"]["imaginary_modes"] > 0 for r in ok), None),
        metric("n_imaginary_prediction", "Entries with imaginary modes in the prediction", None,
               sum(r["prediction"]["no_nac"]["imaginary_modes"] > 0 for r in ok), None),
        metric("n_with_born", "Succeeded entries with BORN (NAC variant)", None, sum(bool(r.get("has_born")) for r in ok), None),
    ]
    g_plain, _ = _mae_metrics(records, "no_nac", imaginary=True)
    g_nac, _ = _mae_metrics(records, "nac", imaginary=True)
    groups = {"with imaginary modes": g_plain + g_nac}
    m_qha, p_qha, reasons = _qha_metrics(records)
    if m_qha:
        counts += [metric(f"n_qha_left_out_{k.replace(' ', '_')}", f"QHA entries left out: {k}", None, v, None)
                   for k, v in reasons.items()]
    return m_plain + m_nac + m_qha + counts, groups, {**p_plain, **p_nac, **p_qha}


def _qha_selection(records: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Entries of the QHA metric: succeeded, no imaginary mode in the DFT reference nor in the model's
    harmonic phonons at V0 (:func:`_qha_skip_reason`: the same rule whether the QHA was skipped or, by an
    earlier version, computed), the model's QHA with no imaginary mode at any volume and its volume inside the
    sampled range to 900 K; the others counted by reason."""
    ok, reasons = [], {QHA_SKIP_REFERENCE: 0, QHA_SKIP_PREDICTION: 0, "QHA failed": 0,
                       "imaginary modes at a volume": 0, "volume outside the sampled range before 900 K": 0}
    for rec in records:
        qha = (rec.get("prediction") or {}).get("qha") if rec.get("status") == "ok" else None
        if qha is None:
            continue
        skip = _qha_skip_reason(rec["reference"], rec["prediction"])
        if skip is not None:
            reasons[skip] += 1
        elif "error" in qha:
            reasons["QHA failed"] += 1
        elif qha["imaginary_volumes"] > 0:
            reasons["imaginary modes at a volume"] += 1
        elif qha["free_energy_change_300_900_meV_per_atom"] is None:
            reasons["volume outside the sampled range before 900 K"] += 1
        else:
            ok.append(rec)
    return ok, reasons


def _qha_metrics(records: list[dict]) -> tuple[list[dict], dict[str, np.ndarray], dict]:
    """The QHA variant's ΔF(300→900 K) MAE against the DFT's harmonic ΔF at the DFT volume, and the mean
    quasi-harmonic part of the model's change (its QHA minus its harmonic ΔF), when the run has ``--qha``."""
    if not any((r.get("prediction") or {}).get("qha") is not None for r in records if r.get("status") == "ok"):
        return [], {}, {}
    sel, reasons = _qha_selection(records)
    key = "free_energy_change_300_900_meV_per_atom"
    ref = np.array([r["reference"]["no_nac"][key] for r in sel], dtype=float)
    pred = np.array([r["prediction"]["qha"][key] for r in sel], dtype=float)
    harmonic = np.array([r["prediction"]["no_nac"][key] for r in sel], dtype=float)
    metrics = [
        metric("free_energy_change_qha_mae_meV_per_atom", "ΔF(300→900 K) MAE (the model's QHA G at P = 0 against "
               "the DFT's harmonic F at the DFT volume)", "meV/atom", _mae(ref, pred)),
        metric("free_energy_change_qha_part_mean_meV_per_atom", "Mean quasi-harmonic part of the model's ΔF (QHA "
               "minus harmonic)", "meV/atom", float(np.mean(pred - harmonic)) if len(sel) else None, None),
        metric("n_counted_qha", "Entries in the QHA MAE", None, len(sel), None),
    ]
    return metrics, {"free_energy_change_qha__ref": ref, "free_energy_change_qha__pred": pred}, reasons


def _write_parity(path: Path, parity: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, **{k: np.asarray(v, dtype=float).ravel() for k, v in parity.items()})


def definitions(settings: dict) -> dict:
    """What the PhononDB numbers mean (``definitions`` of ``metrics.json``, shown by the report), so that they
    can be set beside a published table: displacement, mesh rule, NAC, relaxation and each quantity."""
    fixed = settings.get("relax_mode") == AT_DFT_VOLUME
    what = "positions only, at the DFT cell" if fixed else "positions and cell"
    mesh = (f"phonopy's length-based Γ-centred mesh of {settings['mesh_length_A']:g} Å, the same length passed "
            "for the reference and the prediction (a generalized regular grid for non-simple cells; the numbers "
            "used are in each entry's json)" if settings.get("mesh") is None
            else f"the regular Γ-centred mesh {settings['mesh']} for the reference and the prediction")
    return {
        "reference": "phonopy on PhononDB's DFT (VASP PBEsol) FORCE_SETS at the DFT structure and volume, "
                     "symmetrized compact force constants; BORN for the NAC variant",
        "prediction": f"the model relaxes the DFT unit cell ({what}, fmax {settings['fmax_eV_per_A']:g} "
                      f"eV/Å, at most {settings['relax_steps']} steps), then finite displacements in the entry's "
                      "supercell (DIM) and primitive cell (PRIMITIVE_AXIS)",
        "displacement": f"{settings['displacement_A']:g} Å for the prediction; PhononDB's DFT used 0.01 Å",
        "mesh_rule": mesh,
        "nac": f"{settings['nac_method']} (phonopy); Z*/eps_inf from the model when it predicts them, else the "
               "entry's DFT BORN; the same force constants as without NAC",
        "omega_max": "highest phonon frequency over the mesh and the seekpath band path (THz)",
        "group_velocity": "mean |v| over the mesh (q-point weights, all branches), m/s",
        "group_velocity_max": "maximum |v| over the mesh (all branches), m/s",
        "free_energy_change": "harmonic F(900 K) − F(300 K) per atom (meV/atom), " + (
            "both at the DFT volume (the model's phonons at the DFT cell: the volume mismatch left out)" if fixed else
            "each side at its own volume (DFT for the reference, relaxed for the prediction); run with "
            "--at-dft-volume for both at the DFT volume"),
        **({"free_energy_change_qha": f"the model's G(900 K) - G(300 K) at P = 0 (meV/atom) from its own QHA (volumes "
                                      f"{settings['qha_volumes']} around its relaxed V0, positions and cell shape "
                                      "relaxed at each volume, phonopy's QHA with a Vinet EOS) against the DFT's "
                                      "harmonic F(900 K) - F(300 K) at the DFT volume (PhononDB has one volume): the "
                                      "difference includes the thermal expansion the DFT side leaves out; counted "
                                      "(and computed) where the reference has no imaginary mode, nor the model's "
                                      "harmonic phonons at its relaxed V0; then counted where the model has none at "
                                      "any volume and its volume stays in the sampled range to 900 K"}
           if settings.get("qha_volumes") else {}),
        "thermal": f"harmonic F (kJ/mol), S and Cv (J/K/mol) at {settings['temperature_K']:g} K per mole of "
                   "primitive cells (the same primitive matrix on both sides)",
        "counted": "succeeded entries without imaginary modes (below -0.01 THz, acoustic Γ modes excepted) in the "
                   "reference and the prediction of the variant; the others in the group 'with imaginary modes'",
        "energy_convention": "not used: phonons depend on force constants only",
    }


# ---------------------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------------------


def _dataset_path(items: Sequence) -> str | None:
    parents = {str((it.source if isinstance(it, PhononDBEntry) else Path(it)).expanduser().resolve().parent)
               for it in items}
    return parents.pop() if len(parents) == 1 else None


def run_phonondb(entries: Sequence[str | os.PathLike | PhononDBEntry], calculator, output_dir: str | os.PathLike, *,
                 mesh: float | Sequence[int] = DEFAULT_MESH_LENGTH, progress: bool = True,
                 benchmark: str = "phonondb", max_entries: int | None = None, fmax: float = FMAX,
                 relax_steps: int = RELAX_STEPS, retry_failed: bool = False,
                 dataset_path: str | os.PathLike | None = None, displacement: float = DISPLACEMENT,
                 at_dft_volume: bool = False, qha: str | None = None,
                 harmonic_from: str | os.PathLike | None = None, runner: TaskRunner | None = None,
                 spec: ModelSpec | None = None) -> dict:
    """Benchmark ``calculator`` on PhononDB ``entries`` and write the results to ``output_dir``.

    ``at_dft_volume``: the model relaxes the positions only, at the DFT cell, so that the phonons and the
    free-energy change are compared at the same volume (give it its own ``output_dir``: its entries are keyed
    apart and would replace the default run's in the same folder).

    ``qha``: a volume grid (``"start:stop:count"`` of V/V0 - 1, e.g. :data:`QHA_VOLUMES`) adds the QHA variant:
    each entry also gets the model's quasi-harmonic G(900 K) - G(300 K) at P = 0 (:func:`_qha_record`),
    scored against the DFT's harmonic ΔF (about 7 phonon calculations per entry; keyed apart like
    ``at_dft_volume``, give it its own ``output_dir``). Not with ``at_dft_volume`` (the QHA relaxes V0).
    ``harmonic_from``: with ``qha``, the ``output_dir`` of a harmonic run of the same model and settings; an
    entry whose json there has the key this run's would have without ``qha`` (same model, settings and
    input files) and succeeded is taken from it, and only its QHA is computed (``harmonic_from`` in the
    entry's json says from where); the others are computed in full.

    ``entries``: entry folders / archives (e.g. from :func:`find_entries`) or :class:`PhononDBEntry`
    objects; ``max_entries`` keeps the first N. ``mesh``: phonopy's length-based mesh density in Å (the
    mesh numbers are chosen on each reference primitive cell and used for both sides) or 3 integers for
    every entry. ``fmax`` / ``relax_steps``: the relaxation of the prediction; ``displacement`` (Å): the
    prediction's finite displacement (PhononDB's 0.01 Å by default, the same as the reference). Returns the ``metrics.json``
    document (see the module docstring for all files). A failing entry is recorded and listed in
    ``failures``; it never stops the run. Rerunning resumes (``retry_failed=True`` evaluates the failed
    entries again).

    ``runner`` (:class:`mattersim.distributed.TaskRunner`): where the entries are evaluated, one task each;
    by default in this process with ``calculator``. On Dask, ``spec`` names the model each worker loads
    (``calculator`` then only gives the model's identity); the entry files are written here as results
    arrive.
    """
    t_start = time.perf_counter()
    items = list(entries)
    if max_entries is not None:
        if int(max_entries) < 0:
            raise InputError(f"max_entries must be >= 0, not {max_entries!r}.")
        items = items[: int(max_entries)]
    parsed = parse_mesh(mesh, "mesh")
    mesh_length, mesh_numbers = (parsed, None) if isinstance(parsed, float) else (None, parsed)
    if not fmax > 0 or int(relax_steps) < 0:
        raise InputError(f"fmax must be > 0 eV/Å and relax_steps >= 0, not {fmax!r} and {relax_steps!r}.")
    if qha is not None:
        from workflows.qha import parse_volume_grid

        if at_dft_volume:
            raise InputError("The QHA variant relaxes each entry's V0 and samples volumes around it; run it without "
                             "at_dft_volume (--at-dft-volume).")
        parse_volume_grid(qha, "qha")  # a bad grid is one clear error before any work
    if harmonic_from is not None:
        if qha is None:
            raise InputError("harmonic_from (--harmonic-from) reuses a harmonic run's entries for the QHA variant; "
                             "pass it with qha (--qha).")
        if not Path(harmonic_from).is_dir():
            raise InputError(f"harmonic_from: '{harmonic_from}' is not a folder; pass the -o of a harmonic run of "
                             "this benchmark (it holds <model>/entries/<id>.json).")

    info = model_info(calculator)
    root, slug, out = model_folder(output_dir, benchmark, info)
    entries_dir = out / "entries"
    entries_dir.mkdir(parents=True, exist_ok=True)
    settings = {  # the entry key hashes them sorted: their order here does not matter
        **_reference_settings(mesh_length, mesh_numbers), "fmax_eV_per_A": float(fmax),
        "relax_steps": int(relax_steps), "relax_mode": AT_DFT_VOLUME if at_dft_volume else "full-symmetric",
        "displacement_A": float(displacement),
    }
    if qha is not None:  # only then a setting: the harmonic runs' entry keys stay as they were
        settings["qha_volumes"] = str(qha)
    model_id = model_identity(info, potential_only=False)  # predicted NAC uses the property model
    harmonic_settings = {k: v for k, v in settings.items() if k != "qha_volumes"}
    harmonic_dir = Path(harmonic_from) / slug / "entries" if harmonic_from is not None else None

    records: list[dict] = []
    failures: list[dict] = []
    fingerprints: list[str] = []
    with RunLog(out / "run.log", logger) as log:
        log.info(f"{benchmark}: {len(items)} entries, model {info.get('name')} (sha256 {str(info.get('sha256'))[:12]}), "
                 f"mesh {mesh_length if mesh_length is not None else mesh_numbers}, relaxation fmax {fmax} eV/Å, "
                 f"at most {relax_steps} steps; output {out}")
        used_names: set[str] = set()
        jobs = []
        for index, item in enumerate(items):
            files, read_error = None, None
            if isinstance(item, PhononDBEntry):
                eid, source, input_sha = item.id, item.source, item.input_sha256
            else:
                try:
                    files = _read_entry_files(item)
                    eid, source, input_sha = files[0], files[1], entry_input_sha256(files[2])
                except Exception as exc:  # unreadable entry: its task fails alone
                    eid, source, read_error = entry_id(item), Path(item), exc
                    input_sha = f"unreadable ({type(exc).__name__})"
            fname = eid if eid not in used_names else f"{eid}_{index}"
            used_names.add(fname)
            key = entry_key(ENTRY_SCHEMA, model_id, settings, input_sha)
            fingerprints.append(f"{eid} {input_sha}")
            harmonic = None
            if harmonic_dir is not None and read_error is None:
                h_key = entry_key(ENTRY_SCHEMA, model_id, harmonic_settings, input_sha)
                h_path = harmonic_dir / f"{_safe(fname)}.json"
                h_rec = load_json(h_path) if h_path.is_file() else None
                if h_rec is not None and h_rec.get("key") == h_key and h_rec.get("status") == "ok":
                    harmonic = {"path": str(h_path), "key": h_key, "record": h_rec}
            jobs.append({"index": index, "id": eid, "path": entries_dir / f"{_safe(fname)}.json", "key": key,
                         "record": {"schema": ENTRY_SCHEMA, "id": eid, "index": index, "source": str(source),
                                    "key": key, "input_sha256": input_sha, "model": model_id, "settings": settings,
                                    "date": utc_now()},
                         "payload": (read_error if read_error is not None else item if files is None else files,
                                     settings, root / "reference", harmonic)})
        records, n_evaluated, n_reused = run_entry_tasks(
            jobs, _entry_task, calculator=calculator, runner=runner, spec=spec, log=log, progress=progress,
            description=f"{benchmark} · {info.get('name')}", describe=_describe, retry_failed=retry_failed)
        for rec in records:
            if rec.get("status") != "ok":
                err = rec.get("error") or {}
                failures.append({"index": rec["index"], "id": rec["id"],
                                 "error": f"{err.get('type', 'Error')}: {str(err.get('message', ''))[:500]}"})

        metrics, groups, parity = _metrics(records, len(items), len(failures))
        dataset = {
            "name": "phonondb",
            "path": str(dataset_path) if dataset_path is not None else _dataset_path(items),
            "sha256": hashlib.sha256("\n".join(sorted(fingerprints)).encode()).hexdigest(),
            "n_items": len(items),
            "reference": "A. Togo, PhononDB (2018-04-17), VASP PBEsol, CC BY 4.0",
        }
        doc = metrics_document(
            benchmark=benchmark, kind="phonon", dataset=dataset, model=info, metrics=metrics, n_items=len(items),
            n_done=sum(r.get("status") == "ok" for r in records), failures=failures,
            wall_time_s=time.perf_counter() - t_start, groups=groups,
            extra={**settings, **compute_times(records), "evaluated_now": n_evaluated, "reused": n_reused,
                   "peak_rss_mib": peak_rss_mib(),
                   "imaginary_threshold_THz": -0.01,
                   "counted": "succeeded entries without imaginary modes in the reference and the prediction of "
                              "the variant; the NAC variant only for entries with BORN",
                   "nac_sources": {s: sum(r.get("nac") == s for r in records if r.get("status") == "ok")
                                   for s in ("model", "dft-born", "no BORN")}},
            definitions=definitions(settings),
        )
        _write_parity(out / "parity.npz", parity)
        atomic_write_json(out / "metrics.json", doc)
        write_benchmark_json(root, benchmark=benchmark, kind="phonon", dataset=dataset, slug=slug)
        summary = ", ".join(f"{m['key']} {m['value']:.4g}" for m in metrics if m["value"] is not None and "mae" in m["key"])
        log.info(f"done: {doc['n_done']} of {len(items)} entries, {len(failures)} failed, {n_evaluated} evaluated now, "
                 f"{n_reused} reused; {summary}")
    return doc


def _entry_task(calculator, payload) -> dict:
    """One PhononDB entry (a task, in this process or on a Dask worker): its evaluation. An entry whose files
    could not be read arrives as that error, and fails here."""
    source, settings, reference_cache, harmonic = payload
    if isinstance(source, Exception):
        raise source
    files = source if isinstance(source, tuple) else None
    item = source if files is None else files[1]
    return _evaluate_entry(item, calculator, settings, files, reference_cache, harmonic)


def _describe(rec: dict) -> str:
    r, p = rec["reference"]["no_nac"], rec["prediction"]["no_nac"]
    return (f"ω_max ref {r['omega_max_THz']:.3f} / pred {p['omega_max_THz']:.3f} THz, imaginary modes "
            f"{r['imaginary_modes']} / {p['imaginary_modes']}, NAC: {rec.get('nac')}; peak RSS "
            f"{rec.get('peak_rss_mib', 0):.0f} MiB")


def _safe(name: str) -> str:
    from mattersim.io import safe_filename

    return safe_filename(name)


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.phonondb --model M --entries DIR [--subset FILE] [--max N] -o OUT``."""
    from mattersim.registry import load_calculator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None,
                        help="model name or checkpoint path (repeatable; required unless --stable-reference-ids)")
    parser.add_argument("--entries", required=True, nargs="+",
                        help="a folder of PhononDB entries (<id>/ or <id>.tar.lzma), or entry paths")
    parser.add_argument("--subset", default=None, help="file with the entry ids to use, one per line")
    parser.add_argument("--max", type=int, default=None, help="only the first N entries")
    parser.add_argument("--mesh", type=float, default=DEFAULT_MESH_LENGTH, help="length-based mesh density in Å")
    parser.add_argument("--fmax", type=float, default=FMAX, help="relaxation force threshold (eV/Å)")
    parser.add_argument("--relax-steps", type=int, default=RELAX_STEPS, help="maximum relaxation steps")
    parser.add_argument("--displacement", type=float, default=DISPLACEMENT,
                        help="finite displacement of the prediction in Å (PhononDB's 0.01 by default)")
    parser.add_argument("--at-dft-volume", action="store_true",
                        help="relax the positions only, at the DFT cell: phonons and ΔF at the DFT volume")
    parser.add_argument("--qha", nargs="?", const=QHA_VOLUMES, default=None, metavar="VOLUMES",
                        help=f"add the QHA variant of ΔF(300→900 K): the model's own QHA at these volumes (default "
                             f"{QHA_VOLUMES}); about 7x the compute; use its own -o")
    parser.add_argument("--harmonic-from", default=None, metavar="DIR",
                        help="with --qha: the -o of a harmonic run of the same model and settings, whose entries "
                             "are reused (only the QHA is computed for them)")
    parser.add_argument("--stable-reference-ids", default=None, metavar="FILE",
                        help="no model: write to FILE the ids of the entries whose DFT phonons have no imaginary "
                             "mode (the only ones the QHA variant can count; pass FILE as --subset of a --qha "
                             "run into the same -o, which reuses the references kept there)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--float64", action="store_true", help="evaluate MatterSim models in double precision")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-o", "--output", required=True)
    add_dask_options(parser)
    args = parser.parse_args(argv)
    if not args.model and args.stable_reference_ids is None:
        parser.error("--model is required (unless --stable-reference-ids FILE)")
    if args.model and args.stable_reference_ids is not None:
        parser.error("--stable-reference-ids lists entries from the DFT data alone: run it without --model, then "
                     "the models with --subset FILE")

    def chosen_entries():
        for p in args.entries:
            if not Path(p).exists():
                raise InputError(f"PhononDB entries '{p}' do not exist; pass a folder of entries (<id>/ folders or "
                                 "<id>.tar.lzma archives) or entry paths.")
        one = Path(args.entries[0])
        folder_of_entries = len(args.entries) == 1 and one.is_dir() and not (one / "FORCE_SETS").exists()
        return find_entries(one if folder_of_entries else args.entries, args.subset)

    if args.stable_reference_ids is not None:
        try:
            entries = chosen_entries()[: args.max]
            stable = stable_reference_ids(entries, args.output, mesh=args.mesh, progress=not args.no_progress)
        except InputError as exc:
            print(f"Error: {exc}", file=sys.stderr)
            return 2
        with atomic_path(args.stable_reference_ids) as tmp:
            Path(tmp).write_text("".join(f"{eid}\n" for eid in stable))
        print(f"{len(stable)} of {len(entries)} entries have DFT phonons without imaginary modes: "
              f"{args.stable_reference_ids}")
        return 0

    def documents():
        entries = chosen_entries()
        dtype = "float64" if args.float64 else "float32"
        with TaskRunner(workers=args.workers, scheduler=args.scheduler) as runner:
            for name in args.model:
                calc = load_calculator(name, device=args.device, dtype=dtype)
                spec = ModelSpec(model=name, device=args.device, dtype=dtype) if runner.distributed else None
                yield run_phonondb(entries, calc, args.output, mesh=args.mesh, progress=not args.no_progress,
                                   max_entries=args.max, fmax=args.fmax, relax_steps=args.relax_steps,
                                   displacement=args.displacement, at_dft_volume=args.at_dft_volume, qha=args.qha,
                                   harmonic_from=args.harmonic_from, runner=runner, spec=spec)

    return print_metrics_main(documents())

if __name__ == "__main__":
    raise SystemExit(main())
