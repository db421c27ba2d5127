"""Ensembles of models: mean predictions with an uncertainty on every output.

``EnsembleCalculator(members)`` averages any number of calculators (ours, loaded checkpoints, or any ASE
calculator; ours are evaluated in batched model calls) and reports their spread. Members given as model
names or checkpoint paths are loaded by the caller's ``loader``; :func:`mattersim.registry.load_ensemble`
does that with :func:`~mattersim.registry.load_calculator`.

- ``energy``, ``forces``, ``stress`` and every property all members predict (``magmoms``, ``charges``,
  ``born_effective_charges``, ``dielectric_tensor``): the member mean;
- ``<name>_std``: the standard deviation over members (population, 1/N), same shape and unit as the mean;
  ``energy_std`` is in eV for the structure;
- ``force_uncertainty`` (eV/Å)^2, the active-learning score of the MatterSim paper:
  ``max_a (1/N) sum_i (|F_ia| - |mean_i F_ia|)^2`` over the N members ``i`` and atoms ``a``.

As a :class:`workflows.nac.DielectricPredictor` (``predict_dielectric``) it also sets ``uncertainty`` to
``{"born": (n, 3, 3) std, "epsilon": (3, 3) std}``, which the phonon workflow reports.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator, Calculator, all_changes

from mattersim.calculator import evaluate_batch, model_info, to_ase_results
from mattersim.errors import InputError

#: outputs averaged when every member has them
AVERAGED = ("energy", "forces", "stress", "magmoms", "charges", "born_effective_charges", "dielectric_tensor")


def force_uncertainty(forces: np.ndarray) -> float:
    """``max_a (1/N) sum_i (|F_ia| - |mean_i F_ia|)^2`` for member forces of shape (N, n_atoms, 3)."""
    forces = np.asarray(forces, dtype=float)
    if forces.ndim != 3 or forces.shape[2] != 3:
        raise ValueError(f"forces must have shape (members, atoms, 3), got {forces.shape}")
    norms = np.linalg.norm(forces, axis=2)  # (N, n)
    mean_norm = np.linalg.norm(forces.mean(axis=0), axis=1)  # (n,)
    return float(np.max(np.mean((norms - mean_norm) ** 2, axis=0)))


def combine(member_results: Sequence[dict]) -> dict:
    """Mean, ``<key>_std`` and ``force_uncertainty`` of one structure's results from several members."""
    out: dict[str, Any] = {}
    for key in AVERAGED:
        if all(key in r for r in member_results):
            stack = np.stack([np.asarray(r[key], dtype=float) for r in member_results])
            out[key] = stack.mean(axis=0) if stack.ndim > 1 else float(stack.mean())
            std = stack.std(axis=0)
            out[f"{key}_std"] = std if stack.ndim > 1 else float(std)
    if "forces" in out:
        out["force_uncertainty"] = force_uncertainty([r["forces"] for r in member_results])
    if "energy" in out:
        out["free_energy"] = out["energy"]
    return out


class EnsembleCalculator(Calculator):
    """The mean of several calculators, with the members' spread as uncertainty (see the module doc).

    ``members``: ASE calculators; with ``loader`` (e.g. :func:`mattersim.registry.load_calculator`), anything
    ``loader`` turns into one (model names, checkpoint paths). ``name``: the ensemble's ``model_info`` name.
    """

    def __init__(self, members: Sequence[Any], *, name: str | None = None,
                 loader: Callable[[Any], Any] | None = None, **kwargs):
        super().__init__(**kwargs)
        if len(members) < 2:
            raise InputError(f"An ensemble needs at least two members; got {len(members)}.")
        self.members = [_member(m, loader) for m in members]
        props = [set(getattr(m, "implemented_properties", ()) or ()) for m in self.members]
        common = set.intersection(*props) if props else set()
        self.implemented_properties = [p for p in ("energy", "free_energy", "forces", "stress", *AVERAGED[3:])
                                       if p in common or p == "free_energy"]
        infos = [model_info(m) for m in self.members]
        self.model_info = {
            "name": name or "ensemble(" + ",".join(str(i.get("name")) for i in infos) + ")",
            "kind": "ensemble",
            "version": None,
            "source": None,
            "sha256": None,
            "members": infos,
        }
        self.uncertainty: dict | None = None

    def calculate_batch(self, structures: Sequence[Atoms], properties=None) -> list[dict]:
        """Mean results with ``*_std`` and ``force_uncertainty`` per structure; batched per member."""
        wanted = ("energy", "forces", "stress") if properties is None else tuple(properties)
        per_member = [evaluate_batch(m, structures, wanted) for m in self.members]
        return [combine([res[k] for res in per_member]) for k in range(len(structures))]

    def calculate(self, atoms: Atoms | None = None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = to_ase_results(self.calculate_batch([self.atoms])[0])

    def predict_dielectric(self, atoms: Atoms) -> tuple[np.ndarray, np.ndarray]:
        """Mean Z* (n, 3, 3) and eps_inf (3, 3); their member spread goes to :attr:`uncertainty`."""
        if "born_effective_charges" not in self.implemented_properties:
            raise InputError("The ensemble's members do not all predict born_effective_charges and "
                             "dielectric_tensor; use members with dielectric heads.")
        res = self.calculate_batch([atoms])[0]
        self.uncertainty = {"born": res["born_effective_charges_std"], "epsilon": res["dielectric_tensor_std"]}
        return res["born_effective_charges"], res["dielectric_tensor"]


def _member(member: Any, loader: Callable[[Any], Any] | None) -> Any:
    if loader is not None:
        return loader(member)
    if isinstance(member, BaseCalculator):
        return member
    raise InputError(f"Ensemble member {member!r} is not a calculator; pass loaded calculators, or model names and "
                     "checkpoint paths to mattersim.registry.load_ensemble.")
