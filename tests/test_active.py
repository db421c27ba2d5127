"""Active learning end to end with a cheap labeller (ASE's EMT): the held-out error must drop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from mattersim.active import ActiveLearningConfig, label_structures, run_active_learning
from mattersim.data import Sample
from mattersim.errors import InputError
from mattersim.multitask import MultiTaskModel, build_backbone
from mattersim.training import fit, normalise

TINY = {"kind": "transformer", "width": 16, "num_blocks": 1, "num_heads": 2, "num_gaussians": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def cu_frames(n: int, rattle: float, strain: float, seed: int):
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        eps = rng.uniform(-strain, strain, (3, 3))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        atoms.positions += rng.normal(0, rattle, atoms.positions.shape)
        frames.append(atoms)
    return label_structures(frames, EMT())


def samples(frames):
    out = []
    for k, a in enumerate(frames):
        bare = a.copy()
        bare.calc = None
        out.append(Sample(atoms=bare, labels={"energy": a.get_potential_energy(), "forces": a.get_forces(),
                                              "stress": a.get_stress(voigt=False)}, source=f"frame {k}"))
    return out


def test_active_learning_reduces_the_held_out_error(tmp_path):
    # the members know only near-equilibrium Cu; the held-out set is hot and strained
    train = cu_frames(6, rattle=0.02, strain=0.005, seed=0)
    holdout = cu_frames(8, rattle=0.12, strain=0.03, seed=99)
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = MultiTaskModel(build_backbone(TINY)).double()
        normalise(model, samples(train))
        members.append(fit(model, samples(train), None, {"epochs": 60, "batch_size": 2, "seed": seed, "dtype": "float64",
                                                         "optimizer": {"lr": 1e-2}})[0])
    cfg = ActiveLearningConfig(threshold=1e-12, max_rounds=2, explore="rattle", rattle_stdev=0.12,
                               rattle_strain=0.03, candidates_per_seed=12, max_labels_per_round=8,
                               finetune={"epochs": 30, "batch_size": 4, "dtype": "float64", "optimizer": {"lr": 1e-2}})
    seeds = [bulk("Cu", "fcc", a=3.61, cubic=True)]
    result = run_active_learning(members, seeds, EMT(), tmp_path / "al", config=cfg, train=train,
                                 holdout=holdout, dtype="float64", progress=False)
    first, last = result.rounds[0], result.rounds[-1]
    assert len(result.rounds) == 2 and result.labelled == 16
    before, after = first["holdout_before"], last["holdout_after"]
    assert after["force_mae"] < 0.5 * before["force_mae"], (before, after)
    assert after["energy_mae"] < before["energy_mae"], (before, after)
    assert first["above_threshold"] > 0 and first["uncertainty_max"] > 0
    assert all(p.is_file() for p in result.members)
    record = json.loads((tmp_path / "al" / "active_learning.json").read_text())
    assert [r["round"] for r in record["rounds"]] == [1, 2]

    # rerunning resumes: nothing left to do, the record is unchanged, the members load from disk
    again = run_active_learning(members, seeds, EMT(), tmp_path / "al", config=cfg, train=train,
                                holdout=holdout, dtype="float64", progress=False)
    assert again.rounds == result.rounds and again.labelled == 16


def test_converges_when_every_candidate_is_certain(tmp_path):
    torch.manual_seed(0)
    model = MultiTaskModel(build_backbone(TINY)).double()
    cfg = ActiveLearningConfig(threshold=1e6, explore="md", temperatures=(300,), md_steps=4, sample_every=2,
                               max_rounds=3)
    result = run_active_learning([model, model], [bulk("Cu", "fcc", a=3.61, cubic=True)], EMT(), tmp_path, config=cfg,
                                 dtype="float64", progress=False)
    # identical members agree exactly: zero uncertainty, nothing to label, converged in round 1
    assert result.converged and len(result.rounds) == 1 and result.rounds[0]["labelled"] == 0
    assert result.rounds[0]["candidates"] == 2 and result.rounds[0]["uncertainty_max"] == 0.0


def test_bad_settings_are_reported(tmp_path):
    model = MultiTaskModel(build_backbone(TINY))
    with pytest.raises(InputError, match="explore"):
        run_active_learning([model, model], [bulk("Cu")], EMT(), tmp_path, config=ActiveLearningConfig(explore="x"))
    with pytest.raises(InputError, match="at least two"):
        run_active_learning([model], [bulk("Cu")], EMT(), tmp_path)
    with pytest.raises(InputError, match="at least 2"):
        run_active_learning([model, model], [bulk("Cu")], EMT(), tmp_path, config=ActiveLearningConfig())
    with pytest.raises(InputError, match="threshold"):
        run_active_learning([model, model], [bulk("Cu")], EMT(), tmp_path, config=ActiveLearningConfig(threshold=0))
