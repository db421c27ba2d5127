"""Candidate structures of a chemical system, for the convex hull (:mod:`workflows.hull`) and anything else
that screens the phases of a system:

- :func:`load_candidates`: files or folders in any ASE-readable format, filtered to the system, labelled
  from the file names;
- :func:`mp_candidates`: the Materials Project's structures of the system and all its sub-systems, through
  ``mp-api`` with the user's key (``MP_API_KEY``), labelled ``<formula>-<material id>``;
- :func:`random_structures`: symmetric random crystals of one composition (PyXtal), the starting points of
  a random structure search, reproducible from a seed;
- :func:`distinct`: one structure of each group that pymatgen's ``StructureMatcher`` finds equal (volume
  scaled out), to drop duplicates found by a search.

Compositions are ``{element: count}`` per formula unit (:func:`parse_composition` reads ``LaH10``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from ase import Atoms

from mattersim.errors import InputError
from workflows.cells import unique_labels

__all__ = ["MP_ENDPOINT", "distinct", "file_label", "load_candidates", "mp_candidates", "parse_composition", "parse_system",
           "random_structures"]

logger = logging.getLogger("mattersim.candidates")

#: the Materials Project's API (mp-api's default); ``MP_API_ENDPOINT`` or ``endpoint=`` point elsewhere
MP_ENDPOINT = "https://api.materialsproject.org/"


def parse_system(system: str | Sequence[str]) -> list[str]:
    """``"La-H"`` (or ``["La", "H"]``) -> the elements, in the order given (the hull plots put the fraction
    of the last one on the x axis)."""
    from ase.data import atomic_numbers

    parts = [p.strip() for p in (system.replace(",", "-").split("-") if isinstance(system, str) else system)]
    parts = [p for p in parts if p]
    bad = [p for p in parts if p not in atomic_numbers or p == "X"]
    if not parts or bad or len(set(parts)) != len(parts):
        raise InputError(f"Chemical system {system!r} is not understood; write the elements joined by '-', e.g. La-H "
                         f"or Mg-Si-O{' (unknown: ' + ', '.join(bad) + ')' if bad else ''}.")
    return parts


def file_label(path: Path, atoms: Atoms, index: int = 0, count: int = 1) -> str:
    """The label of frame ``index`` of ``count`` in the file ``path``: the file name without its structure
    suffix and a POSCAR_/CONTCAR_ prefix (``POSCAR_LaH10`` -> ``LaH10``, ``B1.vasp`` -> ``B1``), the formula for
    a bare POSCAR, ``-<k>`` after the name for a file of several frames."""
    stem = path.stem if path.suffix.lower() in (".vasp", ".cif", ".xyz", ".extxyz", ".poscar") else path.name
    for prefix in ("POSCAR_", "POSCAR-", "CONTCAR_", "CONTCAR-"):
        if stem.startswith(prefix) and len(stem) > len(prefix):
            stem = stem[len(prefix):]
    if stem in ("POSCAR", "CONTCAR"):
        stem = atoms.get_chemical_formula(mode="hill", empirical=True)
    return stem if count == 1 else f"{stem}-{index + 1}"


def load_candidates(sources: Sequence[str | os.PathLike], system: Sequence[str]) -> list[tuple[str, Atoms]]:
    """``(label, Atoms)`` of every structure in ``sources`` (files in any ASE-readable format, or folders of
    them; every frame of a trajectory) whose elements belong to ``system``; labels from the file names
    (``POSCAR_LaH10`` -> ``LaH10``). A file that cannot be read is an error naming it; structures of other
    systems are skipped (logged)."""
    import ase.io

    files: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"Structure source '{p}' does not exist; give structure files or folders of them.")
    out: list[tuple[str, Atoms]] = []
    allowed = set(system)
    for f in files:
        try:
            frames = ase.io.read(f, index=":")
        except Exception as exc:  # ASE raises many types for unreadable files
            raise InputError(f"'{f}' is not a structure file ASE can read ({type(exc).__name__}: {str(exc)[:120]}); "
                             "remove it from the folder or convert it (POSCAR, CIF, extxyz).") from None
        for k, a in enumerate(frames):
            elements = set(a.get_chemical_symbols())
            if not elements <= allowed:
                logger.info(f"{f}: {a.get_chemical_formula()} is not in the {'-'.join(system)} system; skipped")
                continue
            if len(a) == 0 or not np.asarray(a.pbc).all() or abs(a.cell.volume) < 1e-6:
                raise InputError(f"'{f}' (frame {k + 1}) is not a 3D-periodic crystal; hull candidates need a cell.")
            a = a.copy()
            a.calc = None
            out.append((file_label(f, a, k, len(frames)), a))
    # two files with one name in different folders: LaH10, LaH10-2
    return list(zip(unique_labels([label for label, _ in out]), [a for _, a in out]))



def parse_composition(text: str) -> dict[str, int]:
    """``"LaH10"`` -> ``{"La": 1, "H": 10}`` (a formula unit; ``"La2H20"`` is kept as written)."""
    from ase.formula import Formula

    try:
        counts = Formula(str(text).strip()).count()
    except Exception:
        counts = {}
    from ase.data import atomic_numbers

    if not counts or any(el not in atomic_numbers or el == "X" or n < 1 for el, n in counts.items()):
        raise InputError(f"Composition {text!r} is not a chemical formula; write it like LaH10, MgO or Mg2SiO4.")
    return {str(el): int(n) for el, n in counts.items()}


def _sub_systems(elements: Sequence[str]) -> list[str]:
    """Every non-empty subset of ``elements`` as the Materials Project writes a chemsys (sorted, '-'-joined)."""
    from itertools import combinations

    return ["-".join(sorted(c)) for k in range(1, len(elements) + 1) for c in combinations(elements, k)]


def mp_candidates(system: Sequence[str], *, api_key: str | None = None, endpoint: str | None = None,
                  max_above_hull: float | None = 0.2, max_atoms: int | None = 60) -> list[tuple[str, Atoms]]:
    """``(label, Atoms)`` of the Materials Project's structures of ``system`` and all its sub-systems (the
    elements included), through ``mp-api``: labels ``<formula>-<material id>`` (``LaH3-mp-24153``).
    ``api_key``: default ``MP_API_KEY``; ``endpoint``: default ``MP_API_ENDPOINT`` or :data:`MP_ENDPOINT`.
    ``max_above_hull`` (eV/atom, MP's own 0 GPa hull; None: all) and ``max_atoms`` per cell (None: all) keep
    the list to what a hull under pressure can afford; a high-pressure phase may sit well above MP's 0 GPa
    hull, so widen ``max_above_hull`` when looking for one."""
    key = api_key or os.environ.get("MP_API_KEY")
    if not key:
        raise InputError("The Materials Project needs your API key: set MP_API_KEY (get one at "
                         "https://next-gen.materialsproject.org/api) or give structure files instead.")
    try:
        from mp_api.client import MPRester
    except ImportError:
        raise InputError("Structures from the Materials Project need the mp-api package: pip install mp-api "
                         "(or give structure files).") from None
    from pymatgen.io.ase import AseAtomsAdaptor

    url = endpoint or os.environ.get("MP_API_ENDPOINT") or MP_ENDPOINT
    url = url if url.endswith("/") else url + "/"
    query = {"chemsys": _sub_systems(system),
             "fields": ["material_id", "formula_pretty", "structure", "energy_above_hull"]}
    if max_above_hull is not None:
        query["energy_above_hull"] = (0.0, float(max_above_hull))
    try:
        with MPRester(key, endpoint=url, mute_progress_bars=True, use_document_model=False) as mpr:
            docs = mpr.materials.summary.search(**query)
    except Exception as exc:  # mp-api raises requests' and its own errors
        raise InputError(f"The Materials Project at {url} did not answer the query for {'-'.join(system)} "
                         f"({type(exc).__name__}: {str(exc)[:200]}); check MP_API_KEY and the network, or give "
                         "structure files.") from None
    out, skipped = [], 0
    from pymatgen.core import Structure

    for d in sorted(docs, key=lambda d: (str(d.get("formula_pretty")), str(d.get("material_id")))):
        s = d.get("structure")
        s = Structure.from_dict(s) if isinstance(s, dict) else s
        if s is None:
            continue
        if max_atoms is not None and len(s) > max_atoms:
            skipped += 1
            continue
        a = AseAtomsAdaptor.get_atoms(s)
        a.calc = None
        for k in list(a.arrays):  # MP's site properties (magmoms...) are not inputs of the hull
            if k not in ("numbers", "positions"):
                del a.arrays[k]
        a.info = {"material_id": str(d.get("material_id")), "energy_above_hull_mp": d.get("energy_above_hull")}
        out.append((f"{d.get('formula_pretty') or a.get_chemical_formula(mode='hill', empirical=True)}-{d.get('material_id')}", a))
    logger.info(f"Materials Project: {len(out)} structures of {'-'.join(system)}"
                + (f" ({skipped} with more than {max_atoms} atoms left out)" if skipped else ""))
    return out


def random_structures(composition: dict[str, int], count: int, *, seed: int = 0, max_atoms: int = 16,
                      attempts: int = 20) -> list[Atoms]:
    """``count`` symmetric random crystals of ``composition`` (a formula unit) from PyXtal: each with a random
    number of formula units (total at most ``max_atoms``) and a random space group among those PyXtal can
    fill with that many atoms, at PyXtal's default density (ambient covalent volumes; scale them before a
    relaxation under pressure), no two atoms closer than :data:`MIN_DISTANCE_FRACTION` of the sum of their
    covalent radii (PyXtal's own limit lets H atoms come to 0.35 Å). The same ``seed`` gives the same
    structures."""
    try:
        from pyxtal import pyxtal
    except ImportError:
        raise InputError("A random structure search needs the PyXtal package: pip install pyxtal.") from None
    per_fu = sum(composition.values())
    if per_fu > max_atoms:
        raise InputError(f"One formula unit of {_formula(composition)} has {per_fu} atoms, more than max_atoms "
                         f"{max_atoms}; raise the limit.")
    rng = np.random.default_rng(seed)
    species = list(composition)
    out = []
    while len(out) < count:
        for _ in range(attempts):
            z = int(rng.integers(1, max_atoms // per_fu + 1))
            group = int(rng.integers(1, 231))
            crystal = pyxtal()
            try:
                with _quiet():
                    crystal.from_random(3, group, species, [composition[s] * z for s in species],
                                        random_state=int(rng.integers(2 ** 31)))
            except Exception:  # the group cannot hold these multiplicities, or PyXtal gave up: draw again
                continue
            if getattr(crystal, "valid", True):
                a = crystal.to_ase()
                if _too_close(a):
                    continue
                a.calc = None
                a.info = {"spacegroup_generated": group, "formula_units": z}
                out.append(a)
                break
        else:
            raise InputError(f"PyXtal found no random crystal of {_formula(composition)} in {attempts} tries; raise "
                             "max_atoms or check the composition.")
    return out


#: no two atoms of a random crystal closer than this fraction of the sum of their covalent radii
MIN_DISTANCE_FRACTION = 0.75


def _too_close(atoms: Atoms) -> bool:
    from ase.data import covalent_radii

    if len(atoms) < 2:
        d = np.linalg.norm(atoms.cell[:], axis=1).min()
        return bool(d < 2 * MIN_DISTANCE_FRACTION * covalent_radii[atoms.numbers[0]])
    r = covalent_radii[atoms.numbers]
    d = atoms.get_all_distances(mic=True) + 1e3 * np.eye(len(atoms))
    return bool((d < MIN_DISTANCE_FRACTION * (r[:, None] + r[None, :])).any())


def _formula(composition: dict[str, int]) -> str:
    return "".join(f"{el}{n if n > 1 else ''}" for el, n in composition.items())


class _quiet:
    """Silence PyXtal's prints and warnings while it draws a crystal."""

    def __enter__(self):
        import contextlib
        import io
        import warnings

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


def distinct(structures: Sequence[Atoms]) -> list[int]:
    """Indices of the first structure of each group that pymatgen's ``StructureMatcher`` (volume scaled out,
    its default tolerances) finds to be the same crystal, in input order."""
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.io.ase import AseAtomsAdaptor

    matcher = StructureMatcher()
    kept: list[int] = []
    pm = [AseAtomsAdaptor.get_structure(a) for a in structures]
    for i, s in enumerate(pm):
        if not any(matcher.fit(pm[j], s) for j in kept):
            kept.append(i)
    return kept
