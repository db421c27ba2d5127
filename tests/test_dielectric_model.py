"""The shipped dielectric model (mattersim-dielectric): offline loading, symmetry of its predictions, a
regression guard on recorded values, and the composite potential+dielectric driving the phonon workflow."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from scipy.spatial.transform import Rotation

from mattersim.composite import DielectricModel
from mattersim.dielectric import MODEL_DIR
from mattersim.registry import load_calculator

CARD = MODEL_DIR / "card.json"
pytestmark = [pytest.mark.skipif(not CARD.is_file(), reason="the shipped dielectric model is not in this checkout"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def shipped_files(monkeypatch):
    monkeypatch.delenv("MATTERSIM_DIELECTRIC_DIR", raising=False)  # the shipped files, not a test folder


@pytest.fixture(scope="module")
def model() -> DielectricModel:
    return load_calculator("mattersim-dielectric")


def sic():
    return bulk("SiC", "zincblende", a=4.38)


def test_ships_offline_as_a_small_ensemble(model):
    card = json.loads(CARD.read_text())
    files = sorted(MODEL_DIR.glob("member_*.pth"))
    assert len(files) >= 3 and len(model.members) == len(files)
    assert sum(f.stat().st_size for f in files) < 20e6  # all members together under 20 MB
    assert model.model_info["name"] == "mattersim-dielectric" and model.model_info["version"] == card["version"]
    assert "CC BY 4.0" in model.model_info["license"]


def test_predictions_obey_symmetry(model):
    atoms = bulk("GaN", "wurtzite", a=3.19, c=5.19)
    rot = Rotation.random(random_state=4).as_matrix()
    turned = atoms.copy()
    turned.set_cell(atoms.cell[:] @ rot.T)
    turned.positions = atoms.positions @ rot.T
    a, b = model.calculate_batch([atoms, turned])
    born_a, born_b = a["born_effective_charges"], b["born_effective_charges"]
    np.testing.assert_allclose(born_b, np.einsum("ij,njk,lk->nil", rot, born_a, rot), atol=2e-5)
    np.testing.assert_allclose(b["dielectric_tensor"], rot @ a["dielectric_tensor"] @ rot.T, atol=2e-5)
    np.testing.assert_allclose(born_a.sum(axis=0), 0, atol=1e-5)  # charge neutrality
    eps = a["dielectric_tensor"]
    np.testing.assert_allclose(eps, eps.T, atol=1e-6)
    assert np.linalg.eigvalsh(eps).min() > 1.0
    # physically sensible for a polar semiconductor: cation positive, anion negative, eps_inf a few
    symbols = atoms.get_chemical_symbols()
    for sym, z in zip(symbols, born_a):
        assert (np.trace(z) / 3 > 1.5) if sym == "Ga" else (np.trace(z) / 3 < -1.5), (sym, np.trace(z) / 3)
    assert 3.0 < np.trace(eps) / 3 < 10.0


def unseen_crystals():
    """Crystals built by hand (not PhononDB's relaxed cells): two elemental, two polar."""
    return {"Si": bulk("Si", "diamond", a=5.43), "Ge": bulk("Ge", "diamond", a=5.66),
            "GaAs": bulk("GaAs", "zincblende", a=5.65), "LiF": bulk("LiF", "rocksalt", a=4.03)}


def assert_physical(born, eps, label):
    """Z* charge-neutral, eps_inf symmetric positive definite with eigenvalues >= 1."""
    born, eps = np.asarray(born, dtype=float), np.asarray(eps, dtype=float)
    np.testing.assert_allclose(born.sum(axis=0), 0, atol=1e-9, err_msg=label)
    np.testing.assert_allclose(eps, eps.T, atol=1e-9, err_msg=label)
    assert np.linalg.eigvalsh(eps).min() >= 1.0, (label, np.linalg.eigvalsh(eps))


def test_every_member_and_the_mean_are_physical_on_unseen_crystals(model):
    """Issue 11: members used to be stretched around their mean into eps_inf < 0 (Si -17) and Z*(Ga) < 0.
    Every member, the mean and the Python API's predictor path obey the physical bounds; Si and Ge, whose
    atoms are equivalent, get Z* = 0 exactly, with zero spread."""
    crystals = unseen_crystals()
    for (name, atoms), res in zip(crystals.items(), model.calculate_batch(list(crystals.values()))):
        assert_physical(res["born_effective_charges"], res["dielectric_tensor"], f"{name} mean")
        assert len(res["members"]) == len(model.members)
        for k, (born, eps) in enumerate(res["members"]):
            assert_physical(born, eps, f"{name} member {k}")
        assert np.all(res["dielectric_tensor_std"] >= 0) and np.all(np.isfinite(res["dielectric_tensor_std"]))
        if name in ("Si", "Ge"):
            assert np.all(res["born_effective_charges"] == 0.0) and np.all(res["born_effective_charges_std"] == 0.0)
        born, eps = model.predict_dielectric(atoms)
        assert_physical(born, eps, f"{name} predict_dielectric")
        for born_k, eps_k in model.uncertainty["members"]:
            assert_physical(born_k, eps_k, f"{name} uncertainty member")
    gaas = model.calculate_batch([crystals["GaAs"]])[0]
    for born, _ in gaas["members"]:
        assert np.trace(born[0]) / 3 > 1.0  # Ga is a cation in every member


def test_cli_predict_writes_physical_values(tmp_path):
    import ase.io
    from typer.testing import CliRunner

    from mattersim.cli import app

    crystals = unseen_crystals()
    path = tmp_path / "unseen.extxyz"
    ase.io.write(path, list(crystals.values()))
    out = tmp_path / "z.extxyz"
    result = CliRunner().invoke(app, ["predict", str(path), "--model", "mattersim-dielectric", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for name, frame in zip(crystals, ase.io.read(out, ":")):
        data = {**frame.info, **frame.arrays, **(frame.calc.results if frame.calc else {})}
        born = np.reshape(data["born_effective_charges"], (-1, 3, 3))
        eps = np.reshape(data["dielectric_tensor"], (3, 3))
        assert_physical(born, eps, f"{name} (predict)")
        eps_std = np.reshape(data["dielectric_tensor_std"], (3, 3))
        assert np.all(eps_std >= 0)


def test_regression_guard_on_recorded_values(model):
    """The shipped weights reproduce the values recorded in card.json when they were packaged."""
    card = json.loads(CARD.read_text())
    from ase import Atoms

    for name, rec in card["regression"].items():
        atoms = Atoms(numbers=rec["numbers"], cell=rec["cell"], scaled_positions=rec["scaled_positions"], pbc=True)
        res = model.calculate_batch([atoms])[0]
        np.testing.assert_allclose(res["born_effective_charges"], rec["born_effective_charges"], atol=2e-4, err_msg=name)
        np.testing.assert_allclose(res["dielectric_tensor"], rec["dielectric_tensor"], atol=2e-4, err_msg=name)
        np.testing.assert_allclose(res["dielectric_tensor_std"], rec["dielectric_tensor_std"], atol=2e-4, err_msg=name)


def test_composite_drives_the_phonon_workflow(tmp_path):
    from workflows.phonon import run_phonon

    calc = load_calculator("sevennet-0+mattersim-dielectric")
    result = run_phonon(sic(), calc, supercell=(2, 2, 2), primitive="auto", nac=True, relax=False,
                        mesh=(6, 6, 6), output_dir=tmp_path, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    nac = summary["nac"]
    assert "mattersim-dielectric" in json.dumps(summary["model"])
    lo = nac["gamma_lo_to"]["directions"][0]
    assert lo["lo_frequencies"][0] > max(lo["to_frequencies"]) + 0.5  # a clear LO-TO splitting in SiC
    assert nac["uncertainty"]["n_members"] >= 3 and lo["lo_frequencies_std"][0] >= 0
    # every member is physical, so every member's LO lies above the TO modes (LO^2 = TO^2 + a positive term)
    spread = nac["uncertainty"]["gamma_lo_to"]
    assert spread["propagation"].startswith("first order") and spread["spread_scale"]["born"] > 1
    for d, s in zip(nac["gamma_lo_to"]["directions"], spread["directions"]):
        assert np.min(s["member_lo_frequencies"]) > max(d["to_frequencies"])
    assert result is not None


@pytest.mark.parametrize("name", ["Si", "GaAs"])
def test_phonon_nac_path_is_physical_on_unseen_crystals(name, tmp_path):
    """The phonon workflow's NAC output path: the Z*/eps_inf it uses and writes (summary, BORN) obey the
    bounds, Si's Z* are exactly zero (no LO-TO splitting), and every member's LO lies at or above the TO."""
    from workflows.phonon import run_phonon

    atoms = unseen_crystals()[name]
    calc = load_calculator("sevennet-0+mattersim-dielectric")
    run_phonon(atoms, calc, supercell=(2, 2, 2), nac=True, relax=False, mesh=(4, 4, 4), output_dir=tmp_path,
               progress=False)
    nac = json.loads((tmp_path / "summary.json").read_text())["nac"]
    born, eps = np.asarray(nac["born"]), np.asarray(nac["epsilon"])
    assert_physical(born, eps, f"{name} phonon summary")
    assert nac["uncertainty"]["n_members"] == len(load_calculator("mattersim-dielectric").members)
    for d, s in zip(nac["gamma_lo_to"]["directions"], nac["uncertainty"]["gamma_lo_to"]["directions"]):
        member_lo = np.ravel(s["member_lo_frequencies"])
        if member_lo.size:
            assert member_lo.min() >= max(d["to_frequencies"]) - 1e-6
    if name == "Si":
        assert np.all(born == 0.0)
        assert all(not d["lo_frequencies"] for d in nac["gamma_lo_to"]["directions"])  # no splitting
