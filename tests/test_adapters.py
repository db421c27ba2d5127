"""Batched adapters of other potentials equal their own one-structure ASE path."""

import numpy as np
import pytest
from ase.build import bulk

pytest.importorskip("chgnet")


def test_chgnet_batched_equals_ase_path():
    from mattersim.calculator import evaluate_batch
    from mattersim.registry import load_calculator

    calc = load_calculator("chgnet")
    structures = [bulk("Si", "diamond", a=5.43).repeat(2), bulk("NaCl", "rocksalt", a=5.6), bulk("Fe", "bcc", a=2.85)]
    for s in structures:
        s.rattle(0.05, seed=1)
    batched = evaluate_batch(calc, structures)
    for atoms, res in zip(structures, batched):
        atoms = atoms.copy()
        atoms.calc = calc
        assert res["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-5)
        np.testing.assert_allclose(res["forces"], atoms.get_forces(), atol=1e-5)
        np.testing.assert_allclose(res["stress"], atoms.get_stress(voigt=False), atol=1e-6)
        np.testing.assert_allclose(res["magmoms"], calc.results["magmoms"], atol=1e-5)
