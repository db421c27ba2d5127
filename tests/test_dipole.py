"""The NAC of force constants from a short-ranged model (workflows.dipole).

The model with a known range is a rigid-ion crystal (rocksalt, charges +-1, so Z* = +-1 and eps_inf = 1):
a Born-Mayer repulsion plus the Coulomb interaction cut off sharply at ``RC``. Its force constants are
exactly "short range + dipole-dipole within RC". The reference is the same crystal with the whole Coulomb
interaction, Ewald-summed by pymatgen: what a DFT code's force constants look like. phonopy's plain NAC
is right for the reference and wrong for the truncated model (the LO branch moves with the supercell);
adding the missing tail (:func:`complete_dipole_tail`) gives the reference's bands at any supercell.
"""

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.neighborlist import neighbor_list

from mattersim.errors import InputError
from workflows.dipole import (
    DipoleWindow,
    complete_dipole_tail,
    dipole_force_constants,
    gamma_matching_force_constants,
    pair_dipole_force_constants,
    parse_nac_range,
    windowed_dipole_force_constants,
)
from workflows.nac import FixedDielectric, default_nac_factor, gamma_lo_to
from workflows.phonon import run_phonon

KE = default_nac_factor()  # e^2 / (4 pi eps0), eV Å
RC = 6.2  # Coulomb cutoff of the truncated model (between the 6.0 and 6.3 Å shells of NaCl, a = 5.64 Å)
A_BM, RHO_BM, R_BM = 2500.0, 0.3, 3.5  # Born-Mayer repulsion A exp(-r / rho) between nearest neighbours


def _charges(atoms):
    return np.where(atoms.numbers == 11, 1.0, -1.0)


def _born_mayer(atoms):
    i, j, d, vec = neighbor_list("ijdD", atoms, R_BM)
    e = A_BM * np.exp(-d / RHO_BM)
    forces = np.zeros((len(atoms), 3))
    # dE/dr_j for each ordered pair (each pair appears twice; energy halved)
    g = (-e / RHO_BM / d)[:, None] * vec
    np.add.at(forces, j, -0.5 * g)
    np.add.at(forces, i, 0.5 * g)
    return 0.5 * e.sum(), forces


class TruncatedRigidIon(Calculator):
    """Born-Mayer + Coulomb between point charges closer than RC (no interaction beyond)."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        q = _charges(self.atoms)
        i, j, d, vec = neighbor_list("ijdD", self.atoms, RC)
        qq = KE * q[i] * q[j]
        energy, forces = _born_mayer(self.atoms)
        energy += 0.5 * (qq / d).sum()
        g = (-qq / d**3)[:, None] * vec  # d(qq / r)/d r_j
        np.add.at(forces, j, -0.5 * g)
        np.add.at(forces, i, 0.5 * g)
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}


class EwaldRigidIon(Calculator):
    """Born-Mayer + the whole Coulomb interaction (pymatgen's Ewald sum): the reference."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        from pymatgen.analysis.ewald import EwaldSummation
        from pymatgen.io.ase import AseAtomsAdaptor

        super().calculate(atoms, properties, system_changes)
        structure = AseAtomsAdaptor.get_structure(self.atoms)
        structure.add_oxidation_state_by_element({"Na": 1, "Cl": -1})
        ewald = EwaldSummation(structure, compute_forces=True, acc_factor=14.0)
        energy, forces = _born_mayer(self.atoms)
        self.results = {"energy": energy + ewald.total_energy, "free_energy": energy + ewald.total_energy,
                        "forces": forces + np.asarray(ewald.forces)}


NACL = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
PATHS = {"GX": np.array([0.0, 0.5, 0.5]), "GL": np.array([0.5, 0.5, 0.5])}  # reduced, fcc primitive cell


def _highest(ph, npts=13):
    out = {}
    for name, end in PATHS.items():
        qs = np.array([t * end for t in np.linspace(0.04, 1.0, npts)])
        ph.run_qpoints(qs)
        out[name] = np.asarray(ph.qpoints.frequencies)[:, -1].copy()
    return out


def _run(calc, dim, **kw):
    return run_phonon(NACL, calc, relax=False, supercell=(dim, dim, dim), mesh=(4, 4, 4), progress=False,
                      predictor=FixedDielectric([1.0, -1.0], 1.0), **kw)


@pytest.fixture(scope="module")
def reference():
    return _highest(_run(EwaldRigidIon(), 2).phonopy)


@pytest.fixture(scope="module")
def truncated():
    return {dim: _run(TruncatedRigidIon(), dim, nac_range=None) for dim in (2, 3)}


def test_pair_term_is_the_coulomb_second_derivative_and_anisotropic_kernel():
    rng = np.random.default_rng(0)
    d = rng.normal(size=3) * 2.0
    # isotropic point charges: d^2 (k qi qj / |ri - rj|) / du_i du_j by central differences
    qi, qj, h = 1.3, -0.7, 1e-4
    energy = lambda v: KE * qi * qj / np.linalg.norm(v)
    fd = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            ea, eb = np.eye(3)[a] * h, np.eye(3)[b] * h
            # r = r_j - r_i: moving i by +ea shortens it
            fd[a, b] = (energy(d - ea + eb) - energy(d - ea - eb) - energy(d + ea + eb) + energy(d + ea - eb)) / (4 * h * h)
    phi = pair_dipole_force_constants(qi * np.eye(3)[None], qj * np.eye(3)[None], np.eye(3), d[None], KE)[0]
    np.testing.assert_allclose(phi, fd, rtol=1e-5, atol=1e-8)
    # anisotropic medium: -grad grad of 1 / (sqrt(det eps) sqrt(d . eps^-1 . d)) with general (non-symmetric) Z
    eps = np.array([[5.0, 0.4, 0.0], [0.4, 6.0, 0.3], [0.0, 0.3, 7.0]])
    zi, zj = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    inv = np.linalg.inv(eps)
    pot = lambda v: 1.0 / np.sqrt(np.linalg.det(eps) * v @ inv @ v)
    hess = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            ea, eb = np.eye(3)[a] * h, np.eye(3)[b] * h
            hess[a, b] = (pot(d + ea + eb) - pot(d + ea - eb) - pot(d - ea + eb) + pot(d - ea - eb)) / (4 * h * h)
    phi = pair_dipole_force_constants(zi[None], zj[None], eps, d[None], 1.0)[0]
    np.testing.assert_allclose(phi, -zi.T @ hess @ zj, rtol=1e-5, atol=1e-8)


def test_dipole_force_constants_are_pymatgen_ewald_force_constants():
    """phonopy's dipole-dipole force constants of a supercell = finite differences of an Ewald sum."""
    ph = _run(TruncatedRigidIon(), 2, nac_range=None).phonopy
    fc_dd = dipole_force_constants(ph)
    from pymatgen.analysis.ewald import EwaldSummation
    from pymatgen.io.ase import AseAtomsAdaptor

    from workflows.cells import to_ase_atoms

    sc = to_ase_atoms(ph.supercell)
    p2s = ph.primitive.p2s_map
    h = 1e-3
    for row, atom in enumerate(p2s):
        for axis in range(3):
            forces = []
            for sign in (1, -1):
                moved = sc.copy()
                moved.positions[atom, axis] += sign * h
                s = AseAtomsAdaptor.get_structure(moved)
                s.add_oxidation_state_by_element({"Na": 1, "Cl": -1})
                forces.append(np.asarray(EwaldSummation(s, compute_forces=True, acc_factor=14.0).forces))
            fd = -(forces[0] - forces[1]) / (2 * h)  # Phi(atom axis, j b)
            np.testing.assert_allclose(fc_dd[row, :, axis, :], fd, atol=2e-4)


def test_plain_nac_of_a_truncated_model_depends_on_the_supercell(truncated, reference):
    """The cause: phonopy's plain NAC subtracts the whole dipole-dipole tail that the model lacks."""
    small, large = (_highest(truncated[d].phonopy) for d in (2, 3))
    worst = max(np.abs(small[k] - large[k]).max() for k in PATHS)
    assert worst > 0.3, worst
    assert max(np.abs(large[k] - reference[k]).max() for k in PATHS) > 0.3


def test_completed_tail_gives_the_ewald_crystal_at_any_supercell(truncated, reference):
    for dim, result in truncated.items():
        ph = result.phonopy
        raw = ph.force_constants.copy()
        complete_dipole_tail(ph, DipoleWindow(RC, RC), keep_gamma=False)
        bands = _highest(ph)
        for k in PATHS:  # finite differences of two anharmonic models: ~1e-5 THz
            np.testing.assert_allclose(bands[k], reference[k], atol=1e-4, err_msg=f"{dim}x{dim}x{dim} {k}")
        ph.force_constants = raw


def test_run_phonon_with_a_window_converges_and_keeps_gamma(truncated):
    """The workflow's default (keep the model's own frequencies at Gamma): the same bands in both
    supercells, the TO and LO at Gamma unchanged from phonopy's plain NAC, the method recorded."""
    runs = {d: _run(TruncatedRigidIon(), d, nac_range=RC) for d in (2, 3)}
    small, large = (_highest(runs[d].phonopy) for d in (2, 3))
    for k in PATHS:
        np.testing.assert_allclose(small[k], large[k], atol=1e-4)
    for d in (2, 3):
        ours, plain = gamma_lo_to(runs[d].phonopy), gamma_lo_to(truncated[d].phonopy)
        for a, b in zip(ours["directions"], plain["directions"]):
            np.testing.assert_allclose(a["frequencies"], b["frequencies"], atol=1e-6)
        tail = runs[d].summary["nac"]["dipole_tail"]
        assert tail["window"]["r_on_A"] == RC and tail["keep_gamma"] is True
        assert runs[d].summary["settings"]["nac_range"]["shape"] == "step"
        assert truncated[d].summary["nac"]["dipole_tail"]["scheme"].startswith("none")


def test_gamma_matching_term_has_the_tail_q0_sums_and_sum_rule(truncated):
    ph = truncated[3].phonopy
    tail = dipole_force_constants(ph) - windowed_dipole_force_constants(ph, DipoleWindow(4.0, 6.5))
    g = gamma_matching_force_constants(ph, tail)
    prim = ph.primitive
    owner = np.array([prim.p2p_map[k] for k in prim.s2p_map])
    for a in range(len(prim)):
        for b in range(len(prim)):
            np.testing.assert_allclose(g[a, owner == b].sum(axis=0), tail[a, owner == b].sum(axis=0), atol=1e-12)
    np.testing.assert_allclose(g.sum(axis=1), 0.0, atol=1e-10)  # acoustic sum rule
    np.testing.assert_allclose(tail.sum(axis=1), 0.0, atol=1e-8)
    assert np.count_nonzero(np.abs(g).sum(axis=(2, 3)) > 0) <= len(prim) * (1 + 6)  # on-site + 6 nearest


def test_window_and_nac_range_parsing():
    w = DipoleWindow(4.0, 6.5)
    np.testing.assert_allclose(w.weights([3.0, 4.0, 5.25, 6.5, 7.0]), [1, 1, 0.5, 0, 0], atol=1e-12)
    np.testing.assert_allclose(DipoleWindow(5.0, 5.0).weights([4.99, 5.0]), [1, 0])
    assert parse_nac_range("auto") == "auto"
    assert parse_nac_range("none") is None and parse_nac_range(None) is None
    assert parse_nac_range("4:6.5") == DipoleWindow(4.0, 6.5, "given")
    assert parse_nac_range(6) == DipoleWindow(6.0, 6.0, "given")
    for bad in ("six", "1:2:3", (7.0, 5.0), -1.0, [1, 2, 3]):
        with pytest.raises(InputError):
            parse_nac_range(bad)


@pytest.mark.slow
@pytest.mark.parametrize("charges", ["dft", "model"])
def test_chgnet_sic_lo_branch_converges_with_the_completed_tail(charges, tmp_path):
    """PhononDB 3C-SiC, CHGNet force constants, Z* and eps_inf from the DFT BORN file or predicted by
    mattersim-dielectric: phonopy's plain NAC moves the LO branch by about 3 THz between the 64- and
    216-atom supercells and makes it wiggle; with the tail completed (nac_range='auto') it moves by less
    than 0.3 THz and falls monotonically from Γ, as DFT's does."""
    pytest.importorskip("chgnet")
    from benchmarks.nac_convergence import CASES, monotonic, run_case
    from conftest import shared_path
    from mattersim.registry import load_calculator

    folder = shared_path("data", "phonondb", "entries", CASES["3C-SiC"])
    model = "chgnet" if charges == "dft" else "chgnet+mattersim-dielectric"
    case = run_case("3C-SiC", folder, load_calculator(model), charges, tmp_path)
    assert all(monotonic(v) for v in case["dft"].values())
    assert max(case["plain"]["max_change_THz"].values()) > 1.0
    assert max(case["completed"]["max_change_THz"].values()) < 0.3
    assert all(case["completed"]["monotonic_where_dft_is"].values())


def test_cli_rejects_a_bad_nac_range_before_any_work(tmp_path):
    import ase.io
    from typer.testing import CliRunner

    from conftest import assert_user_error
    from mattersim.cli import app

    poscar = tmp_path / "POSCAR"
    ase.io.write(poscar, bulk("Si"), format="vasp")
    result = CliRunner().invoke(app, ["phonon", str(poscar), "--nac", "--nac-range", "6:4", "-o", str(tmp_path / "out")])
    assert_user_error(result, "r_on <= r_off")
    assert not (tmp_path / "out").exists()


def test_phonopy_yaml_reproduces_the_completed_bands(tmp_path):
    """phonopy alone (phonopy.load of the written phonopy.yaml, NAC from it) gives our bands."""
    import phonopy

    result = _run(TruncatedRigidIon(), 2, nac_range=(4.0, 6.5))
    result.save(tmp_path)
    again = phonopy.load(tmp_path / "phonopy.yaml", log_level=0)
    ours, theirs = _highest(result.phonopy), _highest(again)
    for k in PATHS:
        np.testing.assert_allclose(theirs[k], ours[k], atol=1e-8)
    raw = _run(TruncatedRigidIon(), 2, nac_range=None)
    assert max(np.abs(_highest(raw.phonopy)[k] - ours[k]).max() for k in PATHS) > 0.1
