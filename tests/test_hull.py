"""Convex hulls under pressure (workflows.hull): transition pressures against the analytic common tangent,
hull distances against pymatgen on known enthalpies, chained and independent relaxations, flags, resume,
candidates and user errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from conftest import shared_path
from mattersim.errors import InputError
from workflows.hull import (GPA_TO_EV_A3, HullResult, _volume_flags, load_candidates, parse_system, prescale,
                            run_hull, transition_pressures)


class QuadraticEOS(Calculator):
    """Per-atom energy e(v) = e0 + B (v - v0)^2 / (2 v0) of each phase (keyed by formula and number of atoms),
    hydrostatic stress e'(v), no forces: under pressure P the relaxed volume is v0 (1 - P/B) and the enthalpy
    h(P) = e0 + v0 P - v0 P^2 / (2 B) per atom, exactly."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, phases: dict):
        super().__init__()
        self.phases = phases  # {(formula, n_atoms): (e0 eV/atom, v0 Å^3/atom, B eV/Å^3)}
        self.calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.calls += 1
        a = self.atoms
        e0, v0, b = self.phases[(a.get_chemical_formula(mode="hill"), len(a))]
        v = a.get_volume() / len(a)
        e = e0 + b * (v - v0) ** 2 / (2 * v0)
        de = b * (v - v0) / v0
        self.results = {"energy": len(a) * e, "free_energy": len(a) * e, "forces": np.zeros((len(a), 3)),
                        "stress": np.array([de, de, de, 0.0, 0.0, 0.0])}


def _h(params, pressure_gpa):
    e0, v0, b = params
    p = pressure_gpa * GPA_TO_EV_A3
    return e0 + v0 * p - v0 * p ** 2 / (2 * b)


def _cell(symbols, v_per_atom):
    n = len(Atoms(symbols))
    a = (v_per_atom * n) ** (1 / 3)
    return Atoms(symbols, cell=np.eye(3) * a, scaled_positions=[[k / n, 0.5 * (k % 2), 0.0] for k in range(n)], pbc=True)


# two copper "phases" (1- and 2-atom cells): the denser one, higher in energy, wins under pressure
CU_A = (-3.50, 12.0, 400 * GPA_TO_EV_A3)
CU_B = (-3.25, 11.0, 450 * GPA_TO_EV_A3)
UNARY = {("Cu", 1): CU_A, ("Cu2", 2): CU_B}


def test_transition_pressure_equals_the_common_tangent():
    cands = [("A", _cell("Cu", 13.0)), ("B", _cell("Cu2", 10.0))]
    res = run_hull(cands, QuadraticEOS(UNARY), pressures="0:100:20", fmax=1e-5, steps=400, primitive=False, progress=False)
    # independent: h_A(P) = h_B(P), a quadratic in P
    from scipy.optimize import brentq

    expected = brentq(lambda p: _h(CU_A, p) - _h(CU_B, p), 0.0, 100.0)
    assert 20 < expected < 80
    kinds = {(t["phase"], t["kind"]): t["pressure_GPa"] for t in res.summary["transitions"]}
    assert kinds[("B", "becomes stable")] == pytest.approx(expected, abs=0.01)
    assert kinds[("A", "becomes unstable")] == pytest.approx(expected, abs=0.01)
    assert res.stable(0.0) == ["A"] and res.stable(100.0) == ["B"]
    ranges = {ph["label"]: ph["stable_ranges_GPa"] for ph in res.summary["phases"]}
    assert ranges == {"A": [[0.0, pytest.approx(expected, abs=0.01)]], "B": [[pytest.approx(expected, abs=0.01), 100.0]]}
    # relaxed enthalpies are the analytic ones
    for label, params in (("A", CU_A), ("B", CU_B)):
        ph = next(p for p in res.summary["phases"] if p["label"] == label)
        np.testing.assert_allclose(ph["enthalpy_eV_per_atom"], [_h(params, p) for p in res.pressures], atol=1e-6)
        np.testing.assert_allclose(ph["volume_A3_per_atom"], [params[1] * (1 - p * GPA_TO_EV_A3 / params[2])
                                                               for p in res.pressures], rtol=1e-5)


BINARY = {("Cu", 1): (-3.5, 12.0, 0.9), ("Au", 1): (-3.0, 17.0, 1.1), ("AuCu", 2): (-3.40, 14.0, 1.0),
          ("AuCu3", 4): (-3.47, 12.8, 0.95), ("Au3Cu", 4): (-3.15, 15.8, 1.05), ("Au2Cu2", 4): (-3.30, 13.0, 1.0)}


def _binary_candidates():
    return [("Cu", _cell("Cu", 12.0)), ("Au", _cell("Au", 17.0)), ("CuAu", _cell("CuAu", 14.0)),
            ("Cu3Au", _cell("Cu3Au", 12.8)), ("CuAu3", _cell("CuAu3", 15.8)), ("CuAu-dense", _cell("Cu2Au2", 13.0))]


def test_hull_distances_and_stable_sets_equal_pymatgen_on_the_enthalpies():
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition

    cands = _binary_candidates()
    res = run_hull(cands, QuadraticEOS(BINARY), system="Cu-Au", pressures="0,50,100", fmax=1e-5, steps=400,
                   primitive=False, progress=False)
    for i, p in enumerate(res.pressures):
        entries = []
        for label, a in cands:
            params = BINARY[(a.get_chemical_formula(mode="hill"), len(a))]
            entries.append(PDEntry(Composition(a.get_chemical_formula()), len(a) * _h(params, p), name=label))
        pd = PhaseDiagram(entries)
        expected_stable = sorted(e.name for e in pd.stable_entries)
        assert sorted(res.stable(p)) == expected_stable
        for e in entries:
            assert res.distance(e.name)[i] == pytest.approx(pd.get_e_above_hull(e), abs=1e-6)
    # the dense CuAu polymorph overtakes the open one with pressure (smaller volume): the transition is where
    # their enthalpies per atom cross, although both lie far below the elements (the competitor of a stable
    # phase is its nearest polymorph, not only the other compositions)
    from scipy.optimize import brentq

    expected = brentq(lambda p: _h(BINARY[("AuCu", 2)], p) - _h(BINARY[("Au2Cu2", 4)], p), 0.0, 50.0)
    kinds = {(t["phase"], t["kind"]): t["pressure_GPa"] for t in res.summary["transitions"]}
    assert kinds[("CuAu-dense", "becomes stable")] == pytest.approx(expected, abs=0.01)
    assert kinds[("CuAu", "becomes unstable")] == pytest.approx(expected, abs=0.01)


def test_chained_and_independent_relaxations_agree_where_nothing_changes():
    cands = _binary_candidates()
    runs = {chain: run_hull(cands, QuadraticEOS(BINARY), system="Cu-Au", pressures="0:40:20", chain=chain, fmax=1e-5,
                            steps=400, primitive=False, progress=False) for chain in ("down", "up", "none")}
    for chain in ("up", "none"):
        for a, b in zip(runs["down"].summary["phases"], runs[chain].summary["phases"]):
            np.testing.assert_allclose(a["enthalpy_eV_per_atom"], b["enthalpy_eV_per_atom"], atol=1e-6)
            assert a["stable"] == b["stable"]


def test_outputs_round_trip_and_resume(tmp_path):
    cands = [("A", _cell("Cu", 13.0)), ("B", _cell("Cu2", 10.0))]
    calc = QuadraticEOS(UNARY)
    out = tmp_path / "hull"
    res = run_hull(cands, calc, pressures="0:100:50", fmax=1e-5, primitive=False, output_dir=out, progress=False)
    for name in ("hull.json", "hull.csv", "hull.log", "distance.png", "stability.png", "relaxed-50GPa.extxyz",
                 "relaxed/P-02.npz"):
        assert (out / name).is_file(), name
    loaded = HullResult.load(out)
    assert loaded.summary == json.loads((out / "hull.json").read_text())
    assert loaded.rows() == res.rows()
    assert "A,Cu,0.0," in (out / "hull.csv").read_text()
    import ase.io

    frames = ase.io.read(out / "relaxed-100GPa.extxyz", index=":")
    assert [f.info["label"] for f in frames] == ["A", "B"]
    n_calls = calc.calls
    again = run_hull(cands, calc, pressures="0:100:50", fmax=1e-5, primitive=False, output_dir=out, progress=False)
    assert calc.calls == n_calls  # every pressure's relaxations came from the stores
    assert again.summary["phases"] == res.summary["phases"]


# ---------------------------------------------------------------------------------------------------------
# flags and transition roots
# ---------------------------------------------------------------------------------------------------------


def test_a_collapsing_volume_is_flagged_and_a_smooth_one_is_not():
    p = np.linspace(0, 200, 11)
    v = 20.0 * (1 + 4 * p / 100.0) ** (-1 / 4)  # Murnaghan, B0 100 GPa, B' 4
    assert _volume_flags(p, v) == []
    collapsed = v.copy()
    collapsed[7] *= 0.6  # a model that collapses the phase at 140 GPa
    assert 7 in _volume_flags(p, collapsed) and not set(_volume_flags(p, collapsed)) - {7, 8}
    grows = v.copy()
    grows[3] = grows[2] * 1.05  # larger under more pressure
    assert 3 in _volume_flags(p, grows)


class Softening(QuadraticEOS):
    """Phase B (2-atom cells) softens below 10 Å^3/atom (near 41 GPa): e(v) goes on with the slope it has
    there and a small curvature (convex, smooth in slope), so under 60 GPa the volume drops to about 6 Å^3/atom,
    the way a model collapses a phase it was not trained to compress."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        e0, v0, b = CU_B
        v1, k = 10.0, 0.03
        v = a.get_volume() / len(a)
        if len(a) == 2 and v < v1:
            e1, d1 = e0 + b * (v1 - v0) ** 2 / (2 * v0), b * (v1 - v0) / v0
            e, de = e1 + d1 * (v - v1) + 0.5 * k * (v - v1) ** 2, d1 + k * (v - v1)
            self.results.update({"energy": 2 * e, "free_energy": 2 * e, "stress": np.array([de, de, de, 0, 0, 0.0])})


def test_flags_reach_the_result():
    cands = [("A", _cell("Cu", 13.0)), ("B", _cell("Cu2", 10.0))]
    res = run_hull(cands, Softening(UNARY), pressures="0:60:20", fmax=1e-4, primitive=False, progress=False)
    b = next(p for p in res.summary["phases"] if p["label"] == "B")
    assert b["volume_A3_per_atom"][-1] < 7.0 < 9.0 < b["volume_A3_per_atom"][-2]
    assert "volume jump" in " ".join(b["flags"][-1]) and not any(b["flags"][:-1])
    assert any(row[0] == "FLAG B" and "60 GPa" in row[1] for row in res.rows())


def test_transition_root_uses_the_slopes():
    p = np.array([0.0, 10.0, 20.0])
    # s = 3 - 0.01 P^2 crosses zero at sqrt(300) = 17.32 GPa: the cubic through values and slopes is exact
    roots = transition_pressures(p, 3.0 - 0.01 * p ** 2, -0.02 * p)
    assert roots == [pytest.approx(np.sqrt(300.0), abs=1e-9)]
    # linear interpolation of the same values would say 16.67 GPa: the slopes are what make it exact
    assert transition_pressures(p, 3.0 - 0.01 * p ** 2, np.full(3, np.nan)) == [pytest.approx(50 / 3, abs=1e-9)]
    # a window of stability narrower than the grid: (P - 13)^2 - 4 is negative only between 11 and 15 GPa,
    # positive at every grid pressure, so no crossing is seen (the meaning note says so)
    assert transition_pressures(p, (p - 13) ** 2 - 4, 2 * (p - 13)) == []


# ---------------------------------------------------------------------------------------------------------
# candidates and user errors
# ---------------------------------------------------------------------------------------------------------


def test_la_h_candidates_are_read_and_labelled():
    folder = shared_path("data", "structures", "La-H")
    cands = load_candidates([folder], parse_system("La-H"))
    labels = [lab for lab, _ in cands]
    assert len(cands) == 14 and "LaH10" in labels and "La" in labels and "C2-c" in labels
    lah10 = dict(cands)["LaH10"]
    assert lah10.get_chemical_formula() == "H40La4"
    assert load_candidates([folder], ["La"]) == [c for c in cands if c[0] == "La"]  # other systems skipped


def test_user_errors():
    with pytest.raises(InputError, match="not understood"):
        parse_system("La-Qq")
    cands = [("A", _cell("Cu", 13.0)), ("AuCu", _cell("CuAu", 14.0))]
    with pytest.raises(InputError, match="No elemental phase of Au"):
        run_hull(cands, QuadraticEOS(BINARY), system="Cu-Au", progress=False)
    with pytest.raises(InputError, match="No candidate structures"):
        run_hull([], QuadraticEOS(BINARY), progress=False)
    with pytest.raises(InputError, match="chain"):
        run_hull([("A", _cell("Cu", 13.0))], QuadraticEOS(UNARY), chain="sideways", progress=False)
    with pytest.raises(InputError, match="outside the system"):
        run_hull(cands + [("Au", _cell("Au", 17.0))], QuadraticEOS(BINARY), system="Cu", progress=False)
    with pytest.raises(InputError, match="does not exist"):
        load_candidates(["/nonexistent/folder"], ["La", "H"])


def test_volume_prescaling_starts_the_relaxations_near_the_pressure():
    cands = [("A", _cell("Cu", 13.0)), ("B", _cell("Cu2", 10.0))]
    calc = QuadraticEOS(UNARY)
    scaled, n = prescale([a for _, a in cands], calc, 80.0)
    assert n <= 4  # a first guess, then the secant on a nearly linear P(ln V)
    for (label, _), a, params in zip(cands, scaled, (CU_A, CU_B)):
        v = a.get_volume() / len(a)
        # within the pressure tolerance (10 % of P: 8 GPa, a few per cent of the volume at B ~ 400 GPa)
        assert v == pytest.approx(params[1] * (1 - 80.0 * GPA_TO_EV_A3 / params[2]), rel=0.03)
    steps = {}
    for flag in (True, False):
        res = run_hull(cands, QuadraticEOS(UNARY), pressures="80", fmax=1e-5, primitive=False, prescale_volume=flag,
                       progress=False)
        steps[flag] = sum(ph["steps"][0] for ph in res.summary["phases"])
        np.testing.assert_allclose([ph["enthalpy_eV_per_atom"][0] for ph in res.summary["phases"]],
                                   [_h(CU_A, 80.0), _h(CU_B, 80.0)], atol=1e-6)
    assert steps[True] < steps[False]


class FailsUnderPressure(QuadraticEOS):
    """QuadraticEOS whose 'B' polymorph (2-atom cells) returns NaN forces below 10.5 Å^3/atom, as a model
    outside its data does: above about 20 GPa its relaxation fails."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if len(self.atoms) == 2 and self.atoms.get_volume() / 2 < 10.5:
            self.results["forces"] = np.full((2, 3), np.nan)


def test_a_failed_relaxation_is_left_out_and_flagged_not_fatal():
    cands = [("A", _cell("Cu", 13.0)), ("B", _cell("Cu2", 10.0))]
    res = run_hull(cands, FailsUnderPressure(UNARY), pressures="0:60:20", fmax=1e-4, steps=300, primitive=False,
                   progress=False)
    b = next(ph for ph in res.summary["phases"] if ph["label"] == "B")
    failed = [i for i, f in enumerate(b["flags"]) if any("relaxation failed" in x for x in f)]
    assert failed and 0 not in failed  # B relaxes at 0 GPa; fails once compressed
    for i in failed:
        assert np.isnan(b["above_hull_eV_per_atom"][i]) and not b["stable"][i]
        assert res.stable(res.pressures[i]) == ["A"]  # the hull of the others is still built
    # at 0 GPa, where B relaxed, it is where the analytic enthalpy puts it
    assert b["enthalpy_eV_per_atom"][0] == pytest.approx(_h(CU_B, 0.0), abs=1e-6)
    assert not any(t["phase"] == "B" for t in res.summary["transitions"])  # no transition through a failed point


# ---------------------------------------------------------------------------------------------------------
# random structure search
# ---------------------------------------------------------------------------------------------------------


class CountingEMT(EMT):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def calculate(self, *args, **kwargs):
        self.calls += 1
        super().calculate(*args, **kwargs)


def _relaxed_fcc_energy(symbol: str) -> float:
    from ase.build import bulk
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS

    a = bulk(symbol, "fcc")
    a.calc = EMT()
    BFGS(FrechetCellFilter(a), logfile=None).run(fmax=1e-4, steps=200)
    return a.get_potential_energy() / len(a)


def test_random_search_finds_the_ground_state_and_resumes(tmp_path):
    pytest.importorskip("pyxtal")
    out = tmp_path / "search"
    calc = CountingEMT()
    res = run_hull([], calc, system="Cu", compositions=["Cu"], search=4, search_max_atoms=4, pressures="0",
                   seed=3, output_dir=out, progress=False)
    (found,) = res.summary["search"]["found"]
    assert found["label"] == "Cu-search-1" and res.stable(0.0) == ["Cu-search-1"]
    assert res.summary["search"]["relaxations"] == 4
    # the best of four random crystals relaxes to EMT's ground state, close-packed copper, to within the
    # relaxation's force threshold (0.05 eV/Å in the search, 0.02 in the hull)
    assert res.summary["phases"][0]["enthalpy_eV_per_atom"][0] == pytest.approx(_relaxed_fcc_energy("Cu"), abs=2e-3)
    assert (out / "search" / "P-00.npz").is_file()
    # rerun: the search and the hull relaxations come from the stores, no model call
    calc.calls = 0
    again = run_hull([], calc, system="Cu", compositions=["Cu"], search=4, search_max_atoms=4, pressures="0",
                     seed=3, output_dir=out, progress=False)
    assert calc.calls == 0 and again.summary["phases"] == res.summary["phases"]
    # another seed is another search
    other = run_hull([], CountingEMT(), system="Cu", compositions=["Cu"], search=1, search_max_atoms=4, pressures="0",
                     seed=4, progress=False)
    assert other.summary["search"]["relaxations"] == 1


def test_search_adds_to_given_candidates_and_checks_its_inputs():
    pytest.importorskip("pyxtal")
    from ase.build import bulk

    with pytest.raises(InputError, match="compositions to search"):
        run_hull([], EMT(), system="Cu", search=2, progress=False)
    with pytest.raises(InputError, match="outside the system"):
        run_hull([("Cu", bulk("Cu"))], EMT(), system="Cu", search=1, compositions=["CuAu"], progress=False)
    with pytest.raises(InputError, match="No elemental phase of Au"):
        run_hull([("Cu", bulk("Cu"))], EMT(), system="Cu-Au", search=1, compositions=["CuAu"], progress=False)
    with pytest.raises(InputError, match="search must be"):
        run_hull([("Cu", bulk("Cu"))], EMT(), search=-1, progress=False)
    # default compositions: those of the candidates; the searched phases join them
    res = run_hull([("fcc", bulk("Cu", "fcc", a=3.6))], EMT(), search=2, search_max_atoms=2, pressures="0",
                   progress=False)
    assert res.summary["search"]["compositions"] == [{"Cu": 1}]
    assert res.labels[0] == "fcc" and all(lab.startswith("Cu-search-") for lab in res.labels[1:])


# ---------------------------------------------------------------------------------------------------------
# finite-temperature hulls from QHA free energies
# ---------------------------------------------------------------------------------------------------------

# entropies per atom (eV/K) of the two copper phases: B, the denser one, has the larger entropy here, so
# temperature moves the transition to lower pressure
S_A, S_B = 1.0e-4, 2.5e-4
QHA_T = np.arange(0.0, 1001.0, 100.0)
QHA_P = np.arange(0.0, 100.1, 5.0)


def _fake_qha(calc, phases):
    """A QHA result whose G(T, P) = h(P) - S T per atom for each (label, formula, params, S)."""
    from mattersim.calculator import model_info
    from workflows.qha import QHARunResult

    docs = []
    for label, formula, params, s in phases:
        g = [[_h(params, p) - s * t for t in QHA_T] for p in QHA_P]
        docs.append({"label": label, "structure": {"formula": formula},
                     "gibbs_table": {"temperatures_K": QHA_T.tolist(), "pressures_GPa": QHA_P.tolist(), "G_eV_per_atom": g}})
    return QHARunResult(summary={"model": model_info(calc), "phases": docs})


def test_finite_temperature_transition_moves_as_the_free_energies_say(tmp_path):
    from scipy.optimize import brentq

    cands = [("A", _cell("Cu", 13.0)), ("B", _cell("Cu2", 10.0))]
    calc = QuadraticEOS(UNARY)
    qha = _fake_qha(calc, [("A", "Cu", CU_A, S_A), ("B", "Cu", CU_B, S_B)])
    static = brentq(lambda p: _h(CU_A, p) - _h(CU_B, p), 0.0, 100.0)
    for temperature in (0.0, 350.0, 800.0):
        res = run_hull(cands, calc, pressures="0:100:20", fmax=1e-5, steps=400, primitive=False, progress=False,
                       qha=qha, temperature=temperature)
        # independent: G_A(T, P) = G_B(T, P), i.e. h_A - h_B = (S_A - S_B) T
        expected = brentq(lambda p: _h(CU_A, p) - _h(CU_B, p) - (S_A - S_B) * temperature, 0.0, 100.0)
        kinds = {(t["phase"], t["kind"]): t["pressure_GPa"] for t in res.summary["transitions"]}
        assert kinds[("B", "becomes stable")] == pytest.approx(expected, abs=0.01)
        ph = {p["label"]: p for p in res.summary["phases"]}
        np.testing.assert_allclose(ph["B"]["gibbs_eV_per_atom"], [_h(CU_B, p) - S_B * temperature for p in res.pressures],
                                   atol=1e-9)
        np.testing.assert_allclose(ph["A"]["enthalpy_eV_per_atom"], [_h(CU_A, p) for p in res.pressures], atol=1e-6)
        ft = res.summary["finite_temperature"]
        assert ft["temperature_K"] == temperature and ft["phases_with_free_energy"] == ["A", "B"]
        assert ft["phases_static"] == [] and "zero-point" in ft["included"]
    assert expected < static - 10  # 800 K moved it by tens of GPa
    # between grid temperatures: linear in T, exact here
    res = run_hull(cands, calc, pressures="0:100:20", fmax=1e-5, steps=400, primitive=False, progress=False,
                   qha=qha, temperature=333.0, output_dir=tmp_path / "h")
    expected = brentq(lambda p: _h(CU_A, p) - _h(CU_B, p) - (S_A - S_B) * 333.0, 0.0, 100.0)
    assert res.summary["transitions"][0]["pressure_GPa"] == pytest.approx(expected, abs=0.01)
    assert "gibbs_eV_per_atom" in (tmp_path / "h" / "hull.csv").read_text().splitlines()[0]
    assert res.rows()[0][0] == "G at 333 K"


def test_finite_temperature_from_a_qha_folder_and_its_checks(tmp_path):
    cands = [("A", _cell("Cu", 13.0)), ("B", _cell("Cu2", 10.0))]
    calc = QuadraticEOS(UNARY)
    qha = _fake_qha(calc, [("B", "Cu", CU_B, S_B)])
    qha.save(tmp_path / "qha-B")
    res = run_hull(cands, calc, pressures="0:100:20", fmax=1e-5, steps=400, primitive=False, progress=False,
                   qha=[tmp_path / "qha-B"], temperature=300.0)
    ft = res.summary["finite_temperature"]
    assert ft["phases_with_free_energy"] == ["B"] and ft["phases_static"] == ["A"]  # mixed: said, and logged

    def fails(fragment, **kwargs):
        with pytest.raises(InputError, match=fragment):
            run_hull(cands, calc, pressures=kwargs.pop("pressures", "0:100:20"), primitive=False, progress=False, **kwargs)

    fails("needs free energies", temperature=300.0)
    fails("need a temperature", qha=qha)
    fails("outside its temperatures", qha=qha, temperature=2000.0)
    fails("covering them", qha=qha, temperature=300.0, pressures="0:200:20")
    fails("not a hull candidate", qha=_fake_qha(calc, [("C", "Cu", CU_B, S_B)]), temperature=300.0)
    fails("the hull candidate CuAu|is Au", qha=_fake_qha(calc, [("B", "Au", CU_B, S_B)]), temperature=300.0)
    fails("give each phase once", qha=[qha, qha], temperature=300.0)
    other = _fake_qha(calc, [("B", "Cu", CU_B, S_B)])
    other.summary["model"] = {"name": "another-model"}
    fails("one model", qha=other, temperature=300.0)
    holey = _fake_qha(calc, [("B", "Cu", CU_B, S_B)])
    holey.summary["phases"][0]["gibbs_table"]["G_eV_per_atom"][-1] = [None] * len(QHA_T)  # 100 GPa outside its volumes
    fails("no free energy at 300 K and 100 GPa", qha=holey, temperature=300.0)
