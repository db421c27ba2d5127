"""Model registry: cache location, names, downloads (served locally), offline failures, real offline models."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import threading
import time
import zipfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from mattersim import registry
from mattersim.errors import CheckpointError, InputError, MatterSimError, ModelNotAvailableError

ONE_M = "mattersim-v1.0.0-1M"
FIVE_M = "mattersim-v1.0.0-5M"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets an empty cache and an empty home (no official-package cache either), and no
    dielectric model (whether or not its member files are installed in the package)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv(registry.ENV_HOME, str(tmp_path / "cache"))
    monkeypatch.setenv("MATTERSIM_DIELECTRIC_DIR", str(tmp_path / "no-dielectric-model"))
    return tmp_path / "cache"


@pytest.fixture
def fake_weights(tmp_path) -> Path:
    """A small file in the torch zip format (what download_model checks for)."""
    path = tmp_path / "served" / "weights.pth"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"x" * 300_000)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _point(monkeypatch, name: str, **changes) -> None:
    monkeypatch.setitem(registry.KNOWN_MODELS, name, dataclasses.replace(registry.KNOWN_MODELS[name], **changes))


def _si():
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.02, seed=1)
    return atoms


# ----------------------------------------------------------------------------- locations and names


def test_cache_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("MATTERSIM_HOME", str(tmp_path / "elsewhere"))
    assert registry.cache_dir() == tmp_path / "elsewhere"
    assert registry.models_dir() == tmp_path / "elsewhere" / "models"
    assert registry.model_path(ONE_M) == tmp_path / "elsewhere" / "models" / "mattersim-v1.0.0-1M.pth"
    monkeypatch.delenv("MATTERSIM_HOME")
    assert registry.cache_dir() == Path.home() / ".cache" / "mattersim"


def test_names_are_case_insensitive_and_accept_official_file_names():
    assert registry.resolve_name("MatterSim-v1.0.0-5M.pth") == FIVE_M
    assert registry.resolve_name("mattersim-v1.0.0-1m") == ONE_M
    assert registry.resolve_name("7net-0") == "sevennet-0"
    assert registry.resolve_name("CHGNet") == "chgnet"


def test_unknown_name_lists_known_and_suggests():
    with pytest.raises(ModelNotAvailableError) as info:
        registry.load_calculator("chgnett")
    message = str(info.value)
    assert "did you mean 'chgnet'" in message
    for name in registry.KNOWN_MODELS:
        assert name in message
    assert "\n" not in message


def test_missing_checkpoint_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        registry.load_calculator(str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="does not exist"):
        registry.load_calculator(tmp_path / "nope")


def test_bad_arguments():
    with pytest.raises(InputError, match="dtype"):
        registry.load_calculator("chgnet", dtype="float16")
    with pytest.raises(InputError, match="model must be"):
        registry.load_calculator(42)


# ----------------------------------------------------------------------------- downloads


def test_offline_failure_names_target_path(monkeypatch, isolated_cache):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(registry, "urlopen", offline)
    target = isolated_cache / "models" / "mattersim-v1.0.0-5M.pth"
    with pytest.raises(ModelNotAvailableError) as info:
        registry.load_calculator(FIVE_M)
    message = str(info.value)
    assert str(target) in message
    assert registry.KNOWN_MODELS[FIVE_M].url in message
    assert "available offline now" in message
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no partial file left behind


def test_no_download_when_forbidden(monkeypatch, isolated_cache):
    monkeypatch.setattr(registry, "urlopen", lambda *a, **k: pytest.fail("must not download"))
    with pytest.raises(ModelNotAvailableError, match=str(isolated_cache / "models" / "mattersim-v1.0.0-1M.pth")):
        registry.load_calculator(ONE_M, download=False)


@pytest.fixture
def http_url(fake_weights, monkeypatch):
    """Serve fake_weights' folder on 127.0.0.1 from a thread; yields the file's URL."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    handler = functools.partial(_QuietHandler, directory=str(fake_weights.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{fake_weights.name}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


def test_download_from_local_http_server(monkeypatch, fake_weights, http_url, isolated_cache):
    _point(monkeypatch, ONE_M, url=http_url, sha256=_sha(fake_weights), size=fake_weights.stat().st_size)
    seen = []
    real_replace = registry.os.replace

    def spy_replace(src, dst):
        seen.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(registry.os, "replace", spy_replace)
    assert not registry.is_available(ONE_M)
    path = registry.download_model(ONE_M, progress=False)

    assert path == isolated_cache / "models" / "mattersim-v1.0.0-1M.pth"
    assert path.read_bytes() == fake_weights.read_bytes()
    # written to a temporary file in the same folder, then renamed into place
    src, dst = seen[0]
    assert dst == path and src.parent == path.parent and src != path
    assert (path.parent / "mattersim-v1.0.0-1M.pth.sha256").read_text().split()[0] == _sha(fake_weights)
    assert sorted(p.name for p in path.parent.iterdir()) == ["mattersim-v1.0.0-1M.pth", "mattersim-v1.0.0-1M.pth.sha256"]
    assert registry.is_available(ONE_M)
    row = {r["name"]: r for r in registry.list_models()}[ONE_M]
    assert row["available"] and row["path"] == str(path)


def test_download_with_progress_bar(monkeypatch, fake_weights, isolated_cache, capsys):
    _point(monkeypatch, ONE_M, url=fake_weights.as_uri(), sha256=None)
    path = registry.download_model(ONE_M, progress=True)
    assert path.is_file()


def test_wrong_hash_is_rejected_and_leaves_nothing(monkeypatch, fake_weights, isolated_cache):
    _point(monkeypatch, ONE_M, url=fake_weights.as_uri(), sha256="0" * 64)
    with pytest.raises(CheckpointError, match="sha256"):
        registry.download_model(ONE_M, progress=False)
    folder = isolated_cache / "models"
    assert list(folder.iterdir()) == []


def test_non_checkpoint_download_is_rejected(monkeypatch, tmp_path, isolated_cache):
    page = tmp_path / "error.html"
    page.write_text("<html>rate limited</html>")
    _point(monkeypatch, ONE_M, url=page.as_uri())
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        registry.download_model(ONE_M, progress=False)
    assert list((isolated_cache / "models").iterdir()) == []


def test_short_download_is_rejected(monkeypatch, fake_weights, isolated_cache):
    _point(monkeypatch, ONE_M, url=fake_weights.as_uri(), size=fake_weights.stat().st_size + 1)
    with pytest.raises(CheckpointError, match="bytes"):
        registry.download_model(ONE_M, progress=False)
    assert list((isolated_cache / "models").iterdir()) == []


def test_packaged_models_are_not_downloadable():
    with pytest.raises(ModelNotAvailableError, match="ships inside"):
        registry.download_model("chgnet")


# ----------------------------------------------------------------------------- default model


def test_default_model_order(monkeypatch, isolated_cache):
    available = set()
    monkeypatch.setattr(registry, "is_available", lambda name: registry.resolve_name(name) in available)
    with pytest.raises(ModelNotAvailableError, match="No model is available offline"):
        registry.default_model()
    for name, expected in [("chgnet", "chgnet"), ("sevennet-0", "sevennet-0"), (ONE_M, ONE_M), (FIVE_M, FIVE_M)]:
        available.add(name)
        assert registry.default_model() == expected


def test_default_model_uses_cached_files(isolated_cache):
    models = isolated_cache / "models"
    models.mkdir(parents=True)
    (models / "mattersim-v1.0.0-1M.pth").write_bytes(b"PK\x03\x04")
    assert registry.default_model() == ONE_M
    (models / "mattersim-v1.0.0-5M.pth").write_bytes(b"PK\x03\x04")
    assert registry.default_model() == FIVE_M


def test_default_model_adds_the_dielectric_model_when_installed(isolated_cache, tmp_path, monkeypatch):
    models = isolated_cache / "models"
    models.mkdir(parents=True)
    (models / "mattersim-v1.0.0-1M.pth").write_bytes(b"PK\x03\x04")
    members = tmp_path / "members"
    members.mkdir()
    (members / "member_0.pth").write_bytes(b"PK\x03\x04")  # only its presence counts here
    monkeypatch.setenv("MATTERSIM_DIELECTRIC_DIR", str(members))
    assert registry.is_available("mattersim-dielectric")
    assert registry.default_model() == f"{ONE_M}+mattersim-dielectric"


def test_official_package_cache_is_found(tmp_path):
    legacy = Path.home() / ".local" / "mattersim" / "pretrained_models"
    legacy.mkdir(parents=True)
    (legacy / "mattersim-v1.0.0-5M.pth").write_bytes(b"PK\x03\x04")
    assert registry.is_available(FIVE_M)


def test_list_models_shape():
    rows = registry.list_models()
    assert [r["name"] for r in rows] == list(registry.KNOWN_MODELS)
    for row in rows:
        assert set(row) >= {"name", "kind", "description", "available", "path"}
        assert isinstance(row["available"], bool)


# ----------------------------------------------------------------------------- loading


def test_ase_calculator_passes_through():
    calc = EMT()
    assert registry.load_calculator(calc) is calc
    assert calc.model_info["kind"] == "ase" and calc.model_info["name"] == "EMT"
    calc.model_info = {"name": "mine"}
    assert registry.load_calculator(calc).model_info == {"name": "mine"}


def test_local_checkpoint_path(small_checkpoint):
    calc = registry.load_calculator(str(small_checkpoint))
    info = calc.model_info
    assert info["kind"] == "checkpoint"
    assert info["sha256"] == _sha(small_checkpoint)
    assert info["source"] == str(small_checkpoint.resolve())
    atoms = _si()
    atoms.calc = calc
    assert np.isfinite(atoms.get_potential_energy())
    assert atoms.get_forces().shape == (2, 3)
    # Path objects too, and float64
    calc64 = registry.load_calculator(small_checkpoint, dtype="float64")
    assert calc64.model_info["dtype"] == "float64"


def test_cached_official_name_loads_through_potential(small_checkpoint, isolated_cache):
    """A file placed by hand at the documented path loads by name (random weights stand in for the real ones)."""
    target = registry.model_path(ONE_M)
    target.parent.mkdir(parents=True)
    target.write_bytes(small_checkpoint.read_bytes())
    calc = registry.load_calculator(ONE_M, download=False)
    info = calc.model_info
    assert (info["name"], info["kind"], info["version"]) == (ONE_M, "mattersim-v1", "1.0.0")
    assert info["source"] == str(target) and info["sha256"] == _sha(small_checkpoint)


def test_corrupted_cached_file_is_detected(small_checkpoint, isolated_cache):
    target = registry.model_path(ONE_M)
    target.parent.mkdir(parents=True)
    target.write_bytes(small_checkpoint.read_bytes())
    (target.parent / (target.name + ".sha256")).write_text(f"{'1' * 64}  {target.name}\n")
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        registry.load_calculator(ONE_M, download=False)


def _check_results(calc, expect_magmoms: bool) -> float:
    atoms = _si()
    atoms.calc = calc
    start = time.perf_counter()
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    stress = atoms.get_stress()
    assert np.isfinite(energy) and -6.0 < energy / len(atoms) < -4.5  # Si cohesive scale, eV/atom
    assert forces.shape == (2, 3) and np.abs(forces.sum(axis=0)).max() < 1e-4
    assert stress.shape == (6,) and np.abs(stress).max() < 0.1  # eV/Å^3, not GPa
    if expect_magmoms:
        assert atoms.get_magnetic_moments().shape == (2,)
    return time.perf_counter() - start


def test_chgnet_offline(monkeypatch):
    pytest.importorskip("chgnet")
    monkeypatch.setattr(registry, "urlopen", lambda *a, **k: pytest.fail("must not download"))
    calc = registry.load_calculator("chgnet")
    info = calc.model_info
    assert (info["name"], info["kind"], info["version"]) == ("chgnet", "chgnet", "0.3.0")
    assert info["sha256"] and len(info["sha256"]) == 64
    _check_results(calc, expect_magmoms=True)


def test_sevennet_offline(monkeypatch):
    pytest.importorskip("sevenn")
    monkeypatch.setattr(registry, "urlopen", lambda *a, **k: pytest.fail("must not download"))
    calc = registry.load_calculator("7net-0")
    info = calc.model_info
    assert (info["name"], info["kind"]) == ("sevennet-0", "sevennet")
    assert info["sha256"] and len(info["sha256"]) == 64
    _check_results(calc, expect_magmoms=False)


def test_errors_are_mattersim_errors():
    assert issubclass(ModelNotAvailableError, MatterSimError)


def test_readme_and_ci_run_share_the_setup_commands():
    """README's two set-up commands are exactly the ones .ci/run runs (keep them in sync)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    # the first two code blocks are the two commands; later blocks are alternatives (e.g. the CPU wheel)
    blocks = [b.split("\n", 1)[1] for b in setup.split("```")[1::2]][:2]
    commands = [line.strip() for b in blocks for line in b.splitlines() if line.startswith("python3 -m ")]
    assert len(commands) == 2, commands
    ci_lines = {line.strip() for line in (root / ".ci" / "run").read_text().splitlines()}
    for command in commands:
        assert command in ci_lines or f"{command} || status=$?" in ci_lines, command
