"""Elements a model was never trained on: every registry model knows its training elements and refuses others.

SevenNet-0 cannot evaluate Po, Rn or Fr at all (they are not in its type map): one clean error, with or without
--allow-untrained-elements. CHGNet and MatterSim v1 can run them (their embeddings reach Pu) but were never
trained on them: an error by default, a warning with the flag. The real CHGNet and SevenNet-0 weights are
loaded once per module (a few seconds each); the CLI gets them through a patched ``load_calculator``.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import ase.io
import pytest
from ase import Atoms
from ase.build import bulk
from typer.testing import CliRunner

from conftest import assert_user_error, shared_path
from mattersim import registry
from mattersim.cli import app
from mattersim.errors import InputError, UntrainedElementError, UntrainedElementWarning

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
MPTRJ = [registry._symbol(z) for z in registry.MPTRJ_ELEMENTS]


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _crystal(symbol: str) -> Atoms:
    """A simple-cubic crystal of ``symbol``, 3.4 Å apart (what Po adopts)."""
    return Atoms(symbol, cell=[3.4, 3.4, 3.4], pbc=True)


@pytest.fixture(scope="module")
def models():
    """The real sevennet-0 and chgnet calculators, loaded once."""
    pytest.importorskip("sevenn")
    pytest.importorskip("chgnet")
    return {name: registry.load_calculator(name) for name in ("sevennet-0", "chgnet")}


@pytest.fixture
def fresh(models):
    """The loaded calculators with their element checks reset (nothing allowed or accepted yet)."""
    for calc in models.values():
        calc.element_check.allow = False
        calc.element_check.accepted.clear()
        calc.reset()  # no results cached from a structure allowed before
    return models


@pytest.fixture
def cached_registry(monkeypatch, fresh):
    """``registry.load_calculator`` serving the already loaded sevennet-0 and chgnet (the CLI's path)."""
    real = registry.load_calculator

    def load_calculator(model=None, **kwargs):
        if isinstance(model, str) and model in fresh:
            return real(fresh[model], allow_untrained_elements=kwargs.get("allow_untrained_elements", False))
        return real(model, **kwargs)

    monkeypatch.setattr(registry, "load_calculator", load_calculator)
    return fresh


@pytest.fixture
def po_rn_fr(tmp_path):
    """POSCARs of simple-cubic Po, Rn and Fr, a three-frame extxyz of them, and one of NaCl."""
    paths = {}
    for symbol in ("Po", "Rn", "Fr"):
        paths[symbol] = tmp_path / f"{symbol}.vasp"
        ase.io.write(paths[symbol], _crystal(symbol), format="vasp")
    paths["all"] = tmp_path / "po_rn_fr.extxyz"
    ase.io.write(paths["all"], [_crystal(s) for s in ("Po", "Rn", "Fr")])
    paths["NaCl"] = tmp_path / "NaCl.vasp"
    ase.io.write(paths["NaCl"], bulk("NaCl", "rocksalt", a=5.64), format="vasp")
    return paths


# ---------------------------------------------------------------------------------------------------------
# what each model was trained on, read from the model where it says
# ---------------------------------------------------------------------------------------------------------


def test_model_info_carries_the_trained_elements(models):
    for name, calc in models.items():
        info = calc.model_info
        assert info["elements"] == MPTRJ, name  # symbols in order of Z
        assert len(info["elements"]) == 89 and not {"Po", "At", "Rn", "Fr", "Ra"} & set(info["elements"])
        assert info["elements_source"]
    # SevenNet-0's own type map is exactly MPtrj's 89 elements
    assert sorted(models["sevennet-0"].type_map) == list(registry.MPTRJ_ELEMENTS)


def test_chgnet_embedding_rows_of_untrained_elements_keep_their_initial_scale(models):
    """CHGNet's embedding has rows for Z 1-94; the five it never saw (Po-Ra) keep the norm of their random
    N(0, 1) initialisation, sqrt(64) = 8 (a chi distribution with 64 degrees of freedom: sd 0.7), while every
    MPtrj element moved well away from it."""
    embedding = models["chgnet"].model.atom_embedding.embedding.weight.detach().double()
    norms = embedding.norm(dim=1).numpy()  # row k is Z = k + 1
    dim = embedding.shape[1]
    untrained = [norms[z - 1] for z in range(84, 89)]
    trained = [norms[z - 1] for z in registry.MPTRJ_ELEMENTS]
    assert all(abs(n - math.sqrt(dim)) < 3 * 0.71 for n in untrained), untrained
    assert max(untrained) < min(trained), (max(untrained), min(trained))


def test_dielectric_elements_match_training_split():
    """elements.json of mattersim-dielectric lists exactly the elements of its training split (train.txt and
    train_metallic.txt, PhononDB ids), from the species line of each POSCAR-unitcell."""
    from ase.data import atomic_numbers

    from mattersim.dielectric import MODEL_DIR

    entries = shared_path("data", "phonondb", "entries")
    ids = []
    for name in ("train.txt", "train_metallic.txt"):
        ids += [line.strip() for line in (MODEL_DIR / name).read_text().splitlines() if line.strip()]
    found = set()
    for entry in ids:
        found |= set((entries / entry / "POSCAR-unitcell").read_text().splitlines()[5].split())
    recorded = json.loads((MODEL_DIR / "elements.json").read_text())
    assert recorded["elements"] == sorted(found, key=atomic_numbers.__getitem__)
    assert recorded["n_elements"] == len(found)


def test_checkpoint_elements_are_its_embedding(small_checkpoint):
    """A checkpoint records no training elements: every element its embedding holds (H to Pu here)."""
    calc = registry.load_calculator(small_checkpoint)
    assert calc.model_info["elements"][0] == "H" and calc.model_info["elements"][-1] == "Pu"
    assert len(calc.model_info["elements"]) == 94 and "not recorded" in calc.model_info["elements_source"]
    calc.get_potential_energy(_crystal("Po"))  # runs: nothing says it was not trained on Po


def test_official_mattersim_names_carry_the_documented_elements(checkpoint_1m, monkeypatch, tmp_path):
    """mattersim-v1.0.0-1M (here the official-format fixture in its cache place) was trained on 89 elements;
    its embedding holds Z 1-94, so Po is an error by default and a warning when allowed."""
    monkeypatch.setenv("MATTERSIM_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "models").mkdir(parents=True)
    shutil.copy(checkpoint_1m, tmp_path / "cache" / "models" / "mattersim-v1.0.0-1M.pth")
    calc = registry.load_calculator("mattersim-v1.0.0-1M", download=False)
    assert calc.model_info["elements"] == MPTRJ and "model card" in calc.model_info["elements_source"]
    with pytest.raises(UntrainedElementError, match=r"Po \(Z=84\).*mattersim-v1\.0\.0-1M was not trained on"):
        calc.get_potential_energy(_crystal("Po"))
    allowed = registry.load_calculator("mattersim-v1.0.0-1M", download=False, allow_untrained_elements=True)
    with pytest.warns(UntrainedElementWarning, match=r"Po \(Z=84\)"):
        assert math.isfinite(allowed.get_potential_energy(_crystal("Po")))


# ---------------------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symbol, z", [("Po", 84), ("Rn", 86), ("Fr", 87)])
def test_sevennet_refuses_elements_outside_its_type_map(fresh, symbol, z):
    calc = fresh["sevennet-0"]
    atoms = _crystal(symbol)
    with pytest.raises(InputError, match=rf"{symbol} \(Z={z}\).*sevennet-0.*cannot evaluate at all.*type map"):
        atoms.calc = calc  # ASE's set_atoms: SevenNet's own check would raise a bare ValueError here
    with pytest.raises(UntrainedElementError):
        calc.get_potential_energy(atoms)
    with pytest.raises(UntrainedElementError):
        registry.check_trained_elements(calc, atoms, allow=True)  # allowing cannot help: no parameters for it
    from mattersim.calculator import evaluate_batch

    with pytest.raises(UntrainedElementError, match=symbol):
        evaluate_batch(calc, [bulk("Si"), atoms])


def test_chgnet_untrained_elements_error_by_default_and_warn_when_allowed(fresh):
    calc = fresh["chgnet"]
    po = _crystal("Po")
    with pytest.raises(UntrainedElementError, match=r"Po \(Z=84\), which model chgnet was not trained on.*"
                                                    r"--allow-untrained-elements"):
        calc.get_potential_energy(po)
    with pytest.raises(UntrainedElementError, match="Rn"):
        calc.calculate_batch([bulk("Si"), _crystal("Rn")])
    # allowed: one warning per element, then it runs (also batched) without repeating it
    registry.load_calculator(calc, allow_untrained_elements=True)
    with pytest.warns(UntrainedElementWarning, match=r"chgnet runs on Po \(Z=84\)"):
        energy = calc.get_potential_energy(po)
    assert math.isfinite(energy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedElementWarning)
        calc.calculate_batch([po.copy()])
    # an explicit allow=False refuses again, whatever was allowed before
    with pytest.raises(UntrainedElementError):
        registry.check_trained_elements(calc, [bulk("Si"), po], labels=["si", "po"], allow=False)


def test_copies_and_pickles_keep_their_own_check(fresh, small_checkpoint):
    import copy
    import pickle

    from mattersim.calculator import MatterSimCalculator

    clone = copy.deepcopy(fresh["chgnet"])
    assert clone.element_check is not fresh["chgnet"].element_check
    with pytest.raises(UntrainedElementError, match="chgnet"):
        clone.get_potential_energy(_crystal("Po"))
    calc = registry.load_calculator(small_checkpoint)
    restored = pickle.loads(pickle.dumps(calc))
    assert type(restored) is type(calc) and isinstance(restored, MatterSimCalculator)
    assert type(calc).__name__ == "MatterSimCalculator"
    assert restored.element_check.trained == calc.element_check.trained


def test_check_names_structures_and_all_elements(fresh):
    structures = [bulk("Si"), _crystal("Po"), _crystal("Rn"), _crystal("Fr")]
    labels = ["si.vasp", "po.vasp", "rn.vasp", "fr.vasp"]
    with pytest.raises(UntrainedElementError) as err:
        registry.check_trained_elements(fresh["chgnet"], structures, labels=labels)
    text = str(err.value)
    assert "\n" not in text and text.startswith("3 structures ('po.vasp', 'rn.vasp', 'fr.vasp') contain")
    assert "Po (Z=84), Rn (Z=86) and Fr (Z=87)" in text and "chgnet" in text
    assert registry.check_trained_elements(fresh["chgnet"], structures[:1]) == []  # Si is fine
    messages = registry.check_trained_elements(fresh["chgnet"], structures, labels=labels, allow=True, warn=False)
    assert len(messages) == 1 and "Fr (Z=87)" in messages[0]


def test_run_phonon_refuses_before_any_work(fresh, tmp_path):
    from workflows.phonon import run_phonon

    with pytest.raises(UntrainedElementError, match="sevennet-0"):
        run_phonon(_crystal("Po"), fresh["sevennet-0"], output_dir=tmp_path / "phonon")
    assert not (tmp_path / "phonon").exists()


def test_composite_checks_the_property_model_only_where_it_is_used(cached_registry):
    """chgnet+mattersim-dielectric: Kr is in MPtrj but not in the dielectric model's training split."""
    pytest.importorskip("mattersim.dielectric")
    if not registry.is_available(registry.DIELECTRIC_MODEL):
        pytest.skip("the mattersim-dielectric members are not installed")
    calc = registry.load_calculator("chgnet+mattersim-dielectric")
    info = calc.model_info
    assert "Kr" in info["potential"]["elements"] and "Kr" not in info["properties"]["elements"]
    assert info["elements"] == [s for s in info["potential"]["elements"] if s in info["properties"]["elements"]]
    kr = Atoms("Kr", cell=[4.0, 4.0, 4.0], pbc=True)
    assert registry.check_trained_elements(calc, kr, properties=False) == []  # energies only: chgnet knows Kr
    with pytest.raises(UntrainedElementError, match=r"Kr \(Z=36\), which model mattersim-dielectric"):
        registry.check_trained_elements(calc, kr)
    with pytest.raises(UntrainedElementError, match="mattersim-dielectric"):
        calc.property_batch([kr])


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------


def test_cli_sevennet_po_rn_fr_is_one_clean_error(cached_registry, po_rn_fr, tmp_path):
    result = _invoke("predict", po_rn_fr["Po"], "--model", "sevennet-0")
    assert_user_error(result, "Po (Z=84)", "sevennet-0", "type map")
    result = _invoke("predict", po_rn_fr["all"], po_rn_fr["NaCl"], "--model", "sevennet-0")
    assert_user_error(result, "3 structures", "Po (Z=84), Rn (Z=86) and Fr (Z=87)", "sevennet-0")
    # the flag cannot make SevenNet-0 run an element it has no parameters for
    result = _invoke("predict", po_rn_fr["Fr"], "--model", "sevennet-0", "--allow-untrained-elements")
    assert_user_error(result, "Fr (Z=87)", "not even with --allow-untrained-elements")
    result = _invoke("relax", po_rn_fr["Rn"], "--model", "sevennet-0", "-o", tmp_path / "relaxed")
    assert_user_error(result, "Rn (Z=86)", "sevennet-0")
    result = _invoke("phonon", po_rn_fr["Po"], "--model", "sevennet-0", "-o", tmp_path / "phonon")
    assert_user_error(result, "Po (Z=84)", "sevennet-0")
    assert not (tmp_path / "phonon" / "forces.npz").exists()


def test_cli_chgnet_error_by_default_warning_with_flag(cached_registry, po_rn_fr, tmp_path):
    result = _invoke("predict", po_rn_fr["Po"], po_rn_fr["NaCl"], "--model", "chgnet")
    assert_user_error(result, "Po (Z=84)", "chgnet was not trained on", "--allow-untrained-elements")

    out = tmp_path / "out.json"
    result = _invoke("predict", po_rn_fr["Po"], po_rn_fr["NaCl"], "--model", "chgnet", "--allow-untrained-elements",
                     "-o", out)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Warning: ") and "Po (Z=84)" in lines[0], result.stderr
    assert "Po.vasp" in result.stdout and "NaCl.vasp" in result.stdout
    doc = json.loads(out.read_text())
    assert doc["model"]["elements"] == MPTRJ and doc["model"]["elements_source"]
    energies = [s.get("energy") for s in doc["structures"]]
    assert len(energies) == 2 and all(math.isfinite(e) for e in energies)


def test_flag_is_offered_by_every_command_that_loads_a_model():
    for command in (["predict"], ["relax"], ["phonon"], ["bench", "run"]):
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})  # no cut option names
        assert result.exit_code == 0 and "--allow-untrained-elements" in result.output, command


def test_input_check_no_longer_claims_the_model_covers_h_to_pu(tmp_path):
    """read_structures only knows what no embedding can hold (beyond Pu); it does not speak for a model."""
    path = tmp_path / "og.extxyz"
    ase.io.write(path, Atoms("Og", cell=[5, 5, 5], pbc=True))
    result = _invoke("predict", path, "--model", "chgnet")
    assert_user_error(result, "Og (Z=118)", "no model here can evaluate")
