"""The ASE calculator drives ASE optimizers and MD; batched evaluation equals ASE's one-by-one path."""

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from mattersim.calculator import MatterSimCalculator, evaluate_batch, model_info


@pytest.fixture()
def calc(small_potential):
    return MatterSimCalculator(small_potential)


def test_results_and_units(calc, small_potential):
    atoms = bulk("Si", "diamond", a=5.3).repeat((1, 1, 2))
    atoms.rattle(0.05, seed=1)
    atoms.calc = calc
    e = atoms.get_potential_energy()
    assert atoms.get_potential_energy(force_consistent=True) == e
    assert atoms.get_potential_energies().sum() == pytest.approx(e, abs=1e-9)
    direct = small_potential.predict([atoms])[0]
    np.testing.assert_allclose(atoms.get_forces(), direct["forces"])
    np.testing.assert_allclose(atoms.get_stress(voigt=False), direct["stress"])
    assert model_info(calc)["sha256"] == small_potential.identity["sha256"]


def test_optimizer_lowers_energy_and_forces(calc):
    atoms = bulk("NaCl", "rocksalt", a=5.6).repeat(2)
    atoms.rattle(0.1, seed=2)
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    opt = BFGS(atoms, logfile=None)
    assert opt.run(fmax=1e-2, steps=300)
    assert atoms.get_potential_energy() < e0
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 1e-2


def test_nve_md_conserves_energy(calc):
    atoms = bulk("Si", "diamond", a=5.43).repeat(2)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(4))
    atoms.calc = calc
    etot = []
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.attach(lambda: etot.append(atoms.get_total_energy()), interval=5)
    dyn.run(100)
    ekin = 1.5 * units.kB * 300 * len(atoms)
    assert max(etot) - min(etot) < 2e-3 * ekin  # drift and jitter far below the kinetic energy


def test_evaluate_batch_matches_ase_path(calc):
    structures = [bulk("Cu", "fcc", a=3.6), bulk("Al", "fcc", a=4.0).repeat((2, 1, 1))]
    structures[1].rattle(0.02, seed=3)
    batched = evaluate_batch(calc, structures)
    for atoms, res in zip(structures, batched):
        atoms = atoms.copy()
        atoms.calc = calc
        assert res["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(res["stress"], atoms.get_stress(voigt=False), atol=1e-12)
    # a generic ASE calculator takes the one-by-one path with the same result layout
    emt = evaluate_batch(EMT(), structures)
    assert emt[1]["forces"].shape == (2, 3) and emt[1]["stress"].shape == (3, 3)
    assert structures[0].calc is None


def test_evaluate_batch_skips_stress_when_not_asked(calc):
    """Phonon force evaluations ask for energy and forces only: no stress work, the same forces."""
    structures = [bulk("Si", "diamond", a=5.43, cubic=True), bulk("Al", "fcc", a=4.05) * (2, 1, 1)]
    structures[0].positions[0] += 0.05
    full = evaluate_batch(calc, structures)
    lean = evaluate_batch(calc, structures, ("energy", "forces"))
    for a, b in zip(full, lean):
        assert "stress" in a and "stress" not in b
        np.testing.assert_allclose(b["forces"], a["forces"], atol=1e-12)
        assert b["energy"] == pytest.approx(a["energy"], abs=1e-12)
