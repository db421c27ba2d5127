"""Elastic constants from stress-strain relations: :func:`run_elastic` (``mattersim elastic``).

Steps (logged to ``elastic.log``):

1. optional relaxation of positions and cell, keeping the space group (:func:`mattersim.relax.relax`,
   BFGS, at ``pressure`` GPa, ``fmax`` eV/Å);
2. strains: the Voigt directions, each at ``±s`` for every magnitude ``s`` in ``strains``. A direction that the
   point group's images of the directions already chosen span is not computed (:func:`strain_directions`):
   the stresses of the images are the rotated stresses (``σ(R ε Rᵀ) = R σ(ε) Rᵀ``), and C follows from all
   of them by least squares; a cubic crystal needs 2 directions, a hexagonal one 3, a triclinic one 6.
   Where an operation turns a direction into its negative (most shears: :func:`sign_images`), only its
   positive strains get a cell (cubic: 6 strained cells instead of 8, orthorhombic 18 instead of 24);
3. relaxed-ion (default, the physical answer): the ions of every strained cell relax at fixed cell, all
   cells together through :class:`mattersim.relax.BatchRelaxer` (one batched model call per step);
   clamped-ion (``relax_ions=False``) evaluates the strained cells once, in one batched call;
4. fit: for each direction j and stress component i a polynomial σ_i(ε_j) through the unstrained and
   strained points (cubic with two or more magnitudes, else a line); its slope at zero strain is C_ij (GPa),
   exact to O(s^4) since the ± points cancel the even terms and the cubic term takes the leading
   nonlinearity. How linear the response is over the strain range is reported per component: the RMS
   residual of a straight line (GPa) and its ratio to the component's change, so a poor fit shows where it
   happens;
5. the tensor symmetrised ((C + Cᵀ)/2, then averaged over the crystal's point group with pymatgen's
   ``fit_to_structure``; both changes are reported), in the IEEE setting (pymatgen
   ``ElasticTensor.convert_to_ieee``) and as computed; Voigt/Reuss/Hill bulk and shear moduli, Young's
   modulus and Poisson ratio (Hill), universal anisotropy (pymatgen); Born mechanical stability for the
   crystal's Laue class (Mouhat & Coudert, PRB 90, 224104 (2014)), naming each criterion and whether it
   holds. At a finite pressure the stress-strain slopes are the Birch coefficients B_ij, whose positive
   definiteness is the stability condition (Wang, Yip, Phillpot, Lutsko, Wolf, PRB 52, 12627 (1995));
   the same criteria are applied to them.

Units: strain dimensionless (Voigt: shear strains are engineering strains γ = 2ε), stress and moduli GPa
(ASE sign: tensile positive; C_ij = ∂σ_i/∂ε_j), pressure GPa, forces eV/Å.

Outputs with ``output_dir``: ``elastic.json`` (summary header, tensor as computed and IEEE, moduli,
stability, fit residuals, strain set), ``stress_strain.png`` (one panel per computed strain direction, the
points and the fitted lines), ``strained.extxyz`` (every computed strained cell with its stress),
``elastic.log`` and the resumable ``stresses.npz``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from ase import Atoms
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress
from ase.units import GPa

from mattersim.calculator import evaluate_batch, model_info
from mattersim.errors import InputError
from mattersim.io import atomic_path, full_stress
from mattersim.symmetry import symmetry_dataset
from workflows.cells import structure_record
from workflows.outputs import ArrayStore, RunFolder, load_summary, run_key, summary_header

__all__ = ["ElasticResult", "MAX_STRAIN", "born_stability", "crystal_symmetry", "run_elastic", "run_elastic_many",
           "sign_images", "strain_directions"]

logger = logging.getLogger("mattersim.elastic")

WORKFLOW_VERSION = 1
#: the largest strain magnitude accepted (beyond it the response is not linear for most crystals)
MAX_STRAIN = 0.05
#: Voigt strain vectors carry engineering shears (2 ε_ij); stress vectors the plain σ_ij
_ENGINEERING = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
UNITS = {"stress": "GPa (ASE sign: tensile positive)", "elastic_constants": "GPa", "moduli": "GPa",
         "strain": "dimensionless (Voigt; shear = engineering strain)", "pressure": "GPa", "force": "eV/Å"}
_STORE = "stresses.npz"


# ---------------------------------------------------------------------------------------------------------
# strains and symmetry
# ---------------------------------------------------------------------------------------------------------


def voigt_strain(j: int, magnitude: float) -> np.ndarray:
    """The symmetric 3x3 strain tensor of Voigt component ``j`` (0-5: xx yy zz yz xz xy) with value
    ``magnitude`` (an engineering strain for the shears: ε_ij = magnitude / 2)."""
    return voigt_6_to_full_3x3_stress(magnitude * np.eye(6)[j] / _ENGINEERING)


def _strain_voigt(e: np.ndarray) -> np.ndarray:
    """Voigt vector of a symmetric strain tensor, engineering shears (2 ε_ij). (ASE's ``*_strain`` helpers
    work on the deformation gradient 1 + ε instead.)"""
    return full_3x3_to_voigt_6_stress(e) * _ENGINEERING


def crystal_symmetry(atoms: Atoms, symprec: float = 1e-5, data: Any = None) -> tuple[str, int, list[np.ndarray]]:
    """Space-group symbol and number and the point-group operations as distinct Cartesian 3x3 matrices, from
    one spglib call, or from its ``data`` when given (P1 and the identity when spglib finds nothing)."""
    data = symmetry_dataset(atoms, symprec) if data is None else data
    if data is None:
        return "P1", 1, [np.eye(3)]
    lat = np.array(atoms.cell[:])  # rows are lattice vectors: x = latᵀ f
    cart = np.einsum("ij,njk,kl->nil", lat.T, np.asarray(data.rotations, dtype=float), np.linalg.inv(lat.T))
    _, first = np.unique(np.round(cart, 6), axis=0, return_index=True)
    return str(data.international), int(data.number), [cart[i] for i in sorted(first)]


def standard_rotation(atoms: Atoms, symprec: float = 1e-5, data: Any = None) -> np.ndarray:
    """The rotation q (3x3, orthogonal) that turns ``atoms`` into spglib's standard orientation of its crystal
    (x_std = q x): cubic axes along x, y, z; the hexagonal and tetragonal c along z. The identity when spglib
    finds no symmetry. ``data``: spglib's dataset of ``atoms``, if already at hand."""
    data = symmetry_dataset(atoms, symprec) if data is None else data
    if data is None:
        return np.eye(3)
    u, _, vt = np.linalg.svd(np.asarray(data.std_rotation_matrix, dtype=float))
    q = u @ vt  # the nearest orthogonal matrix (spglib's is orthogonal up to its idealisation)
    return q if np.linalg.det(q) > 0 else np.eye(3)


def strain_directions(rotations: Sequence[np.ndarray]) -> list[int]:
    """The Voigt directions to compute: in order, each one that the point group's images of the directions
    already chosen (``R E_k Rᵀ``, as Voigt vectors) do not span. Their images then span all six, and C follows
    from the computed stresses and their images (``σ(R ε Rᵀ) = R σ(ε) Rᵀ``). Cubic: xx and yz; hexagonal:
    xx, zz and yz; triclinic: all six."""
    rots = np.asarray(rotations, dtype=float)
    computed: list[int] = []
    span = np.zeros((0, 6))
    for j in range(6):
        unit = _strain_voigt(voigt_strain(j, 1.0))
        if np.linalg.matrix_rank(np.vstack([span, unit]), tol=1e-8) > np.linalg.matrix_rank(span, tol=1e-8) if len(span) else True:
            computed.append(j)
            images = np.einsum("nab,bc,ndc->nad", rots, voigt_strain(j, 1.0), rots)
            span = np.vstack([span] + [_strain_voigt(e)[None, :] for e in images])
    return computed


def sign_images(rotations: Sequence[np.ndarray], directions: Sequence[int]) -> dict[int, np.ndarray]:
    """For each Voigt direction in ``directions`` that some point-group operation R turns into its own negative
    (``R E_k Rᵀ = -E_k``), that R: the stress of the strain -s is then ``R σ(+s) Rᵀ`` and only the positive
    magnitudes need a strained cell. Shears of every crystal with a 2-fold axis or a mirror along a cell axis
    (cubic: yz by the 4-fold axis along x); never a normal strain (R keeps the trace)."""
    out: dict[int, np.ndarray] = {}
    for k in directions:
        e = voigt_strain(k, 1.0)
        for rot in rotations:
            if np.allclose(rot @ e @ rot.T, -e, atol=1e-8):
                out[k] = np.asarray(rot, dtype=float)
                break
    return out


def strained_cell(atoms: Atoms, strain: np.ndarray) -> Atoms:
    """``atoms`` deformed by ``F = I + strain`` (positions scaled with the cell)."""
    out = atoms.copy()
    out.calc = None
    out.set_cell(np.array(atoms.cell[:]) @ (np.eye(3) + strain).T, scale_atoms=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# stability
# ---------------------------------------------------------------------------------------------------------


def laue_class(spacegroup_number: int) -> str:
    """The crystal family used for the stability criteria, from the space-group number."""
    n = int(spacegroup_number)
    if n >= 195:
        return "cubic"
    if n >= 168:
        return "hexagonal"
    if n >= 149:
        return "rhombohedral I"
    if n >= 143:
        return "rhombohedral II"
    if n >= 89:
        return "tetragonal I"
    if n >= 75:
        return "tetragonal II"
    if n >= 16:
        return "orthorhombic"
    if n >= 3:
        return "monoclinic"
    return "triclinic"


def born_stability(c: np.ndarray, spacegroup_number: int) -> dict:
    """Born stability of the 6x6 (symmetric) matrix ``c`` (GPa): the Laue-class criteria of Mouhat & Coudert
    (2014) where they are simple, and always the necessary and sufficient one, positive definiteness (all
    eigenvalues > 0). Returns ``{"stable", "crystal_class", "criteria": [{"criterion", "value_GPa",
    "holds"}], "eigenvalues_GPa", "failing": [...]}``."""
    c = np.asarray(c, dtype=float)
    c11, c12, c13, c33, c44, c66 = c[0, 0], c[0, 1], c[0, 2], c[2, 2], c[3, 3], c[5, 5]
    cls = laue_class(spacegroup_number)
    crit: list[tuple[str, float]] = []
    if cls == "cubic":
        crit = [("C11 - C12 > 0", c11 - c12), ("C11 + 2 C12 > 0", c11 + 2 * c12), ("C44 > 0", c44)]
    elif cls in ("hexagonal", "tetragonal I", "tetragonal II"):
        crit = [("C11 - |C12| > 0", c11 - abs(c12)), ("C33 (C11 + C12) - 2 C13^2 > 0", c33 * (c11 + c12) - 2 * c13 ** 2),
                ("C44 > 0", c44), ("C66 > 0", c66)]
        if cls == "tetragonal II":
            crit.append(("C66 (C11 - C12) - 2 C16^2 > 0", c66 * (c11 - c12) - 2 * c[0, 5] ** 2))
    elif cls in ("rhombohedral I", "rhombohedral II"):
        c14 = c[0, 3]
        extra = c14 ** 2 + (c[0, 4] ** 2 if cls == "rhombohedral II" else 0.0)
        crit = [("C11 - |C12| > 0", c11 - abs(c12)), ("C44 > 0", c44),
                ("C13^2 < C33 (C11 + C12) / 2", 0.5 * c33 * (c11 + c12) - c13 ** 2),
                ("C14^2 (+ C15^2) < C44 (C11 - C12) / 2", 0.5 * c44 * (c11 - c12) - extra)]
    eig = np.linalg.eigvalsh(0.5 * (c + c.T))
    crit.append(("all eigenvalues of C > 0 (positive definite)", float(eig.min())))
    criteria = [{"criterion": name, "value_GPa": float(v), "holds": bool(v > 0)} for name, v in crit]
    failing = [x["criterion"] for x in criteria if not x["holds"]]
    return {"stable": not failing, "crystal_class": cls, "criteria": criteria,
            "eigenvalues_GPa": eig.tolist(), "failing": failing}


# ---------------------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ElasticResult:
    """A finished :func:`run_elastic`: ``summary`` (the content of ``elastic.json``), the relaxed
    ``atoms`` and ``output_dir``. ``c`` is the symmetrised 6x6 tensor as computed (GPa), ``c_ieee`` the same in
    the IEEE setting."""

    summary: dict
    atoms: Atoms
    output_dir: Path | None = None

    @property
    def c(self) -> np.ndarray:
        return np.array(self.summary["elastic_tensor"]["as_computed_GPa"])

    @property
    def c_ieee(self) -> np.ndarray:
        return np.array(self.summary["elastic_tensor"]["ieee_GPa"])

    @property
    def stable(self) -> bool:
        return bool(self.summary["stability"]["stable"])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``elastic.json`` and ``relaxed.vasp`` to ``directory``."""
        with RunFolder(directory, "elastic", logger) as folder:
            self._write(folder)
        self.output_dir = Path(directory)
        return self.output_dir

    def _write(self, folder: RunFolder) -> None:
        """``relaxed.vasp`` and, last, ``elastic.json`` listing every file the folder holds from this run."""
        import ase.io

        folder.write_with("relaxed.vasp", lambda p: ase.io.write(p, self.atoms, format="vasp", direct=True))
        folder.file("elastic.json")
        self.summary["files"] = folder.files
        folder.write_json("elastic.json", self.summary)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ElasticResult":
        import ase.io

        directory = Path(directory)
        summary = load_summary(directory, "elastic.json", ["relaxed.vasp"], "run_elastic / 'mattersim elastic'")
        return cls(summary=summary, atoms=ase.io.read(directory / "relaxed.vasp"), output_dir=directory)

    def rows(self) -> list[tuple[str, str]]:
        """(quantity, value) lines that ``mattersim elastic`` prints."""
        s = self.summary
        c = np.array(s["elastic_tensor"]["ieee_GPa"])
        rows = [(f"C{i + 1}j (IEEE)", "  ".join(f"{x:8.2f}" for x in c[i])) for i in range(6)]
        m = s["moduli"]
        rows += [("K Voigt / Reuss / Hill", f"{m['k_voigt_GPa']:.2f} / {m['k_reuss_GPa']:.2f} / {m['k_vrh_GPa']:.2f} GPa"),
                 ("G Voigt / Reuss / Hill", f"{m['g_voigt_GPa']:.2f} / {m['g_reuss_GPa']:.2f} / {m['g_vrh_GPa']:.2f} GPa"),
                 ("Young's modulus (Hill)", f"{m['young_GPa']:.2f} GPa"),
                 ("Poisson ratio (Hill)", f"{m['poisson_ratio']:.3f}"),
                 ("universal anisotropy", f"{m['universal_anisotropy']:.3f}")]
        st = s["stability"]
        rows.append(("Born stability", f"stable ({st['crystal_class']})" if st["stable"] else
                     f"UNSTABLE ({st['crystal_class']}): fails {'; '.join(st['failing'])}"))
        fit = s["fit"]
        rows.append(("fit", f"worst residual {fit['max_residual_GPa']:.3g} GPa ({100 * fit['max_relative_residual']:.2g}% of "
                            f"the component's change); asymmetry |C - Cᵀ| max {s['elastic_tensor']['asymmetry_max_GPa']:.3g} GPa, "
                            f"point-group averaging changed C by up to {s['elastic_tensor']['symmetrization_max_change_GPa']:.3g} GPa"))
        ions = s["settings"]["ions"]
        ir = s.get("ion_relaxation") or {}
        if ir.get("steps") is not None:
            ions += f"; {sum(ir['steps'])} {s['settings']['optimizer']} steps over {len(ir['steps'])} strained cells"
        if ir.get("hessian_displaced_cells") is not None:
            lowest = ir["lowest_curvatures_eV_per_A2"]
            ions += (f", started from the Γ-point Hessian ({ir['hessian_displaced_cells']} displaced cell(s)"
                     + (f", lowest curvature {lowest[0]:.3g} eV/Å²" if lowest else "")
                     + (f", {ir['unstable_gamma_modes']} UNSTABLE Γ mode(s), held" if ir["unstable_gamma_modes"] else "")
                     + ")")
        rows.append(("ions", ions))
        if self.output_dir is not None:
            rows.append(("output", str(self.output_dir)))
        return rows


# ---------------------------------------------------------------------------------------------------------
# the workflow
# ---------------------------------------------------------------------------------------------------------


def _magnitudes(strains: Any, name: str, largest: float) -> list[float]:
    """Sorted distinct magnitudes of ``strains`` in (0, largest]; InputError naming ``name`` otherwise."""
    try:
        mags = sorted({abs(float(x)) for x in np.atleast_1d(np.asarray(strains, dtype=float))})
    except (TypeError, ValueError):
        raise InputError(f"{name} must be numbers (magnitudes such as 0.005, 0.01), not {strains!r}.") from None
    if not mags or mags[0] <= 0 or mags[-1] > largest or not all(np.isfinite(mags)):
        raise InputError(f"{name} {list(np.atleast_1d(strains))}: every magnitude must be > 0 and at most "
                         f"{largest:g} ({100 * largest:g} %); e.g. 0.005,0.01.")
    return mags


def _check(atoms: Any, strains: Sequence[float], calculator, fmax: float) -> list[float]:
    if not isinstance(atoms, Atoms):
        raise InputError(f"atoms must be an ase.Atoms object, not {type(atoms).__name__}.")
    if len(atoms) == 0 or not np.asarray(atoms.pbc).all() or abs(atoms.cell.volume) < 1e-6:
        raise InputError("Elastic constants need a 3D-periodic crystal (pbc=True and a cell with volume); a "
                         "molecule or slab has none. Give the structure a periodic cell.")
    mags = _magnitudes(strains, "strains", MAX_STRAIN)
    props = getattr(calculator, "implemented_properties", None)
    if getattr(calculator, "property_only", False) or (props is not None and "stress" not in props):
        raise InputError(f"The model '{model_info(calculator).get('name')}' predicts no stress; elastic constants need "
                         "stresses. Use a potential with stress (MatterSim, CHGNet, SevenNet).")
    if not fmax > 0:
        raise InputError(f"fmax must be positive (eV/Å), not {fmax!r}.")
    return mags


def _moduli(c: np.ndarray) -> dict:
    from pymatgen.analysis.elasticity import ElasticTensor

    et = ElasticTensor.from_voigt(c)
    k_v, k_r, g_v, g_r = float(et.k_voigt), float(et.k_reuss), float(et.g_voigt), float(et.g_reuss)
    k, g = 0.5 * (k_v + k_r), 0.5 * (g_v + g_r)
    return {"k_voigt_GPa": k_v, "k_reuss_GPa": k_r, "k_vrh_GPa": k, "g_voigt_GPa": g_v, "g_reuss_GPa": g_r,
            "g_vrh_GPa": g, "young_GPa": 9 * k * g / (3 * k + g) if 3 * k + g else None,
            "poisson_ratio": (3 * k - 2 * g) / (2 * (3 * k + g)) if 3 * k + g else None,
            "universal_anisotropy": float(et.universal_anisotropy) if k_r and g_r else None}


def _symmetrized(c: np.ndarray, rotations: Sequence[np.ndarray]) -> np.ndarray:
    """``c`` (Voigt, GPa) averaged over the crystal's point group: C'_ijkl = <R_ia R_jb R_kc R_ld C_abcd>_R (what
    pymatgen's ``fit_to_structure`` does, with the rotations already at hand): the noise of the relaxations
    and of the fit cannot break the crystal's symmetry; the change is reported."""
    from pymatgen.analysis.elasticity import ElasticTensor

    full = np.asarray(ElasticTensor.from_voigt(c), dtype=float)
    rots = np.asarray(rotations, dtype=float)
    mean = np.einsum("nia,njb,nkc,nld,abcd->ijkl", rots, rots, rots, rots, full) / len(rots)
    return np.array(ElasticTensor(mean).voigt)


def _rotated(c: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The Voigt tensor ``c`` (GPa) in the frame x' = r x: C'_ijkl = r_ia r_jb r_kc r_ld C_abcd."""
    from pymatgen.analysis.elasticity import ElasticTensor

    full = np.asarray(ElasticTensor.from_voigt(c), dtype=float)
    return np.array(ElasticTensor(np.einsum("ia,jb,kc,ld,abcd->ijkl", r, r, r, r, full)).voigt)


def _ieee(c: np.ndarray, atoms: Atoms) -> np.ndarray:
    from pymatgen.analysis.elasticity import ElasticTensor
    from pymatgen.io.ase import AseAtomsAdaptor

    et = ElasticTensor.from_voigt(c)
    # c is already averaged over the point group (_symmetrized): pymatgen's own initial fit to the structure
    # (another spglib analysis) would change nothing, and any of the equivalent IEEE rotations gives one tensor
    return np.array(et.convert_to_ieee(AseAtomsAdaptor.get_structure(atoms), initial_fit=False).voigt)


def _plot(path: Path, computed: list[int], strains: dict[int, np.ndarray], sig: dict[int, np.ndarray],
          slopes: dict[int, np.ndarray], sigma0: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["xx", "yy", "zz", "yz", "xz", "xy"]
    fig, axes = plt.subplots(1, len(computed), figsize=(4.2 * len(computed), 3.6), squeeze=False)
    for ax, k in zip(axes[0], computed):
        x = np.linspace(strains[k].min(), strains[k].max(), 2)
        for i in range(6):
            if abs(slopes[k][i]) < 1e-3 * max(1.0, np.abs(slopes[k]).max()):
                continue
            line = ax.plot(strains[k] * 100, sig[k][:, i], "o", ms=4)[0]
            ax.plot(x * 100, sigma0[i] + slopes[k][i] * x, "-", color=line.get_color(), lw=1,
                    label=f"σ_{names[i]}: slope {slopes[k][i]:.1f} GPa")
        ax.set_xlabel(f"strain ε_{names[k]} (%)" if k < 3 else f"engineering shear strain γ_{names[k]} = 2ε_{names[k]} (%)")
        ax.set_ylabel("stress (GPa)")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, pil_kwargs={"compress_level": 1})
    plt.close(fig)


#: the strained cells' ionic force threshold is ``fmax`` divided by this, unless ``ion_fmax`` is given
ION_FMAX_DIVISOR = 10.0


def _newton_start(relax_ions: bool, optimizer: str) -> bool:
    """Whether the strained cells' ions relax with BFGS started from the Γ-point Hessian (BFGS only)."""
    return bool(relax_ions) and str(optimizer).strip().upper() == "BFGS"


def _ion_start(relax_ions: bool, optimizer: str) -> str | None:
    if not relax_ions:
        return None
    if _newton_start(relax_ions, optimizer):
        return "the model's Γ-point Hessian of the unstrained cell (computed when an ion needs to move)"
    return f"{optimizer}'s default"


def _ion_relaxation_summary(data: dict, start: str | None, log) -> dict:
    """What the relaxed-ion step did: the optimizer's start, steps per strained cell, and the Γ-point Hessian's
    lowest curvatures (the three rigid translations left out) and the number of unstable modes, which the
    strained cells' relaxations held fixed (:class:`mattersim.relax.BatchRelaxer`'s ``hold_unstable``)."""
    out: dict[str, Any] = {"start": start, "steps": None, "hessian_displaced_cells": None,
                           "lowest_curvatures_eV_per_A2": None, "unstable_gamma_modes": None}
    if "ion_steps" in data:
        out["steps"] = [int(k) for k in np.asarray(data["ion_steps"])[1:]]  # the strained cells, in job order
    if "hessian" in data:
        from mattersim.relax import UNSTABLE_CURVATURE, internal_curvatures

        w = internal_curvatures(data["hessian"])
        unstable = int(np.sum(w < UNSTABLE_CURVATURE))
        out.update({"hessian_displaced_cells": int(data["hessian_cells"]),
                    "lowest_curvatures_eV_per_A2": [float(x) for x in w[:3]], "unstable_gamma_modes": unstable})
        if unstable:
            log.warning(f"the relaxed structure has {unstable} unstable Γ mode(s) with this model (lowest curvature "
                        f"{w[0]:.3g} eV/Å²): it is a saddle point, not a minimum, for its ions. "
                        "The strained cells' ions relax in the stable directions only (those modes held), so the "
                        "relaxed-ion constants are those of the structure as it is kept, not of where it would fall")
    return out


def run_elastic(atoms: Atoms, calculator, *, relax: bool = True, relax_ions: bool = True, pressure: float = 0.0,
                strains: Sequence[float] = (0.005, 0.01), shear_strains: Sequence[float] | None = None,
                fit: str = "cubic", fmax: float = 0.005, ion_fmax: float | None = None, relax_steps: int = 500,
                optimizer: str = "BFGS", symprec: float = 1e-5, use_symmetry: bool = True,
                output_dir: str | os.PathLike | None = None, progress: bool = False) -> ElasticResult:
    """The elastic tensor of ``atoms`` with ``calculator`` (any ASE calculator with stress).

    ``relax``: relax positions and cell first (space group kept) at ``pressure`` GPa to ``fmax`` eV/Å;
    ``relax_ions``: relax the ions of every strained cell (relaxed-ion, default) or not (clamped-ion);
    ``strains``: magnitudes, each applied as +s and -s to the normal Voigt directions (0 < s <= 0.05);
    ``shear_strains``: other magnitudes for the 3 shear directions (engineering strain γ, up to 0.1, i.e. a
    tensor strain of 5 %; pymatgen's and matcalc's shear amounts are tensor strains: their 0.025 is our 0.05);
    default: ``strains``;
    ``ion_fmax``: the force threshold (eV/Å) of the strained cells' ions (relaxed-ion), default ``fmax``/10:
    a residual force f along a soft mode of curvature k leaves the ions f/k away from their minimum and the
    stress off by the internal-strain coupling times that, divided by a strain of 0.5 %: rutile ReO2 with
    SevenNet-0 (k = 0.21 eV/Å²) has C11 - C12 = -111 GPa converged (1e-4 eV/Å), -52 GPa with the ions at
    0.005 eV/Å and -111 GPa at the default 0.0005; with the Newton start that costs 2-7 steps per cell;
    ``fit``: ``"cubic"`` (slope at zero strain of a cubic polynomial, exact to O(s^4); needs two magnitudes,
    else a line) or ``"linear"`` (a straight line, as pymatgen and matcalc fit);
    ``optimizer``: of the relaxations; with BFGS (default) the strained cells' ions start from the model's
    Γ-point Hessian of the unstrained cell (a Newton first step, computed only when an ion must move) and
    that Hessian's unstable modes are held (docs/elastic.md); ``use_symmetry``: compute only the directions
    that the point group's images of the others do not span (:func:`strain_directions`); False computes all six;
    ``output_dir``: where to write the files of the module docstring (None: nothing).
    """
    mags = _check(atoms, strains, calculator, fmax)
    ion_fmax = float(fmax) / ION_FMAX_DIVISOR if ion_fmax is None else ion_fmax
    if not (isinstance(ion_fmax, (int, float)) and np.isfinite(ion_fmax) and ion_fmax > 0):
        raise InputError(f"ion_fmax (--ion-fmax) must be a positive number of eV/Å, not {ion_fmax!r}.")
    shear_mags = mags if shear_strains is None else _magnitudes(shear_strains, "shear_strains", 2 * MAX_STRAIN)
    if fit not in ("cubic", "linear"):
        raise InputError(f"fit must be 'cubic' or 'linear', not {fit!r}.")
    RunFolder.check(output_dir)
    info = model_info(calculator)
    settings = {"relax": bool(relax), "ions": "relaxed-ion" if relax_ions else "clamped-ion",
                "pressure_GPa": float(pressure), "strains": mags, "shear_strains": shear_mags, "fit": fit,
                "fmax_eV_per_A": float(fmax), "ion_fmax_eV_per_A": float(ion_fmax) if relax_ions else None,
                "relax_steps": int(relax_steps), "optimizer": str(optimizer), "symprec": float(symprec),
                "use_symmetry": bool(use_symmetry), "strain_frame": "the crystal's standard orientation (spglib)",
                "ion_relaxation_start": _ion_start(relax_ions, optimizer)}
    timings = {"relaxation": 0.0, "strained_cells": 0.0}
    t_start = time.perf_counter()
    with RunFolder(output_dir, "elastic", logger) as folder:
        log = folder.log
        unit = atoms.copy()
        unit.calc = None
        store = ArrayStore(folder.file(_STORE), run_key(structure_record(unit), settings, info))
        resumed = store.load(log)
        log.info(f"run_elastic: {unit.get_chemical_formula()} ({len(unit)} atoms), model {info.get('name')}, "
                 f"{settings['ions']}, strains ±{mags}, P = {pressure} GPa, output {folder.path}")

        # 1. relaxation
        relax_summary = None
        if relax and resumed and "relaxed_cell" in store.data:
            unit.set_cell(store.data["relaxed_cell"])
            unit.positions = store.data["relaxed_positions"]
            relax_summary = json.loads(str(store.data["relax_summary"]))
            log.info("relaxation: reusing the relaxed structure stored in stresses.npz")
        elif relax:
            from mattersim.relax import relax as relax_structure

            t0 = time.perf_counter()
            res = relax_structure(unit, calculator, pressure=pressure, fmax=fmax, steps=relax_steps, mode="full",
                                  symmetry=True, symprec=symprec, optimizer=optimizer)
            timings["relaxation"] = time.perf_counter() - t0
            if not np.all(np.isfinite(res.atoms.positions)) or not np.isfinite(res.energy):
                raise InputError("The relaxation blew up (non-finite energy or positions): the structure is far from "
                                 "any minimum of this model; check the structure, or use relax=False / --no-relax.")
            if not res.converged:
                raise InputError(f"The structure did not relax to fmax = {fmax} eV/Å within {relax_steps} steps "
                                 f"(fmax {res.fmax:.3g} eV/Å at the end): elastic constants of a structure that is "
                                 "not at equilibrium are meaningless. Raise relax_steps (--relax-steps) or fmax, or "
                                 "check the structure.")
            unit = res.atoms.copy()
            unit.calc = None
            relax_summary = res.to_dict()
            log.info(f"relaxation: converged after {res.steps} steps, V {res.initial_volume:.3f} -> {res.volume:.3f} Å^3")
            store.data.update({"relaxed_cell": np.array(unit.cell[:]), "relaxed_positions": unit.positions,
                               "relax_summary": np.array(json.dumps(relax_summary))})
            store.save()

        # 2. strains, reduced by symmetry, along the crystal's axes: the cell is turned into spglib's standard
        # orientation first (and C back at the end). A finite strain along rotated axes mixes normal and shear
        # responses beyond linear order, so the tensor would depend on how the input cell happens to be oriented
        # (MP primitive cells of cubic crystals: up to 18 GPa in G_VRH with 5 % shears); there, too, the images
        # of a strain under the point group are other Voigt directions of the same magnitude.
        data = symmetry_dataset(unit, symprec)  # one spglib call for both: the point group turns with the cell
        q = standard_rotation(unit, symprec, data)
        work = unit.copy()
        work.set_cell(np.array(unit.cell[:]) @ q.T, scale_atoms=True)
        spacegroup, sg_number, point_group = crystal_symmetry(unit, symprec, data)
        point_group = [q @ r @ q.T for r in point_group]
        rotations = point_group if use_symmetry else [np.eye(3)]
        computed = strain_directions(rotations)
        values = {j: np.array(sorted([-m for m in ms] + [0.0] + ms)) for j in range(6)
                  for ms in [mags if j < 3 else shear_mags]}
        # a direction that an operation turns into its negative needs no cell for -s: σ(-s) = R σ(+s) Rᵀ
        flips = sign_images(rotations, computed)
        jobs = [(k, d) for k in computed for d in values[k] if d > 0.0 or (d < 0.0 and k not in flips)]
        log.info(f"strains: space group {spacegroup}; {len(computed)} of 6 Voigt directions computed "
                 f"({', '.join(str(k + 1) for k in computed)}), {len(jobs)} strained cells"
                 + (f" (the negative strains of direction(s) {', '.join(str(k + 1) for k in flips)} are images of "
                    "the positive ones)" if flips else "") + f", {settings['ions']}")

        # 3. stresses of the unstrained and strained cells (resumable)
        n = len(jobs) + 1
        if store.data.get("stresses") is None or store.data["stresses"].shape != (n, 3, 3):
            store.data.update({"stresses": np.zeros((n, 3, 3)), "done": np.zeros(n, dtype=bool)})
        done, stresses = store.data["done"], store.data["stresses"]
        relaxed_stress = None if relax_summary is None else relax_summary.get("stress")
        if not done[0] and relaxed_stress is not None:
            # the unstrained cell is the relaxed one: its stress is the relaxation's last model call (turned
            # into the standard orientation), and it is relaxed already (relaxed-ion): no call needed
            stresses[0], done[0] = q @ np.asarray(relaxed_stress, dtype=float) @ q.T, True
        cells = [work] + [strained_cell(work, voigt_strain(k, d)) for k, d in jobs]
        todo = [i for i in range(n) if not done[i]]
        t0 = time.perf_counter()
        finals = [None] * n
        if todo:
            if relax_ions:
                from mattersim.relax import BatchRelaxer

                def hessian() -> np.ndarray | None:  # only called if a strained cell's ions are not at rest
                    from workflows.phonon import cell_hessian

                    if "hessian" not in store.data:
                        try:
                            h, n_cells = cell_hessian(work, calculator, symprec=symprec)
                        except Exception as exc:  # noqa: BLE001 - a start is an optimisation: BFGS goes on without
                            log.warning(f"the Γ-point Hessian failed ({type(exc).__name__}: {str(exc)[:200]}); the "
                                        "strained cells' ions relax with BFGS from its default start")
                            return None
                        store.data.update({"hessian": h, "hessian_cells": np.array(n_cells)})
                        store.save()
                    return store.data["hessian"]

                relaxer = BatchRelaxer(calculator, fmax=ion_fmax, steps=relax_steps, mode="fixed_cell",
                                       optimizer=optimizer, show_progress=progress,
                                       hessian=hessian if _newton_start(relax_ions, optimizer) else None)
                results = relaxer.relax([cells[i] for i in todo])
                steps = store.data.setdefault("ion_steps", np.zeros(n, dtype=int))
                steps[todo] = [r.steps for r in results]
                bad = [cells[i].get_chemical_formula() for i, r in zip(todo, results) if not r.converged]
                if bad:
                    log.warning(f"{len(bad)} strained cell(s) did not relax their ions to ion_fmax {ion_fmax} eV/Å "
                                f"within {relax_steps} steps; their stresses are used as they are")
                for i, r in zip(todo, results):
                    if r.stress is None or not np.all(np.isfinite(r.stress)):
                        raise InputError("The model returned no finite stress for a strained cell; it cannot give "
                                         "elastic constants.")
                    stresses[i], finals[i] = full_stress(r.stress), r.atoms
            else:
                # clamped ions: stresses only (a model that differentiates once per derivative skips the forces)
                results = evaluate_batch(calculator, [cells[i] for i in todo], ("energy", "stress"))
                for i, r in zip(todo, results):
                    if r.get("stress") is None or not np.all(np.isfinite(r["stress"])):
                        raise InputError("The model returned no finite stress for a strained cell; it cannot give "
                                         "elastic constants.")
                    stresses[i] = full_stress(r["stress"])
            done[todo] = True
            store.save()
        timings["strained_cells"] = time.perf_counter() - t0
        ion_relaxation = _ion_relaxation_summary(store.data, settings["ion_relaxation_start"], log) if relax_ions else None

        # 4. fit. For each computed direction k the slope S_k = dσ/dε_k at zero strain, per stress component: a
        # cubic polynomial through the points (two or more magnitudes: the ± points cancel the even terms and
        # the cubic term takes the leading nonlinearity, so the slope is exact to O(s^4)), else a line; how
        # linear the response is: the RMS residual of a straight line. Then C from all pairs
        # (R E_k Rᵀ, R S_k Rᵀ) over the point group by least squares: C u = v for every pair.
        sigma0_tensor = stresses[0] / GPa
        by_job = {(k, round(float(d), 12)): stresses[i + 1] / GPa for i, (k, d) in enumerate(jobs)}
        for k, rot in flips.items():
            for d in values[k][values[k] > 0.0]:
                by_job[(k, round(float(-d), 12))] = rot @ by_job[(k, round(float(d), 12))] @ rot.T
        sig_dir: dict[int, np.ndarray] = {}
        slopes: dict[int, np.ndarray] = {}
        resid = np.full((6, 6), np.nan)
        for k in computed:
            x = values[k]
            sig_dir[k] = np.array([full_3x3_to_voigt_6_stress(sigma0_tensor if d == 0.0 else by_job[(k, round(float(d), 12))]) for d in x])
            degree = 3 if fit == "cubic" and len(x) >= 5 else 1
            coef, *_ = np.linalg.lstsq(np.vander(x, degree + 1, increasing=True), sig_dir[k], rcond=None)
            slopes[k] = coef[1]
            line = np.vander(x, 2, increasing=True)
            lin, *_ = np.linalg.lstsq(line, sig_dir[k], rcond=None)
            resid[:, k] = np.sqrt(np.mean((line @ lin - sig_dir[k]) ** 2, axis=0))
        pairs_u, pairs_v = [], []
        for k in computed:
            e_k, s_k = voigt_strain(k, 1.0), voigt_6_to_full_3x3_stress(slopes[k])
            for rot in rotations:
                pairs_u.append(_strain_voigt(rot @ e_k @ rot.T))
                pairs_v.append(full_3x3_to_voigt_6_stress(rot @ s_k @ rot.T))
        sol, *_ = np.linalg.lstsq(np.array(pairs_u), np.array(pairs_v), rcond=None)
        c_raw = sol.T  # C u = v  <=>  u^T C^T = v^T
        c_std = _symmetrized(0.5 * (c_raw + c_raw.T), point_group)
        c = _rotated(c_std, q.T)  # back to the input's orientation (x_std = q x_input)
        # relative to the component's change over the strain range, for the components that change (the
        # others, zero by symmetry or nearly, have no scale to be relative to: None)
        change = np.full((6, 6), np.nan)
        for k in computed:
            change[:, k] = np.abs(slopes[k]) * np.ptp(values[k])
        biggest = max(float(np.abs(slopes[k]).max()) for k in computed)
        significant = np.isfinite(change) & (change > 0.01 * biggest * np.nanmax([np.ptp(values[k]) for k in computed]))
        relative = np.where(significant, resid / np.where(significant, change, 1.0), np.nan)
        sigma0_std = full_3x3_to_voigt_6_stress(sigma0_tensor)  # the frame of the strains (the plot's)
        sigma0 = full_3x3_to_voigt_6_stress(q.T @ sigma0_tensor @ q)  # in the input's orientation

        # 5. derived quantities
        stability = born_stability(c_std, sg_number)  # its criteria are written for the standard orientation
        moduli = _moduli(c_std)
        c_ieee = _ieee(c_std, work)
        if not stability["stable"]:
            log.warning(f"mechanically UNSTABLE ({stability['crystal_class']}): fails {'; '.join(stability['failing'])}")
        timings["total"] = time.perf_counter() - t_start
        summary = {
            **summary_header("elastic", WORKFLOW_VERSION, info, settings, UNITS, timings),
            "structure": {"formula": unit.get_chemical_formula(mode="hill"), "spacegroup": spacegroup,
                          "spacegroup_number": sg_number, "n_atoms": len(unit), "volume_A3": float(unit.get_volume()),
                          "cell_A": np.array(unit.cell[:]).tolist()},
            "relaxation": relax_summary,
            "ion_relaxation": ion_relaxation,
            "strain_set": {"magnitudes": mags, "shear_magnitudes": shear_mags, "computed_directions": [k + 1 for k in computed],
                           "n_strained_cells": len(jobs),
                           "negative_strains_by_symmetry": [k + 1 for k in flips],
                           "symmetry": "directions mapped onto computed ones by the point group's rotations "
                                       "(σ(R ε Rᵀ) = R σ(ε) Rᵀ)" if use_symmetry else "none"},
            "elastic_tensor": {
                "as_computed_GPa": c.tolist(), "ieee_GPa": c_ieee.tolist(), "standard_orientation_GPa": c_std.tolist(),
                "rotation_to_standard": q.tolist(), "raw_slopes_GPa": c_raw.tolist(),
                "asymmetry_max_GPa": float(np.abs(c_raw - c_raw.T).max()),
                "symmetrization_max_change_GPa": float(np.abs(c_std - 0.5 * (c_raw + c_raw.T)).max()),
                "meaning": "stress-strain slopes C_ij = dσ_i/dε_j (Voigt), made symmetric ((C + Cᵀ)/2) and averaged over "
                           "the crystal's point group (the changes are reported); at P ≠ 0 these are the Birch "
                           "coefficients B_ij",
                "reference_stress_GPa": sigma0.tolist()},
            "moduli": moduli,
            "stability": stability,
            "fit": {"residual_GPa": resid.tolist(), "relative_residual": relative.tolist(),
                    "max_residual_GPa": float(np.nanmax(resid)), "max_relative_residual": float(np.nanmax(relative)),
                    "slope_from": ("cubic polynomial in the strain (a line with one magnitude), slope at 0"
                                   if fit == "cubic" else "straight line"),
                    "meaning": "RMS deviation of σ_i(ε_j) from a straight line (GPa; columns j of the computed "
                               "directions, the others are their images); relative: divided by the "
                               "component's change over the strain range, for components above 1 % of the largest "
                               "(None for the others)"},
        }
        result = ElasticResult(summary=summary, atoms=unit, output_dir=folder.path)
        if folder.path is not None:
            from mattersim.io import write_results

            title = f"{summary['structure']['formula']} ({spacegroup}), {info.get('name') or 'model'}, {settings['ions']}"
            folder.write_with("stress_strain.png", lambda p: _plot(p, computed, values, sig_dir, slopes, sigma0_std, title))
            frames = [finals[i + 1] if finals[i + 1] is not None else cells[i + 1] for i in range(len(jobs))]
            write_results(folder.file("strained.extxyz"), frames,
                          [{"stress": stresses[i + 1]} for i in range(len(jobs))], info)
            result._write(folder)
            log.info(f"done in {timings['total']:.1f} s; K_VRH {moduli['k_vrh_GPa']:.2f} GPa, G_VRH {moduli['g_vrh_GPa']:.2f} GPa")
    return result


# ---------------------------------------------------------------------------------------------------------
# many crystals
# ---------------------------------------------------------------------------------------------------------


def run_elastic_many(structures: Sequence[tuple[str, Atoms]], calculator, output_dir: str | os.PathLike, *,
                     runner=None, spec=None, progress: bool = False, **settings) -> list[ElasticResult | dict]:
    """:func:`run_elastic` of every ``(label, Atoms)`` in ``structures`` with the same ``settings``, each into
    ``output_dir/<label>/`` (the files of the module docstring, resumable there). In this process one after
    the other; with ``runner`` (:class:`mattersim.distributed.TaskRunner` on Dask) and ``spec`` one task per
    crystal: the worker runs in a scratch folder seeded with the crystal's stored state and sends its files
    back, which this process writes into the crystal's folder. Returns, per crystal, its
    :class:`ElasticResult` or, when it failed, ``{"label", "error"}`` (a failing crystal never stops the
    others)."""
    from mattersim.distributed import TaskRunner

    out = Path(output_dir)
    labels = [label for label, _ in structures]
    if len(set(labels)) != len(labels):
        raise InputError(f"Labels must be distinct, got {labels}.")
    for _, a in structures:  # every check before any work
        _check(a, settings.get("strains", (0.005, 0.01)), calculator, settings.get("fmax", 0.005))
    out.mkdir(parents=True, exist_ok=True)
    runner = runner or TaskRunner()
    results: list[ElasticResult | dict | None] = [None] * len(structures)
    if not runner.distributed:
        for k, (label, a) in enumerate(structures):
            try:
                results[k] = run_elastic(a, calculator, output_dir=out / label, progress=progress, **settings)
            except Exception as exc:  # one crystal's failure is its own
                results[k] = {"label": label, "error": f"{type(exc).__name__}: {exc}"}
                logger.warning(f"{label}: elastic constants failed: {results[k]['error']}")
        return results

    def stored(label: str) -> dict[str, bytes]:
        path = out / label / _STORE
        return {_STORE: path.read_bytes()} if path.is_file() else {}

    def on_result(r) -> None:
        label = structures[r.index][0]
        if not r.ok:
            results[r.index] = {"label": label, "error": f"{r.error['type']}: {r.error['message']}"}
            logger.warning(f"{label}: elastic constants failed: {results[r.index]['error']}")
            return
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in r.value.items():
            with atomic_path(folder / name) as tmp:
                Path(tmp).write_bytes(data)
        results[r.index] = ElasticResult.load(folder)

    with runner.started():
        runner.run(_elastic_in_scratch, [(a, stored(label), settings) for label, a in structures], spec=spec,
                   on_result=on_result, progress=progress, description="elastic")
    return results


def _elastic_in_scratch(calculator, payload) -> dict[str, bytes]:
    """One crystal's :func:`run_elastic` (a Dask task) in a scratch folder seeded with ``files`` (its stored
    state); returns every file it wrote."""
    import tempfile

    atoms, files, settings = payload
    with tempfile.TemporaryDirectory(prefix="mattersim-elastic-") as tmp:
        folder = Path(tmp) / "run"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        run_elastic(atoms, calculator, output_dir=folder, **settings)
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
