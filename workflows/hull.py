"""Convex hulls under pressure: stable phases, hull distances and transition pressures of a chemical system.

:func:`run_hull` takes candidate structures of a chemical system (several polymorphs per composition and
the elemental phases; from files, the Materials Project or a random structure search, see
:mod:`workflows.candidates` and ``search``) and any ASE calculator with stress:

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

With ``qha`` and ``temperature``, the phases of the QHA runs enter with their Gibbs free energy G(T, P)
instead of the static enthalpy (a finite-temperature hull; see :func:`run_hull`).

Units: pressures GPa, energies and enthalpies eV (per atom in the tables), volumes Å^3/atom, K.

Outputs (``output_dir``): ``hull.json`` (summary header, every relaxed enthalpy, distances, stable sets,
transition pressures, flags), ``hull.csv``, ``relaxed-<P>GPa.extxyz`` per pressure, ``hulls.png`` (the hull
at each pressure), ``distance.png`` (distance above the hull of every phase against pressure),
``stability.png`` (where each phase is stable), ``hull.log`` and the resumable ``relaxed/P-NN.npz``.
"""

from __future__ import annotations

import contextlib
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
from workflows.candidates import load_candidates, parse_system
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
        """One row per phase and pressure: label, formula, pressure, static enthalpy, Gibbs free energy (phases
        with QHA in a finite-temperature hull, else empty), formation enthalpy (or free energy), distance above
        the hull, volume, stable, converged, space group, flags."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["phase", "formula", "pressure_GPa", "enthalpy_eV_per_atom", "gibbs_eV_per_atom",
                    "formation_eV_per_atom", "above_hull_eV_per_atom", "volume_A3_per_atom", "stable", "converged",
                    "spacegroup", "flags"])
        for ph in self.summary["phases"]:
            for i, pr in enumerate(self.pressures):
                g = ph.get("gibbs_eV_per_atom")
                w.writerow([ph["label"], ph["formula"], pr, ph["enthalpy_eV_per_atom"][i], "" if g is None else g[i],
                            ph["formation_eV_per_atom"][i],
                            ph["above_hull_eV_per_atom"][i], ph["volume_A3_per_atom"][i], ph["stable"][i],
                            ph["converged"][i], ph["spacegroup"][i], "; ".join(ph["flags"][i])])
        return buf.getvalue()

    def rows(self) -> list[tuple[str, str]]:
        """(quantity, value) lines that ``mattersim hull`` prints: the stable phases per pressure, the
        transition pressures and the flags."""
        rows = []
        ft = self.summary.get("finite_temperature")
        if ft:
            rows.append((f"G at {ft['temperature_K']:g} K", f"{', '.join(ft['phases_with_free_energy'])}; static H: "
                         f"{', '.join(ft['phases_static']) or 'none'}"))
        search = self.summary.get("search")
        if search:
            rows.append(("random search", f"{search['relaxations']} relaxations, kept "
                         + (", ".join(f"{r['label']} ({r['spacegroup']}, {r['found_at_GPa']:g} GPa)" for r in search["found"])
                            or "none")))
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
            "numbers": np.concatenate([a.numbers for a in atoms_list]),
            "counts": np.array([len(a) for a in atoms_list])}


def _unpack(data: dict, templates: Sequence[Atoms] | None = None) -> list[Atoms]:
    """The structures stored by :func:`_pack`; with ``templates``, copies of them (labels, info) with the
    stored cells and positions."""
    out, start = [], 0
    for k, n in enumerate(data["counts"]):
        n = int(n)
        if templates is not None:
            a = templates[k].copy()
            a.set_cell(data["cells"][k])
            a.positions = data["positions"][start:start + n]
        else:
            a = Atoms(numbers=data["numbers"][start:start + n], cell=data["cells"][k],
                      positions=data["positions"][start:start + n], pbc=True)
        start += n
        out.append(a)
    return out


def _results_of(d: dict, inputs: Sequence[Atoms]) -> dict:
    """One pressure's relaxations as the hull reads them, from the stored arrays ``d``."""
    relaxed = _unpack(d, inputs)
    errors = [str(e) for e in d.get("errors", [""] * len(relaxed))]
    errors = [e or ("" if np.isfinite(x) else "non-finite energy") for e, x in zip(errors, d["energies"])]
    return {"atoms": relaxed, "energies": np.asarray(d["energies"], dtype=float),
            "converged": np.asarray(d["converged"], dtype=bool), "steps": np.asarray(d["steps"]), "errors": errors}


def _store_pressure(store: ArrayStore, relaxed: list[Atoms], rows: list[dict]) -> dict:
    store.data = {**_pack(relaxed), "energies": np.array([r["energy"] for r in rows], dtype=float),
                  "converged": np.array([r["converged"] for r in rows], dtype=bool),
                  "steps": np.array([r["steps"] for r in rows]), "fmax": np.array([r["fmax"] for r in rows], dtype=float),
                  "errors": np.array([r["error"] or "" for r in rows])}
    store.save()
    return store.data


def _relax_here(calculator, order, chain, inputs, labels, pressures, stores, relax: dict, log, progress) -> dict[int, dict]:
    """Every pressure in chain ``order`` in this process: all candidates of one pressure together (volume
    prescaling and :class:`mattersim.relax.BatchRelaxer`), each pressure stored as it finishes."""
    from mattersim.relax import BatchRelaxer

    results: dict[int, dict] = {}
    previous: list[Atoms] | None = None
    failed_before = [False] * len(inputs)
    with progress_bar(progress, len(order), "hull: pressures") as bar:
        for i in order:
            pressure = pressures[i]
            start = inputs
            if chain != "none" and previous is not None:  # a failed relaxation does not seed the next pressure
                start = [inputs[k] if failed_before[k] else a for k, a in enumerate(previous)]
            store = stores[i]
            if store.load(log):
                log.info(f"{pressure:g} GPa: reusing the stored relaxations")
            else:
                n_pre = 0
                if relax["prescale"]:
                    start, n_pre = prescale(start, calculator, pressure)
                relaxer = BatchRelaxer(calculator, fmax=relax["fmax"], steps=relax["steps"], pressure=pressure,
                                       mode="full", optimizer=relax["optimizer"])
                rs = relaxer.relax([(lab, a) for lab, a in zip(labels, start)])
                rows = [{"energy": r.energy, "converged": r.converged, "steps": r.steps, "fmax": r.fmax,
                         "error": r.error} for r in rs]
                d = _store_pressure(store, [_placed(t, r.atoms.cell[:], r.atoms.positions) for t, r in zip(inputs, rs)],
                                    rows)
                n_bad = int((~d["converged"]).sum())
                log.info(f"{pressure:g} GPa: relaxed {len(rs)} candidates in {n_pre} + {relaxer.n_batch_calls} batched "
                         f"calls (volume prescaling + relaxation), {int(d['steps'].sum())} steps in all"
                         + (f", {n_bad} NOT converged" if n_bad else ""))
            results[i] = _results_of(store.data, inputs)
            failed_before = [bool(e) for e in results[i]["errors"]]
            previous = results[i]["atoms"]
            bar.advance(1)
    return results


def _placed(template: Atoms, cell, positions) -> Atoms:
    a = template.copy()
    a.set_cell(np.asarray(cell))
    a.positions = np.asarray(positions)
    return a


def _relax_task(calculator, payload: dict, *previous) -> dict:
    """One candidate at one pressure (a Dask task): from the structure relaxed at the pressure before it in
    the chain (``previous``: that task's outcome) when it succeeded, else from ``payload["start"]`` (stored
    earlier) or the input; volume prescaling and a relaxation, as :func:`_relax_here` does for a batch."""
    from mattersim.relax import BatchRelaxer

    start = payload["start"] if payload["start"] is not None else payload["input"]
    if previous:
        ok, value, _error, _seconds, _where = previous[0]
        start = _placed(payload["input"], value["cell"], value["positions"]) if ok and not value["error"] else payload["input"]
    if payload["prescale"]:
        (start,), _ = prescale([start], calculator, payload["pressure"])
    (r,) = BatchRelaxer(calculator, fmax=payload["fmax"], steps=payload["steps"], pressure=payload["pressure"],
                        mode="full", optimizer=payload["optimizer"]).relax([(payload["label"], start)])
    return {"cell": np.array(r.atoms.cell[:]), "positions": np.array(r.atoms.positions), "energy": r.energy,
            "enthalpy": r.enthalpy, "converged": r.converged, "steps": r.steps, "fmax": r.fmax, "error": r.error}


def _relax_on_dask(runner, spec, order, chain, inputs, labels, pressures, stores, relax: dict, log,
                   progress) -> dict[int, dict]:
    """The same relaxations as :func:`_relax_here`, one Dask task per candidate and pressure, each chained on
    the same candidate's task at the pressure before it: the candidates' chains run in parallel. A pressure
    is stored (the same store as in this process) as soon as all its candidates are in; stored pressures
    are reused and seed the next ones."""
    results: dict[int, dict] = {}
    futures: dict = {}
    last: list = [None] * len(inputs)  # per candidate: the future, or the stored structure, that seeds the next
    pending: dict[int, list] = {}
    for i in order:
        if stores[i].load(log):
            log.info(f"{pressures[i]:g} GPa: reusing the stored relaxations")
            results[i] = _results_of(stores[i].data, inputs)
            last = [None if err else a for a, err in zip(results[i]["atoms"], results[i]["errors"])]
            continue
        pending[i] = [None] * len(inputs)
        for k in range(len(inputs)):
            seed = last[k] if chain != "none" else None
            payload = {"input": inputs[k], "label": labels[k], "pressure": pressures[i],
                       "start": seed if isinstance(seed, Atoms) else None, **relax}
            deps = [seed] if seed is not None and not isinstance(seed, Atoms) else []
            future = runner.submit(_relax_task, payload, *deps, spec=spec)
            futures[future] = (i, k)
            last[k] = future
    tags = {f: n for n, f in enumerate(futures)}
    where = list(futures.values())
    with progress_bar(progress, len(futures), "hull: relaxations") as bar:
        for r in runner.completed(tags):
            i, k = where[r.index]
            if r.ok:
                pending[i][k] = r.value
            else:  # the task itself failed (its worker died too often, or it raised): a failed relaxation
                err = r.error or {}
                pending[i][k] = {"cell": np.array(inputs[k].cell[:]), "positions": inputs[k].positions.copy(),
                                 "energy": math.nan, "converged": False, "steps": 0, "fmax": math.nan,
                                 "error": f"task failed: {err.get('type')}: {err.get('message')}"}
            if all(x is not None for x in pending[i]):
                rows = pending.pop(i)
                d = _store_pressure(stores[i], [_placed(t, x["cell"], x["positions"]) for t, x in zip(inputs, rows)], rows)
                results[i] = _results_of(d, inputs)
                n_bad = int((~d["converged"]).sum())
                log.info(f"{pressures[i]:g} GPa: relaxed {len(rows)} candidates on Dask, {int(d['steps'].sum())} steps "
                         "in all" + (f", {n_bad} NOT converged" if n_bad else ""))
            bar.advance(1)
    return results


def _search(compositions: list[dict], calculator, pressures: list[float], *, count: int, seed: int, max_atoms: int,
            fmax: float, steps: int, optimizer: str, out: Path | None, info: dict, log, progress: bool,
            runner=None, spec=None) -> tuple[list[tuple[str, Atoms]], dict]:
    """The random structure search: at every pressure, ``count`` PyXtal crystals of every composition,
    scaled towards that pressure and relaxed together (one batched relaxation per pressure, stored in
    ``search/P-NN.npz``; on Dask, with ``runner`` and ``spec``, one task per structure, every pressure at
    once); the lowest enthalpy per composition and pressure is kept, and the distinct ones
    (StructureMatcher) across pressures become candidates ``<formula>-search-<k>``."""
    from mattersim.relax import BatchRelaxer
    from workflows.candidates import distinct, random_structures

    settings = {"count": int(count), "seed": int(seed), "max_atoms": int(max_atoms), "fmax_eV_per_A": float(fmax),
                "steps": int(steps), "optimizer": optimizer, "compositions": compositions}
    best: list[list[tuple[float, float, Atoms]]] = [[] for _ in compositions]  # (P, H/atom, structure)
    n_relaxed = n_converged = 0
    if out is not None:
        (out / "search").mkdir(exist_ok=True)
    stores, todo = [], {}  # todo: pressure index -> (starts, owner)
    for i, pressure in enumerate(pressures):
        store = ArrayStore(None if out is None else out / "search" / f"P-{i:02d}.npz",
                           run_key([], {**settings, "pressure_GPa": pressure}, info))
        stores.append(store)
        if store.load(log):
            log.info(f"search at {pressure:g} GPa: reusing the stored relaxations")
            continue
        starts, owner = [], []
        for c, comp in enumerate(compositions):
            sub_seed = int(np.random.SeedSequence([int(seed), i, c]).generate_state(1)[0])
            starts += random_structures(comp, count, seed=sub_seed, max_atoms=max_atoms)
            owner += [c] * count
        todo[i] = (starts, owner)

    def save(i: int, relaxed: list[Atoms], enthalpy_per_atom: list[float], converged: list[bool]) -> None:
        stores[i].data = {**_pack(relaxed), "owner": np.array(todo[i][1]), "enthalpy": np.array(enthalpy_per_atom),
                          "converged": np.array(converged)}
        stores[i].save()

    if runner is not None and runner.distributed and todo:
        jobs = [(i, k) for i in todo for k in range(len(todo[i][0]))]
        tags = {runner.submit(_relax_task, {"input": todo[i][0][k], "start": None, "label": f"search-{i}-{k}",
                                            "pressure": pressures[i], "prescale": True, "fmax": fmax, "steps": steps,
                                            "optimizer": optimizer}, spec=spec): n for n, (i, k) in enumerate(jobs)}
        got: dict[int, list] = {i: [None] * len(todo[i][0]) for i in todo}
        with progress_bar(progress, len(jobs), "hull: random search") as bar:
            for r in runner.completed(tags):
                i, k = jobs[r.index]
                a0 = todo[i][0][k]
                v = r.value if r.ok else {"cell": a0.cell[:], "positions": a0.positions, "enthalpy": math.nan,
                                          "converged": False}
                got[i][k] = v
                if all(x is not None for x in got[i]):
                    relaxed = [_placed(a, x["cell"], x["positions"]) for a, x in zip(todo[i][0], got[i])]
                    save(i, relaxed, [x["enthalpy"] / len(a) for a, x in zip(relaxed, got[i])],
                         [x["converged"] for x in got[i]])
                bar.advance(1)
    elif todo:
        with progress_bar(progress, len(todo), "hull: random search") as bar:
            for i, (starts, owner) in todo.items():
                starts, _ = prescale(starts, calculator, pressures[i])
                rs = BatchRelaxer(calculator, fmax=fmax, steps=steps, pressure=pressures[i], mode="full",
                                  optimizer=optimizer).relax(starts)
                save(i, [r.atoms for r in rs], [r.enthalpy / len(r.atoms) for r in rs], [r.converged for r in rs])
                bar.advance(1)
    for i, pressure in enumerate(pressures):
        d = stores[i].data
        relaxed = _unpack(d)
        n_relaxed += len(relaxed)
        n_converged += int(d["converged"].sum())
        for c in range(len(compositions)):
            mine = [k for k in range(len(relaxed)) if d["owner"][k] == c and np.isfinite(d["enthalpy"][k])]
            pool = [k for k in mine if d["converged"][k]] or mine  # converged ones first
            if pool:
                k = min(pool, key=lambda k: d["enthalpy"][k])
                best[c].append((pressure, float(d["enthalpy"][k]), relaxed[k]))
    found, records = [], []
    for c, comp in enumerate(compositions):
        structures = [a for _, _, a in best[c]]
        for j, k in enumerate(distinct(structures) if structures else []):
            pressure, h, a = best[c][k]
            label = f"{a.get_chemical_formula(mode='hill', empirical=True)}-search-{j + 1}"
            found.append((label, a))
            records.append({"label": label, "found_at_GPa": pressure, "enthalpy_eV_per_atom": h,
                            "spacegroup": _spacegroup(a)})
    log.info(f"random search: {n_relaxed} relaxations ({n_converged} converged), {len(found)} distinct lowest "
             f"structures kept: {', '.join(r['label'] for r in records)}")
    return found, {**settings, "relaxations": n_relaxed, "converged": n_converged, "found": records}


def _free_energies(qha: Any, temperature: float | None, labels: list[str], inputs: list[Atoms],
                   pressures: list[float], info: dict) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{candidate index: (G eV/atom, dG/dP as Å^3/atom) at every hull pressure} at ``temperature`` from the
    QHA runs in ``qha`` (:class:`workflows.qha.QHARunResult`, a folder written by ``mattersim qha``, or a list
    of them), each phase matched to the candidate with its label. Checked before any relaxation: the model is
    the hull's, the compositions agree, and the QHA's G(T, P) table covers the temperature and every hull
    pressure."""
    from scipy.interpolate import CubicSpline

    from workflows.qha import QHARunResult

    if qha is None:
        if temperature is not None:
            raise InputError("A temperature needs free energies: give QHA runs of the phases with it (--qha DIR, "
                             "folders written by 'mattersim qha'); without them the hull is the static enthalpy one.")
        return {}
    if temperature is None or not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise InputError(f"QHA free energies need a temperature (K, >= 0), not {temperature!r}: give --temperature.")
    runs = qha if isinstance(qha, (list, tuple)) else [qha]
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for run in runs:
        where = "a QHA result"
        if not isinstance(run, QHARunResult):
            where = f"the QHA run in '{run}'"
            run = QHARunResult.load(run)
        elif run.output_dir is not None:
            where = f"the QHA run in '{run.output_dir}'"
        name = (run.summary.get("model") or {}).get("name")
        if name != info.get("name"):
            raise InputError(f"{where} used the model {name!r}, the hull {info.get('name')!r}: free energies and "
                             "enthalpies must come from one model; rerun one of them.")
        for ph in run.summary["phases"]:
            label = ph["label"]
            if label not in labels:
                raise InputError(f"{where} has a phase {label!r} that is not a hull candidate ({', '.join(labels)}); "
                                 "name the QHA phases like the candidates (mattersim qha --labels).")
            k = labels.index(label)
            if k in out:
                raise InputError(f"Two QHA runs give the phase {label!r}; give each phase once.")
            formula = inputs[k].get_chemical_formula(mode="hill", empirical=True)
            qha_formula = (ph.get("structure") or {}).get("formula")
            if qha_formula is not None and Atoms(qha_formula).get_chemical_formula(mode="hill", empirical=True) != formula:
                raise InputError(f"{where}: phase {label!r} is {qha_formula}, the hull candidate {formula}.")
            t, p, g = run.gibbs(label)
            if not (len(t) and t[0] <= temperature <= t[-1]):
                raise InputError(f"{where}: {temperature:g} K is outside its temperatures "
                                 f"({t[0]:g}-{t[-1]:g} K); rerun mattersim qha with a larger --tmax." if len(t) else
                                 f"{where}: phase {label!r} has no G(T, P) table.")
            if not (p[0] <= min(pressures) and max(pressures) <= p[-1]) or len(p) < 2:
                raise InputError(f"{where}: phase {label!r} has G(T, P) at {p.tolist()} GPa, the hull needs "
                                 f"{min(pressures):g}-{max(pressures):g} GPa; rerun mattersim qha with --pressures "
                                 "covering them (and --volumes reaching the volumes of those pressures).")
            g_t = np.array([np.interp(temperature, t, row) if np.isfinite(row).all() else
                            (np.interp(temperature, t[np.isfinite(row)], row[np.isfinite(row)])
                             if np.isfinite(row).sum() >= 2 and t[np.isfinite(row)][-1] >= temperature else np.nan)
                            for row in g])
            lo, hi = np.searchsorted(p, min(pressures), side="right") - 1, np.searchsorted(p, max(pressures))
            if not np.isfinite(g_t[max(lo, 0):hi + 1]).all():
                bad = [f"{x:g}" for x, y in zip(p, g_t) if not np.isfinite(y)]
                raise InputError(f"{where}: phase {label!r} has no free energy at {temperature:g} K and "
                                 f"{', '.join(bad)} GPa (the equilibrium volume leaves its sampled volumes); rerun "
                                 "mattersim qha with --volumes reaching further.")
            ok = np.isfinite(g_t)
            spline = CubicSpline(p[ok], g_t[ok]) if ok.sum() >= 4 else None
            x = np.asarray(pressures, dtype=float)
            if spline is not None:
                g_at, dg = spline(x), spline(x, 1)
            else:
                g_at, dg = np.interp(x, p[ok], g_t[ok]), np.interp(x, p[ok], np.gradient(g_t[ok], p[ok]))
            out[k] = (np.asarray(g_at, dtype=float), np.asarray(dg, dtype=float) / GPA_TO_EV_A3)
    return out


def run_hull(candidates: Sequence[Atoms | tuple[str, Atoms]], calculator, *, system: str | Sequence[str] | None = None,
             pressures: Any = "0", fmax: float = 0.02, steps: int = 500, chain: str = "down",
             optimizer: str = "BFGS", primitive: bool = True, prescale_volume: bool = True, symprec: float = 1e-3,
             search: int = 0, compositions: Sequence[str | dict] | None = None, seed: int = 0,
             search_max_atoms: int = 12, qha: Any = None, temperature: float | None = None,
             output_dir: str | os.PathLike | None = None, progress: bool = True, runner: Any = None,
             spec: Any = None) -> HullResult:
    """The enthalpy convex hull of ``candidates`` (Atoms, or ``(label, Atoms)``) at every pressure (GPa;
    ``"0:200:20"``, a list or one number) with ``calculator``; see the module docstring. ``system``: the
    chemical system (default: the candidates' elements); every element needs an elemental candidate.
    ``fmax`` (eV/Å) and ``steps``: each relaxation's threshold and step limit (``optimizer`` BFGS, FIRE or
    LBFGS, with ASE's ``FrechetCellFilter``). ``chain``: down, up or none. ``primitive``: relax each
    candidate's primitive cell (spglib; the enthalpy per atom is the same, the work smaller).
    ``prescale_volume``: before each pressure's relaxations, scale every starting cell to about the volume of
    that pressure (:func:`prescale`, a few batched stress evaluations), so that the cell filter does not have
    to compress it step by step.

    ``search`` > 0: a random structure search first (:func:`_search`): at every pressure, ``search`` PyXtal
    crystals (at most ``search_max_atoms`` atoms, reproducible from ``seed``) of every composition in
    ``compositions`` (formulas like ``"LaH10"``; default: those of the candidates) are relaxed (with
    max(fmax, 0.05) eV/Å, at most min(steps, 300) steps), and the distinct lowest-enthalpy ones join the
    candidates as ``<formula>-search-<k>``; the search alone is enough when ``compositions`` include the
    elements.

    ``qha`` with ``temperature`` (K): a finite-temperature hull. The phases of the QHA runs (results of
    :func:`workflows.qha.run_qha` or their folders; each phase labelled like its candidate) enter with their
    Gibbs free energy G(T, P) (static energy, zero-point energy and harmonic vibrational free energy at the
    quasi-harmonic volume) instead of the static enthalpy; the other phases keep the static enthalpy, and
    configurational, anharmonic and electronic terms are left out.

    ``runner`` (:class:`mattersim.distributed.TaskRunner` on Dask) with ``spec`` (the model each worker
    loads): the relaxations run there, one task per candidate and pressure, each candidate's chain in
    parallel (``calculator`` still serves the checks and the search, in this process); the same results and
    stores as in this process."""
    from mattersim.relax import _optimizer_class

    items = [(c if isinstance(c, tuple) else (c.info.get("label") or c.get_chemical_formula(mode="hill"), c))
             for c in candidates]
    search = int(search or 0)
    if search < 0:
        raise InputError(f"search must be a number of random structures per composition and pressure (>= 0), not {search}.")
    if not items and not search:
        raise InputError("No candidate structures: give structure files or folders (--structures), the Materials "
                         "Project's (--mp, with MP_API_KEY) or a random search (--search N --compositions ...), the "
                         "elemental phases of the system included.")
    if search and not items and not compositions:
        raise InputError("A random search without candidate structures needs the compositions to search "
                         "(--compositions La,H,LaH10), the elements included.")
    for label, a in items:
        if not isinstance(a, Atoms) or len(a) == 0 or not np.asarray(a.pbc).all() or abs(a.cell.volume) < 1e-6:
            raise InputError(f"Candidate {label!r} is not a 3D-periodic crystal; hull candidates need a cell.")
    elements = parse_system(system) if system is not None else sorted(
        {s for _, a in items for s in a.get_chemical_symbols()})
    outside = sorted({s for _, a in items for s in a.get_chemical_symbols()} - set(elements))
    if outside:
        raise InputError(f"Candidates hold {', '.join(outside)}, outside the system {'-'.join(elements)}; filter them "
                         "(load_candidates does) or widen the system.")
    from workflows.candidates import parse_composition

    search_comps: list[dict] = []
    if search:
        if compositions:
            search_comps = [c if isinstance(c, dict) else parse_composition(c) for c in compositions]
        else:  # the reduced compositions of the candidates, in order of appearance
            formulas = [a.get_chemical_formula(mode="hill", empirical=True) for _, a in items]
            search_comps = [parse_composition(f) for f in dict.fromkeys(formulas)]
        odd = sorted({el for c in search_comps for el in c} - set(elements))
        if odd:
            raise InputError(f"Search compositions hold {', '.join(odd)}, outside the system {'-'.join(elements)}.")
    searched_elements = {next(iter(c)) for c in search_comps if len(c) == 1}
    missing = [el for el in elements if el not in searched_elements
               and not any(set(a.get_chemical_symbols()) == {el} for _, a in items)]
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

    if search:
        from ase.data import atomic_numbers

        check_trained_elements(calculator, [Atoms([atomic_numbers[el] for el in elements])], labels=["search"],
                               properties=False)
    if items:
        check_trained_elements(calculator, [a for _, a in items], labels=[lab for lab, _ in items], properties=False)
    out = RunFolder.check(output_dir)
    info = model_info(calculator)
    labels = [lab for lab, _ in items]
    inputs = [(_primitive(a, symprec) if primitive else a.copy()) for _, a in items]
    free = _free_energies(qha, temperature, labels, inputs, pressure_list, info)  # checked before any work
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
        search_summary = None
        if search:
            t0 = time.perf_counter()
            with (runner.started() if runner is not None else contextlib.nullcontext()):
                found, search_summary = _search(search_comps, calculator, pressure_list, count=search, seed=seed,
                                                max_atoms=search_max_atoms, fmax=max(float(fmax), 0.05),
                                                steps=min(int(steps), 300), optimizer=optimizer, out=out, info=info,
                                                log=log, progress=progress, runner=runner, spec=spec)
            timings["search"] = time.perf_counter() - t0
            found_labels = unique_labels(labels + [lab for lab, _ in found])[len(labels):]
            labels += found_labels
            items += list(zip(found_labels, [a for _, a in found]))
            inputs += [(_primitive(a, symprec) if primitive else a.copy()) for _, a in found]
            settings["search"] = {k: search_summary[k] for k in ("count", "seed", "max_atoms", "fmax_eV_per_A", "steps",
                                                                 "compositions")}
        for a in inputs:
            a.calc = None
        input_groups = [_spacegroup(a, symprec) for a in inputs]
        if out is not None:
            (out / "relaxed").mkdir(exist_ok=True)
        keys, previous_key = {}, ""  # each pressure's store key, chained on the one before it in the chain
        for i in order:
            keys[i] = run_key([structure_record(a) for a in inputs], {**settings, "pressure_GPa": pressure_list[i],
                                                                     "chained_from": previous_key if chain != "none" else None}, info)
            previous_key = keys[i]
        stores = {i: ArrayStore(None if out is None else out / "relaxed" / f"P-{i:02d}.npz", keys[i]) for i in order}
        relax = {"fmax": fmax, "steps": steps, "optimizer": optimizer, "prescale": prescale_volume}
        t0 = time.perf_counter()
        if runner is not None and runner.distributed:
            with runner.started():
                results = _relax_on_dask(runner, spec, order, chain, inputs, labels, pressure_list, stores, relax, log,
                                         progress)
        else:
            results = _relax_here(calculator, order, chain, inputs, labels, pressure_list, stores, relax, log, progress)
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
            energy, slope = enthalpy.copy(), volumes.copy()  # what the hull is built on, and its dP-derivative
            for k, (g, dg) in free.items():
                energy[k], slope[k] = g[i] * n_atoms[k], dg[i] * n_atoms[k]
            ok = [k for k in range(len(labels)) if not r["errors"][k] and np.isfinite(energy[k]) and np.isfinite(slope[k])]
            hull = _hull_of(ok, len(labels), compositions, energy, slope, f"{pressure:g} GPa", log)
            per_p.append({"enthalpy": enthalpy / n_atoms, "volume": volumes / n_atoms, "energy": energy / n_atoms,
                          "dedp": slope / n_atoms, **hull,
                          "spacegroup": [_spacegroup(a, symprec) for a in r["atoms"]]})
            log.info(f"{pressure:g} GPa: stable {', '.join(lab for lab, s in zip(labels, hull['stable']) if s)}")

        phases, transitions = [], []
        for k, lab in enumerate(labels):
            sgs = [pp["spacegroup"][k] for pp in per_p]
            vols = [float(pp["volume"][k]) for pp in per_p]
            flags: list[list[str]] = [[] for _ in pressure_list]
            for i in range(len(pressure_list)):
                if results[i]["errors"][k]:
                    flags[i].append(f"relaxation failed ({results[i]['errors'][k][:80]}): left out of this hull")
                elif not results[i]["converged"][k]:
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
                **({"gibbs_eV_per_atom": free[k][0].tolist()} if k in free else {}),
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
                   "transitions": transitions, **({"search": search_summary} if search_summary else {}),
                   **_finite_temperature(free, labels, temperature, log),
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


def _finite_temperature(free: dict, labels: list[str], temperature: float | None, log) -> dict:
    """The summary's record of a finite-temperature hull (empty for a static one), with its warning."""
    if not free:
        return {}
    with_g = [labels[k] for k in sorted(free)]
    without = [lab for k, lab in enumerate(labels) if k not in free]
    note = {"temperature_K": float(temperature), "phases_with_free_energy": with_g, "phases_static": without,
            "included": "for the phases with QHA: static energy + PV + zero-point energy + harmonic vibrational free "
                        "energy, at the quasi-harmonic equilibrium volume (phonopy's QHA G(T, P))",
            "not_included": "configurational entropy, anharmonic terms beyond the quasi-harmonic approximation, "
                            "electronic free energy; phases without QHA enter with the static enthalpy"}
    if without:
        log.warning(f"finite-temperature hull at {temperature:g} K: {', '.join(without)} enter with the static "
                    "enthalpy (no zero-point energy or vibrational entropy), the others with G(T, P); mixing "
                    "them biases the hull (vibrational entropy usually lowers G by tens of meV/atom at 1000 K); "
                    "give QHA runs of every phase that matters, the elemental ones included.")
    return {"finite_temperature": note}


def _hull_of(ok: list[int], n: int, compositions, energy, slope, where: str, log) -> dict:
    """:func:`signed_distances` of the phases ``ok`` (the others failed at this pressure), spread back over all
    ``n`` phases: NaN distances and not stable for those left out, competitors in the full numbering. A
    hull that cannot be built (an end member failed) is all NaN, with a warning."""
    out = {"formation": [math.nan] * n, "above_hull": [math.nan] * n, "signed": [math.nan] * n,
           "slope": [math.nan] * n, "stable": [False] * n, "competitor": [{} for _ in range(n)]}
    if len(ok) < n:
        log.warning(f"{where}: {n - len(ok)} relaxation(s) failed and are left out of this hull")
    try:
        sub = signed_distances([compositions[k] for k in ok], energy[ok], slope[ok])
    except InputError:
        log.warning(f"{where}: no hull (an elemental end member's relaxation failed)")
        return out
    for j, k in enumerate(ok):
        for name in ("formation", "above_hull", "signed", "slope", "stable"):
            out[name][k] = sub[name][j]
        out["competitor"][k] = {ok[m]: x for m, x in sub["competitor"][j].items()}
    return out


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
                h, v = per_p[j]["energy"], per_p[j]["dedp"]  # H and V, or G and dG/dP in a finite-T hull
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
    ft = summary.get("finite_temperature")
    quantity = f"ΔG_f at {ft['temperature_K']:g} K" if ft else "ΔH_f"
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
            ax.set_xlabel(f"x({el[1]})", fontsize=8), ax.set_ylabel(f"{quantity} (meV/atom)", fontsize=8)
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
