"""Reading official MatterSim v1 checkpoint files, safely and strictly.

An official checkpoint is a ``torch.save`` dict with ``model_name`` ("m3gnet"), ``model`` (state dict),
``model_args`` and training state (``optimizer``, ``ema``, ``scheduler``, ...). It is read with
``torch.load(weights_only=True)``, which cannot execute code. A file that needs full unpickling is refused
unless the caller says it trusts the file (``trust_pickle=True``; on the command line ``--trust-pickle`` of
``mattersim predict``, ``relax``, ``phonon`` and ``bench run``). Before that, the file is checked to be one
at all (:func:`checkpoint_file_problem`): an empty, truncated, damaged or foreign file is reported as what
it is, not as a file that could run code.
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from mattersim.errors import CheckpointError
from mattersim.m3gnet import DEFAULT_MODEL_ARGS, M3Gnet

log = logging.getLogger(__name__)

#: What a checkpoint file is, for messages.
EXPECTED = ("a PyTorch checkpoint (the zip archive torch.save writes, holding a dict with 'model' and 'model_args' "
            "or our 'format': 'mattersim-mt')")
#: Where the caller can say it trusts a file, for messages.
TRUST_HINT = ("--trust-pickle (mattersim predict, relax, phonon and bench run) or trust_pickle=True in Python "
              "(Potential.from_checkpoint, load_calculator)")

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _looks(head: bytes, size: int) -> str:
    """What a file that is neither a zip archive nor a pickle stream looks like, from its first bytes."""
    if head.startswith(b"version https://git-lfs"):
        return f"a Git LFS pointer ({size} bytes) instead of the weights; fetch them with git lfs pull"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return f"an HTML or XML page of {size} bytes (a failed download?)"
    decoded = head.decode("utf-8", errors="replace").rstrip("\ufffd")  # a character cut at the end is fine
    if decoded and all(c.isprintable() or c in "\r\n\t" for c in decoded):
        snippet = " ".join(decoded.split())[:40]
        return f"{size} bytes of text starting with {snippet!r}"
    return (f"{size} bytes that are neither a zip archive nor a pickle stream (they start with "
            f"{head[:8].hex(' ')})")


def _zip_problem(path: Path, size: int) -> str | None:
    if not zipfile.is_zipfile(path):
        return (f"a truncated zip archive ({size} bytes; the directory at the end of a complete archive is missing, "
                "as after an interrupted download or copy)")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") or "nothing"
                return f"a zip archive of {size} bytes without the data.pkl of torch.save (it holds {shown})"
            for info in infos:
                if info.CRC == 0 and info.file_size:
                    continue  # written without checksums (torch.serialization's compute_crc32 off)
                with archive.open(info) as member:
                    while member.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        return f"a damaged zip archive of {size} bytes ({str(exc).strip() or type(exc).__name__})"
    return None


def checkpoint_file_problem(path: str | Path) -> str | None:
    """None if ``path`` can be a PyTorch checkpoint, else what was found instead (a phrase such as
    ``"an empty file (0 bytes)"``): a zip archive must be complete, hold ``data.pkl`` and pass its CRC-32
    checks; a pickle stream (torch's legacy format) is left to ``torch.load``. Reads the file once."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(_ZIP_MAGIC):
        return _zip_problem(path, size)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return None  # a pickle stream (torch's legacy format); torch.load decides
    return _looks(head, size)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    line = (match.group(1) if match else text).strip().splitlines()[0] if text else type(exc).__name__
    return line[:160]


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict:
    """The checkpoint dict, loaded on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; give the path of a .pth file or a registered model name.")
    try:
        found = checkpoint_file_problem(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc}); check its permissions.") from None
    if found is not None:
        raise CheckpointError(f"{path}: not a checkpoint: expected {EXPECTED}, found {found}.")
    with open(path, "rb") as handle:
        kind = "zip archive" if handle.read(2) == b"PK" else "pickle stream"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        untrusted = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if untrusted is None and not trust_pickle:
            raise CheckpointError(
                f"{path}: not a readable checkpoint: expected {EXPECTED}, found a {kind} that torch.load cannot read "
                f"({_first_line(exc)}), damaged or written by something else; copy the complete file again."
            ) from None
        if not trust_pickle:
            raise CheckpointError(
                f"{path}: the checkpoint refers to the Python object {untrusted.group(1)}, which loading would import "
                f"and could run code; load it only if you trust where the file comes from: {TRUST_HINT}."
            ) from None
        log.warning("Loading %s with full unpickling because the caller trusts it.", path)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - report any corruption in one line
            raise CheckpointError(
                f"{path}: not a readable checkpoint even with full unpickling: expected {EXPECTED}, found a {kind} "
                f"that torch.load cannot read ({type(exc2).__name__}: {_first_line(exc2)})."
            ) from None
    except Exception as exc:  # noqa: BLE001 - any other failure of a damaged file, in one line
        raise CheckpointError(
            f"{path}: not a readable checkpoint: expected {EXPECTED}, found a {kind} that torch.load cannot read "
            f"({type(exc).__name__}: {_first_line(exc)}), damaged or written by something else; copy the complete "
            "file again."
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        what = (f"a dict with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict)
                else f"a {type(ckpt).__name__}")
        raise CheckpointError(
            f"{path}: not a MatterSim checkpoint: expected a dict with 'model' and 'model_args' (or 'format': "
            f"'mattersim-mt'), found {what}."
        )
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
