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


# --------------------------------------------------------------------------------------------------
# files that are not checkpoints at all: what was expected and what was found, never "could run code"
# --------------------------------------------------------------------------------------------------

import re  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from ase.build import bulk  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from conftest import REPO, assert_user_error  # noqa: E402
from mattersim.cli import app  # noqa: E402

runner = CliRunner()


def _random_bytes(n: int = 100) -> bytes:
    """``n`` seeded random bytes that start like neither a zip archive nor a pickle (as those of
    ``head -c 100 /dev/urandom`` do 255 times in 256)."""
    data = bytearray(np.random.default_rng(7).bytes(n))
    data[0] = 0x3F
    return bytes(data)


def _expect(path, *fragments):
    with pytest.raises(CheckpointError) as err:
        Potential.from_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "r.pth"
    path.write_bytes(_random_bytes(100))
    message = _expect(path, "not a checkpoint", "expected a PyTorch checkpoint", "zip archive",
                      "found 100 bytes that are neither a zip archive nor a pickle stream")
    assert "trust" not in message and "run code" not in message  # nothing to trust: it is no checkpoint at all


def test_empty_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    _expect(path, "not a checkpoint", "expected a PyTorch checkpoint", "found an empty file (0 bytes)")


@pytest.mark.parametrize("keep", [5000, 0.5, -10])
def test_truncated_real_checkpoint(small_checkpoint, tmp_path, keep):
    data = small_checkpoint.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep > 0 else len(data) + keep)
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[:n])
    _expect(path, "not a checkpoint", "expected a PyTorch checkpoint", f"found a truncated zip archive ({n} bytes")


def test_damaged_weights_fail_their_checksum(small_checkpoint, tmp_path):
    """Flipped bytes inside the weights: torch.load alone would return wrong numbers without a word."""
    data = bytearray(small_checkpoint.read_bytes())
    start = len(data) // 2
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    path = tmp_path / "damaged.pth"
    path.write_bytes(bytes(data))
    _expect(path, "not a checkpoint", "found a damaged zip archive", "CRC")


def test_foreign_files_are_described(tmp_path):
    import zipfile

    poscar = tmp_path / "POSCAR"
    bulk("Si").write(poscar, format="vasp")
    _expect(poscar, "not a checkpoint", "bytes of text starting with")
    archive = tmp_path / "other.pth"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("readme.txt", "hello")
    _expect(archive, "not a checkpoint", "zip archive", "without the data.pkl", "readme.txt")
    lfs = tmp_path / "lfs.pth"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    _expect(lfs, "Git LFS pointer", "git lfs pull")
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    _expect(listing, "not a MatterSim checkpoint", "found a list")


# --------------------------------------------------------------------------------------------------
# the command line: one plain line naming only flags that exist
# --------------------------------------------------------------------------------------------------


def _options(*command: str) -> set[str]:
    """The long options of ``mattersim COMMAND`` (from its --help, wide enough that no name is cut)."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return set(re.findall(r"--[a-z][a-z0-9-]*", result.output))


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


@pytest.fixture
def forced_colour(monkeypatch):
    """Where colour is forced (FORCE_COLOR for rich; typer forces a terminal under FORCE_COLOR, PY_COLORS and
    GITHUB_ACTIONS), output that is not a terminal must still stay free of escape codes."""
    import typer.rich_utils

    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setattr(typer.rich_utils, "FORCE_TERMINAL", True)


@pytest.mark.parametrize("kind", ["random", "empty", "truncated"])
def test_cli_bad_checkpoint_is_one_plain_line(kind, small_checkpoint, tmp_path, forced_colour):
    poscar = tmp_path / "POSCAR"
    bulk("Si").write(poscar, format="vasp")
    bad = tmp_path / f"{kind}.pth"
    bad.write_bytes({"random": _random_bytes(100), "empty": b"",
                     "truncated": small_checkpoint.read_bytes()[:20_000]}[kind])
    found = {"random": "found 100 bytes", "empty": "found an empty file", "truncated": "found a truncated zip archive"}
    result = runner.invoke(app, ["predict", str(poscar), "--model", str(bad)])
    assert_user_error(result, "not a checkpoint", "expected a PyTorch checkpoint", found[kind])
    assert "\x1b" not in result.stderr and "\x1b" not in result.stdout
    assert _flags(result.stderr) <= _options("predict")


class Untrusted:  # a pickled Python object that weights_only loading refuses
    pass


def test_cli_untrusted_checkpoint_names_the_flag_that_exists(small_checkpoint, tmp_path, forced_colour):
    ckpt = torch.load(small_checkpoint, map_location="cpu", weights_only=True)
    ckpt["extra"] = Untrusted()
    path = tmp_path / "untrusted.pth"
    torch.save(ckpt, path)
    poscar = tmp_path / "POSCAR"
    bulk("Si").write(poscar, format="vasp")
    for command in (["predict", str(poscar)], ["relax", str(poscar), "-o", str(tmp_path / "relaxed")],
                    ["phonon", str(poscar), "-o", str(tmp_path / "phonon")]):
        result = runner.invoke(app, [*command, "--model", str(path)])
        assert_user_error(result, "Untrusted", "could run code", "--trust-pickle")
        assert "\x1b" not in result.stderr
        named = _flags(result.stderr)
        assert "--trust-pickle" in named and named <= _options(command[0]), (named, command[0])
    result = runner.invoke(app, ["predict", str(poscar), "--model", str(path), "--trust-pickle"])
    assert result.exit_code == 0, result.output


def test_typer_usage_errors_and_help_have_no_escape_codes(forced_colour):
    result = runner.invoke(app, ["predict", "--no-such-option"])
    assert result.exit_code == 2 and "--no-such-option" in result.stderr
    assert "\x1b" not in result.stderr and "\x1b" not in result.stdout
    for command in ([], ["predict"], ["bench", "run"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "\x1b" not in result.output, command


def _cli_options() -> set[str]:
    """Every long option of every mattersim command."""
    import typer.main

    found: set[str] = set()

    def walk(command) -> None:
        for param in command.params:
            found.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return found


def test_every_flag_named_in_messages_and_docs_exists():
    """No message or document names a flag that no command has (as '--trust-checkpoint' once was)."""
    cli = _cli_options() | {"--help"}
    for folder in ("mattersim", "workflows"):
        for path in sorted((REPO / folder).glob("*.py")):
            unknown = _flags(path.read_text(encoding="utf-8")) - cli
            assert not unknown, (str(path.relative_to(REPO)), sorted(unknown))
    # documents may also name pip's options and the benchmark scripts' own (python -m benchmarks.X --flag)
    scripts = set()
    for path in (REPO / "benchmarks").glob("*.py"):
        scripts |= set(re.findall(r"add_argument\(\s*\"(--[a-z][a-z0-9-]*)\"", path.read_text(encoding="utf-8")))
    pip = {"--index-url", "--extra-index-url", "--no-deps", "--target", "--upgrade", "--user", "--editable"}
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for path in docs:
        unknown = _flags(path.read_text(encoding="utf-8")) - cli - scripts - pip
        assert not unknown, (str(Path(path).relative_to(REPO)), sorted(unknown))
