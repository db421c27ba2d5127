"""Relaxation as a workflow: :func:`run_relax` relaxes many structures together and writes what
``mattersim relax`` writes, for Python users too.

The relaxations themselves are :class:`mattersim.relax.BatchRelaxer`'s (ASE optimizers in lockstep, one
batched model call per step); this module adds the run folder (:mod:`workflows.outputs`):

- ``structures/<name>.vasp`` (or ``.cif``; ``.xyz`` for molecules): each relaxed structure;
- ``relaxed.extxyz``: all relaxed structures with their final energy, forces and stress, ``converged``,
  ``relax_steps`` and ``enthalpy`` in each frame's info (``ase.io.read(path, ":")``);
- ``summary.json``: the summary header (workflow, versions, model, settings, units, timings, files) and one
  record per structure (label, file, formula, converged, steps, energy, enthalpy, fmax, volumes, pressure);
- ``relax.log``; ``trajectories/<name>.traj`` with ``trajectory=True``.

:class:`RelaxRunResult` holds the per-structure :class:`mattersim.relax.RelaxResult` objects and the summary;
``RelaxRunResult.load(folder)`` reopens a finished run (structures from ``relaxed.extxyz``).

Units: energies and enthalpies eV, volumes Å^3, pressures GPa, stress eV/Å^3 (ASE sign), fmax eV/Å.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ase import Atoms

from mattersim.calculator import model_info
from mattersim.errors import InputError
from mattersim.io import safe_filename, write_results
from mattersim.relax import BatchRelaxer, RelaxResult, normalise_mode
from workflows.outputs import RunFolder, load_summary, summary_header

__all__ = ["RelaxRunResult", "run_relax", "label_stem"]

logger = logging.getLogger("mattersim.relax")

WORKFLOW_VERSION = 1
UNITS = {"energy": "eV", "enthalpy": "eV", "volume": "Å^3", "pressure": "GPa", "stress": "eV/Å^3 (ASE sign)",
         "fmax": "eV/Å"}
FORMATS = ("poscar", "cif")


def label_stem(label: str) -> str:
    """``dir/al.cif`` -> ``al``; ``dir/many.extxyz@3`` -> ``many_3``; ``dir/POSCAR`` -> ``POSCAR``."""
    path, sep, frame = str(label).rpartition("@")
    if not (sep and frame.isdigit()):
        path, frame = str(label), ""
    stem = Path(path).stem or Path(path).name or "structure"
    return f"{stem}_{frame}" if frame else stem


@dataclass
class RelaxRunResult:
    """A finished :func:`run_relax`: ``results`` (one :class:`mattersim.relax.RelaxResult` per structure, in
    input order), ``labels``, ``summary`` (the content of ``summary.json``), ``output_dir``."""

    results: list[RelaxResult]
    labels: list[str]
    summary: dict
    output_dir: Path | None = None
    files: list[str] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return all(r.converged for r in self.results)

    @property
    def not_converged(self) -> list[str]:
        return [label for label, r in zip(self.labels, self.results) if not r.converged]

    def save(self, directory: str | os.PathLike, structure_format: str = "poscar") -> Path:
        """Write the structures, ``relaxed.extxyz`` and ``summary.json`` to ``directory``."""
        with RunFolder(directory, "relax", logger) as folder:
            _write(folder, self, structure_format)
        self.output_dir = Path(directory)
        return self.output_dir

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "RelaxRunResult":
        """Reopen a finished run from its ``summary.json`` and ``relaxed.extxyz``."""
        import ase.io
        import numpy as np

        directory = Path(directory)
        summary = load_summary(directory, "summary.json", ["relaxed.extxyz"], "run_relax / 'mattersim relax'")
        frames_path = directory / "relaxed.extxyz"
        frames = ase.io.read(frames_path, ":")
        entries = summary.get("structures") or []
        if len(frames) != len(entries):
            raise InputError(f"'{frames_path}' holds {len(frames)} structures but its summary.json lists "
                             f"{len(entries)}; the folder mixes two runs - rerun the relaxation.")
        results = []
        for atoms, e in zip(frames, entries):
            stress = atoms.calc.results.get("stress") if atoms.calc is not None else None
            results.append(RelaxResult(
                atoms=atoms, converged=bool(e["converged"]), steps=int(e["steps"]), energy=float(e["energy"]),
                enthalpy=float(e["enthalpy"]), fmax=float(e["fmax"]),
                stress=None if stress is None else np.asarray(stress), pressure=e.get("pressure"),
                target_pressure=float(e.get("target_pressure", 0.0)), volume=e.get("volume"),
                initial_volume=e.get("initial_volume"), initial_energy=e.get("initial_energy"),
                mode=e.get("mode", "full"), fmax_target=e.get("fmax_target"), label=e.get("label")))
        return cls(results=results, labels=[e.get("label") for e in entries], summary=summary,
                   output_dir=directory, files=list(summary.get("files") or []))

    def rows(self) -> list[dict[str, Any]]:
        """One dict per structure with the values ``mattersim relax`` prints (label, formula, converged, steps,
        energy, enthalpy, volume, volume change in %, pressure)."""
        out = []
        for label, e in zip(self.labels, self.summary["structures"]):
            v, v0 = e.get("volume"), e.get("initial_volume")
            out.append({"label": label, "formula": e["formula"], "converged": bool(e["converged"]),
                        "steps": int(e["steps"]), "energy": e["energy"], "enthalpy": e["enthalpy"], "volume": v,
                        "volume_change_percent": None if v is None or not v0 else 100.0 * (v / v0 - 1.0),
                        "pressure": e.get("pressure")})
        return out


def _as_labelled(structures: Any) -> list[tuple[str, Atoms]]:
    if isinstance(structures, Atoms):
        structures = [structures]
    out = []
    for k, item in enumerate(structures):
        if isinstance(item, Atoms):
            label = str(item.info.get("label") or item.info.get("name") or f"structure_{k}")
            out.append((label, item))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], Atoms):
            out.append((str(item[0]), item[1]))
        else:
            raise InputError(f"structure {k} is a {type(item).__name__}; pass ase.Atoms objects or (label, Atoms) pairs.")
    if not out:
        raise InputError("No structures to relax; pass at least one ase.Atoms.")
    return out


def _structure_file(folder: RunFolder, name: str, atoms: Atoms, structure_format: str) -> str:
    import ase.io
    import numpy as np

    periodic = bool(np.asarray(atoms.pbc).all())
    fname = f"structures/{name}." + ("vasp" if periodic and structure_format == "poscar" else "cif" if periodic else "xyz")
    fmt = {"vasp": dict(format="vasp", direct=True, sort=False), "cif": dict(format="cif"), "xyz": dict(format="xyz")}
    kwargs = fmt[fname.rsplit(".", 1)[1]]
    folder.write_with(fname, lambda tmp: ase.io.write(tmp, atoms, **kwargs))
    return fname


def _write(folder: RunFolder, run: RelaxRunResult, structure_format: str) -> None:
    """The structure files, relaxed.extxyz and summary.json of ``run`` into ``folder``."""
    taken: set[str] = set()
    for entry, label, res in zip(run.summary["structures"], run.labels, run.results):
        entry["file"] = _structure_file(folder, safe_filename(label_stem(label), taken), res.atoms, structure_format)
    final, frames = [], []
    for res in run.results:
        r = {"energy": res.energy, "forces": res.atoms.get_forces()}
        if res.stress is not None:
            r["stress"] = res.stress
        final.append(r)
        a = res.atoms.copy()
        a.info.update({"converged": bool(res.converged), "relax_steps": int(res.steps), "enthalpy": float(res.enthalpy)})
        frames.append(a)
    if folder.path is not None:
        write_results(folder.file("relaxed.extxyz"), frames, final, run.summary.get("model"), labels=run.labels)
    folder.file("summary.json")
    run.summary["files"] = folder.files
    folder.write_json("summary.json", run.summary)
    run.files = folder.files


def run_relax(structures: Any, calculator, *, pressure: float = 0.0, fmax: float = 0.02, steps: int = 500,
              mode: str = "full", optimizer: str = "FIRE", max_atoms_per_batch: int = 1024,
              trajectory: bool = False, structure_format: str = "poscar",
              output_dir: str | os.PathLike | None = None, progress: bool = False) -> RelaxRunResult:
    """Relax ``structures`` (one ``ase.Atoms``, a list of them, or ``(label, Atoms)`` pairs) with
    ``calculator``, all together through :class:`mattersim.relax.BatchRelaxer`.

    ``mode``: ``full`` (positions and cell at ``pressure`` GPa), ``fixed_cell`` (positions only) or
    ``fixed_volume`` (``fixed-cell`` / ``fixed-volume`` accepted); ``fmax`` eV/Å (cell forces included),
    at most ``steps`` steps of ``optimizer`` (FIRE, BFGS, LBFGS); ``max_atoms_per_batch`` atoms per model
    call. With ``output_dir`` the files of the module docstring are written there (``structure_format``:
    ``poscar`` or ``cif`` for the periodic ones; ``trajectory=True`` adds ``trajectories/``). Non-converged
    structures are reported (``RelaxRunResult.not_converged``, the log, ``summary.json``), never hidden.
    """
    labelled = _as_labelled(structures)
    mode_name = normalise_mode(mode)
    if structure_format not in FORMATS:
        raise InputError(f"structure_format must be one of {', '.join(FORMATS)}, not {structure_format!r}.")
    RunFolder.check(output_dir)
    relaxer = BatchRelaxer(calculator, fmax=fmax, steps=steps, pressure=pressure, mode=mode_name, optimizer=optimizer,
                           max_atoms_per_batch=max_atoms_per_batch, show_progress=progress)
    info = model_info(calculator)
    settings = {"mode": mode_name, "pressure_GPa": float(pressure), "fmax": float(fmax), "steps": int(steps),
                "optimizer": str(optimizer), "max_atoms_per_batch": int(max_atoms_per_batch)}
    with RunFolder(output_dir, "relax", logger) as folder:
        folder.log.info(f"run_relax: {len(labelled)} structures, model {info.get('name')}, mode {mode_name}, "
                        f"P = {pressure} GPa, fmax {fmax} eV/Å, at most {steps} {optimizer} steps")
        t0 = time.perf_counter()
        traj_dir = folder.path / "trajectories" if trajectory and folder.path is not None else None
        results = relaxer.relax(labelled, trajectory_dir=traj_dir)
        elapsed = time.perf_counter() - t0
        if traj_dir is not None:
            folder.record(f"trajectories/{p.name}" for p in traj_dir.glob("*"))
        labels = [label for label, _ in labelled]
        entries = []
        for label, res in zip(labels, results):
            d = res.to_dict()
            d["label"] = label
            entries.append(d)
            (folder.log.info if res.converged else folder.log.warning)(
                f"{label}: {'converged' if res.converged else 'NOT converged'} after {res.steps} steps, "
                f"E = {res.energy:.6f} eV, fmax {res.fmax:.4g} eV/Å")
        n_conv = sum(bool(e["converged"]) for e in entries)
        summary = {**summary_header("relax", WORKFLOW_VERSION, info, settings, UNITS, {"total": elapsed}),
                   "n_structures": len(entries), "n_converged": n_conv, "structures": entries}
        run = RelaxRunResult(results=list(results), labels=labels, summary=summary,
                             output_dir=folder.path)
        _write(folder, run, structure_format)
        folder.log.info(f"done in {elapsed:.1f} s: {n_conv} of {len(entries)} converged")
    return run
