"""Ensembles: the force-uncertainty score on hand-made forces, means and spreads of real members."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones

from mattersim.calculator import MatterSimCalculator
from mattersim.ensemble import EnsembleCalculator, combine, force_uncertainty
from mattersim.errors import InputError
from mattersim.heads import TASKS
from mattersim.multitask import MultiTaskModel, build_backbone
from mattersim.potential import Potential

TINY = {"kind": "transformer", "width": 16, "num_blocks": 1, "num_heads": 2, "num_gaussians": 8}


def member(seed: int) -> MatterSimCalculator:
    torch.manual_seed(seed)
    model = MultiTaskModel(build_backbone(TINY), TASKS, {"width": 16, "num_heads": 2, "channels": 2})
    return MatterSimCalculator(Potential(model, dtype="float64"))


def test_force_uncertainty_by_hand():
    # two members, two atoms. Atom 0: |F| = 1 and 3 along x, mean force (2, 0, 0): (1-2)^2, (3-2)^2 -> 1.
    # Atom 1: opposite forces of norm 2: mean force 0, deviations 2 and 2 -> 4 (the max).
    forces = np.array([[[1.0, 0, 0], [0, 2.0, 0]], [[3.0, 0, 0], [0, -2.0, 0]]])
    assert force_uncertainty(forces) == pytest.approx(4.0)
    assert force_uncertainty(np.repeat(forces[:1], 3, axis=0)) == 0.0  # agreeing members: no uncertainty
    with pytest.raises(ValueError):
        force_uncertainty(forces[0])


def test_combine_means_and_spreads():
    a = {"energy": -1.0, "forces": np.zeros((1, 3)), "stress": np.eye(3)}
    b = {"energy": -3.0, "forces": np.ones((1, 3)), "stress": 3 * np.eye(3)}
    out = combine([a, b])
    assert out["energy"] == -2.0 and out["energy_std"] == 1.0 and out["free_energy"] == -2.0
    np.testing.assert_allclose(out["stress"], 2 * np.eye(3))
    np.testing.assert_allclose(out["forces_std"], 0.5 * np.ones((1, 3)))
    assert out["force_uncertainty"] == pytest.approx((np.sqrt(3) / 2) ** 2)


def test_ensemble_of_multitask_members_averages_every_output():
    members = [member(s) for s in (0, 1, 2)]
    ens = EnsembleCalculator(members)
    atoms = bulk("NaCl", "rocksalt", a=5.5) * (1, 1, 2)
    atoms.rattle(0.05, seed=0)
    res = ens.calculate_batch([atoms])[0]
    singles = [m.calculate_batch([atoms])[0] for m in members]
    for key in ("energy", "forces", "stress", "magmoms", "charges", "born_effective_charges", "dielectric_tensor"):
        stack = np.stack([np.asarray(s[key]) for s in singles])
        np.testing.assert_allclose(res[key], stack.mean(axis=0), atol=1e-12)
        np.testing.assert_allclose(res[f"{key}_std"], stack.std(axis=0), atol=1e-12)
        assert np.max(res[f"{key}_std"]) > 0  # different seeds disagree
    np.testing.assert_allclose(res["born_effective_charges"].sum(axis=0), 0, atol=1e-10)  # mean stays neutral

    born, eps = ens.predict_dielectric(atoms)
    np.testing.assert_allclose(born, res["born_effective_charges"], atol=1e-12)
    assert ens.uncertainty["born"].shape == (len(atoms), 3, 3) and ens.uncertainty["epsilon"].shape == (3, 3)

    atoms.calc = ens  # a plain ASE calculator too
    assert atoms.get_potential_energy() == pytest.approx(res["energy"])
    assert ens.model_info["kind"] == "ensemble" and len(ens.model_info["members"]) == 3


def test_ensemble_of_any_ase_calculators():
    ens = EnsembleCalculator([EMT(), LennardJones(sigma=2.3, epsilon=0.3, rc=6.0)])
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    res = ens.calculate_batch([atoms])[0]
    assert res["force_uncertainty"] > 0 and "magmoms" not in res
    with pytest.raises(InputError, match="dielectric"):
        ens.predict_dielectric(atoms)
    with pytest.raises(InputError, match="at least two"):
        EnsembleCalculator([EMT()])


def test_members_by_name_are_loaded_by_the_callers_loader(small_checkpoint):
    from mattersim.registry import load_ensemble

    with pytest.raises(InputError, match="load_ensemble"):
        EnsembleCalculator(["a.pth", "b.pth"])  # the ensemble itself loads nothing
    loaded = EnsembleCalculator(["emt", "lj"], loader=lambda m: EMT() if m == "emt" else LennardJones(rc=6.0))
    assert [type(m).__name__ for m in loaded.members] == ["EMT", "LennardJones"]
    ens = load_ensemble([small_checkpoint, str(small_checkpoint)], dtype="float64")
    assert [i["kind"] for i in ens.model_info["members"]] == ["checkpoint", "checkpoint"]
    atoms = bulk("Si", "diamond", a=5.43)
    assert ens.calculate_batch([atoms])[0]["energy_std"] == pytest.approx(0.0, abs=1e-9)  # the same model twice
