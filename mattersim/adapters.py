"""Adapters that give other potentials our batched interface (``calculate_batch``).

``mattersim.calculator.evaluate_batch`` uses ``calculate_batch`` when a calculator has it, so phonon
displacements, relaxations and benchmarks evaluate many structures per model call with these potentials
too. Results follow :mod:`mattersim.calculator`: energy eV, forces eV/Å, stress 3x3 eV/Å^3 (ASE sign).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from ase import Atoms
from ase.stress import voigt_6_to_full_3x3_stress


def _full_stress(stress) -> np.ndarray:
    stress = np.asarray(stress, dtype=float)
    return voigt_6_to_full_3x3_stress(stress) if stress.shape == (6,) else stress.reshape(3, 3)


def batched_chgnet_calculator(model, device: str = "cpu", batch_size: int = 16):
    """A ``CHGNetCalculator`` for ``model`` that also evaluates lists of structures in batches."""
    from chgnet.model.dynamics import CHGNetCalculator
    from pymatgen.io.ase import AseAtomsAdaptor

    class BatchedCHGNetCalculator(CHGNetCalculator):
        def calculate_batch(self, structures: Sequence[Atoms]) -> list[dict]:
            graphs = [
                self.model.graph_converter(AseAtomsAdaptor.get_structure(a)).to(self.device) for a in structures
            ]
            out = []
            for start in range(0, len(graphs), batch_size):
                preds = self.model.predict_graph(graphs[start : start + batch_size], task="efsm", batch_size=batch_size)
                out.extend(preds if isinstance(preds, list) else [preds])
            results = []
            for atoms, p in zip(structures, out):
                factor = len(atoms) if self.model.is_intensive else 1
                energy = float(p["e"]) * factor
                results.append({
                    "energy": energy,
                    "free_energy": energy,
                    "forces": np.asarray(p["f"], dtype=float),
                    "stress": _full_stress(np.asarray(p["s"]) * self.stress_weight),
                    "magmoms": np.asarray(p["m"], dtype=float),
                })
            return results

    return BatchedCHGNetCalculator(model=model, use_device=device)
