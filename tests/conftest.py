"""Shared test fixtures: the read-only ``../shared`` folder beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "mattersim_v1_reference"


def shared_path(*parts: str) -> Path:
    """A path under ../shared; skips the test with a clear reason when it is absent (a user's fresh clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the read-only ../shared data folder beside the repository), which is absent")
    return path


@pytest.fixture(scope="session")
def small_checkpoint() -> Path:
    return shared_path("fixtures", "mattersim_v1_reference", "m3gnet-small-random.pth")


@pytest.fixture(scope="session")
def checkpoint_1m() -> Path:
    return shared_path("fixtures", "mattersim_v1_reference", "m3gnet-1M-random.pth")


@pytest.fixture(scope="session")
def small_potential(small_checkpoint):
    from mattersim.potential import Potential

    return Potential.from_checkpoint(small_checkpoint, dtype="float64")


def assert_user_error(result, *fragments):
    """A CLI result with exit code 2 and one red 'Error: ...' line on stderr naming the fragments, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: small graphs run fastest so, and a busy 2-core machine is not
    oversubscribed. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
