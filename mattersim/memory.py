"""Memory budget of model calls: the budget option, per-batch estimates, and batching under the budget.

Every potential sizes its batches by an estimate of the memory one model call needs (bytes, on the device
that runs it), from the batch's atoms, edges and triplets (or bond-graph angles) with per-model
coefficients, and keeps each batch under a budget. A structure whose estimate alone exceeds the budget is
evaluated alone (MatterSim then uses its lowest-memory mode, see :mod:`mattersim.m3gnet`).

The budget is the working memory of one call, on top of what the process holds anyway (Python, torch,
the weights). It is, in this order: the ``memory_budget_gb`` argument, the ``MATTERSIM_MEMORY_BUDGET_GB``
environment variable, or ``min(8 GB, a third of the device's memory)`` (RAM for the CPU, the GPU's memory
for CUDA), which leaves room on a 24 GB machine. Where N processes share the device (N local Dask workers,
which get ``MATTERSIM_PROCESSES_PER_DEVICE=N`` from :class:`mattersim.distributed.TaskRunner`; set it
yourself for the workers of a cluster you start), the default is ``min(8 GB, a third of the memory / N)``:
the calls of all N together stay within a third of it. Here 1 GB = 2**30 bytes.

This module imports no torch at import time.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from mattersim.errors import InputError

GB = 2**30
ENV_BUDGET = "MATTERSIM_MEMORY_BUDGET_GB"
#: how many processes share this process's device (local Dask workers): the default budget is divided
ENV_SHARE = "MATTERSIM_PROCESSES_PER_DEVICE"
#: the default budget: at most this many GB ...
DEFAULT_MAX_GB = 8.0
#: ... and at most this fraction of the device's memory
DEFAULT_FRACTION = 1.0 / 3.0


def total_memory_bytes(device="cpu") -> int | None:
    """Physical memory of the machine (CPU) or of the GPU, in bytes, or None if unknown."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if kind == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        try:
            import psutil

            return int(psutil.virtual_memory().total)
        except ImportError:
            return None


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError, TypeError):
        return None


#: glibc's ``malloc_trim`` (None where there is none: macOS, musl)
MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the operating system (``malloc_trim(0)``; a no-op without glibc).
    Resident memory otherwise stays at a process's peak: a Dask worker runs it after each task, so that one
    large task does not leave its peak resident for the next (and past Dask's memory limit of the worker,
    which restarts it and loses its task). Microseconds to milliseconds; the freed pages fault in again
    when reused, so not after every model call (B48O6's elastic entry: 462 s against 355 s)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def processes_per_device() -> int:
    """``$MATTERSIM_PROCESSES_PER_DEVICE`` (1 when unset); anything but a positive integer raises
    :class:`InputError`."""
    text = os.environ.get(ENV_SHARE, "").strip()
    if not text:
        return 1
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(f"The environment variable {ENV_SHARE} must be a positive whole number of processes "
                         f"sharing the device, got {text!r}; set it to e.g. 2 or unset it.")
    return n


def default_budget_bytes(device="cpu") -> int:
    """``min(8 GB, a third of the device's memory / N)``, N the processes sharing the device
    (:func:`processes_per_device`); 8 GB / N where the memory is unknown."""
    total = total_memory_bytes(device)
    cap = DEFAULT_MAX_GB * GB
    n = processes_per_device()
    return int(cap / n if total is None else min(cap, DEFAULT_FRACTION * total / n))


def _parse_gb(value, what: str, fix: str) -> float:
    try:
        gb = float(value)
    except (TypeError, ValueError):
        gb = math.nan
    if isinstance(value, bool) or not math.isfinite(gb) or gb <= 0:
        raise InputError(f"{what} must be a positive number of GB, got {value!r}; {fix}.")
    return gb


def resolve_budget(memory_budget_gb: float | str | None = None, device="cpu") -> int:
    """The memory budget in bytes: ``memory_budget_gb`` if given, else ``$MATTERSIM_MEMORY_BUDGET_GB``,
    else :func:`default_budget_bytes`. A value that is not a positive number raises :class:`InputError`."""
    if memory_budget_gb is not None:
        gb = _parse_gb(memory_budget_gb, "memory_budget_gb", "give e.g. 4 for 4 GB")
    else:
        text = os.environ.get(ENV_BUDGET, "").strip()
        if not text:
            return default_budget_bytes(device)
        gb = _parse_gb(text, f"The environment variable {ENV_BUDGET}", "set it to e.g. 4 (GB) or unset it")
    return int(gb * GB)


@dataclass(frozen=True)
class MemoryModel:
    """Bytes of one model call: ``constant + per_atom * atoms + per_edge * edges + per_triplet * triplets``.

    ``edges`` and ``triplets`` are those of the model's own graph (for CHGNet: atom-graph edges and
    bond-graph angles)."""

    per_atom: float
    per_edge: float
    per_triplet: float = 0.0
    constant: float = 0.0

    def __call__(self, n_atoms: int, n_edges: int, n_triplets: int = 0) -> int:
        return int(self.constant + self.per_atom * n_atoms + self.per_edge * n_edges + self.per_triplet * n_triplets)


def budget_batches(
    sizes: Sequence[tuple[int, int, int]],
    estimate: Callable[[int, int, int], float],
    budget: float,
    *,
    max_atoms: float = math.inf,
    max_edges: float = math.inf,
    max_structures: float = math.inf,
) -> Iterator[list[int]]:
    """Indices of structures grouped greedily, in order, so that each group's summed ``(atoms, edges,
    triplets)`` has ``estimate(...) <= budget`` and stays within the caps. A structure that exceeds the
    budget or a cap alone forms a group of its own."""
    current: list[int] = []
    total = np.zeros(3, dtype=np.int64)
    for k, size in enumerate(sizes):
        size = np.asarray(size, dtype=np.int64)
        if current:
            a, e, t = (int(x) for x in total + size)
            if a > max_atoms or e > max_edges or len(current) + 1 > max_structures or estimate(a, e, t) > budget:
                yield current
                current, total = [], np.zeros(3, dtype=np.int64)
        current.append(k)
        total += size
    if current:
        yield current


def pair_counts(atoms, cutoffs: Iterable[float]) -> list[tuple[int, int]]:
    """For each cutoff (Å): the number of directed neighbour pairs within it (edges) and the number of
    ordered pairs of distinct such edges sharing their centre atom (triplets, angles), with the periodic
    images of ``atoms`` (vesin). Non-periodic directions have no images; a structure without any periodic
    direction is treated as a molecule."""
    from vesin import NeighborList

    cutoffs = [float(c) for c in cutoffs]
    positions = np.asarray(atoms.positions, dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.asarray(atoms.cell[:], dtype=np.float64)
    if not pbc.any() or abs(np.linalg.det(cell)) < 1e-6:
        extent = positions.max(axis=0) - positions.min(axis=0) if len(positions) else np.zeros(3)
        cell, pbc = np.diag(extent + 2.0 * max(cutoffs) + 1.0), np.zeros(3, dtype=bool)
        positions = positions - positions.min(axis=0)
    nl = NeighborList(cutoff=max(cutoffs), full_list=True)
    periodic = True if pbc.all() else [bool(p) for p in pbc]
    i, d = nl.compute(points=positions, box=cell, periodic=periodic, quantities="id")
    out = []
    for c in cutoffs:
        inside = i[d <= c]
        k = np.bincount(inside, minlength=len(positions)).astype(np.int64)
        out.append((int(inside.size), int((k * (k - 1)).sum())))
    return out


def calculator_memory(calc):
    """``(sizes, estimate, budget)`` of a calculator that sizes its batches by memory, else None:
    ``sizes(structures)`` gives each structure's ``(atoms, edges, triplets)`` in the model's own graph
    (estimated with vesin, without building the model's graph), ``estimate`` a :class:`MemoryModel` of one
    call (forces and stress), ``budget`` bytes. Knows :class:`mattersim.calculator.MatterSimCalculator`
    (its ``potential``), the adapters of :mod:`mattersim.adapters` (``memory_sizes``, ``memory_model``,
    ``memory_budget``) and composites (their ``potential_calc``)."""
    inner = getattr(calc, "potential_calc", None)
    if inner is not None:
        return calculator_memory(inner)
    pot = getattr(calc, "potential", None)
    if pot is not None and hasattr(pot, "memory_model") and hasattr(pot, "memory_budget"):
        cutoffs = (pot.cutoff, pot.threebody_cutoff)

        def sizes(structures):
            out = []
            for atoms in structures:
                (edges, _), (_, triplets) = pair_counts(atoms, cutoffs)
                out.append((len(atoms), edges, triplets))
            return out

        return sizes, pot.memory_model("fast"), pot.memory_budget
    if all(hasattr(calc, k) for k in ("memory_sizes", "memory_model", "memory_budget")):
        return calc.memory_sizes, calc.memory_model, calc.memory_budget
    return None
