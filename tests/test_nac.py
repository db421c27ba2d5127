"""Non-analytical term correction (workflows/nac.py): physics and parity with phonopy's own NAC.

- phonopy examples (NaCl, MgO) and PhononDB 3C-SiC: our read_born + symmetrize + to_phonopy_nac_params give
  the same frequencies as ``phonopy.load(..., born_filename=...)`` at Gamma (LO and TO along several
  directions), along a band path and on a mesh (and the same DOS), to 1e-6 THz, for both NAC methods.
- analytic LO-TO splitting of a rocksalt crystal with a nearest-neighbour spring model;
- the Z* index convention (field first, displacement second) against a hand-built dynamical matrix, a
  BORN round trip through phonopy's parser for non-symmetric tensors, and Z* vs Z*^T giving different LO;
- symmetrisation / neutrality reports, BORN-file errors, the source order of resolve_born.
"""

from __future__ import annotations

import logging
from fractions import Fraction

import numpy as np
import pytest

pytest.importorskip("phonopy")

import phonopy  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.calculators.calculator import Calculator, all_changes  # noqa: E402
from ase.neighborlist import neighbor_list  # noqa: E402
from phonopy import Phonopy  # noqa: E402
from phonopy.file_IO import parse_BORN, parse_FORCE_SETS  # noqa: E402
from phonopy.interface.calculator import read_crystal_structure  # noqa: E402
from phonopy.physical_units import get_physical_units  # noqa: E402
from phonopy.structure.atoms import PhonopyAtoms  # noqa: E402

from mattersim.errors import InputError  # noqa: E402
from tests.conftest import shared_path  # noqa: E402
from workflows import nac  # noqa: E402
from workflows.cells import to_phonopy_atoms  # noqa: E402

TOL = 1e-6  # THz
DIRECTIONS = ((1, 0, 0), (1, 1, 0), (1, 1, 1))


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _spring_force_constants(supercell: PhonopyAtoms, k: float, cutoff: float) -> np.ndarray:
    """Central springs of stiffness k (eV/A^2) between all pairs closer than cutoff: a PSD, ASR-obeying FC."""
    atoms = Atoms(symbols=list(supercell.symbols), cell=supercell.cell, scaled_positions=supercell.scaled_positions, pbc=True)
    i, j, vec = neighbor_list("ijD", atoms, cutoff)
    n = len(atoms)
    fc = np.zeros((n, n, 3, 3))
    for a, b, d in zip(i, j, vec):
        e = d / np.linalg.norm(d)
        block = -k * np.outer(e, e)
        fc[a, b] += block
        fc[a, a] -= block
    return fc


def _spring_phonon(unitcell: PhonopyAtoms, dim: int, k: float = 2.0, cutoff: float = 3.0) -> Phonopy:
    ph = Phonopy(unitcell, supercell_matrix=np.eye(3, dtype=int) * dim, primitive_matrix="P")
    ph.force_constants = _spring_force_constants(ph.supercell, k, cutoff)
    return ph


def _fdiff(a, b) -> float:
    """Max |a - b| in THz over modes, except near-zero (acoustic at Gamma) modes, compared through f|f|.

    At Gamma the acoustic frequencies are sqrt(eigenvalue noise ~1e-14 THz^2) ~ 1e-7 THz in phonopy itself,
    so two mathematically identical calculations differ there by ~1e-7 THz; their squares agree to ~1e-13
    THz^2. Below 0.1 THz we therefore compare f|f| (THz^2) and count it against the same tolerance.
    """
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    small = np.maximum(np.abs(a), np.abs(b)) < 0.1
    d = np.where(small, np.abs(a * np.abs(a) - b * np.abs(b)), np.abs(a - b))
    return float(d.max())


def _reduced(cell, d) -> np.ndarray:
    """Cartesian q-direction -> fractional coordinates of the reciprocal basis (phonopy's nac_q_direction)."""
    return np.asarray(cell, float) @ np.asarray(d, float)


def _ref_gamma(ph: Phonopy, d) -> np.ndarray:
    """phonopy's own frequencies at Gamma approached along Cartesian d (no workflows.nac code involved)."""
    ph.run_qpoints([[0, 0, 0]], nac_q_direction=_reduced(ph.primitive.cell, d))
    return np.sort(ph.qpoints.frequencies[0])


def _ours_from_example(unitcell_file, supercell_matrix, primitive_matrix, force_sets, born_file, method=None):
    """Our pipeline: Phonopy + FORCE_SETS (as phonopy.load does it), NAC through workflows.nac."""
    unitcell, _ = read_crystal_structure(str(unitcell_file))
    ph = Phonopy(unitcell, supercell_matrix=supercell_matrix, primitive_matrix=primitive_matrix)
    ph.dataset = parse_FORCE_SETS(filename=str(force_sets))
    # exactly what phonopy.load does by default: compact force constants, then symmetrize_fc=True
    ph.produce_force_constants(calculate_full_force_constants=False)
    ph.symmetrize_force_constants(show_drift=False)
    born = nac.read_born(born_file, ph.primitive)
    born, report = nac.symmetrize(born, ph.primitive)
    ph.nac_params = born.to_phonopy_nac_params(method=method)
    return ph, born, report


def _reference(unitcell_file, supercell_matrix, primitive_matrix, force_sets, born_file, method=None):
    ref = phonopy.load(
        supercell_matrix=supercell_matrix,
        primitive_matrix=primitive_matrix,
        unitcell_filename=str(unitcell_file),
        force_sets_filename=str(force_sets),
        born_filename=str(born_file),
    )
    if method is not None:
        params = dict(ref.nac_params)
        params["method"] = method
        ref.nac_params = params
    return ref


def _compare_everywhere(ours: Phonopy, ref: Phonopy, band_path, mesh=(8, 8, 8)) -> dict:
    """Max |difference| (THz, or states/THz for the DOS) at Gamma (LO/TO), along a band path, on a mesh."""
    diffs = {}
    lo_to = nac.gamma_lo_to(ours, DIRECTIONS)
    ref.run_qpoints([[0, 0, 0]])
    diffs["gamma_TO"] = _fdiff(lo_to["to"], np.sort(ref.qpoints.frequencies[0]))
    diffs["gamma_LO"] = max(_fdiff(entry["frequencies"], _ref_gamma(ref, d)) for entry, d in zip(lo_to["directions"], DIRECTIONS))
    paths = [band_path]
    ours.run_band_structure(paths)
    ref.run_band_structure(paths)
    diffs["band"] = max(_fdiff(a, b) for a, b in zip(ours.band_structure.frequencies, ref.band_structure.frequencies))
    for ph in (ours, ref):
        ph.run_mesh(list(mesh), is_gamma_center=True)
        ph.run_total_dos(freq_min=-1, freq_max=25, freq_pitch=0.1)
    diffs["mesh"] = _fdiff(ours.mesh.frequencies, ref.mesh.frequencies)
    diffs["dos"] = np.abs(ours.total_dos.dos - ref.total_dos.dos).max()
    diffs["lo_to"] = lo_to
    return diffs


def _band_path(points, n=11):
    points = np.asarray(points, float)
    return [points[i] + (points[i + 1] - points[i]) * t for i in range(len(points) - 1) for t in np.linspace(0, 1, n)]


FCC_PATH = [[0, 0, 0], [0.5, 0, 0], [0.5, 0.5, 0], [0, 0, 0], [0.5, 0.5, 0.5]]  # NaCl README path (primitive)


def _example_inputs(name):
    import yaml

    folder = shared_path("data", "phonopy-examples", name)
    disp = yaml.safe_load((folder / "phonopy_disp.yaml").read_text())
    return (
        folder / "POSCAR-unitcell",
        disp["supercell_matrix"],
        # MgO: absent, which meant "the unit cell is the primitive cell" in phonopy 2.7 that wrote the file;
        # phonopy >= 4 would resolve a missing matrix to "auto" (the 2-atom cell), so say "P" explicitly
        disp.get("primitive_matrix", "P"),
        folder / "FORCE_SETS",
        folder / "BORN",
    )


# --------------------------------------------------------------------------------------------------
# parity with phonopy
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gonze", "wang"])
def test_nacl_example_matches_phonopy(method):
    inputs = _example_inputs("NaCl")
    ours, born, report = _ours_from_example(*inputs, method=method)
    ref = _reference(*inputs, method=method)
    assert ours.nac_params.get("method", "gonze") == method
    assert born.factor == pytest.approx(14.4)  # line 1 of the example's BORN file, as phonopy reads it
    # the example's Z* are not neutral (1.08703 - 1.08672); the report says by how much
    assert report["neutrality_max_change"] == pytest.approx(0.000155, abs=1e-9)
    assert report["warnings"] == []
    np.testing.assert_allclose(born.born.sum(axis=0), 0, atol=1e-12)

    diffs = _compare_everywhere(ours, ref, _band_path(FCC_PATH))
    for key in ("gamma_TO", "gamma_LO", "band", "mesh"):
        assert diffs[key] < TOL, (key, diffs[key])
    assert diffs["dos"] < 1e-6
    # physics: one LO mode raised above the triply degenerate TO (about 4.62 -> 7.40 THz)
    for entry in diffs["lo_to"]["directions"]:
        assert len(entry["lo_frequencies"]) == 1
        assert entry["lo_frequencies"][0] == pytest.approx(7.3963, abs=2e-3)
        assert entry["to_frequencies"][-1] == pytest.approx(4.6164, abs=2e-3)


def test_mgo_example_matches_phonopy():
    inputs = _example_inputs("MgO")
    ours, born, report = _ours_from_example(*inputs)
    ref = _reference(*inputs)
    assert len(ours.primitive) == 8 and len(born.born) == 8  # conventional cell, 2 independent atoms expanded
    diffs = _compare_everywhere(ours, ref, _band_path([[0, 0, 0], [0.5, 0, 0], [0.5, 0.5, 0], [0, 0, 0], [0.5, 0.5, 0.5]]), mesh=(4, 4, 4))
    for key in ("gamma_TO", "gamma_LO", "band", "mesh"):
        assert diffs[key] < TOL, (key, diffs[key])
    assert diffs["dos"] < 1e-6
    # the 8-atom cell folds X onto Gamma, but only the zone-centre polar mode splits: exactly one LO per direction
    for entry in diffs["lo_to"]["directions"]:
        assert len(entry["lo_frequencies"]) == 1
        assert entry["lo_frequencies"][0] > max(diffs["lo_to"]["to"]) + 1.0


def _phonopy_conf(path) -> dict:
    conf = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            conf[key.strip().upper()] = [float(Fraction(x)) for x in value.split()]
    return conf


@pytest.mark.parametrize("method", ["gonze", "wang"])
def test_phonondb_sic_gamma_matches_phonopy(method):
    folder = shared_path("data", "phonondb", "entries", "mp-8062-20180417")
    conf = _phonopy_conf(folder / "phonopy.conf")
    dim = np.array(conf["DIM"], dtype=int).reshape(3, 3)
    pa = np.array(conf["PRIMITIVE_AXIS"]).reshape(3, 3)
    inputs = (folder / "POSCAR-unitcell", dim, pa, folder / "FORCE_SETS", folder / "BORN")
    ours, born, _ = _ours_from_example(*inputs, method=method)
    ref = _reference(*inputs, method=method)
    assert len(ours.primitive) == 2
    lo_to = nac.gamma_lo_to(ours, DIRECTIONS)
    ref.run_qpoints([[0, 0, 0]])
    assert _fdiff(lo_to["to"], np.sort(ref.qpoints.frequencies[0])) < TOL
    for entry, d in zip(lo_to["directions"], DIRECTIONS):
        assert _fdiff(entry["frequencies"], _ref_gamma(ref, d)) < TOL
        # 3C-SiC: TO about 23.4 THz, LO about 28.5 THz (PBE; experiment 23.9 / 29.1)
        assert len(entry["lo_frequencies"]) == 1
        assert 27.0 < entry["lo_frequencies"][0] < 30.0
        assert 22.0 < entry["to_frequencies"][-1] < 25.0


# --------------------------------------------------------------------------------------------------
# analytic LO-TO splitting
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gonze", "wang"])
def test_rocksalt_lo_to_matches_analytic_formula(method):
    unit = to_phonopy_atoms(bulk("NaCl", "rocksalt", a=5.69))  # 2-atom primitive cell
    ph = _spring_phonon(unit, dim=2, k=1.5, cutoff=3.0)  # 6 nearest neighbours, d = 2.845 A
    z, eps = 1.1, 2.4
    born = nac.BornCharges([z, -z], eps, source="arrays")
    born, report = nac.symmetrize(born, ph.primitive)
    assert report["neutrality_max_change"] == 0 and report["symmetry_max_change"] < 1e-12
    ph.nac_params = born.to_phonopy_nac_params(method=method)
    lo_to = nac.gamma_lo_to(ph)
    masses = ph.primitive.masses
    expected = nac.lo_to_analytic(z, eps, ph.primitive.volume, masses)
    # TO of the spring model: omega^2 = 2k (1/m1 + 1/m2)
    units = get_physical_units()
    nu_to = np.sqrt(2 * 1.5 * (1 / masses[0] + 1 / masses[1])) * units.DefaultToTHz
    assert max(lo_to["to"]) == pytest.approx(nu_to, rel=1e-9)
    for entry in lo_to["directions"]:  # cubic: the same splitting along every direction
        assert len(entry["lo_frequencies"]) == 1
        nu_lo = entry["lo_frequencies"][0]
        assert nu_lo**2 - nu_to**2 == pytest.approx(expected, rel=5e-3)
        assert nu_lo**2 - nu_to**2 == pytest.approx(expected, rel=1e-5)  # in fact CODATA-level agreement
        assert sorted(entry["to_frequencies"])[-2:] == pytest.approx([nu_to, nu_to], rel=1e-9)


def test_lo_to_analytic_scaling():
    base = nac.lo_to_analytic(1.0, 2.0, 40.0, (23.0, 35.0))
    assert nac.lo_to_analytic(2.0, 2.0, 40.0, (23.0, 35.0)) == pytest.approx(4 * base)
    assert nac.lo_to_analytic(1.0, 4.0, 40.0, (23.0, 35.0)) == pytest.approx(base / 2)
    assert nac.lo_to_analytic(1.0, 2.0, 80.0, (23.0, 35.0)) == pytest.approx(base / 2)
    # and in phonopy's own units: 4 pi factor Z^2 / (Omega eps mu) [eV/A^2/amu] -> THz^2
    units = get_physical_units()
    mu = 23.0 * 35.0 / 58.0
    phonopy_value = 4 * np.pi * nac.default_nac_factor() / (40.0 * 2.0 * mu) * units.DefaultToTHz**2
    assert base == pytest.approx(phonopy_value, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# the Z* convention: field index first, displacement index second
# --------------------------------------------------------------------------------------------------
def _monoclinic_p2() -> PhonopyAtoms:
    """Space group P2 (2-fold axis along z), two pairs of atoms on general positions, site symmetry 1."""
    cell = [[3.6, 0.0, 0.0], [0.9, 3.9, 0.0], [0.0, 0.0, 4.2]]
    frac = [[0.10, 0.20, 0.30], [-0.10, -0.20, 0.30], [0.40, 0.15, 0.75], [-0.40, -0.15, 0.75]]
    return PhonopyAtoms(symbols=["Mg", "Mg", "O", "O"], cell=cell, scaled_positions=frac)


Z_MG = np.array([[2.0, 0.6, 0.2], [-0.3, 1.5, 0.1], [0.4, -0.2, 1.8]])
Z_O = np.array([[-1.7, -0.1, 0.3], [0.5, -1.6, -0.2], [-0.1, 0.2, -2.0]])
EPS = np.array([[3.1, 0.2, 0.0], [0.2, 2.8, 0.0], [0.0, 0.0, 3.4]])


def _p2_born():
    prim = _monoclinic_p2()
    from phonopy.structure.symmetry import Symmetry

    sym = Symmetry(prim, symprec=1e-5)
    assert sym.dataset.number == 3  # P2, as intended: a genuinely low-symmetry crystal
    assert list(sym.get_independent_atoms()) == [0, 2]
    born = nac.BornCharges(np.array([Z_MG, Z_MG, Z_O, Z_O]), EPS, source="arrays")
    born, report = nac.symmetrize(born, prim)
    # site symmetry 1 and point group 2: the symmetrised tensors are still far from symmetric
    assert np.abs(born.born[0] - born.born[0].T).max() > 0.5
    return prim, born, report


def test_write_born_round_trips_through_phonopys_parser(tmp_path):
    prim, born, _ = _p2_born()
    path = nac.write_born(tmp_path / "BORN", born, prim)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# epsilon and Z* of atoms 1 3")  # phonopy's comment line
    assert len(lines) == 4  # comment, eps, two independent atoms
    # row-major Z[field][displacement] on each line: the first three numbers are the first row
    np.testing.assert_allclose(np.array(lines[2].split(), float).reshape(3, 3), born.born[0], atol=1e-11)
    back = parse_BORN(prim, filename=str(path))  # phonopy's own parser and symmetry expansion
    np.testing.assert_allclose(back["born"], born.born, atol=1e-10)
    np.testing.assert_allclose(back["dielectric"], born.epsilon, atol=1e-10)
    ours = nac.read_born(path, prim)
    np.testing.assert_allclose(ours.born, born.born, atol=1e-10)
    assert ours.factor is None and ours.source == f"BORN file {path}"
    # the atom related by the 2-fold axis carries R Z R^T (not R Z^T R^T)
    r = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(back["born"][1], r @ born.born[0] @ r.T, atol=1e-10)
    # unit factor survives a round trip
    path2 = nac.write_born(tmp_path / "BORN2", nac.BornCharges(born.born, born.epsilon, factor=14.4), prim)
    assert parse_BORN(prim, filename=str(path2))["factor"] == 14.4
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def test_write_born_refuses_tensors_that_break_symmetry(tmp_path):
    prim, born, _ = _p2_born()
    broken = nac.BornCharges(born.born + np.array([0.0, 0.3, 0.0, 0.0])[:, None, None], born.epsilon)
    with pytest.raises(InputError, match="symmetrise them first"):
        nac.write_born(tmp_path / "BORN", broken, prim)
    assert not (tmp_path / "BORN").exists()


def _lo_along(prim, born_array, eps, method, direction=(1, 1, 0)):
    ph = _spring_phonon(prim, dim=2, k=1.0, cutoff=3.3)
    ph.nac_params = nac.BornCharges(born_array, eps).to_phonopy_nac_params(method=method)
    return ph, nac.gamma_lo_to(ph, [direction])


@pytest.mark.parametrize("method", ["gonze", "wang"])
def test_lo_frequencies_follow_phonopys_index_convention(method):
    """Hand-built D(q->0) = D_fc + (4 pi f / Omega) (q.Z_k)(q.Z_k') / (q.eps.q) / sqrt(m m'): field index first."""
    prim, born, _ = _p2_born()
    ph, lo_to = _lo_along(prim, born.born, born.epsilon, method)
    assert min(lo_to["to"]) > -1e-6 and sorted(lo_to["to"])[3] > 0.1  # stable spring model, 3 acoustic modes
    ph.dynamical_matrix.run([0, 0, 0])  # no direction: force constants only
    d0 = ph.dynamical_matrix.dynamical_matrix
    q = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    masses = np.asarray(ph.primitive.masses)
    qz = np.einsum("i,kij->kj", q, born.born) / np.sqrt(masses)[:, None]  # (q . Z_k) / sqrt(m_k)
    nac_term = 4 * np.pi * nac.default_nac_factor() / ph.primitive.volume * np.outer(qz.ravel(), qz.ravel()) / (q @ born.epsilon @ q)
    eig = np.linalg.eigvalsh(d0 + nac_term)
    units = get_physical_units()
    expected = np.sign(eig) * np.sqrt(np.abs(eig)) * units.DefaultToTHz
    got = np.array(lo_to["directions"][0]["frequencies"])
    assert _fdiff(np.sort(expected), got) < 1e-9
    assert lo_to["directions"][0]["lo_frequencies"]


def test_transposed_born_changes_lo_along_110():
    prim, born, _ = _p2_born()
    _, right = _lo_along(prim, born.born, born.epsilon, "gonze")
    _, transposed = _lo_along(prim, np.transpose(born.born, (0, 2, 1)), born.epsilon, "gonze")
    f_right = np.array(right["directions"][0]["frequencies"])
    f_transposed = np.array(transposed["directions"][0]["frequencies"])
    assert _fdiff(right["to"], transposed["to"]) < 1e-9  # TO: no Z* involved
    assert np.abs(f_right - f_transposed).max() > 0.05  # THz: the convention matters


def test_gamma_lo_to_reduced_directions_and_no_nac():
    unit = to_phonopy_atoms(bulk("NaCl", "rocksalt", a=5.69))
    ph = _spring_phonon(unit, dim=2, k=1.5, cutoff=3.0)
    plain = nac.gamma_lo_to(ph)  # no nac_params: no LO modes anywhere
    assert plain["method"] is None
    assert all(entry["lo_frequencies"] == [] for entry in plain["directions"])
    ph.nac_params = nac.BornCharges([1.0, -1.0], 2.0).to_phonopy_nac_params()
    cart = nac.gamma_lo_to(ph, [(1, 0, 0)])
    red = cart["directions"][0]["q_direction_reduced"]
    q_cart = np.linalg.inv(ph.primitive.cell) @ np.array(red)  # phonopy: q_cart = inv(cell) @ q_red
    assert np.cross(q_cart, [1, 0, 0]) == pytest.approx([0, 0, 0], abs=1e-12)
    frac = nac.gamma_lo_to(ph, [red], cartesian=False)
    assert frac["directions"][0]["frequencies"] == pytest.approx(cart["directions"][0]["frequencies"], abs=1e-12)
    with pytest.raises(InputError, match="non-zero"):
        nac.gamma_lo_to(ph, [(0, 0, 0)])


# --------------------------------------------------------------------------------------------------
# symmetrisation and charge neutrality
# --------------------------------------------------------------------------------------------------
def _nacl_prim() -> PhonopyAtoms:
    return to_phonopy_atoms(bulk("NaCl", "rocksalt", a=5.69))


def test_neutrality_violation_is_corrected_and_reported(caplog):
    prim = _nacl_prim()
    born = nac.BornCharges([1.2, -0.9], 2.4, source="arrays")  # sum 0.3 e
    with caplog.at_level(logging.INFO, logger="workflows.nac"):
        fixed, report = nac.symmetrize(born, prim)
    np.testing.assert_allclose(fixed.born.sum(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(fixed.born[0], 1.05 * np.eye(3), atol=1e-12)
    np.testing.assert_allclose(report["charge_sum_before"], 0.3 * np.eye(3), atol=1e-12)
    np.testing.assert_allclose(report["charge_sum_after"], 0, atol=1e-12)
    assert report["neutrality_max_change"] == pytest.approx(0.15)
    assert report["symmetry_max_change"] < 1e-12
    assert len(report["warnings"]) == 1 and "charge neutrality" in report["warnings"][0]
    assert any(r.levelno == logging.WARNING and "0.15" in r.getMessage() for r in caplog.records)
    # a small violation is corrected without a warning (but still logged)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="workflows.nac"):
        _, small = nac.symmetrize(nac.BornCharges([1.0, -0.96], 2.4), prim)
    assert small["neutrality_max_change"] == pytest.approx(0.02) and small["warnings"] == []
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    assert any("charge neutrality" in r.getMessage() for r in caplog.records)


def test_symmetrisation_report_separates_the_corrections():
    prim = _nacl_prim()
    rng = np.random.default_rng(0)
    noise = rng.normal(scale=0.02, size=(2, 3, 3))
    eps_noise = np.array([[0.0, 0.3, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    born = nac.BornCharges(np.array([1.1 * np.eye(3), -1.1 * np.eye(3)]) + noise, 2.4 * np.eye(3) + eps_noise)
    fixed, report = nac.symmetrize(born, prim)
    # m-3m: isotropic tensors, neutral
    for k in range(2):
        np.testing.assert_allclose(fixed.born[k], np.trace(fixed.born[k]) / 3 * np.eye(3), atol=1e-12)
    np.testing.assert_allclose(fixed.born.sum(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(fixed.epsilon, 2.4 * np.eye(3), atol=1e-12)
    assert report["epsilon_max_change"] == pytest.approx(0.3)
    # pure symmetry average: isotropic part of each atom's tensor
    iso = np.array([np.trace(z) / 3 for z in born.born])
    assert report["symmetry_max_change"] == pytest.approx(np.abs(born.born - iso[:, None, None] * np.eye(3)).max())
    assert report["neutrality_max_change"] == pytest.approx(abs(iso.sum()) / 2)
    assert len(report["warnings"]) == 1 and "eps_inf" in report["warnings"][0]
    # symmetric, neutral input is a fixed point
    again, report2 = nac.symmetrize(fixed, prim)
    np.testing.assert_allclose(again.born, fixed.born, atol=1e-12)
    assert max(report2["symmetry_max_change"], report2["neutrality_max_change"], report2["epsilon_max_change"]) < 1e-12


# --------------------------------------------------------------------------------------------------
# BORN files
# --------------------------------------------------------------------------------------------------
NACL_BORN = "14.400\n2.43 0 0 0 2.43 0 0 0 2.43\n1.087 0 0 0 1.087 0 0 0 1.087\n-1.087 0 0 0 -1.087 0 0 0 -1.087\n"


def test_read_born_expands_and_keeps_factor(tmp_path):
    (tmp_path / "BORN").write_text(NACL_BORN)
    born = nac.read_born(tmp_path / "BORN", _nacl_prim())
    assert born.factor == 14.4 and born.source.startswith("BORN file ")
    np.testing.assert_allclose(born.born[1], -1.087 * np.eye(3), atol=1e-12)
    assert born.to_phonopy_nac_params()["factor"] == 14.4
    assert born.to_phonopy_nac_params(factor=10.0)["factor"] == 10.0
    assert nac.BornCharges(born.born, born.epsilon).to_phonopy_nac_params()["factor"] == pytest.approx(14.39965, rel=1e-5)


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "line 1 is empty"),
        ("14.4\n2.43 0 0 0 2.43 0 0 0\n", "line 2 has 8 numbers instead of 9"),
        ("14.4\n2.43 0 0 0 2.43 0 0 0 2.43\n1.087 0 0 0 1.087 0 0 0 1.087 5\n", "line 3 has 10 numbers"),
        ("14.4\n2.43 0 0 0 2.43 0 0 0 2.43\n1.087 0 0 0 1.087 0 0 0 1.087\n", "line 4 where Z\\* of primitive-cell atom 2"),
        (NACL_BORN + "1 0 0 0 1 0 0 0 1\n", "line 5 is one line too many"),
        ("14.4\n2.43 0 0 0 2.43 0 0 0 x\n", "line 2 has a token that is not a number"),
    ],
)
def test_read_born_errors_name_file_and_line(tmp_path, text, match):
    path = tmp_path / "BORN"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as info:
        nac.read_born(path, _nacl_prim())
    assert str(path) in str(info.value)
    assert "symmetry-independent" in str(info.value)


def test_read_born_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        nac.read_born(tmp_path / "nope", _nacl_prim())


# --------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------
class _DielectricModel:
    """A stand-in for a model with dielectric heads."""

    model_info = {"name": "toy-dielectric"}

    def __init__(self, z=2.0):
        self.z = z
        self.calls = 0

    def predict_dielectric(self, atoms):
        self.calls += 1
        signs = np.array([1.0 if s == "Na" else -1.0 for s in atoms.get_chemical_symbols()])
        return signs[:, None, None] * self.z * np.eye(3)[None], 3.0 * np.eye(3)


class _AseDielectricCalc(Calculator):
    implemented_properties = ["energy", "born_effective_charges", "dielectric_tensor"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        n = len(self.atoms)
        self.results = {
            "energy": 0.0,
            "born_effective_charges": np.array([(-1) ** k * 0.7 * np.eye(3) for k in range(n)]),
            "dielectric_tensor": 5.0 * np.eye(3),
        }


def test_find_predictor():
    from ase.calculators.emt import EMT

    model = _DielectricModel()
    assert nac.find_predictor(model) is model
    assert nac.find_predictor(EMT()) is None
    assert nac.find_predictor(None) is None
    adapter = nac.find_predictor(_AseDielectricCalc())
    assert isinstance(adapter, nac.DielectricPredictor)
    born, eps = adapter.predict_dielectric(bulk("NaCl", "rocksalt", a=5.69))
    assert born.shape == (2, 3, 3) and eps[0, 0] == 5.0
    assert isinstance(nac.FixedDielectric([1, -1], 2.0), nac.DielectricPredictor)


def test_resolve_born_source_order(tmp_path):
    prim = _nacl_prim()
    (tmp_path / "BORN").write_text(NACL_BORN)
    model = _DielectricModel(z=2.0)
    fixed = nac.FixedDielectric([1.5, -1.5], 4.0)

    first = nac.resolve_born(born_file=tmp_path / "BORN", predictor=fixed, calculator=model, primitive_atoms=prim)
    assert first.source == f"BORN file {tmp_path / 'BORN'}" and first.born[0, 0, 0] == pytest.approx(1.087)
    assert model.calls == 0

    second = nac.resolve_born(predictor=fixed, calculator=model, primitive_atoms=prim)
    assert second.source == "arrays" and second.born[0, 0, 0] == 1.5 and second.epsilon[1, 1] == 4.0
    assert model.calls == 0

    third = nac.resolve_born(calculator=model, primitive_atoms=prim)
    assert third.source == "model toy-dielectric" and third.born[1, 2, 2] == -2.0 and model.calls == 1

    ase_calc = nac.resolve_born(calculator=_AseDielectricCalc(), primitive_atoms=prim)
    assert ase_calc.source == "model _AseDielectricCalc" and ase_calc.epsilon[2, 2] == 5.0

    from ase.calculators.emt import EMT

    for kwargs in ({}, {"calculator": EMT()}):
        with pytest.raises(InputError) as info:
            nac.resolve_born(primitive_atoms=prim, **kwargs)
        message = str(info.value)
        assert "--born FILE" in message and "dielectric heads" in message and "FixedDielectric" in message

    with pytest.raises(InputError, match="Z\\* for 3 atoms but the primitive cell has 2"):
        nac.resolve_born(predictor=nac.FixedDielectric([1, -1, 0], 2.0), primitive_atoms=prim)


def test_born_charges_validation():
    with pytest.raises(InputError, match="shape"):
        nac.BornCharges(np.zeros((2, 3)), 1.0)
    with pytest.raises(InputError, match="eps_inf"):
        nac.BornCharges(np.zeros((2, 3, 3)), np.ones(2))
    with pytest.raises(InputError, match="method"):
        nac.BornCharges([1, -1], 2.0).to_phonopy_nac_params(method="ewald")
    with pytest.raises(InputError, match="2 atoms but the primitive cell"):
        nac.symmetrize(nac.BornCharges([1, -1], 2.0), _monoclinic_p2())
