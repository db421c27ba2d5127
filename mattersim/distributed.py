"""Independent tasks in this process or on a Dask cluster (``dask.distributed``); no scheduler of our own.

Workflows and benchmarks with many independent, coarse tasks (a PhononDB entry, an elasticity entry, a
chain of hull relaxations) hand them to a :class:`TaskRunner`:

- ``TaskRunner()``: in this process, one task after the other, with the calculator given (today's batched
  path inside each task);
- ``TaskRunner(workers=N)``: a ``LocalCluster`` of N worker processes on this machine (one thread each,
  ``OMP_NUM_THREADS`` split between them, the default memory budget of each model call divided by N:
  ``MATTERSIM_PROCESSES_PER_DEVICE``, see :mod:`mattersim.memory`), started and stopped by the runner;
- ``TaskRunner(scheduler="tcp://host:8786")``: an existing ``dask.distributed`` scheduler (e.g. started by
  dask-jobqueue on SLURM/PBS), whose workers can import this package.

On Dask, each task receives the calculator of its worker: a :class:`ModelSpec` (a registry name or
checkpoint path, or the import path of any calculator factory) travels with the task, and
:func:`worker_calculator` loads the model once per worker process and keeps it; the model itself is never
pickled. Results come back to the calling process, which alone writes them (atomically) to the run's
resumable store as they arrive: a task re-run after a worker died is never written twice, and a run
interrupted as a whole resumes from what is stored. A task that raises comes back as a failure with its
error and traceback and does not stop the others; a task whose worker dies is re-run elsewhere by Dask (up
to its ``allowed-failures``, 3 by default), after which it too is a failure.

Task functions are module-level functions ``fn(calculator, payload) -> result`` of an importable module
(workers import them by name), with picklable payloads and results.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from mattersim.errors import InputError
from mattersim.memory import ENV_SHARE, release_freed_memory

__all__ = ["ModelSpec", "TaskResult", "TaskRunner", "add_dask_options", "worker_calculator", "worker_loads"]

logger = logging.getLogger("mattersim.distributed")


#: Dask's default for worker processes, MALLOC_TRIM_THRESHOLD_=65536, disables glibc's dynamic mmap
#: threshold: every large numpy/torch array is then an mmap/munmap pair, and a PhononDB entry took 1.7x as
#: long in a worker as in a plain single-thread process (measured: 18 s against 10.7 s). Local workers run
#: with glibc's default (None unsets it); set the same in the Dask config of a cluster you start yourself.
WORKER_MALLOC = {"MALLOC_TRIM_THRESHOLD_": None}


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build its calculator: ``model`` (a registry name or checkpoint path, as
    :func:`mattersim.registry.load_calculator` takes) or ``factory`` (``"package.module:callable"``, or the
    callable itself, called with ``kwargs``, a tuple of (name, value) pairs, for any other ASE calculator),
    plus the registry's ``device``, ``dtype``, ``trust_pickle`` and ``allow_untrained_elements``. Small and
    picklable; a worker keeps one calculator per :meth:`token`."""

    model: str | None = None
    factory: str | Callable | None = None
    kwargs: tuple = ()
    device: str = "cpu"
    dtype: str = "float32"
    trust_pickle: bool = False
    allow_untrained_elements: bool = False

    def __post_init__(self):
        if (self.model is None) == (self.factory is None):
            raise InputError("A model spec needs exactly one of model (a registry name or checkpoint path) and "
                             "factory ('package.module:callable').")
        if isinstance(self.factory, str) and ":" not in self.factory:
            raise InputError(f"factory {self.factory!r} must read 'package.module:callable', e.g. "
                             "'ase.calculators.emt:EMT'.")

    def token(self) -> str:
        """What identifies the calculator, the same in every process (a callable by its qualified name)."""
        f = self.factory
        name = f if f is None or isinstance(f, str) else f"{f.__module__}:{f.__qualname__}"
        return repr((self.model, name, self.kwargs, self.device, self.dtype, self.trust_pickle,
                     self.allow_untrained_elements))

    def load(self):
        if callable(self.factory):
            return self.factory(**dict(self.kwargs))
        if self.factory is not None:
            module, _, name = self.factory.partition(":")
            try:
                fn = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as exc:
                raise InputError(f"Calculator factory {self.factory!r} cannot be imported on this machine ({exc}).") from None
            return fn(**dict(self.kwargs))
        from mattersim.registry import load_calculator

        return load_calculator(self.model, device=self.device, dtype=self.dtype, trust_pickle=self.trust_pickle,
                               allow_untrained_elements=self.allow_untrained_elements)


# one calculator per spec and worker process, and how often each was loaded (tests read it through Dask)
_CALCULATORS: dict[str, Any] = {}
_LOADS: dict[str, int] = {}


def worker_calculator(spec: ModelSpec):
    """The calculator of ``spec`` in this process, loaded on first use and kept."""
    token = spec.token()
    calc = _CALCULATORS.get(token)
    if calc is None:
        calc = spec.load()
        _CALCULATORS[token] = calc
        _LOADS[token] = _LOADS.get(token, 0) + 1
    return calc


def worker_loads() -> dict[str, int]:
    """{spec token: times loaded} in this process (``client.run(worker_loads)`` asks every worker)."""
    return dict(_LOADS)


@dataclass
class TaskResult:
    """One task's outcome: ``value`` (``ok``) or ``error`` ({type, message, traceback}); ``seconds`` spent
    in the task and ``worker`` (address, or ``"local"``)."""

    index: int
    ok: bool
    value: Any = None
    error: dict | None = None
    seconds: float = 0.0
    worker: str = "local"


def _failure(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc(limit=20)}


def _call(fn: Callable, calculator, payload, *previous) -> tuple[bool, Any, dict | None, float]:
    t0 = time.perf_counter()
    try:
        return True, fn(calculator, payload, *previous), None, time.perf_counter() - t0
    except Exception as exc:  # a task that raises is a failed task, never a stopped run
        return False, None, _failure(exc), time.perf_counter() - t0


def _remote(fn: Callable, spec: ModelSpec, payload, *previous) -> tuple[bool, Any, dict | None, float, str]:
    """What runs on a worker: its calculator for ``spec``, then ``fn`` (given the outcomes of the tasks it
    depends on, each as ``(ok, value, error, seconds, worker)``)."""
    try:
        from distributed import get_worker

        where = get_worker().address
    except Exception:  # not on a worker (tests calling it directly)
        where = f"pid {os.getpid()}"
    try:
        calculator = worker_calculator(spec)
    except Exception as exc:
        return False, None, _failure(exc), 0.0, where
    try:
        return (*_call(fn, calculator, payload, *previous), where)
    finally:
        release_freed_memory()


@dataclass
class TaskRunner:
    """Runs independent tasks in this process (default), on ``workers`` local worker processes, or on the
    cluster of ``scheduler`` (an address); see the module docstring. Use it as a context manager (the
    cluster it starts is stopped on exit); ``dashboard`` is the Dask dashboard address, if any, printed
    on stderr with the number of workers when the cluster is reached (``announce``);
    ``connect_timeout`` (s) how long a ``scheduler`` may take to answer."""

    workers: int | None = None
    scheduler: str | None = None
    threads_per_worker: int = 1
    connect_timeout: float = 20.0
    announce: bool = True
    client: Any = field(default=None, repr=False)
    cluster: Any = field(default=None, repr=False)

    def __post_init__(self):
        if self.workers is not None and self.scheduler is not None:
            raise InputError("Give --workers N (local worker processes) or --scheduler ADDRESS (an existing Dask "
                             "cluster), not both.")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise InputError(f"--workers must be a positive number of worker processes, not {self.workers!r}.")

    @property
    def distributed(self) -> bool:
        return self.workers is not None or self.scheduler is not None

    @property
    def dashboard(self) -> str | None:
        """The dashboard's address when the scheduler serves one (it needs bokeh), else None."""
        if self.client is None or "dashboard" not in (self.client.scheduler_info().get("services") or {}):
            return None
        return self.client.dashboard_link

    def __enter__(self) -> "TaskRunner":
        if not self.distributed:
            return self
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise InputError("Running on Dask needs dask.distributed: pip install 'dask[distributed]' (or drop "
                             "--workers/--scheduler to run in this process).") from None
        if self.scheduler is not None:
            try:
                self.client = Client(self.scheduler, timeout=f"{self.connect_timeout}s")
            except OSError as exc:
                raise InputError(f"No Dask scheduler answers at {self.scheduler} ({exc}); start one (dask scheduler, "
                                 "or dask-jobqueue) or use --workers N for local workers.") from None
        else:
            import dask

            threads = max(1, (os.cpu_count() or 1) // self.workers)
            environ = {**{k: threads for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
                       **WORKER_MALLOC, ENV_SHARE: self.workers}
            # set before each worker process starts (the nannies keep it for the workers they restart)
            with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in environ.items()}):
                self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=self.threads_per_worker,
                                            processes=True, host="127.0.0.1", dashboard_address=":0")
            self.client = Client(self.cluster)
        line = (f"Dask: {len(self.client.scheduler_info().get('workers', {}))} workers, scheduler "
                f"{self.client.scheduler.address}" + (f", dashboard {self.dashboard}" if self.dashboard else ""))
        logger.info(line)
        if self.announce:
            print(line, file=sys.stderr, flush=True)
        return self

    @contextlib.contextmanager
    def started(self):
        """The runner, its cluster started for the block (and stopped after it) unless it already runs."""
        if not self.distributed or self.client is not None:
            yield self
            return
        with self:
            yield self

    def __exit__(self, *exc) -> bool:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None
        return False

    def run(self, fn: Callable, payloads: Sequence, *, calculator=None, spec: ModelSpec | None = None,
            on_result: Callable[[TaskResult], None] | None = None, progress: bool = False,
            description: str = "tasks") -> list[TaskResult]:
        """Run ``fn(calculator, payload)`` for every payload; ``on_result`` is called in this process as each
        one finishes (in completion order on Dask); returns the results in payload order. In this process
        the ``calculator`` is used; on Dask each worker's, from ``spec``."""
        from mattersim.io import progress_bar

        results: list[TaskResult | None] = [None] * len(payloads)
        with progress_bar(progress, len(payloads), description) as bar:
            for r in self._results(fn, payloads, calculator, spec):
                results[r.index] = r
                if on_result is not None:
                    on_result(r)
                bar.advance(1)
        return [r for r in results if r is not None]

    def _results(self, fn, payloads, calculator, spec) -> Iterable[TaskResult]:
        if not self.distributed:
            if calculator is None:
                raise InputError("Running in this process needs a calculator.")
            for i, payload in enumerate(payloads):
                ok, value, error, seconds = _call(fn, calculator, payload)
                yield TaskResult(i, ok, value, error, seconds)
            return
        futures = {self.submit(fn, payload, spec=spec): i for i, payload in enumerate(payloads)}
        yield from self.completed(futures)

    def submit(self, fn: Callable, payload, *previous, spec: ModelSpec):
        """A Dask future of ``fn(calculator, payload, *outcomes of previous)`` on a worker (``previous``:
        futures from this method, whose outcomes it waits for: a chain of dependent tasks)."""
        if spec is None:
            raise InputError("Running on Dask needs the model by name or checkpoint path (or a calculator factory), "
                             "so that each worker loads it once; a calculator object cannot be sent.")
        if self.client is None:
            raise RuntimeError("use the TaskRunner as a context manager (with TaskRunner(...) as runner:)")
        return self.client.submit(_remote, fn, spec, payload, *previous, pure=False)

    def completed(self, futures: dict) -> Iterable[TaskResult]:
        """The outcome of each future in ``futures`` ({future: index}) as it finishes, as a
        :class:`TaskResult` with that index."""
        from distributed import as_completed

        if self.dashboard:
            logger.info(f"Dask dashboard: {self.dashboard}")
        for future in as_completed(list(futures)):
            i = futures[future]
            try:
                ok, value, error, seconds, where = future.result()
            except Exception as exc:  # KilledWorker after the allowed re-runs, a lost connection
                yield TaskResult(i, False, None, _failure(exc), 0.0, "lost")
                continue
            yield TaskResult(i, ok, value, error, seconds, where)


def add_dask_options(parser) -> None:
    """``--workers N`` and ``--scheduler ADDRESS`` on an argparse parser (the benchmark scripts)."""
    parser.add_argument("--workers", type=int, default=None,
                        help="run the tasks on N local Dask worker processes (default: in this process)")
    parser.add_argument("--scheduler", default=None,
                        help="run the tasks on an existing Dask cluster (scheduler address, e.g. tcp://host:8786)")
