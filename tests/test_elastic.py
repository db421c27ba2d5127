"""Elastic constants (workflows.elastic): against an independent energy route, symmetry, rotation, internal
relaxation, mechanical stability, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT
from ase.units import GPa
from pymatgen.analysis.elasticity import ElasticTensor

from mattersim.calculator import model_info
from mattersim.errors import InputError
from workflows.elastic import (ElasticResult, born_stability, crystal_symmetry, run_elastic, sign_images, strained_cell,
                               voigt_strain)

TIGHT = {"fmax": 1e-4, "relax_steps": 2000}


def _cu():
    return bulk("Cu", "fcc", a=3.61, cubic=True)


def _curvature(atoms, strain_of) -> float:
    """d²E/dδ² / V (GPa) of EMT at δ = 0 from a quadratic fit of E(δ), δ in ±0.4 %."""
    deltas = np.linspace(-0.004, 0.004, 9)
    energies = []
    for d in deltas:
        a = strained_cell(atoms, strain_of(d))
        a.calc = EMT()
        energies.append(a.get_potential_energy())
    a2 = np.polyfit(deltas, energies, 4)[2]
    return 2 * a2 / atoms.get_volume() / GPa


def _emt_forces(atoms) -> np.ndarray:
    a = atoms.copy()
    a.calc = EMT()
    return a.get_forces().ravel()


def _hessian_by_hand(atoms, d: float) -> np.ndarray:
    """The ions' Hessian (3N x 3N, eV/Å²) of EMT by central differences of the forces, every coordinate ±d Å."""
    n = 3 * len(atoms)
    h = np.zeros((n, n))
    for k in range(n):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[k // 3, k % 3] += d
        minus.positions[k // 3, k % 3] -= d
        h[:, k] = -(_emt_forces(plus) - _emt_forces(minus)) / (2 * d)
    return h


@pytest.fixture(scope="module")
def cu_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic") / "cu"
    return run_elastic(_cu(), EMT(), output_dir=out, **TIGHT), out


def test_cubic_constants_match_the_energy_curvature(cu_result):
    """C11, C12, C44 from stress-strain agree within 1 % with the curvature of E(strain) fitted here by hand."""
    result, _ = cu_result
    c = result.c
    relaxed = result.atoms
    c11 = _curvature(relaxed, lambda d: voigt_strain(0, d))
    c11_plus_c12 = 0.5 * _curvature(relaxed, lambda d: voigt_strain(0, d) + voigt_strain(1, d))  # E = V(C11+C12)δ²
    c44 = _curvature(relaxed, lambda d: voigt_strain(3, d))
    assert c[0, 0] == pytest.approx(c11, rel=0.01)
    assert c[0, 1] == pytest.approx(c11_plus_c12 - c11, rel=0.01)
    assert c[3, 3] == pytest.approx(c44, rel=0.01)
    m = result.summary["moduli"]
    assert m["k_vrh_GPa"] == pytest.approx((c[0, 0] + 2 * c[0, 1]) / 3, rel=1e-9)  # cubic: K_V = K_R
    assert result.stable and result.summary["stability"]["crystal_class"] == "cubic"
    assert result.summary["strain_set"]["computed_directions"] == [1, 4]  # symmetry: 2 of 6 directions
    assert result.summary["ion_relaxation"]["hessian_displaced_cells"] is None  # no ion moves: no Hessian


def _assert_cubic(c, tol):
    for i, j in ((1, 1), (2, 2)):
        assert c[i, j] == pytest.approx(c[0, 0], abs=tol)
    for i, j in ((0, 2), (1, 2)):
        assert c[i, j] == pytest.approx(c[0, 1], abs=tol)
    for i in (4, 5):
        assert c[i, i] == pytest.approx(c[3, 3], abs=tol)
    zero = np.ones((6, 6), dtype=bool)
    zero[:3, :3] = False
    zero[3, 3] = zero[4, 4] = zero[5, 5] = False
    assert np.abs(c[zero]).max() < tol


def test_all_six_directions_give_the_cubic_pattern_and_the_symmetry_shortcut(cu_result):
    """Computed without symmetry (all 6 directions), the raw slopes have the cubic zeros and equalities to
    1e-3 GPa, and the tensor equals the symmetry-reduced one."""
    full = run_elastic(_cu(), EMT(), use_symmetry=False, **TIGHT)
    assert full.summary["strain_set"]["computed_directions"] == [1, 2, 3, 4, 5, 6]
    _assert_cubic(np.array(full.summary["elastic_tensor"]["raw_slopes_GPa"]), 1e-3)
    _assert_cubic(full.c, 1e-3)
    assert np.abs(full.c - cu_result[0].c).max() < 1e-3


def test_hexagonal_pattern():
    """hcp Cu, all six directions computed and the ions relaxed: the raw slopes already have the hexagonal
    zeros and equalities (to 2e-3 GPa: x and y strains relax the ions separately), and the reported tensor,
    averaged over the point group, has them exactly; the averaging changed it by no more than that."""
    hcp = bulk("Cu", "hcp", a=2.55, c=4.16)
    result = run_elastic(hcp, EMT(), use_symmetry=False, fmax=1e-6, relax_steps=4000)
    raw = np.array(result.summary["elastic_tensor"]["raw_slopes_GPa"])
    for c, tol in ((raw, 2e-3), (result.c, 1e-6)):
        assert c[1, 1] == pytest.approx(c[0, 0], abs=tol) and c[1, 2] == pytest.approx(c[0, 2], abs=tol)
        assert c[4, 4] == pytest.approx(c[3, 3], abs=tol)
        assert c[5, 5] == pytest.approx(0.5 * (c[0, 0] - c[0, 1]), abs=tol)
        zero = [(0, 3), (0, 4), (0, 5), (1, 3), (1, 4), (1, 5), (2, 3), (2, 4), (2, 5), (3, 4), (3, 5), (4, 5)]
        assert max(abs(c[i, j]) for i, j in zero) < tol
    assert result.summary["elastic_tensor"]["symmetrization_max_change_GPa"] < 2e-3
    assert result.summary["stability"]["crystal_class"] == "hexagonal"
    # the symmetry shortcut: xx, zz and yz and their images under the 6-fold axis give the same tensor
    reduced = run_elastic(hcp, EMT(), fmax=1e-6, relax_steps=4000)
    assert reduced.summary["strain_set"]["computed_directions"] == [1, 3, 4]
    assert np.abs(reduced.c - result.c).max() < 2e-3


def test_rotated_cell_gives_the_rotated_tensor(cu_result):
    angle = np.radians(30.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    turned = _cu()
    turned.set_cell(np.array(turned.cell[:]) @ rot.T, scale_atoms=True)
    result = run_elastic(turned, EMT(), **TIGHT)
    expected = ElasticTensor.from_voigt(cu_result[0].c).rotate(rot).voigt
    assert np.abs(result.c - expected).max() < 2e-3
    assert np.abs(result.c_ieee - cu_result[0].c_ieee).max() < 2e-3  # the standard setting undoes the rotation


def test_orientation_does_not_matter_beyond_linear_order():
    # large strains (4 % normal, 8 % shear): the response is far from linear, yet a rotated input gives the
    # rotated tensor, because the strains are applied along the crystal's axes (its standard orientation), not
    # along the input's Cartesian axes, where they would mix normal and shear responses
    settings = dict(strains=(0.02, 0.04), shear_strains=(0.04, 0.08), fit="linear", fmax=1e-5, relax_steps=2000)
    plain = run_elastic(_cu(), EMT(), **settings)
    rot = np.array([[0.36, 0.48, -0.8], [-0.8, 0.6, 0.0], [0.48, 0.64, 0.6]])  # a general rotation (det 1)
    turned = _cu()
    turned.set_cell(np.array(turned.cell[:]) @ rot.T, scale_atoms=True)
    result = run_elastic(turned, EMT(), **settings)
    expected = ElasticTensor.from_voigt(plain.c).rotate(rot).voigt
    assert np.abs(result.c - expected).max() < 2e-3
    assert np.abs(result.c_ieee - plain.c_ieee).max() < 2e-3
    assert result.summary["strain_set"]["computed_directions"] == [1, 4]  # the cubic shortcut, as unrotated


def test_bcc_copper_is_unstable_and_says_why():
    result = run_elastic(bulk("Cu", "bcc", a=2.87, cubic=True), EMT(), relax=True, **TIGHT)
    st = result.summary["stability"]
    assert not result.stable and "C11 - C12 > 0" in st["failing"]
    assert result.c[0, 0] < result.c[0, 1]
    assert any(row[0] == "Born stability" and "UNSTABLE" in row[1] and "C11 - C12" in row[1] for row in result.rows())


def test_born_criteria_by_hand():
    c = np.zeros((6, 6))
    c[:3, :3] = 50.0
    np.fill_diagonal(c, [150, 150, 150, 40, 40, 40])
    assert born_stability(c, 225)["stable"]
    c[3, 3] = c[4, 4] = c[5, 5] = -1.0
    st = born_stability(c, 225)
    assert st["failing"] == ["C44 > 0", "all eigenvalues of C > 0 (positive definite)"]


def test_outputs_resume_and_reload(cu_result, monkeypatch):
    result, out = cu_result
    summary = json.loads((out / "elastic.json").read_text())
    for name in ("elastic.json", "stress_strain.png", "strained.extxyz", "relaxed.vasp", "elastic.log", "stresses.npz"):
        assert (out / name).is_file(), name
        assert name in summary["files"], name
    assert summary["workflow"] == "elastic" and summary["settings"]["ions"] == "relaxed-ion"
    again = ElasticResult.load(out)
    assert np.allclose(again.c, result.c) and again.rows()[:6] == result.rows()[:6]
    copy = ElasticResult.load(again.save(out.parent / "copy"))  # save() elsewhere and back
    assert np.allclose(copy.c_ieee, result.c_ieee) and np.allclose(copy.atoms.cell[:], result.atoms.cell[:])

    class Counting(EMT):
        """EMT under EMT's identity, counting its calls."""

        calls = 0
        model_info = model_info(EMT())

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            Counting.calls += 1
            super().calculate(atoms, properties, system_changes)

    rerun = run_elastic(_cu(), Counting(), output_dir=out, **TIGHT)
    assert Counting.calls == 0  # relaxed structure and all stresses come from stresses.npz
    assert np.allclose(rerun.c, result.c)


def test_negative_strains_are_symmetry_images(monkeypatch):
    """Where an operation R turns a direction into its negative, σ(-s) = R σ(+s) Rᵀ replaces a strained cell:
    cubic Cu's three shears (the 4-fold axes), never a normal strain, nothing for P-1 (inversion keeps every
    strain). hcp Cu with its ions relaxed (10 cells instead of 12: its yz shear is flipped by the 2-fold axis
    along z) gives the tensor of the run that strains -s too, to the ions' convergence (the hexagonal
    pattern's 2e-3 GPa)."""
    import workflows.elastic as module

    flips = sign_images(crystal_symmetry(_cu())[2], range(6))
    assert sorted(flips) == [3, 4, 5]
    for k, rot in flips.items():
        assert np.allclose(rot @ voigt_strain(k, 1.0) @ rot.T, -voigt_strain(k, 1.0))
    assert sign_images([np.eye(3), -np.eye(3)], range(6)) == {}
    assert run_elastic(_cu(), EMT(), relax_ions=False, **TIGHT).summary["strain_set"]["n_strained_cells"] == 6

    hcp = bulk("Cu", "hcp", a=2.55, c=4.16)
    reduced = run_elastic(hcp, EMT(), fmax=1e-5, relax_steps=3000)
    monkeypatch.setattr(module, "sign_images", lambda rotations, directions: {})
    every = run_elastic(hcp, EMT(), fmax=1e-5, relax_steps=3000)
    assert reduced.summary["strain_set"]["negative_strains_by_symmetry"] == [4]
    assert (reduced.summary["strain_set"]["n_strained_cells"], every.summary["strain_set"]["n_strained_cells"]) == (10, 12)
    assert np.abs(reduced.c - every.c).max() < 2e-3


def test_clamped_ion_differs_where_ions_relax():
    """hcp has two atoms without inversion at their sites: shear lets them move, so relaxed-ion C66 < clamped."""
    hcp = bulk("Cu", "hcp", a=2.55, c=4.16)
    relaxed = run_elastic(hcp, EMT(), **TIGHT)
    clamped = run_elastic(hcp, EMT(), relax_ions=False, **TIGHT)
    assert clamped.summary["settings"]["ions"] == "clamped-ion"
    assert relaxed.c[5, 5] < clamped.c[5, 5] - 0.5


def test_unstrained_stress_comes_from_the_relaxation(monkeypatch):
    """The unstrained cell is the relaxed one: its stress is the relaxation's last call, not a new model call,
    and it gives the tensor and reference stress of evaluating that cell (hcp: a non-trivial rotation to the
    standard orientation and a C with five independent constants; at 5 GPa, so the reference stress is not ~0)."""
    import workflows.elastic as module

    sizes = []
    real = module.evaluate_batch

    def counting(calc, structures, properties):
        sizes.append(len(structures))
        return real(calc, structures, properties)

    monkeypatch.setattr(module, "evaluate_batch", counting)
    hcp = bulk("Cu", "hcp", a=2.55, c=4.16)
    hcp.rotate(30, "z", rotate_cell=True)
    res = run_elastic(hcp, EMT(), relax_ions=False, pressure=5.0, **TIGHT)
    n = res.summary["strain_set"]["n_strained_cells"]
    assert sizes == [n]  # the strained cells only
    again = run_elastic(res.atoms, EMT(), relax=False, relax_ions=False, pressure=5.0, **TIGHT)
    assert sizes == [n, n + 1]  # without a relaxation the unstrained cell is evaluated
    ref, ref_again = (np.array(r.summary["elastic_tensor"]["reference_stress_GPa"]) for r in (res, again))
    assert np.allclose(ref[:3], -5.0, atol=1e-3)  # relaxed at 5 GPa: a stress worth comparing
    assert np.allclose(ref, ref_again, rtol=0, atol=1e-9)
    assert np.allclose(res.c, again.c, rtol=0, atol=1e-6)


def test_cell_hessian_matches_finite_differences_by_hand():
    """phonopy's symmetry-reduced Γ-point force constants of the cell = the Hessian of its ions by central
    differences of EMT's forces, every coordinate displaced here (hcp Cu, tilted, two atoms)."""
    from workflows.phonon import cell_hessian

    hcp = bulk("Cu", "hcp", a=2.55, c=4.16)
    hcp.rotate(20, "x", rotate_cell=True)
    h, n_cells = cell_hessian(hcp, EMT(), symprec=1e-5)
    assert n_cells < 6  # symmetry: fewer than the 6 one-sided displacements of 2 atoms x 3 directions
    ref = _hessian_by_hand(hcp, 0.005)
    assert np.allclose(h, ref, atol=2e-3 * np.abs(ref).max())
    hcp.rattle(0.03, seed=1)  # off the minimum: residual forces, only inversion left (measured 1.6e-4)
    ref = _hessian_by_hand(hcp, 0.005)
    assert np.allclose(cell_hessian(hcp, EMT(), symprec=1e-5)[0], ref, atol=2e-3 * np.abs(ref).max())


def test_relaxed_ion_from_the_hessian_matches_plain_relaxations():
    """Strained cells whose ions move (hcp) are relaxed by BFGS started from the Γ-point Hessian: the same
    tensor as FIRE from scratch, in fewer steps; a crystal whose ions stay put under strain (fcc) never asks
    for the Hessian."""
    hcp = bulk("Cu", "hcp", a=2.55, c=4.16)
    tighter = {"fmax": 1e-5, "relax_steps": 2000}
    newton = run_elastic(hcp, EMT(), **tighter)
    fire = run_elastic(hcp, EMT(), optimizer="FIRE", **tighter)
    ions = newton.summary["ion_relaxation"]
    assert ions["start"].startswith("the model's Γ-point Hessian") and ions["hessian_displaced_cells"] > 0
    assert ions["unstable_gamma_modes"] == 0 and min(ions["lowest_curvatures_eV_per_A2"]) > 0
    assert fire.summary["ion_relaxation"]["hessian_displaced_cells"] is None
    assert sum(ions["steps"]) < 0.5 * sum(fire.summary["ion_relaxation"]["steps"])
    # GPa; ions at 1e-6 eV/Å (fmax / 10): they agree to 1e-3 GPa (at 1e-4 FIRE's stops 0.07 GPa away)
    assert np.allclose(newton.c, fire.c, atol=0.01)
    # the strained cells' own threshold: fmax / 10 unless given
    assert newton.summary["settings"]["ion_fmax_eV_per_A"] == pytest.approx(1e-6)
    loose = run_elastic(hcp, EMT(), ion_fmax=1e-3, **tighter)
    assert sum(loose.summary["ion_relaxation"]["steps"]) < sum(ions["steps"])


def test_relaxed_ion_equals_clamped_ion_minus_the_internal_strain_term():
    """Linear response, an independent route to the relaxed-ion tensor: with Λ = ∂F/∂ε the forces that a
    strain puts on clamped ions and H the ions' Hessian (both by central differences of EMT here),
    C_relaxed = C_clamped - Λᵀ H⁺ Λ / V. hcp Cu: the term is 17 GPa (C11, C12, C66); the workflow's relaxed
    strained cells give it to 0.05 GPa (measured 2e-4; the bound is what residual forces of 1e-5 eV/Å can
    leave on the 0.5 % points)."""
    hcp = bulk("Cu", "hcp", a=2.55, c=4.16)
    tighter = {"fmax": 1e-5, "relax_steps": 3000}
    relaxed = run_elastic(hcp, EMT(), **tighter)
    clamped = run_elastic(hcp, EMT(), relax_ions=False, **tighter)
    a0 = relaxed.atoms

    d = 1e-4
    lam = np.array([_emt_forces(strained_cell(a0, voigt_strain(j, d))) - _emt_forces(strained_cell(a0, voigt_strain(j, -d)))
                    for j in range(6)]).T / (2 * d)
    h = _hessian_by_hand(a0, d)
    term = lam.T @ np.linalg.pinv(0.5 * (h + h.T), rcond=1e-8) @ lam / a0.get_volume() / GPa
    assert np.abs(term).max() > 10.0  # the ions' relaxation matters here
    assert np.allclose(relaxed.c, clamped.c - term, atol=0.05)


def test_a_failing_hessian_leaves_the_relaxations_to_plain_bfgs(monkeypatch, caplog):
    """The Hessian is an optimisation: when it cannot be had, the strained cells relax from BFGS's usual
    start, with a warning, to the same tensor."""
    import logging

    import workflows.phonon as phonon

    def broken(*args, **kwargs):
        raise RuntimeError("phonopy reordered the atoms of the cell")

    hcp = bulk("Cu", "hcp", a=2.55, c=4.16)
    tighter = {"fmax": 1e-5, "relax_steps": 2000}
    good = run_elastic(hcp, EMT(), **tighter)
    monkeypatch.setattr(phonon, "cell_hessian", broken)
    with caplog.at_level(logging.WARNING):
        plain = run_elastic(hcp, EMT(), **tighter)
    assert "the Γ-point Hessian failed (RuntimeError" in caplog.text
    assert plain.summary["ion_relaxation"]["hessian_displaced_cells"] is None
    assert sum(plain.summary["ion_relaxation"]["steps"]) > sum(good.summary["ion_relaxation"]["steps"])
    assert np.allclose(plain.c, good.c, atol=0.01)


def test_held_unstable_modes_keep_the_ions_where_the_structure_is(monkeypatch):
    """A saddle: hcp Cu with its two in-plane optic modes (the ones that strain moves) made unstable in the
    Hessian. Held, the strained cells' ions have nothing left to relax along, and the relaxed-ion tensor is
    the clamped-ion one (not 17 GPa softer), in a step or two per cell."""
    import workflows.phonon as phonon
    from mattersim.relax import _ion_modes

    real = phonon.cell_hessian

    def saddle(atoms, calculator, **kwargs):
        h, n = real(atoms, calculator, **kwargs)
        w, u, _ = _ion_modes(h)
        in_plane = [i for i in range(u.shape[1]) if np.abs(u[2::3, i]).max() < 1e-6]
        assert len(in_plane) == 2
        w[in_plane] = -1.0
        return (u * w) @ u.T, n

    monkeypatch.setattr(phonon, "cell_hessian", saddle)
    hcp = bulk("Cu", "hcp", a=2.55, c=4.16)
    tighter = {"fmax": 1e-5, "relax_steps": 2000}
    held = run_elastic(hcp, EMT(), **tighter)
    clamped = run_elastic(hcp, EMT(), relax_ions=False, **tighter)
    assert held.summary["ion_relaxation"]["unstable_gamma_modes"] == 2
    assert max(held.summary["ion_relaxation"]["steps"]) <= 2
    assert np.allclose(held.c, clamped.c, atol=0.01)
    assert "UNSTABLE Γ mode(s), held" in dict(held.rows())["ions"]


def test_unstable_gamma_modes_are_counted_and_said(caplog):
    """A Hessian with a negative curvature (beyond finite-difference noise) is an unstable Γ mode: counted in
    the summary, with a warning; noise of -1e-3 eV/Å² is not."""
    import logging

    from mattersim.relax import _ion_modes
    from workflows.elastic import _ion_relaxation_summary

    q = _ion_modes(np.zeros((6, 6)))[1]  # an orthonormal basis of the motions other than translations
    log = logging.getLogger("test.elastic")
    for curvatures, unstable in (([-0.3, 2.0, 5.0], 1), ([-1e-3, 2.0, 5.0], 0)):
        h = q @ np.diag(curvatures) @ q.T
        with caplog.at_level(logging.WARNING, logger="test.elastic"):
            caplog.clear()
            out = _ion_relaxation_summary({"hessian": h, "hessian_cells": np.array(2)}, "start", log)
        assert out["unstable_gamma_modes"] == unstable
        assert np.allclose(out["lowest_curvatures_eV_per_A2"], curvatures)
        assert ("unstable Γ mode" in caplog.text) == bool(unstable)


class NoStress(EMT):
    implemented_properties = ["energy", "forces"]


@pytest.mark.parametrize("kwargs, atoms, fragment", [
    ({"strains": [0.0]}, _cu(), "every magnitude must be > 0"),
    ({"strains": [0.06]}, _cu(), "at most 0.05"),
    ({"strains": "abc"}, _cu(), "strains must be numbers"),
    ({"ion_fmax": 0.0}, _cu(), "ion_fmax .--ion-fmax. must be a positive number"),
    ({}, Atoms("H2O", positions=[[0, 0, 0], [0.76, 0.59, 0], [-0.76, 0.59, 0]]), "3D-periodic"),
])
def test_bad_inputs(kwargs, atoms, fragment):
    with pytest.raises(InputError, match=fragment):
        run_elastic(atoms, EMT(), **kwargs)


def test_model_without_stress_and_structure_that_will_not_relax():
    with pytest.raises(InputError, match="predicts no stress"):
        run_elastic(_cu(), NoStress())
    squeezed = bulk("Cu", "fcc", a=3.0, cubic=True)
    with pytest.raises(InputError, match="did not relax"):
        run_elastic(squeezed, EMT(), relax_steps=2, fmax=1e-4)


def test_internal_relaxation_softens_silicon_c44():
    """Diamond Si (SevenNet-0): the ions of a sheared cell relax (Kleinman), so relaxed-ion C44 is clearly
    below clamped-ion, while C11 and C12 (no internal strain for them) agree."""
    pytest.importorskip("sevenn")
    from mattersim.registry import load_calculator

    calc = load_calculator("sevennet-0")
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    relaxed = run_elastic(si, calc)
    clamped = run_elastic(si, calc, relax_ions=False)
    assert relaxed.c[3, 3] < 0.85 * clamped.c[3, 3]  # measured 57.9 vs 77.9 GPa
    assert relaxed.c[0, 0] == pytest.approx(clamped.c[0, 0], rel=0.01)
    assert relaxed.c[0, 1] == pytest.approx(clamped.c[0, 1], rel=0.01)


def test_shear_strains_and_linear_fit_are_settings():
    """Larger shear strains and straight lines (as matcalc fits) are settings, and bad values are refused. A
    line through shears up to 6 % picks up the nonlinearity: EMT Cu's C44 comes out 1.9 % above the default
    (cubic fit of ±0.5 %, ±1 %); the normal components agree within 0.1 %."""
    default = run_elastic(_cu(), EMT(), **TIGHT)
    matcalc_like = run_elastic(_cu(), EMT(), shear_strains=(0.03, 0.06), fit="linear", **TIGHT)
    assert matcalc_like.summary["settings"]["shear_strains"] == [0.03, 0.06]
    assert matcalc_like.summary["fit"]["slope_from"] == "straight line"
    assert np.allclose(matcalc_like.c[:3, :3], default.c[:3, :3], rtol=1e-3)
    assert 1.01 < matcalc_like.c[3, 3] / default.c[3, 3] < 1.03
    with pytest.raises(InputError, match="shear_strains .* at most 0.1"):
        run_elastic(_cu(), EMT(), shear_strains=(0.2,))
    with pytest.raises(InputError, match="fit must be"):
        run_elastic(_cu(), EMT(), fit="quadratic")
