"""Energy/force/stress benchmarks: metric definitions, the reference-set loaders, the runner, HEX, the CLI."""

from __future__ import annotations

import io
import json
import shutil

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.units import GPa
from typer.testing import CliRunner

from benchmarks import datasets
from benchmarks.datasets import SETS, load_set, read_reference_file
from benchmarks.efs import run_efs
from benchmarks.hex import run_hex
from benchmarks.metrics import EV_A3_TO_GPA, efs_metrics, force_norm_mae, mae, rmse, stress_frobenius_mae
from mattersim import registry
from mattersim.calculator import evaluate_batch
from mattersim.cli import app
from mattersim.errors import InputError
from tests.conftest import assert_user_error, shared_path

BENCH = ("data", "mattersim-benchmarks")


def _values(doc, group=None):
    metrics = doc["groups"][group] if group else doc["metrics"]
    return {m["key"]: m["value"] for m in metrics}


# ----------------------------------------------------------------------------- metric definitions


def test_metrics_on_hand_made_cases():
    n_atoms = [1, 2]
    e_ref, e_pred = [1.0, 4.0], [1.5, 3.0]  # per atom: errors +0.5 and -0.5
    f_ref = [np.zeros((1, 3)), np.zeros((2, 3))]
    f_pred = [np.array([[3.0, 4.0, 0.0]]), np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])]
    s_ref = np.zeros((2, 3, 3))
    s_pred = np.zeros((2, 3, 3))
    s_pred[0, 0, 0] = 1.0 / EV_A3_TO_GPA  # 1 GPa
    s_pred[1] = np.diag([3.0, 4.0, 0.0]) / EV_A3_TO_GPA  # Frobenius norm 5 GPa
    values = {m["key"]: m["value"] for m in efs_metrics(n_atoms, e_ref, e_pred, f_ref, f_pred, s_ref, s_pred)}
    assert values["energy_mae_eV_per_atom"] == pytest.approx(0.5)
    assert values["energy_rmse_eV_per_atom"] == pytest.approx(0.5)
    assert values["force_mae_eV_per_A"] == pytest.approx(8 / 9)  # component-wise: (3 + 4 + 1) / 9
    assert values["force_norm_mae_eV_per_A"] == pytest.approx((5 + 0.5) / 2)  # per structure, then mean
    assert values["force_rmse_eV_per_A"] == pytest.approx(np.sqrt(26 / 9))
    assert values["stress_mae_GPa"] == pytest.approx(8 / 18)
    assert values["stress_frobenius_mae_GPa"] == pytest.approx((1 + 5) / 2)
    assert values["stress_rmse_GPa"] == pytest.approx(np.sqrt(26 / 18))
    assert EV_A3_TO_GPA == pytest.approx(160.21766, rel=1e-6)


def test_metric_helpers_edge_cases():
    assert mae([], []) is None and rmse([], []) is None
    assert force_norm_mae([], []) is None and stress_frobenius_mae(np.zeros((0, 3, 3)), np.zeros((0, 3, 3))) is None
    with pytest.raises(ValueError, match="shape"):
        mae([1.0, 2.0], [1.0])
    values = {m["key"]: m["value"] for m in efs_metrics([2], [1.0], [1.0], [np.ones((2, 3))], [np.ones((2, 3))],
                                                         np.zeros((1, 3, 3)), None)}
    assert values["energy_mae_eV_per_atom"] == 0.0 and values["stress_mae_GPa"] is None


# ----------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("name", list(SETS))
def test_real_sets_load_with_their_frame_counts(name):
    folder = shared_path(*BENCH)
    data = load_set(name, folder)
    assert len(data) == SETS[name].n_frames
    assert data.sha256 == SETS[name].sha256 and data.notes == []
    assert data.stress.shape == (len(data), 3, 3)
    assert all(f.shape == (len(a), 3) for f, a in zip(data.forces, data.structures))
    assert np.allclose(data.stress, data.stress.transpose(0, 2, 1), atol=1e-6)
    assert len(set(data.ids)) == len(data)  # every frame has its own id
    assert all(a.calc is None for a in data.structures)  # the reference never leaks into a calculator
    if name in ("mpf-TP", "mpf-alkali-TP", "random-TP"):
        assert data.pressure_GPa.max() > 500  # "0-1000 GPa"


def test_known_counts_of_the_issue():
    assert (SETS["mpf-TP"].n_frames, SETS["mpf-alkali-TP"].n_frames, SETS["random-TP"].n_frames) == (1069, 460, 693)


def test_reference_values_read_as_written(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    forces = np.arange(12.0).reshape(4, 3) / 10
    stress = np.array([[1.0, 0.1, 0.2], [0.1, 2.0, 0.3], [0.2, 0.3, 3.0]])  # GPa
    atoms.info.update({"energy": -14.5, "stress_unit": "GPa", "internal_id": "cu-1"})
    atoms.info["stress"] = stress.ravel()
    atoms.arrays["forces"] = forces
    path = tmp_path / "one.xyz"
    ase.io.write(path, atoms, format="extxyz")
    data = read_reference_file(path)
    assert data.energy[0] == pytest.approx(-14.5)
    assert np.allclose(data.forces[0], forces)
    assert np.allclose(data.stress[0] * EV_A3_TO_GPA, stress)  # converted from GPa
    assert data.ids == ["cu-1"]
    assert data.pressure_GPa[0] == pytest.approx(-2.0)  # -tr/3 with ASE's sign (positive = tensile)


def _truncate(src, dst, n_lines):
    with open(src) as fh, open(dst, "w") as out:
        for k, line in enumerate(fh):
            if k >= n_lines:
                break
            out.write(line)


def test_truncated_or_wrong_files_are_named(tmp_path):
    src = shared_path(*BENCH, "mpf-alkali-TP.xyz")
    folder = tmp_path / "sets"
    folder.mkdir()
    # cut in the middle of a frame: unreadable
    _truncate(src, folder / "mpf-alkali-TP.xyz", 25)
    with pytest.raises(InputError, match="mpf-alkali-TP.xyz.*truncated"):
        load_set("mpf-alkali-TP", folder)
    # cut at a frame boundary: readable, but frames are missing
    frames = ase.io.read(src, ":5")
    _truncate(src, folder / "mpf-alkali-TP.xyz", sum(len(a) + 2 for a in frames))
    with pytest.raises(InputError, match="holds 5 frames, but this set has 460"):
        load_set("mpf-alkali-TP", folder)
    with pytest.raises(InputError, match="Unknown benchmark set 'mpf-nope'.*mpf-TP"):
        datasets.locate_set("mpf-nope", folder)
    with pytest.raises(InputError, match="neither a known benchmark set"):
        load_set(tmp_path / "missing.xyz")
    with pytest.raises(InputError, match="does not exist"):
        load_set("random-TP", folder)


@pytest.mark.parametrize("drop,message", [("stress", "frame 1 .line 4. has no stress"),
                                          ("forces", "frame 1 .line 4. has no forces"),
                                          ("energy", "frame 1 .line 4. has no energy")])
def test_missing_fields_name_frame_and_line(tmp_path, drop, message):
    frames = []
    for k in range(2):
        atoms = bulk("Al", "fcc", a=4.05 + 0.01 * k)
        atoms.calc = SinglePointCalculator(atoms, energy=-3.0, forces=np.zeros((1, 3)), stress=np.zeros(6))
        if k == 1:
            results = dict(atoms.calc.results)
            results.pop(drop)
            atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    path = tmp_path / "bad.xyz"
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(InputError, match=message):
        read_reference_file(path)


def test_download_into_cache_checks_hash(monkeypatch, tmp_path):
    monkeypatch.setenv("MATTERSIM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(datasets.ENV_DATA, raising=False)
    src = shared_path(*BENCH, "mpf-alkali-TP.xyz")
    payload = src.read_bytes()
    requested = []

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(request, timeout=None):
        requested.append(request.full_url)
        return Response(payload)

    monkeypatch.setattr(registry, "urlopen", fake_urlopen)
    data = load_set("mpf-alkali-TP", progress=False)
    assert requested == [SETS["mpf-alkali-TP"].url]
    assert data.path == tmp_path / "home" / "benchmarks" / "mpf-alkali-TP.xyz" and len(data) == 460
    load_set("mpf-alkali-TP", progress=False)  # cached: no second download
    assert len(requested) == 1
    # a corrupted download is refused and leaves nothing behind
    data.path.unlink()
    payload = payload[:-10] + b"0123456789"
    with pytest.raises(InputError, match="sha256"):
        load_set("mpf-alkali-TP", progress=False)
    assert not data.path.exists()
    monkeypatch.setattr(registry, "urlopen", lambda *a, **k: pytest.fail("must not download"))
    with pytest.raises(InputError, match="not on this machine"):
        load_set("mpf-alkali-TP", download=False)


# ----------------------------------------------------------------------------- runner


def _emt_set(path, strains, with_pressure_info=False):
    """Cu/Al cells under strain with EMT as the 'DFT' reference."""
    frames = []
    for k, s in enumerate(strains):
        atoms = bulk("Cu" if k % 2 else "Al", "fcc", a=(3.6 if k % 2 else 4.05) * (1 + s), cubic=True)
        atoms.rattle(0.02, seed=k)
        calc = EMT()
        atoms.calc = calc
        e, f, st = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
        atoms.calc = None
        atoms.info.update({"energy": e, "stress": st.ravel(), "internal_id": f"emt-{k}"})
        if with_pressure_info:
            atoms.info["pressure"] = -np.trace(st) / 3 / GPa
        atoms.arrays["forces"] = f
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return path


class Flaky(EMT):
    """EMT that raises for one structure and returns NaN forces for another (by atom count + cell size)."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        super().calculate(atoms, properties, system_changes or [])
        a = self.atoms.cell.lengths()[0]
        if abs(a - 3.6 * 0.97) < 1e-9:
            raise RuntimeError("solver exploded")
        if abs(a - 4.05 * 1.0) < 1e-9:
            self.results["forces"] = self.results["forces"] * np.nan


def test_generating_calculator_scores_zero_and_bins_by_pressure(tmp_path):
    strains = [-0.08, -0.06, -0.04, -0.03, 0.0, 0.01, -0.07, 0.02]
    data_file = _emt_set(tmp_path / "hex.xyz", strains)
    doc = run_hex(data_file, EMT(), tmp_path / "out", bins=(0, 5, 20), progress=False)
    values = _values(doc)
    for key in ("energy_mae_eV_per_atom", "force_mae_eV_per_A", "force_norm_mae_eV_per_A", "stress_mae_GPa",
                "stress_frobenius_mae_GPa"):
        assert values[key] == pytest.approx(0.0, abs=1e-7), key  # extxyz keeps ~8 decimals
    assert doc["n_failed"] == 0 and doc["n_done"] == len(strains) and doc["benchmark"] == "HEX"
    # pressure bins: counted by hand from the reference stress
    ref = read_reference_file(data_file)
    expected = {"P < 0 GPa": (ref.pressure_GPa < 0).sum(), "0-5 GPa": ((ref.pressure_GPa >= 0) & (ref.pressure_GPa < 5)).sum(),
                "5-20 GPa": ((ref.pressure_GPa >= 5) & (ref.pressure_GPa < 20)).sum(), "P ≥ 20 GPa": (ref.pressure_GPa >= 20).sum()}
    expected = {k: int(v) for k, v in expected.items() if v}
    assert {k: _values(doc, k)["n_structures"] for k in doc["groups"]} == expected
    assert sum(expected.values()) == len(strains) and len(expected) >= 2
    # the files of the layout
    out = tmp_path / "out" / "EMT"
    for name in ("metrics.json", "parity.npz", "predictions.npz", "predictions.extxyz", "run.log"):
        assert (out / name).is_file(), name
    bench = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert bench["benchmark"] == "HEX" and bench["models"] == ["EMT"] and bench["dataset"]["sha256"] == ref.sha256
    back = ase.io.read(out / "predictions.extxyz", ":")
    assert len(back) == len(strains)
    assert np.allclose(back[3].get_forces(), ref.forces[3], atol=1e-6)


def test_pressure_info_is_used_for_bins(tmp_path):
    data_file = _emt_set(tmp_path / "hex.xyz", [-0.05, 0.0], with_pressure_info=True)
    frames = ase.io.read(data_file, ":")
    frames[0].info["pressure"] = 150.0
    frames[1].info["pressure"] = 10.0
    ase.io.write(data_file, frames, format="extxyz")
    doc = run_hex(data_file, EMT(), tmp_path / "out", progress=False)
    assert {k: _values(doc, k)["n_structures"] for k in doc["groups"]} == {"0-25 GPa": 1, "150-200 GPa": 1}


def test_failures_are_listed_and_excluded(tmp_path):
    strains = [0.0, -0.03, 0.01, 0.02]  # frame 0: Al 4.05 (NaN forces), frame 1: Cu 3.6*0.97 (raises)
    data = read_reference_file(_emt_set(tmp_path / "set.xyz", strains))
    doc = run_efs(data, Flaky(), tmp_path / "out", progress=False, chunk_atoms=100)
    assert doc["n_failed"] == 2 and doc["n_done"] == 2
    errors = {f["index"]: f["error"] for f in doc["failures"]}
    assert "non-finite forces" in errors[0] and "RuntimeError: solver exploded" in errors[1]
    assert [f["id"] for f in doc["failures"]] == ["emt-0", "emt-1"]
    assert _values(doc)["n_failed"] == 2
    assert _values(doc)["energy_mae_eV_per_atom"] == pytest.approx(0.0, abs=1e-7)  # only the good ones
    log = (tmp_path / "out" / "Flaky" / "run.log").read_text()
    assert "solver exploded" in log


class Counting(EMT):
    def __init__(self, stop_after=None):
        super().__init__()
        self.calls = 0
        self.stop_after = stop_after

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        self.calls += 1
        if self.stop_after is not None and self.calls > self.stop_after:
            raise KeyboardInterrupt
        super().calculate(atoms, properties, system_changes or [])


def test_interrupted_run_resumes_without_recomputing(tmp_path):
    data = read_reference_file(_emt_set(tmp_path / "set.xyz", [0.0, 0.01, 0.02, -0.01, -0.02, 0.03]))
    first = Counting(stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        run_efs(data, first, tmp_path / "out", progress=False, chunk_atoms=4)  # one structure per chunk
    with np.load(tmp_path / "out" / "Counting" / "predictions.npz") as f:
        assert int((f["status"] == 1).sum()) == 3
    second = Counting()
    doc = run_efs(data, second, tmp_path / "out", progress=False, chunk_atoms=4)
    assert second.calls == 3 and doc["n_done"] == 6
    third = Counting()
    run_efs(data, third, tmp_path / "out", progress=False)
    assert third.calls == 0  # everything reused: the report can be regenerated without recomputing


def test_output_folder_of_another_benchmark_is_refused(tmp_path):
    data = read_reference_file(_emt_set(tmp_path / "set.xyz", [0.0]))
    run_efs(data, EMT(), tmp_path / "out", progress=False, benchmark="one")
    with pytest.raises(InputError, match="holds results of benchmark 'one'"):
        run_efs(data, EMT(), tmp_path / "out", progress=False, benchmark="two")


def test_fixture_checkpoint_on_a_few_frames_of_each_set(tmp_path, checkpoint_1m):
    """The 1M fixture checkpoint, 3 frames of every set: stored predictions equal a direct evaluation."""
    from mattersim.registry import load_calculator

    folder = shared_path(*BENCH)
    calc = load_calculator(str(checkpoint_1m))
    for name in SETS:
        data = load_set(name, folder).subset([0, 1, 2])
        doc = run_efs(data, calc, tmp_path / name, progress=False)
        assert doc["n_done"] == 3 and doc["n_failed"] == 0
        direct = evaluate_batch(calc, data.structures)
        out = tmp_path / name / "m3gnet-1M-random"
        back = ase.io.read(out / "predictions.extxyz", ":")
        for atoms, res in zip(back, direct):
            assert atoms.get_potential_energy() == pytest.approx(res["energy"], rel=1e-6)
            assert np.allclose(atoms.get_forces(), res["forces"], atol=1e-5)
        values = _values(doc)
        expected = np.mean([abs(r["energy"] - e) / len(a) for r, e, a in zip(direct, data.energy, data.structures)])
        assert values["energy_mae_eV_per_atom"] == pytest.approx(expected, rel=1e-5)
        with np.load(out / "parity.npz") as p:
            assert p["force__pred"].shape == (3 * int(data.n_atoms.sum()),)
            assert p["stress__ref"].shape == (27,)


# ----------------------------------------------------------------------------- CLI


def test_cli_bench_run_and_report(tmp_path, checkpoint_1m):
    folder = shared_path(*BENCH)
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    result = runner.invoke(app, ["bench", "run", "mpf-alkali-TP", "--data", str(folder), "--max", "4",
                                 "-m", str(checkpoint_1m), "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "Energy MAE" in result.stdout
    metrics = json.loads((tmp_path / "run" / "m3gnet-1M-random" / "metrics.json").read_text())
    assert metrics["n_items"] == 4 and metrics["dataset"]["sha256"] == SETS["mpf-alkali-TP"].sha256
    result = runner.invoke(app, ["bench", "report", str(tmp_path / "run"), "-o", str(tmp_path / "report.md")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    assert "mpf-alkali-TP" in text and "m3gnet-1M-random" in text
    assert (tmp_path / "report.html").is_file()


def test_cli_bench_user_errors(tmp_path):
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    assert_user_error(runner.invoke(app, ["bench", "run", "hex", "-m", "chgnet", "-o", str(tmp_path / "o")]),
                      "--data FILE")
    # a --data that was given but does not exist is named as such (not "pass --data")
    missing = tmp_path / "no-such-entries"
    for target in ("phonondb", "hex"):
        result = runner.invoke(app, ["bench", "run", target, "--data", str(missing), "-m", "chgnet", "-o", str(tmp_path / "o")])
        assert_user_error(result, f"--data {missing}: no such")
        assert "pass --data" not in result.stderr
    assert_user_error(runner.invoke(app, ["bench", "run", "no-such-set", "-m", "chgnet", "-o", str(tmp_path / "o")]),
                      "no-such-set")
    assert_user_error(runner.invoke(app, ["bench", "run", "mpf-TP", "-m", "chgnet", "--max", "0", "-o", str(tmp_path / "o")]),
                      "--max")
    assert_user_error(runner.invoke(app, ["bench", "report", str(tmp_path / "nothing"), "-o", str(tmp_path / "r.md")]),
                      "nothing")
    assert_user_error(runner.invoke(app, ["bench", "run", "mpf-TP", "-m", "chgnet", "--energy-convention", "MP2021",
                                          "-o", str(tmp_path / "o")]), "--energy-convention='MP2021'", "raw, mp2020")
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
