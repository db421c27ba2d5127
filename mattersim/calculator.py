"""ASE calculator over a :class:`~mattersim.potential.Potential`, and batched evaluation of any calculator.

Units: energy eV, forces eV/Å, stress eV/Å^3 (ASE Voigt order xx, yy, zz, yz, xz, xy; positive is tensile).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

from mattersim.errors import InputError, no_energy_message
from mattersim.potential import Potential


class MatterSimCalculator(Calculator):
    """ASE calculator for MatterSim potentials: energy, free_energy, energies, forces, stress, and the
    properties of a multi-task model (``magmoms`` μB, ``charges`` e, ``born_effective_charges`` e as
    (n, 3, 3) in phonopy's order, ``dielectric_tensor`` (3, 3)).

    Works with every ASE optimizer, filter and MD integrator. ``calculate_batch`` evaluates many
    structures in batched model calls without touching any ``Atoms.calc``.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, potential: Potential, **kwargs):
        super().__init__(**kwargs)
        self.potential = potential
        self.model_info = dict(potential.identity)
        # a multi-task model adds its properties: magmoms, charges, born_effective_charges (n, 3, 3),
        # dielectric_tensor (3, 3)
        self.implemented_properties = list(type(self).implemented_properties) + list(potential.tasks)

    def calculate(self, atoms: Atoms | None = None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        res = self.potential.predict([self.atoms])[0]
        self.results = to_ase_results(res)

    def calculate_batch(self, structures: Sequence[Atoms], properties=None) -> list[dict]:
        """Results per structure (``stress`` as a 3x3 array) from batched model calls; ``properties``
        without ``"stress"`` skips the stress (and its derivative work)."""
        stress = properties is None or "stress" in properties
        return [with_free_energy(r) for r in self.potential.predict(list(structures), stress=stress)]


def with_free_energy(res: dict) -> dict:
    res = dict(res)
    res.setdefault("free_energy", res["energy"])
    return res


def to_ase_results(res: dict) -> dict:
    """Our per-structure dict -> ASE ``Calculator.results`` (Voigt stress)."""
    out = with_free_energy(res)
    if "stress" in out and np.shape(out["stress"]) == (3, 3):
        out["stress"] = full_3x3_to_voigt_6_stress(out["stress"])
    return out


def evaluate_batch(calc: Calculator, structures: Sequence[Atoms], properties=("energy", "forces", "stress")) -> list[dict]:
    """Energy, forces and stress (3x3, eV/Å^3) of many structures.

    One batched model call per batch when ``calc`` can batch (``calculate_batch``), otherwise one ASE
    calculation per structure. The structures' own calculators are left untouched. A property-only model
    (``calc.property_only``, e.g. :class:`mattersim.composite.DielectricModel`) raises :class:`InputError`.
    """
    if getattr(calc, "property_only", False):
        raise InputError(no_energy_message(str(model_info(calc).get("name")), ", ".join(properties)))
    if hasattr(calc, "calculate_batch"):
        if _takes_properties(calc.calculate_batch):  # ours do: a model skips what is not asked (stress)
            return calc.calculate_batch(structures, properties=tuple(properties))
        return calc.calculate_batch(structures)
    results = []
    for atoms in structures:
        a = atoms.copy()
        a.calc = calc
        res = {"energy": float(a.get_potential_energy())}
        res["free_energy"] = res["energy"]
        if "forces" in properties:
            res["forces"] = np.array(a.get_forces())
        if "stress" in properties and a.pbc.all():
            res["stress"] = voigt_6_to_full_3x3_stress(np.array(a.get_stress(voigt=True)))
        for extra in ("magmoms", "charges"):
            if extra in getattr(calc, "results", {}):
                res[extra] = np.array(calc.results[extra])
        results.append(res)
    return results


def _takes_properties(method) -> bool:
    import inspect

    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return "properties" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def model_info(calc) -> dict:
    """Which model produced a result: name, version, source, sha256 (and kind) of ``calc``."""
    info = getattr(calc, "model_info", None)
    if info:
        return dict(info)
    return {"name": type(calc).__name__, "version": None, "kind": "ase", "source": type(calc).__module__, "sha256": None}
