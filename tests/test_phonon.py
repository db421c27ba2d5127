"""Tests of the phonon workflow (:mod:`workflows.phonon`) and ``mattersim phonon``.

Physics checks with ASE's EMT (cheap): equality with phonopy run by hand, acoustic sum rule, invariance
under rotation of the cell and permutation of the atoms, reopening with ``phonopy.load``, batched versus
one-at-a-time force evaluation with the small random-weight MatterSim checkpoint, resume after an
interruption, and reporting of imaginary modes of an unstable crystal.
"""

from __future__ import annotations

import json
import logging

import ase.io
import numpy as np
import phonopy
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from phonopy import Phonopy
from phonopy.structure.atoms import PhonopyAtoms
from typer.testing import CliRunner

from mattersim.errors import InputError
from workflows.phonon import (PhononResult, auto_supercell, find_imaginary_modes, min_image_distance, model_cutoff,
                              perpendicular_widths, run_phonon)

from conftest import assert_user_error, shared_path

MESH = (8, 8, 8)
FILES = ("phonopy.yaml", "band.yaml", "total_dos.dat", "projected_dos.dat", "thermal_properties.yaml",
         "summary.json", "band_dos.png", "thermal.png", "phonon.log", "forces.npz")


class CountingCalculator(Calculator):
    """Wraps a calculator (ASE interface only, no calculate_batch); counts calls, can fail on the k-th."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, inner, fail_at: int | None = None):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.fail_at = fail_at
        self.model_info = dict(getattr(inner, "model_info", None) or
                               {"name": type(inner).__name__, "version": None, "kind": "ase",
                                "source": type(inner).__module__, "sha256": None})

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError(f"simulated crash at call {self.calls}")
        a = self.atoms.copy()
        a.calc = self.inner
        self.results = {"energy": a.get_potential_energy(), "forces": a.get_forces()}
        self.results["free_energy"] = self.results["energy"]
        if "stress" in properties:
            self.results["stress"] = a.get_stress()


def _assert_same_frequencies(theirs, ours, tol=1e-8):
    """|Δν| < tol (THz) for all modes with |ν| > 1e-3 THz; the zero modes at Γ, where ν = sqrt(ω²) turns
    round-off of ~1e-14 THz² in ω² into ~1e-7 THz, are compared as signed ν² (THz²) instead."""
    theirs, ours = np.asarray(theirs), np.asarray(ours)
    finite = np.abs(ours) > 1e-3
    diff = np.abs(theirs - ours)[finite].max()
    diff2 = np.abs(np.sign(theirs) * theirs**2 - np.sign(ours) * ours**2).max()
    assert diff < tol and diff2 < tol, (diff, diff2)
    return diff, diff2


def _by_hand(unit: Atoms, smat, calc, mesh=MESH, band_qpoints=None):
    """phonopy's own workflow with the same calculator: displacements, forces, FC, symmetrisation."""
    ph = Phonopy(PhonopyAtoms(symbols=unit.get_chemical_symbols(), cell=unit.cell[:],
                              scaled_positions=unit.get_scaled_positions()), smat, primitive_matrix="auto")
    ph.generate_displacements(distance=0.01)
    forces = []
    for sc in ph.supercells_with_displacements:
        a = Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
        a.calc = calc
        forces.append(a.get_forces())
    ph.forces = forces
    ph.produce_force_constants()  # phonopy's default: full force constants
    ph.symmetrize_force_constants()
    return ph


# ---------------------------------------------------------------------------------------------------------
# fcc Cu with EMT: one run shared by several tests
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cu") / "out"
    atoms = bulk("Cu", "fcc", a=3.59)
    result = run_phonon(atoms, EMT(), relax=False, supercell=(3, 3, 3), mesh=MESH, pdos=True, group_velocities=True,
                        output_dir=out, progress=False)
    return atoms, result


def test_cu_matches_phonopy_by_hand(cu_run):
    atoms, result = cu_run
    ref = _by_hand(atoms, np.diag([3, 3, 3]), EMT())
    ph = result.phonopy
    # same displacements
    assert len(ref.dataset["first_atoms"]) == len(ph.dataset["first_atoms"])
    for a, b in zip(ref.dataset["first_atoms"], ph.dataset["first_atoms"]):
        assert a["number"] == b["number"]
        np.testing.assert_allclose(a["displacement"], b["displacement"], atol=1e-14)
    # band path and mesh frequencies: 1e-8 THz, except for the zero modes at Γ, where ν = sqrt(ω²)
    # turns round-off in ω² (~1e-14 THz²) into ~1e-7 THz; those are compared as signed ν² instead
    qpts = np.concatenate(ph.band_structure.qpoints)
    ref.run_qpoints(qpts)
    ref.run_mesh(MESH, is_gamma_center=True)
    _assert_same_frequencies(ref.qpoints.frequencies, np.concatenate(ph.band_structure.frequencies))
    _assert_same_frequencies(ref.mesh.frequencies, ph.mesh.frequencies)
    # thermal properties (Γ acoustic modes excluded in both, as in the workflow)
    ref.run_thermal_properties(t_min=0, t_max=1000, t_step=10, exclude_gamma_acoustic=True)
    keys = ("temperatures", "free_energy", "entropy", "heat_capacity")
    tp_ref = {k: np.asarray(getattr(ref.thermal_properties, k)) for k in keys}
    tp = {k: np.asarray(getattr(ph.thermal_properties, k)) for k in keys}
    for key in ("free_energy", "entropy", "heat_capacity"):
        np.testing.assert_allclose(tp[key], tp_ref[key], rtol=1e-9, atol=1e-9)
    i300 = int(np.argmin(np.abs(tp_ref["temperatures"] - 300)))
    th = result.summary["thermal_300K"]
    assert th["free_energy_kJ_per_mol"] == pytest.approx(tp_ref["free_energy"][i300], abs=1e-9)
    assert th["heat_capacity_J_per_K_per_mol"] == pytest.approx(tp_ref["heat_capacity"][i300], abs=1e-9)
    # physical sanity: Dulong-Petit is approached at 1000 K (3R per atom = 24.94 J/K/mol)
    assert 24.0 < tp["heat_capacity"][-1] < 3 * 8.314462618 + 1e-6


def test_cu_acoustic_sum_rule_and_summary(cu_run):
    _, result = cu_run
    gamma = result.frequencies_at([0, 0, 0])
    assert np.abs(gamma).max() < 1e-3
    s = result.summary
    assert np.abs(s["frequencies"]["gamma_THz"]).max() < 1e-3
    assert s["imaginary_modes"]["count"] == 0
    assert 6.0 < s["frequencies"]["omega_max_THz"] < 10.0  # EMT Cu: about 8 THz (experiment 7.2 THz)
    assert 1000 < s["group_velocity"]["mean_m_per_s"] < 5000
    assert s["forces"]["n_supercells"] == 1 and s["forces"]["evaluated_now"] == 2
    assert s["model"]["name"] == "EMT"
    assert set(s["timings_s"]) >= {"relaxation", "force_evaluation", "post_processing", "total"}
    for name in FILES:
        assert (result.output_dir / name).is_file(), name
    on_disk = json.loads((result.output_dir / "summary.json").read_text())
    assert on_disk["frequencies"]["omega_max_THz"] == pytest.approx(s["frequencies"]["omega_max_THz"])
    # the plots name the material and the model (drawn as the figure title, and in the PNG's Title field)
    from PIL import Image

    for name in ("band_dos.png", "thermal.png"):
        title = Image.open(result.output_dir / name).text["Title"]
        assert "Cu" in title and "Fm-3m" in title and "EMT" in title, title


def test_cu_reopen_with_phonopy_and_result_load(cu_run, tmp_path):
    _, result = cu_run
    ph = result.phonopy
    qpts = np.concatenate(ph.band_structure.qpoints)
    ours = np.concatenate(ph.band_structure.frequencies)
    loaded = phonopy.load(result.output_dir / "phonopy.yaml")
    loaded.run_qpoints(qpts)
    _assert_same_frequencies(loaded.qpoints.frequencies, ours, tol=1e-10)
    again = PhononResult.load(result.output_dir)
    again.phonopy.run_qpoints(qpts)
    _assert_same_frequencies(again.phonopy.qpoints.frequencies, ours, tol=1e-10)
    assert again.summary["frequencies"]["omega_max_THz"] == pytest.approx(result.summary["frequencies"]["omega_max_THz"])
    # save() to another folder and load again
    copy = PhononResult(phonopy=again.phonopy, summary=again.summary).save(tmp_path / "copy")
    third = PhononResult.load(copy)
    third.phonopy.run_qpoints(qpts)
    _assert_same_frequencies(third.phonopy.qpoints.frequencies, ours, tol=1e-10)
    with pytest.raises(InputError, match="phonopy.yaml"):
        PhononResult.load(tmp_path / "nothing-here")
    # band.yaml as phonopy wrote it holds the same frequencies
    import yaml

    band = yaml.safe_load((result.output_dir / "band.yaml").read_text())
    freqs = np.array([[b["frequency"] for b in p["band"]] for p in band["phonon"]])
    assert np.abs(freqs - ours).max() < 1e-6


# ---------------------------------------------------------------------------------------------------------
# invariance: rotated cell, permuted atoms
# ---------------------------------------------------------------------------------------------------------


def _rotation(angles_deg):
    a, b, c = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def test_rotated_and_permuted_cell_give_same_phonons():
    cu3au = bulk("Cu", "fcc", a=3.75, cubic=True)
    cu3au[0].symbol = "Au"
    rot = _rotation([17, 31, 47])
    rotated = Atoms(cu3au.get_chemical_symbols(), cell=cu3au.cell[:] @ rot.T, positions=cu3au.positions @ rot.T, pbc=True)
    order = [2, 0, 3, 1]
    permuted = cu3au[order]
    kw = dict(relax=False, supercell=2, mesh=(6, 6, 6), progress=False)
    results = [run_phonon(a, EMT(), **kw) for a in (cu3au, rotated, permuted)]
    ref = results[0]
    for other in results[1:]:
        np.testing.assert_allclose(np.sort(other.frequencies_at([0, 0, 0])), np.sort(ref.frequencies_at([0, 0, 0])), atol=1e-6)
        # the seekpath path, transformed into each primitive basis, gives the same dispersion
        np.testing.assert_allclose(np.concatenate(other.phonopy.band_structure.frequencies),
                                   np.concatenate(ref.phonopy.band_structure.frequencies), atol=1e-6)
        np.testing.assert_allclose(other.phonopy.total_dos.dos, ref.phonopy.total_dos.dos, atol=1e-5)
        for key in ("omega_max_THz",):
            assert other.summary["frequencies"][key] == pytest.approx(ref.summary["frequencies"][key], abs=1e-6)
        assert other.summary["thermal_300K"]["free_energy_kJ_per_mol"] == pytest.approx(
            ref.summary["thermal_300K"]["free_energy_kJ_per_mol"], abs=1e-7)
    # X = (0, 1/2, 0) of the simple-cubic cell: the rotated run gives the same frequencies there too
    np.testing.assert_allclose(results[1].frequencies_at([0, 0.5, 0]), ref.frequencies_at([0, 0.5, 0]), atol=1e-6)


def test_band_path_follows_a_non_standard_setting():
    """An fcc crystal given in a non-standard primitive setting: the path still ends at true X and L."""
    from workflows.phonon import band_path

    std = bulk("Cu", "fcc", a=3.6)
    m = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]])  # same lattice, other basis
    odd = Atoms("Cu", cell=m @ std.cell[:], pbc=True)
    for atoms in (std, odd):
        prim = PhonopyAtoms(symbols=["Cu"], cell=atoms.cell[:], scaled_positions=[[0, 0, 0]])
        path = band_path(prim)
        rec = np.linalg.inv(atoms.cell[:])  # columns: reciprocal vectors / 2π
        ends = {seg[1]: path["qpoints"][i][-1] for i, seg in enumerate(path["segments"])}
        x_cart = rec @ ends["X"]
        l_cart = rec @ ends["L"]
        assert np.linalg.norm(x_cart) == pytest.approx(1 / 3.6, rel=1e-8)  # |X| = 2π/a
        assert np.linalg.norm(l_cart) == pytest.approx(np.sqrt(3) / 2 / 3.6, rel=1e-8)


# ---------------------------------------------------------------------------------------------------------
# batched force evaluation (MatterSim calculator, float64) versus one structure at a time
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:aP lattice")  # seekpath: a P1 cell with angles near 90 degrees
def test_perfect_supercell_forces_are_the_unit_cells_repeated(small_checkpoint, tmp_path):
    """Away from equilibrium (an atom moved in the unit cell), the perfect supercell's forces taken from
    one unit-cell call equal a direct evaluation of the supercell (float64: to round-off)."""
    from mattersim.registry import load_calculator

    calc = load_calculator(str(small_checkpoint), dtype="float64")
    atoms = bulk("NaCl", "rocksalt", a=5.6, cubic=True)
    atoms.positions[1] += [0.05, 0.02, -0.03]
    result = run_phonon(atoms, calc, relax=False, supercell=(2, 1, 1), primitive=None, mesh=(2, 2, 2),
                        output_dir=tmp_path, progress=False)
    stored = np.load(tmp_path / "forces.npz")["forces"][0]
    sc = result.phonopy.supercell
    direct = calc.calculate_batch([Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)])[0]
    assert np.abs(stored).max() > 1e-3  # not at equilibrium
    np.testing.assert_allclose(stored, direct["forces"], atol=1e-10)
    assert result.summary["forces"]["residual_force_max_eV_per_A"] == pytest.approx(np.linalg.norm(direct["forces"], axis=1).max())


def test_batched_equals_one_at_a_time(small_checkpoint, monkeypatch):
    from mattersim.calculator import MatterSimCalculator
    from mattersim.registry import load_calculator

    calc = load_calculator(str(small_checkpoint), dtype="float64")
    assert isinstance(calc, MatterSimCalculator)
    calls = []
    original = calc.calculate_batch

    def counting(structures):
        calls.append(len(structures))
        return original(structures)

    monkeypatch.setattr(calc, "calculate_batch", counting)
    nacl = bulk("NaCl", "rocksalt", a=5.6)
    kw = dict(relax=False, supercell=2, mesh=(4, 4, 4), progress=False)
    batched = run_phonon(nacl, calc, **kw)
    n_struct = batched.summary["forces"]["n_supercells"] + 1
    # the unit cell (for the perfect supercell's forces), then one batched call for all displaced supercells
    assert calls == [1, n_struct - 1]
    single_calc = CountingCalculator(calc)  # no calculate_batch: one ASE call per supercell
    single = run_phonon(nacl, single_calc, **kw)
    assert single_calc.calls == n_struct and calls == [1, n_struct - 1]
    diff_f = np.abs(np.asarray(batched.phonopy.forces) - np.asarray(single.phonopy.forces)).max()
    diff_fc = np.abs(batched.phonopy.force_constants - single.phonopy.force_constants).max()
    assert diff_f < 1e-10 and diff_fc < 1e-10, (diff_f, diff_fc)
    _assert_same_frequencies(batched.phonopy.mesh.frequencies, single.phonopy.mesh.frequencies, tol=1e-10)
    # chunks: batch_size=1 -> one model call per supercell
    calls.clear()
    run_phonon(nacl, calc, batch_size=1, **kw)
    assert calls == [1] * n_struct


# ---------------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------------


def _p1_cuau():
    return Atoms("CuAu", cell=[[2.7, 0.05, 0], [0, 2.75, 0.03], [0.02, 0, 3.6]],
                 scaled_positions=[[0, 0, 0], [0.52, 0.49, 0.5]], pbc=True)


def test_resume_after_interruption(tmp_path):
    atoms = _p1_cuau()
    kw = dict(relax=False, supercell=2, mesh=(4, 4, 4), progress=False)
    reference = run_phonon(atoms, EMT(), output_dir=tmp_path / "ref", **kw)
    n_struct = reference.summary["forces"]["n_supercells"] + 1
    assert n_struct == 13  # P1: 2 atoms x 3 directions x (+/-) + the perfect supercell

    crashing = CountingCalculator(EMT(), fail_at=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_phonon(atoms, crashing, output_dir=tmp_path / "run", **kw)
    with np.load(tmp_path / "run" / "forces.npz") as saved:
        assert int(saved["done"].sum()) == 5

    counting = CountingCalculator(EMT())
    resumed = run_phonon(atoms, counting, output_dir=tmp_path / "run", **kw)
    assert counting.calls == n_struct - 5  # only the missing supercells
    assert resumed.summary["forces"]["reused"] == 5
    assert resumed.summary["forces"]["evaluated_now"] == n_struct - 5
    # reused forces come back bit for bit; re-evaluated ones differ by EMT's round-off (~1e-14 eV/Å,
    # its neighbour list depends on the calculator's history)
    np.testing.assert_array_equal(np.asarray(resumed.phonopy.forces)[:4], np.asarray(reference.phonopy.forces)[:4])
    np.testing.assert_allclose(np.asarray(resumed.phonopy.forces), np.asarray(reference.phonopy.forces), rtol=0, atol=1e-12)
    np.testing.assert_allclose(resumed.phonopy.force_constants, reference.phonopy.force_constants, rtol=0, atol=1e-11)
    _assert_same_frequencies(resumed.phonopy.mesh.frequencies, reference.phonopy.mesh.frequencies, tol=1e-9)
    log = (tmp_path / "run" / "phonon.log").read_text()
    assert "5 reused" in log

    # a finished run reruns without a single force evaluation; other settings start afresh
    again = CountingCalculator(EMT())
    run_phonon(atoms, again, output_dir=tmp_path / "run", **kw)
    assert again.calls == 0
    other = CountingCalculator(EMT())
    run_phonon(atoms, other, output_dir=tmp_path / "run", displacement=0.02, **kw)
    assert other.calls == n_struct
    assert (tmp_path / "run" / "forces.npz.old").is_file()


def test_resume_reuses_the_relaxed_structure(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.62)
    kw = dict(relax=True, supercell=2, mesh=(4, 4, 4), progress=False, output_dir=tmp_path)
    first = run_phonon(atoms, EMT(), **kw)
    assert first.summary["relaxation"]["converged"]
    counting = CountingCalculator(EMT())
    second = run_phonon(atoms, counting, **kw)
    assert counting.calls == 0  # neither relaxation nor forces were recomputed
    assert second.summary["relaxation"]["reused_from"] == "forces.npz"
    np.testing.assert_allclose(second.phonopy.mesh.frequencies, first.phonopy.mesh.frequencies, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# imaginary modes
# ---------------------------------------------------------------------------------------------------------


def test_imaginary_modes_of_unstable_simple_cubic_cu(tmp_path, caplog):
    sc = Atoms("Cu", cell=np.eye(3) * 2.3, pbc=True)  # simple cubic Cu: dynamically unstable in EMT
    with caplog.at_level(logging.WARNING, logger="mattersim.phonon"):
        result = run_phonon(sc, EMT(), relax=False, supercell=3, mesh=(6, 6, 6), output_dir=tmp_path, progress=False)
    imag = result.summary["imaginary_modes"]
    assert imag["count"] > 0 and imag["count_mesh"] > 0 and imag["count_band"] > 0
    worst = imag["most_negative_at"]
    assert imag["most_negative_THz"] < -1.0
    # the reported location and size are real: recompute at that q
    assert result.frequencies_at(worst["q"])[worst["band"]] == pytest.approx(worst["frequency_THz"], abs=1e-8)
    band_modes = [m for m in imag["modes"] if m["where"] == "band"]
    assert band_modes and all("segment" in m for m in band_modes)
    assert result.summary["frequencies"]["lowest_THz"] == pytest.approx(imag["most_negative_THz"])
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("imaginary modes" in m and f"{worst['frequency_THz']:.4f}" in m for m in messages), messages
    assert "imaginary modes" in (tmp_path / "phonon.log").read_text()


def test_find_imaginary_modes_excludes_only_gamma_acoustic():
    q = [[0, 0, 0], [0.5, 0, 0]]
    f = [[-0.02, 0.001, 0.0, 5.0, -0.5], [-0.3, 1.0, 2.0, 3.0, 4.0]]
    modes = find_imaginary_modes(q, f, where="mesh")
    found = sorted((m["q"][0], m["band"]) for m in modes)
    assert found == [(0.0, 4), (0.5, 0)]  # the Γ acoustic -0.02 is ignored, the optic -0.5 at Γ is not


# ---------------------------------------------------------------------------------------------------------
# settings and errors
# ---------------------------------------------------------------------------------------------------------


def _rotations(atoms: Atoms) -> np.ndarray:
    from phonopy.structure.symmetry import Symmetry

    sym = Symmetry(PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell[:],
                                scaled_positions=atoms.get_scaled_positions()))
    return np.asarray(sym.symmetry_operations["rotations"])


@pytest.mark.parametrize("atoms, length, n_atoms", [
    # 3C-SiC primitive (the README example) at the default 10 Å: 4x4x4 = 128 atoms (12.33 Å); at 15 Å 5x5x5 = 250
    # (the old rule, diagonal with perpendicular widths >= 15 Å, took 6x6x6 = 432)
    (bulk("SiC", "zincblende", a=4.36), 10.0, 128),
    (bulk("SiC", "zincblende", a=4.36), 15.0, 250),
    # its conventional cell: a non-diagonal fcc-shaped supercell, 4x4x4 primitive cells (128 atoms, not 216)
    (bulk("SiC", "zincblende", a=4.36, cubic=True), 10.0, 128),
    (bulk("GaN", "wurtzite", a=3.19, c=5.19), 10.0, 128),  # hexagonal: 4x4x2
    (bulk("Fe", "bcc", a=2.87), 10.0, 108),  # bcc primitive: non-diagonal (the diagonal 5x5x5 has 125 atoms)
])
def test_auto_supercell_fewest_atoms_with_minimum_image_distance(atoms, length, n_atoms):
    rotations = _rotations(atoms)
    smat = auto_supercell(atoms.cell[:], length, rotations)
    ph = Phonopy(PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell[:],
                              scaled_positions=atoms.get_scaled_positions()), smat, primitive_matrix="P")
    # phonopy's convention: the matrix holds the supercell's lattice vectors as columns
    np.testing.assert_allclose(ph.supercell.cell, smat.T @ atoms.cell[:], atol=1e-10)
    assert len(ph.supercell) == n_atoms
    assert min_image_distance(ph.supercell.cell) >= length
    # the supercell keeps the crystal's point group: S^-1 R S is integer for every rotation R
    m = np.linalg.inv(smat) @ rotations @ smat
    np.testing.assert_allclose(m, np.rint(m), atol=1e-9)
    # never more atoms than the diagonal supercell whose perpendicular widths all reach the length
    n_diag = np.prod([np.ceil(length / w - 1e-9) for w in perpendicular_widths(atoms.cell[:])])
    assert n_atoms <= len(atoms) * n_diag
    # the minimum image distance is the shortest lattice vector: at least the smallest perpendicular width
    assert min_image_distance(ph.supercell.cell) >= perpendicular_widths(ph.supercell.cell).min() - 1e-9


def test_min_image_distance_and_model_cutoff(small_checkpoint):
    from mattersim.registry import load_calculator

    fcc = bulk("Cu", "fcc", a=3.6)  # shortest vector a/sqrt(2); perpendicular width only a/sqrt(3)
    assert min_image_distance(fcc.cell[:]) == pytest.approx(3.6 / np.sqrt(2), rel=1e-12)
    assert perpendicular_widths(fcc.cell[:]).min() == pytest.approx(3.6 / np.sqrt(3), rel=1e-12)
    skewed = np.array([[1, 5, 0], [0, 1, 0], [0, 0, 1]]) @ fcc.cell[:]  # same lattice, another basis
    assert min_image_distance(skewed) == pytest.approx(3.6 / np.sqrt(2), rel=1e-12)
    assert model_cutoff(load_calculator(str(small_checkpoint))) == (5.0, "from Potential.cutoff")
    assert model_cutoff(EMT()) == (5.0, "assumed: the calculator does not expose one")


# ---------------------------------------------------------------------------------------------------------
# non-diagonal supercells end to end
# ---------------------------------------------------------------------------------------------------------

A_FCC = 3.61
R_CUT = 5.0  # between the 3rd (4.42 Å) and the 4th (5.11 Å) neighbour shell of fcc with a = 3.61 Å


def _pair_potential():
    """Lennard-Jones with a smooth cutoff: every force constant of a pair farther than R_CUT is exactly 0."""
    from ase.calculators.lj import LennardJones

    return LennardJones(sigma=A_FCC / np.sqrt(2) / 2 ** (1 / 6), epsilon=0.2, rc=R_CUT, ro=4.0, smooth=True)


def _bands(result) -> np.ndarray:
    return np.concatenate(result.phonopy.band_structure.frequencies)


def test_non_diagonal_supercells_agree_with_diagonal_for_a_pair_potential(tmp_path):
    """With a pair potential of cutoff r_c the finite-displacement force constants are exact once the
    supercell's minimum image distance exceeds 2 r_c: no atom then has a displaced atom and one of its images
    within r_c. Two such supercells, diagonal or not, give the same bands up to the finite-displacement error
    (O(u^2), u = displacement, from their different displacement directions); a smaller supercell does not."""
    cu = bulk("Cu", "fcc", a=A_FCC)
    kw = dict(relax=False, mesh=(4, 4, 4), progress=False)
    cube = np.array([[-3, 3, 3], [3, -3, 3], [3, 3, -3]])  # 3x3x3 conventional cubes, 108 atoms, 10.83 Å
    shear = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]])  # 4I @ shear: the lattice of 4x4x4, another basis
    diag = run_phonon(cu, _pair_potential(), supercell=4, **kw)  # 64 atoms, minimum image distance 10.21 Å
    non_diag = run_phonon(cu, _pair_potential(), supercell=cube, **kw)
    same_lattice = run_phonon(cu, _pair_potential(), supercell=4 * shear, **kw)
    aliased = run_phonon(cu, _pair_potential(), supercell=3, **kw)  # 7.66 Å < 2 r_c
    assert diag.summary["structure"]["supercell_min_image_distance_A"] > 2 * R_CUT
    assert non_diag.summary["structure"]["supercell_min_image_distance_A"] > 2 * R_CUT
    assert non_diag.summary["structure"]["supercell_matrix"] == cube.tolist()
    assert same_lattice.summary["structure"]["supercell_matrix"] == (4 * shear).tolist()
    assert len(non_diag.phonopy.supercell) == 108
    np.testing.assert_allclose(non_diag.phonopy.supercell.cell, cube.T @ cu.cell[:], atol=1e-12)
    # same lattice in another basis: the same supercell, the same numbers (round-off, measured 2e-8 THz)
    assert np.abs(_bands(same_lattice) - _bands(diag)).max() < 1e-6
    # another alias-free lattice: only the finite-displacement error differs (measured 8.7e-4 THz at u = 0.01 Å,
    # falling as u^2 to 8.7e-6 at 0.001 Å); the aliased 3x3x3 supercell is off by 0.15 THz
    diff = np.abs(_bands(non_diag) - _bands(diag)).max()
    assert diff < 2e-3
    assert np.abs(_bands(aliased) - _bands(diag)).max() > 50 * diff
    small_u = [run_phonon(cu, _pair_potential(), supercell=s, displacement=0.001, **kw) for s in (4, cube)]
    assert np.abs(_bands(small_u[0]) - _bands(small_u[1])).max() < diff / 30  # ~u^2: 100x smaller
    # phonopy.yaml keeps the non-diagonal matrix and the force constants: reopening reproduces the bands
    non_diag.save(tmp_path)
    again = PhononResult.load(tmp_path)
    np.testing.assert_array_equal(np.asarray(again.phonopy.supercell_matrix), cube)
    q = np.concatenate(non_diag.phonopy.band_structure.qpoints)
    again.phonopy.run_qpoints(q)
    _assert_same_frequencies(again.phonopy.qpoints.frequencies, _bands(non_diag))


@pytest.mark.filterwarnings("ignore:.*Point group symmetries of supercell and primitivecell are different")
def test_non_diagonal_supercell_batched_equals_one_at_a_time(small_checkpoint, monkeypatch):
    """A non-diagonal supercell that lowers the symmetry (more displacements, with plus and minus): one batched
    model call gives the forces of one call per supercell; the supercell is phonopy's (columns convention)."""
    from mattersim.registry import load_calculator

    calc = load_calculator(str(small_checkpoint), dtype="float64")
    calls = []
    original = calc.calculate_batch
    monkeypatch.setattr(calc, "calculate_batch", lambda structures: calls.append(len(structures)) or original(structures))
    nacl = bulk("NaCl", "rocksalt", a=5.6)
    smat = np.array([[2, 1, 0], [0, 2, 0], [0, 0, 2]])
    kw = dict(relax=False, supercell=smat, mesh=(4, 4, 4), progress=False)
    batched = run_phonon(nacl, calc, **kw)
    n_struct = batched.summary["forces"]["n_supercells"] + 1
    assert calls == [1, n_struct - 1] and n_struct > 3  # lower symmetry than 2x2x2 (3 supercells): more displacements
    np.testing.assert_allclose(batched.phonopy.supercell.cell, smat.T @ nacl.cell[:], atol=1e-12)
    single_calc = CountingCalculator(calc)
    single = run_phonon(nacl, single_calc, **kw)
    assert single_calc.calls == n_struct
    assert np.abs(np.asarray(batched.phonopy.forces) - np.asarray(single.phonopy.forces)).max() < 1e-10
    _assert_same_frequencies(batched.phonopy.mesh.frequencies, single.phonopy.mesh.frequencies, tol=1e-10)


def test_automatic_supercell_recorded_and_small_supercell_warned(tmp_path, caplog):
    cu = bulk("Cu", "fcc", a=A_FCC)
    with caplog.at_level(logging.WARNING, logger="mattersim.phonon"):
        auto = run_phonon(cu, EMT(), relax=False, min_length=10.0, mesh=(4, 4, 4), progress=False,
                          output_dir=tmp_path / "auto")
    st = auto.summary["structure"]
    assert st["supercell_matrix"] == [[4, 0, 0], [0, 4, 0], [0, 0, 4]] and st["n_atoms_supercell"] == 64
    assert st["supercell_min_image_distance_A"] == pytest.approx(4 * A_FCC / np.sqrt(2))
    assert "automatic" in st["supercell_choice"] and auto.summary["settings"]["min_length_A"] == 10.0
    assert st["model_cutoff_A"] == 5.0
    assert not [r for r in caplog.records if "minimum image distance" in r.getMessage()]
    assert "minimum image distance 10.21 Å" in (tmp_path / "auto" / "phonon.log").read_text()
    # given supercells below twice the cutoff (EMT exposes none: 5 Å assumed): one warning line each
    conventional = bulk("Cu", "fcc", a=A_FCC, cubic=True)
    for atoms, smat, distance, what in ((conventional, 1, "3.61", "own periodic image"),  # below the cutoff
                                        (cu, 2, "5.11", "summed into one")):  # between the cutoff and twice it
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mattersim.phonon"):
            small = run_phonon(atoms, EMT(), relax=False, supercell=smat, mesh=(4, 4, 4), progress=False,
                               output_dir=tmp_path / distance)
        warned = [r.getMessage() for r in caplog.records if "minimum image distance" in r.getMessage()]
        assert len(warned) == 1 and f"{distance} Å is below twice the model's cutoff (2 x 5 Å" in warned[0]
        assert what in warned[0] and "\n" not in warned[0]
        assert warned[0] in (tmp_path / distance / "phonon.log").read_text()
        assert small.summary["structure"]["supercell_choice"] == "given"


def test_default_min_length_follows_the_cutoff(monkeypatch):
    import workflows.phonon as phonon_module

    class LongCutoff(CountingCalculator):
        cutoff = 9.0  # 2 x 9 Å = 18 Å > 10 Å

    asked = []

    def cheap(cell, length, rotations=None):  # record the length, return a small supercell to keep this fast
        asked.append(length)
        return np.eye(3, dtype=int) * 2

    monkeypatch.setattr(phonon_module, "auto_supercell", cheap)
    cu = bulk("Cu", "fcc", a=A_FCC)
    result = run_phonon(cu, LongCutoff(EMT()), relax=False, mesh=(2, 2, 2), progress=False)
    assert asked == [18.0] and result.summary["settings"]["min_length_A"] == 18.0
    assert result.summary["structure"]["model_cutoff_source"] == "from the calculator's cutoff"
    run_phonon(cu, EMT(), relax=False, mesh=(2, 2, 2), progress=False)  # 5 Å assumed: max(10 Å, 2 x 5 Å)
    run_phonon(cu, EMT(), relax=False, mesh=(2, 2, 2), progress=False, min_length=7.5)
    assert asked[1:] == [10.0, 7.5]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"supercell": (2, 0, 2)}, "below 1"),
    ({"supercell": (1, 0, 0, 0, 1, 0, 0, 0, 0)}, "singular"),
    ({"supercell": "a b c"}, "supercell"),
    ({"mesh": (4, 4)}, "mesh"),
    ({"nac_method": "ewald"}, "nac_method"),
    ({"displacement": -0.01}, "displacement"),
])
def test_bad_settings_raise_input_error(kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        run_phonon(bulk("Cu"), EMT(), relax=False, progress=False, **kwargs)


def test_nac_without_source_fails_before_relaxation_and_writes_nothing(tmp_path):
    """docs/phonon.md: a missing or unreadable source of Born charges stops the run before any expensive work:
    no relaxation, no force evaluation, nothing in the output folder."""
    out = tmp_path / "out"
    garbage = tmp_path / "BORN"
    garbage.write_bytes(b"\x00\x01 not a BORN file\n1 2 3\n")
    wrong_crystal = tmp_path / "BORN-NaCl"  # eps_inf and Z* of 2 independent atoms; Cu has 1
    wrong_crystal.write_text("14.4\n2.4 0 0 0 2.4 0 0 0 2.4\n1.1 0 0 0 1.1 0 0 0 1.1\n-1.1 0 0 0 -1.1 0 0 0 -1.1\n")
    for kwargs, fragment in (({"nac": True}, "--born FILE"),  # EMT predicts no Z*
                             ({"born_file": garbage}, "line 2"),
                             ({"born_file": wrong_crystal}, "line 4 is one line too many"),
                             ({"predictor": object()}, "predict_dielectric")):
        counting = CountingCalculator(EMT())
        with pytest.raises(InputError, match=fragment):
            run_phonon(bulk("Cu", "fcc", a=3.7), counting, relax=True, progress=False, output_dir=out, **kwargs)
        assert counting.calls == 0, kwargs
        assert not out.exists(), kwargs


def test_primitive_axes_that_do_not_fit_the_crystal(tmp_path):
    fcc_axes = "0 1/2 1/2 1/2 0 1/2 1/2 1/2 0"
    primitive_si = bulk("Si", "diamond", a=5.43)
    counting = CountingCalculator(EMT())
    with pytest.raises(InputError, match=r"cell of 0.5 atoms .*primitive cell of 2 atoms \(the input is already primitive\).*'auto'") as info:
        run_phonon(primitive_si, counting, relax=True, primitive=fcc_axes, output_dir=tmp_path / "o", progress=False)
    assert "Cell trimming" not in str(info.value) and counting.calls == 0 and not (tmp_path / "o").exists()
    conventional = bulk("Cu", "fcc", a=3.61, cubic=True)  # 4 atoms
    with pytest.raises(InputError, match="1.5 atoms .* not a whole number"):
        run_phonon(conventional, EMT(), relax=False, primitive=[[0.375, 0, 0], [0, 1, 0], [0, 0, 1]], progress=False)
    with pytest.raises(InputError, match="whole primitive cells"):  # a 1x1x1 supercell of a doubled "primitive" cell
        run_phonon(conventional, EMT(), relax=False, primitive=[[2, 0, 0], [0, 1, 0], [0, 0, 1]], supercell=1,
                   progress=False)
    # the same axes on the conventional cell are right: phonopy's fcc primitive cell of 1 atom
    result = run_phonon(conventional, EMT(), relax=False, primitive=fcc_axes, supercell=2, mesh=(2, 2, 2), progress=False)
    assert len(result.phonopy.primitive) == 1
    # primitive=None is the unit cell itself (phonopy 4 alone would read None as "auto")
    result = run_phonon(conventional, EMT(), relax=False, primitive=None, supercell=1, mesh=(2, 2, 2), progress=False)
    assert len(result.phonopy.primitive) == 4


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def al_poscar(tmp_path):
    path = tmp_path / "POSCAR"
    ase.io.write(path, bulk("Al", "fcc", a=4.05), format="vasp")
    return path


def test_cli_phonon_runs(al_poscar, small_checkpoint, tmp_path):
    from mattersim.cli import app

    out = tmp_path / "out"
    result = runner.invoke(app, ["phonon", str(al_poscar), "--model", str(small_checkpoint), "--no-relax", "--supercell", "2 2 2",
                                 "--mesh", "4 4 4", "--float64", "--pdos", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for name in FILES:
        assert (out / name).is_file(), name
    assert "ω_max" in result.stdout and "F (300 K)" in result.stdout and str(out) in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["sha256"] and summary["settings"]["relax"] is False
    assert summary["structure"]["supercell_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    # 2x2x2 of the fcc primitive cell: 5.73 Å between images, below twice the model's 5 Å cutoff: one line
    assert "2x2x2 (8 atoms, min. image distance 5.73 Å)" in result.stdout
    warned = [line for line in result.stderr.splitlines() if "minimum image distance" in line]
    assert len(warned) == 1 and warned[0].startswith("Warning: the supercell's minimum image distance 5.73 Å is "
                                                     "below twice the model's cutoff (2 x 5 Å, from Potential.cutoff)")


def test_cli_phonon_prints_the_automatic_non_diagonal_supercell(small_checkpoint, tmp_path):
    from mattersim.cli import app

    poscar = tmp_path / "POSCAR"
    ase.io.write(poscar, bulk("Al", "fcc", a=4.05, cubic=True), format="vasp")
    out = tmp_path / "out"
    result = runner.invoke(app, ["phonon", str(poscar), "--model", str(small_checkpoint), "--no-relax", "--min-length", "10",
                                 "--mesh", "4 4 4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    # fcc-shaped: 4x4x4 primitive cells as a supercell of the conventional cube (a diagonal one needs 108 atoms)
    assert "[[0, 2, 2], [2, 0, 2], [2, 2, 0]] (64 atoms, min. image distance 11.46 Å)" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["structure"]["supercell_matrix"] == [[0, 2, 2], [2, 0, 2], [2, 2, 0]]
    assert phonopy.load(out / "phonopy.yaml").supercell_matrix.tolist() == [[0, 2, 2], [2, 0, 2], [2, 2, 0]]
    assert "minimum image distance" not in result.stderr


def test_cli_phonon_bad_input(al_poscar, small_checkpoint, tmp_path):
    from mattersim.cli import app

    model = ["--model", str(small_checkpoint), "--no-relax", "-o", str(tmp_path / "o")]
    assert_user_error(runner.invoke(app, ["phonon", str(al_poscar), "--supercell", "2 x 2", *model]), "--supercell")
    assert_user_error(runner.invoke(app, ["phonon", str(tmp_path / "missing.vasp"), *model]), "missing.vasp")
    result = runner.invoke(app, ["phonon", str(al_poscar), "--nac", "--supercell", "2 2 2", *model])
    assert_user_error(result, "BORN")
    assert not (tmp_path / "o" / "forces.npz").exists()


def test_cli_phonon_fails_before_the_relaxation(al_poscar, small_checkpoint, tmp_path):
    """With the relaxation on: no source of Z*, a garbage --born file or primitive axes that do not fit the
    crystal end in one line before the relaxation; the output folder stays empty."""
    from mattersim.cli import app

    out = tmp_path / "o"
    garbage = tmp_path / "BORN"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n")
    model = ["--model", str(small_checkpoint), "-o", str(out)]
    assert_user_error(runner.invoke(app, ["phonon", str(al_poscar), "--nac", *model]), "--born FILE")
    assert_user_error(runner.invoke(app, ["phonon", str(al_poscar), "--born", str(garbage), *model]), str(garbage), "cannot be read")
    result = runner.invoke(app, ["phonon", str(al_poscar), "--primitive-axis", "0 1/2 1/2 1/2 0 1/2 1/2 1/2 0", *model])
    assert_user_error(result, "--primitive-axis", "already primitive", "auto")
    assert not out.exists() or not any(out.iterdir())


def test_cli_phonon_nac_with_born_file(small_checkpoint, tmp_path):
    from mattersim.cli import app

    nacl = shared_path("data", "phonopy-examples", "NaCl")
    out = tmp_path / "nacl"
    result = runner.invoke(app, ["phonon", str(nacl / "POSCAR-unitcell"), "--nac", "--born", str(nacl / "BORN"),
                                 "--model", str(small_checkpoint), "--no-relax", "--supercell", "1 1 1",
                                 "--mesh", "4 4 4", "--float64", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "BORN").is_file()
    summary = json.loads((out / "summary.json").read_text())
    nac = summary["nac"]
    assert nac["enabled"] and nac["method"] == "gonze" and "BORN" in nac["source"]
    assert len(nac["gamma_lo_to"]["directions"]) == 3
    assert "LO / TO" in result.stdout
    # the table shows Z* per species and eps_inf: phonopy's NaCl BORN has Z*(Na) = 1.08703, Z*(Cl) = -1.08672
    # (1.086875 each after the neutrality correction) and eps_inf = 2.43534
    assert sorted(set(nac["symbols"])) == ["Cl", "Na"]
    assert "Na +1.087" in result.stdout and "Cl -1.087" in result.stdout and "2.435" in result.stdout
    # the NAC parameters travel with phonopy.yaml
    loaded = phonopy.load(out / "phonopy.yaml")
    assert loaded.nac_params is not None
    np.testing.assert_allclose(loaded.nac_params["dielectric"], np.eye(3) * 2.43533967, atol=1e-6)
    again = PhononResult.load(out)
    direction = nac["gamma_lo_to"]["directions"][0]
    again.phonopy.run_qpoints([[0, 0, 0]], nac_q_direction=direction["q_direction_reduced"])
    # force constants and Z* come back to 1e-15; phonopy's Gonze-Lee dipole sums of the reloaded object
    # differ by ~1e-8 THz (measured 2e-8) from the in-memory one
    _assert_same_frequencies(np.sort(again.phonopy.qpoints.frequencies[0]), np.asarray(direction["frequencies"]), tol=1e-6)


def test_projected_dos_only_when_asked_and_summing_to_the_total(cu_run, tmp_path):
    _, result = cu_run  # pdos=True
    pdos = np.loadtxt(result.output_dir / "projected_dos.dat")
    total = np.loadtxt(result.output_dir / "total_dos.dat")
    np.testing.assert_allclose(pdos[:, 0], total[:, 0])
    np.testing.assert_allclose(pdos[:, 1:].sum(axis=1), total[:, 1], rtol=1e-6, atol=1e-8 * total[:, 1].max())
    plain = run_phonon(bulk("Cu", "fcc", a=3.59), EMT(), relax=False, supercell=(2, 2, 2), mesh=(4, 4, 4),
                       output_dir=tmp_path / "plain", progress=False)
    assert not (tmp_path / "plain" / "projected_dos.dat").exists()
    assert plain.summary["projected_dos"].startswith("not computed")
    assert plain.summary["settings"]["pdos"] is False
    assert plain.summary["group_velocity"]["mean_m_per_s"] is None  # group_velocities=False by default


def test_max_group_velocity_and_free_energy_change(cu_run):
    """Cu (EMT): the largest |v| on the mesh bounds the mean; F(900 K) - F(300 K) per atom in meV is
    phonopy's own thermal properties converted (1 kJ/mol = 1/96.485 eV)."""
    _, result = cu_run
    s = result.summary
    gv = s["group_velocity"]
    assert gv["max_m_per_s"] > gv["mean_m_per_s"] > 0
    ph = result.phonopy
    ph.run_mesh(MESH, is_gamma_center=True)
    ph.run_thermal_properties(temperatures=[300.0, 900.0], exclude_gamma_acoustic=True)
    f300, f900 = np.ravel(ph.thermal_properties.free_energy)
    expected = (f900 - f300) / 96.48533212331002 * 1e3 / len(ph.primitive)
    assert s["free_energy_change"]["delta_meV_per_atom"] == pytest.approx(expected, rel=1e-10)
    assert expected < 0  # F falls with T (entropy)


def test_positions_only_relaxation_keeps_the_given_cell():
    # copper 3 % expanded: a full relaxation shrinks it, relax_mode="fixed_cell" keeps the cell (phonons at a
    # volume of one's choosing) and says so in the summary; the phonons then differ (softer at the larger volume)
    from workflows.phonon import run_phonon

    atoms = bulk("Cu", "fcc", a=3.59 * 1.01)
    kwargs = dict(supercell=[3, 3, 3], mesh=[6, 6, 6], progress=False)
    fixed = run_phonon(atoms, EMT(), relax_mode="fixed_cell", **kwargs)
    full = run_phonon(atoms, EMT(), **kwargs)
    assert fixed.summary["settings"]["relax_mode"] == "fixed_cell"
    assert fixed.summary["relaxation"]["volume"] == pytest.approx(atoms.get_volume(), rel=1e-12)
    assert full.summary["relaxation"]["volume"] < 0.99 * atoms.get_volume()
    assert fixed.frequencies_at([0.5, 0.5, 0.0]).max() < full.frequencies_at([0.5, 0.5, 0.0]).max()
