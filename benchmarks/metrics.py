"""Error metrics for energy, forces and stress, with both common definitions named explicitly.

Units: energies compared per atom (eV/atom), forces in eV/Å, stress in GPa (converted from eV/Å^3).

Two definitions of the force and stress errors are in use in the literature; both are reported:

- **component-wise** (``force_mae``, ``stress_mae``): the mean absolute error over all Cartesian
  components of all atoms of all structures (forces) or over the 9 components of every 3x3 stress tensor;
  every atom weighs the same, so large structures weigh more;
- **norm-based** (``force_norm_mae``, ``stress_frobenius_mae``): for forces, the length |F_pred - F_ref| of
  each atom's error vector, averaged over the atoms of a structure and then over structures (every
  structure weighs the same); for stress, the Frobenius norm of the 3x3 difference averaged over structures.

Energies are compared in the reference's convention (raw DFT or MP2020-corrected, see
:mod:`mattersim.conventions`): a model trained on the other convention has its predictions converted with
pymatgen's MP2020 corrections before the ``energy_mae``/``rmse``/``mean_error``, and the MAE of the
unconverted predictions is reported beside it (``energy_mae_as_predicted``).

RMSEs are component-wise. Structures that failed (exception or NaN) are left out of every metric and
counted in ``n_failed`` by the runner, never dropped silently.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from ase.units import GPa

from benchmarks.common import metric

__all__ = ["EV_A3_TO_GPA", "EFS_DEFINITIONS", "efs_metrics", "mae", "rmse", "force_norm_mae", "stress_frobenius_mae"]

#: 1 eV/Å^3 in GPa
EV_A3_TO_GPA = 1.0 / GPa

#: what each energy/force/stress metric means (``definitions`` of ``metrics.json`` and the report)
EFS_DEFINITIONS: dict[str, str] = {
    "energy": "total energy per atom (eV/atom), one value per structure; MAE/RMSE/mean error in the "
              "reference's energy convention (see 'energy_convention'), energy_mae_as_predicted without "
              "conversion",
    "force_mae": "component-wise: mean |ΔF| over all Cartesian components of all atoms of all structures "
                 "(eV/Å; large structures weigh more)",
    "force_norm_mae": "norm-based: |F_pred − F_ref| per atom, averaged over each structure's atoms, then over "
                      "structures (eV/Å; every structure weighs the same)",
    "force_rmse": "component-wise RMSE over all Cartesian components (eV/Å)",
    "stress_mae": "component-wise over the 9 components of each 3x3 stress tensor (GPa, ASE sign: negative = "
                  "compressive)",
    "stress_frobenius_mae": "Frobenius norm of the 3x3 difference per structure, averaged over structures (GPa)",
    "stress_rmse": "component-wise RMSE over the 9 components (GPa)",
    "failures": "structures whose prediction raised or was not finite are left out of every metric and counted "
                "in n_failed",
}


def _pair(ref, pred) -> tuple[np.ndarray, np.ndarray]:
    ref, pred = np.asarray(ref, dtype=float), np.asarray(pred, dtype=float)
    if ref.shape != pred.shape:
        raise ValueError(f"reference shape {ref.shape} != prediction shape {pred.shape}")
    return ref, pred


def mae(ref, pred) -> float | None:
    """Mean absolute error over all elements (None for no elements)."""
    ref, pred = _pair(ref, pred)
    return float(np.mean(np.abs(pred - ref))) if ref.size else None


def rmse(ref, pred) -> float | None:
    """Root-mean-square error over all elements (None for no elements)."""
    ref, pred = _pair(ref, pred)
    return float(np.sqrt(np.mean((pred - ref) ** 2))) if ref.size else None


def force_norm_mae(ref: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> float | None:
    """|F_pred - F_ref| per atom, averaged over each structure's atoms, then over structures."""
    per_structure = []
    for r, p in zip(ref, pred, strict=True):
        r, p = _pair(r, p)
        if len(r):
            per_structure.append(np.linalg.norm(p - r, axis=1).mean())
    return float(np.mean(per_structure)) if per_structure else None


def stress_frobenius_mae(ref, pred) -> float | None:
    """Frobenius norm of the 3x3 stress difference, averaged over structures (same unit as the input)."""
    ref, pred = _pair(ref, pred)
    if not len(ref):
        return None
    return float(np.mean(np.linalg.norm((pred - ref).reshape(len(ref), 9), axis=1)))


def efs_metrics(n_atoms, energy_ref, energy_pred, forces_ref, forces_pred, stress_ref, stress_pred,
                energy_offset=None) -> list[dict]:
    """All energy/force/stress metrics of the successful structures.

    ``energy_*`` total energies (eV, one per structure), ``forces_*`` lists of (n_i, 3) arrays (eV/Å),
    ``stress_*`` (n, 3, 3) in eV/Å^3; ``stress_pred`` may be None (a model without stress).

    ``energy_offset`` (eV, one per structure, from :func:`mattersim.conventions.convention_offsets`) puts
    the predictions into the reference's energy convention: the energy MAE, RMSE and mean error compare
    ``energy_pred + energy_offset`` with the reference (structures with a NaN offset are left out of them),
    and ``energy_mae_as_predicted`` compares the predictions as the model gives them. Without an offset the
    conventions are the same and both MAEs agree.
    """
    n_atoms = np.asarray(n_atoms, dtype=float)
    e_ref = np.asarray(energy_ref, dtype=float) / n_atoms
    e_pred = np.asarray(energy_pred, dtype=float) / n_atoms
    e_matched = e_pred if energy_offset is None else e_pred + np.asarray(energy_offset, dtype=float) / n_atoms
    ok = np.isfinite(e_matched)
    f_ref = np.concatenate([np.asarray(f, dtype=float).reshape(-1, 3) for f in forces_ref]) if len(forces_ref) else np.zeros((0, 3))
    f_pred = np.concatenate([np.asarray(f, dtype=float).reshape(-1, 3) for f in forces_pred]) if len(forces_pred) else np.zeros((0, 3))
    out = [
        metric("energy_mae_eV_per_atom", "Energy MAE (reference's convention)", "eV/atom", mae(e_ref[ok], e_matched[ok])),
        metric("energy_rmse_eV_per_atom", "Energy RMSE (reference's convention)", "eV/atom",
               rmse(e_ref[ok], e_matched[ok])),
        metric("energy_mean_error_eV_per_atom", "Energy mean signed error, pred − ref (reference's convention)",
               "eV/atom", float(np.mean(e_matched[ok] - e_ref[ok])) if ok.any() else None, None),
        metric("energy_mae_as_predicted_eV_per_atom", "Energy MAE as predicted (model's own convention)",
               "eV/atom", mae(e_ref, e_pred)),
        metric("force_mae_eV_per_A", "Force MAE (component-wise)", "eV/Å", mae(f_ref, f_pred)),
        metric("force_norm_mae_eV_per_A", "Force MAE (|ΔF| per atom, per structure)", "eV/Å",
               force_norm_mae(forces_ref, forces_pred)),
        metric("force_rmse_eV_per_A", "Force RMSE (component-wise)", "eV/Å", rmse(f_ref, f_pred)),
    ]
    if stress_pred is None:
        s_metrics = (None, None, None)
    else:
        s_ref = np.asarray(stress_ref, dtype=float).reshape(-1, 3, 3) * EV_A3_TO_GPA
        s_pred = np.asarray(stress_pred, dtype=float).reshape(-1, 3, 3) * EV_A3_TO_GPA
        s_metrics = (mae(s_ref, s_pred), stress_frobenius_mae(s_ref, s_pred), rmse(s_ref, s_pred))
    out += [
        metric("stress_mae_GPa", "Stress MAE (component-wise, 9 components)", "GPa", s_metrics[0]),
        metric("stress_frobenius_mae_GPa", "Stress MAE (Frobenius norm per structure)", "GPa", s_metrics[1]),
        metric("stress_rmse_GPa", "Stress RMSE (component-wise)", "GPa", s_metrics[2]),
    ]
    return out
