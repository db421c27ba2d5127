"""The plumbing every workflow shares (workflows.outputs): run folder, resumable array store, summary header."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from ase.build import bulk

from mattersim.errors import InputError
from workflows.cells import structure_record
from workflows.outputs import ArrayStore, RunFolder, model_identity, run_key, summary_header

LOG = logging.getLogger("test.outputs")


def test_array_store_round_trip_and_foreign_files(tmp_path, caplog):
    path = tmp_path / "store.npz"
    store = ArrayStore(path, "key-1")
    assert store.load(LOG) is False  # nothing yet
    store.data = {"forces": np.arange(6.0).reshape(2, 3), "done": np.array([True, False])}
    store.save()
    again = ArrayStore(path, "key-1")
    assert again.load(LOG) is True
    assert np.array_equal(again.data["forces"], store.data["forces"]) and "key" not in again.data
    # another run's file is moved aside, never reused
    other = ArrayStore(path, "key-2")
    assert other.load(LOG) is False and other.data == {}
    assert (tmp_path / "store.npz.old").is_file() and not path.exists()
    # an unreadable file is reported and treated as absent
    path.write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING, logger="test.outputs"):
        assert ArrayStore(path, "key-1").load(LOG) is False
    assert "unreadable" in caplog.text
    # without a path: a no-op store
    none = ArrayStore(None, "k")
    none.data = {"x": np.zeros(1)}
    none.save()
    assert none.load(LOG) is False


def test_run_key_follows_structure_settings_and_model():
    si = bulk("Si", "diamond", a=5.43)
    info = {"name": "m", "version": "1", "kind": "x", "sha256": "abc", "device": "cpu"}
    key = run_key(si.get_chemical_formula(), {"a": 1}, info)
    assert key == run_key(si.get_chemical_formula(), {"a": 1}, {**info, "device": "cuda"})  # not an identity field
    assert key != run_key(si.get_chemical_formula(), {"a": 2}, info)
    assert key != run_key("Ge2", {"a": 1}, info)
    assert key != run_key(si.get_chemical_formula(), {"a": 1}, {**info, "sha256": "abd"})
    composite = {"kind": "composite", "potential": info, "properties": {"name": "dielectric"}}
    assert model_identity(composite) == model_identity(info)


def test_structure_record_keys_ignore_the_sign_of_zero_and_sub_1e10_noise():
    # a relaxation on another thread count leaves a coordinate at +6e-43 instead of -7e-44: the same structure
    a = bulk("BaO", "rocksalt", a=5.5)
    b = a.copy()
    a.positions[0] = [6e-43, -0.0, 1e-12]
    b.positions[0] = [-7e-44, 0.0, -1e-12]
    info = {"name": "m", "version": "1"}
    assert run_key(structure_record(a), {}, info) == run_key(structure_record(b), {}, info)
    b.positions[0, 2] = 1e-9  # a real difference still counts
    assert run_key(structure_record(a), {}, info) != run_key(structure_record(b), {}, info)


def test_run_folder(tmp_path):
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(InputError, match="blocker' exists and is not a folder; choose another -o"):
        RunFolder.check(tmp_path / "blocker", "-o")
    assert RunFolder.check(None) is None
    with RunFolder(tmp_path / "run", "demo", LOG) as folder:
        folder.log.info("hello")
        folder.write_json("summary.json", {"a": np.float64(1.5)})
        folder.write_with("data.txt", lambda p: p.write_text("1 2 3"))
        assert folder.files == ["data.txt", "demo.log", "summary.json"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"a": 1.5}
    assert "hello" in (tmp_path / "run" / "demo.log").read_text()
    with RunFolder(None, "demo", LOG) as nowhere:
        assert nowhere.write_json("x.json", {}) is None and nowhere.files == []


def test_summary_header():
    head = summary_header("demo", 3, {"name": "m"}, {"fmax_eV_per_A": 0.01}, {"force": "eV/Å"}, {"total": 1.0}, ["a"])
    assert list(head)[:4] == ["workflow", "workflow_version", "mattersim_version", "software"]
    assert head["workflow"] == "demo" and head["workflow_version"] == 3 and head["files"] == ["a"]
    assert {"python", "numpy", "ase", "phonopy", "pymatgen", "torch"} <= set(head["software"])


def test_phonopy_cell_of_an_element_phonopy_has_no_mass_for():
    """phonopy has no mass for Pu (and Po, Am, ...): the cell gets ASE's there and phonopy's elsewhere, so that
    a Pu compound's phonons (and the elastic workflow's Γ-point Hessian) run instead of failing."""
    from ase.data import atomic_masses, atomic_numbers
    from phonopy import Phonopy

    from workflows.cells import to_phonopy_atoms

    puo2 = bulk("PuO2", "fluorite", a=5.4)
    cell = to_phonopy_atoms(puo2)
    o_phonopy = to_phonopy_atoms(bulk("MgO", "rocksalt", a=4.2)).masses[1]  # phonopy's own O
    np.testing.assert_allclose(cell.masses, [atomic_masses[atomic_numbers["Pu"]], o_phonopy, o_phonopy])
    assert Phonopy(cell, supercell_matrix=np.eye(3, dtype=int)).primitive.masses[0] == pytest.approx(244.06, abs=0.01)
    # masses set on the atoms win
    puo2.set_masses([239.05, 16.0, 16.0])
    np.testing.assert_allclose(to_phonopy_atoms(puo2).masses, [239.05, 16.0, 16.0])
