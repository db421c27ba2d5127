"""Checkpoint loading is strict and never unpickles code unless the caller trusts the file."""

import collections

import pytest
import torch

from mattersim.errors import CheckpointError
from mattersim.potential import Potential


class NotATensor:  # a pickled Python object that weights_only loading refuses
    pass


def _copy(small_checkpoint, tmp_path, edit):
    ckpt = torch.load(small_checkpoint, map_location="cpu", weights_only=True)
    edit(ckpt)
    path = tmp_path / "edited.pth"
    torch.save(ckpt, path)
    return path


def test_official_file_loads_unchanged_with_weights_only(small_checkpoint):
    pot = Potential.from_checkpoint(small_checkpoint)
    assert pot.identity["sha256"] and len(pot.identity["sha256"]) == 64
    assert pot.identity["model_args"]["units"] == 32


def test_missing_key_fails_loudly(small_checkpoint, tmp_path):
    path = _copy(small_checkpoint, tmp_path, lambda c: c["model"].pop("final.g.2.linear.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys: \['final.g.2.linear.bias'\]"):
        Potential.from_checkpoint(path)


def test_unexpected_key_fails_loudly(small_checkpoint, tmp_path):
    path = _copy(small_checkpoint, tmp_path, lambda c: c["model"].__setitem__("extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected keys: \['extra.weight'\]"):
        Potential.from_checkpoint(path)


def test_wrong_architecture_args_fail(small_checkpoint, tmp_path):
    path = _copy(small_checkpoint, tmp_path, lambda c: c["model_args"].__setitem__("units", 64))
    with pytest.raises(CheckpointError, match="shapes differ"):
        Potential.from_checkpoint(path)


def test_pickled_code_needs_explicit_trust(small_checkpoint, tmp_path):
    path = _copy(small_checkpoint, tmp_path, lambda c: c.__setitem__("extra", NotATensor()))
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        Potential.from_checkpoint(path)
    pot = Potential.from_checkpoint(path, trust_pickle=True)
    assert pot.identity["model_args"]["units"] == 32


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        Potential.from_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Potential.from_checkpoint(tmp_path / "absent.pth")
    other = tmp_path / "other.pth"
    torch.save({"model_name": "graphormer", "model": collections.OrderedDict()}, other)
    with pytest.raises(CheckpointError, match="only 'm3gnet'"):
        Potential.from_checkpoint(other)
