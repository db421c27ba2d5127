"""Tests of mattersim.relax with ASE's EMT calculator (no model, no downloads)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS
from ase.units import GPa

import mattersim.relax as relax_mod
from mattersim.calculator import evaluate_batch
from mattersim.errors import InputError
from mattersim.relax import BatchRelaxer, RelaxResult, relax


def _emt_lattice_constant(symbol: str, guess: float) -> float:
    """Independent reference: equation-of-state fit of fcc EMT energies."""
    from ase.eos import EquationOfState

    volumes, energies = [], []
    for a in np.linspace(guess * 0.98, guess * 1.02, 11):
        atoms = bulk(symbol, "fcc", a=a)
        atoms.calc = EMT()
        volumes.append(atoms.get_volume())
        energies.append(atoms.get_potential_energy())
    v0, _, _ = EquationOfState(volumes, energies, eos="birchmurnaghan").fit()
    return (4.0 * v0) ** (1.0 / 3.0)  # primitive fcc cell holds a^3/4


def _fcc_a(atoms) -> float:
    return (4.0 * atoms.get_volume() / len(atoms)) ** (1.0 / 3.0)


def test_strained_cu_relaxes_to_emt_lattice_constant():
    a_ref = _emt_lattice_constant("Cu", 3.59)
    atoms = bulk("Cu", "fcc", a=3.75)  # 4 % strained
    res = relax(atoms, EMT(), fmax=1e-4, steps=1000, mode="full", optimizer="BFGS")
    assert isinstance(res, RelaxResult)
    assert res.converged
    assert abs(_fcc_a(res.atoms) - a_ref) < 1e-3
    # the input is not modified
    assert atoms.cell[0, 1] == pytest.approx(3.75 / 2)

    # ASE's own FrechetCellFilter + BFGS gives the same structure
    ref = bulk("Cu", "fcc", a=3.75)
    ref.calc = EMT()
    BFGS(FrechetCellFilter(ref), logfile=None).run(fmax=1e-4, steps=1000)
    assert abs(_fcc_a(res.atoms) - _fcc_a(ref)) < 1e-4
    assert res.energy == pytest.approx(ref.get_potential_energy(), abs=1e-6)
    # at zero pressure the enthalpy is the energy and the stress vanishes
    assert res.enthalpy == pytest.approx(res.energy)
    assert np.abs(res.stress).max() < 1e-4
    assert res.volume == pytest.approx(res.atoms.get_volume())
    assert res.initial_volume == pytest.approx(atoms.get_volume())
    # the relaxed copy carries its final results
    assert res.atoms.get_potential_energy() == pytest.approx(res.energy)


@pytest.mark.parametrize("optimizer", ["FIRE", "LBFGS"])
def test_other_optimizers_reach_the_same_minimum(optimizer):
    a_ref = _emt_lattice_constant("Cu", 3.59)
    res = relax(bulk("Cu", "fcc", a=3.50), EMT(), fmax=5e-4, steps=1000, optimizer=optimizer)
    assert res.converged
    assert abs(_fcc_a(res.atoms) - a_ref) < 2e-3


def test_hydrostatic_pressure_shrinks_volume_and_balances_stress():
    p = 5.0  # GPa
    res0 = relax(bulk("Al", "fcc", a=4.05), EMT(), fmax=1e-4, steps=1000, optimizer="BFGS")
    res = relax(bulk("Al", "fcc", a=4.05), EMT(), pressure=p, fmax=1e-4, steps=1000, optimizer="BFGS")
    assert res0.converged and res.converged
    assert res.volume < res0.volume
    # equilibrium under pressure P: stress = -P on the diagonal (ASE sign convention), no shear
    assert np.allclose(np.diag(res.stress), -p * GPa, atol=2e-4 * GPa * 10)
    assert np.abs(res.stress - np.diag(np.diag(res.stress))).max() < 1e-5
    assert res.pressure == pytest.approx(p, abs=0.02)
    assert res.target_pressure == p
    assert res.enthalpy == pytest.approx(res.energy + p * GPa * res.volume)
    d = res.to_dict()
    assert d["target_pressure"] == p and d["converged"] is True
    assert np.asarray(d["stress"]).shape == (3, 3)


def test_fixed_volume_keeps_volume_exactly():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    # non-hydrostatic strain: tetragonal distortion plus shear
    atoms.set_cell(atoms.cell[:] @ np.array([[1.04, 0.02, 0.0], [0.0, 0.98, 0.0], [0.0, 0.0, 0.99]]), scale_atoms=True)
    v0 = atoms.get_volume()
    res = relax(atoms, EMT(), fmax=1e-3, steps=1000, mode="fixed_volume", optimizer="BFGS")
    assert res.converged
    assert res.volume == pytest.approx(v0, rel=1e-10)
    assert not np.allclose(res.atoms.cell[:], atoms.cell[:], atol=1e-3)  # the shape did change
    # deviatoric stress relaxed, hydrostatic part remains
    dev = res.stress - np.eye(3) * np.trace(res.stress) / 3
    assert np.abs(dev).max() < 1e-3


def test_fixed_volume_accepts_hyphenated_mode():
    res = relax(bulk("Cu", "fcc", a=3.7), EMT(), fmax=1e-3, mode="fixed-volume")
    assert res.mode == "fixed_volume"


def test_fixed_cell_keeps_cell_and_relaxes_positions():
    atoms = bulk("Cu", "fcc", a=3.65, cubic=True) * (2, 1, 1)
    atoms.rattle(0.05, seed=3)
    res = relax(atoms, EMT(), fmax=1e-3, steps=500, mode="fixed_cell")
    assert res.converged
    assert np.array_equal(res.atoms.cell[:], atoms.cell[:])
    assert np.abs(res.atoms.get_forces()).max() < 1e-3
    assert not np.allclose(res.atoms.positions, atoms.positions)
    assert res.fmax < 1e-3


def test_too_few_steps_is_reported_not_accepted(caplog):
    atoms = bulk("Cu", "fcc", a=3.9)
    with caplog.at_level(logging.WARNING, logger="mattersim.relax"):
        res = relax(atoms, EMT(), fmax=1e-4, steps=2, label="strained-Cu")
    assert res.converged is False
    assert res.steps == 2
    assert res.fmax > 1e-4
    assert any("did not converge" in r.getMessage() and "strained-Cu" in r.getMessage() for r in caplog.records)


def test_bad_settings_raise_input_error():
    atoms = bulk("Cu")
    with pytest.raises(InputError, match="mode"):
        relax(atoms, EMT(), mode="sideways")
    with pytest.raises(InputError, match="optimizer"):
        relax(atoms, EMT(), optimizer="newton")
    with pytest.raises(InputError, match="fmax"):
        relax(atoms, EMT(), fmax=-1)
    from ase import Atoms

    molecule = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])
    with pytest.raises(InputError, match="fixed-cell"):
        relax(molecule, EMT(), mode="full")
    res = relax(molecule, EMT(), mode="fixed_cell", fmax=1e-3)
    assert res.converged and res.stress is None and res.volume is None


def test_trajectory_and_logfile(tmp_path):
    from ase.io import read

    traj = tmp_path / "r.traj"
    log = tmp_path / "r.log"
    res = relax(bulk("Cu", "fcc", a=3.7), EMT(), fmax=1e-2, optimizer="BFGS", trajectory=traj, logfile=log)
    frames = read(traj, ":")
    assert len(frames) == res.steps + 1
    assert log.read_text().strip()


# ---------------------------------------------------------------------------------------------------------
# BatchRelaxer
# ---------------------------------------------------------------------------------------------------------


def _structures():
    s = []
    a = bulk("Cu", "fcc", a=3.75)
    a.info["label"] = "cu-prim"
    s.append(a)
    b = bulk("Al", "fcc", a=4.0, cubic=True)
    b.rattle(0.03, seed=1)
    b.info["label"] = "al-cubic"
    s.append(b)
    c = bulk("Cu", "fcc", a=3.5, cubic=True) * (2, 1, 1)
    c.rattle(0.04, seed=2)
    c.info["label"] = "cu-8"
    s.append(c)
    d = bulk("Al", "fcc", a=4.1)
    d.info["label"] = "al-prim"
    s.append(d)
    return s


@pytest.mark.parametrize(
    "mode, optimizer", [("full", "FIRE"), ("full", "BFGS"), ("fixed_volume", "LBFGS"), ("fixed_cell", "FIRE")]
)
def test_batch_relaxer_matches_one_by_one(mode, optimizer):
    structures = _structures()
    pressure = 1.0 if mode == "full" else 0.0
    # a step limit that some structures hit and some do not: both exits must agree with relax()
    kwargs = dict(fmax=2e-3, steps=40, pressure=pressure, mode=mode, optimizer=optimizer)
    singles = [relax(a, EMT(), **kwargs) for a in structures]
    # 10 atoms at most per batch forces queueing (sizes 1, 4, 8, 1)
    batch = BatchRelaxer(EMT(), max_atoms_per_batch=10, **kwargs).relax(structures)
    assert len(batch) == len(singles)
    for s, b, a in zip(singles, batch, structures):
        assert b.label == a.info["label"]
        assert b.converged == s.converged
        assert b.steps == s.steps
        assert b.energy == pytest.approx(s.energy, abs=1e-9)
        assert b.enthalpy == pytest.approx(s.enthalpy, abs=1e-9)
        assert np.allclose(b.atoms.positions, s.atoms.positions, atol=1e-8)
        assert np.allclose(b.atoms.cell[:], s.atoms.cell[:], atol=1e-8)
        if s.stress is not None:
            assert np.allclose(b.stress, s.stress, atol=1e-10)


@pytest.mark.parametrize("mode", ["full", "fixed_volume"])
def test_batch_relaxer_keeps_symmetry_like_relax(mode):
    # hcp with a far-off c/a: FixSymmetry in the batch gives relax(symmetry=True)'s trajectory, and no constraint
    # is left on the results
    import spglib

    structures = [bulk("Cu", "hcp", a=2.55, c=4.3), bulk("Cu", "hcp", a=2.6, c=4.0)]
    kwargs = dict(fmax=1e-3, steps=200, mode=mode, optimizer="BFGS")
    singles = [relax(a, EMT(), symmetry=True, **kwargs) for a in structures]
    batch = BatchRelaxer(EMT(), symmetry=True, **kwargs).relax(structures)
    for s, b in zip(singles, batch):
        assert b.converged and s.converged and b.steps == s.steps
        assert np.allclose(b.atoms.cell[:], s.atoms.cell[:], atol=1e-8)
        assert np.allclose(b.atoms.positions, s.atoms.positions, atol=1e-8)
        assert b.atoms.constraints == []
        cell = (b.atoms.cell[:], b.atoms.get_scaled_positions(), b.atoms.numbers)
        assert spglib.get_symmetry_dataset(cell, symprec=1e-6).number == 194


def test_batch_relaxer_accepts_label_pairs_and_writes_trajectories(tmp_path):
    structures = [(f"s{i}", a) for i, a in enumerate(_structures()[:2])]
    results = BatchRelaxer(EMT(), fmax=1e-2, steps=30, show_progress=True).relax(structures, trajectory_dir=tmp_path / "traj")
    assert [r.label for r in results] == ["s0", "s1"]
    files = sorted(p.name for p in (tmp_path / "traj").iterdir())
    assert files == ["0000_s0.traj", "0001_s1.traj"]
    from ase.io import read

    assert len(read(tmp_path / "traj" / "0000_s0.traj", ":")) == results[0].steps + 1


class _CountingBatch:
    """Stands in for mattersim.calculator.evaluate_batch: EMT per structure, but records every call."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, calc, structures, properties=("energy", "forces", "stress")):
        self.calls.append([a.info["label"] for a in structures])
        return evaluate_batch(EMT(), structures, properties)


def test_batching_makes_one_call_per_step_for_all_active(monkeypatch):
    counter = _CountingBatch()
    monkeypatch.setattr(relax_mod, "_evaluate_batch", counter)
    structures = _structures()
    results = BatchRelaxer(object(), fmax=2e-3, steps=60, max_atoms_per_batch=1000).relax(structures)
    assert any(r.converged for r in results)
    # every step evaluates all structures that are still running, in one call; no extra calls
    assert len(counter.calls) == 1 + max(r.steps for r in results)
    for k, call in enumerate(counter.calls):
        expected = [a.info["label"] for a, r in zip(structures, results) if r.steps >= k]
        assert call == expected


def test_queued_structures_enter_when_others_finish(monkeypatch):
    counter = _CountingBatch()
    monkeypatch.setattr(relax_mod, "_evaluate_batch", counter)
    structures = _structures()  # 1, 4, 8, 1 atoms
    relaxer = BatchRelaxer(object(), fmax=2e-3, steps=60, max_atoms_per_batch=6)
    results = relaxer.relax(structures)
    assert [r.label for r in results] == ["cu-prim", "al-cubic", "cu-8", "al-prim"]
    assert relaxer.n_batch_calls == len(counter.calls)
    sizes = {a.info["label"]: len(a) for a in structures}
    first_seen = {}
    for k, call in enumerate(counter.calls):
        for label in call:
            first_seen.setdefault(label, k)
        # never above the atom limit unless a single structure is larger than it
        assert sum(sizes[label] for label in call) <= 6 or len(call) == 1
    assert first_seen["cu-prim"] == first_seen["al-cubic"] == 0
    # cu-8 (8 atoms) is larger than the limit: it waits until the batch is empty and runs alone
    k8 = first_seen["cu-8"]
    assert k8 > 0
    assert "cu-prim" not in counter.calls[k8] and "al-cubic" not in counter.calls[k8]
    # al-prim joins only after cu-8 started (input order is kept), as soon as there is room
    assert first_seen["al-prim"] > k8 or "al-prim" in counter.calls[k8]
    # every structure ran exactly steps + 1 evaluations
    for r in results:
        assert sum(r.label in call for call in counter.calls) == r.steps + 1


def test_batch_non_convergence_is_reported(caplog):
    structures = _structures()[:2]
    with caplog.at_level(logging.WARNING, logger="mattersim.relax"):
        results = BatchRelaxer(EMT(), fmax=1e-5, steps=3).relax(structures)
    assert [r.converged for r in results] == [False, False]
    assert [r.steps for r in results] == [3, 3]
    assert sum("did not converge" in r.getMessage() for r in caplog.records) == 2


def test_cache_miss_recomputes(monkeypatch):
    """The caching calculator never serves results for a geometry they were not computed for."""
    cache = relax_mod._CachedResultsCalculator(EMT(), ("energy", "forces", "stress"))
    atoms = bulk("Cu", "fcc", a=3.6)
    ref = atoms.copy()
    ref.calc = EMT()
    cache.store(atoms, {"energy": 123.0, "forces": np.zeros((1, 3)), "stress": np.zeros((3, 3))})
    atoms.calc = cache
    assert atoms.get_potential_energy() == 123.0  # served from the cache
    atoms.positions[0, 0] += 1e-12  # any change invalidates
    assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-6)
    assert cache.n_fallback_calls == 1


# ---------------------------------------------------------------------------------------------------------
# the real model (random-weight fixture checkpoint), when the shared fixtures are present
# ---------------------------------------------------------------------------------------------------------


def test_batch_relaxer_with_mattersim_calculator(small_potential, monkeypatch):
    """Batched relaxation with the MatterSim calculator: one model call per step, same result as relax()."""
    from mattersim.calculator import MatterSimCalculator

    calc = MatterSimCalculator(small_potential)
    structures = []
    for symbol, a in (("Si", 5.5), ("Cu", 3.7)):
        atoms = bulk(symbol, "fcc" if symbol == "Cu" else "diamond", a=a)
        atoms.rattle(0.02, seed=4)
        atoms.info["label"] = symbol
        structures.append(atoms)
    kwargs = dict(fmax=1e-3, steps=4, mode="full", optimizer="FIRE")
    singles = [relax(a, MatterSimCalculator(small_potential), **kwargs) for a in structures]

    n_calls = []
    original = small_potential.predict

    def counting_predict(list_of_atoms, *args, **kw):
        n_calls.append(len(list_of_atoms))
        return original(list_of_atoms, *args, **kw)

    monkeypatch.setattr(small_potential, "predict", counting_predict)
    batch = BatchRelaxer(calc, **kwargs).relax(structures)
    assert n_calls == [2] * (1 + max(r.steps for r in batch))
    for s, b in zip(singles, batch):
        assert b.steps == s.steps
        assert b.energy == pytest.approx(s.energy, abs=1e-8)
        assert np.allclose(b.atoms.positions, s.atoms.positions, atol=1e-7)
        assert np.allclose(b.atoms.cell[:], s.atoms.cell[:], atol=1e-7)


class _SymmetryBreakingEMT(EMT):
    """EMT plus a small constant force on one atom: a free relaxation drifts off the space group."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        super().calculate(atoms, properties, system_changes)
        forces = self.results["forces"].copy()
        forces[0] += [0.03, 0.01, 0.0]
        forces -= forces.mean(axis=0)
        self.results["forces"] = forces


def test_symmetry_option_keeps_the_space_group():
    import spglib

    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.numbers[0] = 79  # L1_2 Cu3Au, Pm-3m (221)

    def spacegroup(a):
        return spglib.get_symmetry_dataset((a.cell[:], a.get_scaled_positions(), a.numbers), symprec=1e-5).number

    assert spacegroup(atoms) == 221
    kept = relax(atoms, _SymmetryBreakingEMT(), fmax=0.01, steps=200, symmetry=True)
    free = relax(atoms, _SymmetryBreakingEMT(), fmax=0.01, steps=200)
    assert spacegroup(kept.atoms) == 221
    assert spacegroup(free.atoms) != 221  # the check has teeth: without the constraint symmetry is lost
    assert not kept.atoms.constraints  # the constraint is not left on the returned structure
    assert abs(kept.volume - atoms.get_volume()) > 0.1  # the cell did relax


class _BlowsUpEMT(EMT):
    """EMT, except that gold comes back with NaN forces once its cell has shrunk below 95 % of the start:
    a model far outside its data."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        super().calculate(atoms, properties, system_changes or ["positions", "numbers", "cell", "pbc"])
        a = self.atoms
        if "Au" in a.get_chemical_symbols() and a.get_volume() / len(a) < 0.95 * 16.9:
            self.results["forces"] = np.full((len(a), 3), np.nan)


def test_a_relaxation_that_blows_up_ends_alone(monkeypatch, caplog):
    cu, au, ag = bulk("Cu", "fcc", a=3.7), bulk("Au", "fcc", a=4.08), bulk("Ag", "fcc", a=4.2)
    relaxer = BatchRelaxer(_BlowsUpEMT(), fmax=1e-3, steps=200, pressure=30.0, mode="full")
    with caplog.at_level(logging.WARNING):
        rs = relaxer.relax([("Cu", cu), ("Au", au), ("Ag", ag)])
    assert [r.label for r in rs] == ["Cu", "Au", "Ag"]
    assert rs[0].converged and rs[2].converged and rs[0].error is None
    assert not rs[1].converged and rs[1].error == "non-finite forces from the model"
    assert "non-finite forces" in caplog.text and rs[1].to_dict()["error"] == rs[1].error
    # the optimizer breaking down (BFGS's eigen-decomposition on such forces) ends that relaxation alone too
    real_step = BFGS.step

    def step(self, *args, **kwargs):
        if "Ag" in self.optimizable.filterobj.atoms.get_chemical_symbols() and self.nsteps >= 2:
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(BFGS, "step", step)
    rs = BatchRelaxer(EMT(), fmax=1e-3, steps=200, optimizer="BFGS").relax([("Cu", cu), ("Ag", ag)])
    assert rs[0].converged and not rs[1].converged and rs[1].steps == 2
    assert rs[1].error.startswith("optimizer failed: LinAlgError")
    # the result is the last evaluated structure, with its own energy
    check = rs[1].atoms.copy()
    check.calc = EMT()
    assert check.get_potential_energy() == pytest.approx(rs[1].energy, abs=1e-10)


class _DivergingEMT(EMT):
    """EMT whose silver forces explode (finite but absurd) once its cell has shrunk a little."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        super().calculate(atoms, properties, system_changes or ["positions", "numbers", "cell", "pbc"])
        a = self.atoms
        if "Ag" in a.get_chemical_symbols() and a.get_volume() / len(a) < 0.97 * 18.5:
            self.results["forces"] = np.full((len(a), 3), 1e20)


def test_a_diverging_relaxation_stops_at_once():
    rs = BatchRelaxer(_DivergingEMT(), fmax=1e-3, steps=300, pressure=30.0).relax(
        [("Cu", bulk("Cu", "fcc", a=3.7)), ("Ag", bulk("Ag", "fcc", a=4.2))])
    assert rs[0].converged and not rs[1].converged
    assert "diverged" in rs[1].error and rs[1].steps < 50


class _Harmonic(Calculator):
    """E = ½ uᵀ K u with u the displacement from ``x0`` (a quadratic surface whose Hessian is K exactly)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, x0, k):
        super().__init__()
        self.x0, self.k = np.asarray(x0, dtype=float), np.asarray(k, dtype=float)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        u = (self.atoms.positions - self.x0).ravel()
        self.results = {"energy": 0.5 * u @ self.k @ u, "free_energy": 0.5 * u @ self.k @ u,
                        "forces": -(self.k @ u).reshape(-1, 3), "stress": np.zeros(6)}


def _harmonic_case(n_atoms=4, seed=0):
    """Atoms displaced from the minimum of a translation-invariant K with curvatures 1-10 eV/Å²."""
    rng = np.random.default_rng(seed)
    q = relax_mod._ion_modes(np.zeros((3 * n_atoms, 3 * n_atoms)))[1]  # a basis of the non-translations
    k = q @ np.diag(np.linspace(1.0, 10.0, q.shape[1])) @ q.T
    x0 = rng.uniform(0, 6, size=(n_atoms, 3))
    atoms = Atoms(f"Cu{n_atoms}", positions=x0 + rng.normal(scale=0.02, size=x0.shape), cell=[6, 6, 6], pbc=True)
    return atoms, x0, k


def test_start_hessian_is_positive_and_keeps_translations_apart():
    atoms, _, k = _harmonic_case()
    h = k.copy()
    h[0, 0] -= 3.0  # an unstable direction (negative curvature) ...
    h[1, 2] += 1e-3  # ... and float noise that breaks the symmetry
    s = relax_mod.start_hessian(h)
    assert np.allclose(s, s.T)
    w = relax_mod.internal_curvatures(h)
    assert w[0] < 0  # the input has a negative curvature; the start has its magnitude (or the floor)
    ws = np.sort(relax_mod.internal_curvatures(s))
    assert np.allclose(ws, np.sort(np.maximum(np.abs(w), relax_mod.HESSIAN_FLOOR)), atol=1e-9)
    t = np.zeros((12, 3))
    for a in range(3):
        t[a::3, a] = 0.5
    assert np.allclose(s @ t, relax_mod.BFGS_ALPHA * t)  # rigid translations: BFGS's own curvature
    with pytest.raises(InputError, match="3N x 3N"):
        relax_mod.start_hessian(np.zeros((4, 5)))


def test_exact_hessian_makes_the_first_step_newtons():
    """On a quadratic surface BFGS from the exact Hessian lands on the minimum in one step; from its default
    start it needs many. The Hessian function is called once, and not at all when nothing needs to move."""
    atoms, x0, k = _harmonic_case()
    calls = []

    def hessian():
        calls.append(1)
        return k

    plain = BatchRelaxer(_Harmonic(x0, k), fmax=1e-6, steps=300, mode="fixed_cell", optimizer="BFGS").relax([atoms])[0]
    newton = BatchRelaxer(_Harmonic(x0, k), fmax=1e-6, steps=300, mode="fixed_cell", optimizer="BFGS",
                          hessian=hessian).relax([atoms, atoms.copy()])
    assert all(r.converged and r.steps == 1 for r in newton) and plain.steps > 10
    assert calls == [1]
    d = newton[0].atoms.positions - x0
    assert np.allclose(d, d.mean(axis=0), atol=1e-8)  # at the minimum (up to the rigid translation it keeps)
    at_rest = atoms.copy()
    at_rest.positions = x0
    BatchRelaxer(_Harmonic(x0, k), fmax=1e-6, mode="fixed_cell", optimizer="BFGS", hessian=hessian).relax([at_rest])
    assert calls == [1]  # converged at the start: no Hessian asked for


def test_start_hessian_needs_bfgs_at_fixed_cell_and_the_right_size():
    atoms, x0, k = _harmonic_case()
    for kwargs in ({"optimizer": "FIRE", "mode": "fixed_cell"}, {"optimizer": "BFGS", "mode": "full"}):
        with pytest.raises(InputError, match="BFGS at fixed cell"):
            BatchRelaxer(EMT(), hessian=k, **kwargs)
    with pytest.raises(InputError, match="has 4 atoms"):
        BatchRelaxer(_Harmonic(x0, k), mode="fixed_cell", optimizer="BFGS", hessian=np.eye(6)).relax([atoms])


def test_a_hessian_function_that_gives_none_leaves_bfgs_as_it_is():
    atoms, x0, k = _harmonic_case()
    calls = []

    def none():
        calls.append(1)

    plain = BatchRelaxer(_Harmonic(x0, k), fmax=1e-6, steps=300, mode="fixed_cell", optimizer="BFGS").relax([atoms])[0]
    fallback = BatchRelaxer(_Harmonic(x0, k), fmax=1e-6, steps=300, mode="fixed_cell", optimizer="BFGS",
                            hessian=none).relax([atoms, atoms.copy()])
    assert calls == [1] and all(r.steps == plain.steps for r in fallback)


def test_unstable_modes_of_the_start_hessian_are_held():
    """On E = ½ uᵀ K u with one negative curvature, BFGS from K goes down the unstable direction without end;
    with the unstable mode held (the default) the ions relax in the stable directions in one Newton step and
    keep their displacement along the unstable one; the result carries no constraint."""
    atoms, x0, _ = _harmonic_case()
    q = relax_mod._ion_modes(np.zeros((12, 12)))[1]
    curv = np.linspace(1.0, 10.0, q.shape[1])
    curv[0] = -2.0
    k = q @ np.diag(curv) @ q.T
    mode = q[:, 0]
    assert np.allclose(relax_mod.unstable_modes(k), [mode]) or np.allclose(relax_mod.unstable_modes(k), [-mode])
    u0 = (atoms.positions - x0).ravel()
    held = BatchRelaxer(_Harmonic(x0, k), fmax=1e-6, steps=50, mode="fixed_cell", optimizer="BFGS", hessian=k).relax([atoms])[0]
    assert held.converged and held.steps == 1 and not held.atoms.constraints
    u = (held.atoms.positions - x0).ravel()
    assert u @ mode == pytest.approx(u0 @ mode, abs=1e-12)  # not moved along the unstable mode
    stable = q[:, 1:]
    assert np.allclose(stable.T @ u, 0.0, atol=1e-8)  # at the minimum in every stable direction
    loose = BatchRelaxer(_Harmonic(x0, k), fmax=1e-6, steps=50, mode="fixed_cell", optimizer="BFGS", hessian=k,
                         hold_unstable=False).relax([atoms])[0]
    assert not loose.converged and abs((loose.atoms.positions - x0).ravel() @ mode) > 1.0  # slid away
