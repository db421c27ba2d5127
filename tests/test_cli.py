"""Tests of the ``mattersim`` command line (typer's CliRunner; EMT stands in for the model where possible)."""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from typer.testing import CliRunner

from conftest import assert_user_error
from mattersim import __version__
from mattersim.cli import app
from mattersim.errors import ModelNotAvailableError

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------------------
# an EMT-backed registry
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def emt_registry(monkeypatch):
    """Replace the registry's loader with EMT ('emt', or no --model) and record the calls."""
    from mattersim import registry

    calls = []

    def load_calculator(model=None, *, device="cpu", dtype="float32", trust_pickle=False, download=True):
        calls.append({"model": model, "device": device, "dtype": dtype})
        if model in (None, "emt"):
            return EMT()
        raise ModelNotAvailableError(f"Unknown model '{model}'; run 'mattersim models' to see the available ones.")

    def list_models():
        return [
            {"name": "emt", "kind": "ase", "description": "effective medium theory", "available": True, "path": None},
            {"name": "mattersim-v1.0.0-1M", "kind": "mattersim-v1", "description": "MatterSim v1 1M", "available": False, "path": None},
        ]

    monkeypatch.setattr(registry, "load_calculator", load_calculator)
    monkeypatch.setattr(registry, "list_models", list_models)
    monkeypatch.setattr(registry, "default_model", lambda: "emt")
    return calls


@pytest.fixture
def batch_calls(monkeypatch):
    """Count evaluate_batch calls (and their sizes) made by the CLI."""
    import mattersim.calculator as calculator

    original = calculator.evaluate_batch
    calls = []

    def counting(calc, structures, properties=("energy", "forces", "stress")):
        calls.append(len(structures))
        return original(calc, structures, properties=properties)

    monkeypatch.setattr(calculator, "evaluate_batch", counting)
    return calls


@pytest.fixture
def inputs(tmp_path):
    """A strained Cu POSCAR and a two-frame Al/Cu extxyz."""
    cu = bulk("Cu", "fcc", a=3.70, cubic=True)
    cu.rattle(0.02, seed=1)
    poscar = tmp_path / "POSCAR"
    ase.io.write(poscar, cu, format="vasp")
    al = bulk("Al", "fcc", a=4.10)
    cu2 = bulk("Cu", "fcc", a=3.55) * (2, 1, 1)
    multi = tmp_path / "two.extxyz"
    ase.io.write(multi, [al, cu2])
    return poscar, multi


def _emt_reference(paths):
    from mattersim.io import read_structures

    out = []
    for label, atoms in read_structures(paths):
        atoms.calc = EMT()
        out.append((label, atoms, atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)))
    return out


# ---------------------------------------------------------------------------------------------------------
# basics
# ---------------------------------------------------------------------------------------------------------


def test_help_and_version():
    result = _invoke("--help")
    assert result.exit_code == 0
    for command in ("models", "predict", "relax"):
        assert command in result.output
    result = _invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"mattersim {__version__}"


@pytest.mark.parametrize("command", [["predict"], ["relax"], ["phonon"], ["train"], ["finetune"], ["models"],
                                     ["bench", "run"], ["bench", "report"]])
def test_help_uses_plain_placeholders(command):
    """No Python types (<bool>, <str>, <list[Path]>) in help texts: flags have no placeholder, values one in
    the usual CLI style (PATH, INTEGER, TEXT)."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    for python_type in ("<bool>", "<str>", "<int>", "<float>", "<path>", "list[", "<Path"):
        assert python_type not in result.output, (python_type, result.output)
    if command == ["predict"]:
        assert "FILES" in result.output and "PATH" in result.output
    if command in (["predict"], ["relax"], ["phonon"]):
        assert "Default: the best available offline" in " ".join(result.output.replace("│", " ").split())
    if command in (["predict"], ["relax"]):
        # at 80 columns every option name is shown whole (long choice lists move into the help text)
        narrow = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
        assert "--allow-untrained-elements" in narrow.output and "…" not in narrow.output


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from mattersim.cli import app; assert 'torch' not in sys.modules and 'mattersim.registry' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_models_table(emt_registry):
    result = _invoke("models")
    assert result.exit_code == 0, result.output
    assert "emt" in result.output and "mattersim-v1.0.0-1M" in result.output
    assert "Default model: emt" in result.output


def test_models_with_real_registry():
    result = _invoke("models")
    assert result.exit_code == 0, result.output
    assert "mattersim-v1.0.0-1M" in result.output


# ---------------------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------------------


def test_predict_table_and_one_batched_call(emt_registry, batch_calls, inputs):
    poscar, multi = inputs
    result = _invoke("predict", poscar, multi, "--model", "emt")
    assert result.exit_code == 0, result.output
    assert batch_calls == [3]  # all three structures in one evaluate_batch call
    assert emt_registry[-1] == {"model": "emt", "device": "cpu", "dtype": "float32"}
    for _, atoms, energy, _, _ in _emt_reference([poscar, multi]):
        assert f"{energy:.6f}" in result.output.replace("\n", "")
    result = _invoke("predict", poscar, "--float64", "--device", "cpu")
    assert result.exit_code == 0
    assert emt_registry[-1] == {"model": None, "device": "cpu", "dtype": "float64"}


def test_predict_extxyz_output_round_trips(emt_registry, inputs, tmp_path):
    poscar, multi = inputs
    out = tmp_path / "res" / "out.extxyz"
    result = _invoke("predict", poscar, multi, "--model", "emt", "-o", out)
    assert result.exit_code == 0, result.output
    frames = ase.io.read(out, ":")
    ref = _emt_reference([poscar, multi])
    assert len(frames) == len(ref)
    for frame, (label, atoms, energy, forces, stress) in zip(frames, ref):
        assert frame.info["label"] == label
        assert frame.info["model_name"] == "EMT"
        assert frame.get_potential_energy() == pytest.approx(energy, rel=1e-12, abs=1e-12)
        assert np.allclose(frame.get_forces(), forces, atol=1e-8)
        assert np.allclose(frame.get_stress(voigt=False), stress, atol=1e-14, rtol=1e-12)


def test_predict_json_output(emt_registry, inputs, tmp_path):
    poscar, multi = inputs
    out = tmp_path / "out.json"
    result = _invoke("predict", poscar, multi, "-o", out)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["model"]["name"] == "EMT"
    ref = _emt_reference([poscar, multi])
    for s, (label, atoms, energy, forces, stress) in zip(doc["structures"], ref):
        assert s["label"] == label
        assert s["formula"] == atoms.get_chemical_formula(mode="hill")
        assert s["energy"] == pytest.approx(energy, rel=1e-12)
        assert s["energy_per_atom"] == pytest.approx(energy / len(atoms), rel=1e-12)
        assert np.allclose(s["forces"], forces, atol=1e-12)
        assert np.allclose(s["stress"], stress, atol=1e-14)


def test_predict_molecule_has_no_stress(emt_registry, tmp_path):
    path = tmp_path / "dimer.xyz"
    ase.io.write(path, Atoms("Cu2", positions=[[0, 0, 0], [2.4, 0, 0]]))
    out = tmp_path / "out.json"
    result = _invoke("predict", path, "-o", out)
    assert result.exit_code == 0, result.output
    (s,) = json.loads(out.read_text())["structures"]
    assert "stress" not in s and s["volume"] is None


# ---------------------------------------------------------------------------------------------------------
# bad input: one line, exit code 2
# ---------------------------------------------------------------------------------------------------------


def _write(path: Path, atoms) -> Path:
    ase.io.write(path, atoms)
    return path


def test_error_missing_file(emt_registry, tmp_path):
    assert_user_error(_invoke("predict", tmp_path / "missing.cif"), "missing.cif", "does not exist")


def test_error_unreadable_file(emt_registry, tmp_path):
    junk = tmp_path / "junk.cif"
    junk.write_text("definitely not a CIF\n")
    assert_user_error(_invoke("predict", junk), "junk.cif", "could not be read")


def test_error_empty_file(emt_registry, tmp_path):
    empty = tmp_path / "POSCAR"
    empty.write_text("")
    assert_user_error(_invoke("predict", empty), "POSCAR", "is empty")


def test_error_unknown_element(emt_registry, tmp_path):
    path = _write(tmp_path / "og.extxyz", Atoms("CuOg", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[6, 6, 6], pbc=True))
    assert_user_error(_invoke("predict", path), "og.extxyz", "Og (Z=118)")
    path = _write(tmp_path / "am.vasp", Atoms("Am", cell=[4, 4, 4], pbc=True))
    assert_user_error(_invoke("relax", path, "-o", tmp_path / "out"), "am.vasp", "Am (Z=95)")


def test_error_atoms_too_close(emt_registry, tmp_path):
    path = _write(tmp_path / "close.extxyz", Atoms("Cu2", positions=[[0, 0, 0], [0.2, 0, 0]], cell=[5, 5, 5], pbc=True))
    assert_user_error(_invoke("predict", path), "close.extxyz", "atoms 0 (Cu) and 1 (Cu)", "0.200 Å")


def test_error_zero_volume_cell(emt_registry, tmp_path):
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.5, 1.5, 1.5]], cell=[[3, 0, 0], [6, 0, 0], [0, 0, 3]], pbc=True)
    path = _write(tmp_path / "flat.extxyz", atoms)
    assert_user_error(_invoke("predict", path), "flat.extxyz", "zero volume")


def test_error_unknown_model_fake_registry(emt_registry, inputs):
    assert_user_error(_invoke("predict", inputs[0], "--model", "no-such-model"), "no-such-model")


def test_error_unknown_model_real_registry(inputs):
    result = _invoke("predict", inputs[0], "--model", "no-such-model")
    assert_user_error(result, "no-such-model")


def test_error_missing_checkpoint_path(inputs, tmp_path):
    result = _invoke("predict", inputs[0], "--model", tmp_path / "nothing.pth")
    assert_user_error(result, "nothing.pth")


def test_error_unsupported_output_extension(emt_registry, inputs, tmp_path, batch_calls):
    out = tmp_path / "out.csv"
    assert_user_error(_invoke("predict", inputs[0], "-o", out), "out.csv", ".extxyz, .json")
    assert not out.exists()
    assert batch_calls == []  # failed before any evaluation


def test_error_relax_molecule_with_cell_relaxation(emt_registry, tmp_path):
    path = _write(tmp_path / "dimer.xyz", Atoms("Cu2", positions=[[0, 0, 0], [2.4, 0, 0]]))
    assert_user_error(_invoke("relax", path, "-o", tmp_path / "out"), "dimer.xyz", "fixed-cell")
    result = _invoke("relax", path, "--mode", "fixed-cell", "--fmax", "0.01", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "structures" / "dimer.xyz").exists()


def test_error_bad_fmax(emt_registry, inputs, tmp_path):
    assert_user_error(_invoke("relax", inputs[0], "--fmax", "-1", "-o", tmp_path / "o"), "fmax")


# ---------------------------------------------------------------------------------------------------------
# relax
# ---------------------------------------------------------------------------------------------------------


def test_relax_writes_structures_summary_and_extxyz(emt_registry, inputs, tmp_path):
    from mattersim.io import read_structures
    from mattersim.relax import relax

    poscar, multi = inputs
    outdir = tmp_path / "relaxed"
    result = _invoke("relax", poscar, multi, "--fmax", "0.01", "--steps", "200", "--pressure", "0.5", "-o", outdir, "--trajectory")
    assert result.exit_code == 0, result.output
    summary = json.loads((outdir / "summary.json").read_text())
    assert summary["settings"]["pressure_GPa"] == 0.5
    assert summary["settings"]["mode"] == "full"
    assert summary["model"]["name"] == "EMT"
    assert summary["n_structures"] == summary["n_converged"] == 3
    structures = read_structures([poscar, multi])
    frames = ase.io.read(outdir / "relaxed.extxyz", ":")
    for entry, frame, (label, atoms) in zip(summary["structures"], frames, structures):
        ref = relax(atoms, EMT(), pressure=0.5, fmax=0.01, steps=200)
        assert entry["label"] == label and frame.info["label"] == label
        assert entry["converged"] is True and frame.info["converged"]
        assert entry["steps"] == ref.steps
        assert entry["energy"] == pytest.approx(ref.energy, abs=1e-9)
        assert entry["enthalpy"] == pytest.approx(ref.enthalpy, abs=1e-9)
        assert entry["initial_volume"] == pytest.approx(atoms.get_volume())
        assert entry["volume"] == pytest.approx(ref.volume, rel=1e-9)
        assert entry["pressure"] == pytest.approx(0.5, abs=0.15)  # fmax 0.01 eV/Å bounds the cell forces
        assert frame.get_potential_energy() == pytest.approx(ref.energy, abs=1e-9)
        assert np.allclose(frame.get_stress(voigt=False), ref.stress, atol=1e-12)
        assert np.allclose(frame.cell[:], ref.atoms.cell[:], atol=1e-8)
        written = ase.io.read(outdir / entry["file"])
        assert entry["file"].endswith(".vasp")
        assert np.allclose(written.cell[:], ref.atoms.cell[:], atol=1e-6)
        assert np.allclose(written.positions, ref.atoms.positions, atol=1e-5)
    files = sorted(e["file"] for e in summary["structures"])
    assert files == ["structures/POSCAR.vasp", "structures/two_0.vasp", "structures/two_1.vasp"]
    assert len(list((outdir / "trajectories").glob("*.traj"))) == 3


def test_relax_cif_output_and_fixed_volume(emt_registry, inputs, tmp_path):
    poscar, _ = inputs
    outdir = tmp_path / "fv"
    result = _invoke("relax", poscar, "--mode", "fixed-volume", "--format", "cif", "--optimizer", "BFGS", "-o", outdir)
    assert result.exit_code == 0, result.output
    (entry,) = json.loads((outdir / "summary.json").read_text())["structures"]
    assert entry["file"].endswith(".cif")
    assert entry["volume"] == pytest.approx(entry["initial_volume"], rel=1e-10)


def test_relax_not_converged_exit_code(emt_registry, inputs, tmp_path):
    poscar, multi = inputs
    outdir = tmp_path / "nc"
    result = _invoke("relax", poscar, multi, "--steps", "1", "--fmax", "0.001", "-o", outdir)
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "3 of 3 structures did not converge within 1 steps" in lines[0]
    summary = json.loads((outdir / "summary.json").read_text())
    assert summary["n_converged"] == 0
    assert all(e["converged"] is False and e["steps"] == 1 for e in summary["structures"])


def test_relax_output_path_is_a_file(emt_registry, inputs, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert_user_error(_invoke("relax", inputs[0], "-o", target), "file.txt", "not a folder")


# ---------------------------------------------------------------------------------------------------------
# the real model (random-weight fixture checkpoint), when the shared fixtures are present
# ---------------------------------------------------------------------------------------------------------


def test_predict_with_fixture_checkpoint(small_checkpoint, tmp_path):
    from mattersim import registry
    from mattersim.calculator import evaluate_batch
    from mattersim.io import read_structures

    structures_file = small_checkpoint.parent / "structures.extxyz"
    out_json = tmp_path / "out.json"
    out_xyz = tmp_path / "out.extxyz"
    result = _invoke("predict", structures_file, "--model", small_checkpoint, "--float64", "-o", out_json)
    assert result.exit_code == 0, result.output
    result = _invoke("predict", structures_file, "--model", small_checkpoint, "--float64", "-o", out_xyz)
    assert result.exit_code == 0, result.output

    calc = registry.load_calculator(str(small_checkpoint), dtype="float64")
    structures = [a for _, a in read_structures([structures_file])]
    ref = evaluate_batch(calc, structures)
    doc = json.loads(out_json.read_text())
    frames = ase.io.read(out_xyz, ":")
    assert len(doc["structures"]) == len(frames) == len(ref) == 6
    assert doc["model"].get("sha256")
    for s, frame, r in zip(doc["structures"], frames, ref):
        assert s["energy"] == pytest.approx(r["energy"], rel=1e-10, abs=1e-10)
        assert np.allclose(s["forces"], r["forces"], atol=1e-10)
        assert np.allclose(s["stress"], r["stress"], atol=1e-12)
        assert frame.get_potential_energy() == pytest.approx(r["energy"], rel=1e-10, abs=1e-10)
        assert np.allclose(frame.get_forces(), r["forces"], atol=1e-7)
        assert np.allclose(frame.get_stress(voigt=False), r["stress"], atol=1e-12)


def test_relax_with_fixture_checkpoint(small_checkpoint, tmp_path):
    structures_file = small_checkpoint.parent / "structures.extxyz"
    outdir = tmp_path / "relax"
    result = _invoke("relax", structures_file, "--model", small_checkpoint, "--steps", "3", "-o", outdir)
    assert result.exit_code in (0, 1), result.output
    summary = json.loads((outdir / "summary.json").read_text())
    assert summary["n_structures"] == 6
    assert summary["model"].get("sha256")
    assert len(ase.io.read(outdir / "relaxed.extxyz", ":")) == 6
    if result.exit_code == 1:
        assert "did not converge" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# output that cannot be written: one line, before any work
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def read_only_disk(monkeypatch):
    """Every new file fails as on a read-only mount (root ignores permission bits, so simulate the mount)."""
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


@pytest.mark.parametrize("command", ["predict", "relax", "phonon", "bench-run", "bench-report"])
def test_unwritable_output_fails_before_any_work(emt_registry, inputs, tmp_path, read_only_disk, command):
    poscar, _ = inputs
    args = {
        "predict": ["predict", poscar, "-o", tmp_path / "out.extxyz"],
        "relax": ["relax", poscar, "-o", tmp_path / "relaxed"],
        "phonon": ["phonon", poscar, "-o", tmp_path / "ph"],
        "bench-run": ["bench", "run", "hex", "-m", "emt", "-o", tmp_path / "bench"],
        "bench-report": ["bench", "report", tmp_path, "-o", tmp_path / "report.md"],
    }[command]
    result = _invoke(*args)
    assert_user_error(result, "not writable", "Read-only file system", "choose another -o")
    assert emt_registry == []  # no model was loaded: nothing was computed


def test_output_under_a_file_is_a_clean_error(emt_registry, inputs, tmp_path):
    poscar, _ = inputs
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_user_error(_invoke("relax", poscar, "-o", blocker / "sub"), "cannot be created", "choose another -o")
    assert_user_error(_invoke("predict", poscar, "-o", blocker / "out.json"), "exists and is not a folder")
    assert_user_error(_invoke("relax", poscar, "-o", blocker), "exists and is not a folder")
    assert emt_registry == []


# ---------------------------------------------------------------------------------------------------------
# elastic
# ---------------------------------------------------------------------------------------------------------


def test_cli_elastic_writes_and_prints(tmp_path, emt_registry):
    poscar = tmp_path / "POSCAR"
    bulk("Cu", "fcc", a=3.6, cubic=True).write(poscar, format="vasp")
    out = tmp_path / "el"
    result = _invoke("elastic", poscar, "--strains", "0.002,0.004", "--fmax", "0.001", "-o", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "elastic.json").read_text())
    assert summary["settings"]["strains"] == [0.002, 0.004] and summary["settings"]["ions"] == "relaxed-ion"
    assert "C1j (IEEE)" in result.output and "stable (cubic)" in result.output
    assert (out / "stress_strain.png").is_file()
    clamped = _invoke("elastic", poscar, "--clamped-ion", "--no-relax", "-o", tmp_path / "el2")
    assert clamped.exit_code == 0 and "clamped-ion" in clamped.output


def test_cli_elastic_user_errors(tmp_path, emt_registry):
    poscar = tmp_path / "POSCAR"
    bulk("Cu", "fcc", a=3.6, cubic=True).write(poscar, format="vasp")
    assert_user_error(_invoke("elastic", poscar, "--strains", "0.1", "-o", tmp_path / "o"), "at most 0.05")
    assert_user_error(_invoke("elastic", poscar, "--strains", "a,b", "-o", tmp_path / "o"), "--strains")
    xyz = tmp_path / "water.xyz"
    Atoms("H2O", positions=[[0, 0, 0], [0.76, 0.59, 0], [-0.76, 0.59, 0]]).write(xyz)
    assert_user_error(_invoke("elastic", xyz, "-o", tmp_path / "o"), "3D-periodic")


# ---------------------------------------------------------------------------------------------------------
# md
# ---------------------------------------------------------------------------------------------------------


def _cu3au_file(tmp_path) -> Path:
    poscar = tmp_path / "POSCAR"
    Atoms("AuCu3", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], cell=np.eye(3) * 3.75,
          pbc=True).write(poscar, format="vasp")
    return poscar


def test_cli_md_plain_and_with_a_born_file(tmp_path, emt_registry):
    from workflows.nac import BornCharges, write_born

    poscar = _cu3au_file(tmp_path)
    out = tmp_path / "md"
    result = _invoke("md", poscar, "--ensemble", "nvt", "-T", "300", "--timestep", "2", "--steps", "20", "--every", "5",
                     "--supercell", "2 1 1", "-o", out)
    assert result.exit_code == 0, result.output
    assert "NoseHooverChainNVT" in result.output and "ns/day" in result.output
    assert len(ase.io.read(out / "trajectory.extxyz", ":")) == 5
    summary = json.loads((out / "md.json").read_text())
    assert summary["settings"]["supercell"] == [[2, 0, 0], [0, 1, 0], [0, 0, 1]] and "md.csv" in summary["files"]
    unit = ase.io.read(poscar)
    write_born(tmp_path / "BORN", BornCharges([3.0, -1.0, -1.0, -1.0], 4.0, source="test"), unit)
    field = _invoke("md", poscar, "--steps", "10", "--every", "5", "--efield", "const:E=1MV/cm,axis=z", "--born",
                    tmp_path / "BORN", "-o", tmp_path / "field")
    assert field.exit_code == 0, field.output
    assert "field work" in field.output
    summary = json.loads((tmp_path / "field" / "md.json").read_text())
    assert summary["settings"]["efield"]["amplitude_MV_per_cm"] == pytest.approx(1.0)
    assert summary["settings"]["born_source"].startswith("BORN file")


def test_cli_md_user_errors(tmp_path, emt_registry):
    poscar = _cu3au_file(tmp_path)
    assert_user_error(_invoke("md", poscar, "--efield", "const:E=1MV/cm,axis=z", "-o", tmp_path / "o"), "predicts none")
    assert_user_error(_invoke("md", poscar, "--efield", "sin:Emax=4MV/cm,axis=z", "-o", tmp_path / "o"),
                      "missing period")
    assert_user_error(_invoke("md", poscar, "--born", poscar, "-o", tmp_path / "o"), "add --efield")
    assert_user_error(_invoke("md", poscar, "--ensemble", "npt", "--thermostat", "langevin", "-o", tmp_path / "o"),
                      "nvt only")
    assert_user_error(_invoke("md", poscar, "--timestep", "0", "-o", tmp_path / "o"), "positive time step")


def test_cli_build_li_rich_and_delithiate_errors(tmp_path, emt_registry):
    out = tmp_path / "Li1.2Mn0.8O2.vasp"
    result = _invoke("build", "li-rich", "--tm", "Mn", "--supercell", "5 4 2", "--li-excess", "24", "--seed", "1", "-o", out)
    assert result.exit_code == 0, result.output
    assert "Li 1.2, Mn 0.8, O 2" in result.output and "3.5" in result.output
    cell = ase.io.read(out)
    assert len(cell) == 480 and cell.get_chemical_formula() == "Li144Mn96O240"
    assert_user_error(_invoke("build", "li-rich", "--tm", "Qq", "-o", tmp_path / "x.vasp"), "not a transition metal")
    (tmp_path / "a_file").write_text("x")
    assert_user_error(_invoke("build", "li-rich", "-o", tmp_path / "a_file" / "x.vasp"), "--output")
    assert_user_error(_invoke("delithiate", out, "--remove-every", "five", "-o", tmp_path / "d"), "--remove-every")
    assert_user_error(_invoke("delithiate", out, "--until", "half", "-o", tmp_path / "d"), "--until")
    assert_user_error(_invoke("delithiate", out, "--hold", "-2ps", "-o", tmp_path / "d"), "--hold")


# ---------------------------------------------------------------------------------------------------------
# qha
# ---------------------------------------------------------------------------------------------------------


def test_cli_qha_writes_and_prints(tmp_path, emt_registry):
    poscar = tmp_path / "POSCAR"
    bulk("Cu", "fcc", a=3.6).write(poscar, format="vasp")
    out = tmp_path / "qha"
    result = _invoke("qha", poscar, "--supercell", "3 3 3", "--mesh", "9 9 9", "--volumes=-0.03:0.03:5", "--tmax", "320",
                     "-o", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "qha.json").read_text())
    assert summary["settings"]["volume_fractions"] == pytest.approx([-0.03, -0.015, 0.0, 0.015, 0.03])
    assert "at 300 K" in result.output and "alpha_V" in result.output
    assert (out / "Cu" / "e-v.dat").is_file() and (out / "Cu" / "qha.png").is_file()


def test_cli_qha_feeds_a_finite_temperature_hull(tmp_path, emt_registry):
    folder = tmp_path / "cands"
    folder.mkdir()
    bulk("Cu", "fcc", a=3.6).write(folder / "POSCAR_fcc", format="vasp")
    bulk("Cu", "bcc", a=2.87).write(folder / "POSCAR_bcc", format="vasp")
    result = _invoke("qha", folder / "POSCAR_fcc", "--labels", "fcc", "--supercell", "2 2 2", "--mesh", "5 5 5",
                     "--volumes=-0.03:0.03:5", "--tmax", "320", "--pressures", "0,2", "-o", tmp_path / "qha")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "qha" / "fcc" / "e-v.dat").is_file()
    result = _invoke("hull", "Cu", "--structures", folder, "--pressures", "0,2", "--fmax", "0.05", "--qha", tmp_path / "qha",
                     "--temperature", "300", "-o", tmp_path / "hull")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "hull" / "hull.json").read_text())
    ft = summary["finite_temperature"]
    assert ft["phases_with_free_energy"] == ["fcc"] and ft["phases_static"] == ["bcc"] and "G at 300 K" in result.output
    # the hull's G is the QHA's table at 300 K
    from workflows.qha import QHARunResult

    t, p, g = QHARunResult.load(tmp_path / "qha").gibbs("fcc")
    fcc = next(ph for ph in summary["phases"] if ph["label"] == "fcc")
    np.testing.assert_allclose(fcc["gibbs_eV_per_atom"], [np.interp(300.0, t, row) for row in g], rtol=0, atol=1e-9)
    assert_user_error(_invoke("qha", folder / "POSCAR_fcc", "--labels", "a,b", "-o", tmp_path / "o"), "--labels")


def test_cli_qha_user_errors(tmp_path, emt_registry):
    poscar = tmp_path / "POSCAR"
    bulk("Cu", "fcc", a=3.6).write(poscar, format="vasp")
    assert_user_error(_invoke("qha", poscar, "--volumes=-0.02:0.02:3", "-o", tmp_path / "o"), "at least 5")
    assert_user_error(_invoke("qha", poscar, "--eos", "bm", "-o", tmp_path / "o"), "Unknown equation of state")
    assert_user_error(_invoke("qha", poscar, "--supercell", "2 x", "-o", tmp_path / "o"), "--supercell")
    assert not (tmp_path / "o" / "qha.json").exists()


# ---------------------------------------------------------------------------------------------------------
# hull
# ---------------------------------------------------------------------------------------------------------


def test_cli_hull_writes_and_prints(tmp_path, emt_registry):
    folder = tmp_path / "cands"
    folder.mkdir()
    bulk("Cu", "fcc", a=3.6).write(folder / "POSCAR_Cu", format="vasp")
    bulk("Au", "fcc", a=4.1).write(folder / "POSCAR_Au", format="vasp")
    l10 = bulk("Cu", "fcc", a=3.85, cubic=True)
    l10.symbols[[0, 1]] = "Au"
    l10.write(folder / "POSCAR_CuAu", format="vasp")
    out = tmp_path / "hull"
    result = _invoke("hull", "Cu-Au", "--structures", folder, "--pressures", "0,20", "--fmax", "0.05", "-o", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "hull.json").read_text())
    assert summary["system"] == ["Cu", "Au"] and summary["pressures_GPa"] == [0.0, 20.0]
    assert sorted(p["label"] for p in summary["phases"]) == ["Au", "Cu", "CuAu"]
    assert "0 GPa" in result.output and (out / "hulls.png").is_file() and (out / "hull.csv").is_file()


def test_cli_hull_user_errors(tmp_path, emt_registry):
    folder = tmp_path / "cands"
    folder.mkdir()
    bulk("Cu", "fcc", a=3.6).write(folder / "POSCAR_Cu", format="vasp")
    assert_user_error(_invoke("hull", "Cu-Au", "--structures", folder, "-o", tmp_path / "o"), "No elemental phase of Au")
    assert_user_error(_invoke("hull", "Cu-Au", "-o", tmp_path / "o"), "--structures")
    assert_user_error(_invoke("hull", "Cu-Qq", "--structures", folder, "-o", tmp_path / "o"), "not understood")
    assert_user_error(_invoke("hull", "Cu", "--structures", folder, "--chain", "x", "-o", tmp_path / "o"), "chain")
    assert_user_error(_invoke("hull", "Cu", "--structures", folder, "--workers", "0", "-o", tmp_path / "o"), "--workers")
    assert_user_error(_invoke("hull", "Cu", "--structures", folder, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1",
                              "-o", tmp_path / "o"), "not both")


def test_cli_hull_random_search_and_sources(tmp_path, emt_registry):
    pytest.importorskip("pyxtal")
    out = tmp_path / "search"
    result = _invoke("hull", "Cu", "--search", "2", "--compositions", "Cu", "--search-max-atoms", "2", "--seed", "1",
                     "--fmax", "0.05", "-o", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "hull.json").read_text())
    assert summary["search"]["relaxations"] == 2 and summary["search"]["seed"] == 1
    assert "random search" in result.output and "Cu-search-1" in result.output
    assert_user_error(_invoke("hull", "Cu", "-o", tmp_path / "o"), "--structures", "--mp", "--search")
    assert_user_error(_invoke("hull", "Cu", "--search", "2", "--temperature", "300", "-o", tmp_path / "o"), "--qha")
    assert_user_error(_invoke("hull", "Cu", "--search", "2", "--compositions", "Cq2", "-o", tmp_path / "o"),
                      "not a chemical formula")


def test_cli_hull_from_the_materials_project(tmp_path, emt_registry, fake_mp, monkeypatch):
    pytest.importorskip("mp_api")
    monkeypatch.setenv("MP_API_ENDPOINT", fake_mp.url)
    monkeypatch.delenv("MP_API_KEY", raising=False)
    assert_user_error(_invoke("hull", "Mg-O", "--mp", "-o", tmp_path / "o"), "MP_API_KEY")
    monkeypatch.setenv("MP_API_KEY", "k" * 32)
    result = _invoke("hull", "Cu-Au", "--mp", "--fmax", "0.05", "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "hull.json").read_text())
    assert [p["label"] for p in summary["phases"]] == ["Au-mp-81", "AuCu-mp-522", "Cu-mp-30"]
    assert any(r[0].startswith("/materials/summary") for r in fake_mp.requests)


def test_cli_elastic_of_several_crystals(tmp_path, emt_registry):
    bulk("Cu", "fcc", a=3.62).write(tmp_path / "POSCAR_Cu", format="vasp")
    bulk("Al", "fcc", a=4.05).write(tmp_path / "Al.vasp", format="vasp")
    out = tmp_path / "el"
    result = _invoke("elastic", tmp_path / "POSCAR_Cu", tmp_path / "Al.vasp", "--fmax", "0.002", "-o", out)
    assert result.exit_code == 0, result.output
    for label in ("Cu", "Al"):
        summary = json.loads((out / label / "elastic.json").read_text())
        assert summary["moduli"]["k_vrh_GPa"] > 0 and label in result.output
    assert "K_VRH" in result.output
    assert_user_error(_invoke("elastic", tmp_path / "Al.vasp", "--workers", "0", "-o", out), "--workers")
