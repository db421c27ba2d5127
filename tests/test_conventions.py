"""Energy conventions: MP2020 corrections of hand-checked structures, conversion signs, and the E/F/S runner
comparing a corrected-energy model with raw references in the reference's convention."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes

from benchmarks.datasets import read_reference_file
from benchmarks.efs import run_efs
from mattersim import conventions, registry
from mattersim.conventions import check_convention, convention_offsets, mp2020_correction, mp2020_corrections
from mattersim.errors import InputError

# The MP2020 values (pymatgen's MP2020Compatibility.yaml, eV per atom of the corrected element), written out
# here by hand so that the test checks the labelling (GGA vs GGA+U, oxide vs none), not pymatgen against itself.
OXIDE, FLUORIDE, FE_GGA_U_OXIDE = -0.687, -0.462, -2.256


def _mgo():
    return bulk("MgO", "rocksalt", a=4.21, cubic=True)  # 4 Mg + 4 O


def _caf2():
    return bulk("CaF2", "fluorite", a=5.46)  # 1 Ca + 2 F


def _feo():
    return bulk("FeO", "rocksalt", a=4.33, cubic=True)  # 4 Fe + 4 O: GGA+U in MP's relax set


def _nial():
    return bulk("NiAl", "cesiumchloride", a=2.88)  # intermetallic: no anion, no U


def test_corrections_known_by_hand():
    assert mp2020_correction(_mgo()) == pytest.approx(4 * OXIDE, abs=1e-9)
    assert mp2020_correction(_caf2()) == pytest.approx(2 * FLUORIDE, abs=1e-9)
    assert mp2020_correction(_feo()) == pytest.approx(4 * OXIDE + 4 * FE_GGA_U_OXIDE, abs=1e-9)
    assert mp2020_correction(_nial()) == 0.0
    assert mp2020_correction(bulk("Si", "diamond", a=5.43)) == 0.0  # elements are never corrected
    # per atom, as the signed CHGNet errors: MgO -0.3435, CaF2 -0.308 eV/atom
    assert mp2020_correction(_mgo()) / 8 == pytest.approx(-0.3435)
    assert mp2020_correction(_caf2()) / 3 == pytest.approx(-0.308)


def test_fe_without_oxygen_is_plain_gga():
    # Fe in an intermetallic is a GGA calculation in MP: no U correction (labelling it GGA+U would be rejected
    # by pymatgen's U check or give a spurious -2.256 eV per Fe)
    feal = bulk("FeAl", "cesiumchloride", a=2.91)
    assert mp2020_correction(feal) == 0.0


def test_offsets_signs_and_rejections():
    structures = [_mgo(), _nial()]
    corr, errors = mp2020_corrections(structures)
    assert errors == {} and corr[1] == 0.0
    to_raw, _ = convention_offsets(structures, "mp2020", "raw")
    to_mp, _ = convention_offsets(structures, "raw", "mp2020")
    same, _ = convention_offsets(structures, "raw", "raw")
    assert np.allclose(to_raw, -corr) and np.allclose(to_mp, corr) and np.all(same == 0)
    with pytest.raises(ValueError, match="empty"):
        mp2020_correction(Atoms())
    values, errors = mp2020_corrections([Atoms(), _mgo()])
    assert np.isnan(values[0]) and 0 in errors and values[1] == pytest.approx(4 * OXIDE)


def test_unknown_convention_is_a_user_error():
    assert check_convention("mp2020") == "mp2020"
    with pytest.raises(InputError, match="energy_convention='mp2021'.*raw, mp2020"):
        check_convention("mp2021")


def test_registry_records_each_models_convention():
    conv = {m["name"]: m["energy_convention"] for m in registry.list_models()}
    assert conv["chgnet"] == "mp2020"
    assert conv["sevennet-0"] == "raw" and conv["mattersim-v1.0.0-5M"] == "raw"
    assert conv["mattersim-dielectric"] is None  # predicts no energies
    assert set(conventions.ENERGY_CONVENTIONS) == {"raw", "mp2020"}


class ShiftedEMT(Calculator):
    """EMT-like toy 'model': energies = the reference (raw) energies + ``shift`` per structure; forces and
    stress are the reference's. With shift = the MP2020 correction it is a perfect mp2020-convention model."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, table, convention):
        super().__init__()
        self.table = table  # formula+volume -> (energy, forces, stress)
        if convention is not None:
            self.model_info = {"name": f"toy-{convention}", "version": None, "kind": "test", "sha256": None,
                               "energy_convention": convention}

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        energy, forces, stress = self.table[_key(self.atoms)]
        self.results = {"energy": energy, "free_energy": energy, "forces": forces, "stress": stress}


def _key(atoms):
    return (atoms.get_chemical_formula(), round(float(atoms.get_volume()), 6))


@pytest.fixture
def raw_set(tmp_path):
    """An oxide, a fluoride, a U-corrected oxide and an intermetallic with made-up raw 'DFT' references."""
    rng = np.random.default_rng(0)
    frames = []
    for k, atoms in enumerate([_mgo(), _caf2(), _feo(), _nial()]):
        atoms.rattle(0.01, seed=k)
        atoms.info.update({"energy": -5.0 * len(atoms) + k, "internal_id": f"s{k}"})
        atoms.info["stress"] = np.zeros(9)
        atoms.arrays["forces"] = rng.normal(size=(len(atoms), 3))
        frames.append(atoms)
    path = tmp_path / "raw.xyz"
    ase.io.write(path, frames, format="extxyz")
    return read_reference_file(path)


def _table(data, shift):
    return {_key(a): (float(e + s), f, np.zeros(6)) for a, e, f, s in zip(data.structures, data.energy, data.forces, shift)}


def _values(doc):
    return {m["key"]: m["value"] for m in doc["metrics"]}


def test_mp2020_model_is_scored_in_the_reference_convention(raw_set, tmp_path):
    corr = np.array([4 * OXIDE, 2 * FLUORIDE, 4 * (OXIDE + FE_GGA_U_OXIDE), 0.0])
    calc = ShiftedEMT(_table(raw_set, corr), "mp2020")  # a perfect model trained on corrected energies
    doc = run_efs(raw_set, calc, tmp_path / "out", progress=False)
    v = _values(doc)
    per_atom = corr / raw_set.n_atoms
    assert v["energy_mae_eV_per_atom"] == pytest.approx(0.0, abs=1e-9)  # converted: perfect
    assert v["energy_mae_as_predicted_eV_per_atom"] == pytest.approx(np.mean(np.abs(per_atom)), rel=1e-9)
    conv = doc["definitions"]["energy_convention"]
    assert (conv["model"], conv["reference"], conv["model_source"]) == ("mp2020", "raw", "model registry")
    assert "subtracted" in conv["conversion"] and conv["n_not_convertible"] == 0
    assert doc["dataset"]["energy_convention"] == "raw"
    assert "component-wise" in doc["definitions"]["force_mae"] and "norm" in doc["definitions"]["force_norm_mae"]
    parity = np.load(tmp_path / "out" / "toy-mp2020" / "parity.npz")
    assert np.allclose(parity["energy__pred"], parity["energy__ref"], atol=1e-9)  # plots compare like with like


def test_raw_model_and_unknown_convention_are_not_converted(raw_set, tmp_path):
    shift = np.array([0.8, -0.3, 0.0, 0.4])
    for convention in ("raw", None):
        doc = run_efs(raw_set, ShiftedEMT(_table(raw_set, shift), convention), tmp_path / f"o{convention}",
                      progress=False)
        v = _values(doc)
        expected = np.mean(np.abs(shift / raw_set.n_atoms))
        assert v["energy_mae_eV_per_atom"] == pytest.approx(expected)
        assert v["energy_mae_as_predicted_eV_per_atom"] == pytest.approx(expected)
        assert v["energy_mean_error_eV_per_atom"] == pytest.approx(np.mean(shift / raw_set.n_atoms))
        assert doc["definitions"]["energy_convention"]["conversion"].startswith("none")
    # a calculator that records none can be told its convention for the run
    corr = np.array([4 * OXIDE, 2 * FLUORIDE, 4 * (OXIDE + FE_GGA_U_OXIDE), 0.0])
    doc = run_efs(raw_set, ShiftedEMT(_table(raw_set, corr), None), tmp_path / "told", progress=False,
                  energy_convention="mp2020")
    assert _values(doc)["energy_mae_eV_per_atom"] == pytest.approx(0.0, abs=1e-9)
    assert doc["definitions"]["energy_convention"]["model_source"] == "given for this run"
    with pytest.raises(InputError, match="energy_convention='MP'"):
        run_efs(raw_set, ShiftedEMT(_table(raw_set, corr), None), tmp_path / "bad", energy_convention="MP")


def test_structures_the_scheme_rejects_are_left_out_and_listed(raw_set, tmp_path, monkeypatch):
    real = conventions.mp2020_correction

    def rejecting(atoms):
        if "F" in atoms.get_chemical_symbols():
            raise ValueError("rejected for the test")
        return real(atoms)

    monkeypatch.setattr(conventions, "mp2020_correction", rejecting)
    corr = np.array([4 * OXIDE, 2 * FLUORIDE, 4 * (OXIDE + FE_GGA_U_OXIDE), 0.0])
    doc = run_efs(raw_set, ShiftedEMT(_table(raw_set, corr), "mp2020"), tmp_path / "out", progress=False)
    conv = doc["definitions"]["energy_convention"]
    assert conv["n_not_convertible"] == 1 and conv["not_convertible"][0]["id"] == "s1"
    v = _values(doc)
    assert v["energy_mae_eV_per_atom"] == pytest.approx(0.0, abs=1e-9)  # the other three, converted
    assert v["energy_mae_as_predicted_eV_per_atom"] > 0.1


def test_reference_files_state_their_convention(tmp_path):
    frames = []
    for k in range(2):
        atoms = bulk("MgO", "rocksalt", a=4.21 + 0.02 * k, cubic=True)
        atoms.info.update({"energy": -40.0 + k, "energy_convention": "mp2020" if k == 0 else "raw"})
        atoms.info["stress"] = np.zeros(9)
        atoms.arrays["forces"] = np.zeros((len(atoms), 3))
        frames.append(atoms)
    path = tmp_path / "mixed.xyz"
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(InputError, match="mixed.xyz.*different energy conventions"):
        read_reference_file(path)
    frames[1].info["energy_convention"] = "mp2020"
    ase.io.write(path, frames, format="extxyz")
    data = read_reference_file(path)
    assert data.energy_convention == "mp2020"
    # a raw model is put into the reference's mp2020 convention: corrections added
    table = {_key(a): (float(e) - 4 * OXIDE, f, np.zeros(6)) for a, e, f in zip(data.structures, data.energy, data.forces)}
    doc = run_efs(data, ShiftedEMT(table, "raw"), tmp_path / "out", progress=False)
    assert _values(doc)["energy_mae_eV_per_atom"] == pytest.approx(0.0, abs=1e-9)
    assert "added to" in doc["definitions"]["energy_convention"]["conversion"]
    assert json.loads((tmp_path / "out" / "toy-raw" / "metrics.json").read_text())["dataset"]["energy_convention"] == "mp2020"


def test_report_states_definitions_and_each_models_convention(raw_set, tmp_path):
    from benchmarks.report import make_report

    corr = np.array([4 * OXIDE, 2 * FLUORIDE, 4 * (OXIDE + FE_GGA_U_OXIDE), 0.0])
    out = tmp_path / "results"
    run_efs(raw_set, ShiftedEMT(_table(raw_set, corr), "mp2020"), out, progress=False)
    run_efs(raw_set, ShiftedEMT(_table(raw_set, np.zeros(4)), "raw"), out, progress=False)
    make_report([out], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "### Definitions" in md
    assert "force mae: component-wise" in md and "force norm mae: norm-based" in md  # same for both models
    # the convention differs between the models: one clause each
    assert "toy-mp2020: reference raw, model mp2020 (model registry); conversion: MP2020 corrections subtracted" in md
    assert "toy-raw: reference raw, model raw (model registry); conversion: none (same convention)" in md
    assert "| Energy convention |" in md
