"""Training and fine-tuning (mattersim.data, mattersim.training, ``mattersim train`` / ``finetune``).

Small EMT-labelled Cu/Ni/Al cells and a tiny transformer keep every test to seconds on 2 CPU cores; float64
where results are compared exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from typer.testing import CliRunner

from conftest import assert_user_error, shared_path
from mattersim.cli import app
from mattersim.data import data_hash, read_extxyz, read_phonondb
from mattersim.errors import InputError, ModelNotAvailableError
from mattersim.training import (TrainConfig, batch_losses, build_model, fit, fit_energy_references, load_config,
                                load_data, normalise, sym_logm, train)

SMALL = {"kind": "transformer", "width": 16, "num_blocks": 1, "num_heads": 2, "num_gaussians": 8}
HEADS = {"width": 16, "num_heads": 2, "channels": 3, "num_gaussians": 8}
LATTICE = {"Cu": 3.61, "Ni": 3.52, "Al": 4.05}


pytestmark = pytest.mark.usefixtures("one_thread")


def emt_frames(n: int, seed: int = 0) -> list[Atoms]:
    """Rattled, strained Cu/Ni/Al fcc cells (4 or 8 atoms) with EMT energy/forces/stress and synthetic
    magmoms (Ni 0.6, Cu 0.1, Al 0 μB) and charges (Al +0.5, others -0.2, then neutralised) as calculator results."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        el = ("Cu", "Ni", "Al")[i % 3]
        atoms = bulk(el, "fcc", a=LATTICE[el] * (0.94 + 0.12 * rng.random()), cubic=True)
        if i % 2:
            atoms = atoms.repeat((2, 1, 1))
        atoms.rattle(0.02, seed=seed * 1000 + i)
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "stress": atoms.get_stress()}
        z = atoms.numbers
        results["magmoms"] = np.where(z == 28, 0.6, np.where(z == 29, 0.1, 0.0))
        q = np.where(z == 13, 0.5, -0.2)
        results["charges"] = q - q.mean()
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames


def write_frames(path: Path, frames) -> Path:
    ase.io.write(path, frames, format="extxyz")
    return path


def config(tmp_path: Path, **fields) -> TrainConfig:
    base = {"model": {"backbone": SMALL, "tasks": ["magmoms", "charges"], "head_args": HEADS},
            "train": ["train.extxyz"], "epochs": 2, "batch_size": 4, "output": "run"}
    return TrainConfig.from_dict({**base, **fields}, source=str(tmp_path / "config.yaml"), base_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------


def test_read_extxyz_labels_and_errors(tmp_path):
    frames = emt_frames(3)
    frames[1].calc = SinglePointCalculator(frames[1], energy=frames[1].calc.results["energy"])  # energy only
    path = write_frames(tmp_path / "d.extxyz", frames)
    samples = read_extxyz(path)
    assert [sorted(s.labels) for s in samples] == [
        ["charges", "energy", "forces", "magmoms", "stress"], ["energy"], ["charges", "energy", "forces", "magmoms", "stress"]]
    s = samples[0]
    np.testing.assert_allclose(s.labels["stress"], frames[0].calc.results["stress"][[0, 5, 4, 5, 1, 3, 4, 3, 2]].reshape(3, 3))
    assert s.labels["forces"].shape == (4, 3) and s.source == f"{path}@0"
    gpa = read_extxyz(path, stress_unit="GPa")[0].labels["stress"]
    np.testing.assert_allclose(gpa, s.labels["stress"] * 0.006241509074, rtol=1e-6)

    # Born charges (9 per atom) and a dielectric tensor (9 numbers) written by hand
    text = ('2\nLattice="0 2.8 2.8 2.8 0 2.8 2.8 2.8 0" Properties=species:S:1:pos:R:3:born_effective_charges:R:9 '
            'dielectric_tensor="2 0 0 0 2 0 0 0 3" pbc="T T T"\n'
            "Na 0 0 0 1 0 0 0 1.1 0 0 0 1.2\nCl 2.8 2.8 2.8 -1 0 0 0 -1.1 0 0 0 -1.2\n")
    (tmp_path / "b.extxyz").write_text(text)
    (b,) = read_extxyz(tmp_path / "b.extxyz")
    assert b.labels["born_effective_charges"].shape == (2, 3, 3) and b.labels["born_effective_charges"][0, 2, 2] == 1.2
    np.testing.assert_allclose(b.labels["dielectric_tensor"], np.diag([2.0, 2.0, 3.0]))

    (tmp_path / "bad.extxyz").write_text(text.replace('"2 0 0 0 2 0 0 0 3"', '"2 0 0 3"'))
    with pytest.raises(InputError, match=r"bad.extxyz' frame 0: field 'dielectric_tensor' has shape \(4,\)"):
        read_extxyz(tmp_path / "bad.extxyz")
    (tmp_path / "nan.extxyz").write_text(text.replace("pbc=", "energy=nan pbc="))
    with pytest.raises(InputError, match=r"nan.extxyz' frame 0: field 'energy' contains NaN"):
        read_extxyz(tmp_path / "nan.extxyz")
    with pytest.raises(InputError, match="does not exist"):
        read_extxyz(tmp_path / "missing.extxyz")
    assert data_hash([path]) != data_hash([tmp_path / "b.extxyz"]) and len(data_hash([path])) == 64


def test_phonondb_sic_born_expanded_and_neutral(tmp_path):
    entries = shared_path("data", "phonondb", "entries")
    (sic,) = read_phonondb(entries, ids=["mp-8062-20180417"])
    assert sic.atoms.get_chemical_formula() == "CSi" and len(sic.atoms) == 2  # primitive cell of the 8-atom cube
    born = sic.labels["born_effective_charges"]
    assert born.shape == (2, 3, 3)
    for atom in born:  # both atoms expanded from the file's lines: isotropic, +-2.705 e
        np.testing.assert_allclose(np.abs(atom), 2.70521401 * np.eye(3), atol=1e-12)
    assert np.sign(born[0, 0, 0]) == -np.sign(born[1, 0, 0])
    assert np.abs(born.sum(axis=0)).max() < 1e-7, born.sum(axis=0)  # charge neutral within the file's 8 decimals
    np.testing.assert_allclose(sic.labels["dielectric_tensor"], 7.10328387 * np.eye(3), atol=1e-8)
    assert sorted(set(sic.labels)) == ["born_effective_charges", "dielectric_tensor"]

    # an entry without BORN is skipped and counted
    root = tmp_path / "entries"
    shutil.copytree(entries / "mp-8062-20180417", root / "with-born")
    shutil.copytree(entries / "mp-8062-20180417", root / "no-born")
    (root / "no-born" / "BORN").unlink()
    samples = read_phonondb(root)
    assert len(samples) == 1 and samples.skipped == ["no-born"] and len(samples.files) == 3


def test_phonondb_only_training_needs_no_forces(tmp_path, monkeypatch):
    entries = shared_path("data", "phonondb", "entries")
    import mattersim.potential

    calls = []
    real = mattersim.potential.evaluate

    def spy(model, graph, **kw):
        calls.append((kw.get("forces"), kw.get("stress")))
        return real(model, graph, **kw)

    monkeypatch.setattr(mattersim.potential, "evaluate", spy)
    cfg = config(tmp_path, model={"backbone": SMALL, "tasks": ["born_effective_charges", "dielectric_tensor"], "head_args": HEADS},
                 train=[{"phonondb": str(entries), "ids": ["mp-8062-20180417", "mp-1000-20180417", "mp-10009-20180417"]}],
                 valid_fraction=0.0, task_loss={"dielectric_tensor": "log"})
    result = train(cfg, progress=False)
    assert calls and all(c == (False, False) for c in calls), calls
    last = result.history[-1]["train"]
    assert np.isfinite(last["loss"]) and set(last) >= {"born_effective_charges_mae", "dielectric_tensor_log_mae"}
    model = result.model
    assert float(model.heads["dielectric_tensor"].scale) > 0.5  # set from the data's chi = eps - 1 (~6-14)


def test_sym_logm_degenerate_gradient():
    eps = torch.tensor(7.1 * np.eye(3), requires_grad=True)  # isotropic: eigh's own gradient would be infinite
    sym_logm(eps).sum().backward()
    np.testing.assert_allclose(eps.grad.numpy(), np.ones((3, 3)) / 7.1, rtol=1e-10)  # logm(cI + d) = log(c) I + d/c
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 3, 3))
    spd = torch.tensor(a @ a.transpose(0, 2, 1) + 2 * np.eye(3), requires_grad=True)
    from scipy.linalg import logm

    np.testing.assert_allclose(sym_logm(spd).detach().numpy()[0], logm(spd.detach().numpy()[0]).real, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x: sym_logm(0.5 * (x + x.transpose(-1, -2))), (spd,))


# ---------------------------------------------------------------------------------------------------------
# normalisation and losses
# ---------------------------------------------------------------------------------------------------------


def test_energy_reference_regression_recovers_references():
    from mattersim.data import Sample

    refs = {1: -1.1, 8: -4.9, 26: -8.3, 3: -1.9}
    rng = np.random.default_rng(3)
    samples = []
    for _ in range(40):
        numbers = rng.choice(list(refs), size=int(rng.integers(2, 9)))
        energy = sum(refs[int(z)] for z in numbers) + rng.normal(0, 0.01) * len(numbers)
        samples.append(Sample(Atoms(numbers=numbers, positions=rng.uniform(0, 8, (len(numbers), 3)), cell=[8] * 3, pbc=True),
                              {"energy": energy}))
    fitted, scale = fit_energy_references(samples)
    assert sorted(fitted) == sorted(refs)
    for z, e in refs.items():
        assert abs(fitted[z] - e) < 0.02, (z, fitted[z], e)
    assert 0.003 < scale < 0.02, scale  # std of the residual energy per atom (noise 0.01 eV/atom)

    from mattersim.multitask import MultiTaskModel

    model = MultiTaskModel.from_config({"backbone": SMALL})
    normalise(model, samples, energy_references="fit")
    for z, e in fitted.items():
        assert float(model.normalizer.shift[z]) == pytest.approx(e)
    assert float(model.normalizer.scale[26]) == pytest.approx(scale)


def test_missing_labels_masked_terms_match_hand_computation(tmp_path):
    from ase.units import GPa

    from mattersim.graph import collate
    from mattersim.potential import evaluate

    frames = emt_frames(8, seed=1)
    for i, atoms in enumerate(frames):
        r = dict(atoms.calc.results)
        if i % 2 == 0:  # half the frames: no forces (and no stress)
            r.pop("forces")
            r.pop("stress")
        if i in (1, 2, 5):
            r.pop("charges")
        if i == 3:
            r.pop("energy")  # task labels only
        atoms.calc = SinglePointCalculator(atoms, **r)
    write_frames(tmp_path / "train.extxyz", frames)
    samples = read_extxyz(tmp_path / "train.extxyz")
    assert ["forces" in s.labels for s in samples] == [False, True] * 4
    assert "energy" not in samples[3].labels and "charges" not in samples[1].labels

    cfg = config(tmp_path, dtype="float64", valid_fraction=0.25)
    model, _, tasks = build_model(cfg)
    model = model.double()
    normalise(model, samples, energy_references="fit", tasks=tasks)
    batch = samples[:4]
    total, terms = batch_losses(model, batch, cfg)

    graph = collate([s.graph(model.cutoff, model.threebody_cutoff) for s in batch], model.threebody_cutoff, dtype=torch.float64)
    pred = {k: v.detach().numpy() for k, v in evaluate(model, graph).items()}
    n = [len(s.atoms) for s in batch]
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    atoms_of = {k: slice(start[k], start[k] + n[k]) for k in range(4)}
    hand = {
        "energy": [abs(pred["energy"][k] - s.labels["energy"]) / n[k] for k, s in enumerate(batch) if "energy" in s.labels],
        "forces": np.concatenate([np.abs(pred["forces"][atoms_of[k]] - s.labels["forces"]).ravel()
                                  for k, s in enumerate(batch) if "forces" in s.labels]),
        "stress": np.concatenate([np.abs(pred["stress"][k] - s.labels["stress"]).ravel() / GPa
                                  for k, s in enumerate(batch) if "stress" in s.labels]),
        "charges": np.concatenate([np.abs(pred["charges"][atoms_of[k]] - s.labels["charges"])
                                   for k, s in enumerate(batch) if "charges" in s.labels]),
        "magmoms": np.concatenate([np.abs(pred["magmoms"][atoms_of[k]] - s.labels["magmoms"]) for k, s in enumerate(batch)]),
    }
    assert sorted(terms) == sorted(hand)
    assert terms["energy"]["count"] == 3 and terms["forces"]["count"] == 3 * (n[1] + n[3])
    assert terms["charges"]["count"] == n[0] + n[3]
    for term, values in hand.items():
        assert terms[term]["mae"] == pytest.approx(float(np.mean(values)), rel=1e-10), term
    expected = sum(cfg.loss[t] * float(np.mean(v)) for t, v in hand.items())
    assert float(total.detach()) == pytest.approx(expected, rel=1e-10)

    # a batch without any forces, stress or charges label: those terms are absent (contribute 0)
    _, terms0 = batch_losses(model, [samples[2]], cfg)
    assert sorted(terms0) == ["energy", "magmoms"]

    result = fit(model, samples, samples[6:], cfg)
    for entry in result.history[1:]:
        for part in (entry["train"], entry["valid"]):
            assert all(np.isfinite(v) for v in part.values()), entry
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


# ---------------------------------------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------------------------------------


def test_fit_emt_data_to_low_loss(tmp_path):
    write_frames(tmp_path / "train.extxyz", emt_frames(12))
    cfg = config(tmp_path, model={"backbone": {"kind": "transformer", "preset": "tiny"}, "tasks": ["magmoms", "charges"], "head_args": HEADS},
                 valid=["train.extxyz"], epochs=50, optimizer={"lr": 5e-3}, loss={"energy": 10, "stress": 1})
    result = train(cfg, progress=False)
    first, best = result.history[0]["valid"], result.best_metrics
    for term, factor in (("energy", 5), ("forces", 3), ("magmoms", 5)):
        assert best[f"{term}_mae"] < first[f"{term}_mae"] / factor, (term, first[f"{term}_mae"], best[f"{term}_mae"])
    assert best["energy_mae"] < 0.01, best  # eV/atom
    out = Path(cfg.output)
    assert {p.name for p in out.iterdir()} >= {"best.pth", "last.pth", "history.json", "train.log"}
    from mattersim.checkpoint import read_checkpoint

    ckpt = read_checkpoint(out / "best.pth")
    assert ckpt["metrics"]["energy_mae"] == pytest.approx(best["energy_mae"])
    assert ckpt["data"]["train"]["n_samples"] == 12 and len(ckpt["data"]["sha256"]) == 64
    assert set(ckpt["normalisation"]["energy_references_eV"]) == {"Cu", "Ni", "Al"}
    assert ckpt["training"]["config"]["epochs"] == 50


def test_resume_gives_the_same_weights(tmp_path):
    write_frames(tmp_path / "train.extxyz", emt_frames(9, seed=2))
    fields = dict(dtype="float64", epochs=4, batch_size=4, schedule={"warmup_steps": 2}, early_stopping=10)
    interrupted = train(config(tmp_path, output="a", **fields), progress=False, stop_after_epochs=2)
    assert interrupted.epochs_done == 2 and interrupted.last_checkpoint is not None
    resumed = train(config(tmp_path, output="a", **fields), progress=False)
    straight = train(config(tmp_path, output="b", **fields), progress=False)
    assert resumed.epochs_done == straight.epochs_done == 4
    assert "resuming from" in (tmp_path / "a" / "train.log").read_text()
    a = torch.load(tmp_path / "a" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pth", weights_only=True)
    for key in ("model", "ema"):
        for name, tensor in b[key].items():
            assert torch.equal(a[key][name], tensor), (key, name)
    best_a, best_b = (torch.load(tmp_path / d / "best.pth", weights_only=True)["model"] for d in ("a", "b"))
    assert all(torch.equal(best_a[k], v) for k, v in best_b.items())
    assert [h["valid"] for h in resumed.history] == [h["valid"] for h in straight.history]
    # a finished run is not trained again; a changed setting is refused
    again = train(config(tmp_path, output="a", **fields), progress=False)
    assert len(again.history) == 5
    with pytest.raises(InputError, match="different settings .*batch_size.*resume: false"):
        train(config(tmp_path, output="a", **{**fields, "batch_size": 3}), progress=False)


def test_early_stopping(tmp_path):
    write_frames(tmp_path / "train.extxyz", emt_frames(4))
    result = train(config(tmp_path, epochs=10, early_stopping=2, ema=None, optimizer={"lr": 1e-30}), progress=False)
    assert result.stopped_early and result.epochs_done == 3 and result.best_epoch == 1  # the weights never change
    assert "early stopping" in (tmp_path / "run" / "train.log").read_text()


# ---------------------------------------------------------------------------------------------------------
# configuration errors and the command line
# ---------------------------------------------------------------------------------------------------------


def _write_config(tmp_path: Path, name: str = "config.yaml", **changes) -> Path:
    data = {"model": {"backbone": SMALL, "tasks": ["magmoms"], "head_args": HEADS}, "train": ["train.extxyz"],
            "epochs": 2, "batch_size": 4}
    data.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes, fragments", [
    ({"optimiser": {"lr": 0.01}}, ["unknown field 'optimiser'", "did you mean 'optimizer'"]),
    ({"optimizer": {"lr": 0.01, "momentum": 0.9}}, ["unknown field 'optimizer.momentum'", "lr"]),
    ({"epochs": "many"}, ["field 'epochs' must be an integer", "'many'"]),
    ({"ema": True}, ["field 'ema' must be a number"]),
    ({"train": ["missing.extxyz"]}, ["field 'train[0].path'", "missing.extxyz", "does not exist"]),
    ({"model": {"backbone": {"kind": "transformer", "preset": "huge"}}}, ["field 'model'", "preset"]),
    ({"model": {"backbone": SMALL, "tasks": ["magmom"]}}, ["field 'model.tasks[0]'", "did you mean 'magmoms'"]),
    ({"task_loss": {"magmoms": "log"}}, ["field 'task_loss.magmoms'", "mae"]),
    ({"init_from": "x.pth"}, ["'init_from' are both set"]),
])
def test_config_errors_name_file_and_field(tmp_path, changes, fragments):
    write_frames(tmp_path / "train.extxyz", emt_frames(2))
    path = _write_config(tmp_path, **changes)
    with pytest.raises(InputError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_config_file_errors(tmp_path):
    with pytest.raises(InputError, match="nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: {backbone: [\n")
    with pytest.raises(InputError, match=r"bad.yaml: not valid YAML \(line"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "c.json").write_text('{"model": {"backbone": {"kind": "transformer", "preset": "tiny"}}, "train": "t.extxyz"}')
    write_frames(tmp_path / "t.extxyz", emt_frames(1))
    cfg = load_config(tmp_path / "c.json")
    assert cfg.train == [{"path": str(tmp_path / "t.extxyz"), "stress_unit": "eV/A3", "keys": {}}]
    assert cfg.loss["forces"] == 10.0 and cfg.ema == 0.99 and cfg.output == str(tmp_path / "training")


def test_source_label_filter_and_environment_paths(tmp_path, monkeypatch):
    from mattersim.training import load_data

    write_frames(tmp_path / "t.extxyz", emt_frames(3))
    monkeypatch.setenv("MY_DATA", str(tmp_path))
    (tmp_path / "c.yaml").write_text(
        "model: {backbone: {kind: transformer, preset: tiny}}\n"
        "train: [{path: '${MY_DATA}/t.extxyz', labels: [energy]}]\nvalid_fraction: 0\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.train[0]["path"] == str(tmp_path / "t.extxyz") and cfg.train[0]["labels"] == ["energy"]
    train, _, _ = load_data(cfg)
    assert all(set(s.labels) == {"energy"} for s in train)  # forces, stress, magmoms... dropped
    monkeypatch.delenv("MY_DATA")
    with pytest.raises(InputError, match="environment variable"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("model: {backbone: {kind: transformer, preset: tiny}}\n"
                                     "train: [{path: t.extxyz, labels: [energies]}]\n")
    with pytest.raises(InputError, match=r"train\[0\]\.labels\[0\]"):
        load_config(tmp_path / "d.yaml")


def test_cli_train_end_to_end(tmp_path):
    from mattersim.potential import Potential

    write_frames(tmp_path / "train.extxyz", emt_frames(6))
    path = _write_config(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(path), "--no-progress", "-o", str(tmp_path / "cli-run")])
    assert result.exit_code == 0, result.output
    assert "energy" in result.stdout and "eV/atom" in result.stdout and "best.pth" in result.stdout
    potential = Potential.from_checkpoint(tmp_path / "cli-run" / "best.pth", dtype="float64")
    (res,) = potential.predict([bulk("Cu", "fcc", a=3.6)])
    assert np.isfinite(res["energy"]) and res["magmoms"].shape == (1,)

    # train refuses init_from; finetune needs it
    bad = _write_config(tmp_path, "finetune.yaml", model=None, init_from=str(tmp_path / "cli-run" / "best.pth"))
    assert_user_error(runner.invoke(app, ["train", str(bad)]), "init_from", "mattersim finetune")
    assert_user_error(runner.invoke(app, ["finetune", str(path)]), "init_from", "is missing")
    assert_user_error(runner.invoke(app, ["train", str(tmp_path / "none.yaml")]), "none.yaml", "does not exist")


def test_finetune_v1_checkpoint_adding_magmoms(tmp_path, small_checkpoint):
    from mattersim.checkpoint import load_model

    write_frames(tmp_path / "train.extxyz", emt_frames(6, seed=3))
    path = _write_config(tmp_path, model=None, init_from=str(small_checkpoint), add_tasks=["magmoms"], epochs=2)
    result = CliRunner().invoke(app, ["finetune", str(path), "--no-progress", "-o", str(tmp_path / "ft")])
    assert result.exit_code == 0, result.output
    model, ckpt = load_model(tmp_path / "ft" / "best.pth")
    original, _ = load_model(small_checkpoint)
    assert model.tasks == ("magmoms",) and model.config["backbone"]["kind"] == "m3gnet"
    assert torch.equal(model.normalizer.shift, original.normalizer.shift)  # energy_references: keep
    train_samples, _, _ = load_data(load_config(path))  # the same seeded split
    magmoms = np.concatenate([s.labels["magmoms"] for s in train_samples])
    assert float(model.heads["magmoms"].shift) == pytest.approx(magmoms.mean())  # new head normalised from the data
    assert float(model.heads["magmoms"].scale) == pytest.approx(magmoms.std())
    assert ckpt["training"]["init_from"]["added_tasks"] == ["magmoms"]
    assert ckpt["training"]["init_from"]["path"] == str(small_checkpoint)
    # the backbone itself was trained (forces and stress differentiated twice through M3GNet)
    changed = [k for k, v in original.backbone.state_dict().items() if not torch.equal(v, model.backbone.state_dict()[k])]
    assert len(changed) > 10, changed

    # Python API, as an active-learning loop uses it: fine-tune the returned model again on new samples
    more = read_extxyz(write_frames(tmp_path / "more.extxyz", emt_frames(3, seed=4)))
    again = fit(model, more, [], TrainConfig(epochs=1, batch_size=2, loss={"energy": 1.0, "forces": 10.0, "stress": 0.0}))
    assert again.best_checkpoint is None and len(again.history) == 2 and np.isfinite(again.history[1]["train"]["loss"])
    assert all(p.requires_grad for p in again.model.parameters())
    tuned, history = again  # unpacks as (model, history)
    assert tuned is again.model and again[0] is tuned and history is again.history
    assert not any("_gated_on_bond" in m.__dict__ for m in again.model.modules())


def test_init_from_registry_name_uses_cached_weights(tmp_path, monkeypatch):
    one_m = shared_path("fixtures", "mattersim_v1_reference", "m3gnet-1M-random.pth")
    monkeypatch.setenv("MATTERSIM_HOME", str(tmp_path / "cache"))
    from mattersim import registry

    monkeypatch.setattr(registry, "_legacy_dirs", lambda: [])
    write_frames(tmp_path / "train.extxyz", emt_frames(2))
    cfg = config(tmp_path, model=None, init_from="mattersim-v1.0.0-1M")
    def offline(name, **kw):
        raise ModelNotAvailableError(f"Model '{name}' is not on this machine and cannot be downloaded (offline).")

    monkeypatch.setattr(registry, "download_model", offline)
    with pytest.raises(ModelNotAvailableError, match="offline"):
        build_model(cfg)
    (tmp_path / "cache" / "models").mkdir(parents=True)
    shutil.copy(one_m, tmp_path / "cache" / "models" / "mattersim-v1.0.0-1M.pth")
    model, info, new = build_model(cfg)
    assert model.config["backbone"]["units"] == 128 and new == [] and info["path"].endswith("mattersim-v1.0.0-1M.pth")


def test_bootstrap_resample_is_seeded_and_recorded(tmp_path):
    """bootstrap: true draws as many training samples as there are, with replacement, from a seeded stream
    of its own (the validation split is unchanged); the data description records the distinct count."""
    frames = emt_frames(12)
    write_frames(tmp_path / "train.extxyz", frames)
    plain_train, plain_valid, _ = load_data(config(tmp_path, valid_fraction=0.25, seed=3))
    train, valid, meta = load_data(config(tmp_path, valid_fraction=0.25, bootstrap=True, seed=3))
    assert [s.source for s in valid] == [s.source for s in plain_valid]  # same held-out samples
    assert len(train) == len(plain_train)
    sources = [s.source for s in train]
    distinct = set(sources)
    assert distinct <= {s.source for s in plain_train} and len(distinct) < len(train)  # duplicates: a resample
    assert meta["train"]["bootstrap"] == {"seed": 3, "n_unique": len(distinct)}
    again, _, _ = load_data(config(tmp_path, valid_fraction=0.25, bootstrap=True, seed=3))
    assert [s.source for s in again] == sources  # seeded
    other, _, _ = load_data(config(tmp_path, valid_fraction=0.25, bootstrap=True, seed=4))
    assert [s.source for s in other] != sources
    assert load_data(config(tmp_path, valid_fraction=0.25))[2]["train"]["bootstrap"] is None
    with pytest.raises(InputError, match="bootstrap"):
        config(tmp_path, bootstrap="sometimes")
