"""Active learning: explore with an ensemble, label what it is unsure of, fine-tune, repeat.

One round of :func:`run_active_learning`:

1. **Explore** from the seed structures with the ensemble's mean potential: Langevin MD (NVT) or, when a
   pressure is set, Berendsen NPT, over a grid of temperatures (K) and pressures (GPa), sampling a frame
   every ``sample_every`` steps (``explore="md"``); or random rattles and strains (``explore="rattle"``).
2. **Score** every candidate by the ensemble force uncertainty
   ``max_a (1/N) sum_i (|F_ia| - |mean F_a|)^2`` in (eV/Å)^2 (:func:`mattersim.ensemble.force_uncertainty`).
3. **Label** the candidates above ``threshold`` (the most uncertain first, at most
   ``max_labels_per_round``) with any ASE calculator: energy, forces and, for periodic cells, stress.
4. **Fine-tune** every member on all data so far (:func:`mattersim.training.fit`, each member with its own
   seed, so that the ensemble stays diverse).

It stops when no candidate is above the threshold (converged) or after ``max_rounds``. Everything is saved
under ``output``: ``labelled.extxyz`` (the labelled structures), ``round_<k>/member_<i>.pth`` (the members
after round k), ``active_learning.json`` (per round: candidates, uncertainties, labelled count, held-out
errors) and ``active_learning.log``. Rerunning with the same output folder resumes after the last complete
round.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from ase import Atoms, units

from mattersim.calculator import MatterSimCalculator, evaluate_batch
from mattersim.ensemble import EnsembleCalculator
from mattersim.errors import InputError
from mattersim.io import RunLog, atomic_path, atomic_write_json, progress_bar


@dataclass
class ActiveLearningConfig:
    """Settings of :func:`run_active_learning` (units: K, GPa, fs, Å, (eV/Å)^2)."""

    threshold: float = 0.01  # force uncertainty above which a candidate is labelled, (eV/Å)^2
    max_rounds: int = 5
    explore: str = "md"  # "md" or "rattle"
    temperatures: Sequence[float] = (300.0, 900.0)
    pressures: Sequence[float] = (0.0,)
    md_steps: int = 100
    timestep: float = 2.0
    sample_every: int = 10
    rattle_stdev: float = 0.05  # Å
    rattle_strain: float = 0.02  # maximum random strain component
    candidates_per_seed: int = 10  # rattle mode
    max_labels_per_round: int = 20
    seed: int = 0
    finetune: dict = field(default_factory=lambda: {"epochs": 20})  # mattersim.training config overrides

    def check(self) -> None:
        if self.explore not in ("md", "rattle"):
            raise InputError(f"active learning: explore must be 'md' or 'rattle', not {self.explore!r}.")
        if not self.threshold > 0:
            raise InputError(f"active learning: threshold must be a positive force uncertainty in (eV/Å)^2, "
                             f"got {self.threshold!r}.")
        for name in ("max_rounds", "md_steps", "sample_every", "max_labels_per_round", "candidates_per_seed"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"active learning: {name} must be at least 1, got {getattr(self, name)!r}.")


@dataclass
class ActiveLearningResult:
    rounds: list[dict]
    converged: bool
    members: list[Path]
    labelled: int
    wall_time: float


def _ensemble(models: Sequence[Any], dtype: str) -> EnsembleCalculator:
    from mattersim.potential import Potential

    return EnsembleCalculator([MatterSimCalculator(Potential(m, dtype=dtype)) for m in models], name="al-ensemble")


def _explore_md(seeds: Sequence[Atoms], calc, cfg: ActiveLearningConfig, rng: np.random.Generator) -> list[Atoms]:
    from ase.md import velocitydistribution
    from ase.md.langevin import Langevin
    from ase.md.nptberendsen import NPTBerendsen

    # ASE >= 3.29 renamed MaxwellBoltzmannDistribution to thermalize_momenta
    thermalize = getattr(velocitydistribution, "thermalize_momenta", None) or \
        velocitydistribution.MaxwellBoltzmannDistribution
    frames: list[Atoms] = []
    for k, seed_atoms in enumerate(seeds):
        if len(seed_atoms) < 2:
            raise InputError(f"active learning: seed structure {k} has {len(seed_atoms)} atom; MD exploration "
                             "needs at least 2 (its centre of mass is fixed): give a supercell, e.g. atoms * 2.")
        for temperature in cfg.temperatures:
            for pressure in cfg.pressures:
                atoms = seed_atoms.copy()
                atoms.calc = calc
                state = np.random.RandomState(int(rng.integers(2**31)))
                thermalize(atoms, temperature_K=temperature, rng=state)
                if pressure and atoms.pbc.all():
                    dyn = NPTBerendsen(atoms, timestep=cfg.timestep * units.fs, temperature_K=temperature,
                                       pressure_au=pressure * units.GPa, taut=100 * units.fs,
                                       taup=500 * units.fs, compressibility_au=1e-2 / units.GPa)
                else:
                    dyn = Langevin(atoms, timestep=cfg.timestep * units.fs, temperature_K=temperature,
                                   friction=0.02, rng=state, fixcm=False)  # drift is harmless here
                for _ in range(cfg.md_steps // cfg.sample_every):
                    dyn.run(cfg.sample_every)
                    frame = atoms.copy()
                    frame.calc = None
                    frame.info.update({"explore_T": float(temperature), "explore_P": float(pressure)})
                    frames.append(frame)
    return frames


def _explore_rattle(seeds: Sequence[Atoms], cfg: ActiveLearningConfig, rng: np.random.Generator) -> list[Atoms]:
    frames = []
    for seed_atoms in seeds:
        for _ in range(cfg.candidates_per_seed):
            atoms = seed_atoms.copy()
            atoms.calc = None
            if atoms.pbc.all() and cfg.rattle_strain > 0:
                strain = rng.uniform(-cfg.rattle_strain, cfg.rattle_strain, (3, 3))
                atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
            atoms.positions += rng.normal(0.0, cfg.rattle_stdev, atoms.positions.shape)
            frames.append(atoms)
    return frames


def _label_one(labeller, atoms: Atoms) -> dict:
    """One structure's labels (a Dask task: a DFT calculation is worth a worker)."""
    (res,) = evaluate_batch(labeller, [atoms])
    return res


def label_structures(structures: Sequence[Atoms], labeller, *, runner=None, spec=None) -> list[Atoms]:
    """Copies of ``structures`` carrying the labeller's energy, forces and (periodic cells) stress as a
    single-point calculator, ready for :func:`ase.io.write` (extxyz) and for training. With ``runner``
    (:class:`mattersim.distributed.TaskRunner` on Dask) and ``spec`` (the labeller each worker builds,
    e.g. ``ModelSpec(factory="mypackage.dft:make_calculator")``), one task per structure there; a
    structure whose labelling failed is an error naming it."""
    from ase.calculators.singlepoint import SinglePointCalculator

    if runner is not None and runner.distributed:
        with runner.started():
            done = runner.run(_label_one, list(structures), spec=spec, description="labelling")
        bad = [f"structure {r.index} ({structures[r.index].get_chemical_formula()}): {r.error['type']}: "
               f"{r.error['message'][:200]}" for r in done if not r.ok]
        if bad:
            raise InputError("Labelling failed on Dask: " + "; ".join(bad))
        results = [r.value for r in done]
    else:
        results = evaluate_batch(labeller, structures)
    out = []
    for atoms, res in zip(structures, results):
        frame = atoms.copy()
        values = {"energy": res["energy"], "forces": res["forces"]}
        if "stress" in res:
            values["stress"] = np.asarray(res["stress"]).reshape(3, 3)
        frame.calc = SinglePointCalculator(frame, **values)
        out.append(frame)
    return out


def holdout_errors(calc, holdout: Sequence[Atoms]) -> dict[str, float]:
    """Energy MAE (eV/atom) and force MAE (eV/Å, components) of ``calc`` on labelled structures."""
    preds = evaluate_batch(calc, holdout)
    e_err = [abs(p["energy"] - a.get_potential_energy()) / len(a) for p, a in zip(preds, holdout)]
    f_err = np.concatenate([np.abs(p["forces"] - a.get_forces()).ravel() for p, a in zip(preds, holdout)])
    return {"energy_mae": float(np.mean(e_err)), "force_mae": float(np.mean(f_err))}


def _samples(frames: Sequence[Atoms]):
    from mattersim.data import Sample

    samples = []
    for k, atoms in enumerate(frames):
        labels = {"energy": float(atoms.get_potential_energy()), "forces": np.array(atoms.get_forces())}
        if "stress" in atoms.calc.results:
            labels["stress"] = np.asarray(atoms.get_stress(voigt=False))
        bare = atoms.copy()
        bare.calc = None
        samples.append(Sample(atoms=bare, labels=labels, source=f"active learning frame {k}"))
    return samples


def _read_state(output: Path, n_members: int) -> tuple[list[dict], list[Atoms], list[Path] | None]:
    import ase.io

    summary = output / "active_learning.json"
    if not summary.is_file():
        return [], [], None
    rounds = json.loads(summary.read_text()).get("rounds", [])
    labelled_file = output / "labelled.extxyz"
    labelled = list(ase.io.read(labelled_file, index=":")) if labelled_file.is_file() else []
    if not rounds:
        return [], labelled, None
    last = output / f"round_{rounds[-1]['round']}"
    paths = [last / f"member_{i}.pth" for i in range(n_members)]
    if not all(p.is_file() for p in paths):
        raise InputError(f"{output}: active_learning.json lists round {rounds[-1]['round']} but its member "
                         f"checkpoints are missing in {last}; remove the output folder to start again.")
    return rounds, labelled, paths


def run_active_learning(
    members: Sequence[Any],
    seeds: Sequence[Atoms],
    labeller,
    output: str | Path,
    *,
    config: ActiveLearningConfig | None = None,
    train: Sequence[Atoms] = (),
    holdout: Sequence[Atoms] | None = None,
    dtype: str = "float32",
    progress: bool = True,
    runner=None,
    labeller_spec=None,
) -> ActiveLearningResult:
    """Run active learning (see the module docstring) and return its per-round record.

    ``members``: at least two :class:`~mattersim.multitask.MultiTaskModel` (e.g. trained with different
    seeds); ``seeds``: starting structures; ``labeller``: any ASE calculator (DFT, or EMT in tests);
    ``train``: labelled structures the members were trained on (kept in every fine-tuning set);
    ``holdout``: labelled structures never trained on, to record the error after each round.
    ``runner``/``labeller_spec``: label on Dask, one structure per task (:func:`label_structures`).
    """
    import ase.io

    from mattersim.checkpoint import load_model, save_model
    from mattersim.training import fit

    cfg = config or ActiveLearningConfig()
    cfg.check()
    if len(members) < 2:
        raise InputError(f"active learning needs an ensemble of at least two members; got {len(members)}.")
    if not seeds:
        raise InputError("active learning needs at least one seed structure to explore from.")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    members = list(members)
    rounds, labelled, paths = _read_state(output, len(members))
    if paths is not None:
        members = [load_model(p)[0] for p in paths]
    log = RunLog(output / "active_learning.log")
    if rounds:
        log.info(f"resuming after round {rounds[-1]['round']} with {len(labelled)} labelled structures")
    converged = bool(rounds and rounds[-1]["labelled"] == 0)
    rng = np.random.default_rng(cfg.seed + len(rounds))
    try:
        with progress_bar(progress, cfg.max_rounds, "active learning") as bar:
            bar.advance(len(rounds))
            while not converged and len(rounds) < cfg.max_rounds:
                k = len(rounds) + 1
                ens = _ensemble(members, dtype)
                record: dict[str, Any] = {"round": k}
                if holdout:
                    record["holdout_before"] = holdout_errors(ens, holdout)
                if cfg.explore == "md":
                    candidates = _explore_md(seeds, ens, cfg, rng)
                else:
                    candidates = _explore_rattle(seeds, cfg, rng)
                scores = np.array([r["force_uncertainty"] for r in ens.calculate_batch(candidates)])
                above = np.flatnonzero(scores > cfg.threshold)
                chosen = above[np.argsort(-scores[above])][: cfg.max_labels_per_round]
                record.update({
                    "candidates": len(candidates),
                    "above_threshold": int(above.size),
                    "uncertainty_max": float(scores.max()),
                    "uncertainty_mean": float(scores.mean()),
                    "labelled": int(chosen.size),
                })
                log.info(f"round {k}: {len(candidates)} candidates, {above.size} above {cfg.threshold} "
                         f"(max {scores.max():.4g}, mean {scores.mean():.4g}); labelling {chosen.size}")
                if chosen.size == 0:
                    converged = True
                else:
                    labelled = labelled + label_structures([candidates[i] for i in chosen], labeller, runner=runner,
                                                           spec=labeller_spec)
                    with atomic_path(output / "labelled.extxyz") as tmp:
                        ase.io.write(tmp, labelled, format="extxyz")
                    data = _samples(list(train) + labelled)
                    folder = output / f"round_{k}"
                    folder.mkdir(exist_ok=True)
                    for i, model in enumerate(members):
                        settings = {**cfg.finetune, "seed": cfg.seed + 1000 * k + i}
                        members[i] = fit(model, data, None, settings, output_dir=folder / f"fit_{i}")[0]
                        save_model(folder / f"member_{i}.pth", members[i],
                                   training={"active_learning_round": k, "member": i, "labelled": len(labelled)})
                    if holdout:
                        record["holdout_after"] = holdout_errors(_ensemble(members, dtype), holdout)
                        log.info(f"round {k}: held-out errors before {record['holdout_before']}, "
                                 f"after {record['holdout_after']}")
                rounds.append(record)
                atomic_write_json(output / "active_learning.json",
                                  {"config": asdict(cfg), "rounds": rounds, "converged": converged})
                bar.advance(1)
    finally:
        log.close()
    last = output / f"round_{max((r['round'] for r in rounds if r['labelled']), default=0)}"
    member_paths = [last / f"member_{i}.pth" for i in range(len(members))] if last.name != "round_0" else []
    return ActiveLearningResult(rounds=rounds, converged=converged, members=member_paths,
                                labelled=len(labelled), wall_time=time.perf_counter() - start)
