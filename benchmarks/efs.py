"""Energy / force / stress benchmark of one model on one reference set: :func:`run_efs`.

Writes ``DIR/<model-slug>/`` (layout in :mod:`benchmarks.common`):

- ``predictions.npz``: every structure's predicted energy (eV), forces (eV/Å, all atoms concatenated in
  dataset order), stress (3x3, eV/Å^3), a status per structure (0 to do, 1 done, 2 failed), the errors
  and the accumulated compute time; written atomically every few seconds, so an interrupted run resumes
  where it stopped (rerun the same command) and a report can be regenerated without recomputing;
- ``predictions.extxyz``: the successful structures with predicted ``energy``/``forces``/``stress`` and
  the reference as ``ref_energy``/``ref_forces``/``ref_stress`` (readable with ``ase.io.read``);
- ``metrics.json`` (all metrics, the failures, model identity, dataset hash, software, wall time),
  ``parity.npz`` (``energy`` eV/atom, ``force`` eV/Å components, ``stress`` GPa components), ``run.log``.

Structures are evaluated in batched model calls (``calculate_batch``) when the calculator can batch; a
batch that raises is retried one structure at a time so that one bad structure fails alone. Chunks (one
``evaluate_batch`` call, one progress step) are sized by the calculator's memory estimate
(:func:`mattersim.memory.calculator_memory`: at most its memory budget per chunk), or by
:data:`CHUNK_ATOMS` atoms for a calculator without one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks.common import metric, metrics_document, model_folder, peak_rss_mib, write_benchmark_json
from benchmarks.datasets import Dataset
from benchmarks.metrics import EFS_DEFINITIONS, EV_A3_TO_GPA, efs_metrics
from mattersim.calculator import evaluate_batch, model_info
from mattersim.conventions import ENERGY_CONVENTIONS, check_convention, convention_offsets
from mattersim.io import RunLog, atomic_path, atomic_write_json, full_stress, progress_bar, write_results
from mattersim.memory import GB, calculator_memory
from workflows.outputs import ArrayStore

__all__ = ["run_efs", "pressure_groups"]

logger = logging.getLogger("mattersim.bench")

_TODO, _DONE, _FAILED = 0, 1, 2
#: atoms per evaluation chunk for a calculator that reports no memory estimate
CHUNK_ATOMS = 1024
#: seconds between checkpoints of predictions.npz
SAVE_EVERY_S = 10.0


class _Store:
    """``predictions.npz`` of one model on one dataset."""

    def __init__(self, path: Path, key: str, data: Dataset):
        self.path, self._file = path, ArrayStore(path, key)
        n, n_at = len(data), int(data.n_atoms.sum())
        self.offsets = np.concatenate([[0], np.cumsum(data.n_atoms)])
        self.energy = np.full(n, np.nan)
        self.forces = np.full((n_at, 3), np.nan)
        self.stress = np.full((n, 3, 3), np.nan)
        self.status = np.zeros(n, dtype=np.int8)
        self.errors: dict[int, str] = {}
        self.elapsed = 0.0

    def load(self, log: RunLog) -> bool:
        """Read the predictions of this model and dataset (the store's key); anything else starts afresh."""
        if not self._file.load(log):
            return False
        f = self._file.data
        try:
            if f["status"].shape != self.status.shape or f["forces"].shape != self.forces.shape:
                raise ValueError("array shapes do not match the dataset")
            self.energy, self.forces, self.stress = f["energy"], f["forces"], f["stress"]
            self.status = f["status"]
            self.errors = {int(k): v for k, v in json.loads(str(f["errors"])).items()}
            self.elapsed = float(f["elapsed"])
        except Exception as exc:  # a foreign file with the right key but not our arrays
            log.warning(f"{self.path} is unreadable ({type(exc).__name__}: {exc}); starting afresh.")
            return False
        return True

    def save(self) -> None:
        self._file.data = {"energy": self.energy, "forces": self.forces, "stress": self.stress, "status": self.status,
                           "errors": np.array(json.dumps({str(k): v for k, v in self.errors.items()})),
                           "elapsed": np.array(self.elapsed)}
        self._file.save()

    def forces_of(self, i: int) -> np.ndarray:
        return self.forces[self.offsets[i]:self.offsets[i + 1]]

    def put(self, i: int, result: dict) -> None:
        n = self.offsets[i + 1] - self.offsets[i]
        energy = float(result["energy"])
        forces = np.asarray(result["forces"], dtype=float).reshape(n, 3)
        stress = result.get("stress")
        stress = np.full((3, 3), np.nan) if stress is None else full_stress(stress)
        bad = [name for name, v in (("energy", energy), ("forces", forces), ("stress", stress)) if not np.all(np.isfinite(v))]
        if bad:
            self.fail(i, f"non-finite {' and '.join(bad)} in the prediction")
            return
        self.energy[i], self.stress[i] = energy, stress
        self.forces[self.offsets[i]:self.offsets[i + 1]] = forces
        self.status[i] = _DONE
        self.errors.pop(i, None)

    def fail(self, i: int, error: str) -> None:
        self.status[i] = _FAILED
        self.errors[i] = error


def _chunks(todo: Sequence[int], n_atoms: np.ndarray, max_atoms: float, size_of=None, estimate=None,
            budget: float = math.inf):
    """Groups of ``todo`` in order, each within ``max_atoms`` atoms and, with ``size_of(i)`` (atoms, edges,
    triplets of structure i, computed as the chunks are consumed) and ``estimate``, within ``budget`` bytes;
    a structure over a bound alone is a chunk of its own."""
    current, count, total = [], 0, np.zeros(3, dtype=np.int64)
    for i in todo:
        size = np.asarray(size_of(i), dtype=np.int64) if size_of is not None else None
        if current and (count + n_atoms[i] > max_atoms
                        or (size is not None and estimate(*(int(x) for x in total + size)) > budget)):
            yield current
            current, count, total = [], 0, np.zeros(3, dtype=np.int64)
        current.append(i)
        count += int(n_atoms[i])
        if size is not None:
            total += size
    if current:
        yield current


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _evaluate_chunk(calc, structures: list) -> list[tuple[bool, dict | str]]:
    """(True, result) or (False, error text) per structure of one chunk (a task, in this process or on a
    Dask worker): one batched call; a failing batch is retried one structure at a time."""
    try:
        results = evaluate_batch(calc, structures)
        if len(results) != len(structures):
            raise RuntimeError(f"the calculator returned {len(results)} results for {len(structures)} structures")
    except Exception as exc:
        if len(structures) == 1:
            return [(False, _error_text(exc))]
        return [out for a in structures for out in _evaluate_chunk(calc, [a])]
    return [(True, r) for r in results]


def _put_chunk(store: _Store, idx: list[int], outcomes) -> None:
    for i, (ok, res) in zip(idx, outcomes):
        if not ok:
            store.fail(i, res)
            continue
        try:
            store.put(i, res)
        except Exception as exc:  # malformed result (missing key, wrong shape)
            store.fail(i, _error_text(exc))


def pressure_groups(data: Dataset, ok: np.ndarray, store: _Store, edges: Sequence[float],
                    offset: np.ndarray | None = None) -> dict[str, list[dict]]:
    """The metrics per reference-pressure bin ``[edges[k], edges[k+1])`` (GPa); open bins below/above when used."""
    edges = [float(e) for e in edges]
    bounds = [(-np.inf, edges[0])] + list(zip(edges[:-1], edges[1:])) + [(edges[-1], np.inf)]
    groups = {}
    for lo, hi in bounds:
        members = (data.pressure_GPa >= lo) & (data.pressure_GPa < hi)
        if not members.any():
            continue
        name = (f"P < {lo if np.isfinite(lo) else hi:g} GPa" if not np.isfinite(lo) else
                f"P ≥ {lo:g} GPa" if not np.isfinite(hi) else f"{lo:g}-{hi:g} GPa")
        sel = np.flatnonzero(members & ok)
        groups[name] = _metrics(data, store, sel, offset) + [
            metric("n_structures", "Structures in the bin", None, int(members.sum()), None),
            metric("n_failed", "Failed structures in the bin", None, int((members & ~ok).sum()), "lower"),
        ]
    return groups


def _metrics(data: Dataset, store: _Store, sel: np.ndarray, offset: np.ndarray | None = None) -> list[dict]:
    has_stress = bool(len(sel)) and np.all(np.isfinite(store.stress[sel]))
    return efs_metrics(data.n_atoms[sel], data.energy[sel], store.energy[sel], [data.forces[i] for i in sel],
                       [store.forces_of(i) for i in sel], data.stress[sel],
                       store.stress[sel] if has_stress else None,
                       energy_offset=None if offset is None else offset[sel])


def _energy_matching(data: Dataset, info: dict, override: str | None, log) -> tuple[np.ndarray | None, dict]:
    """The per-structure offsets (eV) that put the model's energies into the reference's convention (None
    when none is needed) and the ``definitions.energy_convention`` record of ``metrics.json``."""
    reference = data.energy_convention
    if override is not None:
        model, source = check_convention(override, "energy_convention"), "given for this run"
    elif info.get("energy_convention") is not None:
        model, source = check_convention(info["energy_convention"], "the model's energy_convention"), "model registry"
    else:
        model, source = None, "not recorded by the model: taken to be the reference's"
    record = {"reference": reference, "model": model, "model_source": source,
              "meaning": {k: v for k, v in ENERGY_CONVENTIONS.items() if k in (reference, model)}}
    if model is None or model == reference:
        record["conversion"] = "none (same convention)" if model else "none"
        return None, record
    offsets, errors = convention_offsets(data.structures, model, reference)
    record["conversion"] = (f"MP2020 corrections {'subtracted from' if reference == 'raw' else 'added to'} the "
                            "predictions (pymatgen MaterialsProject2020Compatibility, GGA+U where MP's relax set "
                            "uses it) before energy_mae/rmse/mean_error; energy_mae_as_predicted is unconverted")
    record["n_not_convertible"] = len(errors)
    record["not_convertible"] = [{"index": i, "id": data.ids[i], "reason": r} for i, r in sorted(errors.items())]
    log.info(f"energies: model '{model}', reference '{reference}': predictions converted by the MP2020 "
             f"corrections ({len(errors)} structure(s) the scheme rejects are left out of the converted energy "
             "metrics)")
    return offsets, record


def _write_outputs(out: Path, data: Dataset, store: _Store, info: dict, offset: np.ndarray | None) -> None:
    ok = np.flatnonzero(store.status == _DONE)
    matched = store.energy[ok] if offset is None else store.energy[ok] + offset[ok]
    parity = {  # energies in the reference's convention; NaN where a conversion is undefined
        "energy__ref": data.energy[ok] / data.n_atoms[ok], "energy__pred": matched / data.n_atoms[ok],
        "force__ref": np.concatenate([data.forces[i].ravel() for i in ok]) if len(ok) else np.zeros(0),
        "force__pred": np.concatenate([store.forces_of(i).ravel() for i in ok]) if len(ok) else np.zeros(0),
        "stress__ref": data.stress[ok].ravel() * EV_A3_TO_GPA, "stress__pred": store.stress[ok].ravel() * EV_A3_TO_GPA,
    }
    with atomic_path(out / "parity.npz") as tmp:
        np.savez_compressed(tmp, **parity)
    results = [{"energy": store.energy[i], "forces": store.forces_of(i), "stress": store.stress[i],
                "ref_energy": data.energy[i], "ref_forces": data.forces[i], "ref_stress": data.stress[i]} for i in ok]
    write_results(out / "predictions.extxyz", [data.structures[i] for i in ok], results, info,
                  labels=[data.ids[i] for i in ok])


def run_efs(data: Dataset, calculator, output_dir: str | os.PathLike, *, benchmark: str | None = None,
            chunk_atoms: int | None = None, pressure_bins: Sequence[float] | None = None, progress: bool = True,
            kind: str = "efs", energy_convention: str | None = None, runner=None, spec=None) -> dict:
    """Evaluate ``calculator`` on every structure of ``data`` and write the results to ``output_dir``.

    Chunks of structures (one ``evaluate_batch`` call each) stay within the calculator's memory budget by
    its estimate and, if given, within ``chunk_atoms`` atoms (default: no atom bound when the calculator
    reports its memory, else :data:`CHUNK_ATOMS`).

    Returns the ``metrics.json`` document. ``pressure_bins`` (GPa edges) adds one metrics group per
    reference-pressure bin. Rerunning with the same output folder, model and dataset resumes; a
    different model goes to its own subfolder; the same model on another dataset version starts afresh
    (the old predictions are kept as ``predictions.npz.old``).

    Energies are compared in the reference's convention (``raw`` or ``mp2020``, :mod:`mattersim.conventions`):
    the model's convention comes from its ``model_info`` (the registry records it) or ``energy_convention``
    (for any other calculator); a model without one is taken to share the reference's.

    ``runner`` (:class:`mattersim.distributed.TaskRunner` on Dask) with ``spec``: each chunk is a task there;
    the predictions are stored here as chunks come back (checkpointed like the in-process run).
    """
    if energy_convention is not None:
        check_convention(energy_convention, "energy_convention")
    benchmark = benchmark or data.name
    info = model_info(calculator)
    root, slug, out = model_folder(output_dir, benchmark, info)
    dataset = data.describe()
    key = json.dumps({"dataset_sha256": data.sha256, "n": len(data), "model": info.get("name"),
                      "model_sha256": info.get("sha256"), "version": info.get("version")}, sort_keys=True)
    store = _Store(out / "predictions.npz", key, data)
    with RunLog(out / "run.log", logger) as log:
        resumed = store.load(log)
        todo = np.flatnonzero(store.status == _TODO).tolist()
        log.info(f"{benchmark}: {len(data)} structures ({int(data.n_atoms.sum())} atoms) from {data.path} "
                 f"(sha256 {data.sha256[:12]}), model {info.get('name')} (sha256 {str(info.get('sha256'))[:12]}); "
                 f"{len(data) - len(todo)} already done{' (resumed)' if resumed else ''}, {len(todo)} to evaluate")
        for note in data.notes:
            log.warning(f"dataset: {note}")
        plan = calculator_memory(calculator)
        size_of, estimate, budget = None, None, math.inf
        if plan is not None:
            sizes, estimate, budget = plan
            size_of = lambda i: sizes([data.structures[i]])[0]  # noqa: E731
        max_atoms = chunk_atoms if chunk_atoms is not None else (math.inf if plan is not None else CHUNK_ATOMS)
        clock = {"t0": time.perf_counter(), "saved": time.perf_counter()}

        def checkpoint(force: bool = False) -> None:
            if force or time.perf_counter() - clock["saved"] > SAVE_EVERY_S:
                store.elapsed += time.perf_counter() - clock["t0"]
                clock["t0"] = clock["saved"] = time.perf_counter()
                store.save()

        chunks = list(_chunks(todo, data.n_atoms, max_atoms, size_of, estimate, budget))
        try:
            if runner is not None and runner.distributed:  # one task per chunk; results stored here
                def on_result(r) -> None:
                    idx = chunks[r.index]
                    _put_chunk(store, idx, r.value if r.ok else [(False, f"{r.error['type']}: {r.error['message'][:300]}")] * len(idx))
                    checkpoint()

                with runner.started():
                    runner.run(_evaluate_chunk, [[data.structures[i] for i in idx] for idx in chunks], spec=spec,
                               on_result=on_result, progress=progress, description=f"{benchmark} · {info.get('name')}")
            else:
                with progress_bar(progress, len(todo), f"{benchmark} · {info.get('name')}") as bar:
                    for idx in chunks:
                        _put_chunk(store, idx, _evaluate_chunk(calculator, [data.structures[i] for i in idx]))
                        bar.advance(len(idx))
                        checkpoint()
        finally:
            checkpoint(force=True)
        ok_mask = store.status == _DONE
        failures = [{"index": int(i), "id": data.ids[i], "error": store.errors.get(int(i), "unknown")}
                    for i in np.flatnonzero(store.status == _FAILED)]
        for f in failures:
            log.warning(f"failed: structure {f['index']} ({f['id']}): {f['error']}")
        offset, convention = _energy_matching(data, info, energy_convention, log)
        metrics = _metrics(data, store, np.flatnonzero(ok_mask), offset) + [
            metric("n_structures", "Structures", None, len(data), None),
            metric("n_failed", "Failed structures", None, len(failures), "lower"),
            metric("time_ms_per_atom", "Compute time per atom", "ms",
                   1e3 * store.elapsed / max(1, int(data.n_atoms[ok_mask].sum())), None),
        ]
        groups = pressure_groups(data, ok_mask, store, pressure_bins, offset) if pressure_bins else None
        doc = metrics_document(benchmark=benchmark, kind=kind, dataset=dataset, model=info, metrics=metrics,
                               n_items=len(data), n_done=int(ok_mask.sum()), failures=failures,
                               wall_time_s=store.elapsed, groups=groups,
                               extra={"chunk_atoms": None if math.isinf(max_atoms) else int(max_atoms),
                                      "memory_budget_gb": None if plan is None else budget / GB,
                                      "pressure_bins_GPa": list(pressure_bins) if pressure_bins else None,
                                      "batched": hasattr(calculator, "calculate_batch"),
                                      "peak_rss_mib": peak_rss_mib()},
                               definitions={**EFS_DEFINITIONS, "energy_convention": convention})
        _write_outputs(out, data, store, info, offset)
        atomic_write_json(out / "metrics.json", doc)
        write_benchmark_json(root, benchmark=benchmark, kind=kind, dataset=dataset, slug=slug)
        summary = ", ".join(f"{m['key']} {m['value']:.4g}" for m in metrics[:8] if m["value"] is not None)
        log.info(f"done: {int(ok_mask.sum())} of {len(data)} structures, {len(failures)} failed, "
                 f"{store.elapsed:.1f} s compute; {summary}")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.efs SET --model M [--data DIR] -o OUT``."""
    import argparse

    from benchmarks.datasets import load_set
    from mattersim.registry import load_calculator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set", help="a known set name or an extxyz file")
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--data", default=None, help="folder holding the set files")
    parser.add_argument("--max", type=int, default=None, help="only the first N structures")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    data = load_set(args.set, args.data)
    if args.max:
        data = data.subset(range(min(args.max, len(data))))
    for name in args.model:
        doc = run_efs(data, load_calculator(name), args.output)
        print(json.dumps({m["key"]: m["value"] for m in doc["metrics"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
