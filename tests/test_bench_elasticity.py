"""Elasticity benchmark runner: the reference file, per-entry results, MAEs, failures, resume, the report."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from pymatgen.io.ase import AseAtomsAdaptor

from benchmarks.elasticity import load_elasticity_set, run_elasticity
from mattersim.errors import InputError
from tests.conftest import shared_path
from workflows.elastic import run_elastic


def _record(mp_id, atoms, k, g):
    return {"mp_id": mp_id, "formula": atoms.get_chemical_formula(), "bulk_modulus_vrh": k, "shear_modulus_vrh": g,
            "structure": AseAtomsAdaptor.get_structure(atoms).as_dict()}


@pytest.fixture
def emt_set(tmp_path):
    records = [_record("cu", bulk("Cu", "fcc", a=3.6), 140.0, 50.0),
               _record("al", bulk("Al", "fcc", a=4.05), 76.0, 26.0),
               _record("si", bulk("Si", "diamond", a=5.43), 98.0, 64.0)]  # EMT has no Si: fails alone
    path = tmp_path / "set.json.gz"
    path.write_bytes(gzip.compress(json.dumps(records).encode()))
    return path


def test_runner_scores_resumes_and_isolates_failures(emt_set, tmp_path):
    records, path, sha = load_elasticity_set(emt_set)
    out = tmp_path / "out"
    doc = run_elasticity(records, EMT(), out, progress=False, dataset={"name": "elasticity", "path": str(path), "sha256": sha})
    values = {m["key"]: m["value"] for m in doc["metrics"]}
    assert (values["n_entries"], values["n_succeeded"], values["n_failed"]) == (3, 2, 1)
    assert doc["failures"][0]["id"] == "si"
    # the MAE is the hand computation over what the workflow itself gives for the two EMT metals
    preds = [run_elastic(bulk(s, "fcc", a=a), EMT(), symprec=1e-3).summary["moduli"] for s, a in (("Cu", 3.6), ("Al", 4.05))]
    k_mae = np.mean([abs(preds[0]["k_vrh_GPa"] - 140.0), abs(preds[1]["k_vrh_GPa"] - 76.0)])
    g_mae = np.mean([abs(preds[0]["g_vrh_GPa"] - 50.0), abs(preds[1]["g_vrh_GPa"] - 26.0)])
    assert values["bulk_modulus_mae_GPa"] == pytest.approx(k_mae, rel=1e-6)
    assert values["shear_modulus_mae_GPa"] == pytest.approx(g_mae, rel=1e-6)
    parity = np.load(out / "EMT" / "parity.npz")
    assert list(parity["bulk_modulus__ref"]) == [140.0, 76.0]
    assert "Voigt-Reuss-Hill" in doc["definitions"]["moduli"] and doc["settings"]["ions"] == "relaxed-ion"
    entry = json.loads((out / "EMT" / "entries" / "cu.json").read_text())
    assert entry["stable"] and len(entry["elastic_tensor_ieee_GPa"]) == 6
    # each succeeded entry records its CPU time; the metrics sum them (the failed entry has none)
    cpu = [json.loads((out / "EMT" / "entries" / f"{k}.json").read_text())["timings_s"]["cpu"] for k in ("cu", "al")]
    assert all(c > 0 for c in cpu) and doc["settings"]["n_entries_with_cpu_time"] == 2
    assert doc["settings"]["compute_cpu_time_s"] == pytest.approx(sum(cpu), rel=1e-12)
    # rerun: every entry reused (the failed one too), same numbers
    again = run_elasticity(records, EMT(), out, progress=False)
    assert again["settings"]["reused"] == 3 and again["settings"]["evaluated_now"] == 0
    assert [m["value"] for m in again["metrics"]] == [m["value"] for m in doc["metrics"]]
    # the report takes the runs like the other benchmarks
    from benchmarks.report import make_report

    make_report([out], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "K_VRH MAE" in md and "bulk_modulus" in md


def test_bad_reference_files_are_named(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_elasticity_set(tmp_path / "none.json.gz")
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"mp_id\": \"x\", \"structure\": {}}]")
    with pytest.raises(InputError, match="record 0: no bulk_modulus_vrh, shear_modulus_vrh"):
        load_elasticity_set(bad)
    bad.write_text("not json")
    with pytest.raises(InputError, match="not a readable JSON"):
        load_elasticity_set(bad)


def test_the_matcalc_set_loads():
    path = shared_path("data", "matcalc", "mp-binary-pbe-elasticity-2025.1.json.gz")
    records, _, sha = load_elasticity_set(path)
    assert len(records) == 3953 and len(sha) == 64
    assert all(r["bulk_modulus_vrh"] is not None for r in records)


def test_cli_bench_run_elasticity_checks_the_file_first(tmp_path):
    from typer.testing import CliRunner

    from mattersim.cli import app
    from tests.conftest import assert_user_error

    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    result = runner.invoke(app, ["bench", "run", "elasticity", "--data", str(tmp_path / "none.json.gz"), "-m", "chgnet",
                                 "-o", str(tmp_path / "o")])
    assert_user_error(result, "none.json.gz", "does not exist")


def test_unstable_gamma_count_and_the_median_error():
    from benchmarks.elasticity import _metrics

    def rec(unstable):
        return {"status": "ok", "stable": True, "reference": {"bulk_modulus_vrh": 100.0, "shear_modulus_vrh": 50.0},
                "prediction": {"bulk_modulus_vrh": 90.0, "shear_modulus_vrh": 40.0},
                "ion_relaxation": None if unstable is None else {"unstable_gamma_modes": unstable}}

    records = [rec(None), rec(0), rec(2), rec(1)]
    records[0]["prediction"]["shear_modulus_vrh"] = -6e4  # the Reuss average of a nearly singular tensor
    out, _, _ = _metrics(records, 4, 0)
    values = {m["key"]: m["value"] for m in out}
    assert values["n_unstable_gamma"] == 2 and values["bulk_modulus_mae_GPa"] == pytest.approx(10.0)
    assert values["shear_modulus_mae_GPa"] == pytest.approx((60050.0 + 3 * 10.0) / 4)
    assert values["shear_modulus_median_ae_GPa"] == pytest.approx(10.0)  # robust to it


def test_cpu_time_leaves_out_waiting():
    """A task's CPU time is what it computed: a task that waits 0.3 s records its wall time but almost no CPU
    time (the case of a benchmark paused or sharing the machine), and entries without it are left out."""
    import time

    from benchmarks.common import _with_peak_rss, compute_times

    def task(calculator, item):
        t0 = time.perf_counter()
        time.sleep(item)
        return {"status": "ok", "timings_s": {"total": time.perf_counter() - t0}}

    rec = _with_peak_rss(None, (task, 0.3))
    assert rec["timings_s"]["total"] >= 0.3 and rec["timings_s"]["cpu"] < 0.1 and rec["peak_rss_mib"] > 0
    times = compute_times([rec, {"timings_s": {"total": 2.0}}, {"status": "failed"}])
    assert times["compute_time_s"] == pytest.approx(rec["timings_s"]["total"] + 2.0)
    assert times["compute_cpu_time_s"] == rec["timings_s"]["cpu"] and times["n_entries_with_cpu_time"] == 1
    assert compute_times([{"timings_s": {"total": 1.0}}])["compute_cpu_time_s"] is None
