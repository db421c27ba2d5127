"""The multi-task model: symmetry of every output, conservative forces and stress, smoothness at the cutoff,
constraints by construction, checkpoint round trip and the ASE / phonon-workflow interfaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from scipy.spatial.transform import Rotation

from mattersim.calculator import MatterSimCalculator
from mattersim.checkpoint import load_model, save_model
from mattersim.heads import TASKS
from mattersim.multitask import MultiTaskModel, build_backbone
from mattersim.potential import Potential
from mattersim.transformer import PRESETS, neighbour_softmax

BACKBONES = {
    "transformer": {"kind": "transformer", "width": 16, "num_blocks": 2, "num_heads": 2, "num_gaussians": 8},
    "m3gnet": {"kind": "m3gnet", "units": 16, "num_blocks": 1, "max_n": 3, "max_l": 3},
}
HEADS = {"width": 16, "num_heads": 2, "channels": 3, "num_gaussians": 6}


def make_potential(kind: str, seed: int = 0) -> Potential:
    torch.manual_seed(seed)
    model = MultiTaskModel(build_backbone(BACKBONES[kind]), TASKS, HEADS)
    # non-trivial per-element energy references and head normalisation, so that they are exercised too
    with torch.no_grad():
        model.normalizer.shift.uniform_(-3, 0)
        for head in model.heads.values():
            head.scale.fill_(1.7)
            head.shift.fill_(0.3)
    return Potential(model, dtype="float64")


def low_symmetry_cell() -> Atoms:
    atoms = bulk("NaCl", "rocksalt", a=5.4) * (1, 1, 2)
    atoms.numbers[1] = 9  # Na4Cl3F: three species, no inversion left after the rattle
    cell = atoms.cell[:].copy()
    cell[0, 1] += 0.4
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(0.15, seed=2)
    return atoms


def rotate(atoms: Atoms, rot: np.ndarray) -> Atoms:
    out = atoms.copy()
    out.set_cell(atoms.cell[:] @ rot.T, scale_atoms=False)
    out.positions = atoms.positions @ rot.T
    return out


@pytest.fixture(params=sorted(BACKBONES))
def potential(request) -> Potential:
    return make_potential(request.param)


def test_rotation_equivariance(potential):
    atoms = low_symmetry_cell()
    rot = Rotation.random(random_state=7).as_matrix()
    a, b = potential.predict([atoms, rotate(atoms, rot)])
    assert abs(b["energy"] - a["energy"]) < 1e-10
    np.testing.assert_allclose(b["forces"], a["forces"] @ rot.T, atol=1e-10)
    np.testing.assert_allclose(b["stress"], rot @ a["stress"] @ rot.T, atol=1e-11)
    for task in ("magmoms", "charges"):
        np.testing.assert_allclose(b[task], a[task], atol=1e-10)
    np.testing.assert_allclose(
        b["born_effective_charges"], np.einsum("ij,njk,lk->nil", rot, a["born_effective_charges"], rot), atol=1e-10
    )
    np.testing.assert_allclose(b["dielectric_tensor"], rot @ a["dielectric_tensor"] @ rot.T, atol=1e-10)
    # not vacuous: Z* is non-symmetric and eps_inf anisotropic far above the tolerance, so a transposed or
    # missing rotation would be caught
    assert np.abs(a["born_effective_charges"] - np.einsum("njk->nkj", a["born_effective_charges"])).max() > 1e-6
    assert np.ptp(np.linalg.eigvalsh(a["dielectric_tensor"])) > 1e-4


def test_translation_and_permutation_invariance(potential):
    atoms = low_symmetry_cell()
    moved = atoms.copy()
    moved.positions += np.array([1.3, -0.7, 2.9])  # some atoms leave the cell: wrapped, same crystal
    order = np.random.default_rng(0).permutation(len(atoms))
    permuted = atoms[order]
    a, b, c = potential.predict([atoms, moved, permuted])
    for res in (b,):
        assert abs(res["energy"] - a["energy"]) < 1e-10
        for key in ("forces", "magmoms", "charges", "born_effective_charges"):
            np.testing.assert_allclose(res[key], a[key], atol=1e-9)
    assert abs(c["energy"] - a["energy"]) < 1e-10
    for key in ("forces", "energies", "magmoms", "charges", "born_effective_charges"):
        np.testing.assert_allclose(c[key], a[key][order], atol=1e-9)
    np.testing.assert_allclose(c["dielectric_tensor"], a["dielectric_tensor"], atol=1e-10)
    np.testing.assert_allclose(c["stress"], a["stress"], atol=1e-11)


def test_supercell_gives_primitive_per_atom_predictions(potential):
    prim = bulk("GaAs", "zincblende", a=5.65)
    prim.positions[1] += [0.05, -0.02, 0.03]  # off-symmetry so that Z* is not trivially isotropic
    sc = prim * (2, 1, 2)
    p, s = potential.predict([prim, sc])
    reps = len(sc) // len(prim)
    assert abs(s["energy"] - reps * p["energy"]) < 1e-9
    for key in ("energies", "forces", "magmoms", "charges", "born_effective_charges"):
        np.testing.assert_allclose(s[key], np.concatenate([p[key]] * reps), atol=1e-9, err_msg=key)
    np.testing.assert_allclose(s["stress"], p["stress"], atol=1e-11)
    np.testing.assert_allclose(s["dielectric_tensor"], p["dielectric_tensor"], atol=1e-10)


def test_constraints_by_construction(potential):
    structures = [low_symmetry_cell(), bulk("Si", "diamond", a=5.43), bulk("MgO", "rocksalt", a=4.2) * 2]
    for res in potential.predict(structures):
        assert abs(res["charges"].sum()) < 1e-10  # Bader charges sum to zero
        np.testing.assert_allclose(res["born_effective_charges"].sum(axis=0), 0, atol=1e-10)  # neutrality
        eps = res["dielectric_tensor"]
        np.testing.assert_allclose(eps, eps.T, atol=1e-12)
        assert np.linalg.eigvalsh(eps).min() >= 1.0 - 1e-12  # eps_inf >= 1


def test_forces_and_stress_are_energy_derivatives(potential):
    atoms = low_symmetry_cell()
    res = potential.predict([atoms])[0]
    h = 1e-5
    for atom, axis in [(0, 0), (3, 2), (2, 1)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        ep, em = (r["energy"] for r in potential.predict([plus, minus]))
        assert -(ep - em) / (2 * h) == pytest.approx(res["forces"][atom, axis], abs=1e-7)
    volume = atoms.get_volume()
    for i, j in [(0, 0), (1, 2), (2, 1)]:
        strains = []
        for sign in (1, -1):
            eps = np.eye(3)
            eps[i, j] += sign * h
            strained = atoms.copy()
            strained.set_cell(atoms.cell[:] @ eps, scale_atoms=True)
            strains.append(potential.predict([strained])[0]["energy"])
        assert (strains[0] - strains[1]) / (2 * h) / volume == pytest.approx(res["stress"][i, j], abs=1e-8)


def _crossing_jump(pot: Potential) -> float:
    """Energy change across r_c minus the change the forces predict (a jump would remain)."""
    cutoff = pot.cutoff

    def trimer(x: float) -> Atoms:  # Na at 0, Cl at 2.5 Å, Na at x: the Na-Na pair crosses r_c
        return Atoms("NaClNa", positions=[[0, 0, 0], [2.5, 0, 0], [x, 0, 0]], pbc=False)

    delta = 1e-4
    inside, outside = pot.predict([trimer(cutoff - delta), trimer(cutoff + delta)])
    mean_force = 0.5 * (inside["forces"][2, 0] + outside["forces"][2, 0])
    return abs(outside["energy"] - inside["energy"] + mean_force * 2 * delta)


def test_energy_is_smooth_when_a_neighbour_crosses_the_cutoff(monkeypatch):
    """Attention weights carry m_ij inside the softmax normalisation, so nothing jumps at r_c."""
    pot = make_potential("transformer")
    assert _crossing_jump(pot) < 1e-9

    # the check has teeth: the plain softmax (m_ij applied only after normalising) jumps
    import mattersim.transformer as transformer

    def plain(scores, weight, centre, num_atoms):
        ones = torch.ones_like(weight)
        return weight.unsqueeze(1) * neighbour_softmax(scores, ones, centre, num_atoms)

    monkeypatch.setattr(transformer, "neighbour_softmax", plain)
    assert _crossing_jump(pot) > 1e-5


def test_neighbour_softmax_weights():
    scores = torch.tensor([[0.0], [1.0], [2.0], [5.0]], dtype=torch.float64)
    weight = torch.tensor([1.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    centre = torch.tensor([0, 0, 0, 1])
    attn = neighbour_softmax(scores, weight, centre, 3).view(-1)
    w = torch.tensor([1.0, 0.5 * np.e, 0.0])
    expected = torch.cat([weight[:3] * w / w.sum(), torch.tensor([1.0])]).double()
    torch.testing.assert_close(attn, expected)


def test_presets_have_the_papers_sizes():
    sizes = {}
    for name in ("1M", "10M"):
        backbone = build_backbone({"kind": "transformer", "preset": name})
        sizes[name] = sum(p.numel() for p in backbone.parameters())
        assert len(backbone.blocks) * 4 == {"1M": 8, "10M": 12}[name]  # four attention modules per block
    assert 0.7e6 < sizes["1M"] < 1.5e6, sizes
    assert 7e6 < sizes["10M"] < 14e6, sizes
    assert PRESETS["1M"]["num_gaussians"] == 64 and PRESETS["10M"]["num_heads"] == 16


def test_checkpoint_round_trip_and_calculator(tmp_path):
    pot = make_potential("transformer", seed=3)
    path = save_model(tmp_path / "mt.pth", pot.model, metrics={"valid": {"energy_mae": 0.01}})
    loaded = Potential.from_checkpoint(path, dtype="float64")
    assert loaded.identity["kind"] == "mattersim-mt" and loaded.identity["tasks"] == list(TASKS)
    atoms = low_symmetry_cell()
    a, b = pot.predict([atoms])[0], loaded.predict([atoms])[0]
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-12)
    model, ckpt = load_model(path)
    assert ckpt["format"] == "mattersim-mt" and ckpt["metrics"]["valid"]["energy_mae"] == 0.01

    calc = MatterSimCalculator(loaded)
    assert set(TASKS) <= set(calc.implemented_properties)
    atoms.calc = calc
    assert calc.get_property("born_effective_charges", atoms).shape == (len(atoms), 3, 3)
    assert calc.get_property("dielectric_tensor", atoms).shape == (3, 3)
    np.testing.assert_allclose(calc.get_property("magmoms", atoms), a["magmoms"], atol=1e-12)

    # the phonon workflow's property-predictor interface accepts the model
    from workflows.nac import find_predictor

    born, eps = find_predictor(calc).predict_dielectric(atoms)
    np.testing.assert_allclose(born, a["born_effective_charges"], atol=1e-12)
    np.testing.assert_allclose(eps, a["dielectric_tensor"], atol=1e-12)


def test_energy_only_model_has_no_extra_properties():
    pot = Potential(MultiTaskModel(build_backbone(BACKBONES["transformer"])), dtype="float64")
    res = pot.predict([bulk("Cu", "fcc", a=3.6)])[0]
    assert set(res) == {"energy", "energies", "forces", "stress"}
    assert MatterSimCalculator(pot).implemented_properties == list(MatterSimCalculator.implemented_properties)
