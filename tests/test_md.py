"""MD and electric-enthalpy MD (workflows.md, workflows.efield): physics, restarts, loops, user errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT
from ase.io import read

from mattersim.errors import InputError
from workflows.efield import (E_PER_A2_TO_UC_PER_CM2, FieldCalculator, PerovskiteCells, parse_field, pe_loop,
                              polarization_change, supercell_charges)
from workflows.md import MDResult, read_series, run_md


def _cu3au() -> Atoms:
    """L1_2 Cu3Au (4 atoms): optical modes at Gamma, every atom at an inversion centre (no forces)."""
    return Atoms("AuCu3", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
                 cell=np.eye(3) * 3.75, pbc=True)


def _asr_charges(n: int, seed: int = 1) -> np.ndarray:
    """Non-symmetric Z* (n, 3, 3) that sum to zero (charge neutrality)."""
    z = np.random.default_rng(seed).normal(size=(n, 3, 3))
    return z - z.mean(axis=0)


class _Interrupt(Exception):
    pass


class FreshEMT(EMT):
    """EMT with a new neighbour list at every call: bitwise the same forces for the same positions, as an ML
    model that builds its graph at every call (EMT's reused list sums in another order: 1e-14 eV apart)."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, ["numbers", *system_changes])


def _stop_after(monkeypatch, limit: int) -> None:
    """FreshEMT raises after ``limit`` evaluations (a run killed in the middle; the model stays the same)."""
    count = [0]
    original = FreshEMT.calculate

    def calculate(self, *args, **kwargs):
        count[0] += 1
        if count[0] > limit:
            raise _Interrupt()
        original(self, *args, **kwargs)

    monkeypatch.setattr(FreshEMT, "calculate", calculate)


class _MovingCharges:
    """A Z* predictor that depends on the positions (so that born_every matters), neutral by construction."""

    def __init__(self):
        self.calls = 0

    def predict_dielectric(self, atoms):
        self.calls += 1
        z0 = _asr_charges(len(atoms), seed=3)
        scale = 1.0 + 0.2 * np.sin(atoms.positions[:, 0])[:, None, None]
        z = z0 * scale
        return z - z.mean(axis=0), np.eye(3) * 5.0


# --------------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------------


def test_schedules_units_and_shapes():
    s = parse_field("sin:Emax=4MV/cm,period=200ps,axis=z")
    assert s.amplitude == pytest.approx(0.04) and s.period == pytest.approx(2e5)  # V/Å, fs
    assert s.field(0.0) == pytest.approx([0, 0, 0.04])
    assert s.field(5e4)[2] == pytest.approx(0.0, abs=1e-15) and s.field(1e5)[2] == pytest.approx(-0.04)
    tri = parse_field("tri:Emax=1V/A,period=4fs,axis=1 1 0")
    assert tri.axis == pytest.approx([2 ** -0.5, 2 ** -0.5, 0])
    assert tri.magnitude(np.array([0.0, 1.0, 2.0, 3.0, 4.0])) == pytest.approx([1, 0, -1, 0, 1])
    steps = parse_field("steps:E=0;1;2 kV/cm,duration=1ps,axis=x")
    assert steps.magnitude(np.array([0.0, 999.0, 1000.0, 2500.0, 1e6])) == pytest.approx([0, 0, 1e-5, 2e-5, 2e-5])
    const = parse_field("const:E=100MV/cm,axis=y")
    assert const.field(123.0) == pytest.approx([0, 1.0, 0])  # 1 V/Å = 100 MV/cm
    assert parse_field("const:E=0V/A,axis=z").zero


@pytest.mark.parametrize("spec, words", [
    ("sin:Emax=4,period=200ps,axis=z", "unit"),
    ("sin:Emax=4MV/cm,axis=z", "missing period"),
    ("sin:Emax=4MV/cm,period=2ps,axis=w", "axis"),
    ("sine wave", "not a field schedule"),
    ("const:E=1MV/cm,axis=z,phase=3", "unknown phase"),
    ("sin:Emax=4MV/cm,period=-2ps,axis=z", "positive"),
])
def test_schedule_errors_name_the_problem(spec, words):
    with pytest.raises(InputError, match=words):
        parse_field(spec)


# --------------------------------------------------------------------------------------------------
# field forces: index convention, supercells
# --------------------------------------------------------------------------------------------------


def test_field_force_uses_the_first_index_as_field_direction():
    atoms = _cu3au()
    z = np.zeros((4, 3, 3))
    z[0, 0, 2], z[1, 0, 2] = 2.0, -2.0  # a field along x pushes atoms 0/1 along z (born[k, field, displacement])
    calc = FieldCalculator(EMT(), parse_field("const:E=0.1V/A,axis=x"), z)
    atoms.calc = calc
    f = atoms.get_forces()
    assert calc.results["field_forces"] == pytest.approx(np.array([[0, 0, 0.2], [0, 0, -0.2], [0, 0, 0], [0, 0, 0]]))
    base = EMT().get_forces(atoms.copy())
    assert f - base == pytest.approx(calc.results["field_forces"], abs=1e-12)


def test_charges_that_come_with_the_forces_cost_no_extra_call():
    """A multi-task model gives Z* in its results: the field uses them, every ``born_every`` steps."""
    from workflows.nac import find_predictor

    z0 = _asr_charges(4, seed=2)

    class WithCharges(EMT):
        implemented_properties = [*EMT.implemented_properties, "born_effective_charges", "dielectric_tensor"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, ["energy", "forces"], system_changes)
            self.results["born_effective_charges"] = z0 * (1 + atoms.positions[0, 0])
            self.results["dielectric_tensor"] = np.eye(3)

    base = WithCharges()
    predictor = find_predictor(base)
    calls = []
    predictor.predict_dielectric = lambda atoms: calls.append(1)  # must not be needed
    calc = FieldCalculator(base, parse_field("const:E=0.1V/A,axis=z"), predictor, born_every=2)
    atoms = _cu3au()
    atoms.calc = calc
    for step in range(3):
        calc.set_time(step, step * 1.0)
        atoms.positions[0, 0] = 0.01 * step
        atoms.get_forces()
        assert calc.born_step == 2 * (step // 2)
    assert calc.born == pytest.approx(z0 * 1.02) and not calls


def test_supercell_charges_follow_the_atoms_in_any_order():
    unit = _cu3au()
    z = _asr_charges(4)
    sc = unit.repeat((2, 1, 1))
    order = np.random.default_rng(0).permutation(len(sc))
    shuffled = sc[order]
    got = supercell_charges(unit, z, shuffled)
    assert got == pytest.approx(np.tile(z, (2, 1, 1))[order])
    with pytest.raises(InputError, match="not a supercell"):
        supercell_charges(unit, z, bulk("Cu", "fcc", a=3.6, cubic=True))


# --------------------------------------------------------------------------------------------------
# physics
# --------------------------------------------------------------------------------------------------


def test_zero_field_gives_exactly_the_plain_trajectory(tmp_path):
    atoms = _cu3au()
    plain = run_md(atoms, EMT(), ensemble="nvt", temperature=500, timestep=2, steps=40, supercell="2 2 2", every=10,
                   output_dir=tmp_path / "plain")
    field = run_md(atoms, EMT(), ensemble="nvt", temperature=500, timestep=2, steps=40, supercell="2 2 2", every=10,
                   efield="const:E=0MV/cm,axis=z", born=_asr_charges(4), output_dir=tmp_path / "field")
    a, b = read(tmp_path / "plain" / "trajectory.extxyz", ":"), read(tmp_path / "field" / "trajectory.extxyz", ":")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert np.array_equal(x.positions, y.positions) and np.array_equal(x.get_momenta(), y.get_momenta())
    assert np.array_equal(plain.series["conserved_eV"], field.series["conserved_eV"])


def test_static_field_linear_response_matches_the_gamma_force_constants():
    """Relaxed under a small field, the ions move by K^-1 Z^T E (K from phonopy, independently)."""
    from ase.optimize import BFGS
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    atoms = _cu3au()
    z = _asr_charges(4, seed=7)
    # Gamma force constants: phonopy with the unit cell as supercell, +- displacements
    ph = Phonopy(PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell.array,
                              scaled_positions=atoms.get_scaled_positions()), supercell_matrix=np.eye(3, dtype=int))
    ph.generate_displacements(distance=0.005, is_plusminus=True)
    forces = []
    for sc in ph.supercells_with_displacements:
        a = Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
        a.calc = EMT()
        forces.append(a.get_forces())
    ph.forces = np.array(forces)
    ph.produce_force_constants()
    k = ph.force_constants.transpose(0, 2, 1, 3).reshape(12, 12)
    k = 0.5 * (k + k.T)
    w, v = np.linalg.eigh(k)
    keep = np.argsort(np.abs(w))[3:]  # drop the three uniform translations (zero modes)
    k_inv = (v[:, keep] / w[keep]) @ v[:, keep].T
    efield = np.array([0.004, -0.002, 0.003])  # V/Å
    f_field = np.einsum("kij,i->kj", z, efield).ravel()
    expected = (k_inv @ f_field).reshape(4, 3)
    relaxed = atoms.copy()
    relaxed.calc = FieldCalculator(EMT(), parse_field(f"const:E={np.linalg.norm(efield)}V/A,axis="
                                                      f"{' '.join(map(str, efield))}"), z)
    BFGS(relaxed, logfile=None).run(fmax=1e-7, steps=500)
    u = relaxed.positions - atoms.positions
    u -= u.mean(axis=0)
    assert np.abs(expected).max() > 1e-3  # a measurable response
    assert u == pytest.approx(expected, rel=0.01, abs=0.01 * np.abs(expected).max())
    dp = polarization_change(relaxed, atoms, z)
    dp_expected = np.einsum("kij,kj->i", z, expected) / atoms.get_volume() * E_PER_A2_TO_UC_PER_CM2
    assert dp == pytest.approx(dp_expected, rel=0.01)


def test_nve_with_static_field_conserves_the_electric_enthalpy(tmp_path):
    atoms = _cu3au()
    z = _asr_charges(4, seed=5)
    common = dict(ensemble="nve", temperature=600, timestep=2, steps=400, supercell="2 2 2", every=5)
    free = run_md(atoms, EMT(), output_dir=tmp_path / "free", **common)
    driven = run_md(atoms, EMT(), efield="const:E=0.2V/A,axis=1 2 3", born=z, output_dir=tmp_path / "field",
                    **common)
    frames = read(tmp_path / "field" / "trajectory.extxyz", ":")
    s = driven.series
    # W from the run equals the closed form for a static field and fixed Z*: sum_k (Z*_k^T E).(r_k - r_k0)
    zs = np.tile(z, (8, 1, 1))
    efield = parse_field("const:E=0.2V/A,axis=1 2 3").field(0.0)
    u = frames[-1].positions - frames[0].positions  # no atom crosses a boundary in 0.8 ps of fcc at 600 K
    closed = float(np.sum(np.einsum("kij,i->kj", zs, efield) * u))
    assert s["field_work_eV"][-1] == pytest.approx(closed, rel=1e-6)  # extxyz keeps positions to 1e-8 Å
    assert abs(closed) > 0.02  # the field did work: the test is not trivially satisfied
    # E_kin + E_pot - W is conserved as well as E_kin + E_pot without a field
    spread_field = np.ptp(s["ekin_eV"] + s["epot_eV"] - s["field_work_eV"])
    spread_free = np.ptp(free.series["conserved_eV"])
    assert spread_field < 2.0 * spread_free + 1e-4
    assert np.ptp(s["ekin_eV"] + s["epot_eV"]) > 5 * spread_field  # without W it is not conserved


def test_polarization_is_the_born_weighted_displacement(tmp_path):
    atoms = _cu3au()
    z = _asr_charges(4, seed=9)
    r = run_md(atoms, EMT(), ensemble="nvt", temperature=300, timestep=2, steps=30, supercell="2 1 1", every=30,
               efield="const:E=0.02V/A,axis=z", born=z, output_dir=tmp_path / "p")
    frames = read(tmp_path / "p" / "trajectory.extxyz", ":")
    expected = polarization_change(frames[-1], frames[0], np.tile(z, (2, 1, 1)))
    # extxyz keeps positions to 1e-8 Å: 1e-8 Å x |Z*| / V x 1602 is below 1e-5 μC/cm²
    assert [r.series[f"P_{c}_uC_cm2"][-1] for c in "xyz"] == pytest.approx(expected, abs=1e-5)
    assert np.abs(expected).max() > 0.01


def test_polarization_from_a_reference_is_the_same_in_any_supercell(tmp_path):
    """An atom at z = 0 in the reference and at z = -0.05 in the structure is one atom, not two repeats apart."""
    from ase.build import make_supercell

    from workflows.efield import reference_in_supercell

    unit = _perovskite(1)
    polar = unit.copy()
    polar.set_scaled_positions(unit.get_scaled_positions() + np.array([[0, 0, 0], [0, 0, 0.02]] + [[0, 0, -0.05]] * 3))
    z = np.array([np.eye(3) * q for q in (2.7, 7.2, -2.0, -2.0, -5.9)])
    p_unit = polarization_change(polar, unit, z)
    cell = make_supercell(polar, 2 * np.eye(3, dtype=int))
    ref = reference_in_supercell(polar, unit, cell)
    assert polarization_change(cell, ref, np.tile(z, (8, 1, 1))) == pytest.approx(p_unit, rel=1e-12)
    assert p_unit[2] > 10.0


def test_batio3_reference_gives_the_textbook_polarization():
    """P_s = (1/V) sum_k Z_k dz_k c for a tetragonal cell with diagonal Z*, from the case study's helpers."""
    from benchmarks.ferroelectric import centrosymmetric, perovskite

    polar = perovskite(4.0, 4.1, 0.02, -0.03)
    ref = centrosymmetric(polar)
    assert ref.get_scaled_positions()[:, 2] == pytest.approx([0, 0.5, 0, 0.5, 0.5])
    q = np.array([2.7, 7.2, -2.0, -2.0, -5.9])
    z = np.array([np.eye(3) * x for x in q])
    dz = np.array([0, 0.02, -0.03, -0.03, -0.03]) * 4.1
    expected = np.sum(q * dz) / polar.get_volume() * E_PER_A2_TO_UC_PER_CM2
    assert polarization_change(polar, ref, z) == pytest.approx([0, 0, expected], abs=1e-9)


# --------------------------------------------------------------------------------------------------
# restarts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ensemble, thermostat, field", [
    ("nvt", "nose-hoover", None),
    ("nvt", "langevin", None),
    ("npt", "nose-hoover", None),
    ("nvt", "nose-hoover", "sin:Emax=0.05V/A,period=40fs,axis=z"),
])
def test_restart_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, ensemble, thermostat, field):
    atoms = _cu3au()
    common = dict(ensemble=ensemble, thermostat=thermostat, temperature=400, timestep=2, steps=50, supercell="2 1 1",
                  every=5, checkpoint_every=10, pressure=0.5 if ensemble == "npt" else 0.0, seed=4,
                  efield=field, born_every=3)
    ref_born = _MovingCharges() if field else None
    whole = run_md(atoms, FreshEMT(), output_dir=tmp_path / "whole", born=ref_born, **common)
    with monkeypatch.context() as patch:
        _stop_after(patch, 27)
        with pytest.raises(_Interrupt):
            run_md(atoms, FreshEMT(), output_dir=tmp_path / "cut", born=_MovingCharges() if field else None, **common)
    assert json.loads(str(np.load(tmp_path / "cut" / "checkpoint.npz")["state"]))["step"] == 20
    again = run_md(atoms, FreshEMT(), output_dir=tmp_path / "cut", born=_MovingCharges() if field else None, **common)
    a, b = read(tmp_path / "whole" / "trajectory.extxyz", ":"), read(tmp_path / "cut" / "trajectory.extxyz", ":")
    assert len(a) == len(b) == 11
    for x, y in zip(a, b):
        assert np.array_equal(x.positions, y.positions) and np.array_equal(x.cell.array, y.cell.array)
        assert np.array_equal(x.get_momenta(), y.get_momenta())
    for name, col in whole.series.items():
        assert np.array_equal(col, again.series[name], equal_nan=True), name
    if field:
        assert again.summary["results"]["born_evaluations"] < whole.summary["results"]["born_evaluations"] + 1


def test_a_finished_run_is_extended_and_other_settings_are_refused(tmp_path):
    atoms = _cu3au()
    run_md(atoms, FreshEMT(), temperature=300, timestep=2, steps=20, every=5, output_dir=tmp_path / "r")
    longer = run_md(atoms, FreshEMT(), temperature=300, timestep=2, steps=30, every=5, output_dir=tmp_path / "r")
    whole = run_md(atoms, FreshEMT(), temperature=300, timestep=2, steps=30, every=5, output_dir=tmp_path / "w")
    assert np.array_equal(longer.series["etot_eV"], whole.series["etot_eV"]) and len(longer.series["step"]) == 7
    with pytest.raises(InputError, match="differs in: temperature_K"):
        run_md(atoms, FreshEMT(), temperature=310, timestep=2, steps=30, every=5, output_dir=tmp_path / "r")
    with pytest.raises(InputError, match="at step 30 already"):
        run_md(atoms, FreshEMT(), temperature=300, timestep=2, steps=10, every=5, output_dir=tmp_path / "r")
    with pytest.raises(InputError, match="the structure, the model"):  # another model
        run_md(atoms, EMT(), temperature=300, timestep=2, steps=30, every=5, output_dir=tmp_path / "r")
    loaded = MDResult.load(tmp_path / "r")
    assert loaded.summary["results"]["steps_done"] == 30 and len(loaded.series["time_ps"]) == 7


@pytest.mark.parametrize("ensemble", ["nvt", "npt"])
def test_a_model_without_free_energy_gets_the_same_conserved_quantity(tmp_path, ensemble):
    """ASE's conserved energy asks for the free energy, which CHGNet does not give: the same number without it."""
    from ase.calculators.calculator import PropertyNotImplementedError

    class NoFreeEnergy(FreshEMT):
        implemented_properties = ["energy", "forces", "stress"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            self.results.pop("free_energy", None)

    probe = _cu3au()
    probe.calc = NoFreeEnergy()
    with pytest.raises(PropertyNotImplementedError):
        probe.get_potential_energy(force_consistent=True)
    common = dict(ensemble=ensemble, temperature=300, timestep=2, steps=20, every=5, pressure=0.1 if ensemble == "npt" else 0)
    a = run_md(_cu3au(), FreshEMT(), output_dir=tmp_path / "a", **common)
    b = run_md(_cu3au(), NoFreeEnergy(), output_dir=tmp_path / "b", **common)
    assert b.series["conserved_eV"] == pytest.approx(a.series["conserved_eV"], rel=0, abs=1e-9)


# --------------------------------------------------------------------------------------------------
# loops and local polarization
# --------------------------------------------------------------------------------------------------


def test_pe_loop_finds_coercive_field_and_remanence_of_a_known_loop():
    schedule = parse_field("sin:Emax=4MV/cm,period=10ps,axis=z")
    t = np.linspace(0, 3e4, 3001)  # 3 cycles, fs
    e = schedule.magnitude(t) / 0.01  # MV/cm
    rising = np.gradient(e) > 0
    ec, ps, w = 1.5, 30.0, 0.4
    p = np.where(rising, ps * np.tanh((e - ec) / w), ps * np.tanh((e + ec) / w))
    loop = pe_loop(t, p, schedule)
    assert loop["coercive_field_descending"] == pytest.approx(-ec, abs=0.02)
    assert loop["coercive_field_ascending"] == pytest.approx(ec, abs=0.02)
    assert loop["remanent_polarization_descending"] == pytest.approx(ps * np.tanh(ec / w), rel=0.01)
    assert loop["remanent_polarization_ascending"] == pytest.approx(-ps * np.tanh(ec / w), rel=0.01)
    assert loop["coercive_asymmetry"] < 0.02 and loop["switched"] and loop["cycles_used"] == [0, 1, 2]
    assert max(loop["polarization_std"]) < 0.5
    shifted = pe_loop(t, p + 5.0, schedule)  # an imprinted loop is asymmetric
    assert shifted["remanent_asymmetry"] > 0.2
    assert pe_loop(t, p, parse_field("const:E=1MV/cm,axis=z")) is None
    gap = (t < 1e4) | (t > 2e4)  # no samples in the second cycle: it is left out, and said so
    assert pe_loop(t[gap], p[gap], schedule)["cycles_used"] == [0, 2]


def _perovskite(n: int = 2) -> Atoms:
    cubic = Atoms("BaTiO3", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
                  cell=np.eye(3) * 4.0, pbc=True)
    return cubic.repeat((n, n, n))


def test_local_polarization_averages_to_the_global_one():
    ref = _perovskite(2)
    cells = PerovskiteCells(ref)
    assert cells.b_symbol == "Ti" and cells.a_symbol == "Ba" and len(cells.b_index) == 8
    rng = np.random.default_rng(2)
    z = _asr_charges(len(ref), seed=11)
    u = rng.normal(scale=0.05, size=(len(ref), 3))
    local = cells.local(u, z, ref.get_volume())
    moved = ref.copy()
    moved.positions += u
    assert local.mean(axis=0) == pytest.approx(polarization_change(moved, ref, z), rel=1e-10)
    # a uniform Ti shift along z polarizes every cell alike
    u = np.zeros((len(ref), 3))
    u[ref.numbers == 22, 2] = 0.1
    zt = np.zeros((len(ref), 3, 3))
    zt[ref.numbers == 22] = np.eye(3) * 7.0
    local = cells.local(u, zt, ref.get_volume())
    assert local[:, 2] == pytest.approx(7.0 * 0.1 / 64.0 * E_PER_A2_TO_UC_PER_CM2)
    with pytest.raises(InputError, match="ABO3 perovskite"):
        PerovskiteCells(_cu3au())


def _springs(ref):
    class Springs(EMT):  # EMT has no Ba/Ti/O: a stiff harmonic crystal around the reference
        implemented_properties = ["energy", "free_energy", "forces", "stress"]

        def calculate(self, atoms=None, properties=None, system_changes=None):
            self.atoms = atoms.copy()
            u = atoms.positions - ref.positions
            self.results = {"energy": float(200.0 * np.sum(u ** 2)), "free_energy": float(200.0 * np.sum(u ** 2)),
                            "forces": -400.0 * u, "stress": np.zeros(6)}

    return Springs


def test_local_polarization_frames_survive_an_extension(tmp_path):
    """Local maps are appended frame by frame; a continued run cuts them back to its checkpoint."""
    from ase.build import make_supercell

    unit = _perovskite(1)
    ref = make_supercell(unit, 2 * np.eye(3, dtype=int))
    z = np.array([np.eye(3) * q for q in (2.7, 7.2, -2.0, -2.0, -5.9)])
    common = dict(ensemble="nvt", temperature=10, timestep=0.5, every=2, checkpoint_every=6, supercell="2 2 2",
                  efield="sin:Emax=0.2V/A,period=10fs,axis=z", born=z)
    run_md(unit, _springs(ref)(), steps=40, output_dir=tmp_path / "a", **common)
    run_md(unit, _springs(ref)(), steps=20, output_dir=tmp_path / "b", **common)
    run_md(unit, _springs(ref)(), steps=40, maps_at=[0.0, 0.01], output_dir=tmp_path / "b", **common)  # new maps
    a, b = np.load(tmp_path / "a" / "local_polarization.npz"), np.load(tmp_path / "b" / "local_polarization.npz")
    assert a["polarization_uC_cm2"].shape == (21, 8, 3)
    assert np.array_equal(a["polarization_uC_cm2"], b["polarization_uC_cm2"]) and np.array_equal(a["time_ps"], b["time_ps"])


def test_field_md_of_a_perovskite_writes_loop_and_maps(tmp_path):
    """Plumbing of a field run end to end (EMT is not a ferroelectric: no switching is asked)."""
    from ase.build import make_supercell

    unit = _perovskite(1)
    ref = make_supercell(unit, 2 * np.eye(3, dtype=int))  # the cell run_md simulates
    z = np.zeros((5, 3, 3))
    for k, q in enumerate([2.7, 7.2, -2.0, -2.0, -5.9]):
        z[k] = np.eye(3) * q
    z -= z.mean(axis=0)

    Springs = _springs(ref)
    # stiff springs (periods 13-37 fs) driven slowly (100 fs): a quasi-static linear response
    r = run_md(unit, Springs(), ensemble="nvt", temperature=1, timestep=0.5, steps=600, every=5,
               efield="sin:Emax=0.2V/A,period=100fs,axis=z", born=z,
               supercell="2 2 2", maps_at=[0.0, 0.1, 0.25], output_dir=tmp_path / "f")
    out = tmp_path / "f"
    for name in ("pe_loop.json", "pe_loop.png", "polarization.png", "local_polarization.png",
                 "local_polarization.npz", "md.png", "md.json"):
        assert (out / name).is_file(), name
    loop = json.loads((out / "pe_loop.json").read_text())
    assert loop["cycles_used"] == [0, 1, 2] and loop["unit_field"] == "V/A"
    data = np.load(out / "local_polarization.npz")
    series = read_series(out / "md.csv")
    assert data["polarization_uC_cm2"].mean(axis=1)[:, 2] == pytest.approx(series["P_z_uC_cm2"], rel=1e-6, abs=1e-9)
    # a linear response: P follows E in phase, with the slope of the springs, (1/V) sum_k Z_k^2 / k_spring
    assert np.corrcoef(series["E_z_V/A"], series["P_z_uC_cm2"])[0, 1] > 0.9  # ringing of the sudden start
    chi = np.sum(np.tile(z[:, 2, 2], 8) ** 2) / 400.0 / ref.get_volume() * E_PER_A2_TO_UC_PER_CM2
    slope = np.polyfit(series["E_z_V/A"], series["P_z_uC_cm2"], 1)[0]
    assert slope == pytest.approx(chi, rel=0.1)
    assert "coercive field (desc., asc.)" in dict(r.rows())


# --------------------------------------------------------------------------------------------------
# user errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    (dict(ensemble="nvx"), "choose one of nve, nvt, npt"),
    (dict(ensemble="npt", thermostat="langevin"), "nvt only"),
    (dict(ensemble="nvt", pressure=2.0), "needs ensemble npt"),
    (dict(timestep=-1.0), "positive time step"),
    (dict(every=0), "every = 0"),
    (dict(temperature=0.0), "positive temperature"),
    (dict(efield="const:E=1MV/cm,axis=z"), "predicts none"),
])
def test_user_errors(tmp_path, kwargs, words):
    with pytest.raises(InputError, match=words):
        run_md(_cu3au(), EMT(), steps=2, output_dir=tmp_path / "o", **kwargs)
