"""Li-rich layered oxides: the cell builder and the per-snapshot analysis of delithiation MD.

**Building** (:func:`build_li_rich`): from a layered LiMO2 template (R-3m LiCoO2 by default, built here
from its published structure: a = 2.8156 Å, c = 14.0542 Å, O at 6c with z = 0.2396; Akimoto et al., J.
Solid State Chem. 141, 298 (1998)), a supercell of the 12-atom hexagonal cell, every M replaced by the chosen
transition metal, and ``li_excess`` of them replaced by Li, spread evenly over the TM layers (seeded). 5x4x2
is 480 atoms; 24 substitutions give Li1.2Mn0.8O2, 30 give Li1.25Mn0.75O2.

**Analysis** (:func:`analyse_snapshot`), per snapshot:

- ``x``: Li per two O (Li_x M_y O2);
- magnetic moments of every TM and O (μB) and the TM oxidation states they imply (high-spin counting:
  Mn 3 μB -> Mn4+, 4 -> Mn3+, 5 -> Mn2+; see :data:`MOMENT_TO_OXIDATION`), when the model predicts moments;
- atomic charges (e) when the model predicts them;
- O-O pairs by distance: O2 molecule (< 1.3 Å), superoxo (1.3-1.4 Å), peroxo (1.4-1.55 Å), with their
  charges and moments, and the shortest O-O distance (the precursor of pairing: about 2.6 Å in the
  lithiated oxide; None when no two O are within :data:`O_O_SHORTEST_CUTOFF`);
- TM migration: a TM whose position along the stacking axis is nearer a Li layer than a TM layer of the
  initial structure (:class:`Layers`), with its coordination by O within ``tm_o_cutoff`` (4 tetrahedral,
  6 octahedral).

Units: Å, μB, e.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase import units as ase_units

from mattersim.errors import InputError
from workflows.cells import structure_record
from workflows.outputs import RunFolder, figure, load_summary, run_key, summary_header

__all__ = ["MOMENT_TO_OXIDATION", "O_O_CLASSES", "Layers", "analyse_snapshot", "build_li_rich",
           "layered_template", "oxidation_state"]

#: LiCoO2 (R-3m, hexagonal setting): a, c in Å and the O z parameter
LICOO2 = {"a": 2.8156, "c": 14.0542, "z_O": 0.2396}
#: O-O distance classes, Å (upper bounds)
O_O_CLASSES = (("O2", 1.3), ("superoxo", 1.4), ("peroxo", 1.55))
#: Å: the shortest O-O distance is looked for up to here
O_O_SHORTEST_CUTOFF = 3.2
#: spin-only moment (μB) -> oxidation state of common cathode transition metals (nearest listed moment)
MOMENT_TO_OXIDATION = {
    "Mn": ((3.0, 4), (4.0, 3), (5.0, 2)),          # d3, d4, d5 high spin
    "Fe": ((4.0, 2), (5.0, 3), (3.0, 5)),          # Fe2+ d6 HS 4, Fe3+ d5 HS 5, Fe4+ ambiguous: left out
    "Co": ((0.0, 3), (1.0, 4), (3.0, 2)),          # Co3+ d6 LS, Co4+ d5 LS, Co2+ d7 HS
    "Ni": ((2.0, 2), (1.0, 3), (0.0, 4)),          # Ni2+ d8, Ni3+ d7 LS, Ni4+ d6 LS
    "Cr": ((3.0, 3), (2.0, 4)),
    "V": ((2.0, 3), (1.0, 4), (0.0, 5)),
}
TRANSITION_METALS = {"Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Nb", "Mo", "Ru", "W"}


def layered_template() -> Atoms:
    """R-3m LiCoO2, the 12-atom hexagonal cell (Li 3a, Co 3b, O 6c)."""
    from ase.spacegroup import crystal

    p = LICOO2
    return crystal(["Li", "Co", "O"], basis=[(0, 0, 0), (0, 0, 0.5), (0, 0, p["z_O"])], spacegroup=166,
                   cellpar=[p["a"], p["a"], p["c"], 90, 90, 120])


def oxidation_state(element: str, moment: float) -> int | None:
    """The oxidation state whose spin-only moment is nearest ``|moment|`` (None for an unlisted element)."""
    table = MOMENT_TO_OXIDATION.get(element)
    if table is None:
        return None
    m = abs(float(moment))
    return min(table, key=lambda row: abs(row[0] - m))[1]


def build_li_rich(template: Atoms | None = None, *, tm: str = "Mn", supercell=(5, 4, 2), li_excess: int = 24,
                  seed: int = 0) -> tuple[Atoms, dict[str, Any]]:
    """The Li-rich cell and a record of it (composition, per-layer substitutions, average TM oxidation state).

    ``template``: a layered LiMO2 (one transition metal M, Li and O; default :func:`layered_template`).
    The ``li_excess`` substituted TM sites are spread over the TM layers (planes normal to the stacking
    axis c) as evenly as possible, chosen at random (``seed``) within each layer.
    """
    from ase.build import make_supercell
    from ase.data import atomic_numbers

    from mattersim.settings import parse_supercell

    template = layered_template() if template is None else template.copy()
    symbols = set(template.get_chemical_symbols())
    metals = sorted(symbols & TRANSITION_METALS)
    if not {"Li", "O"} <= symbols or len(metals) != 1 or len(symbols) != 3:
        raise InputError(f"The template {template.get_chemical_formula()} is not a layered LiMO2 with one transition "
                         "metal M; give a LiCoO2-like structure (e.g. R-3m LiCoO2).")
    if tm not in atomic_numbers or tm not in TRANSITION_METALS:
        raise InputError(f"--tm {tm!r} is not a transition metal; give e.g. Mn, Ni, Co or Fe.")
    matrix = parse_supercell(supercell if not isinstance(supercell, (tuple, list)) else list(supercell), "--supercell")
    cell = make_supercell(template, matrix)
    cell.symbols[cell.symbols == metals[0]] = tm
    tm_index = np.flatnonzero(cell.symbols == tm)
    if not 0 <= int(li_excess) <= len(tm_index):
        raise InputError(f"--li-excess {li_excess}: the cell has {len(tm_index)} {tm} sites; give 0 to {len(tm_index)}.")
    layers = Layers.from_structure(cell)
    layer_of = layers.tm_layer_of(cell, tm_index)
    rng = np.random.default_rng(seed)
    n_layers = len(layers.tm_planes)
    counts = np.full(n_layers, int(li_excess) // n_layers)
    counts[rng.permutation(n_layers)[: int(li_excess) % n_layers]] += 1
    chosen, per_layer = [], []
    for layer in range(n_layers):
        members = tm_index[layer_of == layer]
        if counts[layer] > len(members):
            raise InputError(f"--li-excess {li_excess} does not fit evenly into {n_layers} TM layers of "
                             f"{len(members)} sites; use a smaller number or a larger supercell.")
        chosen.extend(rng.choice(members, size=counts[layer], replace=False).tolist())
        per_layer.append(int(counts[layer]))
    cell.symbols[np.array(chosen, dtype=int)] = "Li"
    n = {s: int(np.sum(cell.symbols == s)) for s in ("Li", tm, "O")}
    oxidation = (2 * n["O"] - n["Li"]) / n[tm] if n[tm] else None
    info = {
        "formula": cell.get_chemical_formula(),
        "natoms": len(cell),
        "composition_per_O2": {"Li": n["Li"] * 2 / n["O"], tm: n[tm] * 2 / n["O"], "O": 2.0},
        "substituted_per_tm_layer": per_layer,
        "substituted_sites": sorted(int(k) for k in chosen),
        "average_tm_oxidation_state": oxidation,
        "charge_balanced": oxidation is not None and 2.0 <= oxidation <= 7.0,
        "seed": int(seed),
        "supercell": np.asarray(matrix).tolist(),
    }
    return cell, info


@dataclass
class Layers:
    """The Li and TM layers of a layered oxide along the stacking axis (the third cell vector), as
    fractional coordinates of their planes, from the initial structure, anchored to its O framework
    (``o_z``: the O atoms' fractional coordinates along the axis, in order): a snapshot whose framework has
    moved as a whole along the axis is compared with the planes moved with it (:meth:`shift`), so a rigid
    translation never counts as migration."""

    li_planes: np.ndarray
    tm_planes: np.ndarray
    o_z: np.ndarray | None = None

    @classmethod
    def from_structure(cls, atoms: Atoms, tol: float = 0.02) -> "Layers":
        z = atoms.get_scaled_positions(wrap=True)[:, 2]
        symbols = np.array(atoms.get_chemical_symbols())
        metals = np.isin(symbols, list(TRANSITION_METALS))

        def planes(mask):
            values = np.sort(z[mask])
            if not len(values):
                return np.zeros(0)
            groups = [[values[0]]]
            for v in values[1:]:
                (groups[-1].append(v) if v - groups[-1][-1] < tol else groups.append([v]))
            if len(groups) > 1 and groups[0][0] + 1 - groups[-1][-1] < tol:  # a plane across z = 0
                groups[0] = [g - 1 for g in groups.pop()] + groups[0]
            return np.array([np.mean(g) % 1.0 for g in groups])

        li, tm = planes(symbols == "Li"), planes(metals)
        # a Li plane holding substituted Li of a TM layer is a TM plane: keep Li planes away from TM planes
        li = np.array([p for p in li if np.min(np.abs((p - tm + 0.5) % 1.0 - 0.5), initial=1.0) > tol])
        if not len(li) or not len(tm):
            raise InputError(f"{atoms.get_chemical_formula()} has no separate Li and TM layers along the third cell "
                             "vector; give a layered oxide with c as the stacking axis.")
        return cls(li, tm, z[symbols == "O"])

    def shift(self, atoms: Atoms) -> float:
        """How far (fractional, along the stacking axis) the O framework of ``atoms`` has moved as a whole: the
        mean of its O atoms' displacements from the initial ones (the same O in the same order, each within
        half a cell); 0 when the O atoms do not correspond."""
        o = np.asarray(atoms.numbers) == 8
        if self.o_z is None or int(o.sum()) != len(self.o_z):
            return 0.0
        dz = atoms.get_scaled_positions(wrap=True)[o, 2] - self.o_z
        return float(np.mean((dz + 0.5) % 1.0 - 0.5))

    @staticmethod
    def _nearest(z: np.ndarray, planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = np.abs((z[:, None] - planes[None, :] + 0.5) % 1.0 - 0.5)
        return d.argmin(axis=1), d.min(axis=1)

    def _z(self, atoms: Atoms, index) -> np.ndarray:
        return atoms.get_scaled_positions(wrap=True)[np.asarray(index), 2] - self.shift(atoms)

    def tm_layer_of(self, atoms: Atoms, index) -> np.ndarray:
        return self._nearest(self._z(atoms, index), self.tm_planes)[0]

    def in_li_layer(self, atoms: Atoms, index) -> np.ndarray:
        """True for the atoms nearer a Li plane than a TM plane (planes moved with the O framework)."""
        z = self._z(atoms, index)
        return self._nearest(z, self.li_planes)[1] < self._nearest(z, self.tm_planes)[1]


def _value(arr, k):
    return None if arr is None else float(arr[k])


def analyse_snapshot(atoms: Atoms, layers: Layers, *, magmoms=None, charges=None, tm_o_cutoff: float = 2.4
                     ) -> dict[str, Any]:
    """The per-snapshot record of the module doc. ``magmoms``/``charges``: per-atom arrays or None."""
    from ase.neighborlist import neighbor_list

    symbols = np.array(atoms.get_chemical_symbols())
    o = np.flatnonzero(symbols == "O")
    tm = np.flatnonzero(np.isin(symbols, list(TRANSITION_METALS)))
    magmoms = None if magmoms is None else np.asarray(magmoms, dtype=float).reshape(-1)
    charges = None if charges is None else np.asarray(charges, dtype=float).reshape(-1)
    doc: dict[str, Any] = {"x": float(np.sum(symbols == "Li") * 2 / max(len(o), 1)), "n_li": int(np.sum(symbols == "Li"))}
    i, j, d = neighbor_list("ijd", atoms, max(O_O_SHORTEST_CUTOFF, tm_o_cutoff))
    # O-O pairs
    pairs = []
    o_o = (symbols[i] == "O") & (symbols[j] == "O") & (i < j)
    doc["o_o_shortest_A"] = float(d[o_o].min()) if o_o.any() else None
    sel = o_o & (d < O_O_CLASSES[-1][1])
    for a, b, dist in zip(i[sel], j[sel], d[sel]):
        kind = next(name for name, upper in O_O_CLASSES if dist < upper)
        pairs.append({"i": int(a), "j": int(b), "distance_A": float(dist), "kind": kind,
                      "charges_e": None if charges is None else [_value(charges, a), _value(charges, b)],
                      "magmoms_uB": None if magmoms is None else [_value(magmoms, a), _value(magmoms, b)]})
    doc["o_o_pairs"] = pairs
    doc["o_o_counts"] = {name: sum(p["kind"] == name for p in pairs) for name, _ in O_O_CLASSES}
    # TM: moments, oxidation states, migration
    if magmoms is not None:
        ox = [oxidation_state(symbols[k], magmoms[k]) for k in tm]
        doc["tm_moment_mean_uB"] = float(np.mean(np.abs(magmoms[tm]))) if len(tm) else None
        doc["tm_oxidation_states"] = ox
        known = [x for x in ox if x is not None]
        doc["tm_oxidation_mean"] = float(np.mean(known)) if known else None
        doc["o_moment_mean_uB"] = float(np.mean(np.abs(magmoms[o]))) if len(o) else None
        doc["o_moment_max_uB"] = float(np.max(np.abs(magmoms[o]))) if len(o) else None
    else:
        doc["magmoms_note"] = "the model predicts no magnetic moments"
    if charges is not None:
        doc["tm_charge_mean_e"] = float(np.mean(charges[tm])) if len(tm) else None
        doc["o_charge_mean_e"] = float(np.mean(charges[o])) if len(o) else None
    else:
        doc["charges_note"] = "the model predicts no atomic charges"
    migrated = tm[layers.in_li_layer(atoms, tm)] if len(tm) else tm
    tm_o = (np.isin(i, migrated)) & (symbols[j] == "O") & (d < tm_o_cutoff)
    coordination = {int(k): int(np.sum(tm_o & (i == k))) for k in migrated}
    doc["migrated_tm"] = [{"index": k, "element": str(symbols[k]), "o_neighbours": c,
                           "site": {4: "tetrahedral", 6: "octahedral"}.get(c, "other")}
                          for k, c in coordination.items()]
    doc["migrated_counts"] = {"total": len(coordination),
                              "tetrahedral": sum(c == 4 for c in coordination.values()),
                              "octahedral": sum(c == 6 for c in coordination.values())}
    return doc


# --------------------------------------------------------------------------------------------------
# the delithiation run
# --------------------------------------------------------------------------------------------------

SELECTIONS = ("random", "lowest-coordination", "highest-energy")
WORKFLOW_VERSION = 1
SERIES_COLUMNS = ("segment", "step", "time_ps", "x", "n_li", "temperature_K", "epot_eV", "tm_moment_mean_uB",
                  "tm_oxidation_mean", "o_moment_mean_uB", "o_moment_max_uB", "tm_charge_mean_e", "o_charge_mean_e",
                  "O2", "superoxo", "peroxo", "o_o_shortest_A", "migrated_tm", "migrated_tetrahedral",
                  "migrated_octahedral")


@dataclass
class DelithiationResult:
    """A delithiation run: ``summary`` (``delithiation.json``), ``series`` (columns of ``delithiation.csv``),
    ``output_dir``."""

    summary: dict
    series: dict[str, np.ndarray]
    output_dir: Any = None

    def rows(self) -> list[tuple[str, str]]:
        s, res = self.summary, self.summary["results"]
        rows = [("cell", f"{s['structure']['formula']} ({s['structure']['natoms']} atoms)"),
                ("Li removed", f"{res['li_removed']} in {res['segments']} segments; x {res['x_start']:.3g} -> "
                               f"{res['x_end']:.3g}"),
                ("simulated time", f"{res['time_ps']:.4g} ps at {s['settings']['temperature_K']:g} K")]
        for key, label in (("tm_moment_mean_uB", "mean TM moment (start -> end)"),
                           ("tm_oxidation_mean", "mean TM oxidation state"),
                           ("o_moment_mean_uB", "mean |O moment|")):
            col = self.series.get(key)
            if col is not None and np.isfinite(col).any():
                ok = col[np.isfinite(col)]
                rows.append((label, f"{ok[0]:.3g} -> {ok[-1]:.3g}"))
        rows.append(("O-O pairs at the end", ", ".join(f"{k} {int(self.series[k][-1])}" for k in ("O2", "superoxo",
                                                                                                   "peroxo"))))
        shortest = self.series.get("o_o_shortest_A")
        if shortest is not None and np.isfinite(shortest).any():
            ok = shortest[np.isfinite(shortest)]
            rows.append(("shortest O-O distance (start -> end)", f"{ok[0]:.3g} -> {ok[-1]:.3g} Å"))
        rows.append(("migrated TM at the end", f"{int(self.series['migrated_tm'][-1])} "
                                               f"({int(self.series['migrated_tetrahedral'][-1])} tetrahedral)"))
        for note in res.get("notes", []):
            rows.append(("note", note))
        rows.append(("speed", f"{res['atom_steps_per_s']:.4g} atom-steps/s; analysis {100 * res['analysis_share']:.2g} % "
                              "of the time"))
        return rows

    def save(self, directory):
        """Write ``delithiation.json`` to ``directory`` (the run writes its other files as it goes)."""
        RunFolder(directory, "delithiation").write_json("delithiation.json", self.summary)
        return Path(directory)

    @classmethod
    def load(cls, directory) -> "DelithiationResult":
        from workflows.md import read_series

        directory = Path(directory)
        summary = load_summary(directory, "delithiation.json", ["delithiation.csv"], "delithiation run")
        return cls(summary, read_series(directory / "delithiation.csv"), directory)


def _li_to_remove(atoms: Atoms, n: int, select: str, rng, calculator) -> np.ndarray:
    from ase.neighborlist import neighbor_list

    li = np.flatnonzero(atoms.symbols == "Li")
    n = min(n, len(li))
    if select == "random":
        return np.sort(rng.choice(li, size=n, replace=False))
    order = rng.permutation(len(li))  # ties broken at random (seeded)
    if select == "lowest-coordination":
        i, j = neighbor_list("ij", atoms, 2.5)
        o_count = np.array([np.sum((i == k) & (atoms.symbols[j] == "O")) for k in li])
        key = o_count[order]
    else:  # highest-energy: the model's per-atom energies
        a = atoms.copy()
        a.calc = calculator
        key = -np.asarray(a.get_potential_energies())[li][order]
    return np.sort(li[order[np.argsort(key, kind="stable")[:n]]])


def _frames_of(folder) -> list[Atoms]:
    import ase.io

    path = folder / "trajectory.extxyz"
    return ase.io.read(path, ":") if path.exists() and path.stat().st_size else []


def _per_atom(frame: Atoms, name: str):
    if name in frame.arrays:
        return frame.arrays[name]
    if frame.calc is not None and name in frame.calc.results:
        return frame.calc.results[name]
    return None


def run_delithiation(atoms: Atoms, calculator, *, temperature: float = 1000.0, timestep: float = 1.0,
                     remove_every: float = 5.0, remove: int = 1, select: str = "random", until: float = 0.0,
                     equilibrate: float | None = None, hold: float | None = None, relax: bool = True,
                     fmax: float = 0.05, seed: int = 0,
                     every: int = 100, checkpoint_every: int = 500, tdamp: float | None = None,
                     output_dir=None, progress: bool = False) -> DelithiationResult:
    """Delithiation MD (module doc): relax, equilibrate (NVT Nosé-Hoover, ``equilibrate`` ps, default
    ``remove_every``), then remove ``remove`` Li (``select``) every ``remove_every`` ps until x <= ``until``,
    one resumable :func:`workflows.md.run_md` segment per interval (the integrator rebuilt after each
    removal, the velocities of the other atoms kept), and analyse every frame (every ``every`` steps).
    The last segment, at the target x, runs for ``hold`` ps (default ``remove_every``): O-O pairing and TM
    migration are slow and happen at low x. ``hold`` is not part of the run's identity: a larger ``hold``
    continues a finished run at the target x.

    Units: temperature K, timestep fs, remove_every/equilibrate/hold ps, fmax eV/Å.
    """
    from ase.md.velocitydistribution import Stationary

    from mattersim.calculator import model_info
    from workflows.md import checkpoint_step, run_md

    if select not in SELECTIONS:
        raise InputError(f"select = {select!r}; choose one of {', '.join(SELECTIONS)}.")
    if not (np.isfinite(remove_every) and remove_every > 0) or int(remove) != remove or remove < 1:
        raise InputError("remove_every must be a positive time in ps and remove a whole number >= 1 of Li atoms.")
    if hold is not None and not (np.isfinite(hold) and hold > 0):
        raise InputError(f"hold = {hold}: the time at the target x must be a positive time in ps.")
    if output_dir is None:
        raise InputError("A delithiation run needs an output folder (its segments are written there).")
    n_o = int(np.sum(atoms.symbols == "O"))
    x0 = float(np.sum(atoms.symbols == "Li") * 2 / max(n_o, 1))
    if n_o == 0 or x0 == 0:
        raise InputError(f"{atoms.get_chemical_formula()} has no Li or no O; give a lithium transition-metal oxide.")
    if not 0 <= until < x0:
        raise InputError(f"until = {until}: the cell starts at x = {x0:.3g}; give a target 0 <= x < {x0:.3g}.")
    if select == "highest-energy" and "energies" not in (getattr(calculator, "implemented_properties", None) or ()):
        raise InputError("select = highest-energy needs per-atom energies, which this model does not give; use "
                         "random or lowest-coordination.")
    Layers.from_structure(atoms)  # a layered oxide, before any work
    RunFolder.check(output_dir)
    equilibrate = remove_every if equilibrate is None else equilibrate
    info = model_info(calculator)
    settings = {"temperature_K": temperature, "timestep_fs": timestep, "remove_every_ps": remove_every,
                "remove": int(remove), "select": select, "until_x": until, "equilibrate_ps": equilibrate,
                "relax": bool(relax), "fmax": fmax, "seed": int(seed), "every": int(every),
                "tdamp_fs": 100 * timestep if tdamp is None else tdamp}
    key = run_key(structure_record(atoms), settings, info)
    hold = remove_every if hold is None else hold
    settings["hold_ps"] = hold  # after the key: a longer hold continues the same run
    out = Path(output_dir)
    t_start = time.perf_counter()
    with RunFolder(out, "delithiation") as folder:
        flog = folder.log
        start = _relaxed_start(folder, atoms, calculator, key, relax, fmax, flog)
        layers = Layers.from_structure(start)
        md_wall = analysis_wall = 0.0
        atom_steps = 0
        current, k, removed, orig = start, 0, [], np.arange(len(start))
        series_rows, snapshots = [], []
        t_offset = 0.0
        while True:
            segment = out / "segments" / f"{k:03d}"
            x_now = float(np.sum(current.symbols == "Li") * 2 / n_o)
            at_target = x_now <= until + 1e-12  # the last segment (the start is above the target: checked)
            length = equilibrate if k == 0 else hold if at_target else remove_every
            steps = max(1, int(round(length * 1000 / timestep)))
            if at_target and (done := checkpoint_step(segment)) > steps:
                raise InputError(f"'{out}' holds {done * timestep / 1000:g} ps at the target x already; give hold >= "
                                 f"{done * timestep / 1000:g} ps (--hold) to continue it, or another output folder.")
            t0 = time.perf_counter()
            res = run_md(current, calculator, ensemble="nvt", temperature=temperature, timestep=timestep,
                         steps=steps, seed=int(seed) + k, every=every, checkpoint_every=checkpoint_every,
                         tdamp=tdamp, keep_velocities=k > 0, output_dir=segment, progress=progress)
            md_wall += time.perf_counter() - t0
            atom_steps += steps * len(current)
            t0 = time.perf_counter()
            for frame in _frames_of(segment):
                doc = analyse_snapshot(frame, layers, magmoms=_per_atom(frame, "magmoms"),
                                       charges=_per_atom(frame, "charges"))
                series_rows.append(_series_row(k, frame, doc, t_offset))
                snapshots.append(_snapshot(frame, doc, orig))
            analysis_wall += time.perf_counter() - t0
            t_offset += steps * timestep / 1000.0
            final = res.atoms
            if at_target:
                break
            rng = np.random.default_rng([int(seed), k])
            gone = _li_to_remove(final, int(remove), select, rng, calculator)
            n_li = int(np.sum(final.symbols == "Li"))
            target_li = int(np.ceil(until * n_o / 2 - 1e-9))
            gone = gone[: max(0, min(len(gone), n_li - target_li))]
            removed.append({"segment": k + 1, "time_ps": t_offset, "original_indices": orig[gone].tolist()})
            flog.info(f"t = {t_offset:.4g} ps: removed Li {orig[gone].tolist()} ({select}); x {x_now:.4g} -> "
                      f"{(n_li - len(gone)) * 2 / n_o:.4g}")
            keep = np.setdiff1d(np.arange(len(final)), gone)
            current = final[keep]  # positions unchanged; momenta unchanged but for the removed atoms' share:
            current.calc = None
            # the removed Li leave their momentum behind as a net drift of the rest, which over picoseconds
            # carries the whole framework along the stacking axis; the centre-of-mass velocity is taken out
            v_com = current.get_momenta().sum(axis=0) / current.get_masses().sum()
            Stationary(current, preserve_temperature=False)
            flog.info(f"  centre-of-mass velocity {np.linalg.norm(v_com) * 1000 * ase_units.fs:.3g} Å/ps taken out")
            orig = orig[keep]
            k += 1
        summary, series = _finish_delithiation(folder, atoms, start, info, settings, series_rows, snapshots, removed,
                                               k + 1, md_wall, analysis_wall, atom_steps, t_offset,
                                               time.perf_counter() - t_start, x0)
    return DelithiationResult(summary, series, out)


def _relaxed_start(folder, atoms, calculator, key, relax, fmax, flog) -> Atoms:
    """The relaxed cell, stored exactly (``start.npz``) so that a resumed run starts from the same numbers."""
    import ase.io

    from mattersim.io import atomic_path

    path = folder.path / "start.npz"
    if path.exists():
        with np.load(path) as data:
            if str(data["key"]) == key:
                start = Atoms(numbers=data["numbers"], positions=data["positions"], cell=data["cell"], pbc=True)
                flog.info("Starting from the stored relaxed cell (start.npz).")
                return start
        raise InputError(f"'{folder.path}' holds a delithiation run with other inputs; choose another output "
                         "folder, or delete it to start again.")
    start = atoms.copy()
    start.calc = None
    if relax:
        from mattersim.relax import relax as relax_one

        r = relax_one(start, calculator, fmax=fmax, steps=1000, mode="full")
        flog.info(f"Relaxed ions and cell: {'converged' if r.converged else 'NOT converged'} in {r.steps} steps, "
                  f"E = {r.energy:.4f} eV")
        start = r.atoms.copy()
        start.calc = None
    with atomic_path(path) as tmp:
        np.savez(tmp, key=np.array(key), numbers=start.numbers, positions=start.positions, cell=start.cell.array)
    folder.record(["start.npz"])
    folder.write_with("start.extxyz", lambda tmp: ase.io.write(tmp, start, format="extxyz"))
    return start


def _series_row(segment: int, frame: Atoms, doc: dict, t_offset: float) -> dict:
    step = int(frame.info.get("step", 0))
    row = {"segment": segment, "step": step, "time_ps": t_offset + float(frame.info.get("time_fs", 0.0)) / 1000.0,
           "x": doc["x"], "n_li": doc["n_li"], "temperature_K": float(frame.get_temperature()),
           "epot_eV": float(frame.get_potential_energy()) if frame.calc is not None else np.nan}
    for name in ("tm_moment_mean_uB", "tm_oxidation_mean", "o_moment_mean_uB", "o_moment_max_uB", "tm_charge_mean_e",
                 "o_charge_mean_e"):
        row[name] = doc.get(name)
    row.update(doc["o_o_counts"], o_o_shortest_A=doc["o_o_shortest_A"])
    row.update(migrated_tm=doc["migrated_counts"]["total"], migrated_tetrahedral=doc["migrated_counts"]["tetrahedral"],
               migrated_octahedral=doc["migrated_counts"]["octahedral"])
    return row


def _snapshot(frame: Atoms, doc: dict, orig: np.ndarray) -> Atoms:
    """The frame with the tracked per-atom arrays (for visualisation)."""
    snap = frame.copy()
    n = len(snap)
    ox = np.zeros(n, dtype=int)
    if doc.get("tm_oxidation_states") is not None:
        tm = np.flatnonzero(np.isin(snap.get_chemical_symbols(), list(TRANSITION_METALS)))
        ox[tm] = [0 if v is None else v for v in doc["tm_oxidation_states"]]
    pair_class = np.zeros(n, dtype=int)  # 0 none, 1 O2, 2 superoxo, 3 peroxo
    codes = {name: c + 1 for c, (name, _) in enumerate(O_O_CLASSES)}
    for p in doc["o_o_pairs"]:
        pair_class[[p["i"], p["j"]]] = np.maximum(pair_class[[p["i"], p["j"]]], codes[p["kind"]])
    migrated = np.zeros(n, dtype=int)
    for m in doc["migrated_tm"]:
        migrated[m["index"]] = m["o_neighbours"]
    snap.arrays.update(oxidation_state=ox, o_o_class=pair_class, migrated_o_neighbours=migrated,
                       original_index=np.asarray(orig[:n]))
    for name in ("magmoms", "charges"):  # the model's, read back from the trajectory (arrays or results)
        value = _per_atom(frame, name)
        if value is not None:
            snap.arrays[name] = np.asarray(value, dtype=float).reshape(n)
    snap.info.update(x=doc["x"])
    return snap


def _finish_delithiation(folder, atoms, start, info, settings, rows, snapshots, removed, segments, md_wall,
                         analysis_wall, atom_steps, t_end, total, x0):
    import ase.io

    from workflows.md import read_series

    def write_csv(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(SERIES_COLUMNS)
            for r in rows:
                w.writerow(["" if r.get(c) is None else r.get(c) for c in SERIES_COLUMNS])

    folder.write_with("delithiation.csv", write_csv)
    folder.write_with("snapshots.extxyz", lambda tmp: ase.io.write(tmp, snapshots, format="extxyz"))
    series = read_series(folder.path / "delithiation.csv")
    notes = []
    if not np.isfinite(series["tm_moment_mean_uB"]).any():
        notes.append("the model predicts no magnetic moments: no moments or oxidation states")
    if not np.isfinite(series["tm_charge_mean_e"]).any():
        notes.append("the model predicts no atomic charges")
    _plots(folder, series)
    res = {"segments": segments, "li_removed": sum(len(r["original_indices"]) for r in removed), "removals": removed,
           "x_start": x0, "x_end": float(series["x"][-1]), "time_ps": t_end, "md_wall_s": md_wall,
           "analysis_wall_s": analysis_wall, "analysis_share": analysis_wall / max(md_wall + analysis_wall, 1e-9),
           "atom_steps_per_s": atom_steps / max(md_wall, 1e-9), "notes": notes}
    units = {"time": "ps", "temperature": "K", "moments": "μB", "charges": "e", "distances": "Å",
             "x": "Li per two O"}
    summary = {**summary_header("delithiation", WORKFLOW_VERSION, info, settings, units,
                                {"md_s": md_wall, "analysis_s": analysis_wall, "total_s": total}, None),
               "structure": {"formula": start.get_chemical_formula(), "natoms": len(start),
                             "input": structure_record(atoms)},
               "results": res}
    summary["files"] = folder.files + ["delithiation.json"]
    folder.write_json("delithiation.json", summary)
    return summary, series


def _plots(folder, s: dict) -> None:
    panels = [("tm_moment_mean_uB", "mean TM moment (μB)"), ("tm_oxidation_mean", "mean TM oxidation state"),
              (("o_moment_mean_uB", "o_moment_max_uB"), "|O moment| (μB)"), (("O2", "superoxo", "peroxo"), "O-O pairs"),
              ("o_o_shortest_A", "shortest O-O distance (Å)"), (("migrated_tm", "migrated_tetrahedral"),
                                                               "TM in Li layers"), ("temperature_K", "T (K)")]

    def draw_against(xname, xlabel):
        def draw(axes):
            for ax, (cols, label) in zip(axes.ravel(), panels):
                for c in (cols if isinstance(cols, tuple) else (cols,)):
                    if not np.isfinite(s[c]).any():
                        continue
                    if xname == "x":  # one point per Li content: the mean over its snapshots, the spread as a bar
                        xs = np.unique(np.round(s["x"], 8))
                        groups = [s[c][np.isclose(s["x"], v)] for v in xs]
                        ax.errorbar(xs, [np.nanmean(g) for g in groups], yerr=[np.nanstd(g) for g in groups],
                                    fmt="o-", ms=3, capsize=2, label=c)
                    else:
                        ax.plot(s[xname], s[c], "-", label=c)
                ax.set_ylabel(label)
                ax.set_xlabel(xlabel)
                if isinstance(cols, tuple):
                    ax.legend(fontsize=7)
                if xname == "x":
                    ax.invert_xaxis()
            for ax in axes.ravel()[len(panels):]:
                ax.set_axis_off()
        return draw

    figure(folder.path / "delithiation_vs_x.png", "Delithiation: against Li content x", draw_against("x", "x in Li_x"),
           shape=(2, 4), figsize=(15, 6.5))
    figure(folder.path / "delithiation_vs_time.png", "Delithiation: against time", draw_against("time_ps", "t (ps)"),
           shape=(2, 4), figsize=(15, 6.5))
    folder.record(["delithiation_vs_x.png", "delithiation_vs_time.png"])
