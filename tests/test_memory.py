"""The memory budget: its option and variable, batching under it, the memory modes of M3GNet (same results),
and the size counts the estimates use. Nothing here measures memory or time (benchmarks/speed_potential.py
does)."""

import math
import os
import platform
import sys

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from mattersim import m3gnet
from mattersim.errors import InputError
from mattersim.graph import build_structure_graph, collate
from mattersim.memory import (ENV_BUDGET, ENV_SHARE, GB, MemoryModel, budget_batches, default_budget_bytes, pair_counts,
                              release_freed_memory, resolve_budget, total_memory_bytes)
from mattersim.potential import Potential, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- the option


def test_budget_from_argument_variable_and_default(monkeypatch):
    monkeypatch.delenv(ENV_BUDGET, raising=False)
    monkeypatch.delenv(ENV_SHARE, raising=False)
    assert resolve_budget(2) == 2 * GB
    assert resolve_budget("0.5") == GB // 2
    default = resolve_budget(None)
    assert default == default_budget_bytes() and 0 < default <= 8 * GB
    monkeypatch.setenv(ENV_BUDGET, "3")
    assert resolve_budget(None) == 3 * GB
    assert resolve_budget(1) == GB  # the argument wins over the variable


def test_default_budget_is_shared_among_the_processes_of_one_device(monkeypatch):
    # N local workers on one machine: together within the third of the memory one process would get alone
    monkeypatch.delenv(ENV_BUDGET, raising=False)
    monkeypatch.delenv(ENV_SHARE, raising=False)
    total = total_memory_bytes()
    alone = default_budget_bytes()
    assert alone == int(min(8 * GB, total / 3))
    for n in (2, 3, 64):
        monkeypatch.setenv(ENV_SHARE, str(n))
        assert default_budget_bytes() == int(min(8 * GB, total / (3 * n))) == resolve_budget(None)
        assert default_budget_bytes() * n <= max(alone, total / 3) + n
    monkeypatch.setenv(ENV_BUDGET, "3")
    assert resolve_budget(None) == 3 * GB  # an explicit budget is not divided


@pytest.mark.parametrize("bad", ["two", "0", "-1", "1.5"])
def test_bad_processes_per_device_is_one_clear_error(bad, monkeypatch):
    monkeypatch.delenv(ENV_BUDGET, raising=False)
    monkeypatch.setenv(ENV_SHARE, bad)
    with pytest.raises(InputError, match=rf"{ENV_SHARE} must be a positive whole number .* got '{bad}'; set it"):
        resolve_budget(None)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.path.exists("/proc/self/statm")
                         and platform.libc_ver()[0] == "glibc"), reason="glibc's malloc_trim, Linux")
def test_freed_heap_memory_goes_back_to_the_system():
    # 4000 arrays of 64 kB come from the heap (below glibc's mmap threshold); freed, all but the last, they
    # stay resident (the last one pins the heap's top) until malloc_trim gives the free pages back
    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    arrays = [np.ones(8000) for _ in range(4000)]
    last = arrays[-1]
    del arrays
    before = rss_mib()
    release_freed_memory()
    assert before - rss_mib() > 150 and last[0] == 1.0  # of 244 MiB freed


@pytest.mark.parametrize("bad", ["abc", "-1", "0", "nan", "inf", ""])
def test_bad_budget_argument_is_one_clear_error(bad, small_checkpoint):
    if bad == "":
        bad = True  # a bool is not a size
    with pytest.raises(InputError, match=r"memory_budget_gb must be a positive number of GB, got .*; give e\.g\. 4"):
        Potential.from_checkpoint(small_checkpoint, memory_budget_gb=bad)


@pytest.mark.parametrize("bad", ["abc", "-2", "0", "1e999"])
def test_bad_budget_variable_is_one_clear_error(bad, monkeypatch):
    monkeypatch.setenv(ENV_BUDGET, bad)
    with pytest.raises(InputError, match=rf"{ENV_BUDGET} must be a positive number of GB, got '{bad}'; set it to"):
        resolve_budget(None)


# ---------------------------------------------------------------------------------------------- batching


def test_budget_batches_respects_budget_caps_and_isolates_large_structures():
    model = MemoryModel(per_atom=10, per_edge=1, per_triplet=0.5, constant=100)
    sizes = [(4, 40, 100)] * 7 + [(50, 900, 3000)] + [(2, 10, 0)] * 5
    budget = 400
    groups = list(budget_batches(sizes, model, budget, max_structures=3))
    assert [k for g in groups for k in g] == list(range(len(sizes)))  # all, in order
    for g in groups:
        total = [sum(sizes[k][i] for k in g) for i in range(3)]
        assert len(g) <= 3
        assert model(*total) <= budget or len(g) == 1
    big = next(g for g in groups if 7 in g)
    assert big == [7] and model(*sizes[7]) > budget
    assert list(budget_batches(sizes, model, math.inf)) == [list(range(len(sizes)))]


def _small_cells(n):
    cells = []
    for k in range(n):
        a = bulk("Si", "diamond", a=5.43) if k % 2 else bulk("NaCl", "rocksalt", a=5.6)
        a.rattle(0.05, seed=k)
        cells.append(a)
    return cells


def test_predict_batches_under_the_budget_equal_unbatched(small_checkpoint):
    structures = _small_cells(6) + [bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)]
    pot = Potential.from_checkpoint(small_checkpoint, dtype="float32")
    single = [pot.predict([a])[0] for a in structures]
    graphs = pot.graphs(structures)
    sizes = [pot.graph_size(g, pot.threebody_cutoff) for g in graphs]
    # a budget that holds two of the small cells; the 32-atom Cu cell is above it
    pot.memory_budget = pot.memory_estimate(*[a + b for a, b in zip(sizes[0], sizes[1])])
    groups = list(pot.batches(graphs))
    assert 2 <= len(groups) < len(structures)
    for g in groups:
        total = [sum(sizes[k][i] for k in g) for i in range(3)]
        assert pot.memory_estimate(*total) <= pot.memory_budget or len(g) == 1
    assert [6] in groups and pot.memory_estimate(*sizes[6]) > pot.memory_budget
    batched = pot.predict(structures)
    # float32 sums over batches of other sizes and, for the Cu cell, another memory mode: relative 1e-5
    for s, b in zip(single, batched):
        assert b["energy"] == pytest.approx(s["energy"], rel=1e-5)
        np.testing.assert_allclose(b["forces"], s["forces"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b["stress"], s["stress"], rtol=1e-5, atol=1e-6)


def test_budget_chooses_the_memory_mode(small_checkpoint, monkeypatch, caplog):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 1, 1))
    pot = Potential.from_checkpoint(small_checkpoint, dtype="float64")
    pot.model.edge_chunk = 64  # the recompute mode reruns one chunk: with small chunks it needs the least
    size = pot.graph_size(pot.graphs([atoms])[0], pot.threebody_cutoff)
    est = {m: pot.memory_estimate(*size, mode=m) for m in m3gnet.MEMORY_MODES}
    assert est["fast"] > est["lean"] > est["recompute"]
    used = []
    monkeypatch.setattr("mattersim.potential.memory_mode", lambda mode: used.append(mode) or m3gnet.memory_mode(mode))
    results = {}
    for budget, mode in [(est["fast"], "fast"), (est["lean"], "lean"), (est["recompute"], "recompute"),
                         (est["recompute"] / 2, "recompute")]:
        pot.memory_budget = budget
        with caplog.at_level("INFO", logger="mattersim"):
            results[budget] = pot.predict([atoms])[0]
        assert used[-1] == mode
    assert "more than the memory budget" in caplog.text and "evaluating it alone anyway" in caplog.text
    ref = results[est["fast"]]
    for res in results.values():
        assert res["energy"] == pytest.approx(ref["energy"], abs=1e-10)
        np.testing.assert_allclose(res["forces"], ref["forces"], atol=1e-10)
        np.testing.assert_allclose(res["stress"], ref["stress"], atol=1e-12)


# ---------------------------------------------------------------------------------------------- memory modes


def _graph(pot, structures):
    return collate(pot.graphs(structures), pot.threebody_cutoff, dtype=pot.dtype)


@pytest.mark.parametrize("mode", m3gnet.MEMORY_MODES)
def test_memory_modes_equal_plain_autograd(small_checkpoint, mode):
    """The hand-written first derivatives of the memory-lean paths against plain autograd (the training
    path), float64, with chunks smaller than the graph (several edge and triplet chunks, a partial last one)."""
    pot = Potential.from_checkpoint(small_checkpoint, dtype="float64")
    structures = _small_cells(3) + [Atoms("H", cell=[8, 8, 8], pbc=True), molecule("CH4")]
    structures[0] = structures[0].repeat((2, 2, 1))
    graph = _graph(pot, structures)
    pot.model.edge_chunk, pot.model.triplet_chunk = 37, 101
    with m3gnet.twice_differentiable():
        ref = pot(graph)
    with m3gnet.memory_mode(mode):
        res = pot(graph)
    for key in ("energy", "energies", "forces", "stress"):
        np.testing.assert_allclose(res[key].numpy(), ref[key].numpy(), rtol=0, atol=1e-11, err_msg=key)


def test_create_graph_still_differentiates_forces_with_frozen_weights(small_checkpoint):
    """``create_graph=True`` (a loss on forces) takes the twice-differentiable path even in inference
    mode (the memory-lean paths are first-derivative only): the gradient of a force loss with respect to
    the cell exists and matches finite differences."""
    pot = Potential.from_checkpoint(small_checkpoint, dtype="float64")
    graph = _graph(pot, [_small_cells(1)[0]])
    cell = graph.cell.clone()

    def loss(c, create_graph=False):
        graph.cell = c
        return (evaluate(pot.model, graph, stress=False, create_graph=create_graph)["forces"] ** 2).sum()

    c = cell.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(c, create_graph=True), [c])
    h = 1e-5
    step = torch.zeros_like(cell)
    step[0, 1, 2] = h
    fd = (loss(cell + step).item() - loss(cell - step).item()) / (2 * h)
    assert g[0, 1, 2].item() == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_energy_only_keeps_nothing_and_matches(small_potential):
    atoms = _small_cells(2)[1]
    full = small_potential.predict([atoms])[0]
    energy = small_potential.predict([atoms], forces=False, stress=False)[0]
    assert energy["energy"] == pytest.approx(full["energy"], abs=1e-12)


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name", ["Si", "LiMnO2", "CH4", "slab"])
def test_pair_counts_match_the_model_graph(name):
    rng = np.random.default_rng(0)
    atoms = {
        "Si": bulk("Si", "diamond", a=5.43).repeat(2),
        "LiMnO2": Atoms("LiMnO2", cell=[[3.1, 0.2, 0.1], [0.9, 4.0, -0.3], [0.4, 1.3, 5.2]],
                        scaled_positions=rng.random((4, 3)), pbc=True),
        "CH4": molecule("CH4"),
        "slab": bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 1)),
    }[name]
    if name == "slab":
        atoms.center(vacuum=8.0, axis=2)
        atoms.pbc = [True, True, False]
    g = build_structure_graph(atoms, 5.0, 4.0)
    (edges, _), (_, triplets) = pair_counts(atoms, [5.0, 4.0])
    assert edges == g.edge_index.shape[1]
    assert triplets == g.triplet_count(4.0) == collate([g], 4.0).triplets.shape[0]


def test_efs_chunks_follow_the_estimate():
    from benchmarks.efs import _chunks

    n_atoms = np.array([2, 2, 2, 8, 2, 2])
    sizes = {i: (int(n), 10 * int(n), 0) for i, n in enumerate(n_atoms)}
    model = MemoryModel(per_atom=0, per_edge=1)
    chunks = list(_chunks(range(6), n_atoms, math.inf, sizes.__getitem__, model, budget=45))
    assert chunks == [[0, 1], [2], [3], [4, 5]]  # 80 > 45: the 8-atom structure alone
    assert list(_chunks(range(6), n_atoms, 4)) == [[0, 1], [2], [3], [4, 5]]  # atoms only, as before
