"""Molecular dynamics with ASE's integrators: restartable, with an optional time-dependent electric field.

``run_md(atoms, calculator, ensemble=..., temperature=..., timestep=..., steps=..., output_dir=...)``
integrates with ASE (no integrator of our own):

| ensemble | thermostat | ASE class |
| --- | --- | --- |
| ``nve`` | - | ``VelocityVerlet`` |
| ``nvt`` | ``nose-hoover`` (default) | ``NoseHooverChainNVT`` (chain of 3, ``tdamp``) |
| ``nvt`` | ``langevin`` | ``Langevin`` (``friction``, seeded random numbers) |
| ``npt`` | ``nose-hoover`` | ``MTKNPT`` (Martyna-Tobias-Klein, full cell fluctuations: anisotropic cells) |

Outputs in ``output_dir``: ``trajectory.extxyz`` (every ``every`` steps: positions, momenta, energy,
forces, stress and every per-atom property the model predicts), ``md.csv`` (one row per frame: time,
temperature, energies, the conserved quantity, pressure, volume; with a field also E, the field's work and
P), ``checkpoint.npz`` (atomic, every ``checkpoint_every`` steps: positions, momenta, cell, thermostat and
barostat variables, random-number state, Z* and the polarization accounts), ``md.json`` (summary),
``md.png``, ``md.log``; with a field ``polarization.png``, and for periodic schedules ``pe_loop.json`` /
``pe_loop.png``; for an ABO3 perovskite ``local_polarization.npz`` / ``local_polarization.png``.

**Restart.** Run again with the same inputs and ``output_dir``: the run continues from the last checkpoint,
first cutting the trajectory and ``md.csv`` back to it, and gives the same trajectory as an uninterrupted
run (the random numbers and thermostat variables are in the checkpoint; a bigger ``steps`` extends a
finished run). A checkpoint of a run with other settings is an error that names them.

**Electric field** (``efield``, :mod:`workflows.efield`): forces F = F0 + e Z*^T E(t), Z* from the
calculator (a composite such as ``sevennet-0+mattersim-dielectric``), a predictor, or fixed (a BORN file of
the input cell, or arrays); recomputed every ``born_every`` steps. The potential energy stays the model's;
the field's work W is tracked and ``conserved = (integrator's conserved energy) - W``.

Units: time fs (``time_ps`` in md.csv), temperature K, energies eV, pressure GPa (including the kinetic
part), volume Å^3, field in the schedule's unit (V/Å in the trajectory), polarization μC/cm².
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from ase import Atoms, units

from mattersim.errors import InputError
from mattersim.io import atomic_path, progress_bar
from workflows.efield import (FIELD_UNITS, FieldCalculator, FieldSchedule, PerovskiteCells, PolarizationTracker,
                              parse_field, pe_loop, reference_in_supercell, supercell_charges)
from workflows.outputs import RunFolder, figure, load_summary, run_key, summary_header

__all__ = ["ENSEMBLES", "THERMOSTATS", "MDResult", "run_md", "read_series"]

log = logging.getLogger("mattersim.md")

WORKFLOW_VERSION = 1
ENSEMBLES = ("nve", "nvt", "npt")
THERMOSTATS = ("nose-hoover", "langevin")
CHECKPOINT = "checkpoint.npz"
TRAJECTORY = "trajectory.extxyz"
SERIES = "md.csv"
#: local polarizations, appended frame by frame (float64: time_ps, then N_B x 3 values per frame)
LOCAL_RAW = "local_polarization.raw"
#: integrator variables saved in a checkpoint (attribute paths on the ASE dynamics object)
_DYN_STATE = {
    "NoseHooverChainNVT": ("_thermostat._eta", "_thermostat._p_eta"),
    "MTKNPT": ("_thermostat._eta", "_thermostat._p_eta", "_barostat._xi", "_barostat._p_xi", "_p_g"),
}
#: settings that may change when a run is continued
_RESUMABLE = ("steps", "checkpoint_every", "maps_at_ps", "skip_cycles")


# --------------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------------


@dataclass
class MDResult:
    """An MD run: ``summary`` (``md.json``), ``series`` (the columns of ``md.csv``), ``loop`` (the P-E
    loop of a periodic field, or None), ``atoms`` (the last frame, or None when loaded) and ``output_dir``."""

    summary: dict
    series: dict[str, np.ndarray]
    loop: dict | None = None
    atoms: Atoms | None = None
    output_dir: Path | None = None

    def rows(self) -> list[tuple[str, str]]:
        s, res = self.summary, self.summary["results"]
        rows = [("structure", f"{s['structure']['formula']} ({s['structure']['natoms']} atoms)"),
                ("ensemble", s["settings"]["integrator"]),
                ("steps", f"{res['steps_done']} x {s['settings']['timestep_fs']:g} fs = {res['time_ps']:.4g} ps"),
                ("temperature", f"{res['temperature_mean_K']:.1f} ± {res['temperature_std_K']:.1f} K"),
                ("potential energy", f"{res['epot_mean_eV']:.4f} eV ({res['epot_mean_eV'] / s['structure']['natoms']:.4f} eV/atom)")]
        if res.get("conserved_drift_meV_per_atom_per_ps") is not None:
            rows.append(("conserved-quantity drift", f"{res['conserved_drift_meV_per_atom_per_ps']:+.3g} meV/atom/ps"))
        if res.get("pressure_mean_GPa") is not None:
            rows.append(("pressure", f"{res['pressure_mean_GPa']:.3f} GPa"))
        rows.append(("volume", f"{res['volume_mean_A3']:.2f} Å^3"))
        if "polarization_final_uC_cm2" in res:
            p = res["polarization_final_uC_cm2"]
            rows.append(("ΔP at the end", f"({p[0]:.2f}, {p[1]:.2f}, {p[2]:.2f}) μC/cm²"))
            rows.append(("field work", f"{res['field_work_final_eV']:.4f} eV"))
        if self.loop:
            u = self.loop["unit_field"]
            ec = [self.loop["coercive_field_descending"], self.loop["coercive_field_ascending"]]
            pr = [self.loop["remanent_polarization_descending"], self.loop["remanent_polarization_ascending"]]
            fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            rows.append(("coercive field (desc., asc.)", f"{fmt(ec[0], '.3g')}, {fmt(ec[1], '.3g')} {u}"))
            rows.append(("remanent P (desc., asc.)", f"{fmt(pr[0], '.3g')}, {fmt(pr[1], '.3g')} μC/cm²"))
        rows.append(("speed", f"{res['ns_per_day']:.3g} ns/day, {res['atom_steps_per_s']:.4g} atom-steps/s"))
        return rows

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``md.json`` (and ``pe_loop.json``) to ``directory`` (the trajectory is written as it runs)."""
        folder = RunFolder(directory, "md")
        folder.write_json("md.json", self.summary)
        if self.loop is not None:
            folder.write_json("pe_loop.json", self.loop)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "MDResult":
        directory = Path(directory)
        summary = load_summary(directory, "md.json", (), "an MD run (mattersim md)")
        loop_file = directory / "pe_loop.json"
        loop = json.loads(loop_file.read_text()) if loop_file.exists() else None
        return cls(summary, read_series(directory / SERIES), loop, None, directory)


def read_series(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The columns of ``md.csv`` as float arrays (empty cells: NaN)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return {}
    header, data = rows[0], rows[1:]
    return {name: np.array([float(r[k]) if r[k] != "" else np.nan for r in data]) for k, name in enumerate(header)}


# --------------------------------------------------------------------------------------------------
# checks and setup
# --------------------------------------------------------------------------------------------------


def _check(ensemble, thermostat, temperature, pressure, timestep, steps, every, checkpoint_every, friction,
           born_every, tdamp, pdamp) -> None:
    if ensemble not in ENSEMBLES:
        raise InputError(f"ensemble = {ensemble!r}; choose one of {', '.join(ENSEMBLES)}.")
    if thermostat not in THERMOSTATS:
        raise InputError(f"thermostat = {thermostat!r}; choose one of {', '.join(THERMOSTATS)}.")
    if ensemble == "npt" and thermostat == "langevin":
        raise InputError("ensemble npt uses the Martyna-Tobias-Klein integrator with Nosé-Hoover chains; "
                         "--thermostat langevin is available with nvt only.")
    if not (np.isfinite(temperature) and temperature >= 0) or (ensemble != "nve" and temperature <= 0):
        raise InputError(f"temperature = {temperature} K; give a positive temperature (0 K is allowed for nve: "
                         "the atoms start at rest).")
    if not np.isfinite(pressure):
        raise InputError(f"pressure = {pressure} GPa is not a number.")
    if ensemble != "npt" and pressure != 0.0:
        raise InputError(f"pressure = {pressure} GPa needs ensemble npt (the cell is fixed in {ensemble}).")
    if not (np.isfinite(timestep) and 0 < timestep <= 20):
        raise InputError(f"timestep = {timestep} fs; give a positive time step in fs (typically 0.5-2 fs; "
                         "at most 20).")
    if int(steps) != steps or steps < 0:
        raise InputError(f"steps = {steps}; give a whole number >= 0.")
    for name, value in (("every", every), ("checkpoint_every", checkpoint_every), ("born_every", born_every)):
        if int(value) != value or value < 1:
            raise InputError(f"{name} = {value}; give a whole number of steps >= 1.")
    if not (np.isfinite(friction) and friction > 0):
        raise InputError(f"friction = {friction} /fs; give a positive Langevin friction (e.g. 0.01 /fs).")
    for name, value in (("tdamp", tdamp), ("pdamp", pdamp)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise InputError(f"{name} = {value} fs; give a positive time constant in fs.")


def _simulated_cell(atoms: Atoms, supercell) -> tuple[Atoms, np.ndarray | None]:
    """The cell to simulate and the supercell matrix (None: the input cell)."""
    from ase.build import make_supercell

    from mattersim.settings import parse_supercell

    matrix = parse_supercell(supercell, "supercell")
    cell = atoms.copy() if matrix is None else make_supercell(atoms, matrix)
    cell.calc = None
    return cell, matrix


def _fixed_charges(born, unit: Atoms, cell: Atoms, flog) -> np.ndarray | None:
    """Z* of the simulated cell from a BORN file / BornCharges / array for the input cell, or None."""
    if born is None or callable(getattr(born, "predict_dielectric", None)):
        return None
    from workflows.nac import BornCharges, read_born

    if isinstance(born, (str, os.PathLike)):
        z = read_born(Path(born), unit).born
    elif isinstance(born, BornCharges):
        z = born.born
    else:
        z = BornCharges(born, np.eye(3), source="arrays").born
    z = supercell_charges(unit, z, cell)
    total = z.sum(axis=0)
    if np.max(np.abs(total)) > 1e-8:  # the field must not push the whole crystal
        correction = total / len(z)
        z = z - correction
        flog.warning(f"The Born charges sum to {np.round(total, 4).tolist()} e over the cell, not zero; the mean "
                     f"({np.max(np.abs(correction)):.3g} e at most per element) was subtracted from every atom "
                     "(acoustic sum rule), so that the field exerts no net force.")
    return z


def _charges_source(calculator, born, fixed):
    """The predictor of Z* (or the fixed array) and its description."""
    from workflows.nac import find_predictor

    if fixed is not None:
        return fixed, ("BORN file " + str(born)) if isinstance(born, (str, os.PathLike)) else "fixed arrays"
    predictor = born if born is not None else find_predictor(calculator)
    if predictor is None:
        from mattersim.calculator import model_info

        name = model_info(calculator).get("name", type(calculator).__name__)
        raise InputError(f"--efield needs Born effective charges, and the model '{name}' predicts none; use a "
                         "composite that does (e.g. --model sevennet-0+mattersim-dielectric) or give a BORN file "
                         "of the input structure (--born BORN).")
    return predictor, "predicted by the model"


def _make_dynamics(atoms: Atoms, ensemble: str, thermostat: str, temperature: float, pressure: float, dt_fs: float,
                   tdamp: float, pdamp: float, friction: float, rng):
    from ase.md.langevin import Langevin
    from ase.md.nose_hoover_chain import MTKNPT, NoseHooverChainNVT
    from ase.md.verlet import VelocityVerlet

    dt = dt_fs * units.fs
    if ensemble == "nve":
        return VelocityVerlet(atoms, timestep=dt)
    if ensemble == "nvt" and thermostat == "langevin":
        return Langevin(atoms, timestep=dt, temperature_K=temperature, friction=friction / units.fs, fixcm=False,
                        rng=rng)
    if ensemble == "nvt":
        return NoseHooverChainNVT(atoms, timestep=dt, temperature_K=temperature, tdamp=tdamp * units.fs)
    return MTKNPT(atoms, timestep=dt, temperature_K=temperature, pressure_au=pressure * units.GPa,
                  tdamp=tdamp * units.fs, pdamp=pdamp * units.fs)


def _attr(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _set_attr(obj, path: str, value) -> None:
    *head, last = path.split(".")
    for name in head:
        obj = getattr(obj, name)
    setattr(obj, last, np.array(value, dtype=float))


def _dyn_state(dyn) -> dict[str, np.ndarray]:
    return {f"dyn:{p}": np.array(_attr(dyn, p), dtype=float) for p in _DYN_STATE.get(type(dyn).__name__, ())}


def _pressure_GPa(atoms: Atoms, stress_voigt, ekin: float) -> float | None:
    if stress_voigt is None:
        return None
    s = np.asarray(stress_voigt, dtype=float).ravel()
    if s.size == 9:
        s = s.reshape(3, 3)[[0, 1, 2], [0, 1, 2]]
    return float((-np.sum(s[:3]) / 3 + 2.0 * ekin / (3.0 * atoms.get_volume())) / units.GPa)


# --------------------------------------------------------------------------------------------------
# frames
# --------------------------------------------------------------------------------------------------


_NOT_PER_ATOM = {"energies", "field", "dielectric_tensor", "dielectric_tensor_std", "stress", "members"}


def _frame(atoms: Atoms, results: dict, step: int, t_fs: float, extra_info: dict) -> Atoms:
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()
    frame.calc = None
    n = len(atoms)
    known = {k: results[k] for k in ("energy", "free_energy", "forces", "stress") if k in results}
    for key, value in results.items():
        arr = np.asarray(value) if isinstance(value, (np.ndarray, list)) else None
        if key in known or key in _NOT_PER_ATOM or arr is None or arr.ndim == 0 or arr.shape[0] != n:
            continue
        frame.arrays[key] = arr.reshape(n, -1) if arr.ndim > 2 else arr
    if "energies" in results:
        frame.arrays["atomic_energies"] = np.asarray(results["energies"])
    frame.info.update(step=step, time_fs=t_fs, **extra_info)
    frame.calc = SinglePointCalculator(frame, **known)
    return frame


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


def run_md(atoms: Atoms, calculator, *, ensemble: str = "nvt", thermostat: str = "nose-hoover",
           temperature: float = 300.0, pressure: float = 0.0, timestep: float = 1.0, steps: int = 1000,
           supercell=None, seed: int = 0, every: int = 10, checkpoint_every: int = 100,
           tdamp: float | None = None, pdamp: float | None = None, friction: float = 0.01,
           efield: "str | FieldSchedule | None" = None, born=None, born_every: int = 10,
           reference: Atoms | None = None, maps_at: Sequence[float] | None = None, skip_cycles: int = 0,
           keep_velocities: bool = False, output_dir: str | os.PathLike | None = None,
           progress: bool = False) -> MDResult:
    """Molecular dynamics of ``atoms`` (or its ``supercell``) with ``calculator`` (any ASE calculator).

    Settings (units): ``temperature`` K (the thermostat's, and the Maxwell-Boltzmann start unless
    ``keep_velocities``), ``pressure`` GPa (npt), ``timestep`` fs, ``steps``, ``every`` (steps between
    frames and rows of md.csv), ``checkpoint_every`` (steps), ``tdamp``/``pdamp`` fs (default 100 and 1000
    time steps), ``friction`` 1/fs (Langevin), ``seed`` (velocities and Langevin noise).
    Field: ``efield`` (schedule text, :data:`workflows.efield.SCHEDULE_HELP`), ``born`` (None: the
    calculator's Z*; a BORN file path, a :class:`workflows.nac.BornCharges` or (n, 3, 3) array for the
    input cell; or a predictor), ``born_every`` (steps), ``reference`` (a structure with the same atoms,
    e.g. the centrosymmetric phase: P is then measured from it, and local maps use it), ``maps_at`` (times in
    ps of the local polarization maps), ``skip_cycles`` (field cycles left out of the averaged loop).
    """
    started = time.perf_counter()
    tdamp = 100 * timestep if tdamp is None else tdamp
    pdamp = 1000 * timestep if pdamp is None else pdamp
    _check(ensemble, thermostat, temperature, pressure, timestep, steps, every, checkpoint_every, friction,
           born_every, tdamp, pdamp)
    schedule = parse_field(efield)
    RunFolder.check(output_dir)
    if ensemble == "npt" and "stress" not in (getattr(calculator, "implemented_properties", None) or ["stress"]):
        raise InputError("ensemble npt needs the stress, which this calculator does not compute.")
    cell, matrix = _simulated_cell(atoms, supercell)
    if reference is not None:
        if len(reference) != len(atoms) or np.any(reference.numbers != atoms.numbers):
            raise InputError("The reference structure must have the same atoms in the same order as the input.")
        reference = reference_in_supercell(atoms, reference, cell)

    from mattersim.calculator import model_info
    from workflows.cells import structure_record

    info = model_info(calculator)
    integrator = {"nve": "VelocityVerlet", "npt": "MTKNPT"}.get(
        ensemble, "Langevin" if thermostat == "langevin" else "NoseHooverChainNVT")
    settings = {
        "ensemble": ensemble, "thermostat": None if ensemble == "nve" else thermostat, "integrator": integrator,
        "temperature_K": temperature, "pressure_GPa": pressure if ensemble == "npt" else None,
        "timestep_fs": timestep, "steps": int(steps), "supercell": None if matrix is None else matrix.tolist(),
        "seed": int(seed), "every": int(every),
        "checkpoint_every": int(checkpoint_every), "tdamp_fs": tdamp if integrator in _DYN_STATE else None,
        "pdamp_fs": pdamp if ensemble == "npt" else None,
        "friction_per_fs": friction if integrator == "Langevin" else None,
        "keep_velocities": bool(keep_velocities),
        "efield": None if schedule is None else schedule.to_dict(),
        "born_every": int(born_every) if schedule is not None else None,
        "reference": None if reference is None else structure_record(reference),
        "maps_at_ps": None if maps_at is None else [float(t) for t in maps_at], "skip_cycles": int(skip_cycles),
    }
    with RunFolder(output_dir, "md", log) as folder:
        flog = folder.log
        fixed = _fixed_charges(born, atoms, cell, flog) if schedule is not None else None
        charges, charges_text = _charges_source(calculator, born, fixed) if schedule is not None else (None, None)
        if schedule is not None:
            settings["born_source"] = charges_text
        keyed = {k: v for k, v in settings.items() if k not in _RESUMABLE}
        if fixed is not None:  # the charges themselves, not only where they came from
            keyed["fixed_born"] = np.round(fixed, 10).tolist()
        key = run_key(structure_record(atoms), keyed, info)
        state, arrays = _load_checkpoint(folder, key, settings)
        if state is not None and int(state["step"]) > steps:
            raise InputError(f"The run in '{folder.path}' is at step {state['step']} already; give steps >= "
                             f"{state['step']} to continue it (or another output folder).")
        seeds = np.random.SeedSequence(int(seed)).spawn(2)
        rng = np.random.default_rng(seeds[1])
        if state is None:
            if not keep_velocities or not np.any(cell.get_momenta()):
                from ase.md import velocitydistribution as vd

                cell.set_momenta(np.zeros((len(cell), 3)))
                if temperature > 0:
                    if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29
                        vd.thermalize_momenta(cell, temperature, rng=np.random.default_rng(seeds[0]))
                    else:
                        vd.MaxwellBoltzmannDistribution(cell, temperature_K=temperature,
                                                        rng=np.random.default_rng(seeds[0]))
                    vd.Stationary(cell)
        else:
            cell.set_cell(arrays["cell"], scale_atoms=False)
            cell.set_positions(arrays["positions"])
            cell.set_momenta(arrays["momenta"])
            if state.get("rng") is not None:
                rng.bit_generator.state = state["rng"]
        md_calc = calculator if schedule is None else FieldCalculator(calculator, schedule, charges,
                                                                      born_every=born_every)
        if state is not None and schedule is not None:
            md_calc.born, md_calc.born_step = np.array(arrays["born"]), int(state["born_step"])
            md_calc.born_evaluations = int(state.get("born_evaluations", 0))
        cell.calc = md_calc
        dyn = _make_dynamics(cell, ensemble, thermostat, temperature, pressure, timestep, tdamp, pdamp, friction, rng)
        if state is not None:
            for name, value in arrays.items():
                if name.startswith("dyn:"):
                    _set_attr(dyn, name[4:], value)
        step0 = 0 if state is None else int(state["step"])
        run = _Run(folder, cell, dyn, md_calc, schedule, settings, timestep, reference, state, arrays, flog)
        if state is None:
            flog.info(f"MD of {cell.get_chemical_formula()} ({len(cell)} atoms), {integrator}, {temperature:g} K, "
                      f"dt {timestep:g} fs, {steps} steps, model {info.get('name')}"
                      + (f", field {schedule.text} (Z* {charges_text}, every {born_every} steps)" if schedule else ""))
        else:
            flog.info(f"Continuing from the checkpoint at step {step0} (of {steps}).")
        step_wall = float(state.get("wall_s", 0.0)) if state else 0.0
        t_loop = time.perf_counter()
        try:
            run.start(step0)
            with progress_bar(progress and steps > step0, int(steps), "MD") as bar:
                bar.advance(step0)
                for step in range(step0, int(steps)):
                    run.advance(step)
                    done = step + 1
                    if done % every == 0:
                        run.record(done)
                        elapsed = step_wall + time.perf_counter() - t_loop
                        bar.status(f"{(done - step0) * timestep * 1e-6 / max(elapsed, 1e-9) * 86400:.3g} ns/day")
                    if done % checkpoint_every == 0 or done == steps:
                        run.checkpoint(done, step_wall + time.perf_counter() - t_loop, key)
                    bar.advance(1)
        finally:
            run.close()
        wall = step_wall + time.perf_counter() - t_loop
        flog.info(f"Done: {steps} steps; {wall:.1f} s in the loop.")
        result = _finish(folder, run, atoms, info, settings, wall, time.perf_counter() - started, len(cell), maps_at,
                         skip_cycles)
    return result


def checkpoint_step(directory) -> int:
    """The step at which the MD run in ``directory`` was last checkpointed (0 without a readable checkpoint)."""
    try:
        with np.load(Path(directory) / CHECKPOINT, allow_pickle=False) as data:
            return int(json.loads(str(data["state"]))["step"])
    except (OSError, KeyError, ValueError):
        return 0


def _load_checkpoint(folder: RunFolder, key: str, settings: dict) -> tuple[dict | None, dict]:
    path = folder.path / CHECKPOINT if folder.path is not None else None
    if path is None or not path.exists():
        return None, {}
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.array(data[k]) for k in data.files}
        state = json.loads(str(arrays.pop("state")))
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint cannot be continued
        raise InputError(f"The checkpoint '{path}' cannot be read ({exc}); delete it to start the run again.") from None
    if state.get("key") != key:
        old = state.get("settings", {})
        differ = sorted(k for k in set(old) | set(settings) if k not in _RESUMABLE and old.get(k) != settings.get(k))
        raise InputError(f"'{folder.path}' holds an MD run with other inputs (it differs in: "
                         f"{', '.join(differ) or 'the structure, the model or the Born charges'}); choose another "
                         "output folder, or "
                         f"delete {CHECKPOINT} there to start again.")
    return state, arrays


class _Run:
    """The bookkeeping of one run: field accounting, rows, frames, checkpoints (internal)."""

    def __init__(self, folder, atoms, dyn, calc, schedule, settings, dt_fs, reference, state, arrays, flog):
        self.folder, self.atoms, self.dyn, self.calc, self.schedule = folder, atoms, dyn, calc, schedule
        self.settings, self.dt, self.reference, self.log = settings, dt_fs, reference, flog
        self.tracker: PolarizationTracker | None = None
        self.cells: PerovskiteCells | None = None
        self.local: list[np.ndarray] = []
        self.local_times: list[float] = []
        self.state, self.arrays = state, arrays
        self.conserved_kind = {"VelocityVerlet": "ekin+epot", "Langevin": None}.get(settings["integrator"],
                                                                                   "integrator")
        self.traj = self.csv = self.local_fh = None

    # -- files
    def _open(self, name: str, size: int | None, binary: bool = False):
        path = self.folder.file(name) if self.folder.path is not None else None
        if path is None:
            return None
        text = {} if binary else {"newline": ""}
        if size is None or not path.exists():
            return open(path, "wb" if binary else "w", **text)
        with open(path, "r+b") as fh:  # cut back to the checkpoint: what follows is recomputed identically
            fh.truncate(size)
        return open(path, "ab" if binary else "a", **text)

    def start(self, step0: int) -> None:
        st = self.state
        self.traj = self._open(TRAJECTORY, None if st is None else st["traj_bytes"])
        self.csv = self._open(SERIES, None if st is None else st["csv_bytes"])
        self.header = ["step", "time_ps", "temperature_K", "epot_eV", "ekin_eV", "etot_eV", "conserved_eV",
                       "pressure_GPa", "volume_A3"]
        if self.schedule is not None:
            u = self.schedule.unit
            self.header += [f"E_x_{u}", f"E_y_{u}", f"E_z_{u}", "field_work_eV", "P_x_uC_cm2", "P_y_uC_cm2",
                            "P_z_uC_cm2", "born_step"]
        if self.csv is not None and st is None:
            csv.writer(self.csv).writerow(self.header)
        if self.schedule is not None:
            self.calc.set_time(step0, step0 * self.dt)
            self.atoms.get_forces()
            if st is None:
                self.tracker = PolarizationTracker.start(self.atoms, self.calc.results["born_effective_charges"],
                                                         self.calc.results["field_forces"], self.reference)
            else:
                self.tracker = PolarizationTracker.from_state(self.arrays)
            try:
                self.cells = PerovskiteCells(self.reference if self.reference is not None else self.atoms)
            except InputError as exc:
                if self.settings.get("maps_at_ps"):
                    raise
                self.log.info(f"No local polarization maps: {exc}")
            if self.cells is not None:  # appended frame by frame, cut back to the checkpoint on a restart
                self.local_fh = self._open(LOCAL_RAW, None if st is None else int(st.get("local_bytes") or 0),
                                           binary=True)
        if st is None:
            self.record(0)

    def advance(self, step: int) -> None:
        if self.schedule is not None:
            self.calc.set_time(step, step * self.dt)
            self.atoms.get_forces()  # at the current positions with E(t_step): cached, or once after a restart
            self.calc.set_time(step + 1, (step + 1) * self.dt)
        self.dyn.step()
        if self.tracker is not None:
            self.atoms.get_forces()
            self.tracker.advance(self.atoms, self.calc.results["born_effective_charges"],
                                 self.calc.results["field_forces"])

    def conserved(self, epot: float, ekin: float) -> float | None:
        work = self.tracker.work if self.tracker is not None else 0.0
        if self.conserved_kind is None:
            return None
        if self.conserved_kind == "ekin+epot":
            return epot + ekin - work
        from ase.calculators.calculator import PropertyNotImplementedError

        try:
            return float(self.dyn.get_conserved_energy()) - work
        except PropertyNotImplementedError:  # ASE asks for the free energy, which e.g. CHGNet does not give
            dyn = self.dyn
            extra = dyn._thermostat.get_thermostat_energy()
            if hasattr(dyn, "_barostat"):
                extra += (dyn._barostat.get_barostat_energy() + dyn._get_cell_kinetic_energy()
                          + dyn._pressure_au * dyn._get_volume())
            return epot + ekin + float(extra) - work

    def record(self, step: int) -> None:
        atoms = self.atoms
        epot = float(atoms.get_potential_energy())
        ekin = float(atoms.get_kinetic_energy())
        results = dict(atoms.calc.results)
        stress = results.get("stress")
        t_fs = step * self.dt
        conserved = self.conserved(epot, ekin)
        pressure = _pressure_GPa(atoms, stress, ekin)
        row = [step, t_fs / 1000.0, atoms.get_temperature(), epot, ekin, epot + ekin,
               "" if conserved is None else conserved, "" if pressure is None else pressure, atoms.get_volume()]
        extra: dict[str, Any] = {}
        if self.schedule is not None:
            efield = self.schedule.field(t_fs)
            pol = self.tracker.polarization_uC_cm2
            row += [*(efield / FIELD_UNITS[self.schedule.unit.lower()]).tolist(), self.tracker.work, *pol.tolist(),
                    self.calc.born_step]
            extra = {"efield_V_per_A": efield.tolist(), "polarization_uC_cm2": pol.tolist(),
                     "field_work_eV": self.tracker.work}
            if self.cells is not None:
                local = self.cells.local(self.tracker.displacement(atoms.cell.array),
                                         self.calc.results["born_effective_charges"], atoms.get_volume())
                if self.local_fh is not None:
                    self.local_fh.write(np.concatenate([[t_fs / 1000.0], local.ravel()]).astype("<f8").tobytes())
                    self.local_fh.flush()
                else:
                    self.local.append(local)
                    self.local_times.append(t_fs / 1000.0)
        if self.csv is not None:
            csv.writer(self.csv).writerow(row)
            self.csv.flush()
        if self.traj is not None:
            from ase.io import write

            buf = io.StringIO()
            write(buf, _frame(atoms, results, step, t_fs, extra), format="extxyz")
            self.traj.write(buf.getvalue())
            self.traj.flush()

    def checkpoint(self, step: int, wall: float, key: str) -> None:
        if self.folder.path is None:
            return
        atoms = self.atoms
        state = {"key": key, "step": step, "settings": self.settings, "wall_s": wall,
                 "traj_bytes": self.traj.tell(), "csv_bytes": self.csv.tell(),
                 "rng": self.dyn.rng.bit_generator.state if self.settings["integrator"] == "Langevin" else None}
        arrays = {"positions": atoms.get_positions(), "cell": atoms.cell.array, "momenta": atoms.get_momenta(),
                  **_dyn_state(self.dyn)}
        if self.tracker is not None:
            state.update(born_step=self.calc.born_step, born_evaluations=self.calc.born_evaluations)
            arrays.update(born=self.calc.born, **self.tracker.state())
            state["local_bytes"] = self.local_fh.tell() if self.local_fh is not None else None
        from mattersim.io import to_builtin

        arrays["state"] = np.array(json.dumps(to_builtin(state)))
        with atomic_path(self.folder.path / CHECKPOINT) as tmp:
            np.savez(tmp, **arrays)
        self.folder.record([CHECKPOINT])

    def close(self) -> None:
        for fh in (self.traj, self.csv, self.local_fh):
            if fh is not None:
                fh.close()

    def local_frames(self) -> tuple[np.ndarray, np.ndarray]:
        """Times (ps) and local polarizations (frames, N_B, 3) μC/cm² of the whole run."""
        if self.cells is None:
            return np.zeros(0), np.zeros((0, 0, 3))
        n_b = len(self.cells.b_index)
        if self.folder.path is not None and (self.folder.path / LOCAL_RAW).exists():
            data = np.fromfile(self.folder.path / LOCAL_RAW, dtype="<f8").reshape(-1, 1 + 3 * n_b)
            return data[:, 0], data[:, 1:].reshape(-1, n_b, 3)
        return np.array(self.local_times), np.array(self.local).reshape(-1, n_b, 3)


# --------------------------------------------------------------------------------------------------
# summary and plots
# --------------------------------------------------------------------------------------------------


def _drift(t_ps: np.ndarray, values: np.ndarray, natoms: int) -> float | None:
    ok = np.isfinite(values)
    if ok.sum() < 3:
        return None
    slope = np.polyfit(t_ps[ok], values[ok], 1)[0]
    return float(slope / natoms * 1000.0)


def _finish(folder: RunFolder, run: _Run, input_atoms: Atoms, info: dict, settings: dict, wall: float, total: float, natoms: int,
            maps_at, skip_cycles: int) -> MDResult:
    from workflows.cells import structure_record

    atoms = run.atoms
    series = read_series(folder.path / SERIES) if folder.path is not None else {}
    steps_done = int(settings["steps"])
    t_ps = series.get("time_ps", np.zeros(0))
    res: dict[str, Any] = {"steps_done": steps_done, "time_ps": steps_done * settings["timestep_fs"] / 1000.0}
    if len(t_ps):
        def stat(name):
            v = series[name][np.isfinite(series[name])]
            return (float(v.mean()), float(v.std())) if len(v) else (None, None)

        res["temperature_mean_K"], res["temperature_std_K"] = stat("temperature_K")
        res["epot_mean_eV"], _ = stat("epot_eV")
        res["pressure_mean_GPa"], res["pressure_std_GPa"] = stat("pressure_GPa")
        res["volume_mean_A3"], _ = stat("volume_A3")
        res["conserved_drift_meV_per_atom_per_ps"] = _drift(t_ps, series["conserved_eV"], natoms)
        c = series["conserved_eV"][np.isfinite(series["conserved_eV"])]
        res["conserved_std_meV_per_atom"] = float(c.std() / natoms * 1000) if len(c) else None
    else:
        res.update(temperature_mean_K=float(atoms.get_temperature()), temperature_std_K=0.0,
                   epot_mean_eV=float(atoms.get_potential_energy()), volume_mean_A3=float(atoms.get_volume()))
    res["wall_s"] = wall
    res["ns_per_day"] = steps_done * settings["timestep_fs"] * 1e-6 / max(wall, 1e-9) * 86400 if steps_done else 0.0
    res["atom_steps_per_s"] = steps_done * natoms / max(wall, 1e-9) if steps_done else 0.0
    if run.conserved_kind is None:
        res["conserved_note"] = "Langevin dynamics has no conserved quantity; conserved_eV is empty"
    loop = None
    if run.schedule is not None:
        res["polarization_final_uC_cm2"] = run.tracker.polarization_uC_cm2.tolist()
        res["field_work_final_eV"] = run.tracker.work
        res["born_evaluations"] = run.calc.born_evaluations
        res["note"] = ("Forces include e Z*^T E; the potential energy is the model's. Predicted Z* are not the "
                       "derivative of any energy: the field's work W is tracked, and conserved_eV is the "
                       "integrator's conserved quantity minus W. The field does not change the stress.")
        if len(t_ps):
            axis = np.asarray(run.schedule.axis)
            p_axis = np.stack([series[f"P_{c}_uC_cm2"] for c in "xyz"], axis=1) @ axis
            loop = pe_loop(t_ps * 1000.0, p_axis, run.schedule, skip_cycles=skip_cycles)
            if loop is not None:
                res["pe_loop"] = {k: loop[k] for k in ("coercive_field_descending", "coercive_field_ascending",
                                                       "coercive_field_mean", "coercive_asymmetry",
                                                       "remanent_polarization_descending",
                                                       "remanent_polarization_ascending", "remanent_asymmetry",
                                                       "switched", "cycles_used", "unit_field")}
    local_times, local = run.local_frames()  # read once: the npz and the maps
    files_png = _plots(folder, run, series, loop, maps_at, local_times, local)
    timings = {"md_loop_s": wall, "total_s": total}
    units_doc = {"time": "fs (md.csv: ps)", "temperature": "K", "energy": "eV", "pressure": "GPa",
                 "volume": "Å^3", "polarization": "μC/cm²", "field": "V/Å in the trajectory, the schedule's unit "
                 "in md.csv and pe_loop.json"}
    summary = {**summary_header("md", WORKFLOW_VERSION, info, settings, units_doc, timings, None),
               "structure": {"formula": atoms.get_chemical_formula(), "natoms": natoms,
                             "input": structure_record(input_atoms)},
               "results": res}
    if loop is not None:
        folder.write_json("pe_loop.json", loop)
    if len(local_times) and folder.path is not None:
        def write_local(tmp):
            np.savez(tmp, time_ps=local_times, polarization_uC_cm2=local,
                     b_positions=(atoms if run.reference is None else run.reference).positions[run.cells.b_index],
                     b_index=run.cells.b_index)
        folder.write_with("local_polarization.npz", write_local)
    folder.record(files_png)
    if folder.path is not None and (folder.path / CHECKPOINT).exists():
        folder.record([CHECKPOINT])
    summary["files"] = folder.files + (["md.json"] if folder.path is not None else [])
    folder.write_json("md.json", summary)
    return MDResult(summary, series, loop, atoms, folder.path)


def _plots(folder: RunFolder, run: _Run, series: dict, loop: dict | None, maps_at, local_times: np.ndarray,
           local: np.ndarray) -> list[str]:
    if folder.path is None or not len(series.get("time_ps", [])):
        return []
    t = series["time_ps"]
    n = len(run.atoms)
    out = ["md.png"]

    def draw_md(axes):
        axes[0, 0].plot(t, series["temperature_K"])
        axes[0, 0].set_ylabel("T (K)")
        e0 = series["epot_eV"][0]
        axes[0, 1].plot(t, (series["epot_eV"] - e0) / n * 1000, label="E_pot")
        if np.any(np.isfinite(series["conserved_eV"])):
            c = series["conserved_eV"]
            axes[0, 1].plot(t, (c - c[np.isfinite(c)][0]) / n * 1000, label="conserved")
        axes[0, 1].set_ylabel("ΔE (meV/atom)")
        axes[0, 1].legend()
        if np.any(np.isfinite(series["pressure_GPa"])):
            axes[1, 0].plot(t, series["pressure_GPa"])
        axes[1, 0].set_ylabel("P (GPa)")
        axes[1, 1].plot(t, series["volume_A3"])
        axes[1, 1].set_ylabel("V (Å³)")
        for ax in axes[1]:
            ax.set_xlabel("t (ps)")

    figure(folder.path / "md.png", f"MD of {run.atoms.get_chemical_formula()}", draw_md, shape=(2, 2),
           figsize=(9, 6.5))
    if run.schedule is None:
        return out
    u = run.schedule.unit
    axis = np.asarray(run.schedule.axis)
    e_axis = np.stack([series[f"E_{c}_{u}"] for c in "xyz"], axis=1) @ axis
    p_axis = np.stack([series[f"P_{c}_uC_cm2"] for c in "xyz"], axis=1) @ axis

    def draw_pol(axes):
        axes[0].plot(t, e_axis)
        axes[0].set_ylabel(f"E ({u})")
        for k, c in enumerate("xyz"):
            axes[1].plot(t, series[f"P_{c}_uC_cm2"], label=f"P_{c}")
        axes[1].set_ylabel("ΔP (μC/cm²)")
        axes[1].legend()
        axes[2].plot(t, series["temperature_K"])
        axes[2].set_ylabel("T (K)")
        axes[2].set_xlabel("t (ps)")

    figure(folder.path / "polarization.png", "Field, polarization and temperature", draw_pol, shape=(3, 1),
           figsize=(7, 7.5))
    out.append("polarization.png")
    if loop is not None:
        def draw_loop(ax):
            ax.plot(e_axis, p_axis, color="0.8", lw=0.6, label="all samples")
            f, m, s = (np.array(loop[k]) for k in ("field", "polarization_mean", "polarization_std"))
            falling = np.gradient(f) < 0
            for branch in (falling, ~falling):  # one band per branch (fill_between needs one y per x)
                ax.fill_between(f[branch], (m - s)[branch], (m + s)[branch], alpha=0.3, color="C0", lw=0)
            ax.plot(np.r_[f, f[:1]], np.r_[m, m[:1]], color="C0", label=f"mean of {len(loop['cycles_used'])} cycles")
            for key in ("coercive_field_descending", "coercive_field_ascending"):
                if loop[key] is not None:
                    ax.plot([loop[key]], [0.0], "kx")
            ax.axhline(0, color="k", lw=0.5)
            ax.axvline(0, color="k", lw=0.5)
            ax.set_xlabel(f"E along the field axis ({u})")
            ax.set_ylabel("P along the field axis (μC/cm²)")
            ax.legend()

        figure(folder.path / "pe_loop.png", "P-E loop", draw_loop)
        out.append("pe_loop.png")
    if len(local_times):
        out.append(_map_plot(folder.path / "local_polarization.png", run, maps_at, local_times, local))
    return out


def _map_plot(path: Path, run: _Run, maps_at, times: np.ndarray, local: np.ndarray) -> str:
    wanted = np.linspace(times[0], times[-1], 4) if not maps_at else np.asarray(maps_at, dtype=float)
    picks = sorted({int(np.argmin(np.abs(times - w))) for w in wanted})
    ref = run.reference if run.reference is not None else run.atoms
    pos = ref.positions[run.cells.b_index]
    axis = np.asarray(run.schedule.axis)
    v_axis = int(np.argmax(np.abs(axis)))
    h_axis = (v_axis + 1) % 3 if v_axis != 0 else 1
    depth = 3 - v_axis - h_axis
    layer = np.abs(pos[:, depth] - pos[:, depth].min()) < 0.5
    vmax = max(float(np.abs(local[:, :, v_axis]).max()), 1e-9)
    arrow = max(float(np.linalg.norm(local[:, :, [h_axis, v_axis]], axis=2).max()), 1e-9)
    spacing = (ref.get_volume() / len(run.cells.b_index)) ** (1 / 3)

    def draw(axes):
        axes = np.asarray(axes).ravel()
        for ax, k in zip(axes, picks):
            pv = local[k][layer]
            quiv = ax.quiver(pos[layer, h_axis], pos[layer, v_axis], pv[:, h_axis], pv[:, v_axis], pv[:, v_axis],
                             cmap="coolwarm", clim=(-vmax, vmax), pivot="middle", angles="xy", scale_units="xy",
                             scale=arrow / (0.8 * spacing))  # the longest arrow: 0.8 of a cell
            ax.set_title(f"t = {times[k]:.3g} ps", fontsize=9)
            ax.set_xlim(pos[layer, h_axis].min() - spacing, pos[layer, h_axis].max() + spacing)
            ax.set_ylim(pos[layer, v_axis].min() - spacing, pos[layer, v_axis].max() + spacing)
            ax.set_aspect("equal")
            ax.set_xlabel(f"{'xyz'[h_axis]} (Å)")
        axes[0].set_ylabel(f"{'xyz'[v_axis]} (Å)")
        axes[-1].figure.colorbar(quiv, ax=axes[-1], label=f"P_{'xyz'[v_axis]} (μC/cm²)")

    figure(path, f"Local polarization, {run.cells.b_symbol}-centred cells (layer {'xyz'[depth]} = min)", draw,
           shape=(1, len(picks)), figsize=(3.2 * len(picks) + 1, 3.6), squeeze=False)
    return path.name
