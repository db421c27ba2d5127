"""Quasi-harmonic workflow (workflows.qha): phonopy-qha's own example replayed, EMT copper against a hand loop
of phonopy runs, symmetry and c/a at fixed volume, the checks that catch unphysical phonons, phase boundaries
against analytic results, resume, save/load and user errors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from conftest import shared_path
from mattersim.errors import InputError
from workflows.qha import (QHARunResult, check_free_energy_monotonic, find_mode_jumps, parse_volume_grid,
                           phase_boundary, qha_from_files, relax_at_volumes, run_qha, static_transition_pressure)

# small settings that keep EMT copper fast: 1-atom primitive cell, 3x3x3 supercell (27 atoms), 7 volumes; an
# odd mesh, which is Γ-centred in phonopy's default (Monkhorst-Pack) sampling too, as the hand loop below uses
CU = dict(supercell=[3, 3, 3], mesh=[9, 9, 9], volumes="-0.03:0.03:7", tmax=400.0, tstep=10.0, progress=False)


def _gpa() -> float:
    from phonopy.physical_units import get_physical_units

    return get_physical_units().EVAngstromToGPa


@pytest.fixture(scope="module")
def cu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qha") / "cu"
    return run_qha(bulk("Cu", "fcc", a=3.6), EMT(), output_dir=out, **CU)


# ---------------------------------------------------------------------------------------------------------
# phonopy's Al-QHA example, replayed
# ---------------------------------------------------------------------------------------------------------


def test_al_qha_example_matches_phonopy_qha():
    folder = shared_path("data", "phonopy-examples", "Al-QHA")
    files = [folder / f"thermal_properties.yaml-{i}" for i in range(-5, 6)]
    ours = qha_from_files(folder / "e-v.dat", files, eos="vinet")
    # phonopy-qha's own route (the PhonopyQHA class its script runs), on the same files
    from phonopy import PhonopyQHA
    from phonopy.file_IO import read_thermal_properties_yaml, read_v_e

    v, e = read_v_e(folder / "e-v.dat")
    t, cv, s, fe, _, _ = read_thermal_properties_yaml([str(f) for f in files])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PhonopyQHA is deprecated in phonopy 4.10; it is the reference here
        ref = PhonopyQHA(volumes=v, electronic_energies=e, temperatures=t, free_energy=fe, cv=cv, entropy=s,
                         eos="vinet", t_max=1000)
    n = min(len(ref.thermal_expansion), len(ours.thermal_expansion))
    assert n > 400
    np.testing.assert_allclose(ours.temperatures[:n], np.asarray(t)[:n])
    np.testing.assert_allclose(ours.thermal_expansion[:n], np.asarray(ref.thermal_expansion)[:n], rtol=1e-8, atol=1e-20)
    np.testing.assert_allclose(ours.bulk_moduli[:n] * _gpa(), np.asarray(ref.bulk_modulus_temperature)[:n], rtol=1e-8)
    np.testing.assert_allclose(ours.equilibrium_volumes[:n], np.asarray(ref.volume_temperature)[:n], rtol=1e-10)
    i = int(np.nonzero(ours.temperatures == 300.0)[0][0])
    assert ours.thermal_expansion[i] == pytest.approx(7.345e-5, rel=1e-4)  # phonopy-qha's published numbers
    assert ours.bulk_moduli[i] * _gpa() == pytest.approx(68.59, rel=1e-4)


def test_qha_from_files_names_bad_input(tmp_path):
    folder = shared_path("data", "phonopy-examples", "Al-QHA")
    with pytest.raises(InputError, match="does not exist"):
        qha_from_files(tmp_path / "e-v.dat", [folder / "thermal_properties.yaml-0"])
    files = [folder / f"thermal_properties.yaml-{i}" for i in range(-5, 5)]
    with pytest.raises(InputError, match="11 volumes but 10"):
        qha_from_files(folder / "e-v.dat", files)


# ---------------------------------------------------------------------------------------------------------
# EMT copper: the workflow against a hand loop of phonopy runs and phonopy's run_qha
# ---------------------------------------------------------------------------------------------------------


def test_emt_copper_matches_hand_phonopy_loop(cu_run):
    from phonopy import Phonopy
    from phonopy.qha.qha import run_qha as phonopy_run_qha

    from workflows.cells import to_phonopy_atoms

    phase = cu_run.phase()
    rec = phase["structure"]["unitcell_V0"]
    from ase import Atoms

    unit = Atoms(numbers=rec["numbers"], cell=rec["cell"], positions=rec["positions"], pbc=True)
    phonopys, energies = [], []
    for x in np.linspace(-0.03, 0.03, 7):
        a = unit.copy()
        a.set_cell(unit.cell[:] * (1 + x) ** (1 / 3), scale_atoms=True)  # fcc: nothing to relax at fixed volume
        a.calc = EMT()
        energies.append(a.get_potential_energy())
        ph = Phonopy(to_phonopy_atoms(a), supercell_matrix=np.diag([3, 3, 3]), primitive_matrix="auto", log_level=0)
        ph.generate_displacements(distance=0.01)
        forces = []
        for sc in ph.supercells_with_displacements:
            s = Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
            s.calc = EMT()
            forces.append(s.get_forces())
        ph.forces = forces
        ph.produce_force_constants()
        ph.symmetrize_force_constants()
        phonopys.append(ph)
    temps = np.arange(0.0, 400.0 + 15.0, 10.0)
    ref = phonopy_run_qha(phonopys, temps, internal_energies=energies, mesh=[9, 9, 9], eos="vinet",
                          exclude_gamma_acoustic=True)
    for temp in (100.0, 300.0):
        i = int(np.nonzero(ref.temperatures == temp)[0][0])
        assert cu_run.value_at("thermal_expansion_per_K", temp) == pytest.approx(ref.thermal_expansion[i], rel=1e-6)
        assert cu_run.value_at("bulk_modulus_GPa", temp) == pytest.approx(ref.bulk_moduli[i] * _gpa(), rel=1e-6)
        assert cu_run.value_at("volume_A3", temp) == pytest.approx(ref.equilibrium_volumes[i], rel=1e-9)
    # physics: copper expands, softens and approaches Dulong-Petit
    assert 4e-5 < cu_run.value_at("thermal_expansion_per_K", 300.0) < 8e-5
    assert cu_run.value_at("bulk_modulus_GPa", 300.0) < cu_run.value_at("bulk_modulus_GPa", 50.0)
    assert cu_run.value_at("cp_J_per_K_per_mol", 390.0) == pytest.approx(3 * 8.314, rel=0.1)


def test_outputs_are_phonopy_qha_inputs_and_round_trip(cu_run):
    out = cu_run.output_dir
    phase = out / "Cu"
    for name in ("e-v.dat", "thermal_properties.yaml-00", "thermal_properties.yaml-06", "POSCAR-03", "qha.png",
                 "thermal_expansion.dat", "bulk_modulus-temperature.dat", "gibbs-temperature.dat"):
        assert (phase / name).is_file(), name
    assert (out / "gibbs.png").is_file() and (out / "qha.log").is_file()
    # phonopy-qha's inputs, read back through the replay path, give the run's own curves
    again = qha_from_files(phase / "e-v.dat", [phase / f"thermal_properties.yaml-{i:02d}" for i in range(7)])
    i = int(np.nonzero(again.temperatures == 300.0)[0][0])
    assert again.thermal_expansion[i] == pytest.approx(cu_run.value_at("thermal_expansion_per_K", 300.0), rel=1e-6)
    loaded = QHARunResult.load(out)
    assert loaded.summary == json.loads((out / "qha.json").read_text())
    assert loaded.rows()[:2] == cu_run.rows()[:2]
    summary = loaded.summary
    assert summary["workflow"] == "qha" and summary["settings"]["eos"] == "vinet"
    assert "Cu/V-03/forces.npz" in summary["files"] and "qha.json" in summary["files"]
    t, p, g = loaded.gibbs()
    assert g.shape == (1, len(t)) and p.tolist() == [0.0]
    assert np.all(np.diff(g[0][np.isfinite(g[0])]) < 0)  # G falls with T (S > 0)


def test_nothing_is_written_outside_the_output_folder(tmp_path, monkeypatch):
    # phonopy's QHA writers default to the working directory; every file must land in the run's folder
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    run_qha(bulk("Cu", "fcc", a=3.6), EMT(), output_dir=tmp_path / "out", **{**CU, "volumes": "-0.02:0.02:5", "tmax": 100.0})
    assert list(work.iterdir()) == []
    for name in ("Cp-temperature_polyfit.dat", "entropy-volume.dat", "Cv-volume.dat", "dsdv-temperature.dat"):
        assert (tmp_path / "out" / "Cu" / name).is_file(), name
    assert not [p for p in (tmp_path / "out" / "Cu").iterdir() if p.name.startswith(".cp-")]


def test_rerun_resumes_without_model_calls(cu_run, monkeypatch):
    calls = []
    real = EMT.calculate

    def counting(self, *args, **kwargs):  # the same calculator class (its identity keys the stores), counted
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EMT, "calculate", counting)
    again = run_qha(bulk("Cu", "fcc", a=3.6), EMT(), output_dir=cu_run.output_dir, **CU)
    # the V0 relaxation, the fixed-volume relaxations and all forces come from the stores
    assert calls == []
    assert again.value_at("bulk_modulus_GPa", 300.0) == pytest.approx(cu_run.value_at("bulk_modulus_GPa", 300.0), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# fixed-volume relaxations
# ---------------------------------------------------------------------------------------------------------


def test_hexagonal_keeps_symmetry_and_changes_c_over_a():
    import spglib

    fractions = [-0.08, 0.0, 0.08]
    v0 = bulk("Cu", "hcp", a=2.55, c=4.3).get_volume()
    by_start = []
    for c in (4.3, 4.0):  # two starting c/a (1.686 and 1.569) at the same volume
        hcp = bulk("Cu", "hcp", a=2.55, c=c)
        hcp.set_cell(hcp.cell[:] * (v0 / hcp.get_volume()) ** (1 / 3), scale_atoms=True)
        ca = []
        for x, r in zip(fractions, relax_at_volumes(hcp, EMT(), fractions, fmax=1e-4)):
            a = r.atoms
            assert r.converged
            assert a.get_volume() == pytest.approx(v0 * (1 + x), rel=1e-9)
            cell = (a.cell[:], a.get_scaled_positions(), a.numbers)
            assert spglib.get_symmetry_dataset(cell, symprec=1e-5).number == 194
            lengths = a.cell.lengths()
            assert lengths[0] == pytest.approx(lengths[1], rel=1e-10)
            ca.append(lengths[2] / lengths[0])
        by_start.append(np.array(ca))
    # the relaxed shape does not depend on where it started (to the relaxation's tolerance) ...
    spread = np.abs(by_start[0] - by_start[1]).max()
    assert spread < 1e-5, by_start
    # ... and it differs between the smallest and the largest volume by far more than that
    assert abs(by_start[0][0] - by_start[0][-1]) > 50 * max(spread, 1e-5), by_start


# ---------------------------------------------------------------------------------------------------------
# unphysical phonons are flagged
# ---------------------------------------------------------------------------------------------------------


def test_monotonic_free_energy_check_on_arrays():
    v = np.linspace(10, 12, 7)
    t = np.array([100.0, 300.0])
    normal = np.array([-(v - 10), -2 * (v - 10)])  # falls with V
    assert check_free_energy_monotonic(v, t, normal)["ok"]
    wavy = normal.copy()
    wavy[1, 3] += 1.0  # at 300 K F_vib rises between the 3rd and 4th volume, then falls again
    res = check_free_energy_monotonic(v, t, wavy)
    assert not res["ok"] and res["non_monotonic_temperatures_K"] == [300.0]


def test_mode_jump_check_on_arrays():
    v = np.linspace(10, 12, 5)
    q = np.zeros((1, 3))
    smooth = np.array([[[1.0, 5.0 - 0.1 * k]] for k in range(5)])  # (n_v, n_q, n_bands)
    assert find_mode_jumps(v, q, smooth) == []
    jump = smooth.copy()
    jump[2, 0, 1] += 0.4
    found = find_mode_jumps(v, q, jump)
    assert len(found) == 1 and found[0]["band"] == 1 and found[0]["reversal_THz"] == pytest.approx(0.3, rel=1e-9)


class WobblyEMT(Calculator):
    """EMT with forces scaled by a factor that oscillates with the volume per atom: energies stay EMT's, but
    the phonons stiffen and soften back and forth as the crystal expands (a potential whose curvature is not
    smooth in volume)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        emt = EMT()
        a = self.atoms.copy()
        a.calc = emt
        v = a.get_volume() / len(a)
        self.results = {"energy": a.get_potential_energy(), "free_energy": a.get_potential_energy(),
                        "forces": a.get_forces() * (1.0 + 0.6 * np.sin(2 * np.pi * (v - 11.0) / 0.25)),
                        "stress": a.get_stress()}


def test_unphysical_phonons_are_flagged(tmp_path):
    res = run_qha(bulk("Cu", "fcc", a=3.6), WobblyEMT(), output_dir=tmp_path / "w", **CU)
    phase = res.phase()
    assert not phase["checks"]["free_energy_monotonic"]["ok"]
    assert phase["checks"]["mode_jumps"]
    text = " ".join(phase["warnings"])
    assert "not monotonic in volume" in text and "move back and forth" in text
    assert any(q == "  WARNING" for q, _ in res.rows())
    log = (tmp_path / "w" / "qha.log").read_text()
    assert "not monotonic in volume" in log


def test_a_smooth_potential_raises_no_warning(cu_run):
    phase = cu_run.phase()
    assert phase["checks"]["free_energy_monotonic"]["ok"] and phase["checks"]["mode_jumps"] == []
    assert phase["checks"]["imaginary_modes"] == [] and phase["checks"]["symmetry_kept"]
    assert phase["checks"]["eos_max_relative_residual"] < 1e-3


def test_volume_range_too_small_is_said_and_curves_stop(tmp_path):
    res = run_qha(bulk("Cu", "fcc", a=3.6), EMT(), output_dir=tmp_path / "narrow",
                  **{**CU, "volumes": "-0.01:0.01:5", "tmax": 800.0})
    phase = res.phase()
    stop = phase["pressures"][0]["volume_left_range_at_K"]
    assert stop is not None and 100 < stop < 800
    assert any("leaves the sampled range" in w for w in phase["warnings"])
    assert phase["curves"]["temperatures_K"][-1] < stop
    t, _, g = res.gibbs()
    assert np.isnan(g[0][t >= stop]).all() and np.isfinite(g[0][t < stop - 10]).all()


# ---------------------------------------------------------------------------------------------------------
# phase boundaries
# ---------------------------------------------------------------------------------------------------------


def test_phase_boundary_of_hand_made_free_energies():
    t = np.linspace(0, 1000, 11)
    p = np.linspace(0, 100, 21)
    P, T = np.meshgrid(p, t, indexing="ij")
    g_a = -5.0 + 0.010 * P - 1e-4 * T  # eV/atom; dG/dP = V, dG/dT = -S
    g_b = -4.5 + 0.002 * P - 2e-4 * T
    # G_a = G_b  <=>  0.5 - 0.008 P - 1e-4 T = 0  <=>  P = (0.5 - 1e-4 T) / 0.008
    expected = (0.5 - 1e-4 * t) / 0.008
    np.testing.assert_allclose(phase_boundary(t, p, g_a, g_b), expected, rtol=1e-12)
    # no crossing in the range: NaN
    assert np.isnan(phase_boundary(t, p, g_a, g_a + 1.0)).all()


def test_static_transition_pressure_against_murnaghan_enthalpies():
    from scipy.optimize import brentq

    from phonopy.qha.eos import get_eos

    murnaghan = get_eos("murnaghan")
    gpa = _gpa()
    a = np.array([-5.00, 150.0 / gpa, 4.0, 20.0])  # E0 eV, B0 eV/Å^3, B', V0 Å^3 (per cell of 2 atoms)
    b = np.array([-4.90, 170.0 / gpa, 4.5, 18.0])
    va = np.linspace(0.85, 1.05, 11) * a[3]
    vb = np.linspace(0.85, 1.05, 11) * b[3]

    def enthalpy(params, pressure):  # Murnaghan, analytically: H(P) = E0 + V0 B0/(B'-1) [(1 + B'P/B0)^((B'-1)/B') - 1]
        e0, b0, bp, v0 = params
        x = pressure / gpa
        return e0 + v0 * b0 / (bp - 1) * ((1 + bp * x / b0) ** ((bp - 1) / bp) - 1)

    expected = brentq(lambda pr: enthalpy(b, pr) - enthalpy(a, pr), 0.0, 200.0)
    got = static_transition_pressure(va, murnaghan(va, a), 2, vb, murnaghan(vb, b), 2, eos="murnaghan")
    assert got == pytest.approx(expected, rel=1e-4)
    assert static_transition_pressure(va, murnaghan(va, a), 2, va, murnaghan(va, a) + 1.0, 2, eos="murnaghan") is None


def test_two_phases_give_a_boundary_with_the_static_pressure_beside_it(tmp_path):
    # fcc and hcp copper under EMT: a real pair of phases of one composition (tiny settings; the numbers are not
    # the point, the plumbing is: both phases computed, G tables on one grid, the boundary and its plot)
    hcp = bulk("Cu", "hcp", a=2.55, c=4.16)
    res = run_qha([bulk("Cu", "fcc", a=3.6), hcp], EMT(), labels=["fcc", "hcp"], output_dir=tmp_path / "two",
                  pressures="0:20:10", **{**CU, "supercell": [2, 2, 2], "tmax": 200.0})
    assert res.labels == ["fcc", "hcp"]
    (b,) = res.summary["phase_boundaries"]
    assert b["phases"] == ["fcc", "hcp"] and "static_transition_pressure_GPa" in b
    t, p, g_fcc = res.gibbs("fcc")
    _, _, g_hcp = res.gibbs("hcp")
    assert p.tolist() == [0.0, 10.0, 20.0]
    expected = phase_boundary(t, p, g_fcc, g_hcp)
    got = np.array([np.nan if x is None else x for x in b["pressure_GPa"]], dtype=float)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got[np.isfinite(got)], expected[np.isfinite(expected)])
    assert (tmp_path / "two" / "phase_boundary.png").is_file()
    assert (tmp_path / "two" / "fcc" / "e-v.dat").is_file() and (tmp_path / "two" / "hcp" / "e-v.dat").is_file()


# ---------------------------------------------------------------------------------------------------------
# user errors
# ---------------------------------------------------------------------------------------------------------


def test_volume_grid_parser():
    assert parse_volume_grid("-0.02:0.02:5") == pytest.approx([-0.02, -0.01, 0.0, 0.01, 0.02])
    assert parse_volume_grid([0.02, -0.02, 0.0, 0.01, -0.01]) == pytest.approx([-0.02, -0.01, 0.0, 0.01, 0.02])
    for bad, fragment in (("-0.02:0.02:3", "at least 5"), ("a:b:c", "not understood"), ("-0.6:0.1:6", "between -0.5 and 1"),
                          ("0:1:2.5", "not understood"), ("bad", r"not understood; write start:stop:count")):
        with pytest.raises(InputError, match=fragment):
            parse_volume_grid(bad)


class NoStress(EMT):
    implemented_properties = ["energy", "free_energy", "forces"]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"volumes": "-0.02:0.02:3"}, "at least 5"),
    ({"volumes": "-0.02:0.02:5", "strains": "-0.01:0.01:5"}, "not both"),
    ({"eos": "bm3"}, "Unknown equation of state"),
    ({"tmax": -5.0}, "tmax"),
    ({"tstep": 0.0}, "tstep"),
    ({"pressures": "x"}, "pressures"),
    ({"supercell": "2 2"}, "supercell"),
])
def test_bad_settings_fail_before_any_work(tmp_path, kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        run_qha(bulk("Cu", "fcc", a=3.6), EMT(), output_dir=tmp_path / "x", **{**CU, **kwargs})
    assert not (tmp_path / "x").exists()


def test_molecule_and_model_without_stress_are_refused():
    from ase.build import molecule

    with pytest.raises(InputError, match="3D-periodic"):
        run_qha(molecule("H2O"), EMT(), progress=False)
    with pytest.raises(InputError, match="no stress"):
        run_qha(bulk("Cu", "fcc", a=3.6), NoStress(), progress=False)


def test_nac_from_a_born_file_is_used_at_every_volume(tmp_path):
    # the plumbing only (EMT has no polar crystal; the NAC physics is tested in test_nac.py): a BORN file is read
    # and symmetrised at every volume (one copper atom: charge neutrality makes Z* zero) and recorded
    born = tmp_path / "BORN"
    born.write_text("14.399652\n2.0 0 0 0 2.0 0 0 0 2.0\n0 0 0 0 0 0 0 0 0\n")
    res = run_qha(bulk("Cu", "fcc", a=3.6), EMT(), born_file=born, output_dir=tmp_path / "nac", **CU)
    assert res.summary["settings"]["nac"] is True and res.summary["settings"]["born_file"] == str(born)
    assert "NAC (gonze) at every volume" in (tmp_path / "nac" / "qha.log").read_text()
    with pytest.raises(InputError, match="BORN file"):
        run_qha(bulk("Cu", "fcc", a=3.6), EMT(), born_file=tmp_path / "nope", **CU)



def test_a_length_mesh_is_one_regular_mesh_at_every_volume():
    """A mesh given as a length becomes numbers once (on the V0 cell) and serves all volumes: phonopy's length
    rule applied at each volume would give 10 at the smallest and 9 at the largest volume of this grid (a
    jump of F_vib(V) between grids)."""
    from phonopy.phonon.grid import length2mesh

    length = 19.7
    res = run_qha(bulk("Cu", "fcc", a=3.6), EMT(), output_dir=None, **{**CU, "volumes": "-0.08:0.08:5", "mesh": length})
    phase = res.phase()
    v0 = np.array(phase["structure"]["unitcell_V0"]["cell"])
    per_volume = {f: length2mesh(length, v0 * (1 + f) ** (1 / 3)).tolist() for f in (-0.08, 0.0, 0.08)}
    assert per_volume[-0.08] != per_volume[0.08]  # the length rule would change the grid across the volumes
    assert phase["mesh_numbers"] == per_volume[0.0]
    assert not phase["checks"]["mode_jumps"] and phase["checks"]["free_energy_monotonic"]["ok"]
