"""Convex hulls under pressure: stable phases, hull distances and transition pressures of a chemical system.

:func:`run_hull` takes candidate structures of a chemical system (several polymorphs per composition and
the elemental phases) and any ASE calculator with stress:

1. every candidate (reduced to its primitive cell) is relaxed at every pressure, cell and positions,
   minimising the enthalpy H = E + PV, all candidates at one pressure together through
   :class:`mattersim.relax.BatchRelaxer`; ``chain="down"`` (default) relaxes at the highest pressure first
   and starts each lower pressure from the structure relaxed at the one above (it converges faster and
   follows the phase), ``"up"`` the reverse, ``"none"`` every pressure from the input. Each pressure's
   relaxations are stored as they finish, so an interrupted run resumes;
2. per pressure: the formation enthalpy per atom relative to the lowest-enthalpy elemental phases, the
   convex hull (pymatgen's ``PhaseDiagram`` on the enthalpies), every phase's distance above the hull
   and the stable set;
3. across pressures: where each phase is stable, and the transition pressures where its signed distance to
   the hull (above the hull: positive; below the hull of the other phases: negative) crosses zero, found on
   the cubic through the grid pressures that uses dH/dP = V (exact for an enthalpy quadratic in P);
4. flags what should not be trusted: relaxations that did not converge, a space group that changed, a volume
   that does not decrease with pressure or jumps away from a smooth equation of state of the phase (a model
   that collapses a phase under pressure).

Units: pressures GPa, energies and enthalpies eV (per atom in the tables), volumes Å^3/atom.

Outputs (``output_dir``): ``hull.json`` (summary header, every relaxed enthalpy, distances, stable sets,
transition pressures, flags), ``hull.csv``, ``relaxed-<P>GPa.extxyz`` per pressure, ``hulls.png`` (the hull
at each pressure), ``distance.png`` (distance above the hull of every phase against pressure),
``stability.png`` (where each phase is stable), ``hull.log`` and the resumable ``relaxed/P-NN.npz``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import ase.units as _ase_units
import numpy as np
from ase import Atoms

from mattersim.calculator import model_info
from mattersim.errors import InputError
from mattersim.io import full_stress, progress_bar
from mattersim.settings import parse_pressures
from workflows.cells import structure_record, unique_labels
from workflows.outputs import ArrayStore, RunFolder, figure, load_summary, run_key, summary_header

__all__ = ["CHAINS", "HullResult", "load_candidates", "parse_system", "prescale", "run_hull", "signed_distances",
           "transition_pressures"]

logger = logging.getLogger("mattersim.hull")

WORKFLOW_VERSION = 1
CHAINS = ("down", "up", "none")
#: eV/Å^3 per GPa (ASE's unit)
GPA_TO_EV_A3 = _ase_units.GPa
UNITS = {"pressure": "GPa", "enthalpy": "eV/atom", "energy": "eV/atom", "volume": "Å^3/atom",
         "distance_above_hull": "eV/atom", "force": "eV/Å"}


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------


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


def _label(path: Path, atoms: Atoms, index: int, count: int) -> str:
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
            out.append((_label(f, a, k, len(frames)), a))
    # two files with one name in different folders: LaH10, LaH10-2
    return list(zip(unique_labels([label for label, _ in out]), [a for _, a in out]))


def _primitive(atoms: Atoms, symprec: float = 1e-3) -> Atoms:
    """The primitive cell (spglib, positions not idealised), or ``atoms`` when spglib finds none smaller."""
    import spglib

    cell = (np.array(atoms.cell[:]), atoms.get_scaled_positions(), atoms.numbers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # spglib 2.5's notice about its error handling
        found = spglib.standardize_cell(cell, to_primitive=True, no_idealize=True, symprec=symprec)
    if found is None or len(found[2]) >= len(atoms):
        return atoms.copy()
    lattice, frac, numbers = found
    return Atoms(numbers=numbers, cell=lattice, scaled_positions=frac, pbc=True)


def _spacegroup(atoms: Atoms, symprec: float = 1e-3) -> str:
    from workflows.elastic import crystal_symmetry

    return crystal_symmetry(atoms, symprec)[0]


# ---------------------------------------------------------------------------------------------------------
# the hull at one pressure, and across pressures
# ---------------------------------------------------------------------------------------------------------


def signed_distances(compositions: Sequence[dict], enthalpies: Sequence[float], volumes: Sequence[float]) -> dict:
    """The hull of phases with ``compositions`` ({element: count} per cell), ``enthalpies`` (eV per cell) and
    ``volumes`` (Å^3 per cell), with pymatgen's ``PhaseDiagram``. Per phase: ``formation`` (eV/atom, relative
    to the lowest elemental phases), ``above_hull`` (eV/atom, >= 0), ``signed`` (the distance above the
    hull, or minus the phase-separation energy of a stable phase: how far below the hull of the others it
    lies), ``slope`` (d signed / dP in eV/atom/GPa from dH/dP = V: the phase's volume minus its competing
    decomposition's, per atom), ``competitor`` (that decomposition: {phase index: fraction of atoms}) and
    ``stable``."""
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition

    entries = [PDEntry(Composition(c), float(h), name=str(i)) for i, (c, h) in enumerate(zip(compositions, enthalpies))]
    try:
        pd = PhaseDiagram(entries)
    except ValueError as exc:
        raise InputError(f"pymatgen cannot build the hull ({exc}); every element needs at least one elemental phase.") from None
    v_atom = [float(v) / Composition(c).num_atoms for c, v in zip(compositions, volumes)]
    stable = {id(e) for e in pd.stable_entries}
    out = {"formation": [], "above_hull": [], "signed": [], "slope": [], "stable": [], "competitor": []}
    for i, e in enumerate(entries):
        if id(e) in stable:
            # below the hull of all the others: pymatgen's phase-separation energy leaves out the polymorphs of the
            # same composition (and is 0 for an element), so the nearest polymorph is compared here; the
            # competitor is whichever of the two lies closer
            decomp, signed = {}, -math.inf  # alone at its composition and an element: stable at every pressure
            if not e.composition.is_element:
                decomp, energy = pd.get_decomp_and_phase_separation_energy(e, stable_only=False)
                signed = float(energy)
            rivals = [x for x in entries if x is not e and x.composition.reduced_formula == e.composition.reduced_formula]
            if rivals:
                best = min(rivals, key=lambda x: x.energy_per_atom)
                gap = float(e.energy_per_atom - best.energy_per_atom)
                if gap > signed:
                    decomp, signed = {best: 1.0}, gap
        else:
            decomp, signed = pd.get_decomp_and_e_above_hull(e, allow_negative=True)
        slope = v_atom[i] - sum(float(amt) * v_atom[int(d.name)] for d, amt in (decomp or {}).items())
        out["formation"].append(float(pd.get_form_energy_per_atom(e)))
        out["above_hull"].append(max(0.0, float(pd.get_e_above_hull(e, allow_negative=True))))
        out["signed"].append(signed)
        out["slope"].append(slope * GPA_TO_EV_A3)
        out["stable"].append(id(e) in stable)
        out["competitor"].append({int(d.name): float(amt) for d, amt in (decomp or {}).items()})
    return out


def transition_pressures(pressures: Sequence[float], signed: np.ndarray, slopes: np.ndarray) -> list[float]:
    """Pressures (GPa) where one phase's signed distance to the hull crosses zero: on each grid interval
    with a sign change, the root of the cubic Hermite interpolant through the values and the slopes
    (d/dP = volume differences), by bisection; linear interpolation where the slopes are missing."""
    p = np.asarray(pressures, dtype=float)
    s = np.asarray(signed, dtype=float)
    d = np.asarray(slopes, dtype=float)
    roots = []
    for i in range(len(p) - 1):
        a, b = s[i], s[i + 1]
        if not (np.isfinite(a) and np.isfinite(b)) or a * b > 0 or (a == 0 and b == 0):
            continue
        if a == 0:
            if i == 0 or roots and abs(roots[-1] - p[i]) < 1e-9:
                continue
            roots.append(float(p[i]))
            continue
        h = p[i + 1] - p[i]

        def f(x, i=i, h=h, a=a, b=b):
            t = (x - p[i]) / h
            if not (np.isfinite(d[i]) and np.isfinite(d[i + 1])):
                return a + (b - a) * t
            h00, h10, h01, h11 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t, -2 * t**3 + 3 * t**2, t**3 - t**2
            return h00 * a + h10 * h * d[i] + h01 * b + h11 * h * d[i + 1]

        lo, hi = p[i], p[i + 1]
        if b == 0:
            roots.append(float(hi))
            continue
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            if f(lo) * f(mid) <= 0:
                hi = mid
            else:
                lo = mid
        roots.append(float(0.5 * (lo + hi)))
    return roots


def _volume_flags(pressures, volumes) -> list[int]:
    """Indices of pressures whose volume (per atom) does not follow from the one below like a solid's: the
    volume grew with pressure (beyond 0.5 %), or the step's effective bulk modulus -V dP/dV fell below half
    of the previous step's (a solid stiffens under pressure; a sudden softening is a collapse or a jump to
    another structure)."""
    p = np.asarray(pressures, dtype=float)
    v = np.asarray(volumes, dtype=float)
    flagged: set[int] = set()
    b_prev = None
    for j in range(len(v) - 1):
        if not (np.isfinite(v[j]) and np.isfinite(v[j + 1])):
            b_prev = None
            continue
        if v[j + 1] > v[j] * 1.005:
            flagged.add(j + 1)
            b_prev = None
            continue
        dv = v[j] - v[j + 1]
        b = (p[j + 1] - p[j]) * 0.5 * (v[j] + v[j + 1]) / dv if dv > 0 else math.inf
        if b_prev is not None and b < 0.5 * b_prev:
            flagged.add(j + 1)
        b_prev = b
    return sorted(flagged)


def prescale(structures: Sequence[Atoms], calculator, pressure: float, *, max_evaluations: int = 6,
             tolerance: float = 0.1) -> tuple[list[Atoms], int]:
    """The structures scaled isotropically (positions with the cell) towards the volume where their pressure,
    -trace(stress)/3, is ``pressure`` GPa (within ``tolerance`` x max(pressure, 10 GPa)): a secant search on
    ln V against P, all structures in one batched evaluation per iteration. A relaxation that starts there
    needs far fewer steps than one that compresses a cell two- or threefold through the cell filter. Each
    structure ends at the evaluated volume whose pressure came closest; a response that is not a solid's
    (pressure rising with volume, or not finite) stops its search there. Returns (structures, evaluations)."""
    from mattersim.calculator import evaluate_batch

    work = [a.copy() for a in structures]
    for a in work:
        a.calc = None
    scale = np.zeros(len(work))  # ln(V / V_start) of the current cell
    history: list[list[tuple[float, float]]] = [[] for _ in work]
    active = list(range(len(work)))
    n_eval = 0
    tol = tolerance * max(abs(pressure), 10.0)
    while active and n_eval < max_evaluations:
        results = evaluate_batch(calculator, [work[i] for i in active], ("energy", "forces", "stress"))
        n_eval += 1
        still = []
        for i, r in zip(active, results):
            p = -float(np.trace(full_stress(r.get("stress")))) / 3.0 / GPA_TO_EV_A3
            if not np.isfinite(p):
                continue
            history[i].append((scale[i], p))
            if abs(p - pressure) <= tol:
                continue
            if len(history[i]) >= 2:
                (x0, p0), (x1, p1) = history[i][-2], history[i][-1]
                if (p1 - p0) * (x1 - x0) >= 0:  # pressure not falling as the volume grows: stop
                    continue
                target = x1 + (pressure - p1) * (x1 - x0) / (p1 - p0)
            else:  # a first guess with a bulk modulus of max(|P|, 50 GPa)
                target = scale[i] - (pressure - p) / max(abs(p), abs(pressure), 50.0)
            target = float(np.clip(target, scale[i] - 0.5, scale[i] + 0.5))  # at most a factor 1.65 in volume
            work[i].set_cell(np.array(work[i].cell[:]) * math.exp((target - scale[i]) / 3.0), scale_atoms=True)
            scale[i] = target
            still.append(i)
        active = still
    for i, a in enumerate(work):  # back to the closest evaluated volume (the start if none was evaluated)
        best = min(history[i], key=lambda xp: abs(xp[1] - pressure))[0] if history[i] else 0.0
        if best != scale[i]:
            a.set_cell(np.array(a.cell[:]) * math.exp((best - scale[i]) / 3.0), scale_atoms=True)
    return work, n_eval


# ---------------------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------------------


@dataclass
class HullResult:
    """A finished :func:`run_hull`: ``summary`` (the content of ``hull.json``) and ``output_dir``."""

    summary: dict
    output_dir: Path | None = None

    @property
    def pressures(self) -> list[float]:
        return list(self.summary["pressures_GPa"])

    @property
    def labels(self) -> list[str]:
        return [p["label"] for p in self.summary["phases"]]

    def stable(self, pressure: float) -> list[str]:
        """The stable phases at a grid pressure (GPa)."""
        i = self._index(pressure)
        return [p["label"] for p in self.summary["phases"] if p["stable"][i]]

    def distance(self, label: str) -> np.ndarray:
        """Distance above the hull (eV/atom) of phase ``label`` at every grid pressure."""
        for p in self.summary["phases"]:
            if p["label"] == label:
                return np.array(p["above_hull_eV_per_atom"], dtype=float)
        raise InputError(f"No phase {label!r}; phases: {', '.join(self.labels)}.")

    def _index(self, pressure: float) -> int:
        for i, p in enumerate(self.pressures):
            if abs(p - float(pressure)) < 1e-9:
                return i
        raise InputError(f"{pressure} GPa is not one of the pressures of this run ({self.pressures}).")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``hull.json`` and ``hull.csv`` to ``directory``."""
        with RunFolder(directory, "hull", logger) as folder:
            self._write(folder)
        self.output_dir = Path(directory)
        return self.output_dir

    def _write(self, folder: RunFolder) -> None:
        folder.write_with("hull.csv", lambda p: Path(p).write_text(self.csv(), encoding="utf-8"))
        folder.record(self.summary.get("files", []))
        folder.file("hull.json")
        self.summary["files"] = folder.files
        folder.write_json("hull.json", self.summary)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HullResult":
        directory = Path(directory)
        return cls(summary=load_summary(directory, "hull.json", [], "run_hull / 'mattersim hull'"), output_dir=directory)

    def csv(self) -> str:
        """One row per phase and pressure: label, formula, pressure, enthalpy, formation enthalpy, distance
        above the hull, volume, stable, converged, space group, flags."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["phase", "formula", "pressure_GPa", "enthalpy_eV_per_atom", "formation_enthalpy_eV_per_atom",
                    "above_hull_eV_per_atom", "volume_A3_per_atom", "stable", "converged", "spacegroup", "flags"])
        for ph in self.summary["phases"]:
            for i, pr in enumerate(self.pressures):
                w.writerow([ph["label"], ph["formula"], pr, ph["enthalpy_eV_per_atom"][i], ph["formation_eV_per_atom"][i],
                            ph["above_hull_eV_per_atom"][i], ph["volume_A3_per_atom"][i], ph["stable"][i],
                            ph["converged"][i], ph["spacegroup"][i], "; ".join(ph["flags"][i])])
        return buf.getvalue()

    def rows(self) -> list[tuple[str, str]]:
        """(quantity, value) lines that ``mattersim hull`` prints: the stable phases per pressure, the
        transition pressures and the flags."""
        rows = []
        for i, pr in enumerate(self.pressures):
            rows.append((f"{pr:g} GPa", ", ".join(self.stable(pr))))
        for t in self.summary["transitions"]:
            rows.append((f"{t['phase']} {t['kind']}", f"{t['pressure_GPa']:.0f} GPa"))
        for ph in self.summary["phases"]:
            flagged = [(pr, f) for pr, f in zip(self.pressures, ph["flags"]) if f]
            if flagged:
                rows.append((f"FLAG {ph['label']}", "; ".join(f"{pr:g} GPa: {', '.join(f)}" for pr, f in flagged)))
        if self.output_dir is not None:
            rows.append(("output", str(self.output_dir)))
        return rows


# ---------------------------------------------------------------------------------------------------------
# the workflow
# ---------------------------------------------------------------------------------------------------------


def _pack(atoms_list: Sequence[Atoms]) -> dict[str, np.ndarray]:
    return {"cells": np.array([np.array(a.cell[:]) for a in atoms_list]),
            "positions": np.concatenate([a.positions for a in atoms_list]),
            "counts": np.array([len(a) for a in atoms_list])}


def _unpack(data: dict, templates: Sequence[Atoms]) -> list[Atoms]:
    out, start = [], 0
    for k, t in enumerate(templates):
        a = t.copy()
        a.set_cell(data["cells"][k])
        a.positions = data["positions"][start:start + len(t)]
        start += len(t)
        out.append(a)
    return out


def run_hull(candidates: Sequence[Atoms | tuple[str, Atoms]], calculator, *, system: str | Sequence[str] | None = None,
             pressures: Any = "0", fmax: float = 0.02, steps: int = 500, chain: str = "down",
             optimizer: str = "BFGS", primitive: bool = True, prescale_volume: bool = True, symprec: float = 1e-3,
             output_dir: str | os.PathLike | None = None, progress: bool = True) -> HullResult:
    """The enthalpy convex hull of ``candidates`` (Atoms, or ``(label, Atoms)``) at every pressure (GPa;
    ``"0:200:20"``, a list or one number) with ``calculator``; see the module docstring. ``system``: the
    chemical system (default: the candidates' elements); every element needs an elemental candidate.
    ``fmax`` (eV/Å) and ``steps``: each relaxation's threshold and step limit (``optimizer`` BFGS, FIRE or
    LBFGS, with ASE's ``FrechetCellFilter``). ``chain``: down, up or none. ``primitive``: relax each
    candidate's primitive cell (spglib; the enthalpy per atom is the same, the work smaller).
    ``prescale_volume``: before each pressure's relaxations, scale every starting cell to about the volume of
    that pressure (:func:`prescale`, a few batched stress evaluations), so that the cell filter does not have
    to compress it step by step."""
    from mattersim.relax import BatchRelaxer, _optimizer_class

    items = [(c if isinstance(c, tuple) else (c.info.get("label") or c.get_chemical_formula(mode="hill"), c))
             for c in candidates]
    if not items:
        raise InputError("No candidate structures: give structure files or folders (--structures), e.g. the "
                         "POSCARs of the phases of the system, including its elements.")
    for label, a in items:
        if not isinstance(a, Atoms) or len(a) == 0 or not np.asarray(a.pbc).all() or abs(a.cell.volume) < 1e-6:
            raise InputError(f"Candidate {label!r} is not a 3D-periodic crystal; hull candidates need a cell.")
    elements = parse_system(system) if system is not None else sorted(
        {s for _, a in items for s in a.get_chemical_symbols()})
    outside = sorted({s for _, a in items for s in a.get_chemical_symbols()} - set(elements))
    if outside:
        raise InputError(f"Candidates hold {', '.join(outside)}, outside the system {'-'.join(elements)}; filter them "
                         "(load_candidates does) or widen the system.")
    missing = [el for el in elements if not any(set(a.get_chemical_symbols()) == {el} for _, a in items)]
    if missing:
        raise InputError(f"No elemental phase of {', '.join(missing)} among the candidates; the hull needs every end "
                         f"member of {'-'.join(elements)}: add a structure of {missing[0]} (e.g. its ground state).")
    pressure_list = parse_pressures(pressures, "pressures")
    if chain not in CHAINS:
        raise InputError(f"chain must be one of {', '.join(CHAINS)}, not {chain!r}.")
    if not (isinstance(fmax, (int, float)) and fmax > 0) or int(steps) < 1:
        raise InputError(f"fmax must be positive (eV/Å) and steps at least 1, not {fmax!r} and {steps!r}.")
    _optimizer_class(optimizer)
    props = getattr(calculator, "implemented_properties", None)
    if getattr(calculator, "property_only", False) or (props is not None and "stress" not in props):
        raise InputError(f"The model '{model_info(calculator).get('name')}' predicts no stress; relaxations under "
                         "pressure need stresses. Use a potential with stress (MatterSim, CHGNet, SevenNet).")
    from mattersim.registry import check_trained_elements

    check_trained_elements(calculator, [a for _, a in items], labels=[lab for lab, _ in items], properties=False)
    out = RunFolder.check(output_dir)
    info = model_info(calculator)
    labels = [lab for lab, _ in items]
    inputs = [(_primitive(a, symprec) if primitive else a.copy()) for _, a in items]
    for a in inputs:
        a.calc = None
    input_groups = [_spacegroup(a, symprec) for a in inputs]
    settings = {"system": elements, "pressures_GPa": pressure_list, "fmax_eV_per_A": float(fmax), "steps": int(steps),
                "chain": chain, "optimizer": str(optimizer), "primitive": bool(primitive),
                "prescale_volume": bool(prescale_volume), "symprec": float(symprec),
                "cell_filter": "ASE FrechetCellFilter (hydrostatic pressure)"}
    order = list(range(len(pressure_list)))
    if chain == "down":
        order = order[::-1]
    timings = {"relaxation": 0.0}
    t_start = time.perf_counter()
    with RunFolder(out, "hull", logger) as folder:
        log = folder.log
        log.info(f"run_hull: {'-'.join(elements)}, {len(items)} candidates ({', '.join(labels)}), pressures "
                 f"{pressure_list} GPa, chain {chain}, model {info.get('name')}, output {out}")
        if out is not None:
            (out / "relaxed").mkdir(exist_ok=True)
        results: dict[int, dict] = {}
        previous_key = ""
        previous: list[Atoms] | None = None
        t0 = time.perf_counter()
        with progress_bar(progress, len(order), "hull: pressures") as bar:
            for step, i in enumerate(order):
                pressure = pressure_list[i]
                start = previous if (chain != "none" and previous is not None) else inputs
                key = run_key([structure_record(a) for a in inputs], {**settings, "pressure_GPa": pressure,
                                                                     "chained_from": previous_key if chain != "none" else None}, info)
                store = ArrayStore(None if out is None else out / "relaxed" / f"P-{i:02d}.npz", key)
                if store.load(log):
                    relaxed = _unpack(store.data, inputs)
                    d = store.data
                    log.info(f"{pressure:g} GPa: reusing the stored relaxations")
                else:
                    n_pre = 0
                    if prescale_volume:
                        start, n_pre = prescale(start, calculator, pressure)
                    relaxer = BatchRelaxer(calculator, fmax=fmax, steps=steps, pressure=pressure, mode="full",
                                           optimizer=optimizer)
                    rs = relaxer.relax([(lab, a) for lab, a in zip(labels, start)])
                    relaxed = []
                    for lab, r, template in zip(labels, rs, inputs):
                        a = template.copy()
                        a.set_cell(r.atoms.cell[:])
                        a.positions = r.atoms.positions
                        relaxed.append(a)
                    d = {**_pack(relaxed), "energies": np.array([r.energy for r in rs]),
                         "converged": np.array([r.converged for r in rs]), "steps": np.array([r.steps for r in rs]),
                         "fmax": np.array([r.fmax for r in rs])}
                    store.data = d
                    store.save()
                    n_bad = int((~d["converged"]).sum())
                    log.info(f"{pressure:g} GPa: relaxed {len(rs)} candidates in {n_pre} + {relaxer.n_batch_calls} batched calls "
                             "(volume prescaling + relaxation), "
                             f"{int(d['steps'].sum())} steps in all" + (f", {n_bad} NOT converged" if n_bad else ""))
                results[i] = {"atoms": relaxed, "energies": np.asarray(d["energies"], dtype=float),
                              "converged": np.asarray(d["converged"], dtype=bool), "steps": np.asarray(d["steps"])}
                previous, previous_key = relaxed, key
                bar.advance(1)
        timings["relaxation"] = time.perf_counter() - t0

        # hulls per pressure
        compositions = [dict(zip(*np.unique(a.get_chemical_symbols(), return_counts=True))) for a in inputs]
        compositions = [{str(k): int(v) for k, v in c.items()} for c in compositions]
        n_atoms = np.array([len(a) for a in inputs], dtype=float)
        per_p = []
        for i, pressure in enumerate(pressure_list):
            r = results[i]
            volumes = np.array([a.get_volume() for a in r["atoms"]])
            enthalpy = r["energies"] + pressure * GPA_TO_EV_A3 * volumes
            hull = signed_distances(compositions, enthalpy, volumes)
            per_p.append({"enthalpy": enthalpy / n_atoms, "volume": volumes / n_atoms, **hull,
                          "spacegroup": [_spacegroup(a, symprec) for a in r["atoms"]]})
            log.info(f"{pressure:g} GPa: stable {', '.join(lab for lab, s in zip(labels, hull['stable']) if s)}")

        phases, transitions = [], []
        for k, lab in enumerate(labels):
            sgs = [pp["spacegroup"][k] for pp in per_p]
            vols = [float(pp["volume"][k]) for pp in per_p]
            flags: list[list[str]] = [[] for _ in pressure_list]
            for i in range(len(pressure_list)):
                if not results[i]["converged"][k]:
                    flags[i].append("relaxation not converged")
                if sgs[i] != input_groups[k]:
                    flags[i].append(f"space group {input_groups[k]} -> {sgs[i]}")
            for i in _volume_flags(pressure_list, vols):
                flags[i].append("volume jump (grows with pressure, or a sudden softening: collapse or another structure)")
            signed = np.array([pp["signed"][k] for pp in per_p])
            roots = _phase_transitions(k, pressure_list, per_p)
            for root, kind in roots:
                transitions.append({"phase": lab, "kind": kind, "pressure_GPa": root})
            roots = [r for r, _ in roots]
            phases.append({
                "label": lab, "formula": inputs[k].get_chemical_formula(mode="hill", empirical=True),
                "composition": compositions[k], "n_atoms": int(n_atoms[k]), "input_spacegroup": input_groups[k],
                "enthalpy_eV_per_atom": [float(pp["enthalpy"][k]) for pp in per_p],
                "formation_eV_per_atom": [float(pp["formation"][k]) for pp in per_p],
                "above_hull_eV_per_atom": [float(pp["above_hull"][k]) for pp in per_p],
                "signed_distance_eV_per_atom": signed.tolist(), "volume_A3_per_atom": vols,
                "stable": [bool(pp["stable"][k]) for pp in per_p], "spacegroup": sgs,
                "converged": [bool(results[i]["converged"][k]) for i in range(len(pressure_list))],
                "steps": [int(results[i]["steps"][k]) for i in range(len(pressure_list))], "flags": flags,
                "stable_ranges_GPa": _ranges(pressure_list, [bool(pp["stable"][k]) for pp in per_p], roots),
            })
        transitions.sort(key=lambda t: (t["pressure_GPa"], t["phase"]))
        for ph in phases:
            for pr, f in zip(pressure_list, ph["flags"]):
                if f:
                    log.warning(f"{ph['label']} at {pr:g} GPa: {'; '.join(f)}")
        timings["total"] = time.perf_counter() - t_start
        summary = {**summary_header("hull", WORKFLOW_VERSION, info, settings, UNITS, timings),
                   "system": elements, "pressures_GPa": pressure_list, "phases": phases,
                   "stable_sets": {f"{p:g}": [lab for lab, ph in zip(labels, phases) if ph["stable"][i]]
                                   for i, p in enumerate(pressure_list)},
                   "transitions": transitions,
                   "meaning": {"enthalpy": "H = E + PV of the relaxed cell (static lattice: no zero-point energy, no "
                                           "vibrational, configurational or anharmonic terms)",
                               "formation": "relative to the lowest-enthalpy elemental phases at the same pressure",
                               "transitions": "where a phase's signed distance to the hull crosses zero, on the cubic "
                                              "through the grid values with dH/dP = V; the grid's resolution decides "
                                              "whether a short stability window is seen at all"}}
        result = HullResult(summary=summary, output_dir=folder.path)
        if folder.path is not None:
            import ase.io

            for i, p in enumerate(pressure_list):
                frames = []
                for lab, a, e in zip(labels, results[i]["atoms"], results[i]["energies"]):
                    f = a.copy()
                    f.info.update({"label": lab, "energy_eV": float(e), "pressure_GPa": p})
                    frames.append(f)
                folder.write_with(f"relaxed-{p:g}GPa.extxyz", lambda path, frames=frames: ase.io.write(path, frames, format="extxyz"))
            folder.record([f"relaxed/P-{i:02d}.npz" for i in range(len(pressure_list))])
            if len(elements) == 2:
                folder.write_with("hulls.png", lambda path: _plot_hulls(path, summary, info))
            folder.write_with("distance.png", lambda path: _plot_distance(path, summary, info))
            folder.write_with("stability.png", lambda path: _plot_stability(path, summary, info))
            result._write(folder)
            log.info(f"done in {timings['total']:.1f} s (relaxations {timings['relaxation']:.1f} s)")
    return result


def _phase_transitions(k: int, pressures: Sequence[float], per_p: list[dict]) -> list[tuple[float, str]]:
    """(pressure, "becomes stable" | "becomes unstable") of phase ``k``. On a grid interval where its signed
    distance changes sign, the competitors found at its two ends (a polymorph, or a decomposition) are each
    followed across the interval with their own enthalpies and volumes (the cubic through values and slopes,
    :func:`transition_pressures`): the phase becomes unstable where the first of them crosses it, stable where
    the last one does. The distance itself is a maximum over competitors, with a kink where the nearest one
    changes; interpolating it directly would put the root in the wrong place."""
    out = []
    for i in range(len(pressures) - 1):
        a, b = per_p[i]["signed"][k], per_p[i + 1]["signed"][k]
        if not (np.isfinite(a) and np.isfinite(b)) or a * b > 0 or (a == 0 and b == 0) or (a == 0 and i > 0):
            continue
        kind = "becomes stable" if a > 0 or (a == 0 and b < 0) else "becomes unstable"
        found = []
        for comp in {tuple(sorted(per_p[j]["competitor"][k].items())) for j in (i, i + 1)}:
            if not comp:
                continue
            vals, slopes = [], []
            for j in (i, i + 1):
                h, v = per_p[j]["enthalpy"], per_p[j]["volume"]
                vals.append(h[k] - sum(x * h[m] for m, x in comp))
                slopes.append((v[k] - sum(x * v[m] for m, x in comp)) * GPA_TO_EV_A3)
            found += transition_pressures(pressures[i:i + 2], np.array(vals), np.array(slopes))
        if not found:  # no competitor crosses on its own: the distance's own sign change
            found = transition_pressures(pressures[i:i + 2], np.array([a, b]),
                                         np.array([per_p[i]["slope"][k], per_p[i + 1]["slope"][k]]))
        if found:
            out.append((max(found) if kind == "becomes stable" else min(found), kind))
    return out


def _ranges(pressures: Sequence[float], stable: Sequence[bool], roots: Sequence[float] = ()) -> list[list[float]]:
    """[from, to] (GPa) of each run of consecutive stable grid points, each end moved out to the transition
    pressure (``roots``) between it and the next grid point, where there is one."""
    grid: list[list[int]] = []
    previous = False
    for i, s in enumerate(stable):
        if s and previous:
            grid[-1][1] = i
        elif s:
            grid.append([i, i])
        previous = s
    out = []
    for lo, hi in grid:
        a, b = float(pressures[lo]), float(pressures[hi])
        below = [r for r in roots if lo > 0 and pressures[lo - 1] < r <= a]
        above = [r for r in roots if hi < len(pressures) - 1 and b <= r < pressures[hi + 1]]
        out.append([min(below) if below else a, max(above) if above else b])
    return out


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------


def _plot_hulls(path, summary, info) -> None:
    el = summary["system"]
    pressures = summary["pressures_GPa"]
    n = len(pressures)
    ncols = min(4, n)
    nrows = int(math.ceil(n / ncols))

    def draw(axes):
        for i, p in enumerate(pressures):
            ax = axes[i // ncols][i % ncols]
            pts = []
            for ph in summary["phases"]:
                c = ph["composition"]
                x = c.get(el[1], 0) / sum(c.values())
                y = 1000 * ph["formation_eV_per_atom"][i]
                pts.append((x, y, ph["stable"][i], ph["label"]))
            stable = sorted((x, y) for x, y, s, _ in pts if s)
            ax.plot([x for x, _ in stable], [y for _, y in stable], "k-", lw=1)
            for x, y, s, lab in pts:
                ax.plot(x, y, "o" if s else "x", color="C0" if s else "C3", ms=4)
                if s:
                    ax.annotate(lab, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
            ax.set_title(f"{p:g} GPa", fontsize=9)
            ax.set_xlabel(f"x({el[1]})", fontsize=8), ax.set_ylabel("ΔH_f (meV/atom)", fontsize=8)
        for j in range(n, nrows * ncols):
            axes[j // ncols][j % ncols].axis("off")

    figure(path, f"{'-'.join(el)} convex hulls, {info.get('name') or 'model'}", draw, shape=(nrows, ncols), squeeze=False,
            figsize=(3.4 * ncols, 3.0 * nrows))


def _plot_distance(path, summary, info) -> None:
    def draw(axes):
        ax = axes[0][0]
        for ph in summary["phases"]:
            d = 1000 * np.array(ph["above_hull_eV_per_atom"])
            flagged = [bool(f) for f in ph["flags"]]
            line = ax.plot(summary["pressures_GPa"], d, "-o", ms=3, label=ph["label"])[0]
            bad = [(p, y) for p, y, f in zip(summary["pressures_GPa"], d, flagged) if f]
            if bad:
                ax.plot([p for p, _ in bad], [y for _, y in bad], "s", mfc="none", color=line.get_color(), ms=8)
        ax.set_xlabel("P (GPa)"), ax.set_ylabel("distance above hull (meV/atom)")
        ax.legend(fontsize=6, ncol=2)

    figure(path, f"Distance above the hull (open squares: flagged), {info.get('name') or 'model'}", draw,
           squeeze=False, figsize=(7.0, 4.5))


def _plot_stability(path, summary, info) -> None:
    def draw(axes):
        ax = axes[0][0]
        labels = [ph["label"] for ph in summary["phases"]]
        for k, ph in enumerate(summary["phases"]):
            for lo, hi in ph["stable_ranges_GPa"]:
                ax.plot([lo, hi], [k, k], "-", lw=6, solid_capstyle="butt" if hi > lo else "round", color="C0")
                if hi == lo:
                    ax.plot([lo], [k], "o", color="C0")
        for t in summary["transitions"]:
            ax.axvline(t["pressure_GPa"], color="0.85", lw=0.8, zorder=0)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("P (GPa)")

    figure(path, f"Stability ranges, {info.get('name') or 'model'}", draw, squeeze=False,
            figsize=(7.0, 0.3 * len(summary["phases"]) + 1.5))
