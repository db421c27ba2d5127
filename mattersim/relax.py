"""Structure relaxation: one structure with :func:`relax`, many together with :class:`BatchRelaxer`.

Both use ASE's optimizers (FIRE, BFGS, LBFGS) and, for cell relaxations, ASE's ``FrechetCellFilter``
with a hydrostatic target pressure, so the results are the ones an ASE user would get:

* ``mode="full"``: positions and cell, minimising the enthalpy ``E + P V``;
* ``mode="fixed_volume"``: positions and cell shape at constant volume;
* ``mode="fixed_cell"``: positions only.

:class:`BatchRelaxer` runs one ASE optimizer per structure in lockstep and evaluates all active
structures with a single :func:`mattersim.calculator.evaluate_batch` call per optimisation step (one
batched model call for a MatterSim calculator). Converged or exhausted structures leave the batch and
queued ones enter, keeping the batch below ``max_atoms_per_batch`` atoms. Apart from batching, each
structure follows exactly the trajectory :func:`relax` would give it.

Non-convergence is never silent: ``RelaxResult.converged`` is False and a warning is logged through
:mod:`logging` (logger ``mattersim.relax``).

Units: energies eV, forces eV/Å, stress eV/Å^3 (ASE sign: positive = tensile), pressures GPa, volumes Å^3.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress
from ase.units import GPa

from mattersim.calculator import evaluate_batch
from mattersim.errors import InputError
from mattersim.symmetry import fix_symmetry

__all__ = ["MODES", "OPTIMIZERS", "BatchRelaxer", "RelaxResult", "internal_curvatures", "normalise_mode", "relax",
           "start_hessian", "unstable_modes"]

logger = logging.getLogger("mattersim.relax")

MODES = ("full", "fixed_cell", "fixed_volume")
OPTIMIZERS = ("FIRE", "BFGS", "LBFGS")


# ---------------------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RelaxResult:
    """Outcome of one relaxation.

    ``pressure`` is the pressure of the final structure, ``-trace(stress)/3`` in GPa (None without a
    stress); ``target_pressure`` the requested one. ``enthalpy = energy + target_pressure * volume``
    (eV; equals ``energy`` for non-periodic structures). ``fmax`` is the optimizer's convergence measure
    at the end (largest atomic force, including the scaled cell forces for cell relaxations), eV/Å.
    """

    atoms: Atoms
    converged: bool
    steps: int
    energy: float
    enthalpy: float
    fmax: float
    stress: np.ndarray | None
    pressure: float | None
    target_pressure: float = 0.0
    volume: float | None = None
    initial_volume: float | None = None
    initial_energy: float | None = None
    mode: str = "full"
    fmax_target: float | None = None
    label: str | None = None
    #: why the relaxation stopped early (non-finite model output, or the optimizer broke down), else None;
    #: ``converged`` is False and the structure is the last one evaluated
    error: str | None = None

    def to_dict(self, *, include_structure: bool = False) -> dict[str, Any]:
        """JSON-serialisable summary (stress as a 3x3 nested list)."""
        n = len(self.atoms)
        d: dict[str, Any] = {
            "label": self.label,
            "formula": self.atoms.get_chemical_formula(mode="hill", empirical=False),
            "n_atoms": n,
            "mode": self.mode,
            "converged": bool(self.converged),
            "steps": int(self.steps),
            "energy": float(self.energy),
            "energy_per_atom": float(self.energy) / n,
            "initial_energy": None if self.initial_energy is None else float(self.initial_energy),
            "enthalpy": float(self.enthalpy),
            "fmax": float(self.fmax),
            "fmax_target": self.fmax_target,
            "stress": None if self.stress is None else np.asarray(self.stress, dtype=float).tolist(),
            "pressure": self.pressure,
            "target_pressure": float(self.target_pressure),
            "initial_volume": self.initial_volume,
            "volume": self.volume,
            "error": self.error,
        }
        if include_structure:
            d["cell"] = np.asarray(self.atoms.cell[:], dtype=float).tolist()
            d["pbc"] = np.asarray(self.atoms.pbc, dtype=bool).tolist()
            d["numbers"] = [int(z) for z in self.atoms.numbers]
            d["positions"] = np.asarray(self.atoms.positions, dtype=float).tolist()
        return d


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def normalise_mode(mode: str) -> str:
    m = str(mode).strip().lower().replace("-", "_")
    if m not in MODES:
        raise InputError(f"Unknown relaxation mode {mode!r}; use one of full, fixed-cell, fixed-volume.")
    return m


def _optimizer_class(name: str):
    from ase.optimize import BFGS, FIRE, LBFGS

    table = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS}
    key = str(name).strip().upper()
    if key not in table:
        raise InputError(f"Unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}.")
    return table[key]


def _check_settings(fmax: float, steps: int, pressure: float) -> None:
    if not (isinstance(fmax, (int, float)) and math.isfinite(fmax) and fmax > 0):
        raise InputError(f"fmax must be a positive number of eV/Å, got {fmax!r}.")
    if int(steps) != steps or steps < 0:
        raise InputError(f"steps must be a non-negative integer, got {steps!r}.")
    if not math.isfinite(pressure):
        raise InputError(f"pressure must be a finite number of GPa, got {pressure!r}.")


def _check_structure(atoms: Atoms, mode: str, label: str | None) -> None:
    if mode != "fixed_cell" and not np.asarray(atoms.pbc).all():
        where = f"Structure {label!r}" if label else "The structure"
        raise InputError(
            f"{where} is not periodic in all three directions, so its cell cannot be relaxed; "
            "use mode fixed-cell (positions only)."
        )


def _wants_stress(atoms: Atoms) -> bool:
    return bool(np.asarray(atoms.pbc).all())


def _make_optimizable(atoms: Atoms, mode: str, pressure: float):
    if mode == "fixed_cell":
        return atoms
    from ase.filters import FrechetCellFilter

    return FrechetCellFilter(atoms, scalar_pressure=pressure * GPa, constant_volume=(mode == "fixed_volume"))


def _gradient_fmax(optimizable) -> float:
    forces = np.asarray(optimizable.get_forces()).reshape(-1, 3)
    if len(forces) == 0:
        return 0.0
    return float(np.sqrt((forces**2).sum(axis=1).max()))


def _evaluate_batch(calc, structures, properties=("energy", "forces", "stress")) -> list[dict]:
    """One batched evaluation of all active structures (a module-level name, so tests can count calls)."""
    return evaluate_batch(calc, structures, properties=tuple(properties))


def _final_result(
    atoms: Atoms,
    optimizable,
    *,
    converged: bool,
    steps: int,
    mode: str,
    pressure: float,
    fmax_target: float,
    initial_volume: float | None,
    initial_energy: float | None,
    label: str | None,
    error: str | None = None,
) -> RelaxResult:
    energy = float(atoms.get_potential_energy())
    forces = np.array(atoms.get_forces(), dtype=float)
    stress = None
    if _wants_stress(atoms):
        try:
            stress = np.array(atoms.get_stress(voigt=False), dtype=float)
        except Exception:  # calculator without stress (fixed-cell relaxations only)
            stress = None
    fmax_reached = _gradient_fmax(optimizable)
    volume = float(atoms.get_volume()) if _wants_stress(atoms) else None
    enthalpy = energy + (pressure * GPa * volume if volume is not None else 0.0)
    final_pressure = None if stress is None else float(-np.trace(stress) / 3.0 / GPa)

    relaxed = atoms.copy()
    relaxed.calc = None
    spc_results: dict[str, Any] = {"energy": energy, "forces": forces}
    if stress is not None:
        spc_results["stress"] = full_3x3_to_voigt_6_stress(stress)
    relaxed.calc = SinglePointCalculator(relaxed, **spc_results)
    if label is not None:
        relaxed.info["label"] = label

    if not converged and error is None:
        what = f"Structure {label!r}" if label else "The structure"
        logger.warning(
            "%s did not converge within %d steps (fmax %.4g eV/Å > %.4g eV/Å); its result is not a minimum.",
            what,
            steps,
            fmax_reached,
            fmax_target,
        )
    return RelaxResult(
        atoms=relaxed,
        converged=bool(converged),
        steps=int(steps),
        energy=energy,
        enthalpy=float(enthalpy),
        fmax=fmax_reached,
        stress=stress,
        pressure=final_pressure,
        target_pressure=float(pressure),
        volume=volume,
        initial_volume=initial_volume,
        initial_energy=initial_energy,
        mode=mode,
        fmax_target=float(fmax_target),
        label=label,
        error=error,
    )


#: a force beyond this (eV/Å) is not physics but a model that has left its data (measured: SevenNet-0 on
#: LaH10 at 200 GPa reached 5e28 eV/Å after 500 BFGS steps); the relaxation stops there
DIVERGED_FORCE = 1e4


def _model_failure(results: dict) -> str:
    """What is wrong with the model's ``results``: 'non-finite X' for the first of energy, forces, stress
    that holds a NaN or infinity, or 'forces beyond 1e4 eV/Å (diverged)' (:data:`DIVERGED_FORCE`); '' if
    nothing."""
    for name in ("energy", "forces", "stress"):
        value = results.get(name)
        if value is not None and not np.isfinite(np.asarray(value, dtype=float)).all():
            return f"non-finite {name}"
    forces = results.get("forces")
    if forces is not None and np.abs(np.asarray(forces, dtype=float)).max(initial=0.0) > DIVERGED_FORCE:
        return f"forces beyond {DIVERGED_FORCE:g} eV/Å (diverged)"
    return ""


# ---------------------------------------------------------------------------------------------------------
# single structure
# ---------------------------------------------------------------------------------------------------------


def relax(
    atoms: Atoms,
    calculator,
    *,
    pressure: float = 0.0,
    fmax: float = 0.02,
    steps: int = 500,
    mode: str = "full",
    optimizer: str = "FIRE",
    trajectory: str | os.PathLike | None = None,
    logfile: str | os.PathLike | None = None,
    label: str | None = None,
    symmetry: bool = False,
    symprec: float = 1e-5,
) -> RelaxResult:
    """Relax one structure with an ASE optimizer; the input ``atoms`` is left untouched.

    Parameters
    ----------
    atoms, calculator:
        The structure and any ASE calculator (e.g. :class:`mattersim.calculator.MatterSimCalculator`).
    pressure:
        Hydrostatic target pressure in GPa (``mode="full"``).
    fmax:
        Convergence threshold on the largest force in eV/Å (for cell modes ASE's ``FrechetCellFilter``
        criterion, which includes the cell forces).
    steps:
        Maximum number of optimizer steps.
    mode:
        ``"full"``, ``"fixed_cell"`` or ``"fixed_volume"`` (hyphens accepted).
    optimizer:
        ``"FIRE"``, ``"BFGS"`` or ``"LBFGS"``.
    trajectory, logfile:
        Passed to the ASE optimizer (``logfile="-"`` logs to stdout).
    symmetry, symprec:
        Keep the space group (found by spglib with tolerance ``symprec`` Å) during the relaxation, with
        ASE's ``FixSymmetry`` constraint on positions and cell (built from one spglib analysis,
        :func:`mattersim.symmetry.fix_symmetry`): what a phonon calculation on the
        crystal's own primitive cell needs (a tiny symmetry-breaking drift of a free relaxation would
        make that primitive cell inexact).
    """
    mode = normalise_mode(mode)
    opt_cls = _optimizer_class(optimizer)
    _check_settings(fmax, steps, pressure)
    label = label if label is not None else atoms.info.get("label")
    _check_structure(atoms, mode, label)

    work = atoms.copy()
    work.calc = calculator
    if symmetry:
        work.set_constraint(fix_symmetry(work, symprec=symprec))
    initial_volume = float(work.get_volume()) if _wants_stress(work) else None
    optimizable = _make_optimizable(work, mode, pressure)
    with opt_cls(optimizable, logfile=logfile, trajectory=None if trajectory is None else str(trajectory)) as opt, \
            warnings.catch_warnings():
        # FrechetCellFilter's matrix logarithm warns at ~1e-13 accuracy on every step; harmless
        warnings.filterwarnings("ignore", message="logm result may be inaccurate", category=RuntimeWarning)
        # calculators that convert to pymatgen (CHGNet) say they drop FixSymmetry: it acts in ASE, not there
        warnings.filterwarnings("ignore", message="Only FixAtoms and FixCartesian is supported by Pymatgen")
        initial_energy = float(work.get_potential_energy())
        converged = bool(opt.run(fmax=fmax, steps=int(steps)))
        nsteps = int(opt.nsteps)
    if symmetry:
        work.set_constraint()
    return _final_result(
        work,
        optimizable,
        converged=converged,
        steps=nsteps,
        mode=mode,
        pressure=pressure,
        fmax_target=fmax,
        initial_volume=initial_volume,
        initial_energy=initial_energy,
        label=label,
    )


# ---------------------------------------------------------------------------------------------------------
# batched relaxation
# ---------------------------------------------------------------------------------------------------------


#: BFGS's own starting curvature (eV/Å²), given to the rigid translations of a starting Hessian
BFGS_ALPHA = 70.0
#: a curvature below this (eV/Å²) in a Hessian of the ions is an unstable mode, not finite-difference noise
#: (float32 forces displaced by 0.01 Å: about 1e-3 eV/Å²)
UNSTABLE_CURVATURE = -0.01
#: smallest curvature (eV/Å²) kept in a starting Hessian: a softer or unstable mode (negative curvature) gets
#: this, so that the first step along it stays bounded; BFGS then learns the true curvature from its steps
#: (on two MP structures with soft modes 0.5 took 4-5x fewer steps than plain BFGS; 0.1 overshot)
HESSIAN_FLOOR = 0.5


def _ion_modes(hessian) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(w, u, t)`` of a Hessian of the ions (3N x 3N, made symmetric): its curvatures ``w`` (ascending) and
    modes ``u`` (columns, orthonormal) over the 3N - 3 motions other than the rigid translations ``t``
    (3N x 3, orthonormal)."""
    h = np.asarray(hessian, dtype=float)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.shape[0] % 3 or not np.all(np.isfinite(h)):
        raise InputError(f"A Hessian of the ions must be a finite 3N x 3N matrix, not of shape {h.shape}.")
    n = h.shape[0] // 3
    t = np.zeros((3 * n, 3))
    for a in range(3):
        t[a::3, a] = 1.0 / np.sqrt(n)
    q = np.linalg.svd(t, full_matrices=True)[0][:, 3:]
    w, v = np.linalg.eigh(q.T @ (0.5 * (h + h.T)) @ q)
    return w, q @ v, t


def internal_curvatures(hessian) -> np.ndarray:
    """The eigenvalues (eV/Å², ascending) of a Hessian of the ions (3N x 3N) over their 3N - 3 motions other
    than the rigid translations; a negative one is an unstable mode."""
    return _ion_modes(hessian)[0]


def _unstable(w: np.ndarray, u: np.ndarray) -> np.ndarray:
    return u[:, w < UNSTABLE_CURVATURE].T


def unstable_modes(hessian) -> np.ndarray:
    """The unstable modes of a Hessian of the ions: its eigenvectors (rows, 3N, unit length, orthogonal to the
    rigid translations) whose curvature is below :data:`UNSTABLE_CURVATURE`, most unstable first."""
    return _unstable(*_ion_modes(hessian)[:2])


def _start(w: np.ndarray, u: np.ndarray, t: np.ndarray) -> np.ndarray:
    return (u * np.maximum(np.abs(w), HESSIAN_FLOOR)) @ u.T + BFGS_ALPHA * (t @ t.T)


def start_hessian(hessian) -> np.ndarray:
    """A Hessian of the ions (3N x 3N, eV/Å²) turned into a starting point for BFGS: made symmetric, the
    three rigid translations (zero curvature in a periodic crystal) given BFGS's own 70 eV/Å², every other
    eigenvalue replaced by its magnitude, at least :data:`HESSIAN_FLOOR`."""
    return _start(*_ion_modes(hessian))


class _CachedResultsCalculator(Calculator):
    """Serves precomputed results for the exact atoms they were computed for.

    :meth:`store` records results together with a copy of the atoms; ASE's ``check_state`` compares
    positions, cell, pbc and numbers exactly, so any other geometry triggers :meth:`calculate`, which
    evaluates the real calculator for this one structure.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, real_calculator, properties: Sequence[str]):
        super().__init__()
        self.real_calculator = real_calculator
        self.properties = tuple(properties)
        self.n_fallback_calls = 0

    def store(self, atoms: Atoms, result: dict[str, Any]) -> None:
        self.reset()
        self.atoms = atoms.copy()
        self.results = self._convert(result)

    @staticmethod
    def _convert(result: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        energy = float(result["energy"])
        out["energy"] = energy
        out["free_energy"] = float(result.get("free_energy", energy))
        if result.get("forces") is not None:
            out["forces"] = np.array(result["forces"], dtype=float).reshape(-1, 3)
        stress = result.get("stress")
        if stress is not None:
            stress = np.array(stress, dtype=float)
            out["stress"] = full_3x3_to_voigt_6_stress(stress.reshape(3, 3)) if stress.size == 9 else stress.reshape(6)
        return out

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.n_fallback_calls += 1
        (result,) = _evaluate_batch(self.real_calculator, [self.atoms.copy()], self.properties)
        self.results = self._convert(result)


def _call_log(opt) -> None:
    """Call ``opt.log`` across ASE versions (``log(gradient)`` in ASE >= 3.25, ``log(forces=None)`` before)."""
    params = inspect.signature(opt.log).parameters
    if "gradient" in params:
        opt.log(opt.optimizable.get_gradient())
    else:
        opt.log()


def _is_converged(opt) -> bool:
    if hasattr(opt, "gradient_converged") and hasattr(opt.optimizable, "get_gradient"):
        return bool(opt.gradient_converged(opt.optimizable.get_gradient()))
    return bool(opt.converged())


@dataclass
class _Job:
    index: int
    label: str | None
    atoms: Atoms
    optimizable: Any = None
    opt: Any = None
    cache: _CachedResultsCalculator | None = None
    initial_volume: float | None = None
    initial_energy: float | None = None
    properties: tuple = field(default_factory=tuple)
    held: list = field(default_factory=list)  # the FixedMode constraints of held unstable modes


class BatchRelaxer:
    """Relax many structures together, one batched model evaluation per optimisation step.

    Parameters are those of :func:`relax`; ``max_atoms_per_batch`` bounds the number of atoms evaluated
    together (a larger structure runs alone). ``show_progress`` shows a rich progress bar (on stderr)
    over finished structures. ``hessian`` (BFGS at fixed cell; structures with the same atoms in the same
    order, e.g. strained copies of one crystal): the ions' Hessian (3N x 3N, eV/Å²), or a function that
    returns it (or None: BFGS starts as usual), called only if some structure is not converged at its
    start; BFGS starts from it (made positive, :func:`start_hessian`) instead of 70 eV/Å² times the
    identity, so the first step is a Newton step: ionic relaxations near a known minimum take a few steps
    instead of tens. With ``hold_unstable`` (default) the Hessian's unstable modes (:func:`unstable_modes`)
    are held: the ions do not move along them (ASE's ``FixedMode``; the results carry no constraint), so
    structures at a saddle (a crystal kept at a symmetry its model does not favour) relax in their stable
    directions in a few steps instead of sliding, for hundreds of steps, to wherever the unstable ones lead.

    Example
    -------
    >>> relaxer = BatchRelaxer(calc, fmax=0.02, steps=500, pressure=0.0, mode="full")
    >>> results = relaxer.relax(list_of_atoms)       # list[RelaxResult], input order
    """

    def __init__(
        self,
        calculator,
        *,
        fmax: float = 0.02,
        steps: int = 500,
        pressure: float = 0.0,
        mode: str = "full",
        optimizer: str = "FIRE",
        max_atoms_per_batch: int = 1024,
        show_progress: bool = False,
        symmetry: bool = False,
        symprec: float = 1e-5,
        hessian: Any = None,
        hold_unstable: bool = True,
    ):
        self.calculator = calculator
        #: keep each structure's space group (ASE's ``FixSymmetry``, as :func:`relax` with ``symmetry=True``)
        self.symmetry = bool(symmetry)
        self.symprec = float(symprec)
        self.mode = normalise_mode(mode)
        self.optimizer_class = _optimizer_class(optimizer)
        self.optimizer = str(optimizer).upper()
        if hessian is not None and (self.optimizer != "BFGS" or self.mode != "fixed_cell"):
            raise InputError("A starting Hessian is for BFGS at fixed cell (the ions' 3N coordinates); "
                             f"here the optimizer is {self.optimizer} and the mode {self.mode}.")
        #: the ions' Hessian (3N x 3N, eV/Å²) that BFGS starts from instead of 70 eV/Å² times the identity, or
        #: a function returning it, called once, only when a structure needs a step
        self.hessian = hessian
        self.hold_unstable = bool(hold_unstable)
        self._start_hessian: Any = None  # the start once computed; False when the function returned None
        self._held: list = []  # the unstable modes held (rows of 3N)
        _check_settings(fmax, steps, pressure)
        if int(max_atoms_per_batch) < 1:
            raise InputError(f"max_atoms_per_batch must be at least 1, got {max_atoms_per_batch!r}.")
        self.fmax = float(fmax)
        self.steps = int(steps)
        self.pressure = float(pressure)
        self.max_atoms_per_batch = int(max_atoms_per_batch)
        self.show_progress = bool(show_progress)
        #: number of batched evaluation calls made by the last :meth:`relax`
        self.n_batch_calls = 0

    # -- public -------------------------------------------------------------------------------------------

    def relax(
        self,
        structures: Sequence[Atoms | tuple[str, Atoms]],
        trajectory_dir: str | os.PathLike | None = None,
    ) -> list[RelaxResult]:
        """Relax ``structures`` (Atoms, or ``(label, Atoms)`` pairs); results come back in input order.

        With ``trajectory_dir``, each structure's ASE trajectory is written to
        ``trajectory_dir/<index>_<label>.traj``.
        """
        from mattersim.io import safe_filename

        jobs: list[_Job] = []
        for i, item in enumerate(structures):
            if isinstance(item, Atoms):
                label, atoms = item.info.get("label"), item
            else:
                label, atoms = item
            _check_structure(atoms, self.mode, label)
            jobs.append(_Job(index=i, label=None if label is None else str(label), atoms=atoms))

        traj_dir = None
        if trajectory_dir is not None:
            traj_dir = Path(trajectory_dir)
            traj_dir.mkdir(parents=True, exist_ok=True)
        taken: set[str] = set()

        results: list[RelaxResult | None] = [None] * len(jobs)
        queue = list(jobs)
        active: list[_Job] = []
        self.n_batch_calls = 0

        progress = None
        task = None
        if self.show_progress and jobs:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            progress = Progress(
                TextColumn("relaxing"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            progress.start()
            task = progress.add_task("relax", total=len(jobs))

        try:
            while queue or active:
                # admit queued structures while the batch has room (at least one always runs)
                entering: list[_Job] = []
                n_active_atoms = sum(len(j.atoms) for j in active)
                while queue and (not active and not entering or n_active_atoms + len(queue[0].atoms) <= self.max_atoms_per_batch):
                    job = queue.pop(0)
                    traj = None
                    if traj_dir is not None:
                        name = safe_filename(f"{job.index:04d}_{job.label or 'structure'}", taken)
                        traj = str(traj_dir / f"{name}.traj")
                    self._start(job, traj)
                    entering.append(job)
                    n_active_atoms += len(job.atoms)

                # one step for the running ones (entering ones are evaluated at their start geometry); an
                # optimizer that breaks down (BFGS on forces from a model far outside its data) ends that
                # relaxation alone, at the last evaluated structure
                stepped = []
                for job in active:
                    if self.hessian is not None and job.opt.nsteps == 0:
                        start = self._hessian_for(job)
                        if start is not None:
                            job.opt.H0 = start  # BFGS reads H0 at its first step only
                            if self._held:
                                from ase.constraints import FixedMode

                                job.held = [FixedMode(m) for m in self._held]
                                job.atoms.set_constraint([*job.atoms.constraints, *job.held])
                    try:
                        job.opt.step()
                    except (ArithmeticError, ValueError, np.linalg.LinAlgError) as exc:
                        job.atoms.set_cell(job.cache.atoms.cell[:])
                        job.atoms.positions = job.cache.atoms.positions
                        results[job.index] = self._finish(job, False, error=f"optimizer failed: {type(exc).__name__}: {exc}")
                        if progress is not None:
                            progress.advance(task)
                        continue
                    job.opt.nsteps += 1
                    stepped.append(job)
                batch = stepped + entering
                self._evaluate(batch)

                still_active = []
                for job in batch:
                    bad = _model_failure(job.cache.results)
                    if bad:
                        results[job.index] = self._finish(job, False, error=f"{bad} from the model")
                        if progress is not None:
                            progress.advance(task)
                        continue
                    opt = job.opt
                    if job in entering:
                        if opt.nsteps == 0:
                            _call_log(opt)
                            opt.call_observers()
                    else:
                        _call_log(opt)
                        opt.call_observers()
                    converged = _is_converged(opt)
                    if converged or opt.nsteps >= opt.max_steps:
                        results[job.index] = self._finish(job, converged)
                        if progress is not None:
                            progress.advance(task)
                    else:
                        still_active.append(job)
                active = still_active
        finally:
            for job in jobs:
                if job.opt is not None:
                    try:
                        job.opt.close()
                    except Exception:  # pragma: no cover
                        pass
            if progress is not None:
                progress.stop()
        return [r for r in results if r is not None]

    # -- internals ----------------------------------------------------------------------------------------

    def _start(self, job: _Job, trajectory: str | None) -> None:
        work = job.atoms.copy()
        if self.symmetry:
            work.set_constraint(fix_symmetry(work, symprec=self.symprec))
        job.properties = ("energy", "forces", "stress") if (self.mode != "fixed_cell" or _wants_stress(work)) else ("energy", "forces")
        job.cache = _CachedResultsCalculator(self.calculator, job.properties)
        work.calc = job.cache
        job.atoms = work
        job.initial_volume = float(work.get_volume()) if _wants_stress(work) else None
        job.optimizable = _make_optimizable(work, self.mode, self.pressure)
        job.opt = self.optimizer_class(job.optimizable, logfile=None, trajectory=trajectory)
        job.opt.fmax = self.fmax
        job.opt.max_steps = job.opt.nsteps + self.steps

    def _evaluate(self, batch: list[_Job]) -> None:
        if not batch:
            return
        # one call per distinct property set (normally exactly one)
        groups: dict[tuple, list[_Job]] = {}
        for job in batch:
            groups.setdefault(job.properties, []).append(job)
        for props, group in groups.items():
            copies = [j.atoms.copy() for j in group]
            for c in copies:
                c.calc = None
                c.set_constraint()  # constraints act in ASE on the results; the model sees the bare structure
            out = _evaluate_batch(self.calculator, copies, props)
            self.n_batch_calls += 1
            if len(out) != len(group):
                raise RuntimeError(f"evaluate_batch returned {len(out)} results for {len(group)} structures")
            for job, result in zip(group, out):
                job.cache.store(job.atoms, result)
                if job.initial_energy is None:
                    job.initial_energy = float(result["energy"])

    def _hessian_for(self, job: _Job) -> np.ndarray | None:
        """The starting Hessian for ``job`` (None: the function gave none, BFGS starts as it always does)."""
        if self._start_hessian is None:
            raw = self.hessian() if callable(self.hessian) else self.hessian
            if raw is None:
                self._start_hessian = False
            else:  # one eigendecomposition for the start and the held modes
                w, u, t = _ion_modes(raw)
                self._start_hessian = _start(w, u, t)
                self._held = list(_unstable(w, u)) if self.hold_unstable else []
        if self._start_hessian is False:
            return None
        if self._start_hessian.shape != (3 * len(job.atoms),) * 2:
            raise InputError(f"The starting Hessian is {self._start_hessian.shape[0]} x {self._start_hessian.shape[1]}, "
                             f"but structure {job.label or job.index} has {len(job.atoms)} atoms (3N = {3 * len(job.atoms)}).")
        return self._start_hessian.copy()

    def _finish(self, job: _Job, converged: bool, error: str | None = None) -> RelaxResult:
        if self.symmetry:
            job.atoms.set_constraint()  # as relax(): the result carries no constraint
        if error is not None:
            logger.warning("Structure %r: relaxation stopped after %d steps, %s.", job.label, job.opt.nsteps, error)
        result = _final_result(
            job.atoms,
            job.optimizable,
            converged=converged,
            steps=int(job.opt.nsteps),
            mode=self.mode,
            pressure=self.pressure,
            fmax_target=self.fmax,
            initial_volume=job.initial_volume,
            initial_energy=job.initial_energy,
            label=job.label,
            error=error,
        )
        if job.held:  # held unstable modes (appended last): the forces and fmax are those it converged on
            for atoms in (job.atoms, result.atoms):
                atoms.set_constraint(list(atoms.constraints)[:-len(job.held)])
        return result
