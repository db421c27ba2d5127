"""The v1 backbone against the official implementation's outputs, and the physics of forces and stress."""

import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.io import read
from scipy.spatial.transform import Rotation

from conftest import shared_path
from mattersim.errors import InputError
from mattersim.potential import Potential


@pytest.fixture(scope="module")
def reference():
    ref = json.loads(shared_path("fixtures", "mattersim_v1_reference", "reference_outputs.json").read_text())
    frames = read(shared_path("fixtures", "mattersim_v1_reference", "structures.extxyz"), ":")
    return ref, frames


@pytest.mark.parametrize("checkpoint", ["m3gnet-1M-random.pth", "m3gnet-small-random.pth"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parity_with_official_implementation(reference, checkpoint, dtype):
    ref, frames = reference
    pot = Potential.from_checkpoint(shared_path("fixtures", "mattersim_v1_reference", checkpoint), dtype=dtype)
    expected = ref["checkpoints"][checkpoint]
    assert sum(p.numel() for p in pot.model.parameters()) == expected["num_parameters"]
    assert pot.model.get_model_args() == expected["model_args"]
    results = pot.predict(frames)  # all six structures in one batch
    for name, res in zip(ref["structure_order"], results):
        r = expected["results"][name]
        assert res["energy"] == pytest.approx(r["energy_eV"], rel=1e-5), name
        np.testing.assert_allclose(res["forces"], r["forces_eV_per_A"], rtol=0, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(res["stress"], r["stress_eV_per_A3"], rtol=0, atol=1e-5, err_msg=name)
        assert res["energies"].sum() == pytest.approx(res["energy"], rel=1e-6 if dtype == "float32" else 1e-12)


def _rattled_cell():
    rng = np.random.default_rng(1)
    atoms = Atoms(
        "LiMnO2",
        cell=[[3.1, 0.2, 0.1], [0.9, 4.0, -0.3], [0.4, 1.3, 5.2]],
        scaled_positions=rng.random((4, 3)),
        pbc=True,
    )
    atoms.rattle(0.05, seed=2)
    return atoms


def _energy(pot, atoms):
    return pot.predict([atoms], forces=False, stress=False)[0]["energy"]


def test_forces_are_minus_energy_gradient(small_potential):
    atoms = _rattled_cell()
    forces = small_potential.predict([atoms])[0]["forces"]
    h = 1e-4
    for a in range(len(atoms)):
        for c in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[a, c] += h
            minus.positions[a, c] -= h
            fd = -(_energy(small_potential, plus) - _energy(small_potential, minus)) / (2 * h)
            assert forces[a, c] == pytest.approx(fd, abs=1e-6)
    assert np.abs(forces.sum(axis=0)).max() < 1e-10  # translation invariance: no net force


def test_stress_is_strain_derivative_over_volume(small_potential):
    atoms = _rattled_cell()
    stress = small_potential.predict([atoms])[0]["stress"]
    h = 1e-5
    for i in range(3):
        for j in range(3):
            eps = np.zeros((3, 3))
            eps[i, j] = eps[j, i] = h / (2 if i != j else 1)
            vals = []
            for sign in (1, -1):
                strained = atoms.copy()
                strained.set_cell(atoms.cell[:] @ (np.eye(3) + sign * eps), scale_atoms=True)
                vals.append(_energy(small_potential, strained))
            fd = (vals[0] - vals[1]) / (2 * h) / atoms.get_volume()
            assert stress[i, j] == pytest.approx(fd, abs=1e-7)
    np.testing.assert_allclose(stress, stress.T, atol=1e-10)


def test_rotation_translation_permutation_invariance(small_potential):
    atoms = _rattled_cell()
    ref = small_potential.predict([atoms])[0]
    rot = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix()
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell[:] @ rot.T)
    rotated.positions = atoms.positions @ rot.T + np.array([0.7, -3.0, 11.0])
    perm = np.random.default_rng(3).permutation(len(atoms))
    permuted = atoms[perm]
    r_rot, r_perm = small_potential.predict([rotated, permuted])
    assert r_rot["energy"] == pytest.approx(ref["energy"], abs=1e-9)
    np.testing.assert_allclose(r_rot["forces"], ref["forces"] @ rot.T, atol=1e-9)
    np.testing.assert_allclose(r_rot["stress"], rot @ ref["stress"] @ rot.T, atol=1e-10)
    assert r_perm["energy"] == pytest.approx(ref["energy"], abs=1e-9)
    np.testing.assert_allclose(r_perm["forces"], ref["forces"][perm], atol=1e-9)
    np.testing.assert_allclose(r_perm["energies"], ref["energies"][perm], atol=1e-9)


def test_supercell_is_extensive(small_potential):
    atoms = _rattled_cell()
    single, sc = small_potential.predict([atoms, atoms.repeat((2, 1, 2))])
    assert sc["energy"] == pytest.approx(4 * single["energy"], rel=1e-10)
    np.testing.assert_allclose(sc["stress"], single["stress"], atol=1e-10)
    np.testing.assert_allclose(sc["forces"][: len(atoms)], single["forces"], atol=1e-9)


def test_batched_equals_single(small_checkpoint):
    structures = [_rattled_cell(), bulk("Si", "diamond", a=5.43).repeat(2), bulk("NaCl", "rocksalt", a=5.6),
                  Atoms("H", cell=[8, 8, 8], pbc=True)]
    structures[1].rattle(0.03, seed=5)
    pot = Potential.from_checkpoint(small_checkpoint, dtype="float32")
    batched = pot.predict(structures)
    for atoms, b in zip(structures, batched):
        s = pot.predict([atoms])[0]
        assert b["energy"] == pytest.approx(s["energy"], rel=1e-6)
        np.testing.assert_allclose(b["forces"], s["forces"], atol=1e-6)
        np.testing.assert_allclose(b["stress"], s["stress"], atol=1e-7)
    # tight memory bounds split the list into several batches without changing anything
    pot.max_atoms_per_batch, pot.max_edges_per_batch = 10, 500
    assert len(list(pot.batches(pot.graphs(structures)))) >= 3
    for b, s in zip(batched, pot.predict(structures)):
        assert b["energy"] == pytest.approx(s["energy"], rel=1e-6)


def test_isolated_atom_and_one_atom_cell(small_potential):
    lone = Atoms("Fe", positions=[[0, 0, 0]], cell=[20, 20, 20], pbc=True)  # no neighbours at all
    mol = Atoms("Fe", positions=[[1, 2, 3]])  # non-periodic
    prim = bulk("Cu", "fcc", a=3.6)  # 1-atom cell, neighbours are its own images
    r_lone, r_mol, r_prim = small_potential.predict([lone, mol, prim])
    model = small_potential.model
    assert np.isfinite(r_lone["energy"]) and r_lone["energy"] == pytest.approx(r_mol["energy"], abs=1e-10)
    np.testing.assert_allclose(r_lone["forces"], 0.0, atol=1e-12)
    np.testing.assert_allclose(r_lone["stress"], 0.0, atol=1e-12)
    # with no neighbour the energy is the readout of the bare element embedding
    with torch.no_grad():
        embedding = model.atom_embedding(torch.nn.functional.one_hot(torch.tensor([26]), 95).double())
        readout = model.final(embedding).item() * model.normalizer.scale[26].item() + model.normalizer.shift[26].item()
    assert r_lone["energy"] == pytest.approx(readout, abs=1e-10)
    np.testing.assert_allclose(r_prim["forces"], 0.0, atol=1e-10)  # every atom is an inversion centre
    assert np.isfinite(r_prim["stress"]).all() and abs(r_prim["stress"][0, 0]) > 0
    np.testing.assert_allclose(np.diag(r_prim["stress"]), r_prim["stress"][0, 0], atol=1e-10)  # cubic


def test_element_outside_range_is_named(small_potential):
    atoms = Atoms("Og", cell=[5, 5, 5], pbc=True)
    with pytest.raises(InputError, match=r"Og \(Z=118\)"):
        small_potential.predict([atoms])


def test_device_and_dtype_options(small_checkpoint):
    pot = Potential.from_checkpoint(small_checkpoint, dtype="float64", device="cpu")
    assert next(pot.model.parameters()).dtype == torch.float64
    with pytest.raises(InputError, match="float32"):
        Potential.from_checkpoint(small_checkpoint, dtype="float16")


def test_fused_weight_cache_follows_weight_changes(small_checkpoint):
    pot = Potential.from_checkpoint(small_checkpoint, dtype="float64")
    atoms = _rattled_cell()
    before = pot.predict([atoms])[0]["energy"]
    layer = pot.model.graph_conv[0].gated_mlp_edge.g[0].linear
    with torch.no_grad():
        layer.weight.mul_(1.5)  # in place: same storage, new version counter
    changed = pot.predict([atoms])[0]["energy"]
    assert changed != pytest.approx(before, abs=1e-9)
    fresh = Potential(pot.model, dtype="float64")
    fresh.model.requires_grad_(True)  # training mode path builds the fused weights anew every call
    assert fresh.predict([atoms])[0]["energy"] == pytest.approx(changed, abs=1e-10)


def test_edge_chunking_does_not_change_results(small_checkpoint):
    pot = Potential.from_checkpoint(small_checkpoint, dtype="float64")
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 1))
    atoms.rattle(0.05, seed=9)
    ref = pot.predict([atoms])[0]
    pot.model.edge_chunk = 37  # many uneven chunks
    res = pot.predict([atoms])[0]
    assert res["energy"] == pytest.approx(ref["energy"], abs=1e-10)
    np.testing.assert_allclose(res["forces"], ref["forces"], atol=1e-10)
    np.testing.assert_allclose(res["stress"], ref["stress"], atol=1e-12)
