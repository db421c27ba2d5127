"""Reading official MatterSim v1 checkpoint files, safely and strictly.

An official checkpoint is a ``torch.save`` dict with ``model_name`` ("m3gnet"), ``model`` (state dict),
``model_args`` and training state (``optimizer``, ``ema``, ``scheduler``, ...). It is read with
``torch.load(weights_only=True)``, which cannot execute code. A file that needs full unpickling is refused
unless the caller says it trusts the file (``trust_pickle=True``, CLI ``--trust-checkpoint``).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from mattersim.errors import CheckpointError
from mattersim.m3gnet import DEFAULT_MODEL_ARGS, M3Gnet

log = logging.getLogger(__name__)


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict:
    """The checkpoint dict, loaded on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; give the path of a .pth file or a registered model name.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        if not trust_pickle:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{path}: the file holds more than plain tensors and could run code when unpickled ({reason}); "
                "load it only if you trust its origin: trust_pickle=True in Python or --trust-checkpoint on the CLI."
            ) from None
        log.warning("Loading %s with full unpickling because the caller trusts it.", path)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - report any corruption in one line
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc2).__name__}: {exc2}).") from None
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc}).") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a MatterSim checkpoint (expected a dict with 'model' and 'model_args').")
    return ckpt


def build_m3gnet(ckpt: dict, path: str | Path = "<checkpoint>") -> M3Gnet:
    """The M3GNet model of an official-format checkpoint, with every weight loaded (strict)."""
    name = ckpt.get("model_name", "m3gnet")
    if str(name).lower() != "m3gnet":
        raise CheckpointError(f"{path}: model_name is {name!r}; only 'm3gnet' (MatterSim v1) checkpoints load here.")
    args = dict(DEFAULT_MODEL_ARGS)
    given = dict(ckpt.get("model_args") or {})
    unknown = sorted(set(given) - set(DEFAULT_MODEL_ARGS) - {"device"})
    if unknown:
        raise CheckpointError(f"{path}: model_args has keys this architecture does not know: {unknown}.")
    args.update({k: v for k, v in given.items() if k in DEFAULT_MODEL_ARGS})
    try:
        model = M3Gnet(**args)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: model_args {given} do not describe a valid M3GNet ({exc}).") from None
    state = ckpt["model"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the weights do not match the M3GNet architecture of its model_args "
            f"(missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"unexpected keys: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''})."
        )
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
    if bad:
        raise CheckpointError(
            f"{path}: tensor shapes differ from the architecture for {bad[:5]} "
            f"(e.g. {bad[0]}: file {tuple(state[bad[0]].shape)}, model {tuple(expected[bad[0]].shape)})."
        )
    model.load_state_dict(state, strict=True)
    return model


# --------------------------------------------------------------------------------------------------
# Our own checkpoint format (multi-task models, trained or fine-tuned here)
# --------------------------------------------------------------------------------------------------
#: ``format`` value of our checkpoints, and the newest ``format_version`` this code reads and writes
FORMAT = "mattersim-mt"
FORMAT_VERSION = 1


def is_multitask_checkpoint(ckpt: dict) -> bool:
    return ckpt.get("format") == FORMAT


def save_model(path: str | Path, model, **meta) -> Path:
    """Write ``model`` (a :class:`mattersim.multitask.MultiTaskModel`) atomically as a versioned checkpoint.

    The file is a ``torch.save`` dict of plain data (loads with ``weights_only=True``): ``format``,
    ``format_version``, ``config`` (the architecture), ``model`` (state dict: weights, energy references,
    head normalisation) and any metadata given as keywords (``metrics``, ``data``, ``training`` ...),
    which must be plain data (dicts, lists, numbers, strings, tensors).
    """
    from mattersim.io import atomic_path

    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": "mattersim-mt",
        "config": model.config,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **meta,
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return Path(path)


def build_multitask(ckpt: dict, path: str | Path = "<checkpoint>"):
    """The :class:`~mattersim.multitask.MultiTaskModel` of one of our checkpoints, weights loaded strictly."""
    from mattersim.multitask import MultiTaskModel

    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {version!r} is newer than this mattersim reads "
            f"(<= {FORMAT_VERSION}); upgrade mattersim."
        )
    config = ckpt.get("config")
    if not isinstance(config, dict) or "backbone" not in config:
        raise CheckpointError(f"{path}: the checkpoint has no model 'config' with a 'backbone'; it is damaged.")
    try:
        model = MultiTaskModel.from_config(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: config {config} does not describe a valid model ({exc}).") from None
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the weights do not match the config's architecture ({str(exc)[:300]}).") from None
    return model


def load_model(path: str | Path, trust_pickle: bool = False):
    """``(model, ckpt)`` for one of our checkpoints or an official v1 one (as an energy-only model)."""
    from mattersim.multitask import MultiTaskModel

    ckpt = read_checkpoint(path, trust_pickle=trust_pickle)
    if is_multitask_checkpoint(ckpt):
        return build_multitask(ckpt, path), ckpt
    return MultiTaskModel(build_m3gnet(ckpt, path)), ckpt
