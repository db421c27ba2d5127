"""PhononDB on Dask: in this process against N local worker processes, on the same entries, in one run.

    python -m benchmarks.speed_dask [--model sevennet-0] [--entries ../shared/data/phonondb/entries]
                                    [--subset .../benchmark_subset.txt] [--n 40] [--workers 2] [-o result.json]

Both runs start from an empty output folder (nothing reused) and evaluate the same first ``n`` entries of
the subset; the in-process run uses all the machine's threads (as a user's plain run would), each worker
one thread per core it is given. Reported: wall times and their ratio; the per-entry compute time summed
over the entries (the work) and the overhead per task (the Dask run's wall time times the workers, minus
that work, per entry: scheduling, transfer, the model load in each worker, idle tails); the peak RSS of
this process and of each worker; and the projected wall time of the full subset and of a 10,000-entry
database on ``--machines`` machines like this one, from the measured per-entry cost.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, peak_rss_mib, software_versions, utc_now, write_report

ENTRIES = REPO.parent / "shared" / "data" / "phonondb" / "entries"
SUBSET = REPO.parent / "shared" / "data" / "phonondb" / "benchmark_subset.txt"


def _worker_peak_rss() -> float:
    from benchmarks.common import peak_rss_mib

    return peak_rss_mib()


def main(argv=None) -> int:
    from benchmarks.phonondb import find_entries, run_phonondb
    from mattersim.distributed import ModelSpec, TaskRunner
    from mattersim.registry import load_calculator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sevennet-0")
    parser.add_argument("--entries", type=Path, default=ENTRIES)
    parser.add_argument("--subset", type=Path, default=SUBSET)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--machines", type=int, default=50, help="machines of the projection")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args(argv)

    all_entries = find_entries(args.entries, args.subset)
    entries = all_entries[: args.n]
    work = args.work or Path(tempfile.mkdtemp(prefix="speed-dask-"))
    for name in ("local", "dask"):
        shutil.rmtree(work / name, ignore_errors=True)
    calc = load_calculator(args.model)

    t0 = time.perf_counter()
    local = run_phonondb(entries, calc, work / "local", progress=False)
    wall_local = time.perf_counter() - t0

    spec = ModelSpec(model=args.model)
    t0 = time.perf_counter()
    with TaskRunner(workers=args.workers) as runner:
        t_up = time.perf_counter() - t0
        remote = run_phonondb(entries, calc, work / "dask", progress=False, runner=runner, spec=spec)
        worker_rss = runner.client.run(_worker_peak_rss)
    wall_dask = time.perf_counter() - t0

    def compute(doc):
        return float(doc["settings"]["compute_time_s"])

    n = len(entries)
    overhead = (wall_dask * args.workers - compute(remote)) / n
    per_entry_dask = wall_dask / n  # wall time per entry with this machine's workers
    report = {
        "date": utc_now(), "software": software_versions(), "model": args.model, "entries": n,
        "workers": args.workers,
        "in_process": {"wall_s": wall_local, "compute_s": compute(local), "n_done": local["n_done"]},
        "dask": {"wall_s": wall_dask, "cluster_start_s": t_up, "compute_s": compute(remote), "n_done": remote["n_done"],
                 "worker_peak_rss_mib": worker_rss},
        "speedup": wall_local / wall_dask,
        "overhead_per_task_s": overhead,
        "peak_rss_mib_this_process": peak_rss_mib(),
        "same_results": [m["value"] for m in local["metrics"]] == [m["value"] for m in remote["metrics"]],
        "projection": {
            "subset_entries": len(all_entries),
            "subset_one_machine_s": per_entry_dask * len(all_entries),
            "database_entries": 10_000,
            "database_machines": args.machines,
            "database_s": per_entry_dask * 10_000 / args.machines,
            "assumes": "the subset's mean cost per entry; the full database has larger cells on average",
        },
    }
    print(f"{n} entries, {args.model}: in process {wall_local:.0f} s, {args.workers} workers {wall_dask:.0f} s "
          f"(cluster start {t_up:.1f} s): {report['speedup']:.2f}x; overhead {overhead:.2f} s per task", flush=True)
    write_report(report, args.output)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
