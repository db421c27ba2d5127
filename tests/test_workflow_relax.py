"""run_relax: the relaxation workflow writes what 'mattersim relax' writes, reloads, and finds EMT's minimum."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from scipy.optimize import minimize_scalar

from mattersim.errors import InputError
from workflows.relax import RelaxRunResult, label_stem, run_relax


def _emt_fcc_a0(symbol: str) -> float:
    """EMT's fcc lattice constant by hand: the minimum of E(a) of the 1-atom cell."""
    def energy(a):
        atoms = bulk(symbol, "fcc", a=a)
        atoms.calc = EMT()
        return atoms.get_potential_energy()

    return minimize_scalar(energy, bounds=(3.3, 4.4), method="bounded", options={"xatol": 1e-8}).x


def _inputs():
    cu = bulk("Cu", "fcc", a=3.70, cubic=True)
    al = bulk("Al", "fcc", a=3.95, cubic=True)
    al.rattle(0.02, seed=1)
    return [("cu-strained.cif", cu), ("dir/al.extxyz@3", al)]


def test_run_relax_writes_the_run_folder_and_finds_emt_minimum(tmp_path):
    out = tmp_path / "relaxed"
    run = run_relax(_inputs(), EMT(), fmax=1e-4, steps=300, optimizer="BFGS", output_dir=out)
    assert run.converged and run.not_converged == []
    # physics: the relaxed cubic cells have EMT's own lattice constant (found independently by hand)
    for res, symbol in zip(run.results, ("Cu", "Al")):
        a = res.atoms.cell.cellpar()[0]
        assert a == pytest.approx(_emt_fcc_a0(symbol), abs=2e-4)
        assert abs(res.pressure) < 0.05  # GPa: the stress is relaxed away
    summary = json.loads((out / "summary.json").read_text())
    for key in ("workflow", "workflow_version", "mattersim_version", "software", "model", "settings", "units",
                "timings_s", "files", "structures"):
        assert key in summary, key
    assert summary["workflow"] == "relax" and summary["settings"]["mode"] == "full"
    assert summary["n_structures"] == summary["n_converged"] == 2
    assert sorted(e["file"] for e in summary["structures"]) == ["structures/al_3.vasp", "structures/cu-strained.vasp"]
    assert set(summary["files"]) >= {"relax.log", "summary.json", "relaxed.extxyz", "structures/al_3.vasp"}
    frames = ase.io.read(out / "relaxed.extxyz", ":")
    assert [f.info["converged"] for f in frames] == [True, True]
    assert np.allclose(frames[0].cell[:], run.results[0].atoms.cell[:])
    # the run reloads with the same numbers and the same printed rows
    again = RelaxRunResult.load(out)
    assert again.labels == run.labels and again.rows() == run.rows()
    assert [r.energy for r in again.results] == pytest.approx([r.energy for r in run.results], abs=1e-9)


def test_without_output_dir_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atoms = bulk("Cu", "fcc", a=3.62)
    run = run_relax(atoms, EMT(), fmax=1e-3)
    assert run.output_dir is None and run.files == [] and list(tmp_path.iterdir()) == []
    assert run.labels == ["structure_0"] and run.results[0].converged


def test_non_convergence_is_reported(tmp_path):
    run = run_relax(_inputs(), EMT(), fmax=1e-6, steps=1, output_dir=tmp_path / "o")
    assert not run.converged and run.not_converged == ["cu-strained.cif", "dir/al.extxyz@3"]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["n_converged"] == 0
    assert "NOT converged" in (tmp_path / "o" / "relax.log").read_text()


def test_bad_inputs_are_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        run_relax(_inputs(), EMT(), output_dir=tmp_path / "file")
    with pytest.raises(InputError, match="structure_format"):
        run_relax(_inputs(), EMT(), structure_format="xyz")
    with pytest.raises(InputError, match="mode"):
        run_relax(_inputs(), EMT(), mode="sideways")
    with pytest.raises(InputError, match="structure 0 is a str"):
        run_relax(["POSCAR"], EMT())
    with pytest.raises(InputError, match="relaxed.extxyz' does not exist"):
        RelaxRunResult.load(tmp_path)


def test_label_stems():
    assert label_stem("dir/al.cif") == "al" and label_stem("dir/many.extxyz@3") == "many_3"
    assert label_stem("dir/POSCAR") == "POSCAR"
