"""Independent tasks on Dask (mattersim.distributed): a real dask.distributed scheduler with two worker processes
on 127.0.0.1, started and stopped by the tests. The PhononDB benchmark gives the same records there as in this
process, the model is loaded once per worker, a killed worker's task is re-run, a raising task is a failure.

Test-local functions and calculators reach the workers by value (cloudpickle.register_pickle_by_value), as a
user's own module would by import."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

import cloudpickle  # noqa: E402  (after the skip: it comes with distributed)

import test_bench_phonondb as tbp  # noqa: E402
from conftest import shared_path  # noqa: E402
from mattersim.distributed import ModelSpec, TaskRunner, worker_calculator, worker_loads  # noqa: E402
from mattersim.errors import InputError  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(tbp)


@pytest.fixture(scope="module")
def cluster():
    """A scheduler and two worker processes (one thread each) on 127.0.0.1."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as c:
        yield c


class Doubler:
    """A stand-in calculator: what the tasks below 'compute' with."""

    def __init__(self, factor=2):
        self.factor = factor


def _slow_double(calculator, x):
    time.sleep(0.4)
    if x == "boom":
        raise ValueError("boom is not a number")
    return x * calculator.factor, os.getpid()


def _pids(client) -> dict:
    return client.run(os.getpid)


# ---------------------------------------------------------------------------------------------------------
# the runner itself
# ---------------------------------------------------------------------------------------------------------


def test_in_process_runner_records_failures_and_keeps_order():
    seen = []
    res = TaskRunner().run(_slow_double, [1, "boom", 3], calculator=Doubler(3), on_result=lambda r: seen.append(r.index))
    assert [r.ok for r in res] == [True, False, True] and seen == [0, 1, 2]
    assert res[0].value[0] == 3 and res[2].value[0] == 9 and res[0].worker == "local"
    assert res[1].error["type"] == "ValueError" and "boom" in res[1].error["message"] and res[1].error["traceback"]


def test_runner_options_are_checked():
    with pytest.raises(InputError, match="not both"):
        TaskRunner(workers=2, scheduler="tcp://127.0.0.1:1")
    with pytest.raises(InputError, match="positive"):
        TaskRunner(workers=0)
    with pytest.raises(InputError, match="No Dask scheduler answers"):
        with TaskRunner(scheduler="tcp://127.0.0.1:9", connect_timeout=1.0):
            pass
    with pytest.raises(InputError, match="package.module:callable"):
        ModelSpec(factory="EMT")
    with pytest.raises(InputError, match="exactly one"):
        ModelSpec()
    # one calculator per spec and process, whatever object the factory arrives as
    spec = ModelSpec(factory="ase.calculators.emt:EMT")
    assert worker_calculator(spec) is worker_calculator(ModelSpec(factory="ase.calculators.emt:EMT"))
    assert worker_loads()[spec.token()] == 1


def test_tasks_on_two_workers_a_failure_and_a_killed_worker(cluster):
    from distributed import Client

    spec = ModelSpec(factory=Doubler, kwargs=(("factor", 5),))
    killed = []
    seen = []
    with Client(cluster) as client:
        client.wait_for_workers(2)
        pids = set(_pids(client).values())

    def on_result(r):
        seen.append(r.index)
        if not killed:  # the first result in: kill a worker that is busy with another task
            victim = next(p for p in pids if p != r.value[1]) if r.ok else next(iter(pids))
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    payloads = [1, 2, "boom", 4, 5, 6, 7, 8]
    with TaskRunner(scheduler=cluster.scheduler_address) as runner:
        res = runner.run(_slow_double, payloads, spec=spec, on_result=on_result)
        loads = runner.client.run(worker_loads)
    assert killed and sorted(seen) == list(range(len(payloads)))  # every task reported once
    assert [r.value[0] for r in res if r.ok] == [5 * x for x in payloads if x != "boom"]
    (failed,) = [r for r in res if not r.ok]
    assert failed.index == 2 and failed.error["type"] == "ValueError"
    # the killed worker's pid computed nothing after it died; the model was loaded once per live worker
    assert all(v.get(spec.token(), 0) <= 1 for v in loads.values())
    with Client(cluster) as client:  # the nanny restarted the killed worker for the next tests
        client.wait_for_workers(2, timeout=60)


def _budget_seen(calculator, _):
    from mattersim.memory import ENV_SHARE, resolve_budget

    return os.environ.get(ENV_SHARE), resolve_budget(None)


def test_local_workers_share_the_default_memory_budget(monkeypatch):
    # two workers on this machine: each call's default budget is half of what one process would get, so both
    # together stay within a third of the memory (and within Dask's per-worker limit, half of it)
    from mattersim.memory import ENV_BUDGET, ENV_SHARE, GB, total_memory_bytes

    monkeypatch.delenv(ENV_BUDGET, raising=False)
    monkeypatch.delenv(ENV_SHARE, raising=False)
    with TaskRunner(workers=2, announce=False) as runner:
        res = runner.run(_budget_seen, [0, 1], spec=ModelSpec(factory=Doubler))
    assert [r.value for r in res] == [("2", int(min(8 * GB, total_memory_bytes() / 6)))] * 2


# ---------------------------------------------------------------------------------------------------------
# the PhononDB benchmark on Dask
# ---------------------------------------------------------------------------------------------------------

VOLATILE = {"date", "timings_s", "peak_rss_mib", "worker"}


def _same_to_rounding(a, b, tol: float = 1e-10) -> bool:
    """Equal, except that floats may differ in their last bits: another process's BLAS sums in another order
    (a relaxed volume came out 13.869162605906633 here and ...645 on a worker). Strings, integers, booleans
    and the structure of lists and dicts must match exactly."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and (a == b or abs(a - b) <= tol)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_to_rounding(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same_to_rounding(x, y, tol) for x, y in zip(a, b)))
    return a == b


def test_same_to_rounding_is_strict_beyond_the_last_bits():
    assert _same_to_rounding({"v": [13.869162605906633, 2], "s": "P4/mmm"}, {"v": [13.869162605906645, 2], "s": "P4/mmm"})
    assert not _same_to_rounding({"v": [13.869162605, 2]}, {"v": [13.869162606, 2]})  # 1e-9 apart: too far
    assert not _same_to_rounding({"v": [1.0, 2]}, {"v": [1.0, 3]})  # a step count differs
    assert not _same_to_rounding({"s": True}, {"s": False}) and not _same_to_rounding([1.0], [1.0, 2.0])
    assert _same_to_rounding([float("-inf")], [float("-inf")]) and not _same_to_rounding([float("-inf")], [0.0])


def _records(folder):
    out = {}
    for f in sorted((folder / "entries").glob("*.json")):
        rec = json.loads(f.read_text())
        out[f.name] = {k: v for k, v in rec.items() if k not in VOLATILE}
    return out


def test_phonondb_on_two_workers_equals_in_process(tmp_path, cluster):
    entries_dir = shared_path("data", "phonondb", "entries")
    broken, _ = tbp._broken(tmp_path, "truncated")
    twin = tbp._copy_entry(tbp.SIC, tmp_path, "SiC-twin")  # a fourth task: more tasks than workers
    entries = [entries_dir / tbp.SIC, broken, entries_dir / tbp.NASBF6, twin]
    known = (str(entries_dir / tbp.SIC), str(entries_dir / tbp.NASBF6))
    calc = tbp.HarmonicDFT(list(known), scale=1.1)
    local = tbp.run_phonondb(entries, calc, tmp_path / "local", progress=False)
    spec = ModelSpec(factory=tbp.HarmonicDFT, kwargs=(("entries", list(known)), ("scale", 1.1)))
    with TaskRunner(scheduler=cluster.scheduler_address) as runner:
        before = runner.client.run(worker_loads)
        remote = tbp.run_phonondb(entries, calc, tmp_path / "dask", progress=False, runner=runner, spec=spec)
        loads = runner.client.run(worker_loads)
    # the same records and metrics (HarmonicDFT is float64 numpy: the same numbers to rounding)
    a, b = _records(tmp_path / "local" / "HarmonicDFT"), _records(tmp_path / "dask" / "HarmonicDFT")
    assert list(a) == list(b) and _same_to_rounding(a, b)
    assert _same_to_rounding([m["value"] for m in remote["metrics"]], [m["value"] for m in local["metrics"]])
    assert remote["failures"] == local["failures"] and len(remote["failures"]) == 1
    assert (remote["n_done"], remote["n_failed"]) == (3, 1)
    # each worker loaded the model at most once for three tasks
    token = spec.token()
    assert sum(v.get(token, 0) - before[w].get(token, 0) for w, v in loads.items()) <= 2
    assert all(v.get(token, 0) <= 1 for v in loads.values())
    workers = {json.loads(f.read_text()).get("worker") for f in (tmp_path / "dask" / "HarmonicDFT" / "entries").glob("*.json")}
    assert workers - {None} <= set(loads)
    # resume: a second run on Dask evaluates nothing
    with TaskRunner(scheduler=cluster.scheduler_address) as runner:
        again = tbp.run_phonondb(entries, calc, tmp_path / "dask", progress=False, runner=runner, spec=spec)
    assert again["settings"]["evaluated_now"] == 0 and again["settings"]["reused"] == 4


def test_a_calculator_object_cannot_go_to_dask(tmp_path):
    from benchmarks.run import run_benchmark

    with pytest.raises(InputError, match="by name or checkpoint path"):
        run_benchmark("phonondb", [tbp.HarmonicDFT([])], tmp_path, data=tmp_path, workers=2)


def test_phonondb_script_with_local_workers_and_a_checkpoint(tmp_path, small_checkpoint, capsys):
    """--workers 2 starts (and stops) its own local cluster; each worker loads the checkpoint by path."""
    import shutil

    from benchmarks.phonondb import main

    root = tmp_path / "entries"
    root.mkdir()
    shutil.copytree(shared_path("data", "phonondb", "entries") / tbp.SIC, root / tbp.SIC)
    args = ["--model", str(small_checkpoint), "--entries", str(root), "--relax-steps", "2", "--mesh", "20",
            "--no-progress"]
    assert main(args + ["-o", str(tmp_path / "local")]) == 0
    assert main(args + ["--workers", "2", "-o", str(tmp_path / "dask")]) == 0
    capsys.readouterr()
    (slug,) = json.loads((tmp_path / "dask" / "benchmark.json").read_text())["models"]
    a = json.loads((tmp_path / "local" / slug / "entries" / f"{tbp.SIC}.json").read_text())
    b = json.loads((tmp_path / "dask" / slug / "entries" / f"{tbp.SIC}.json").read_text())
    assert a["status"] == b["status"] and b["worker"].startswith("tcp://127.0.0.1")
    if a["status"] == "ok":  # random weights: whatever came out, the same in both (float32, other thread counts)
        for variant in ("no_nac", "nac"):
            assert b["prediction"][variant]["omega_max_THz"] == pytest.approx(a["prediction"][variant]["omega_max_THz"],
                                                                              rel=1e-4, abs=1e-4)
    assert main(args + ["--workers", "2", "--scheduler", "tcp://127.0.0.1:1", "-o", str(tmp_path / "x")]) == 2
    assert "not both" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# the hull on Dask
# ---------------------------------------------------------------------------------------------------------


def test_hull_on_two_workers_equals_in_process(tmp_path, cluster, monkeypatch):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from workflows.hull import HullResult, run_hull

    l10 = bulk("Cu", "fcc", a=3.85, cubic=True)
    l10.symbols[[0, 1]] = "Au"
    cands = [("Cu", bulk("Cu", "fcc", a=3.6)), ("Au", bulk("Au", "fcc", a=4.1)), ("CuAu", l10),
             ("Cu-bcc", bulk("Cu", "bcc", a=2.9))]
    kw = dict(system="Cu-Au", pressures="0:40:20", fmax=0.02, progress=False)
    local = run_hull(cands, EMT(), output_dir=tmp_path / "local", **kw)
    spec = ModelSpec(factory="ase.calculators.emt:EMT")
    with TaskRunner(scheduler=cluster.scheduler_address) as runner:
        remote = run_hull(cands, EMT(), output_dir=tmp_path / "dask", runner=runner, spec=spec, **kw)
    # EMT is deterministic float64: every relaxed enthalpy and volume is the same to rounding, every step
    # count and verdict exactly
    assert _same_to_rounding(local.summary["phases"], remote.summary["phases"])
    assert _same_to_rounding(local.summary["transitions"], remote.summary["transitions"])
    for i in range(3):
        x, y = np.load(tmp_path / "local" / "relaxed" / f"P-{i:02d}.npz"), np.load(tmp_path / "dask" / "relaxed" / f"P-{i:02d}.npz")
        # positions to rounding (a coordinate that should be 0 comes out 1e-14 in another process's BLAS)
        assert str(x["key"]) == str(y["key"]) and np.allclose(x["positions"], y["positions"], rtol=0, atol=1e-10)
    # the stores are the same: a run in this process resumes from the Dask run without a model call
    calls = []
    real = EMT.calculate
    monkeypatch.setattr(EMT, "calculate", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    again = run_hull(cands, EMT(), output_dir=tmp_path / "dask", **kw)
    assert calls == [] and again.summary["phases"] == remote.summary["phases"]
    monkeypatch.undo()
    # and a Dask run resumes from a partial store: drop the 0 GPa (last in the chain) and rerun
    (tmp_path / "dask" / "relaxed" / "P-00.npz").unlink()
    with TaskRunner(scheduler=cluster.scheduler_address) as runner:
        resumed = run_hull(cands, EMT(), output_dir=tmp_path / "dask", runner=runner, spec=spec, **kw)
    assert _same_to_rounding(resumed.summary["phases"], local.summary["phases"])
    loaded = HullResult.load(tmp_path / "dask").summary
    assert _same_to_rounding([p["enthalpy_eV_per_atom"] for p in loaded["phases"]],
                             [p["enthalpy_eV_per_atom"] for p in local.summary["phases"]])
    assert loaded["stable_sets"] == local.summary["stable_sets"]



# ---------------------------------------------------------------------------------------------------------
# energy / force / stress chunks on Dask
# ---------------------------------------------------------------------------------------------------------


def test_efs_chunks_on_two_workers_equal_in_process(tmp_path, cluster):
    from ase.calculators.emt import EMT

    from benchmarks.datasets import read_reference_file
    from benchmarks.efs import run_efs
    from test_bench_efs import _emt_set

    strains = [0.0, 0.01, 0.02, -0.01, -0.02, 0.03, 0.015]
    data = read_reference_file(_emt_set(tmp_path / "set.xyz", strains))
    local = run_efs(data, EMT(), tmp_path / "local", progress=False, chunk_atoms=8)  # two structures per chunk
    with TaskRunner(scheduler=cluster.scheduler_address) as runner:
        remote = run_efs(data, EMT(), tmp_path / "dask", progress=False, chunk_atoms=8, runner=runner,
                         spec=ModelSpec(factory="ase.calculators.emt:EMT"))
    keys = [m["key"] for m in local["metrics"] if not m["key"].startswith("time")]
    values = {m["key"]: m["value"] for m in remote["metrics"]}
    assert _same_to_rounding([values[k] for k in keys], [m["value"] for m in local["metrics"] if m["key"] in keys])
    a, b = np.load(tmp_path / "local" / "EMT" / "predictions.npz"), np.load(tmp_path / "dask" / "EMT" / "predictions.npz")
    for name in ("energy", "forces", "stress", "status"):
        np.testing.assert_array_equal(a[name], b[name])
    assert local["metrics"][0]["value"] == pytest.approx(0.0, abs=1e-9)  # EMT against its own labels


# ---------------------------------------------------------------------------------------------------------
# QHA: each volume's displaced supercells on Dask
# ---------------------------------------------------------------------------------------------------------


def test_qha_volumes_on_two_workers_equal_in_process(tmp_path, cluster):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from workflows.qha import run_qha

    settings = dict(supercell=[2, 2, 2], mesh=[5, 5, 5], volumes="-0.03:0.03:5", tmax=300.0, tstep=20.0, progress=False)
    local = run_qha(bulk("Cu", "fcc", a=3.6), EMT(), output_dir=tmp_path / "local", **settings)
    with TaskRunner(scheduler=cluster.scheduler_address) as runner:
        remote = run_qha(bulk("Cu", "fcc", a=3.6), EMT(), output_dir=tmp_path / "dask", runner=runner,
                         spec=ModelSpec(factory="ase.calculators.emt:EMT"), **settings)
    for i in range(5):
        a = np.load(tmp_path / "local" / "Cu" / f"V-{i:02d}" / "forces.npz")
        b = np.load(tmp_path / "dask" / "Cu" / f"V-{i:02d}" / "forces.npz")
        np.testing.assert_array_equal(a["forces"], b["forces"])
    ta, pa, ga = local.gibbs()
    tb, pb, gb = remote.gibbs()
    np.testing.assert_allclose(ga, gb, rtol=1e-12, atol=1e-12)  # float64 to rounding
    assert local.value_at("bulk_modulus_GPa", 300.0) == pytest.approx(remote.value_at("bulk_modulus_GPa", 300.0), rel=1e-9)


def test_active_learning_labels_on_two_workers(cluster):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from mattersim.active import label_structures

    frames = [bulk("Cu", "fcc", a=3.6 + 0.02 * k, cubic=True) for k in range(5)]
    for k, a in enumerate(frames):
        a.rattle(0.05, seed=k)
    here = label_structures(frames, EMT())
    with TaskRunner(scheduler=cluster.scheduler_address) as runner:
        there = label_structures(frames, EMT(), runner=runner, spec=ModelSpec(factory="ase.calculators.emt:EMT"))
    for a, b in zip(here, there):
        assert a.get_potential_energy() == b.get_potential_energy()
        np.testing.assert_array_equal(a.get_forces(), b.get_forces())
        np.testing.assert_array_equal(a.get_stress(), b.get_stress())
    with TaskRunner(scheduler=cluster.scheduler_address) as runner, pytest.raises(InputError, match="structure 0"):
        label_structures(frames[:1], EMT(), runner=runner, spec=ModelSpec(factory=Doubler))  # not a calculator


def test_hull_random_search_on_two_workers_equals_in_process(tmp_path, cluster):
    pytest.importorskip("pyxtal")
    from ase.calculators.emt import EMT

    from workflows.hull import run_hull

    kw = dict(system="Cu", compositions=["Cu"], search=3, search_max_atoms=4, pressures="0,10", seed=2, progress=False)
    local = run_hull([], EMT(), output_dir=tmp_path / "local", **kw)
    with TaskRunner(scheduler=cluster.scheduler_address) as runner:
        remote = run_hull([], EMT(), output_dir=tmp_path / "dask", runner=runner,
                          spec=ModelSpec(factory="ase.calculators.emt:EMT"), **kw)
    assert remote.summary["search"]["relaxations"] == 6
    for a, b in zip(local.summary["search"]["found"], remote.summary["search"]["found"]):
        assert a["label"] == b["label"] and a["spacegroup"] == b["spacegroup"]
        assert a["enthalpy_eV_per_atom"] == pytest.approx(b["enthalpy_eV_per_atom"], abs=1e-12)
    np.testing.assert_allclose([p["enthalpy_eV_per_atom"] for p in local.summary["phases"]],
                               [p["enthalpy_eV_per_atom"] for p in remote.summary["phases"]], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# elastic constants of many crystals
# ---------------------------------------------------------------------------------------------------------


def test_elastic_of_many_crystals_on_two_workers_equals_in_process(tmp_path, cluster, monkeypatch):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from workflows.elastic import run_elastic_many

    crystals = [("Cu", bulk("Cu", "fcc", a=3.62)), ("Al", bulk("Al", "fcc", a=4.05)), ("Ni", bulk("Ni", "fcc", a=3.5))]
    settings = dict(strains=(0.005, 0.01), fmax=0.001)
    local = run_elastic_many(crystals, EMT(), tmp_path / "local", **settings)
    with TaskRunner(scheduler=cluster.scheduler_address) as runner:
        remote = run_elastic_many(crystals, EMT(), tmp_path / "dask", runner=runner,
                                  spec=ModelSpec(factory="ase.calculators.emt:EMT"), **settings)
    for (label, _), a, b in zip(crystals, local, remote):
        np.testing.assert_allclose(a.c, b.c, rtol=0, atol=1e-9)
        assert a.summary["moduli"] == pytest.approx(b.summary["moduli"], abs=1e-9)
        for name in ("elastic.json", "relaxed.vasp", "stress_strain.png", "strained.extxyz", "stresses.npz"):
            assert (tmp_path / "dask" / label / name).is_file(), name
    # the folders the Dask run wrote resume in this process without a model call
    calls = []
    real = EMT.calculate
    monkeypatch.setattr(EMT, "calculate", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    again = run_elastic_many(crystals, EMT(), tmp_path / "dask", **settings)
    assert calls == [] and [r.summary["moduli"] for r in again] == [r.summary["moduli"] for r in remote]
