"""The property-only dielectric model (``mattersim-dielectric``), composites ``A+B`` and the NAC uncertainty.

Three tiny random multi-task models stand in for the real ensemble members; ``MATTERSIM_DIELECTRIC_DIR``
points the registry at them (or at an empty folder), so the tests do not depend on whether the real member
files are installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from typer.testing import CliRunner

from conftest import assert_user_error
from mattersim import registry
from mattersim.calculator import evaluate_batch
from mattersim.composite import ENV_DIELECTRIC_DIR, CompositeCalculator, DielectricModel, load_dielectric
from mattersim.errors import InputError, ModelNotAvailableError
from mattersim.potential import Potential

TASKS = ["born_effective_charges", "dielectric_tensor"]
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def members_dir(tmp_path_factory) -> Path:
    """member_0..2.pth: tiny random multi-task models with the two dielectric heads, different seeds."""
    from mattersim.checkpoint import save_model
    from mattersim.multitask import MultiTaskModel, build_backbone

    folder = tmp_path_factory.mktemp("dielectric")
    for k in range(3):
        torch.manual_seed(100 + k)
        model = MultiTaskModel(
            build_backbone({"kind": "transformer", "width": 16, "num_blocks": 1, "num_heads": 2, "num_gaussians": 8}),
            TASKS, {"width": 16, "num_heads": 2, "channels": 2},
        )
        save_model(folder / f"member_{k}.pth", model)
    (folder / "card.json").write_text(json.dumps({"version": "0.0-test"}))
    return folder


@pytest.fixture
def installed(members_dir, monkeypatch) -> Path:
    """The fake members are 'the installed model'."""
    monkeypatch.setenv(ENV_DIELECTRIC_DIR, str(members_dir))
    return members_dir


@pytest.fixture
def not_installed(tmp_path, monkeypatch) -> Path:
    empty = tmp_path / "no-members"
    empty.mkdir()
    monkeypatch.setenv(ENV_DIELECTRIC_DIR, str(empty))
    return empty


def _rocksalt():
    return bulk("NaCl", "rocksalt", a=5.64)


def _by_hand(members_dir: Path, structures, symmetrize: bool = True):
    """Each member's own (born, eps) per structure, straight from Potential.predict (one structure per call,
    so in another summation order than the model's batch), symmetrised like the model's output."""
    from mattersim.composite import symmetrize_dielectric

    pots = [Potential.from_checkpoint(members_dir / f"member_{k}.pth") for k in range(3)]
    out = []
    for p in pots:
        rows = []
        for atoms in structures:
            (r,) = p.predict([atoms], forces=False, stress=False)
            z, e = r["born_effective_charges"], r["dielectric_tensor"]
            rows.append(symmetrize_dielectric(atoms, z, e) if symmetrize else (z, e))
        out.append(rows)
    return out


# float32 model outputs of order 1, summed in another order (batch vs single structure): they agree to a few
# float32 ulps (~1e-7 relative); symmetrisation and the mean/std are float64 and add nothing of that size
F32 = dict(rtol=1e-5, atol=1e-6)


def test_load_by_registry_name_and_means_stds_equal_numpy(installed):
    calc = registry.load_calculator("mattersim-dielectric")
    assert isinstance(calc, DielectricModel) and len(calc.members) == 3
    structures = [_rocksalt(), bulk("CaF2", "fluorite", a=5.46)]
    results = calc.calculate_batch(structures)
    per_member = _by_hand(installed, structures)
    for i, (atoms, res) in enumerate(zip(structures, results)):
        born = np.stack([per_member[k][i][0] for k in range(3)])
        eps = np.stack([per_member[k][i][1] for k in range(3)])
        assert res["born_effective_charges"].shape == (len(atoms), 3, 3) and res["dielectric_tensor"].shape == (3, 3)
        np.testing.assert_allclose(res["born_effective_charges"], born.mean(axis=0), **F32)
        np.testing.assert_allclose(res["born_effective_charges_std"], born.std(axis=0), **F32)
        np.testing.assert_allclose(res["dielectric_tensor"], eps.mean(axis=0), **F32)
        np.testing.assert_allclose(res["dielectric_tensor_std"], eps.std(axis=0), **F32)
        assert len(res["members"]) == 3
        for k, (b, e) in enumerate(res["members"]):
            np.testing.assert_allclose(b, born[k], **F32)
            np.testing.assert_allclose(e, eps[k], **F32)
        assert res["born_effective_charges_std"].max() > 0  # different seeds: a real spread

    # the predictor protocol: means, and the uncertainty the phonon workflow picks up
    # (one structure per call here, a batch of two above: float32 sums in another order)
    born, eps = calc.predict_dielectric(structures[0])
    np.testing.assert_allclose(born, results[0]["born_effective_charges"], **F32)
    np.testing.assert_allclose(calc.uncertainty["born"], results[0]["born_effective_charges_std"], **F32)
    np.testing.assert_allclose(calc.uncertainty["epsilon"], results[0]["dielectric_tensor_std"], **F32)
    assert len(calc.uncertainty["members"]) == 3

    # the ASE interface gives the same numbers, with the stds in results
    atoms = structures[0].copy()
    atoms.calc = calc
    np.testing.assert_allclose(calc.get_property("dielectric_tensor", atoms), results[0]["dielectric_tensor"], **F32)
    np.testing.assert_allclose(calc.get_property("born_effective_charges_std", atoms),
                               results[0]["born_effective_charges_std"], **F32)


def _assert_physical(born, eps, label=""):
    """Z* charge-neutral, eps_inf symmetric with eigenvalues >= 1 (float32 members: to 1e-6)."""
    np.testing.assert_allclose(np.sum(born, axis=0), 0, atol=1e-6, err_msg=label)
    np.testing.assert_allclose(eps, np.transpose(eps), atol=1e-6, err_msg=label)
    assert np.linalg.eigvalsh(eps).min() >= 1 - 1e-6, (label, np.linalg.eigvalsh(eps))


def test_spread_calibration_scales_the_std_never_the_members(members_dir, tmp_path):
    """card.json's spread_scale multiplies the reported std; the members stay the models' own predictions."""
    import shutil

    folder = tmp_path / "calibrated"
    shutil.copytree(members_dir, folder)
    (folder / "card.json").write_text(json.dumps({"version": "0.0-test",
                                                  "spread_scale": {"born_effective_charges": 30.0,
                                                                   "dielectric_tensor": 50.0}}))
    structures = [_rocksalt(), bulk("GaAs", "zincblende", a=5.65), bulk("LiF", "rocksalt", a=4.03)]
    raw = load_dielectric(members_dir).calculate_batch(structures)
    model = load_dielectric(folder)
    assert model.model_info["spread_scale"]["born_effective_charges"] == 30.0
    for atoms, r, cal in zip(structures, raw, model.calculate_batch(structures)):
        for prop, k in (("born_effective_charges", 30.0), ("dielectric_tensor", 50.0)):
            np.testing.assert_allclose(cal[prop], r[prop], atol=1e-12)
            np.testing.assert_allclose(cal[f"{prop}_std"], k * r[f"{prop}_std"], atol=1e-12)
        # a large k used to stretch members into eps_inf < 1 and non-neutral charges; now they are untouched
        for (b, e), (b0, e0) in zip(cal["members"], r["members"]):
            np.testing.assert_allclose(b, b0, atol=1e-12)
            np.testing.assert_allclose(e, e0, atol=1e-12)
            _assert_physical(b, e, atoms.get_chemical_formula())
        _assert_physical(cal["born_effective_charges"], cal["dielectric_tensor"])
    born, eps = model.predict_dielectric(structures[1])
    assert model.uncertainty["spread_scale"] == {"born": 30.0, "epsilon": 50.0}
    with pytest.raises(InputError, match="spread_scale"):
        DielectricModel(model.members, spread_scale={"dielectric_tensor": -1.0})


def test_equivalent_atoms_get_exactly_zero_charges(installed):
    """Si and Cu: every atom equivalent by symmetry, so neutrality forces Z* = 0; the model gives exact zeros
    (the raw float32 network gives ~1e-7), for the mean, the std and every member."""
    model = load_dielectric()
    si, cu = bulk("Si", "diamond", a=5.43), bulk("Cu", "fcc", a=3.6)
    for atoms in (si, cu, si * (2, 1, 1)):
        res = model.calculate_batch([atoms])[0]
        assert np.all(res["born_effective_charges"] == 0.0) and np.all(res["born_effective_charges_std"] == 0.0)
        for born, eps in res["members"]:
            assert np.all(born == 0.0)
            if len(atoms) <= 2:  # the primitive cells are cubic: eps_inf isotropic (a supercell keeps fewer ops)
                assert eps[0, 1] == 0.0 and eps[0, 0] == pytest.approx(eps[1, 1], rel=1e-14)
    raw = model.members[0].predict([si], forces=False, stress=False)[0]["born_effective_charges"]
    assert np.abs(raw).max() > 0  # what symmetrisation fixes: round-off of the raw network
    # symmetry lowered: a distorted structure keeps its own (non-zero) charges, still neutral
    distorted = si * (2, 1, 1)  # (two identical atoms alone are always related by an inversion)
    distorted.positions[0] += [0.05, 0.0, 0.02]
    z = model.calculate_batch([distorted])[0]["born_effective_charges"]
    assert np.abs(z).max() > 0
    np.testing.assert_allclose(z.sum(axis=0), 0, atol=1e-12)


def test_model_info_and_registry_listing(installed):
    calc = registry.load_calculator("mattersim-dielectric")
    info = calc.model_info
    hashes = [registry.file_sha256(installed / f"member_{k}.pth") for k in range(3)]
    import hashlib

    assert (info["name"], info["kind"], info["version"]) == ("mattersim-dielectric", "dielectric", "0.0-test")
    assert info["sha256"] == hashlib.sha256("".join(hashes).encode()).hexdigest()
    assert [m["file"] for m in info["members"]] == ["member_0.pth", "member_1.pth", "member_2.pth"]
    assert [m["sha256"] for m in info["members"]] == hashes
    assert info["source"] == str(installed.resolve())
    assert "PhononDB" in info["license"] and "CC BY 4.0" in info["license"]
    row = {r["name"]: r for r in registry.list_models()}["mattersim-dielectric"]
    assert row["available"] and row["path"] == str(installed) and row["version"] == "0.0-test"


def test_energy_request_errors_clearly(installed):
    calc = load_dielectric()
    atoms = _rocksalt()
    atoms.calc = calc
    expected = "mattersim-dielectric predicts Z* and eps_inf only; combine it with a potential, e.g. --model sevennet-0+mattersim-dielectric"
    with pytest.raises(InputError) as info:
        atoms.get_potential_energy()
    assert expected in str(info.value)
    with pytest.raises(InputError, match="predicts Z\\* and eps_inf only"):
        atoms.get_forces()
    with pytest.raises(InputError, match="predicts Z\\* and eps_inf only"):
        evaluate_batch(calc, [atoms])
    from workflows.phonon import run_phonon

    with pytest.raises(InputError, match="predicts Z\\* and eps_inf only"):
        run_phonon(atoms, calc, relax=False, supercell=1, progress=False)


def test_missing_members_raise_model_not_available(not_installed, tmp_path):
    with pytest.raises(ModelNotAvailableError) as info:
        registry.load_calculator("mattersim-dielectric")
    message = str(info.value)
    assert str(not_installed) in message and "member_K.pth" in message and "mattersim train" in message
    assert ENV_DIELECTRIC_DIR in message and "\n" not in message
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        load_dielectric(tmp_path / "nowhere")
    row = {r["name"]: r for r in registry.list_models()}["mattersim-dielectric"]
    assert row["available"] is False and row["path"] is None
    assert not registry.is_available("mattersim-dielectric")
    with pytest.raises(ModelNotAvailableError, match="is not downloaded"):
        registry.download_model("mattersim-dielectric")


def test_member_without_dielectric_heads_is_refused(tmp_path):
    from mattersim.checkpoint import save_model
    from mattersim.errors import CheckpointError
    from mattersim.multitask import MultiTaskModel, build_backbone

    torch.manual_seed(0)
    model = MultiTaskModel(build_backbone({"kind": "transformer", "width": 16, "num_blocks": 1, "num_heads": 2,
                                           "num_gaussians": 8}), ["charges"], {"width": 16, "num_heads": 2, "channels": 2})
    save_model(tmp_path / "member_0.pth", model)
    with pytest.raises(CheckpointError, match="no born_effective_charges and no dielectric_tensor head"):
        load_dielectric(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# default model
# ---------------------------------------------------------------------------------------------------------


def test_default_model_with_and_without_members(members_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(registry.ENV_HOME, str(tmp_path / "cache"))
    available = {"sevennet-0", "chgnet"}
    monkeypatch.setattr(registry, "_weights_file", _fake_weights(available))

    monkeypatch.setenv(ENV_DIELECTRIC_DIR, str(tmp_path / "empty"))
    assert registry.default_model() == "sevennet-0"
    monkeypatch.setenv(ENV_DIELECTRIC_DIR, str(members_dir))
    assert registry.default_model() == "sevennet-0+mattersim-dielectric"
    available.discard("sevennet-0")
    assert registry.default_model() == "chgnet+mattersim-dielectric"
    available.add("mattersim-v1.0.0-1M")
    assert registry.default_model() == "mattersim-v1.0.0-1M+mattersim-dielectric"
    available.clear()
    with pytest.raises(ModelNotAvailableError, match="No model is available offline"):
        registry.default_model()  # the dielectric model alone is no default


def _fake_weights(available: set):
    real = registry._weights_file

    def weights_file(spec):
        if spec.kind == "dielectric":
            return real(spec)
        return Path("/fake") / spec.name if spec.name in available else None

    return weights_file


# ---------------------------------------------------------------------------------------------------------
# composites
# ---------------------------------------------------------------------------------------------------------


def test_composite_model_info_and_properties(installed):
    dielectric = load_dielectric()
    calc = CompositeCalculator(EMT(), dielectric)
    info = calc.model_info
    assert (info["name"], info["kind"], info["sha256"]) == ("EMT+mattersim-dielectric", "composite", None)
    assert info["potential"]["name"] == "EMT" and info["properties"] == dielectric.model_info
    assert not hasattr(calc, "calculate_batch")  # EMT cannot batch, so neither does the composite

    atoms = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    atoms.rattle(0.05, seed=3)
    ref = atoms.copy()
    ref.calc = EMT()
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), ref.get_forces(), atol=1e-12)
    np.testing.assert_allclose(atoms.get_stress(), ref.get_stress(), atol=1e-12)
    expected = dielectric.calculate_batch([atoms])[0]
    np.testing.assert_allclose(calc.get_property("born_effective_charges", atoms), expected["born_effective_charges"], atol=1e-12)
    np.testing.assert_allclose(calc.get_property("dielectric_tensor", atoms), expected["dielectric_tensor"], atol=1e-12)

    # workflows.nac finds it, and the uncertainty travels with it
    from workflows.nac import find_predictor, resolve_born

    assert find_predictor(calc) is calc
    born = resolve_born(calculator=calc, primitive_atoms=_rocksalt())
    assert born.source == "model EMT+mattersim-dielectric"
    assert set(born.uncertainty) == {"born", "epsilon", "members", "spread_scale"} and len(born.uncertainty["members"]) == 3


def test_registry_composites(installed, small_checkpoint):
    calc = registry.load_calculator(f"{small_checkpoint}+mattersim-dielectric")
    assert isinstance(calc, CompositeCalculator) and hasattr(calc, "calculate_batch")
    info = calc.model_info
    assert info["kind"] == "composite" and info["name"] == f"{small_checkpoint.stem}+mattersim-dielectric"
    assert info["potential"]["sha256"] == registry.file_sha256(small_checkpoint)
    assert info["properties"]["kind"] == "dielectric"
    atoms = bulk("Si", "diamond", a=5.43)
    (res,) = calc.calculate_batch([atoms])  # the potential only: what phonons and relaxations need
    assert {"energy", "forces", "stress"} <= set(res) and "born_effective_charges" not in res

    # a single multi-task checkpoint as the property model: no uncertainty
    calc1 = registry.load_calculator(f"{small_checkpoint}+{installed / 'member_1.pth'}")
    assert calc1.model_info["properties"]["name"] == "member_1"
    born, eps = calc1.predict_dielectric(atoms)
    assert born.shape == (2, 3, 3) and eps.shape == (3, 3) and calc1.uncertainty is None

    with pytest.raises(InputError, match="is a potential, not a property model"):
        registry.load_calculator(f"{small_checkpoint}+chgnet")
    with pytest.raises(InputError, match="cannot be the potential"):
        registry.load_calculator("mattersim-dielectric+mattersim-dielectric")
    with pytest.raises(InputError, match="POTENTIAL\\+PROPERTY_MODEL"):
        registry.load_calculator("+mattersim-dielectric")


def test_chgnet_composite_by_name(installed):
    pytest.importorskip("chgnet")
    calc = registry.load_calculator("chgnet+mattersim-dielectric")
    info = calc.model_info
    assert info["name"] == "chgnet+mattersim-dielectric"
    assert info["potential"]["name"] == "chgnet" and info["properties"]["name"] == "mattersim-dielectric"


def test_phonon_forces_key_follows_the_potential(installed):
    from workflows.outputs import run_key

    potential_info = {"name": "EMT", "version": None, "kind": "ase", "source": "ase.calculators.emt", "sha256": None}
    composite = CompositeCalculator(registry.load_calculator(EMT()), load_dielectric())
    atoms = _rocksalt()
    assert run_key(atoms.get_chemical_formula(), {}, composite.model_info) == run_key(atoms.get_chemical_formula(), {}, potential_info)


# ---------------------------------------------------------------------------------------------------------
# phonons with NAC from the ensemble, and its uncertainty
# ---------------------------------------------------------------------------------------------------------


def _cuau():
    """A rocksalt (B1) CuAu toy crystal that EMT can evaluate: a pipeline test, not physics."""
    return bulk("CuAu", "rocksalt", a=5.0)


@pytest.fixture(scope="module")
def nac_run(members_dir, tmp_path_factory):
    from workflows.phonon import run_phonon

    calc = CompositeCalculator(EMT(), load_dielectric(members_dir))
    out = tmp_path_factory.mktemp("cuau") / "out"
    result = run_phonon(_cuau(), calc, relax=False, supercell=(2, 2, 2), mesh=(4, 4, 4), nac=True,
                        output_dir=out, progress=False)
    return calc, result, out


def test_run_phonon_reports_nac_uncertainty(nac_run):
    from workflows.nac import BornCharges, symmetrize

    calc, result, out = nac_run
    summary = json.loads((out / "summary.json").read_text())
    nac = summary["nac"]
    assert nac["enabled"] and nac["source"] == "model EMT+mattersim-dielectric"
    assert summary["model"]["kind"] == "composite" and summary["model"]["potential"]["name"] == "EMT"
    assert summary["model"]["properties"]["name"] == "mattersim-dielectric"
    unc = nac["uncertainty"]
    assert unc["n_members"] == 3
    assert len(unc["born_std_max_per_atom"]) == 2 and min(unc["born_std_max_per_atom"]) > 0
    assert np.shape(unc["epsilon_std"]) == (3, 3) and unc["epsilon_std_max"] > 0

    # redo the LO evaluation by hand with every member's symmetrised (Z*, eps_inf) on the same force constants
    primitive = _cuau()
    members = calc.property_model.calculate_batch([primitive])[0]["members"]
    ph = result.phonopy
    lo_to = nac["gamma_lo_to"]
    assert [d["direction"] for d in lo_to["directions"]] == [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    mean_params = dict(ph.nac_params)
    freqs = []
    for born, eps in members:
        sym, _ = symmetrize(BornCharges(born, eps), primitive)
        ph.nac_params = sym.to_phonopy_nac_params(method="gonze")
        row = []
        for entry in lo_to["directions"]:
            ph.run_qpoints([[0, 0, 0]], nac_q_direction=entry["q_direction_reduced"])
            row.append(np.sort(ph.qpoints.frequencies[0]))
        freqs.append(row)
    ph.nac_params = mean_params
    std = np.asarray(freqs).std(axis=0)
    spread = unc["gamma_lo_to"]
    assert spread["n_members"] == 3
    for j, entry in enumerate(lo_to["directions"]):
        lo = entry["lo_indices"]
        assert len(lo) == 1  # one LO mode of a cubic diatomic crystal, raised along every direction
        np.testing.assert_allclose(entry["lo_frequencies_std"], std[j, lo], atol=1e-9)
        np.testing.assert_allclose(spread["directions"][j]["lo_frequencies_std"], std[j, lo], atol=1e-9)
        assert len(entry["to_frequencies_std"]) == len(entry["to_frequencies"])
        assert entry["lo_frequencies_std"][0] > 1e-4
        assert np.shape(spread["directions"][j]["member_lo_frequencies"]) == (3, 1)


def test_lo_spread_with_a_calibrated_spread_is_first_order_propagation(nac_run):
    """With spread_scale (k_Z, k_eps) the LO std is the std over members of k_Z dZ_k + k_eps de_k, where
    dZ_k / de_k change only Z* / only eps_inf to the member's (physical) values; redone here by hand."""
    from dataclasses import replace

    from workflows.nac import BornCharges, gamma_lo_to, lo_to_spread, symmetrize

    calc, result, out = nac_run
    ph = result.phonopy
    reference = gamma_lo_to(ph)
    primitive = _cuau()
    members = [symmetrize(BornCharges(b, e), primitive)[0]
               for b, e in calc.property_model.calculate_batch([primitive])[0]["members"]]
    mean = BornCharges(np.asarray(ph.nac_params["born"]), np.asarray(ph.nac_params["dielectric"]))
    mean_params = dict(ph.nac_params)
    directions = [d["q_direction_reduced"] for d in reference["directions"]]

    def freqs(charges):
        ph.nac_params = charges.to_phonopy_nac_params(method="gonze")
        rows = []
        for q in directions:
            ph.run_qpoints([[0, 0, 0]], nac_q_direction=q)
            rows.append(np.sort(ph.qpoints.frequencies[0]))
        return np.asarray(rows)

    f0 = freqs(mean)
    dev = np.asarray([2.0 * (freqs(replace(mean, born=m.born)) - f0) + 3.0 * (freqs(replace(mean, epsilon=m.epsilon)) - f0)
                      for m in members])
    plain = np.asarray([freqs(m) for m in members]).std(axis=0)
    ph.nac_params = mean_params
    spread = lo_to_spread(ph, members, reference, spread_scale={"born": 2.0, "epsilon": 3.0})
    assert spread["spread_scale"] == {"born": 2.0, "epsilon": 3.0} and spread["propagation"].startswith("first order")
    unit = lo_to_spread(ph, members, reference, spread_scale={"born": 1.0, "epsilon": 1.0})
    for j, entry in enumerate(reference["directions"]):
        lo = entry["lo_indices"]
        np.testing.assert_allclose(spread["directions"][j]["lo_frequencies_std"], dev.std(axis=0)[j, lo], rtol=1e-9)
        # k = 1: the members' own spread (exact, not linearised)
        np.testing.assert_allclose(unit["directions"][j]["lo_frequencies_std"], plain[j, lo], rtol=1e-9)
        # members' LO frequencies are the physical members', not stretched ones
        np.testing.assert_allclose(np.asarray(spread["directions"][j]["member_lo_frequencies"])[:, 0],
                                   [freqs(m)[j, lo[0]] for m in members], rtol=1e-9)
    ph.nac_params = mean_params


def test_run_phonon_leaves_the_mean_results_intact(nac_run):
    """The member evaluations run on a copy: band structure, files and NAC parameters are the mean's."""
    calc, result, out = nac_run
    for name in ("band.yaml", "BORN", "phonopy.yaml", "band_dos.png"):
        assert (out / name).is_file(), name
    born = np.asarray(result.summary["nac"]["born"])
    np.testing.assert_allclose(result.phonopy.nac_params["born"], born, atol=1e-12)


def test_uncertainty_without_members_reports_stds_only():
    from workflows.nac import BornCharges, FixedDielectric, resolve_born, symmetrize_members, uncertainty_report

    z = np.array([1.1, -1.1])
    predictor = FixedDielectric(z, 2.5, uncertainty={"born": np.full((2, 3, 3), 0.01), "epsilon": np.full((3, 3), 0.2)})
    born = resolve_born(predictor=predictor, primitive_atoms=_rocksalt())
    assert symmetrize_members(born, _rocksalt()) == []
    report = uncertainty_report(born, [])
    assert report["born_std_max_per_atom"] == [0.01, 0.01] and report["epsilon_std_max"] == 0.2
    assert report["n_members"] is None and "gamma_lo_to" not in report
    assert uncertainty_report(BornCharges(z, 2.5)) is None


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------


def test_cli_predict_with_the_dielectric_model(installed, tmp_path):
    from mattersim.cli import app

    structures = [_rocksalt(), bulk("CaF2", "fluorite", a=5.46)]  # 2 and 3 atoms (a 3x3 tensor per frame)
    path = tmp_path / "two.extxyz"
    ase.io.write(path, structures)
    out = tmp_path / "out.extxyz"
    result = runner.invoke(app, ["predict", str(path), "--model", "mattersim-dielectric", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "ε∞" in result.stdout and "E (eV)" not in result.stdout

    expected = load_dielectric().calculate_batch(structures)
    text = out.read_text()
    frames = ase.io.read(out, ":")
    assert len(frames) == 2
    for atoms, frame, ref in zip(structures, frames, expected):
        n = len(atoms)
        data = {**frame.info, **frame.arrays, **(frame.calc.results if frame.calc else {})}
        assert "energy" not in data and "forces" not in data and "stress" not in data
        assert np.shape(data["born_effective_charges"]) == (n, 9)
        assert np.shape(data["born_effective_charges_std"]) == (n, 9)
        assert np.size(data["dielectric_tensor"]) == 9 and np.size(data["dielectric_tensor_std"]) == 9
        # row-major 9 numbers, phonopy's convention born[atom][field][displacement]
        np.testing.assert_allclose(np.reshape(data["born_effective_charges"], (n, 3, 3)), ref["born_effective_charges"], atol=1e-7)
        np.testing.assert_allclose(np.reshape(data["born_effective_charges_std"], (n, 3, 3)),
                                   ref["born_effective_charges_std"], atol=1e-7)
        np.testing.assert_allclose(np.reshape(data["dielectric_tensor"], (3, 3)), ref["dielectric_tensor"], atol=1e-7)
        np.testing.assert_allclose(np.reshape(data["dielectric_tensor_std"], (3, 3)), ref["dielectric_tensor_std"], atol=1e-7)
        assert frame.info["model_name"] == "mattersim-dielectric"
    assert "_JSON" not in text  # plain numbers, readable by any extxyz reader


def test_cli_predict_composite_writes_both(installed, small_checkpoint, tmp_path):
    from mattersim.cli import app

    path = tmp_path / "one.extxyz"
    ase.io.write(path, [_rocksalt()])
    out = tmp_path / "out.json"
    result = runner.invoke(app, ["predict", str(path), "--model", f"{small_checkpoint}+mattersim-dielectric", "-o", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    (s,) = doc["structures"]
    assert {"energy", "forces", "stress", "born_effective_charges", "dielectric_tensor_std"} <= set(s)
    assert doc["model"]["kind"] == "composite" and doc["model"]["properties"]["name"] == "mattersim-dielectric"


def test_cli_phonon_with_the_dielectric_model_alone_is_a_user_error(installed, tmp_path):
    from mattersim.cli import app

    poscar = tmp_path / "POSCAR"
    ase.io.write(poscar, _cuau(), format="vasp")
    result = runner.invoke(app, ["phonon", str(poscar), "--model", "mattersim-dielectric", "--no-relax", "--nac",
                                 "--supercell", "1 1 1", "-o", str(tmp_path / "o")])
    assert_user_error(result, "predicts Z* and eps_inf only", "sevennet-0+mattersim-dielectric")


def test_cli_phonon_table_shows_lo_uncertainty(installed, tmp_path, monkeypatch):
    from mattersim.cli import app

    real = registry.load_calculator

    def load(model=None, **kwargs):
        if model == "emt+mattersim-dielectric":
            return CompositeCalculator(real(EMT()), real("mattersim-dielectric"))
        return real(model, **kwargs)

    monkeypatch.setattr(registry, "load_calculator", load)
    poscar = tmp_path / "POSCAR"
    ase.io.write(poscar, _cuau(), format="vasp")
    out = tmp_path / "ph"
    result = runner.invoke(app, ["phonon", str(poscar), "--model", "emt+mattersim-dielectric", "--no-relax", "--nac",
                                 "--supercell", "2 2 2", "--mesh", "4 4 4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "LO / TO" in result.stdout and "±" in result.stdout and "σ(Z*)" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nac"]["uncertainty"]["gamma_lo_to"]["n_members"] == 3


def test_symmetrize_dielectric_of_an_element_phonopy_has_no_mass_for():
    """PuO2 (phonopy knows no mass for Pu; symmetrisation needs none): the fluorite site symmetry makes Z* and
    eps_inf isotropic, and the Z* sum to zero once the acoustic sum rule is imposed by the symmetrisation."""
    from mattersim.composite import symmetrize_dielectric

    atoms = bulk("PuO2", "fluorite", a=5.4)
    rng = np.random.default_rng(0)
    born = rng.normal(size=(3, 3, 3)) + np.array([4.0, -2.0, -2.0])[:, None, None] * np.eye(3)
    eps = np.eye(3) * 6.0 + 0.1 * rng.normal(size=(3, 3))
    z, e = symmetrize_dielectric(atoms, born, eps)
    for zi in z:
        np.testing.assert_allclose(zi, np.eye(3) * np.trace(zi) / 3, atol=1e-10)
    np.testing.assert_allclose(e, np.eye(3) * np.trace(e) / 3, atol=1e-10)
    np.testing.assert_allclose(z.sum(axis=0), 0.0, atol=1e-10)
