"""Training and fine-tuning of multi-task models (energy, forces, stress and property heads).

``train(config)`` (CLI: ``mattersim train CONFIG`` / ``mattersim finetune CONFIG``) reads a YAML or JSON
config (:func:`load_config`), builds or loads the model, reads the data, fits the energy references and
head normalisation, and runs :func:`fit`, which writes into ``output``:

- ``train.log``: what happened, one line per epoch;
- ``history.json``: one entry per epoch (entry 0 is the model before training, validation only):
  ``{"epoch", "lr", "time_s", "train": {...}, "valid": {...}, "best"}`` where ``train``/``valid`` hold
  ``loss`` and ``<term>_mae`` for every labelled term (units below);
- ``best.pth``: the EMA weights of the epoch with the lowest validation loss
  (:func:`mattersim.checkpoint.save_model`; loads with ``Potential.from_checkpoint``), with metadata
  ``metrics``, ``data`` (file hashes and counts), ``training`` (the config, epochs, seed, starting
  checkpoint) and ``normalisation`` (energy references and head scales);
- ``last.pth``: the state to resume from (weights, EMA weights, optimizer, schedule step, epoch, the
  shuffling generator's state, best score, patience counter, history). Running the same command again
  resumes there (unless ``resume: false``) and gives the same final weights as an uninterrupted run.

Config fields (defaults in brackets; relative paths are relative to the config file's folder):

============================ =============================================================================
``model``                    architecture for :meth:`MultiTaskModel.from_config`: ``{backbone: {kind:
                             transformer, preset: tiny | 1M | 10M, ...}, tasks: [...], head_args: {...}}``
                             (``kind: m3gnet`` takes M3GNet's model_args). Training from scratch.
``init_from``                checkpoint path (ours or an official v1 file) or registry model name
                             (``mattersim-v1.0.0-1M``/``-5M``): fine-tuning. Exactly one of the two.
``add_tasks`` [[]]           fine-tuning: heads to add (trained from scratch) to the loaded model.
``train``                    data sources: a list of ``{path: FILE, stress_unit: eV/A3 | GPa | kbar,
                             keys: {label: name in file}}`` (extxyz or anything ASE reads) and
                             ``{phonondb: DIR, ids: FILE | [ids]}``; a bare string is a ``path``.
``valid`` [[]]               validation sources, same form.
``valid_fraction`` [0.1]     without ``valid``: this fraction of ``train`` (seeded) is held out.
``bootstrap`` [false]        train on a bootstrap resample of ``train`` (as many samples, drawn with
                             replacement, seeded by ``seed``): ensemble members that differ in their data,
                             so that their spread reflects the data, not only the initialisation.
``loss``                     weights: ``energy`` [1] (MAE of energy per atom, eV/atom), ``forces`` [10]
                             (component MAE, eV/Å), ``stress`` [0.07] (component MAE, GPa), each task [1]
                             (MAE over its labelled elements). A weight of 0 ignores that label.
``task_loss``                per task ``mae`` [default] or ``log`` (``dielectric_tensor`` only: MAE between
                             the matrix logarithms of predicted and reference ε∞).
``optimizer``                AdamW: ``lr`` [1e-3], ``head_lr`` [= lr], ``weight_decay`` [0.0],
                             ``grad_clip`` [null = off; max global gradient norm].
``schedule``                 ``warmup_steps`` [0] (linear from lr/warmup to lr), then ``decay``
                             [linear: to 0 at the end of the last step | none].
``ema`` [0.99]               decay of the exponential moving average of the weights (null or 0: off);
                             warm-up ``min(ema, (1+n)/(10+n))`` after n steps. Validation and the saved
                             model use the EMA weights.
``epochs`` [100]             passes over the training set.
``batch_size`` [8]           structures per optimizer step.
``early_stopping`` [null]    stop after this many epochs without a better validation loss.
``freeze_backbone`` [false]  train only the heads (the energy readout belongs to the backbone).
``energy_references``        ``fit``: per-element reference energies by linear regression of the energy
                             on the composition (``model.normalizer.shift``; the per-atom energy scale
                             ``normalizer.scale`` is the RMS force component in eV/Å x 1 Å when forces
                             are labelled, else the std of the residual energy per atom). When
                             fine-tuning, ``fit`` regresses the residual of the loaded model and adds it
                             to its references (the scale is kept). ``keep``: leave them.
                             [fit from scratch, keep when fine-tuning]
``seed`` [0]                 model initialisation, validation split and shuffling.
``output`` [training]        output folder.
``device`` [cpu]             torch device.
``dtype`` [float32]          float32 or float64.
``resume`` [true]            continue from ``output/last.pth`` when it exists.
============================ =============================================================================

Heads trained from scratch get their ``scale``/``shift`` buffers from the training labels: magnetic
moments the mean and std, charges and Born charges the std, the dielectric head ``shift`` = half the
smallest eigenvalue of ε∞ - 1 over the data (a baseline) and ``scale`` the mean eigenvalue of ε∞ - 1
above it (a typical χ).

A label missing from a structure is left out of that term (a batch without it adds 0); forces and stress
are only computed for batches that have such labels (PhononDB-only training needs no forces).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mattersim.data import LABELS, STRESS_UNITS, Sample, SampleList, data_hash, read_extxyz, read_phonondb
from mattersim.errors import InputError
from mattersim.heads import ATOM_TASKS, TASKS
from mattersim.heads import UNITS as TASK_UNITS

__all__ = [
    "DEFAULT_LOSS",
    "TERMS",
    "UNITS",
    "TrainConfig",
    "TrainResult",
    "batch_losses",
    "build_model",
    "evaluate_samples",
    "fit",
    "fit_energy_references",
    "load_config",
    "load_data",
    "normalise",
    "sym_logm",
    "train",
]

#: loss terms, in order, and the units of their MAEs
TERMS = ("energy", "forces", "stress") + TASKS
UNITS = {"energy": "eV/atom", "forces": "eV/Å", "stress": "GPa", **TASK_UNITS}
DEFAULT_LOSS = {"energy": 1.0, "forces": 10.0, "stress": 0.07, **{t: 1.0 for t in TASKS}}
DEFAULT_OPTIMIZER = {"lr": 1e-3, "head_lr": None, "weight_decay": 0.0, "grad_clip": None}
DEFAULT_SCHEDULE = {"warmup_steps": 0, "decay": "linear"}
STATE_FORMAT = "mattersim-train-state"
#: config fields that may differ when a run is resumed
_RESUMABLE_CHANGES = {"epochs", "early_stopping", "output", "resume", "device"}


# ---------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """A validated training configuration (see the module docstring for every field)."""

    model: dict | None = None
    init_from: str | None = None
    add_tasks: list = field(default_factory=list)
    train: list = field(default_factory=list)
    valid: list = field(default_factory=list)
    valid_fraction: float = 0.1
    bootstrap: bool = False
    loss: dict = field(default_factory=lambda: dict(DEFAULT_LOSS))
    task_loss: dict = field(default_factory=lambda: {t: "mae" for t in TASKS})
    optimizer: dict = field(default_factory=lambda: dict(DEFAULT_OPTIMIZER))
    schedule: dict = field(default_factory=lambda: dict(DEFAULT_SCHEDULE))
    ema: float | None = 0.99
    epochs: int = 100
    batch_size: int = 8
    early_stopping: int | None = None
    freeze_backbone: bool = False
    energy_references: str | None = None
    seed: int = 0
    output: str = "training"
    device: str = "cpu"
    dtype: str = "float32"
    resume: bool = True
    source: str = field(default="<config>", repr=False, compare=False)

    def __post_init__(self):
        # partial dicts given in Python keep the defaults of the keys they leave out
        self.loss = {**DEFAULT_LOSS, **(self.loss or {})}
        self.task_loss = {**{t: "mae" for t in TASKS}, **(self.task_loss or {})}
        self.optimizer = {**DEFAULT_OPTIMIZER, **(self.optimizer or {})}
        self.schedule = {**DEFAULT_SCHEDULE, **(self.schedule or {})}

    @classmethod
    def from_dict(cls, data: Any, source: str = "<config>", base_dir: str | os.PathLike | None = None) -> "TrainConfig":
        """Validate ``data`` (a plain dict); relative paths are resolved against ``base_dir`` (default: cwd)."""
        return _parse_config(data, str(source), Path(base_dir) if base_dir is not None else Path.cwd())

    def to_dict(self) -> dict:
        """The config as plain data (what a checkpoint records)."""
        return copy.deepcopy({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"})


_FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "source"]


class _Check:
    """Builds the one-line InputError messages: file, field, problem, fix."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, name: str, problem: str, fix: str):
        raise InputError(f"{self.source}: field '{name}' {problem}; {fix}.")

    def keys(self, mapping: dict, known: Sequence[str], prefix: str = "") -> None:
        for key in mapping:
            if key not in known:
                name = f"{prefix}{key}"
                close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
                hint = f"did you mean '{prefix}{close[0]}'? Rename it" if close else "remove it"
                raise InputError(f"{self.source}: unknown field '{name}'; {hint} (known fields: {', '.join(known)}).")

    @staticmethod
    def _show(value: Any) -> str:
        return f"{value!r} ({type(value).__name__})"

    def integer(self, value: Any, name: str, minimum: int, example: str, optional: bool = False) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(name, f"must be an integer >= {minimum}{' or null' if optional else ''}, not {self._show(value)}", f"write e.g. {example}")
        return int(value)

    def number(self, value: Any, name: str, example: str, minimum: float = 0.0, below: float | None = None,
               optional: bool = False, strictly: bool = False) -> float | None:
        if value is None and optional:
            return None
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > minimum if strictly else value >= minimum) and (below is None or value < below)
        if not ok:
            bound = f"{'>' if strictly else '>='} {minimum}" + (f" and < {below}" if below is not None else "")
            self.fail(name, f"must be a number {bound}{' or null' if optional else ''}, not {self._show(value)}", f"write e.g. {example}")
        return float(value)

    def boolean(self, value: Any, name: str) -> bool:
        if not isinstance(value, bool):
            self.fail(name, f"must be true or false, not {self._show(value)}", f"write {name.split('.')[-1]}: true or false")
        return value

    def choice(self, value: Any, name: str, choices: Sequence[str]) -> str:
        if value not in choices:
            self.fail(name, f"is {value!r}", f"use one of {', '.join(map(str, choices))}")
        return value

    def mapping(self, value: Any, name: str, example: str) -> dict:
        if not isinstance(value, dict):
            self.fail(name, f"must be a mapping (key: value), not {self._show(value)}", f"write e.g. {example}")
        return value

    def path(self, value: Any, name: str, base: Path, kind: str, what: str) -> str:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            self.fail(name, f"must be a path, not {self._show(value)}", f"give the {what}")
        text = os.path.expandvars(str(value))  # $VAR / ${VAR}: data roots that differ between machines
        if "$" in text:
            self.fail(name, f"is '{value}', which names an environment variable that is not set",
                      f"set it (e.g. export {text.split('$', 1)[1].strip('{}').split('/')[0]}=/path) or write the path")
        p = Path(text).expanduser()
        p = p if p.is_absolute() else base / p
        if not (p.is_file() if kind == "file" else p.is_dir()):
            problem = "does not exist" if not p.exists() else f"is not a {'file' if kind == 'file' else 'folder'}"
            self.fail(name, f"is '{value}', which {problem} (looked for {p})",
                      f"give the {what} (relative paths are relative to the config file's folder)")
        return str(p)

    def tasks(self, value: Any, name: str) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.fail(name, f"must be a list of tasks, not {self._show(value)}", f"write e.g. {name.split('.')[-1]}: [magmoms, charges]")
        for i, t in enumerate(value):
            if t not in TASKS:
                close = difflib.get_close_matches(str(t), TASKS, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'? Tasks are" if close else "use tasks from"
                self.fail(f"{name}[{i}]", f"is {t!r}, not a task", f"{hint} {', '.join(TASKS)}")
        if len(set(value)) != len(value):
            self.fail(name, f"repeats a task ({value})", "list each task once")
        return list(value)


def _parse_sources(value: Any, name: str, base: Path, c: _Check) -> list[dict]:
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        c.fail(name, f"must be a list of data sources, not {c._show(value)}", f"write e.g. {name}: [{{path: data.extxyz}}]")
    out = []
    for i, item in enumerate(value):
        sub = f"{name}[{i}]"
        if isinstance(item, (str, os.PathLike)):
            item = {"path": str(item)}
        c.mapping(item, sub, "{path: data.extxyz} or {phonondb: entries/, ids: ids.txt}")
        labels = item.get("labels")
        if labels is not None:
            if isinstance(labels, str):
                labels = [labels]
            if not isinstance(labels, list):
                c.fail(f"{sub}.labels", f"must be a list of labels, not {c._show(labels)}", "write e.g. labels: [energy, forces]")
            for j, label in enumerate(labels):
                c.choice(label, f"{sub}.labels[{j}]", LABELS)
        if "phonondb" in item:
            c.keys(item, ["phonondb", "ids", "labels"], f"{sub}.")
            src = {"phonondb": c.path(item["phonondb"], f"{sub}.phonondb", base, "dir", "folder holding the PhononDB entries")}
            ids = item.get("ids")
            if isinstance(ids, (str, os.PathLike)):
                ids = c.path(ids, f"{sub}.ids", base, "file", "file with one entry id per line, or a list of ids")
            elif ids is not None and not (isinstance(ids, list) and all(isinstance(x, str) for x in ids)):
                c.fail(f"{sub}.ids", f"must be a file or a list of entry ids, not {c._show(ids)}", "write e.g. ids: [mp-8062-20180417]")
            src["ids"] = ids
        elif "path" in item:
            c.keys(item, ["path", "stress_unit", "keys", "labels"], f"{sub}.")
            src = {"path": c.path(item["path"], f"{sub}.path", base, "file", "path of an extxyz file (or any file ASE reads)"),
                   "stress_unit": c.choice(item.get("stress_unit", "eV/A3"), f"{sub}.stress_unit", STRESS_UNITS)}
            keys = c.mapping(item.get("keys") or {}, f"{sub}.keys", "keys: {energy: REF_energy}")
            for label, key in keys.items():
                c.choice(label, f"{sub}.keys", LABELS)
                if not isinstance(key, str):
                    c.fail(f"{sub}.keys.{label}", f"must be the name of a field in the file, not {c._show(key)}", f"write e.g. {label}: REF_{label}")
            src["keys"] = dict(keys)
        else:
            c.fail(sub, f"has neither 'path' nor 'phonondb' (it has {sorted(item)})", "write {path: data.extxyz} or {phonondb: entries/}")
        if labels is not None:
            src["labels"] = list(labels)
        out.append(src)
    return out


def _parse_model(value: Any, c: _Check) -> dict | None:
    if value is None:
        return None
    c.mapping(value, "model", "model: {backbone: {kind: transformer, preset: tiny}, tasks: [magmoms]}")
    c.keys(value, ["backbone", "tasks", "head_args"], "model.")
    backbone = c.mapping(value.get("backbone"), "model.backbone", "backbone: {kind: transformer, preset: 1M}")
    kind = backbone.get("kind", "transformer")
    c.choice(kind, "model.backbone.kind", ("transformer", "m3gnet"))
    head_args = c.mapping(value.get("head_args") or {}, "model.head_args", "head_args: {width: 64}")
    spec = {"backbone": dict(backbone), "tasks": c.tasks(value.get("tasks"), "model.tasks"), "head_args": dict(head_args)}
    from mattersim.multitask import MultiTaskModel

    try:
        MultiTaskModel.from_config(spec)
    except (TypeError, ValueError) as exc:
        c.fail("model", f"does not describe a model ({str(exc).splitlines()[0][:200]})",
               "check the backbone fields (transformer: preset, width, num_blocks, num_heads, num_gaussians, cutoff; "
               "m3gnet: num_blocks, units, max_l, max_n, cutoff, threebody_cutoff) and head_args")
    return spec


def _parse_config(data: Any, source: str, base: Path) -> TrainConfig:
    c = _Check(source)
    if not isinstance(data, dict):
        raise InputError(f"{source}: the config must be a mapping of fields (key: value), not {type(data).__name__}; see docs/training.md.")
    c.keys(data, _FIELDS)
    d = TrainConfig()
    out: dict[str, Any] = {}
    out["model"] = _parse_model(data.get("model"), c)
    init = data.get("init_from")
    if init is not None:
        if not isinstance(init, (str, os.PathLike)) or not str(init).strip():
            c.fail("init_from", f"must be a checkpoint path or a model name, not {c._show(init)}", "write e.g. init_from: mattersim-v1.0.0-1M")
        p = Path(init).expanduser()
        p = p if p.is_absolute() else base / p
        init = str(p) if p.is_file() else str(init).strip()
    out["init_from"] = init
    if out["model"] is not None and init is not None:
        c.fail("model", "and 'init_from' are both set", "give 'model' (an architecture) to train from scratch or "
               "'init_from' (a checkpoint or model name) to fine-tune, not both")
    out["add_tasks"] = c.tasks(data.get("add_tasks"), "add_tasks")
    if out["add_tasks"] and init is None:
        c.fail("add_tasks", "is only for fine-tuning (with init_from)", "list the tasks in model.tasks instead")
    out["train"] = _parse_sources(data.get("train"), "train", base, c)
    out["valid"] = _parse_sources(data.get("valid"), "valid", base, c)
    out["valid_fraction"] = c.number(data.get("valid_fraction", d.valid_fraction), "valid_fraction", "valid_fraction: 0.1", 0.0, 1.0)
    out["bootstrap"] = c.boolean(data.get("bootstrap", False), "bootstrap")

    loss = c.mapping(data.get("loss") or {}, "loss", "loss: {energy: 1, forces: 10}")
    c.keys(loss, list(DEFAULT_LOSS), "loss.")
    out["loss"] = {k: c.number(loss.get(k, v), f"loss.{k}", f"{k}: {v}") for k, v in DEFAULT_LOSS.items()}
    task_loss = c.mapping(data.get("task_loss") or {}, "task_loss", "task_loss: {dielectric_tensor: log}")
    c.keys(task_loss, list(TASKS), "task_loss.")
    out["task_loss"] = {t: c.choice(task_loss.get(t, "mae"), f"task_loss.{t}", ("mae", "log") if t == "dielectric_tensor" else ("mae",))
                        for t in TASKS}
    opt = c.mapping(data.get("optimizer") or {}, "optimizer", "optimizer: {lr: 1.0e-3}")
    c.keys(opt, list(DEFAULT_OPTIMIZER), "optimizer.")
    lr = c.number(opt.get("lr", 1e-3), "optimizer.lr", "lr: 1.0e-3", strictly=True)
    out["optimizer"] = {
        "lr": lr,
        "head_lr": c.number(opt.get("head_lr"), "optimizer.head_lr", "head_lr: 1.0e-3", strictly=True, optional=True),
        "weight_decay": c.number(opt.get("weight_decay", 0.0), "optimizer.weight_decay", "weight_decay: 0.0"),
        "grad_clip": c.number(opt.get("grad_clip"), "optimizer.grad_clip", "grad_clip: 10.0", strictly=True, optional=True),
    }
    sched = c.mapping(data.get("schedule") or {}, "schedule", "schedule: {warmup_steps: 100}")
    c.keys(sched, list(DEFAULT_SCHEDULE), "schedule.")
    out["schedule"] = {"warmup_steps": c.integer(sched.get("warmup_steps", 0), "schedule.warmup_steps", 0, "warmup_steps: 100"),
                       "decay": c.choice(sched.get("decay", "linear"), "schedule.decay", ("linear", "none"))}
    ema = c.number(data.get("ema", d.ema), "ema", "ema: 0.99", 0.0, 1.0, optional=True)
    out["ema"] = ema if ema else None
    out["epochs"] = c.integer(data.get("epochs", d.epochs), "epochs", 1, "epochs: 100")
    out["batch_size"] = c.integer(data.get("batch_size", d.batch_size), "batch_size", 1, "batch_size: 8")
    out["early_stopping"] = c.integer(data.get("early_stopping"), "early_stopping", 1, "early_stopping: 20", optional=True)
    out["freeze_backbone"] = c.boolean(data.get("freeze_backbone", False), "freeze_backbone")
    refs = data.get("energy_references")
    out["energy_references"] = None if refs is None else c.choice(refs, "energy_references", ("fit", "keep"))
    out["seed"] = c.integer(data.get("seed", 0), "seed", 0, "seed: 0")
    output = data.get("output", d.output)
    if not isinstance(output, (str, os.PathLike)) or not str(output):
        c.fail("output", f"must be a folder path, not {c._show(output)}", "write e.g. output: runs/first")
    p = Path(output).expanduser()
    out["output"] = str(p if p.is_absolute() else base / p)
    device = data.get("device", "cpu")
    if not isinstance(device, str):
        c.fail("device", f"must be a torch device name, not {c._show(device)}", "write device: cpu or device: cuda")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        c.fail("device", f"is {device!r}, not a torch device", "write device: cpu, cuda or cuda:0")
    if device.startswith("cuda") and not torch.cuda.is_available():
        c.fail("device", f"is {device!r} but no CUDA GPU is available here", "use device: cpu")
    out["device"] = device
    out["dtype"] = c.choice(data.get("dtype", "float32"), "dtype", ("float32", "float64"))
    out["resume"] = c.boolean(data.get("resume", True), "resume")
    return TrainConfig(**out, source=source)


def _check_complete(cfg: TrainConfig) -> None:
    """What :func:`train` needs beyond :func:`fit`: a model to start from and training data."""
    if cfg.model is None and cfg.init_from is None:
        raise InputError(f"{cfg.source}: field 'model' is missing and so is 'init_from'; give 'model' (an architecture) "
                         "to train from scratch or 'init_from' (a checkpoint or model name) to fine-tune.")
    if not cfg.train:
        raise InputError(f"{cfg.source}: field 'train' is missing or empty; list the training data, e.g. "
                         "train: [{path: train.extxyz}].")


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read and validate a YAML (``.yaml``/``.yml``) or JSON (``.json``) training config."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"Training config '{path}' does not exist; check the path.")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Training config '{path}' cannot be read ({exc}); check the file.") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); fix the syntax.") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark is not None else "syntax"
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise InputError(f"{path}: not valid YAML ({where}: {problem}); fix the syntax.") from None
    if data is None:
        raise InputError(f"{path}: the config is empty; give at least 'model' (or 'init_from') and 'train'.")
    cfg = TrainConfig.from_dict(data, source=str(path), base_dir=p.parent)
    _check_complete(cfg)
    return cfg


def _as_config(config: Any) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    return load_config(config)


# ---------------------------------------------------------------------------------------------------------
# model, data, normalisation
# ---------------------------------------------------------------------------------------------------------


def _resolve_init(init_from: str, source: str) -> Path:
    """The checkpoint file of ``init_from``: an existing path, or a MatterSim v1 registry model."""
    from mattersim import registry

    p = Path(init_from).expanduser()
    if p.is_file():
        return p
    if init_from.lower() not in registry._aliases() and registry._looks_like_path(init_from):
        raise InputError(f"{source}: field 'init_from' is '{init_from}', which does not exist; give an existing checkpoint "
                         f"file or a model name ({', '.join(n for n, s in registry.KNOWN_MODELS.items() if s.kind == 'mattersim-v1')}).")
    try:
        spec = registry._spec(init_from)
    except registry.ModelNotAvailableError as exc:
        raise InputError(f"{source}: field 'init_from': {str(exc)[0].lower()}{str(exc)[1:]}") from None
    if spec.kind != "mattersim-v1":
        raise InputError(f"{source}: field 'init_from' is '{spec.name}', a {spec.kind} model, which cannot be fine-tuned here; "
                         "give a MatterSim checkpoint or a mattersim-v1 model name.")
    path = registry._weights_file(spec)
    if path is None:
        path = registry.download_model(spec.name)  # offline: ModelNotAvailableError naming where to copy the file
    recorded = registry._recorded_sha256(path)
    if recorded is not None and recorded != registry.file_sha256(path):
        from mattersim.errors import CheckpointError

        raise CheckpointError(f"Weights file {path} does not match the sha256 recorded when it was downloaded; "
                              "delete it and load the model again to re-download it.")
    return path


def build_model(config: TrainConfig):
    """``(model, init_info, new_tasks)``: a fresh model (``config.model``, seeded) or the ``init_from``
    checkpoint with the ``add_tasks`` heads added; ``new_tasks`` are the heads trained from scratch."""
    from mattersim.checkpoint import load_model
    from mattersim.multitask import MultiTaskModel

    if config.model is not None:
        torch.manual_seed(config.seed)
        model = MultiTaskModel.from_config(config.model)
        return model, {"from": "scratch"}, list(model.tasks)
    from mattersim.io import file_sha256

    path = _resolve_init(config.init_from, config.source)
    model, ckpt = load_model(path)
    new = [t for t in config.add_tasks if t not in model.tasks]
    if new:
        torch.manual_seed(config.seed)
        grown = MultiTaskModel(model.backbone, tuple(model.tasks) + tuple(new), model.head_args)
        for task in model.tasks:
            grown.heads[task].load_state_dict(model.heads[task].state_dict())
        model = grown
    info = {"from": str(config.init_from), "path": str(path), "sha256": file_sha256(path),
            "kind": str(ckpt.get("format", ckpt.get("model_name", "m3gnet"))), "added_tasks": new}
    return model, info, new


def _read_source(src: dict, progress: bool = False) -> SampleList:
    if "phonondb" in src:
        samples = read_phonondb(src["phonondb"], src.get("ids"), progress=progress)
    else:
        samples = read_extxyz(src["path"], stress_unit=src.get("stress_unit", "eV/A3"), keys=src.get("keys") or None)
    if src.get("labels") is not None:  # use only these labels of this source
        keep = set(src["labels"])
        for sample in samples:
            sample.labels = {k: v for k, v in sample.labels.items() if k in keep}
    return samples


def _label_counts(samples: Sequence[Sample]) -> dict[str, int]:
    return {label: sum(label in s.labels for s in samples) for label in LABELS if any(label in s.labels for s in samples)}


def load_data(config: TrainConfig, log=None, progress: bool = False) -> tuple[list[Sample], list[Sample], dict]:
    """Training and validation samples of ``config`` (validation split off ``train`` when ``valid`` is
    empty) and a plain-data description (sources, counts, file hashes)."""
    def read_all(sources):
        samples, meta, files = [], [], []
        for src in sources:
            part = _read_source(src, progress)
            samples.extend(part)
            files.extend(part.files)
            meta.append({**{k: v for k, v in src.items() if v is not None}, "n_samples": len(part),
                         "n_skipped": len(part.skipped), "sha256": data_hash(part.files) if part.files else None})
            if log is not None:
                what = src.get("path") or src.get("phonondb")
                skipped = f", {len(part.skipped)} entries without BORN skipped" if part.skipped else ""
                log.info(f"data {what}: {len(part)} samples{skipped}")
        return samples, meta, files

    train, train_meta, files = read_all(config.train)
    valid, valid_meta, vfiles = read_all(config.valid)
    if not train:
        raise InputError(f"{config.source}: field 'train' gives no samples (every source is empty or skipped); check the data.")
    split = None
    if not config.valid and config.valid_fraction > 0 and len(train) >= 2:
        rng = np.random.default_rng(config.seed)
        k = min(len(train) - 1, max(1, int(round(config.valid_fraction * len(train)))))
        held = set(rng.permutation(len(train))[:k].tolist())
        valid = [s for i, s in enumerate(train) if i in held]
        train = [s for i, s in enumerate(train) if i not in held]
        split = {"valid_fraction": config.valid_fraction, "seed": config.seed}
    bootstrap = None
    if config.bootstrap:
        # a stream of its own (not the validation split's), so that changing one does not move the other
        rng = np.random.default_rng([config.seed, 0xB007])
        picks = rng.integers(0, len(train), size=len(train))
        train = [train[i] for i in picks]
        bootstrap = {"seed": config.seed, "n_unique": int(len(set(picks.tolist())))}
        if log is not None:
            log.info(f"bootstrap resample of the training set: {len(train)} draws, {bootstrap['n_unique']} distinct samples")
    if log is not None:
        log.info(f"training samples: {len(train)}, labels {_label_counts(train)}; validation samples: {len(valid)}"
                 + (f" (held out from train, valid_fraction {config.valid_fraction})" if split else ""))
    meta = {
        "sha256": data_hash(files + vfiles),
        "train": {"sources": train_meta, "n_samples": len(train), "labels": _label_counts(train), "bootstrap": bootstrap},
        "valid": {"sources": valid_meta, "n_samples": len(valid), "labels": _label_counts(valid), "split_from_train": split},
    }
    return train, valid, meta


def fit_energy_references(samples: Sequence[Sample], residual: Sequence[float] | None = None) -> tuple[dict[int, float], float]:
    """Per-element reference energies by least squares of the energies (or of ``residual``, one value per
    sample with an energy) on the composition, and the std of the remaining energy per atom (1.0 when it
    cannot be estimated). Returns ``({Z: eV}, std in eV/atom)``."""
    with_e = [s for s in samples if "energy" in s.labels]
    if not with_e:
        return {}, 1.0
    species = sorted({int(z) for s in with_e for z in s.atoms.numbers})
    col = {z: i for i, z in enumerate(species)}
    x = np.zeros((len(with_e), len(species)))
    for row, s in enumerate(with_e):
        for z in s.atoms.numbers:
            x[row, col[int(z)]] += 1
    y = np.array([s.labels["energy"] for s in with_e]) if residual is None else np.asarray(residual, dtype=float)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    per_atom = (y - x @ coef) / x.sum(1)
    std = float(np.std(per_atom)) if len(with_e) > 1 else 0.0
    return {z: float(coef[col[z]]) for z in species}, (std if std > 1e-8 else 1.0)


def _head_normalisation(task: str, values: list[np.ndarray]) -> tuple[float, float] | None:
    if not values:
        return None
    v = np.concatenate([np.asarray(x, dtype=float).reshape(-1) for x in values])
    std = float(np.std(v))
    std = std if std > 1e-6 else 1.0
    if task == "magmoms":
        return std, float(np.mean(v))
    if task in ("charges", "born_effective_charges"):
        return std, 0.0
    eig = np.stack([np.linalg.eigvalsh(0.5 * (e + e.T)) - 1.0 for e in values])  # dielectric: chi eigenvalues
    shift = max(0.0, 0.5 * float(eig.min()))
    return max(float(eig.mean()) - shift, 1e-3), shift


@torch.no_grad()
def _predict_energies(model, samples: Sequence[Sample], device, dtype, batch_size: int) -> np.ndarray:
    from mattersim.graph import collate
    from mattersim.potential import evaluate

    out = []
    for start in range(0, len(samples), batch_size):
        part = samples[start:start + batch_size]
        batch = collate([s.graph(model.cutoff, model.threebody_cutoff) for s in part], model.threebody_cutoff, device=device, dtype=dtype)
        out.append(evaluate(model, batch, forces=False, stress=False, tasks=[])["energy"].double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def normalise(model, samples: Sequence[Sample], *, energy_references: str = "fit", tasks: Sequence[str] = (),
              from_scratch: bool = True, log=None, batch_size: int = 32) -> dict:
    """Set the energy references (``fit``/``keep``) and the ``scale``/``shift`` of the heads in ``tasks``
    from the training labels (see the module docstring). Returns what was set, as plain data."""
    info: dict[str, Any] = {"energy_references": energy_references}
    norm = model.normalizer
    if energy_references == "fit":
        with_e = [s for s in samples if "energy" in s.labels]
        if not with_e:
            if log is not None:
                log.info("energy_references: fit skipped, no training sample has an energy")
        elif from_scratch:
            refs, scale = fit_energy_references(with_e)
            forces = [np.asarray(s.labels["forces"], dtype=float) for s in samples if "forces" in s.labels]
            if forces:
                # the RMS force (eV/Å x 1 Å) sets the per-atom energy scale, as in M3GNet and MACE: the
                # energy spread of a near-equilibrium set would make it tiny and energies hard to learn
                rms = float(np.sqrt(np.mean(np.concatenate([f.ravel() for f in forces]) ** 2)))
                scale = rms if rms > 1e-6 else scale
            with torch.no_grad():
                for z, e in refs.items():
                    norm.shift[z] = e
                norm.scale.fill_(scale)
            info.update(fitted={int(z): e for z, e in refs.items()}, energy_scale=scale)
        else:
            p = next(model.parameters())
            pred = _predict_energies(model, with_e, p.device, p.dtype, batch_size)
            refs, _ = fit_energy_references(with_e, residual=np.array([s.labels["energy"] for s in with_e]) - pred)
            with torch.no_grad():
                for z, e in refs.items():
                    norm.shift[z] += e
            info.update(fitted_correction={int(z): e for z, e in refs.items()})
        if log is not None and "fitted" in info:
            log.info(f"energy references fitted for {len(info['fitted'])} elements; per-atom energy scale {info['energy_scale']:.4g} eV")
    for task in tasks:
        stats = _head_normalisation(task, [s.labels[task] for s in samples if task in s.labels])
        if stats is None:
            continue
        head = model.heads[task]
        with torch.no_grad():
            head.scale.fill_(stats[0])
            head.shift.fill_(stats[1])
        info.setdefault("heads", {})[task] = {"scale": stats[0], "shift": stats[1]}
        if log is not None:
            log.info(f"head {task}: scale {stats[0]:.4g}, shift {stats[1]:.4g} (from {sum(task in s.labels for s in samples)} samples)")
    return info


# ---------------------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------------------


class _SymLogm(torch.autograd.Function):
    """Matrix logarithm of symmetric positive definite matrices (..., 3, 3) through ``eigh``, with the
    Daleckii-Krein backward (divided differences), which stays finite for degenerate eigenvalues (cubic
    crystals have an isotropic ε∞, where the plain ``eigh`` gradient is infinite)."""

    @staticmethod
    def forward(ctx, a):
        w, v = torch.linalg.eigh(0.5 * (a + a.transpose(-1, -2)))
        w = w.clamp_min(1e-12)
        ctx.save_for_backward(w, v)
        return v @ torch.diag_embed(torch.log(w)) @ v.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad):
        w, v = ctx.saved_tensors
        wi, wj = w.unsqueeze(-1), w.unsqueeze(-2)
        mean = 0.5 * (wi + wj)
        close = (wi - wj).abs() <= 1e-6 * mean
        diff = torch.where(close, torch.ones_like(mean), wi - wj)
        f = torch.where(close, 1.0 / mean, (torch.log(wi) - torch.log(wj)) / diff)
        g = v.transpose(-1, -2) @ (0.5 * (grad + grad.transpose(-1, -2))) @ v
        return v @ (f * g) @ v.transpose(-1, -2)


def sym_logm(a: torch.Tensor) -> torch.Tensor:
    """Matrix logarithm of symmetric positive definite matrices, differentiable (see :class:`_SymLogm`)."""
    return _SymLogm.apply(a)


def _active_terms(model, weights: dict) -> list[str]:
    heads = set(getattr(model, "tasks", ()))
    return [t for t in TERMS if weights.get(t, 0.0) > 0 and (t not in TASKS or t in heads)]


def _batch(model, samples: Sequence[Sample], weights: dict, task_loss: dict, device, dtype, create_graph: bool):
    """``(loss or None, {term: (loss_sum, abs_error_sum, count)})`` for one batch of samples."""
    from ase.units import GPa

    from mattersim.graph import collate
    from mattersim.potential import evaluate

    have = {t: [k for k, s in enumerate(samples) if t in s.labels] for t in _active_terms(model, weights)}
    have = {t: ks for t, ks in have.items() if ks}
    if not have:
        return None, {}
    graphs = [s.graph(model.cutoff, model.threebody_cutoff) for s in samples]
    batch = collate(graphs, model.threebody_cutoff, device=device, dtype=dtype)
    need_f, need_s = "forces" in have, "stress" in have
    tasks = [t for t in TASKS if t in have]
    pred = evaluate(model, batch, forces=need_f, stress=need_s, tasks=tasks, create_graph=create_graph and (need_f or need_s))
    n = [len(s.atoms) for s in samples]
    offsets = np.concatenate([[0], np.cumsum(n)[:-1]])

    def tensor(x):
        return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype, device=device)

    total = None
    stats = {}
    for term, ks in have.items():
        ref = [samples[k].labels[term] for k in ks]
        if term in ("forces",) or term in ATOM_TASKS:
            idx = torch.as_tensor(np.concatenate([np.arange(offsets[k], offsets[k] + n[k]) for k in ks]), device=device)
            diff = pred[term].index_select(0, idx) - tensor(np.concatenate(ref))
        else:
            idx = torch.as_tensor(ks, device=device)
            p = pred[term].index_select(0, idx)
            if term == "energy":
                diff = (p - tensor(ref)) / tensor([n[k] for k in ks])
            elif term == "stress":
                diff = (p - tensor(np.stack(ref))) / GPa
            else:
                diff = p - tensor(np.stack(ref))
        err = diff.abs()
        loss_err = err
        if term == "dielectric_tensor" and task_loss.get(term) == "log":
            loss_err = (sym_logm(p) - sym_logm(tensor(np.stack(ref)))).abs()
        count = err.numel()
        loss_sum = loss_err.sum()
        term_loss = weights[term] * loss_sum / count
        total = term_loss if total is None else total + term_loss
        stats[term] = (float(loss_sum.detach()), float(err.sum().detach()), count)
    return total, stats


class _Accumulator:
    def __init__(self, weights: dict, task_loss: dict):
        self.weights, self.task_loss, self.sums = weights, task_loss, {}

    def add(self, stats: dict) -> None:
        for term, (loss_sum, err_sum, count) in stats.items():
            s = self.sums.setdefault(term, [0.0, 0.0, 0])
            s[0] += loss_sum
            s[1] += err_sum
            s[2] += count

    def metrics(self) -> dict:
        out = {"loss": sum(self.weights[t] * s[0] / s[2] for t, s in self.sums.items())}
        for term in TERMS:
            if term in self.sums:
                s = self.sums[term]
                out[f"{term}_mae"] = s[1] / s[2]
                if term == "dielectric_tensor" and self.task_loss.get(term) == "log":
                    out[f"{term}_log_mae"] = s[0] / s[2]
        return out


def batch_losses(model, samples: Sequence[Sample], config: TrainConfig | dict | None = None, *,
                 create_graph: bool = False) -> tuple[torch.Tensor | None, dict]:
    """The loss of one batch and its terms ``{term: {"loss", "mae", "count"}}`` (mean over the labelled
    elements of the batch; terms without labels are absent and add 0). Uses the model's device and dtype."""
    cfg = TrainConfig() if config is None else _as_config(config)
    p = next(model.parameters())
    total, stats = _batch(model, samples, cfg.loss, cfg.task_loss, p.device, p.dtype, create_graph)
    return total, {t: {"loss": ls / c, "mae": es / c, "count": c} for t, (ls, es, c) in stats.items()}


def evaluate_samples(model, samples: Sequence[Sample], config: TrainConfig | dict | None = None,
                     batch_size: int | None = None) -> dict:
    """``loss`` and ``<term>_mae`` of ``model`` over ``samples`` (units: :data:`UNITS`)."""
    cfg = TrainConfig() if config is None else _as_config(config)
    p = next(model.parameters())
    acc = _Accumulator(cfg.loss, cfg.task_loss)
    bs = batch_size or cfg.batch_size
    was_training = model.training
    model.eval()
    for start in range(0, len(samples), bs):
        _, stats = _batch(model, samples[start:start + bs], cfg.loss, cfg.task_loss, p.device, p.dtype, False)
        acc.add(stats)
    model.train(was_training)
    return acc.metrics()


# ---------------------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------------------


class _EMA:
    """Exponential moving average of the weights (buffers are copied)."""

    def __init__(self, model, decay: float | None):
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.decay = float(decay or 0.0)
        self.updates = 0

    @torch.no_grad()
    def update(self, model) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.decay else 0.0
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def _lr_factor(step: int, total: int, warmup: int, decay: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "none":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup))


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    head_ids = {id(p) for p in model.heads.parameters()}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    heads = [p for p in model.heads.parameters() if p.requires_grad]
    lr = cfg.optimizer["lr"]
    head_lr = cfg.optimizer["head_lr"] or lr
    groups = []
    if other:
        groups.append({"params": other, "lr": lr, "base_lr": lr, "name": "backbone"})
    if heads:
        groups.append({"params": heads, "lr": head_lr, "base_lr": head_lr, "name": "heads"})
    if not groups:
        raise InputError(f"{cfg.source}: field 'freeze_backbone' is true but the model has no heads, so nothing would train; "
                         "add heads (add_tasks) or set freeze_backbone: false.")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.optimizer["weight_decay"])


def _state_cpu(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@dataclass
class TrainResult:
    """What :func:`fit` / :func:`train` return; unpacks as ``(model, history)``."""

    model: Any  # the best (EMA) model
    history: list
    best_metrics: dict | None
    best_epoch: int | None
    stopped_early: bool
    wall_time_s: float
    epochs_done: int
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    output: Path | None = None

    def __iter__(self):
        return iter((self.model, self.history))

    def __getitem__(self, index):
        return (self.model, self.history)[index]


def _normalisation_meta(model, species: Sequence[int]) -> dict:
    from ase.data import chemical_symbols

    norm = model.normalizer
    return {
        "energy_references_eV": {chemical_symbols[z]: float(norm.shift[z]) for z in species},
        "energy_scale_eV": {chemical_symbols[z]: float(norm.scale[z]) for z in species},
        "heads": {t: {"scale": float(h.scale), "shift": float(h.shift)} for t, h in model.heads.items()},
    }


def _fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 of the structures and labels of ``samples`` (in order)."""
    import hashlib

    h = hashlib.sha256()
    for s in samples:
        for arr in (s.atoms.numbers, s.atoms.positions, s.atoms.cell[:], s.atoms.pbc):
            h.update(np.ascontiguousarray(arr).tobytes())
        for key in sorted(s.labels):
            h.update(key.encode())
            h.update(np.ascontiguousarray(s.labels[key], dtype=np.float64).tobytes())
    return h.hexdigest()


def _check_resume(ckpt: dict, cfg: TrainConfig, model, meta: dict, path: Path, log) -> None:
    old, new = dict(ckpt.get("training") or {}), cfg.to_dict()
    changed = sorted(k for k in set(old) | set(new) if k not in _RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if ckpt.get("config") != model.config:
        changed.append("model architecture")
    if ckpt.get("samples_sha256") != meta.get("samples_sha256"):
        changed.append("training or validation samples")
    if changed:
        raise InputError(f"{path}: the interrupted run in this folder used different settings ({', '.join(changed)}); "
                         "use another output folder, or set resume: false to start afresh there.")
    if old.get("epochs") != new.get("epochs"):
        log.warning(f"resuming with epochs {new.get('epochs')} instead of {old.get('epochs')}: the learning-rate schedule changes")


def fit(model, train_samples: Sequence[Sample], valid_samples: Sequence[Sample] | None, config: TrainConfig | dict,
        output_dir: str | os.PathLike | None = None, *, progress: bool = False, log=None, meta: dict | None = None,
        stop_after_epochs: int | None = None) -> TrainResult:
    """Train ``model`` (in place) on ``train_samples``; returns a :class:`TrainResult`, which unpacks as
    ``(best EMA model, history)``.

    Uses ``config``'s loss, optimizer, schedule, ema, epochs, batch_size, early_stopping,
    freeze_backbone, seed, device and dtype (normalisation is :func:`normalise`'s job). With
    ``output_dir`` it writes ``train.log``, ``history.json``, ``best.pth`` and ``last.pth`` there and
    resumes from ``last.pth`` (unless ``config.resume`` is false). Without validation samples the
    training loss selects the best epoch. ``stop_after_epochs`` ends this call after that many epochs
    as if interrupted (a later call resumes). ``meta`` (plain data: ``data``, ``training``) goes into
    ``best.pth``.
    """
    from mattersim.io import RunLog

    cfg = _as_config(config)
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise InputError(f"Output folder '{out}' exists and is not a folder; choose another output.")
        out.mkdir(parents=True, exist_ok=True)
    if log is not None:
        return _fit(model, train_samples, valid_samples, cfg, out, progress, log, dict(meta or {}), stop_after_epochs)
    with RunLog(out / "train.log" if out is not None else None) as own:
        return _fit(model, train_samples, valid_samples, cfg, out, progress, own, dict(meta or {}), stop_after_epochs)


def _fit(model, train_samples, valid_samples, cfg: TrainConfig, out: Path | None, progress: bool, log, meta: dict,
         stop_after_epochs: int | None) -> TrainResult:
    from mattersim.checkpoint import save_model
    from mattersim.io import atomic_path, atomic_write_json, progress_bar, to_builtin
    from mattersim.potential import check_elements, resolve_dtype

    t0 = time.time()
    device, dtype = torch.device(cfg.device), resolve_dtype(cfg.dtype)
    train_samples, valid_samples = list(train_samples), list(valid_samples or [])
    if not train_samples:
        raise InputError("No training samples were given; pass at least one labelled structure.")
    model = model.to(device=device, dtype=dtype)
    for s in train_samples + valid_samples:
        check_elements(s.atoms, model.max_z, s.source or "a training structure")
    active = _active_terms(model, cfg.loss)
    unused = sorted({t for s in train_samples for t in s.labels} - set(active))
    if unused:
        log.warning(f"labels {unused} are not trained (no head for them, or loss weight 0)")
    if not any(t in s.labels for s in train_samples for t in active):
        raise InputError(f"{cfg.source}: no training sample has a label the model can learn (active terms: {active}); "
                         "check the data's labels, the loss weights and the model's tasks.")
    meta["samples_sha256"] = _fingerprint(train_samples) + "+" + _fingerprint(valid_samples)
    trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)  # a model that served inference (Potential freezes it) trains again
    if cfg.freeze_backbone:
        model.backbone.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    optimizer = _optimizer(model, cfg)
    ema = _EMA(model, cfg.ema)
    generator = torch.Generator().manual_seed(cfg.seed)
    n, bs = len(train_samples), cfg.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total_steps = cfg.epochs * steps_per_epoch
    warmup, decay = cfg.schedule["warmup_steps"], cfg.schedule["decay"]
    species = sorted({int(z) for s in train_samples for z in s.atoms.numbers})
    st: dict[str, Any] = {"epoch": 0, "step": 0, "best_score": math.inf, "best_epoch": None, "best_metrics": None,
                          "patience": 0, "stopped_early": False, "history": []}
    best_state = None
    last = out / "last.pth" if out is not None else None

    def save_last() -> None:
        state = {
            "format": STATE_FORMAT, "format_version": 1, "config": model.config, "model": _state_cpu(model),
            "ema": _state_cpu(ema.model), "ema_updates": ema.updates, "optimizer": optimizer.state_dict(),
            "schedule": {"step": st["step"], "total_steps": total_steps, "warmup_steps": warmup, "decay": decay},
            "generator_state": generator.get_state(), "torch_rng_state": torch.get_rng_state(),
            "training": cfg.to_dict(), "samples_sha256": meta["samples_sha256"],
            **{k: to_builtin(v) for k, v in st.items()},
        }
        with atomic_path(last) as tmp:
            torch.save(state, tmp)

    def save_best() -> None:
        training = {**(meta.get("training") or {}), "config": cfg.to_dict(), "seed": cfg.seed, "epochs": st["epoch"],
                    "best_epoch": st["best_epoch"]}
        save_model(out / "best.pth", ema.model, metrics=to_builtin(st["best_metrics"]), data=to_builtin(meta.get("data", {})),
                   training=to_builtin(training), normalisation=_normalisation_meta(ema.model, species))

    if last is not None and last.is_file() and cfg.resume:
        try:
            ckpt = torch.load(last, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged state file is the user's to remove
            raise InputError(f"{last}: the resume state cannot be read ({type(exc).__name__}); delete it or set resume: false.") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != STATE_FORMAT:
            raise InputError(f"{last}: not a mattersim training state; delete it or set resume: false.")
        _check_resume(ckpt, cfg, model, meta, last, log)
        model.load_state_dict(ckpt["model"])
        ema.model.load_state_dict(ckpt["ema"])
        ema.updates = int(ckpt["ema_updates"])
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["generator_state"])
        torch.set_rng_state(ckpt["torch_rng_state"])
        st.update({k: ckpt[k] for k in st})
        st["best_score"] = float(st["best_score"]) if st["best_score"] is not None else math.inf
        st["step"] = int(ckpt["schedule"]["step"])
        log.info(f"resuming from {last} after epoch {st['epoch']} (step {st['step']})")
    elif last is not None and last.is_file():
        log.info(f"resume: false, starting afresh in {out} (the old last.pth will be overwritten)")

    def write_history() -> None:
        if out is not None:
            atomic_write_json(out / "history.json", st["history"])

    valid_or_train = valid_samples if valid_samples else train_samples
    if not valid_samples:
        log.warning("no validation samples: the training loss selects the best epoch and early stopping")
    if not st["history"]:
        t = time.time()
        initial = evaluate_samples(ema.model, valid_or_train, cfg)
        st["history"].append({"epoch": 0, "lr": 0.0, "time_s": time.time() - t, "train": None if valid_samples else initial,
                              "valid": initial if valid_samples else None, "best": False})
        log.info(f"before training: {'valid' if valid_samples else 'train'} " + _fmt_metrics(initial))
        write_history()

    log.info(f"training {sum(p.numel() for p in model.parameters() if p.requires_grad)} parameters on {n} structures "
             f"({len(valid_samples)} validation), {cfg.epochs} epochs of {steps_per_epoch} steps, {device}, {cfg.dtype}")
    run_epochs = 0
    remaining = 0 if st["stopped_early"] else max(0, cfg.epochs - st["epoch"]) * steps_per_epoch
    if stop_after_epochs is not None:
        remaining = min(remaining, stop_after_epochs * steps_per_epoch)
    with progress_bar(progress, remaining, "training") as bar:
        while st["epoch"] < cfg.epochs and not st["stopped_early"]:
            if stop_after_epochs is not None and run_epochs >= stop_after_epochs:
                break
            t_epoch = time.time()
            epoch = st["epoch"] + 1
            model.train()
            acc = _Accumulator(cfg.loss, cfg.task_loss)
            perm = torch.randperm(n, generator=generator).tolist()
            lr_now = 0.0
            for b in range(steps_per_epoch):
                batch = [train_samples[i] for i in perm[b * bs:(b + 1) * bs]]
                factor = _lr_factor(st["step"], total_steps, warmup, decay)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                lr_now = optimizer.param_groups[0]["lr"]
                loss, stats = _batch(model, batch, cfg.loss, cfg.task_loss, device, dtype, create_graph=True)
                if loss is not None and loss.requires_grad:
                    if not torch.isfinite(loss):
                        raise InputError(f"{cfg.source}: training diverged (the loss is {float(loss)} at epoch {epoch}, step {st['step']}); "
                                         "lower optimizer.lr, add schedule.warmup_steps or set optimizer.grad_clip.")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.optimizer["grad_clip"]:
                        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.optimizer["grad_clip"])
                    optimizer.step()
                    ema.update(model)
                acc.add(stats)
                st["step"] += 1
                bar.advance(1)
            train_metrics = acc.metrics()
            valid_metrics = evaluate_samples(ema.model, valid_samples, cfg) if valid_samples else None
            score = (valid_metrics or train_metrics)["loss"]
            st["epoch"] = epoch
            improved = score < st["best_score"]
            if improved:
                st.update(best_score=score, best_epoch=epoch, patience=0,
                          best_metrics={"epoch": epoch, "on": "valid" if valid_samples else "train", **(valid_metrics or train_metrics)})
                best_state = _state_cpu(ema.model)
                if out is not None:
                    save_best()
            else:
                st["patience"] += 1
            st["history"].append({"epoch": epoch, "lr": lr_now, "time_s": time.time() - t_epoch, "train": train_metrics,
                                  "valid": valid_metrics, "best": improved})
            if cfg.early_stopping and st["patience"] >= cfg.early_stopping:
                st["stopped_early"] = True
            log.info(f"epoch {epoch}/{cfg.epochs}: train {_fmt_metrics(train_metrics)}"
                     + (f" | valid {_fmt_metrics(valid_metrics)}" if valid_metrics else "") + (" *" if improved else ""))
            if st["stopped_early"]:
                log.info(f"early stopping: no better validation loss for {st['patience']} epochs (best epoch {st['best_epoch']})")
            write_history()
            if last is not None:
                save_last()
            run_epochs += 1

    if best_state is None:
        if out is not None and (out / "best.pth").is_file():
            from mattersim.checkpoint import read_checkpoint

            best_state = read_checkpoint(out / "best.pth")["model"]
        else:
            best_state = _state_cpu(ema.model)
    best = copy.deepcopy(ema.model)
    best.load_state_dict(best_state)
    for m in (model, best):  # as given (freeze_backbone and the EMA copy switch gradients off)
        for p, flag in zip(m.parameters(), trainable):
            p.requires_grad_(flag)
    done = st["epoch"] >= cfg.epochs or st["stopped_early"]
    if done:
        log.info(f"finished: best epoch {st['best_epoch']}" + (f" ({_fmt_metrics(st['best_metrics'])})" if st["best_metrics"] else ""))
    else:
        log.info(f"stopped after epoch {st['epoch']} of {cfg.epochs}; run again to resume")
    return TrainResult(
        model=best, history=st["history"], best_metrics=st["best_metrics"], best_epoch=st["best_epoch"],
        stopped_early=bool(st["stopped_early"]), wall_time_s=time.time() - t0, epochs_done=st["epoch"],
        best_checkpoint=(out / "best.pth") if out is not None and (out / "best.pth").is_file() else None,
        last_checkpoint=last if last is not None and last.is_file() else None, output=out,
    )


def _fmt_metrics(metrics: dict | None) -> str:
    if not metrics:
        return "-"
    parts = [f"loss {metrics['loss']:.4g}"]
    for term in TERMS:
        if f"{term}_mae" in metrics:
            parts.append(f"{term} {metrics[f'{term}_mae']:.4g} {UNITS[term]}")
    return ", ".join(parts)


def train(config_or_path: TrainConfig | dict | str | os.PathLike, *, progress: bool = True,
          stop_after_epochs: int | None = None) -> TrainResult:
    """Train (``model``) or fine-tune (``init_from``) as the config says; see the module docstring.

    Returns a :class:`TrainResult` (best checkpoint path, history, best validation metrics,
    stopped_early, wall time, the best model). Rerunning with the same output folder resumes.
    """
    from mattersim import __version__
    from mattersim.io import RunLog

    cfg = _as_config(config_or_path)
    _check_complete(cfg)
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"{cfg.source}: field 'output' is '{out}', which is a file; choose a folder.")
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "train.log")
    try:
        log.info(f"mattersim {__version__}: {'fine-tuning' if cfg.init_from else 'training'} with {cfg.source}")
        model, init_info, new_tasks = build_model(cfg)
        train_s, valid_s, data_meta = load_data(cfg, log, progress=progress)
        resuming = cfg.resume and (out / "last.pth").is_file()
        from mattersim.potential import resolve_dtype

        model = model.to(device=torch.device(cfg.device), dtype=resolve_dtype(cfg.dtype))
        norm = {}
        if not resuming:
            refs = cfg.energy_references or ("fit" if cfg.model is not None else "keep")
            norm = normalise(model, train_s, energy_references=refs, tasks=new_tasks, from_scratch=cfg.model is not None,
                             log=log, batch_size=max(cfg.batch_size, 16))
        meta = {"data": data_meta, "training": {"init_from": init_info, "normalise": norm, "mattersim_version": __version__}}
        return fit(model, train_s, valid_s, cfg, out, progress=progress, log=log, meta=meta, stop_after_epochs=stop_after_epochs)
    finally:
        log.close()
