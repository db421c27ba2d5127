"""Property-only models and composites: Z* and eps_inf from one model, energies and forces from another.

- :class:`DielectricModel`: an ensemble of multi-task models (:mod:`mattersim.multitask`) with the heads
  ``born_effective_charges`` and ``dielectric_tensor``, used for those two properties only (the members'
  energy readouts are ignored). It reports the member mean and, with two or more members, the member spread
  (``<key>_std``, population standard deviation) and the members' own predictions. As a
  :class:`workflows.nac.DielectricPredictor` it sets :attr:`DielectricModel.uncertainty` to
  ``{"born": (n, 3, 3) std, "epsilon": (3, 3) std, "members": [(born_k, eps_k), ...]}``, from which the
  phonon workflow derives the uncertainty of the LO frequencies. Asking it for an energy, forces or stress
  raises :class:`~mattersim.errors.InputError`.
- :func:`load_dielectric`: the shipped model ``mattersim-dielectric`` (``member_*.pth`` in
  :data:`mattersim.dielectric.MODEL_DIR`, or in ``$MATTERSIM_DIELECTRIC_DIR``).
- :class:`CompositeCalculator`: a potential (any ASE calculator) for energy, forces and stress plus a
  property model for Z* and eps_inf; the registry builds one from ``"A+B"``, e.g.
  ``load_calculator("sevennet-0+mattersim-dielectric")``.

Conventions of the properties are those of :mod:`workflows.nac` (phonopy's): ``born[k, i, j]``, first index
field / polarisation direction, second index displacement direction, in e; eps_inf (3, 3) dimensionless.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from mattersim.errors import CheckpointError, InputError, ModelNotAvailableError, no_energy_message

# mattersim.calculator and mattersim.potential (below this module) are imported where they are used: the
# registry lists the installed models through this module without loading torch.

__all__ = [
    "DIELECTRIC_PROPERTIES",
    "ENV_DIELECTRIC_DIR",
    "LICENSE_NOTE",
    "CompositeCalculator",
    "DielectricModel",
    "dielectric_dir",
    "load_dielectric",
    "member_files",
]

#: The two properties a dielectric model predicts.
DIELECTRIC_PROPERTIES = ("born_effective_charges", "dielectric_tensor")
#: Their member spreads (results of :class:`DielectricModel`, with two or more members).
STD_PROPERTIES = tuple(f"{p}_std" for p in DIELECTRIC_PROPERTIES)
#: Environment variable that points :func:`load_dielectric` at another folder of ``member_*.pth``.
ENV_DIELECTRIC_DIR = "MATTERSIM_DIELECTRIC_DIR"
#: Licence of the shipped dielectric model and of its training data.
LICENSE_NOTE = "model MIT; training data PhononDB by A. Togo, CC BY 4.0"

_MEMBER_RE = re.compile(r"^member_(\d+)\.pth$")


def _potential_of(member: Any):
    """A :class:`~mattersim.potential.Potential` from a Potential or a MatterSimCalculator."""
    from mattersim.potential import Potential

    if isinstance(member, Potential):
        return member
    potential = getattr(member, "potential", None)
    if isinstance(potential, Potential):
        return potential
    raise InputError(f"A dielectric model member must be a mattersim Potential (or MatterSimCalculator), not a "
                     f"{type(member).__name__}.")


# --------------------------------------------------------------------------------------------------
# the property-only ensemble
# --------------------------------------------------------------------------------------------------


class DielectricModel(Calculator):
    """Born effective charges and eps_inf from an ensemble of multi-task models (see the module doc).

    ``members``: one or more :class:`~mattersim.potential.Potential` objects (or MatterSimCalculators)
    whose models have the heads ``born_effective_charges`` and ``dielectric_tensor``; uncertainties need at
    least two. ``info``: the ``model_info`` dict (default: built from the members' identities).

    ``calculate_batch(structures)`` gives, per structure, the means ``born_effective_charges`` (n, 3, 3)
    and ``dielectric_tensor`` (3, 3), their ``*_std`` (two or more members) and ``members``, the list of
    ``(born, eps)`` of every member. As an ASE calculator it implements the two properties (the ``*_std``
    are in ``calc.results`` too); energy, forces and stress raise :class:`InputError`.

    **Physical by construction.** Every member's Z* sums to zero over the atoms (charge neutrality) and its
    eps_inf is symmetric with eigenvalues >= 1 (the heads guarantee both, :mod:`mattersim.heads`); the mean
    of such members keeps both properties. With ``symmetrize`` (default) the mean and every member are also
    symmetrised with the crystal's space group (:func:`symmetrize_dielectric`, phonopy's
    ``symmetrize_borns_and_epsilon``), so Z* of a crystal whose atoms are all equivalent (Si, Cu) is
    exactly zero and tensors have the symmetry of their sites. The members themselves are never changed
    beyond that: the calibration below scales the reported spread, not the members.

    **Calibrated spread.** ``spread_scale`` (the shipped model's ``card.json``): per property a factor k;
    ``<key>_std = k * (population standard deviation of the members)``, so that, on the validation split,
    2 sigma covers 95 % of the errors. ``members`` stay the raw member predictions (physical models), and
    the phonon workflow propagates the calibrated spread to the LO frequencies to first order
    (:func:`workflows.nac.lo_to_spread` with ``spread_scale``).
    """

    implemented_properties = list(DIELECTRIC_PROPERTIES)
    #: no energy, forces or stress: :func:`mattersim.calculator.evaluate_batch` refuses it
    property_only = True

    def __init__(self, members: Sequence[Any], *, info: dict | None = None,
                 spread_scale: dict[str, float] | None = None, symmetrize: bool = True, symprec: float = 1e-5,
                 **kwargs):
        """``spread_scale``: per property, the factor k of the reported standard deviation (see the class
        doc); ``symmetrize``/``symprec``: space-group symmetrisation of the predictions (spglib tolerance in
        Å)."""
        super().__init__(**kwargs)
        self.spread_scale = {p: float((spread_scale or {}).get(p, 1.0)) for p in DIELECTRIC_PROPERTIES}
        bad = {p: k for p, k in self.spread_scale.items() if not (np.isfinite(k) and k > 0)}
        if bad:
            raise InputError(f"spread_scale must be positive numbers (one per property); got {bad}.")
        self.symmetrize = bool(symmetrize)
        self.symprec = float(symprec)
        members = [_potential_of(m) for m in members]
        if not members:
            raise InputError("A dielectric model needs at least one member (a multi-task model with "
                             "born_effective_charges and dielectric_tensor heads).")
        for k, member in enumerate(members):
            missing = [t for t in DIELECTRIC_PROPERTIES if t not in member.tasks]
            if missing:
                source = member.identity.get("source") or member.identity.get("name") or f"member {k}"
                raise CheckpointError(
                    f"{source}: the model has no {' and no '.join(missing)} head (its tasks: "
                    f"{list(member.tasks) or 'none'}); a dielectric model needs multi-task models with "
                    "born_effective_charges and dielectric_tensor heads."
                )
        self.members = members
        # identity from the members (a sha256 over their sha256s, in order); ``info`` adds or overrides
        ids = [dict(m.identity) for m in members]
        hashes = [i.get("sha256") for i in ids]
        self.model_info = {
            "name": "dielectric(" + ",".join(str(i.get("name")) for i in ids) + ")",
            "kind": "dielectric",
            "version": None,
            "sha256": hashlib.sha256("".join(hashes).encode()).hexdigest() if all(hashes) else None,
            "source": None,
            "members": [{"file": Path(str(i.get("source"))).name, "sha256": i.get("sha256")} for i in ids],
            "n_members": len(members),
            **(info or {}),
        }
        self.uncertainty: dict | None = None

    def _label(self) -> str:
        return str((getattr(self, "model_info", None) or {}).get("name") or "the dielectric model")

    def calculate_batch(self, structures: Sequence[Atoms]) -> list[dict]:
        """Per structure: mean Z* and eps_inf, their calibrated ``*_std`` (>= 2 members) and ``members``
        (each member's own, physical, prediction); symmetrised when :attr:`symmetrize` is on."""
        structures = list(structures)
        per_member = [m.predict(structures, forces=False, stress=False) for m in self.members]
        out = []
        for k, atoms in enumerate(structures):
            rows = [(np.asarray(res[k]["born_effective_charges"], dtype=float),
                     np.asarray(res[k]["dielectric_tensor"], dtype=float)) for res in per_member]
            if self.symmetrize:
                rows = [symmetrize_dielectric(atoms, z, e, self.symprec) for z, e in rows]
            born = np.stack([z for z, _ in rows])
            eps = np.stack([e for _, e in rows])
            result = {"born_effective_charges": born.mean(axis=0), "dielectric_tensor": eps.mean(axis=0)}
            if len(rows) >= 2:
                result["born_effective_charges_std"] = self.spread_scale["born_effective_charges"] * born.std(axis=0)
                result["dielectric_tensor_std"] = self.spread_scale["dielectric_tensor"] * eps.std(axis=0)
            result["members"] = rows
            out.append(result)
        return out

    def get_property(self, name, atoms=None, allow_calculation=True):
        if name in STD_PROPERTIES:
            self.get_property(DIELECTRIC_PROPERTIES[0], atoms, allow_calculation)
            value = self.results.get(name)
            return None if value is None else np.array(value)
        if name not in self.implemented_properties:
            raise InputError(no_energy_message(self._label(), name))
        return super().get_property(name, atoms, allow_calculation)

    def calculate(self, atoms: Atoms | None = None, properties=None, system_changes=all_changes):
        wanted = list(properties or DIELECTRIC_PROPERTIES)
        bad = [p for p in wanted if p not in self.implemented_properties and p not in STD_PROPERTIES]
        if bad:
            raise InputError(no_energy_message(self._label(), ", ".join(bad)))
        super().calculate(atoms, wanted, system_changes)
        result = self.calculate_batch([self.atoms])[0]
        result.pop("members")
        self.results = result

    def predict_dielectric(self, atoms: Atoms) -> tuple[np.ndarray, np.ndarray]:
        """Mean Z* (n, 3, 3) and eps_inf (3, 3); sets :attr:`uncertainty` (None with one member):
        ``{"born", "epsilon"}`` calibrated standard deviations, ``"members"`` the members' own (Z*, eps_inf)
        and ``"spread_scale"`` ``{"born", "epsilon"}`` the calibration factors k (for the propagation of
        the spread to derived quantities such as LO frequencies)."""
        res = self.calculate_batch([atoms])[0]
        if len(self.members) >= 2:
            self.uncertainty = {
                "born": res["born_effective_charges_std"],
                "epsilon": res["dielectric_tensor_std"],
                "members": res["members"],
                "spread_scale": {"born": self.spread_scale["born_effective_charges"],
                                 "epsilon": self.spread_scale["dielectric_tensor"]},
            }
        else:
            self.uncertainty = None
        return res["born_effective_charges"], res["dielectric_tensor"]


def symmetrize_dielectric(atoms: Atoms, born: np.ndarray, epsilon: np.ndarray,
                          symprec: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Z* (n, 3, 3) and eps_inf (3, 3) of ``atoms`` symmetrised with its space group, Z* charge-neutral.

    phonopy's ``symmetrize_borns_and_epsilon`` on the cell as given (spglib tolerance ``symprec``, Å): Z*
    averaged over the space-group operations (``Z_{g(k)} = R Z_k R^T``), eps_inf over the point group, then
    the mean Z* subtracted from every atom. A supercell keeps the operations its lattice allows. Elements
    that symmetry makes zero come out as round-off (~1e-16): entries below 1e-12 of the tensor's largest
    element are set to exactly 0. A structure without a 3D cell (a molecule) gets the neutrality
    projection only. Averages of symmetric matrices with eigenvalues >= 1 keep that property and neutral
    Z* stay neutral, so a physical prediction stays physical.
    """
    born = np.array(born, dtype=float)
    epsilon = np.array(epsilon, dtype=float)
    if atoms.cell.rank == 3 and len(atoms) > 0:
        import warnings

        from phonopy.structure.atoms import PhonopyAtoms
        from phonopy.structure.symmetry import symmetrize_borns_and_epsilon

        cell = PhonopyAtoms(numbers=atoms.numbers, cell=np.asarray(atoms.cell[:], dtype=float),
                            scaled_positions=atoms.get_scaled_positions(wrap=True),
                            masses=np.ones(len(atoms)))  # unused here; phonopy has none for Pu, Po, ...
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "largely broken" symmetry: the prediction is averaged anyway
            born, epsilon = symmetrize_borns_and_epsilon(born, epsilon, cell, symprec=symprec)
        born, epsilon = np.array(born, dtype=float), np.array(epsilon, dtype=float)
    else:
        born = born - born.mean(axis=0, keepdims=True)
    for arr in (born, epsilon):
        arr[np.abs(arr) <= 1e-12 * max(1.0, float(np.abs(arr).max(initial=0.0)))] = 0.0
    return born, epsilon


# --------------------------------------------------------------------------------------------------
# the shipped model
# --------------------------------------------------------------------------------------------------


def dielectric_dir(directory: str | os.PathLike | None = None) -> Path:
    """Where the ``mattersim-dielectric`` members are: ``directory``, else ``$MATTERSIM_DIELECTRIC_DIR``,
    else :data:`mattersim.dielectric.MODEL_DIR` (inside the package)."""
    if directory is not None:
        return Path(directory).expanduser()
    env = os.environ.get(ENV_DIELECTRIC_DIR, "").strip()
    if env:
        return Path(env).expanduser()
    from mattersim.dielectric import MODEL_DIR

    return Path(MODEL_DIR)


def member_files(directory: str | os.PathLike | None = None) -> list[Path]:
    """The ``member_<k>.pth`` files of the dielectric model, ordered by k (empty when there are none)."""
    folder = dielectric_dir(directory)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _MEMBER_RE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def _card(folder: Path) -> dict:
    path = folder / "card.json"
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


def card_version(directory: str | os.PathLike | None = None) -> str | None:
    """``version`` of the dielectric model's ``card.json``, or None."""
    version = _card(dielectric_dir(directory)).get("version")
    return None if version is None else str(version)


def load_dielectric(
    directory: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    trust_pickle: bool = False,
) -> DielectricModel:
    """The dielectric model ``mattersim-dielectric``: every ``member_<k>.pth`` of ``directory``.

    ``directory`` defaults to ``$MATTERSIM_DIELECTRIC_DIR`` if set (models you trained yourself), else to
    :data:`mattersim.dielectric.MODEL_DIR`. Each member is loaded with ``Potential.from_checkpoint`` and
    must have the heads ``born_effective_charges`` and ``dielectric_tensor``. ``model_info`` records the
    name, ``kind="dielectric"``, the version of ``card.json`` (if there is one), a sha256 over the members'
    sha256s (in order), the member files with their sha256s, the folder and the licence. Without member files
    raises :class:`ModelNotAvailableError` naming the folder and how to fill it.
    """
    from mattersim.dielectric import MODEL_NAME
    from mattersim.potential import Potential

    folder = dielectric_dir(directory)
    files = member_files(folder)
    if not files:
        state = "does not exist" if not folder.is_dir() else "holds no member_<k>.pth files"
        raise ModelNotAvailableError(
            f"The dielectric model '{MODEL_NAME}' is not installed: the folder {folder} {state}. Train the "
            f"members (mattersim train mattersim/pretrained/{MODEL_NAME}/train.yaml --seed K -o runs/dielectric/member_K, "
            f"see docs/dielectric-model.md) and copy each best.pth to {folder}/member_K.pth, or set "
            f"{ENV_DIELECTRIC_DIR} to a folder that holds member_0.pth, member_1.pth, ..."
        )
    members = [Potential.from_checkpoint(p, device=device, dtype=dtype, trust_pickle=trust_pickle,
                                         name=f"{MODEL_NAME}/{p.stem}") for p in files]
    card = _card(folder)
    version = card.get("version")
    info = {"name": MODEL_NAME, "version": None if version is None else str(version),
            "source": str(folder.resolve()), "license": LICENSE_NOTE, "device": device, "dtype": dtype}
    scale = card.get("spread_scale")  # calibration of the reported spread on the validation split
    if isinstance(scale, dict):
        info["spread_scale"] = scale
    return DielectricModel(members, info=info, spread_scale=scale if isinstance(scale, dict) else None)


# --------------------------------------------------------------------------------------------------
# potential + property model
# --------------------------------------------------------------------------------------------------


class CompositeCalculator(Calculator):
    """Energy, free energy, forces and stress from ``potential_calc``; Z* and eps_inf from ``property_model``.

    ``potential_calc`` is any ASE calculator (with ``calculate_batch``, the composite has it too and it
    evaluates the potential only: what phonon displacements and relaxations need). ``property_model`` is a
    :class:`DielectricModel` or any object with ``predict_dielectric(atoms)``; ``predict_dielectric`` is
    forwarded to it, with its ``uncertainty``. ``model_info`` records both parts under ``potential`` and
    ``properties``.
    """

    def __init__(self, potential_calc, property_model, **kwargs):
        super().__init__(**kwargs)
        from mattersim.calculator import model_info

        if getattr(potential_calc, "property_only", False):
            raise InputError(
                f"'{model_info(potential_calc).get('name')}' predicts no energies and cannot be the potential of a "
                "composite; write POTENTIAL+PROPERTY_MODEL, e.g. sevennet-0+mattersim-dielectric."
            )
        if not callable(getattr(property_model, "predict_dielectric", None)):
            raise InputError(f"The property model ({type(property_model).__name__}) has no predict_dielectric(atoms); "
                             "use mattersim-dielectric or a multi-task checkpoint with dielectric heads.")
        self.potential_calc = potential_calc
        self.property_model = property_model
        pot_props = [p for p in (getattr(potential_calc, "implemented_properties", None) or
                                 ("energy", "free_energy", "forces", "stress")) if p not in DIELECTRIC_PROPERTIES]
        self.implemented_properties = [*pot_props, *DIELECTRIC_PROPERTIES]
        info_a, info_b = model_info(potential_calc), model_info(property_model)
        self.model_info = {
            "name": f"{info_a.get('name')}+{info_b.get('name')}",
            "kind": "composite",
            "version": None,
            "sha256": None,
            "source": None,
            "energy_convention": info_a.get("energy_convention"),
            "potential": info_a,
            "properties": info_b,
        }
        self.uncertainty: dict | None = None
        if callable(getattr(potential_calc, "calculate_batch", None)):
            self.calculate_batch = self._calculate_batch

    def _calculate_batch(self, structures: Sequence[Atoms], properties=None) -> list[dict]:
        """The potential's results (energy, forces, 3x3 stress, ...) per structure, batched."""
        from mattersim.calculator import evaluate_batch

        wanted = ("energy", "forces", "stress") if properties is None else tuple(properties)
        return evaluate_batch(self.potential_calc, list(structures), wanted)

    def property_batch(self, structures: Sequence[Atoms]) -> list[dict]:
        """The property model's results per structure: Z*, eps_inf (and ``*_std``, ``members``)."""
        model = self.property_model
        if callable(getattr(model, "calculate_batch", None)) and getattr(model, "property_only", False):
            return model.calculate_batch(list(structures))
        out = []
        for atoms in structures:
            born, eps = model.predict_dielectric(atoms)
            out.append({"born_effective_charges": np.asarray(born, dtype=float),
                        "dielectric_tensor": np.asarray(eps, dtype=float)})
        return out

    def calculate(self, atoms: Atoms | None = None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        wanted = list(properties or ("energy",))
        for prop in [p for p in wanted if p not in DIELECTRIC_PROPERTIES]:
            if prop in self.results:
                continue
            value = self.potential_calc.get_property(prop, self.atoms)
            self.results.update({k: v for k, v in self.potential_calc.results.items()
                                 if k not in DIELECTRIC_PROPERTIES and k not in STD_PROPERTIES})
            self.results[prop] = value
        if any(p in DIELECTRIC_PROPERTIES for p in wanted):
            res = dict(self.property_batch([self.atoms])[0])
            res.pop("members", None)
            self.results.update(res)

    def predict_dielectric(self, atoms: Atoms) -> tuple[np.ndarray, np.ndarray]:
        """Z* and eps_inf from the property model; its ``uncertainty`` is forwarded."""
        out = self.property_model.predict_dielectric(atoms)
        self.uncertainty = getattr(self.property_model, "uncertainty", None)
        return out
