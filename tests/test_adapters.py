"""Batched adapters of other potentials equal their own one-structure ASE path."""

import numpy as np
import pytest
from ase.build import bulk

pytest.importorskip("chgnet")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny graphs; two threads on a busy 2-core machine crawl


def _rattled_structures():
    structures = [bulk("Si", "diamond", a=5.43).repeat(2), bulk("NaCl", "rocksalt", a=5.6), bulk("Fe", "bcc", a=2.85)]
    for s in structures:
        s.rattle(0.05, seed=1)
    return structures


@pytest.mark.parametrize("name", ["chgnet", "sevennet-0"])
def test_batched_equals_ase_path(name):
    """calculate_batch (merged graphs) against the package's own one-structure ASE path. float32 sums over
    a merged graph in another order: relative 2e-6 of the energy, 1e-5 eV/Å, 1e-6 eV/Å^3."""
    pytest.importorskip("sevenn" if name == "sevennet-0" else "chgnet")
    from mattersim.calculator import evaluate_batch
    from mattersim.registry import load_calculator

    calc = load_calculator(name)
    assert hasattr(calc, "calculate_batch")
    structures = _rattled_structures()
    batched = evaluate_batch(calc, structures)
    for atoms, res in zip(structures, batched):
        atoms = atoms.copy()
        atoms.calc = calc
        assert res["energy"] == pytest.approx(atoms.get_potential_energy(), rel=2e-6)
        np.testing.assert_allclose(res["forces"], atoms.get_forces(), atol=1e-5)
        np.testing.assert_allclose(res["stress"], atoms.get_stress(voigt=False), atol=1e-6)
        if name == "chgnet":
            np.testing.assert_allclose(res["magmoms"], calc.results["magmoms"], atol=1e-5)
    # energy and stress only (CHGNet then skips the forces' backward pass): the same numbers
    for res, alone in zip(batched, evaluate_batch(calc, structures, ("energy", "stress"))):
        assert alone["energy"] == pytest.approx(res["energy"], rel=2e-6)
        np.testing.assert_allclose(alone["stress"], res["stress"], atol=1e-6)
        if name == "chgnet":
            assert "forces" not in alone
    # one structure per call under a budget that fits only one: same results
    sizes = calc.memory_sizes(structures)
    calc.memory_budget = max(calc.memory_model(*s) for s in sizes)
    for a, b in zip(batched, evaluate_batch(calc, structures)):
        assert a["energy"] == pytest.approx(b["energy"], rel=2e-6)
        np.testing.assert_allclose(a["forces"], b["forces"], atol=1e-5)


def test_chgnet_batches_follow_the_memory_budget(monkeypatch):
    """A budget that fits one of two structures splits them into two model calls; results are unchanged."""
    from mattersim.calculator import evaluate_batch
    from mattersim.registry import load_calculator

    calc = load_calculator("chgnet")
    structures = [bulk("Si", "diamond", a=5.43).repeat(2), bulk("NaCl", "rocksalt", a=5.6)]
    for s in structures:
        s.rattle(0.05, seed=2)
    together = evaluate_batch(calc, structures)
    sizes = calc.memory_sizes(structures)
    calls = []
    original = calc.model.forward
    monkeypatch.setattr(calc.model, "forward", lambda graphs, **kw: calls.append(len(graphs)) or original(graphs, **kw))
    calc.memory_budget = max(calc.memory_model(*s) for s in sizes)  # each fits alone, not both
    apart = evaluate_batch(calc, structures)
    assert calls == [1, 1]
    for a, b in zip(together, apart):
        assert a["energy"] == pytest.approx(b["energy"], rel=1e-6)
        np.testing.assert_allclose(a["forces"], b["forces"], atol=1e-5)


def test_chgnet_batch_is_freed_before_the_next_one_runs(monkeypatch):
    """Each batch of a split call runs with its own activations only: CHGNet's energy keeps the forward
    graph (it retains it for a second derivative), so a prediction still held while the next batch runs
    doubles the peak memory (B48O6, 54 atoms, 1 GB budget: 1.63 GB over the baseline, 0.90 GB freed)."""
    import weakref

    from mattersim.registry import load_calculator

    calc = load_calculator("chgnet")
    structures = [bulk("Si", "diamond", a=5.43), bulk("NaCl", "rocksalt", a=5.6), bulk("Cu", "fcc", a=3.6)]
    sizes = calc.memory_sizes(structures)
    calc.memory_budget = max(calc.memory_model(*s) for s in sizes)  # one structure per call
    energies, alive_at_call = [], []
    original = calc.model.forward

    def forward(graphs, **kw):
        alive_at_call.append([ref() is not None for ref in energies])
        pred = original(graphs, **kw)
        energies.append(weakref.ref(pred["e"]))
        return pred

    monkeypatch.setattr(calc.model, "forward", forward)
    calc.calculate_batch(structures, ["energy", "forces", "stress"])
    assert alive_at_call == [[], [False], [False, False]]


def test_chgnet_without_derivative_graph_gives_the_same_forces():
    """CHGNet's own predict (forces with create_graph=True) against our inference path without that graph."""
    from pymatgen.io.ase import AseAtomsAdaptor

    from mattersim.adapters import chgnet_first_derivatives
    from mattersim.registry import load_calculator

    calc = load_calculator("chgnet")
    atoms = bulk("NaCl", "rocksalt", a=5.6).repeat(2)
    atoms.rattle(0.05, seed=3)
    structure = AseAtomsAdaptor.get_structure(atoms)
    reference = calc.model.predict_structure(structure, task="efs")
    with chgnet_first_derivatives():
        lean = calc.model.predict_structure(structure, task="efs")
    import chgnet.model.model as module
    import torch

    assert module.torch is torch  # restored
    # float32 backward kernels with and without a differentiable graph: agreement to rounding
    assert float(lean["e"]) == pytest.approx(float(reference["e"]), abs=1e-6)
    np.testing.assert_allclose(lean["f"], reference["f"], atol=1e-5)
    np.testing.assert_allclose(lean["s"], reference["s"], atol=1e-4)  # GPa


def test_chgnet_isolated_molecule_equals_a_big_vacuum_box():
    """CHGNet needs a lattice: a molecule (no pbc, no cell) used to end in LinAlgError. It is evaluated in a
    box wider than its cutoff, so it must equal the same molecule in a much bigger periodic box (an
    independent reference: no edge reaches an image either way), without a stress, on both paths."""
    from ase.build import molecule

    from mattersim.calculator import evaluate_batch
    from mattersim.errors import InputError
    from mattersim.registry import load_calculator

    calc = load_calculator("chgnet")
    water = molecule("H2O")
    water.rattle(0.02, seed=3)
    assert not water.pbc.any() and water.cell.rank == 0
    reference = water.copy()
    reference.center(vacuum=15.0)
    reference.pbc = True
    reference.calc = calc
    e_ref, f_ref = reference.get_potential_energy(), reference.get_forces()
    # CHGNet works in float32 through fractional coordinates of the box: the same molecule in boxes of 5
    # to 20 Å vacuum gives forces that differ by ~1.5e-4 eV/Å and energies by ~2e-6 eV (measured)
    (res,) = evaluate_batch(calc, [water], ("energy", "forces"))
    assert "stress" not in res
    assert res["energy"] == pytest.approx(e_ref, abs=5e-5)
    np.testing.assert_allclose(res["forces"], f_ref, atol=5e-4)
    atoms = water.copy()
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(e_ref, abs=5e-5)
    np.testing.assert_allclose(atoms.get_forces(), f_ref, atol=5e-4)
    assert "stress" not in calc.results
    # a slab (mixed periodicity) is a clear error, not a traceback
    slab = bulk("Si", "diamond", a=5.43, cubic=True)
    slab.pbc = [True, True, False]
    with pytest.raises(InputError, match="periodic in all three directions"):
        evaluate_batch(calc, [slab])


def test_cli_predict_and_relax_a_molecule_with_chgnet(tmp_path):
    import ase.io
    from ase.build import molecule
    from typer.testing import CliRunner

    from mattersim.cli import app

    path = tmp_path / "h2o.xyz"
    ase.io.write(path, molecule("H2O"))
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(path), "-m", "chgnet", "-o", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["relax", str(path), "-m", "chgnet", "--mode", "fixed-cell", "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    relaxed = ase.io.read(tmp_path / "r" / "relaxed.extxyz")
    assert not relaxed.pbc.any()  # still a molecule


def test_sevennet_cpu_batches_stop_at_the_edge_cap():
    """On the CPU, merged SevenNet batches stop at cpu_max_edges (large merged graphs are slower there:
    a speed cap beside the memory budget); the results do not depend on it."""
    pytest.importorskip("sevenn")
    from mattersim.calculator import evaluate_batch
    from mattersim.registry import load_calculator

    calc = load_calculator("sevennet-0")
    structures = _rattled_structures()
    edges = [e for _, e, _ in calc.memory_sizes(structures)]

    class Counting:
        def __init__(self, model):
            self.model, self.calls = model, 0

        def __call__(self, batch):
            self.calls += 1
            return self.model(batch)

        def __getattr__(self, name):
            return getattr(self.model, name)

    free = evaluate_batch(calc, structures)
    counter = Counting(calc.model)
    calc.model = counter
    try:
        calc.cpu_max_edges = 1  # every structure exceeds it: one structure per call
        capped = evaluate_batch(calc, structures)
        assert counter.calls == len(structures)
        counter.calls = 0
        calc.cpu_max_edges = sum(edges)  # all fit
        evaluate_batch(calc, structures)
        assert counter.calls == 1
    finally:
        calc.model = counter.model
    for a, b in zip(free, capped):
        assert a["energy"] == pytest.approx(b["energy"], rel=2e-6)
        np.testing.assert_allclose(a["forces"], b["forces"], atol=1e-5)
