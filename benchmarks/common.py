"""Pieces shared by the benchmark runners, the report and the speed scripts.

Results layout (written by every runner, read by :mod:`benchmarks.report`)::

    DIR/                          one folder per benchmark set (``mattersim bench run SET -o DIR``)
      benchmark.json              {"schema", "benchmark", "kind", "dataset", "models": [slug, ...]}
      <model-slug>/
        metrics.json              see :func:`metrics_document`
        parity.npz                "<quantity>__ref" / "<quantity>__pred" 1-d float arrays for parity plots
        run.log                   the runner's log
        ...                       runner-specific per-item predictions (resumable)

A metric is a dict ``{"key", "label", "unit", "value", "better"}`` (``better``: "lower", "higher" or
None); ``value`` is None when it cannot be computed (e.g. no successful item).
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mattersim.io import atomic_write_json, safe_filename
from workflows.outputs import software_versions  # noqa: F401  (re-exported: the benchmarks record it)

REPO = Path(__file__).resolve().parents[1]
#: the 1M-architecture checkpoint with random weights in the read-only ../shared folder
DEFAULT_CHECKPOINT = REPO.parent / "shared" / "fixtures" / "mattersim_v1_reference" / "m3gnet-1M-random.pth"

SCHEMA = "mattersim-benchmark/1"


def write_report(report: dict, output: Path | None) -> None:
    """Print the report as json and, with ``output``, write it there too (speed scripts)."""
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        Path(output).write_text(text)


def utc_now() -> str:
    """The current time, ISO 8601 in UTC (seconds)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def model_slug(info: dict[str, Any]) -> str:
    """A folder name for a model from its identity (``model_info``): its name, file-system safe."""
    return safe_filename(str(info.get("name") or "model"))


def metric(key: str, label: str, unit: str | None, value: float | None, better: str | None = "lower") -> dict:
    """One metric entry of ``metrics.json``; non-finite values become None."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = int(value)
    elif value is not None:
        value = float(value)
        if not np.isfinite(value):
            value = None
    return {"key": key, "label": label, "unit": unit, "value": value, "better": better}


def metrics_document(*, benchmark: str, kind: str, dataset: dict, model: dict, metrics: list[dict],
                     n_items: int, n_done: int, failures: list[dict], wall_time_s: float,
                     groups: dict[str, list[dict]] | None = None, extra: dict | None = None,
                     definitions: dict | None = None) -> dict:
    """The content of ``<model-slug>/metrics.json``.

    ``dataset``: {"name", "path", "sha256", "n_items"}; ``model``: the calculator's ``model_info``;
    ``failures``: [{"index", "id", "error"}] (never dropped); ``groups``: named lists of metrics for
    breakdowns (pressure bins, ...); ``extra``: runner-specific settings; ``definitions``: what the metrics
    mean (force/stress definitions, energy convention, displacement, mesh rule, ...), so that a reader can
    tell whether a number is comparable with a published one.
    """
    return {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "kind": kind,
        "dataset": dataset,
        "model": model,
        "software": software_versions(),
        "date": utc_now(),
        "wall_time_s": float(wall_time_s),
        "n_items": int(n_items),
        "n_done": int(n_done),
        "n_failed": len(failures),
        "failures": failures,
        "metrics": metrics,
        "groups": groups or {},
        **({"settings": extra} if extra else {}),
        **({"definitions": definitions} if definitions else {}),
    }


def write_benchmark_json(directory: Path, *, benchmark: str, kind: str, dataset: dict, slug: str) -> None:
    """Create or update ``DIR/benchmark.json``, adding ``slug`` to its list of models."""
    path = Path(directory) / "benchmark.json"
    doc = {"schema": SCHEMA, "benchmark": benchmark, "kind": kind, "dataset": dataset, "models": []}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("benchmark") == benchmark:
                doc["models"] = list(old.get("models", []))
        except (OSError, ValueError):
            pass
    if slug not in doc["models"]:
        doc["models"].append(slug)
    atomic_write_json(path, doc)


def model_folder(output_dir: str | Path, benchmark: str, info: dict[str, Any]) -> tuple[Path, str, Path]:
    """``(root, slug, root/slug)`` for a run of ``benchmark`` by the model ``info``, creating the folder.

    Refuses (InputError) an output folder that is a file or holds the results of another benchmark, so
    that results of different sets never mix.
    """
    from mattersim.errors import InputError

    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise InputError(f"Output folder '{root}' exists and is not a folder; choose another -o.")
    bench_json = root / "benchmark.json"
    if bench_json.is_file():
        try:
            other = json.loads(bench_json.read_text(encoding="utf-8")).get("benchmark")
        except (OSError, ValueError, AttributeError):
            other = None
        if other is not None and other != benchmark:
            raise InputError(f"'{root}' holds results of benchmark '{other}', not '{benchmark}'; use one output "
                             "folder per benchmark set.")
    slug = model_slug(info)
    out = root / slug
    out.mkdir(parents=True, exist_ok=True)
    return root, slug, out


def parse_cases(parser, text: str, known) -> list[str]:
    """A comma-separated ``--cases`` list checked against ``known``; an unknown name ends the script with
    argparse's one-line usage error naming the known ones."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"--cases {text!r}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(known)}")
    return names


def _proc_status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MiB, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mib() -> float:
    """Resident memory now (VmRSS), else the peak so far."""
    now = _proc_status_mib("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib() -> float:
    """Peak resident memory of this process: VmHWM on Linux, else ``ru_maxrss``. Linux carries
    ``ru_maxrss`` over from the parent through fork and exec, so in a subprocess it is at least the
    parent's resident memory at the fork; VmHWM belongs to the new process image alone."""
    peak = _proc_status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_json(path: Path) -> dict | None:
    """The JSON document at ``path``, or None when it is missing or unreadable (a resumable runner then
    evaluates that item again)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def entry_key(schema: str, model: dict, settings: dict, input_sha256: str) -> str:
    """sha256 of what one per-item result depends on: its format, the model identity, the settings and the
    item's input; a stored item is reused only when its key matches."""
    doc = {"schema": schema, "model": model, "settings": settings, "input_sha256": input_sha256}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def print_metrics_main(documents) -> int:
    """The tail of a runner's ``main``: print each metrics document's values as it comes from the iterable
    ``documents`` (a generator that does the work); a user error (MatterSimError) is one line on stderr and
    exit status 2, never a traceback."""
    from mattersim.errors import MatterSimError

    try:
        for doc in documents:
            print(json.dumps({m["key"]: m["value"] for m in doc["metrics"]}, indent=1))
    except MatterSimError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_entry_tasks(jobs: list[dict], task, *, calculator, runner=None, spec=None, log, progress: bool,
                    description: str, describe, retry_failed: bool = False) -> tuple[list[dict], int, int]:
    """The per-entry loop of a resumable benchmark: each job ``{"index", "id", "path", "key", "record",
    "payload"}`` is reused from its JSON file at ``path`` when the key matches (and it succeeded, or failed
    and ``retry_failed`` is off), else evaluated as ``task(calculator, payload) -> dict`` (merged into
    ``record``), in this process or on Dask (``runner``, :class:`mattersim.distributed.TaskRunner`, with the
    model ``spec`` each worker loads). This process writes each result atomically as it arrives, with the
    task's peak RSS and, on Dask, its worker; a failing task is a ``failed`` record with its error, never a
    stopped run. ``describe(record)`` gives the log line of a succeeded entry. Returns (records in index
    order, read back from disk so that metrics use JSON types; evaluated now; reused)."""
    from mattersim.distributed import TaskRunner

    records: dict[int, dict] = {}
    pending = []
    n_items = len(jobs)

    def log_entry(rec: dict, reused: bool) -> None:
        where = f"[{rec['index'] + 1}/{n_items}] {rec.get('id')}"
        if rec.get("status") == "ok":
            how = "reused" if reused else f"done in {float((rec.get('timings_s') or {}).get('total', 0.0)):.1f} s"
            log.info(f"{where} {rec.get('formula', '')}: {how}; {describe(rec)}")
        else:
            err = rec.get("error") or {}
            log.warning(f"{where} failed{' (earlier run)' if reused else ''}: {err.get('type', 'Error')}: "
                        f"{str(err.get('message', ''))[:500]}")

    for job in jobs:
        old = load_json(job["path"]) if Path(job["path"]).is_file() else None
        if (old is not None and old.get("key") == job["key"]
                and (old.get("status") == "ok" or (old.get("status") == "failed" and not retry_failed))):
            old["index"] = job["index"]
            records[job["index"]] = old
            log_entry(old, True)
        else:
            pending.append(job)

    def store(result) -> None:
        job = pending[result.index]
        rec = dict(job["record"])
        if result.ok:
            rec.update(result.value)
        else:
            err = result.error or {}
            rec.update({"status": "failed", "error": {"type": err.get("type"), "message": err.get("message")},
                        "traceback": err.get("traceback", "")})
        rec.setdefault("timings_s", {}).setdefault("total", result.seconds)
        if result.worker != "local":
            rec["worker"] = result.worker
        atomic_write_json(job["path"], rec)
        rec = load_json(job["path"]) or rec
        rec["index"] = job["index"]
        records[job["index"]] = rec
        log_entry(rec, False)

    runner = runner or TaskRunner()
    with runner.started():
        runner.run(_with_peak_rss, [(task, job["payload"]) for job in pending], calculator=calculator, spec=spec,
                   on_result=store, progress=progress, description=description)
    return [records[i] for i in sorted(records)], len(pending), n_items - len(pending)


def _with_peak_rss(calculator, payload) -> dict:
    """``task(calculator, item)`` of a (task, item) payload, with the peak RSS of the process that ran it and
    the task's CPU time (``timings_s["cpu"]``, s, all threads of that process: unlike the wall times, it does
    not count the time a shared or paused machine gave to other work)."""
    task, item = payload
    c0 = time.process_time()
    out = task(calculator, item)
    timings = {**(out.get("timings_s") or {}), "cpu": time.process_time() - c0}
    return {**out, "timings_s": timings, "peak_rss_mib": peak_rss_mib()}


def compute_times(records: list[dict]) -> dict:
    """The summed per-entry times of a benchmark's succeeded and failed entries: ``compute_time_s`` (wall,
    each entry's ``timings_s["total"]``) and ``compute_cpu_time_s`` (CPU, ``timings_s["cpu"]``, over the
    ``n_entries_with_cpu_time`` entries that recorded it: entries from before it was recorded have none)."""
    timings = [r.get("timings_s") or {} for r in records]
    cpu = [float(t["cpu"]) for t in timings if t.get("cpu") is not None]
    return {"compute_time_s": sum(float(t.get("total", 0.0)) for t in timings),
            "compute_cpu_time_s": sum(cpu) if cpu else None, "n_entries_with_cpu_time": len(cpu)}
