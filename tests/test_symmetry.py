"""mattersim.symmetry: ASE's FixSymmetry from one spglib analysis, checked against ASE's own construction."""

import numpy as np
import pytest
from ase.build import bulk
from ase.constraints import FixSymmetry
from ase.spacegroup import crystal

from mattersim.symmetry import fix_symmetry, symmetrize, symmetry_dataset

NOISE = 1e-5  # Å, well inside the tolerance below
SYMPREC = 1e-3


def _structures():
    return {
        "fcc Cu": bulk("Cu"),
        "diamond Si (conventional, 2x1x1)": bulk("Si", cubic=True).repeat((2, 1, 1)),
        "hcp Mg": bulk("Mg"),
        "fcc Si 3x2x1, turned": bulk("Si").repeat((3, 2, 1)),  # a supercell in no standard orientation
        # a free parameter (x of O) and a non-symmorphic group
        "rutile TiO2": crystal(["Ti", "O"], basis=[(0, 0, 0), (0.3, 0.3, 0)], spacegroup=136,
                               cellpar=[4.6, 4.6, 2.95, 90, 90, 90]),
        "wurtzite ZnO": bulk("ZnO", "wurtzite", a=3.25, c=5.2, u=0.38),
    }


def _noisy(atoms, seed):
    rng = np.random.default_rng(seed)
    a = atoms.copy()
    a.rotate(33, "y", rotate_cell=True)
    a.positions += rng.uniform(-NOISE, NOISE, size=a.positions.shape)
    a.set_cell(a.cell[:] + rng.uniform(-NOISE, NOISE, size=(3, 3)), scale_atoms=False)
    return a


def _max_symmetry_error(atoms, dataset) -> float:
    """Largest distance (fractional) between an atom's image under an operation and the atom it lands on."""
    frac = atoms.get_scaled_positions(wrap=False)
    worst = 0.0
    for r, t in zip(dataset.rotations, dataset.translations):
        d = (frac @ np.asarray(r, float).T + t)[:, None, :] - frac[None, :, :]
        d -= np.round(d)
        dist = np.linalg.norm(d, axis=-1)
        dist[atoms.numbers[:, None] != atoms.numbers[None, :]] = np.inf
        worst = max(worst, float(dist.min(axis=1).max()))
    return worst


@pytest.mark.parametrize("name", list(_structures()))
def test_fix_symmetry_is_ases_constraint_from_one_analysis(name, monkeypatch):
    noisy = _noisy(_structures()[name], seed=len(name))
    ours, theirs = noisy.copy(), noisy.copy()
    import spglib

    calls = []
    real = spglib.get_symmetry_dataset
    monkeypatch.setattr(spglib, "get_symmetry_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    c_ours = fix_symmetry(ours, symprec=SYMPREC)
    assert len(calls) == 1  # ASE's constructor analyses the structure four times
    c_theirs = FixSymmetry(theirs, symprec=SYMPREC)

    # the same idealised cell (the same formula on the same spglib lattice: to rounding)
    np.testing.assert_allclose(ours.cell[:], theirs.cell[:], atol=1e-12)
    # positions: exactly symmetric, and within the noise of the input (ASE idealises the free parameters its own
    # way, by spglib's standardised positions, and anchors atom 0: the two agree to the noise, up to a shift)
    data = symmetry_dataset(ours, 1e-8)
    assert data is not None and data.number == symmetry_dataset(theirs, 1e-8).number
    assert _max_symmetry_error(ours, c_ours) < 1e-12
    assert np.abs(ours.positions - noisy.positions).max() < 3 * NOISE * np.sqrt(3)
    shift = (ours.positions - theirs.positions).mean(axis=0)
    assert np.abs(ours.positions - theirs.positions - shift).max() < 3 * NOISE * np.sqrt(3)
    # the same operations (a supercell's may come in another order; the translations for the origin shifted by
    # s: t + (R - 1) s), hence the same symmetrised forces and stress
    assert len(c_ours.rotations) == len(c_theirs.rotations)
    s = -shift @ np.linalg.inv(ours.cell[:])
    for r, t in zip(c_ours.rotations, c_ours.translations):
        dt = np.asarray(c_theirs.translations) - (t + (r - np.eye(3)) @ s)
        dt -= np.round(dt)
        same = np.all(np.asarray(c_theirs.rotations) == r, axis=(1, 2)) & (np.abs(dt).max(axis=1) < 1e-4)
        assert same.sum() == 1
    rng = np.random.default_rng(7)
    forces = rng.normal(size=(len(ours), 3))
    f_ours, f_theirs = forces.copy(), forces.copy()
    c_ours.adjust_forces(ours, f_ours)
    c_theirs.adjust_forces(ours, f_theirs)  # the same geometry for both: only the maps and operations differ
    np.testing.assert_allclose(f_ours, f_theirs, atol=1e-12)
    stress = rng.normal(size=6)
    s_ours, s_theirs = stress.copy(), stress.copy()
    c_ours.adjust_stress(ours, s_ours)
    c_theirs.adjust_stress(ours, s_theirs)
    np.testing.assert_allclose(s_ours, s_theirs, atol=1e-12)


def test_symmetrize_is_a_projection():
    # symmetrising a symmetric structure changes nothing; a structure symmetrised twice is the same
    atoms = _noisy(_structures()["rutile TiO2"], seed=3)
    data = symmetry_dataset(atoms, SYMPREC)
    once = atoms.copy()
    symmetrize(once, data)
    twice = once.copy()
    symmetrize(twice, symmetry_dataset(once, SYMPREC))
    np.testing.assert_allclose(twice.positions, once.positions, atol=1e-12)
    np.testing.assert_allclose(twice.cell[:], once.cell[:], atol=1e-12)


def test_operations_that_do_not_map_the_atoms_one_to_one_fall_back_to_ase(monkeypatch):
    # a translation by 0.12 of the cell sends both atoms (x = 0.1, 0.2) nearest to the second one: such a
    # dataset (a tolerance too loose for the structure) must neither move the atoms nor give a constraint
    from ase import Atoms

    atoms = Atoms("Cu2", scaled_positions=[[0.1, 0, 0], [0.2, 0, 0]], cell=[10.0, 3.0, 3.0], pbc=True)

    class Loose:
        rotations = np.array([np.eye(3, dtype=int)] * 2)
        translations = np.array([[0.0, 0, 0], [0.12, 0, 0]])
        transformation_matrix = std_rotation_matrix = np.eye(3)
        std_lattice = np.diag([10.0, 3.0, 3.0])

    before = atoms.positions.copy()
    assert symmetrize(atoms, Loose()) is None
    np.testing.assert_array_equal(atoms.positions, before)
    used = []
    monkeypatch.setattr(FixSymmetry, "__init__", lambda self, a, symprec: used.append(symprec))
    fix_symmetry(atoms, 1e-5, dataset=Loose())
    assert used == [1e-5]


@pytest.mark.parametrize("old_error_handling", [True, False])
def test_a_structure_spglib_cannot_analyse_has_no_dataset_in_either_spglib_error_mode(monkeypatch,
                                                                                      old_error_handling):
    # two atoms on one site: spglib finds no symmetry; older spglib (and 2.x's default) returns None, its new
    # error mode raises SpglibError; both read as "no symmetry" (P1), any other exception is not swallowed
    import spglib
    from ase import Atoms

    error = pytest.importorskip("spglib.error")
    monkeypatch.setattr(error, "OLD_ERROR_HANDLING", old_error_handling)
    atoms = Atoms("Cu2", scaled_positions=[[0, 0, 0], [0, 0, 0]], cell=[3.0, 3.0, 3.0], pbc=True)
    assert symmetry_dataset(atoms) is None

    def broken(*args, **kwargs):
        raise TypeError("a bug, not a structure without symmetry")

    monkeypatch.setattr(spglib, "get_symmetry_dataset", broken)
    with pytest.raises(TypeError):
        symmetry_dataset(atoms)
