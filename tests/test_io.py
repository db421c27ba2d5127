"""Tests of mattersim.io: reading/validating structure files and writing results."""

from __future__ import annotations

import json
import os

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from mattersim.errors import InputError
from mattersim.io import check_result_path, read_structures, safe_filename, validate_structure, write_results


def _emt_results(atoms_list):
    out = []
    for a in atoms_list:
        a = a.copy()
        a.calc = EMT()
        r = {"energy": a.get_potential_energy(), "forces": a.get_forces()}
        if a.pbc.all():
            r["stress"] = a.get_stress(voigt=False)
        out.append(r)
    return out


# ---------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------


def test_read_poscar_cif_and_all_extxyz_frames(tmp_path):
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    al = bulk("Al", "fcc", a=4.05)
    poscar = tmp_path / "POSCAR"
    ase.io.write(poscar, cu, format="vasp")
    cif = tmp_path / "al.cif"
    ase.io.write(cif, al)
    multi = tmp_path / "many.extxyz"
    ase.io.write(multi, [cu, al, cu * (2, 1, 1)])

    structures = read_structures([poscar, str(cif), multi])
    labels = [label for label, _ in structures]
    assert labels == [str(poscar), str(cif), f"{multi}@0", f"{multi}@1", f"{multi}@2"]
    assert [len(a) for _, a in structures] == [4, 1, 4, 1, 8]
    assert np.allclose(structures[0][1].cell[:], cu.cell[:])
    assert structures[0][1].info["label"] == str(poscar)
    # a single path works too, and previous results are not carried as inputs
    cu.calc = EMT()
    cu.get_potential_energy()
    ase.io.write(tmp_path / "with_results.extxyz", cu)
    ((_, atoms),) = read_structures(tmp_path / "with_results.extxyz")
    assert atoms.calc is None


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.cif' does not exist"):
        read_structures([tmp_path / "nope.cif"])


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        read_structures([tmp_path])


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(InputError, match=r"empty\.extxyz' is empty"):
        read_structures([empty])


def test_unreadable_file(tmp_path):
    junk = tmp_path / "junk.cif"
    junk.write_text("this is not a crystallographic information file\n")
    with pytest.raises(InputError, match=r"junk\.cif' could not be read by ASE") as exc:
        read_structures([junk])
    assert "\n" not in str(exc.value)
    unknown = tmp_path / "structure.weird"
    unknown.write_text("1 2 3\n")
    with pytest.raises(InputError, match=r"structure\.weird' could not be read"):
        read_structures([unknown])


def test_file_with_no_structures(tmp_path):
    # a valid trajectory with zero frames
    from ase.io.trajectory import Trajectory

    path = tmp_path / "empty.traj"
    Trajectory(path, "w").close()
    if path.stat().st_size == 0:
        pytest.skip("ASE wrote a zero-byte trajectory")
    with pytest.raises(InputError, match="contains no structures|could not be read"):
        read_structures([path])


def test_unknown_element_names_element_and_file(tmp_path):
    atoms = Atoms("CuOg", positions=[[0, 0, 0], [2, 0, 0]], cell=[6, 6, 6], pbc=True)
    path = tmp_path / "og.extxyz"
    ase.io.write(path, atoms)
    with pytest.raises(InputError, match=r"og\.extxyz.*Og \(Z=118\).*Z <= 94"):
        read_structures([path])
    # Am (Z=95) is just outside MatterSim v1's range; a smaller model range is honoured too
    with pytest.raises(InputError, match=r"Am \(Z=95\)"):
        validate_structure(Atoms("Am", cell=[5, 5, 5], pbc=True), label="am")
    with pytest.raises(InputError, match=r"Cu \(Z=29\)"):
        validate_structure(bulk("Cu"), max_z=20)
    validate_structure(Atoms("Pu", cell=[5, 5, 5], pbc=True))  # Z = 94 is fine


def test_atoms_too_close_names_indices_elements_distance():
    atoms = Atoms("Cu3", positions=[[0, 0, 0], [3, 0, 0], [3.3, 0, 0]], cell=[10, 10, 10], pbc=True)
    with pytest.raises(InputError, match=r"atoms 1 \(Cu\) and 2 \(Cu\) are only 0\.300 Å apart"):
        validate_structure(atoms, label="x")


def test_atoms_too_close_across_the_periodic_boundary():
    atoms = Atoms("CuAl", positions=[[0.1, 1, 1], [4.8, 1, 1]], cell=[5, 5, 5], pbc=True)
    with pytest.raises(InputError, match=r"atoms 0 \(Cu\) and 1 \(Al\) are only 0\.300 Å apart"):
        validate_structure(atoms)
    # without periodicity they are far apart
    atoms.pbc = False
    validate_structure(atoms)
    # mixed periodicity (slab) along x only
    atoms.pbc = [True, False, False]
    with pytest.raises(InputError, match="0.300 Å"):
        validate_structure(atoms)
    atoms.pbc = [False, True, True]
    validate_structure(atoms)


def test_atom_close_to_its_own_image():
    atoms = Atoms("H", cell=[0.4, 5, 5], pbc=True)
    with pytest.raises(InputError, match="own periodic image"):
        validate_structure(atoms)


def test_zero_volume_cell(tmp_path):
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.5, 1.5, 1.5]], cell=[[3, 0, 0], [6, 0, 0], [0, 0, 3]], pbc=True)
    path = tmp_path / "flat.extxyz"
    ase.io.write(path, atoms)
    with pytest.raises(InputError, match=r"flat\.extxyz.*zero volume"):
        read_structures([path])
    with pytest.raises(InputError, match="zero-length lattice vector"):
        validate_structure(Atoms("Cu", cell=[3, 3, 0], pbc=True))
    # a molecule needs no cell
    validate_structure(Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]]))


def test_nan_coordinates():
    atoms = bulk("Cu", cubic=True)
    atoms.positions[2, 1] = np.nan
    with pytest.raises(InputError, match=r"NaN.*atom 2"):
        validate_structure(atoms, label="bad")


def test_validation_can_be_skipped(tmp_path):
    atoms = Atoms("CuOg", positions=[[0, 0, 0], [2, 0, 0]], cell=[6, 6, 6], pbc=True)
    path = tmp_path / "og.extxyz"
    ase.io.write(path, atoms)
    assert len(read_structures([path], validate=False)) == 1


def test_no_paths():
    with pytest.raises(InputError, match="No structure file"):
        read_structures([])


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------


def _sample():
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.05, seed=0)
    al = bulk("Al", "fcc", a=4.0) * (1, 1, 3)  # 3 atoms: a (3, 3) stress must not look per-atom
    al.rattle(0.05, seed=1)
    mol = molecule("H2O")
    mol.center(vacuum=4.0)
    mol.pbc = False
    atoms_list = [cu, al, mol]
    return atoms_list, _emt_results(atoms_list)


MODEL = {"name": "fake-model", "version": "1.0", "sha256": "ab" * 32, "kind": "test", "source": None}


def test_extxyz_round_trip(tmp_path):
    atoms_list, results = _sample()
    path = tmp_path / "out.extxyz"
    write_results(path, atoms_list, results, MODEL, labels=["cu", "al", "water"])
    frames = ase.io.read(path, ":")
    assert len(frames) == 3
    for frame, atoms, r, label in zip(frames, atoms_list, results, ["cu", "al", "water"]):
        assert frame.info["label"] == label
        assert frame.info["model_name"] == "fake-model"
        assert frame.info["model_sha256"] == "ab" * 32
        assert np.array_equal(frame.numbers, atoms.numbers)
        assert np.allclose(frame.positions, atoms.positions, atol=1e-8)
        assert frame.get_potential_energy() == pytest.approx(r["energy"], abs=1e-12, rel=1e-14)
        assert np.allclose(frame.get_forces(), r["forces"], atol=1e-8)
        if "stress" in r:
            assert np.allclose(frame.get_stress(voigt=False), r["stress"], atol=1e-14, rtol=1e-12)
        else:
            assert "stress" not in frame.calc.results


def test_extxyz_stress_is_nine_numbers_in_comment_line(tmp_path):
    atoms_list, results = _sample()
    path = tmp_path / "out.extxyz"
    write_results(path, atoms_list[:1], results[:1], MODEL)
    header = path.read_text().splitlines()[1]
    stress_field = header.split('stress="')[1].split('"')[0]
    assert len(stress_field.split()) == 9
    assert np.allclose(np.array(stress_field.split(), float).reshape(3, 3), results[0]["stress"])


def test_json_document(tmp_path):
    atoms_list, results = _sample()
    path = tmp_path / "out.json"
    write_results(path, atoms_list, results, MODEL, labels=["cu", "al", "water"])
    doc = json.loads(path.read_text())
    assert doc["model"]["name"] == "fake-model"
    assert doc["units"]["energy"] == "eV"
    assert [s["label"] for s in doc["structures"]] == ["cu", "al", "water"]
    for s, atoms, r in zip(doc["structures"], atoms_list, results):
        assert s["formula"] == atoms.get_chemical_formula(mode="hill")
        assert s["n_atoms"] == len(atoms)
        assert s["energy"] == r["energy"]
        assert s["energy_per_atom"] == pytest.approx(r["energy"] / len(atoms))
        assert np.array_equal(np.array(s["forces"]), r["forces"])
        assert np.array_equal(np.array(s["positions"]), atoms.positions)
        if "stress" in r:
            assert np.array_equal(np.array(s["stress"]), r["stress"])
            assert s["pressure_GPa"] == pytest.approx(-np.trace(r["stress"]) / 3 / 0.006241509074460763)
        else:
            assert "stress" not in s


def test_labels_default_to_info_label(tmp_path):
    atoms_list, results = _sample()
    atoms_list[0].info["label"] = "from-info"
    path = tmp_path / "out.json"
    write_results(path, atoms_list, results, None)
    doc = json.loads(path.read_text())
    assert [s["label"] for s in doc["structures"]] == ["from-info", "structure_1", "structure_2"]


def test_extra_keys_pass_through(tmp_path):
    atoms_list, results = _sample()
    rng = np.random.default_rng(0)
    for a, r in zip(atoms_list, results):
        n = len(a)
        r["magmoms"] = rng.normal(size=n)
        r["charges"] = rng.normal(size=n)
        r["born_effective_charges"] = rng.normal(size=(n, 3, 3))
        r["dielectric_tensor"] = np.diag([2.0, 3.0, 4.0])
        r["my_site_property"] = rng.normal(size=(n, 2))
        r["my_scalar"] = 1.5
    write_results(tmp_path / "x.json", atoms_list, results, MODEL)
    doc = json.loads((tmp_path / "x.json").read_text())
    for s, r in zip(doc["structures"], results):
        for key in ("magmoms", "charges", "born_effective_charges", "dielectric_tensor", "my_site_property"):
            assert np.allclose(np.array(s[key]), r[key]), key
        assert s["my_scalar"] == 1.5

    write_results(tmp_path / "x.extxyz", atoms_list, results, MODEL)
    frames = ase.io.read(tmp_path / "x.extxyz", ":")
    for f, a, r in zip(frames, atoms_list, results):
        n = len(a)
        data = {**f.info, **f.arrays, **(f.calc.results if f.calc else {})}
        assert np.allclose(data["magmoms"], r["magmoms"], atol=1e-8)
        assert np.allclose(data["charges"], r["charges"], atol=1e-8)
        assert np.allclose(np.reshape(data["born_effective_charges"], (n, 3, 3)), r["born_effective_charges"], atol=1e-8)
        assert np.allclose(np.reshape(data["dielectric_tensor"], (3, 3)), r["dielectric_tensor"])
        assert np.allclose(data["my_site_property"], r["my_site_property"], atol=1e-8)
        assert data["my_scalar"] == 1.5


def test_unsupported_extension(tmp_path):
    atoms_list, results = _sample()
    with pytest.raises(InputError, match=r"out\.csv.*'\.csv'.*\.extxyz, \.json"):
        write_results(tmp_path / "out.csv", atoms_list, results, MODEL)
    with pytest.raises(InputError, match="(none)"):
        check_result_path("results")
    assert check_result_path("a/b.EXTXYZ") == "extxyz"
    assert not (tmp_path / "out.csv").exists()


def test_write_is_atomic_and_replaces(tmp_path):
    atoms_list, results = _sample()
    path = tmp_path / "sub" / "out.json"
    write_results(path, atoms_list, results, MODEL)
    first = path.read_text()
    write_results(path, atoms_list[:1], results[:1], MODEL)
    assert path.read_text() != first
    assert sorted(os.listdir(path.parent)) == ["out.json"]  # no temporary files left behind


def test_safe_filename():
    taken: set[str] = set()
    assert safe_filename("/tmp/x/POSCAR", taken) == "tmp_x_POSCAR"
    assert safe_filename("/tmp/x/POSCAR", taken) == "tmp_x_POSCAR_2"
    assert safe_filename("a.extxyz@3") == "a.extxyz_3"
