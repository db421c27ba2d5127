"""Harmonic phonons with phonopy's finite-displacement method, forces from any ASE calculator.

One entry point, :func:`run_phonon`::

    from workflows.phonon import run_phonon
    result = run_phonon(atoms, calc, output_dir="phonon-Si")
    result.summary["frequencies"]["omega_max_THz"]

:func:`phonon_properties` is the post-processing of step 6 alone (ω_max, imaginary modes, mean group
velocity, thermal properties at 300 K) for any ``Phonopy`` object with force constants; the benchmarks
use it for both their DFT references and the predictions.

Steps (each one logged to ``phonon.log``):

1. optional relaxation of positions and cell keeping the space group (:func:`mattersim.relax.relax`,
   ``mode="full"``, ``symmetry=True``, BFGS, at ``pressure`` GPa, ``fmax`` eV/Å);
2. phonopy setup: the primitive cell is phonopy's ``primitive_matrix="auto"`` (or the given 3x3 axes, as
   in phonopy's ``PRIMITIVE_AXES``); the supercell is the given one or, when ``supercell`` is None,
   :func:`auto_supercell`: the (possibly non-diagonal) supercell of the unit cell with the fewest atoms
   that keeps the crystal's point group and whose minimum image distance (shortest lattice vector) is at
   least ``min_length`` Å, by default ``max(10 Å, 2 x the model's cutoff)``; a supercell whose minimum
   image distance is below twice the cutoff is logged as a warning; symmetry-reduced displacements of ``displacement`` Å
   (``Phonopy.generate_displacements``, phonopy's defaults for plus/minus and diagonal displacements);
3. forces of all displaced supercells through :func:`mattersim.calculator.evaluate_batch` (one batched
   model call per chunk for MatterSim potentials), saved after every chunk to ``forces.npz`` so that an
   interrupted run resumes; the perfect supercell's forces are the unit cell's, repeated (one call on the
   unit cell); nothing is subtracted from the forces (the residual forces of the perfect supercell and
   the force drift are reported in the summary);
4. force constants with phonopy (``produce_force_constants``, compact form as in phonopy's default),
   then phonopy's traditional translational-invariance symmetrisation
   (``symmetrize_force_constants()``, level 1), which enforces the acoustic sum rule;
5. optional non-analytical term correction (``nac=True``): Born charges and dielectric tensor from
   ``born_file``, ``predictor`` or the calculator (:func:`workflows.nac.resolve_born`), symmetrised
   with the crystal's site symmetry, Gonze-Lee (default) or Wang method; when the source carries an
   uncertainty (an ensemble such as ``mattersim-dielectric``), ``summary.json`` reports the Z* and
   eps_inf standard deviations and, with the members' own predictions, the standard deviation of the LO
   and TO frequencies at Γ over the members (:func:`workflows.nac.lo_to_spread`); with ``nac_range``
   the dipole-dipole tail that a short-ranged model lacks is added to its force constants first
   (:mod:`workflows.dipole`);
6. band structure along the seekpath path, DOS and projected DOS on a Γ-centred mesh, thermal
   properties, group velocities, imaginary-mode detection, plots and ``summary.json``.

Units: frequencies THz (1 THz = 33.356 cm^-1 = 4.1357 meV), lengths Å, forces eV/Å, force constants
eV/Å^2, temperature K, free energy kJ/mol, entropy and heat capacity J/K/mol (phonopy's units: per mole
of *primitive cells*, not per atom or per formula unit), group velocities m/s, pressure GPa, times s.

Imaginary modes (shown by phonopy as negative frequencies) below :data:`IMAGINARY_THRESHOLD_THZ`
(-0.01 THz) on the mesh or the band path are always reported: in ``summary.json`` (q-point, band,
frequency), in ``phonon.log`` and through ``logging.warning`` (logger ``mattersim.phonon``). Only the
three acoustic modes exactly at Γ are excluded, and only when ``|f| <`` :data:`GAMMA_ACOUSTIC_TOL_THZ`.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from ase import Atoms

from mattersim.calculator import evaluate_batch, model_info
from mattersim.errors import InputError
from mattersim.io import RunLog, atomic_path, atomic_write_json, progress_bar, to_builtin
from mattersim.settings import parse_mesh, parse_primitive, parse_supercell
from workflows.cells import structure_record, to_ase_atoms, to_phonopy_atoms
from workflows.outputs import ArrayStore, RunFolder, load_summary, run_key, save_png, summary_header

__all__ = [
    "DEFAULT_CUTOFF_A",
    "DEFAULT_MIN_LENGTH_A",
    "GAMMA_ACOUSTIC_TOL_THZ",
    "IMAGINARY_THRESHOLD_THZ",
    "PhononResult",
    "auto_supercell",
    "band_path",
    "cell_hessian",
    "find_imaginary_modes",
    "min_image_distance",
    "model_cutoff",
    "phonon_properties",
    "run_phonon",
]

logger = logging.getLogger("mattersim.phonon")

#: A mode counts as imaginary when its frequency (THz, phonopy's sign convention) is below this.
IMAGINARY_THRESHOLD_THZ = -0.01
#: At q = Γ the three modes of smallest |f| are the acoustic ones and are ignored if |f| is below this (THz).
GAMMA_ACOUSTIC_TOL_THZ = 0.05
#: Automatic supercell: smallest minimum image distance (Å) when ``min_length`` is not given; the rule is
#: ``max(DEFAULT_MIN_LENGTH_A, 2 * cutoff)`` (see docs/phonon.md for why).
DEFAULT_MIN_LENGTH_A = 10.0
#: Cutoff (Å) assumed for a calculator that does not expose one (MatterSim v1 and SevenNet-0 have 5 Å).
DEFAULT_CUTOFF_A = 5.0
#: 1 THz * Å (phonopy's group-velocity unit) in m/s.
THZ_ANGSTROM_TO_M_PER_S = 100.0
#: Version of the forces.npz layout.
_FORCES_FORMAT = 1
#: Version of the workflow's outputs (summary.json layout), in every summary header.
WORKFLOW_VERSION = 1
_FORCES_FILE = "forces.npz"

UNITS = {
    "frequency": "THz",
    "length": "Å",
    "force": "eV/Å",
    "force_constants": "eV/Å^2",
    "temperature": "K",
    "free_energy": "kJ/mol (per mole of primitive cells)",
    "entropy": "J/K/mol (per mole of primitive cells)",
    "heat_capacity": "J/K/mol (per mole of primitive cells)",
    "group_velocity": "m/s",
    "pressure": "GPa",
    "time": "s",
    "q_points": "reduced coordinates of the primitive cell's reciprocal lattice",
}


# ---------------------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PhononResult:
    """A finished phonon calculation.

    ``phonopy`` is the :class:`phonopy.Phonopy` object (force constants, NAC parameters, last mesh);
    ``summary`` the content of ``summary.json``; ``output_dir`` where the files are (None if not saved).
    """

    phonopy: Any
    summary: dict
    output_dir: Path | None = None

    def frequencies_at(self, q: Sequence[float]) -> np.ndarray:
        """Frequencies (THz, ascending) at reduced q of the primitive reciprocal lattice."""
        self.phonopy.run_qpoints(np.asarray(q, dtype=float).reshape(1, 3))
        return np.asarray(self.phonopy.qpoints.frequencies[0], dtype=float)

    def rows(self) -> list[tuple[str, str]]:
        """(quantity, value) lines of the printed summary (``mattersim phonon`` shows them as a table)."""
        s = self.summary
        freq, imag, th, st = s["frequencies"], s["imaginary_modes"], s["thermal_300K"], s["structure"]
        smat = st["supercell_matrix"]
        diagonal = all(smat[i][j] == 0 for i in range(3) for j in range(3) if i != j)
        shape = "x".join(str(smat[i][i]) for i in range(3)) if diagonal else str(smat)
        distance = st.get("supercell_min_image_distance_A")
        distance = f", min. image distance {distance:.2f} Å" if distance is not None else ""
        rows = [("supercell", f"{shape} ({st['n_atoms_supercell']} atoms{distance}), "
                              f"{s['forces']['n_supercells']} displaced supercells"),
                ("ω_max", f"{freq['omega_max_THz']:.4f} THz"),
                ("lowest frequency", f"{freq['lowest_THz']:.4f} THz")]
        if imag["count"]:
            worst = imag["most_negative_at"]
            q = " ".join(f"{x:.3f}" for x in worst["q"])
            where = worst.get("segment") or worst["where"]
            rows.append(("imaginary modes", f"{imag['count']}, most negative {imag['most_negative_THz']:.4f} THz at "
                                            f"q = ({q}) ({where})"))
        else:
            rows.append(("imaginary modes", f"none (below {imag['threshold_THz']} THz)"))
        nac_s = s.get("nac") or {}
        unc = nac_s.get("uncertainty") or {}
        if nac_s.get("born") is not None and nac_s.get("symbols"):
            # Z* (isotropic part, tr/3) of each species' first atom and eps_inf (tr/3), with the ensemble spread
            born = np.asarray(nac_s["born"], dtype=float)
            born_std, eps_std = unc.get("born_std"), unc.get("epsilon_std")
            parts, seen = [], set()
            for k, sym in enumerate(nac_s["symbols"]):
                if sym not in seen:
                    seen.add(sym)
                    err = f" ± {np.trace(np.asarray(born_std[k])) / 3:.3f}" if born_std is not None else ""
                    parts.append(f"{sym} {np.trace(born[k]) / 3:+.3f}{err}")
            rows.append(("Z* (tr/3)", ", ".join(parts) + " e"))
            eps = np.trace(np.asarray(nac_s["epsilon"], dtype=float)) / 3
            err = f" ± {np.trace(np.asarray(eps_std)) / 3:.3f}" if eps_std is not None else ""
            rows.append(("ε∞ (tr/3)", f"{eps:.3f}{err}"))
        for entry in (nac_s.get("gamma_lo_to") or {}).get("directions", []):
            d = "".join(str(int(x)) if float(x).is_integer() else f"{x:g}" for x in entry["direction"])
            lo_std = entry.get("lo_frequencies_std")
            if lo_std is not None and len(lo_std) == len(entry.get("lo_frequencies", [])):
                lo = ", ".join(f"{x:.3f} ± {e:.3f}" for x, e in zip(entry["lo_frequencies"], lo_std)) or "-"
            else:
                lo = ", ".join(f"{x:.3f}" for x in entry.get("lo_frequencies", [])) or "-"
            others = sorted(entry.get("to_frequencies", []), key=abs)[3:]  # drop the 3 acoustic modes
            to = ", ".join(f"{x:.3f}" for x in sorted(set(round(v, 3) for v in others))) or "-"
            rows.append((f"Γ [{d}] LO / TO", f"{lo} / {to} THz"))
        if unc.get("born_std_max") is not None or unc.get("epsilon_std_max") is not None:
            members = f" ({unc['n_members']} members)" if unc.get("n_members") else ""
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            rows.append(("σ(Z*) / σ(ε∞) max", f"{fmt(unc.get('born_std_max'))} e / {fmt(unc.get('epsilon_std_max'))}{members}"))
        rows += [("F (300 K)", f"{th['free_energy_kJ_per_mol']:.4f} kJ/mol"),
                 ("S (300 K)", f"{th['entropy_J_per_K_per_mol']:.4f} J/K/mol"),
                 ("Cv (300 K)", f"{th['heat_capacity_J_per_K_per_mol']:.4f} J/K/mol"),
                 ("", f"per mole of primitive cells ({st['n_atoms_primitive']} atoms)")]
        if self.output_dir is not None:
            rows.append(("output", str(self.output_dir)))
        return rows

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``phonopy.yaml`` (with force constants and NAC parameters) and ``summary.json`` to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _save_phonopy_yaml(self.phonopy, directory / "phonopy.yaml")
        atomic_write_json(directory / "summary.json", self.summary)
        self.output_dir = directory
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PhononResult":
        """Reopen a saved result (``phonopy.yaml`` + ``summary.json``); frequencies are reproduced exactly."""
        import phonopy

        directory = Path(directory)
        yaml_path = directory / "phonopy.yaml"
        summary = load_summary(directory, "summary.json", ["phonopy.yaml"], "run_phonon / 'mattersim phonon'")
        is_nac = bool((summary.get("nac") or {}).get("enabled"))
        # is_nac=False when the run had no NAC, so that phonopy does not pick up a stray ./BORN
        ph = phonopy.load(yaml_path, is_nac=is_nac, produce_fc=True, log_level=0)
        if ph.force_constants is None:
            raise InputError(f"'{yaml_path}' has neither force constants nor forces; rerun the phonon calculation.")
        return cls(phonopy=ph, summary=summary, output_dir=directory)


# ---------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------


def _save_phonopy_yaml(ph, path: Path) -> None:
    """phonopy.yaml with structure, supercell/primitive matrices, displacements+forces, force constants, NAC."""
    with atomic_path(path) as tmp:
        ph.save(str(tmp), settings={"force_constants": True, "force_sets": True, "displacements": True,
                                    "born_effective_charge": True, "dielectric_constant": True})


def perpendicular_widths(cell) -> np.ndarray:
    """Distances (Å) between opposite faces of a cell: ``V / |a_j x a_k|`` for i = 1, 2, 3."""
    cell = np.asarray(cell, dtype=float)
    volume = abs(np.linalg.det(cell))
    return np.array([volume / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)])


def min_image_distance(cell) -> float:
    """Length (Å) of the shortest non-zero lattice vector of ``cell`` (rows): the distance between an atom
    and its nearest periodic image, i.e. twice the radius of the sphere inscribed in the Wigner-Seitz cell
    (found with ASE's Minkowski reduction). Always >= the smallest perpendicular width."""
    from ase.geometry import minkowski_reduce

    reduced, _ = minkowski_reduce(np.asarray(cell, dtype=float))
    return float(np.linalg.norm(reduced, axis=1).min())


_ASSUMED_CUTOFF = "assumed: the calculator does not expose one"


def model_cutoff(calculator) -> tuple[float, str]:
    """The calculator's interaction cutoff in Å and where it comes from (``(5.0, "from Potential.cutoff")``).

    Read from the model where it has one: MatterSim ``Potential.cutoff``, SevenNet's ``cutoff``, CHGNet's
    atom-graph cutoff (``model.graph_converter.atom_graph_cutoff``), a calculator's own ``cutoff`` attribute;
    a composite's potential; the largest over an ensemble's members. Otherwise :data:`DEFAULT_CUTOFF_A`
    (5 Å, the cutoff of MatterSim v1 and SevenNet-0), with a source saying so.
    """
    def find(calc, depth=0):
        if calc is None or depth > 4:
            return None
        inner = getattr(calc, "potential_calc", None)  # CompositeCalculator: the forces come from the potential
        if inner is not None:
            return find(inner, depth + 1)
        members = getattr(calc, "members", None)
        if isinstance(members, (list, tuple)) and members:
            found = [find(m, depth + 1) for m in members]
            found = [f for f in found if f is not None]
            return max(found) if found else None
        for owner, attr, label in ((getattr(calc, "potential", None), "cutoff", "from Potential.cutoff"),
                                   (calc, "cutoff", "from the calculator's cutoff"),
                                   (getattr(getattr(calc, "model", None), "graph_converter", None),
                                    "atom_graph_cutoff", "from CHGNet's atom_graph_cutoff")):
            value = getattr(owner, attr, None) if owner is not None else None
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
                    and math.isfinite(float(value)) and float(value) > 0:
                return float(value), label
        return None

    found = find(calculator)
    if found is None:
        return DEFAULT_CUTOFF_A, _ASSUMED_CUTOFF
    return found


def _keeps_symmetry(p_rows: np.ndarray, rotations: np.ndarray | None) -> bool:
    """True if the supercell lattice ``p_rows @ cell`` is mapped onto itself by every rotation (integer
    matrices acting on fractional coordinates of the unit cell, spglib's convention): ``S^-1 R S`` is integer
    for ``S = p_rows.T`` (the lattice vectors as columns)."""
    if rotations is None or len(rotations) == 0:
        return True
    s = np.asarray(p_rows, dtype=float).T
    m = np.linalg.inv(s) @ np.asarray(rotations, dtype=float) @ s
    return bool(np.allclose(m, np.rint(m), atol=1e-6))


def auto_supercell(cell, min_length: float = DEFAULT_MIN_LENGTH_A, rotations=None) -> np.ndarray:
    """The supercell with the fewest atoms whose minimum image distance is >= ``min_length`` Å.

    ``cell``: the unit cell (rows, Å). ``rotations``: the crystal's point-group operations as integer matrices
    on fractional coordinates of ``cell`` (spglib's ``rotations``); when given, only supercells whose lattice
    keeps all of them are accepted, so that the supercell has the crystal's full point group (otherwise
    phonopy needs more displaced supercells and warns that the point groups differ).

    Candidates, all integer matrices: ``n x I`` with the perpendicular widths all >= ``min_length`` (always
    accepted: the minimum image distance is at least the smallest width), every diagonal ``n1 x n2 x n3``
    below it and, for every size from the smallest that Hermite's bound allows (a lattice whose shortest
    vector is d has a cell volume >= d^3/sqrt(2), reached by fcc) up to the best so far, the matrices of
    ASE's ``find_optimal_cell_shape`` (search range -1..1 around its guess) towards an fcc and a
    simple-cubic shape, the shapes with the largest minimum image distance for their volume (fcc) and with
    the largest perpendicular widths (cube). The accepted candidate with the fewest unit cells wins (ties:
    the larger minimum image distance). This is a search over good shapes, not a proof of optimality;
    the result always satisfies the distance and symmetry conditions.

    Returns phonopy's ``supercell_matrix`` (integer 3x3, lattice vectors as *columns* in units of the unit
    cell's: supercell rows = ``matrix.T @ cell``).
    """
    if not (min_length > 0 and math.isfinite(min_length)):
        raise InputError(f"min_length must be a positive length in Å, not {min_length!r}.")
    cell = np.asarray(cell, dtype=float)
    rotations = None if rotations is None else np.unique(np.asarray(rotations, dtype=int), axis=0)
    volume = abs(np.linalg.det(cell))
    bound = [max(1, int(math.ceil(min_length / w - 1e-9))) for w in perpendicular_widths(cell)]
    accepted: dict[bytes, tuple[int, float, np.ndarray]] = {}

    def consider(p_rows) -> None:
        p = np.rint(np.asarray(p_rows, dtype=float)).astype(int)
        det = int(round(np.linalg.det(p)))
        if det == 0:
            return
        if det < 0:
            p, det = -p, -det
        key = p.tobytes()
        if key in accepted or not _keeps_symmetry(p, rotations):
            return
        distance = min_image_distance(p @ cell)
        if distance >= min_length * (1 - 1e-9):
            accepted[key] = (det, distance, p)

    def best():
        return min(accepted.values(), key=lambda c: (c[0], -c[1]), default=None)

    consider(np.eye(3, dtype=int) * max(bound))  # always accepted: widths >= min_length, keeps every rotation
    for n in itertools.product(*(range(1, b + 1) for b in bound)):
        consider(np.diag(n))
    from ase.build import find_optimal_cell_shape

    n_low = max(1, int(math.ceil(min_length**3 / math.sqrt(2) / volume - 1e-9)))
    for n in range(n_low, best()[0]):
        for shape in ("fcc", "sc"):
            with contextlib.redirect_stdout(io.StringIO()):  # ASE prints when no matrix of this size is in range
                try:
                    p = find_optimal_cell_shape(cell, n, shape, lower_limit=-1, upper_limit=1)
                except (TypeError, ValueError, np.linalg.LinAlgError):
                    continue
            consider(p)
        if best()[0] <= n:
            break
    return np.ascontiguousarray(best()[2].T)


# ---------------------------------------------------------------------------------------------------------
# band path (seekpath, transformed into the phonopy primitive cell's reciprocal basis)
# ---------------------------------------------------------------------------------------------------------


def _label(name: str) -> str:
    for greek in ("GAMMA", "SIGMA", "DELTA", "LAMBDA"):
        if greek in name:
            return "$" + name.replace(greek, "\\" + greek.capitalize()) + "$"
    return "$\\mathrm{%s}$" % name


def _plain(name: str) -> str:
    return name.replace("GAMMA", "Γ").replace("SIGMA", "Σ").replace("DELTA", "Δ").replace("LAMBDA", "Λ")


def band_path(primitive, npoints: int = 51) -> dict:
    """High-symmetry path of seekpath (Hinuma et al. 2017) for ``primitive`` (a PhonopyAtoms).

    seekpath gives the special points in the reciprocal basis of *its* standardised (and possibly
    rotated) primitive cell; they are transformed here to the reciprocal basis of ``primitive``, so the
    path is right for any setting or orientation of the input cell (phonopy's own
    ``get_band_qpoints_by_seekpath`` assumes that the two bases coincide). Segments are sampled at
    roughly constant q spacing, the longest with ``npoints`` points.

    Returns ``{"qpoints": [(n_i, 3) arrays], "labels": [...], "connections": [...], "segments": [(start, end)]}``.
    """
    import seekpath

    lattice = np.array(primitive.cell, dtype=float)
    res = seekpath.get_path((lattice, np.array(primitive.scaled_positions), np.array(primitive.numbers)))
    lat_s = np.array(res["primitive_lattice"], dtype=float)  # rows
    rot = np.array(res.get("rotation_matrix", np.eye(3)), dtype=float)
    # columns: A_s = R A_p M  ->  M = A_p^-1 R^T A_s ; q_p = (M^-1)^T q_s
    m = np.linalg.inv(lattice.T) @ rot.T @ lat_s.T
    if np.allclose(m, np.rint(m), atol=1e-3):
        m = np.rint(m)
    transform = np.linalg.inv(m).T
    point_coords = {k: transform @ np.asarray(v, dtype=float) for k, v in res["point_coords"].items()}
    rec = np.linalg.inv(lattice)  # columns: reciprocal vectors (without 2π)
    pairs = list(res["path"])
    lengths = [np.linalg.norm(rec @ (point_coords[b] - point_coords[a])) for a, b in pairs]
    longest = max(lengths) if lengths else 1.0
    qpoints = []
    for (a, b), length in zip(pairs, lengths):
        n = max(2, int(np.rint(length / longest * npoints)))
        qa, qb = point_coords[a], point_coords[b]
        qpoints.append(np.array([qa + (qb - qa) * i / (n - 1) for i in range(n)]))
    labels: list[str] = []
    connections: list[bool] = []
    for i, (a, b) in enumerate(pairs[:-1]):
        if b != pairs[i + 1][0]:
            connections.append(False)
            labels += [_label(a), _label(b)]
        else:
            connections.append(True)
            labels.append(_label(a))
    connections.append(False)
    labels += [_label(pairs[-1][0]), _label(pairs[-1][1])]
    return {
        "qpoints": qpoints,
        "labels": labels,
        "connections": connections,
        "segments": [(_plain(a), _plain(b)) for a, b in pairs],
        "bravais_lattice": res.get("bravais_lattice_extended"),
    }


# ---------------------------------------------------------------------------------------------------------
# imaginary modes
# ---------------------------------------------------------------------------------------------------------


def find_imaginary_modes(
    qpoints,
    frequencies,
    *,
    where: str,
    threshold: float = IMAGINARY_THRESHOLD_THZ,
    gamma_tol: float = GAMMA_ACOUSTIC_TOL_THZ,
    segments: Sequence[str] | None = None,
) -> list[dict]:
    """Modes with frequency < ``threshold`` (THz), except the 3 acoustic modes at Γ with ``|f| < gamma_tol``.

    ``qpoints`` (n, 3) reduced, ``frequencies`` (n, n_bands); ``segments`` optionally names the band-path
    segment of every q-point. Returns dicts ``{"where", "q", "band", "frequency_THz"[, "segment"]}``.
    """
    qpoints = np.asarray(qpoints, dtype=float).reshape(-1, 3)
    freqs = np.asarray(frequencies, dtype=float).reshape(len(qpoints), -1)
    found = []
    for iq, (q, f) in enumerate(zip(qpoints, freqs)):
        skip: set[int] = set()
        if np.allclose(q - np.rint(q), 0.0, atol=1e-8):
            acoustic = np.argsort(np.abs(f))[:3]
            skip = {int(b) for b in acoustic if abs(f[b]) < gamma_tol}
        for band in np.nonzero(f < threshold)[0]:
            if int(band) in skip:
                continue
            entry = {"where": where, "q": [float(x) for x in q], "band": int(band), "frequency_THz": float(f[band])}
            if segments is not None:
                entry["segment"] = segments[iq]
            found.append(entry)
    return found


def _imaginary_report(mesh_modes: list[dict], band_modes: list[dict]) -> dict:
    modes = sorted(mesh_modes + band_modes, key=lambda m: m["frequency_THz"])
    report = {
        "threshold_THz": IMAGINARY_THRESHOLD_THZ,
        "gamma_acoustic_tolerance_THz": GAMMA_ACOUSTIC_TOL_THZ,
        "count": len(modes),
        "count_mesh": len(mesh_modes),
        "count_band": len(band_modes),
        "q_points_mesh": len({tuple(m["q"]) for m in mesh_modes}),
        "q_points_band": len({tuple(m["q"]) for m in band_modes}),
        "most_negative_THz": modes[0]["frequency_THz"] if modes else None,
        "most_negative_at": modes[0] if modes else None,
        "modes": modes[:100],
        "note": "phonopy convention: imaginary frequencies are shown as negative numbers; the list holds the 100 most negative",
    }
    return report


def _describe_mode(mode: dict) -> str:
    q = ", ".join(f"{x:.4f}" for x in mode["q"])
    where = f"band path {mode['segment']}" if mode.get("segment") else mode["where"]
    return f"{mode['frequency_THz']:.4f} THz at q = ({q}) ({where}, band {mode['band']})"


# ---------------------------------------------------------------------------------------------------------
# resumable forces
# ---------------------------------------------------------------------------------------------------------


def _displacement_table(dataset: dict) -> tuple[np.ndarray, np.ndarray]:
    first = dataset["first_atoms"]
    return (np.array([int(d["number"]) for d in first], dtype=int),
            np.array([d["displacement"] for d in first], dtype=float).reshape(-1, 3))


# ---------------------------------------------------------------------------------------------------------
# the workflow
# ---------------------------------------------------------------------------------------------------------


def _check_inputs(atoms, fmax, relax_steps, displacement, tmax, tstep, nac_method, symprec) -> None:
    if not isinstance(atoms, Atoms):
        raise InputError(f"atoms must be an ase.Atoms object, not {type(atoms).__name__}.")
    if len(atoms) == 0:
        raise InputError("The structure has no atoms; pass a crystal structure.")
    if not np.asarray(atoms.pbc).all() or abs(atoms.cell.volume) < 1e-6:
        raise InputError("Phonons need a 3D-periodic crystal (pbc=True and a cell with volume); set the cell of the structure.")
    if not (displacement > 0 and displacement < 0.5):
        raise InputError(f"displacement must be a small positive length in Å (phonopy's default 0.01), not {displacement!r}.")
    if not (fmax > 0):
        raise InputError(f"fmax must be positive (eV/Å), not {fmax!r}.")
    if int(relax_steps) < 0:
        raise InputError(f"relax_steps must be >= 0, not {relax_steps!r}.")
    if not (tmax >= 0 and tstep > 0):
        raise InputError(f"tmax must be >= 0 K and tstep > 0 K, not tmax={tmax!r}, tstep={tstep!r}.")
    if nac_method not in ("gonze", "wang"):
        raise InputError(f"nac_method must be 'gonze' or 'wang', not {nac_method!r}.")
    if not (symprec > 0):
        raise InputError(f"symprec must be a positive tolerance in Å, not {symprec!r}.")


def _describe_axes(setting) -> str:
    return repr(setting) if isinstance(setting, str) else str(np.round(np.asarray(setting, dtype=float), 6).tolist())


def _check_primitive_axes(unit, setting, symprec: float, smat=None) -> None:
    """Primitive axes that cannot work for this crystal raise one clear :class:`InputError` (instead of
    phonopy's "Cell trimming failed"): a cell with a non-integer number of atoms, one smaller than the
    crystal's primitive cell (typically the axes of a centred conventional cell applied to a cell that is
    already primitive), or, with a supercell matrix ``smat``, a supercell that is not made of whole
    primitive cells (``P^-1 S`` not integer)."""
    from phonopy.structure.cells import get_primitive_matrix, guess_primitive_matrix

    if isinstance(setting, str) and setting in ("auto", "P"):
        return
    pmat = np.asarray(get_primitive_matrix(setting, symprec=symprec) if isinstance(setting, str) else setting, dtype=float)
    n_unit = len(unit)
    n_axes = n_unit * float(np.linalg.det(pmat))
    n_min = int(round(n_unit * abs(float(np.linalg.det(guess_primitive_matrix(unit, symprec=symprec))))))
    fix = "use 'auto' (--primitive-axis auto: phonopy finds the primitive cell) or the identity \"1 0 0 0 1 0 0 0 1\""
    where = f"The primitive axes {_describe_axes(setting)} (primitive / --primitive-axis)"
    if n_axes <= 0:
        raise InputError(f"{where} are left-handed or singular (determinant {n_axes / n_unit:g}); {fix}.")
    if n_axes < n_min - 1e-6:
        already = " (the input is already primitive)" if n_unit == n_min else ""
        raise InputError(f"{where} make a cell of {n_axes:.6g} atoms from this {n_unit}-atom unit cell, smaller "
                         f"than the crystal's primitive cell of {n_min} atoms{already}; {fix}.")
    if abs(n_axes - round(n_axes)) > 1e-6:
        raise InputError(f"{where} make a cell of {n_axes:.6g} atoms from this {n_unit}-atom unit cell, not a whole "
                         f"number, so they are not lattice vectors of this crystal; {fix}.")
    if smat is not None:
        m = np.linalg.solve(pmat, np.asarray(smat, dtype=float))
        if not np.allclose(m, np.rint(m), atol=1e-6):
            raise InputError(f"The supercell {np.asarray(smat).tolist()} is not made of whole primitive cells of the "
                             f"primitive axes {_describe_axes(setting)} (P^-1 S = {np.round(m, 4).tolist()} is not "
                             "integer); choose a supercell that is a multiple of the primitive cell, or primitive 'auto'.")


def _build_phonopy(atoms: Atoms, smat, primitive_setting, symprec: float):
    """``Phonopy`` for the unit cell ``atoms``; primitive axes or a supercell that phonopy cannot use for this
    crystal raise :class:`InputError` naming them."""
    from phonopy import Phonopy

    unit = to_phonopy_atoms(atoms)
    _check_primitive_axes(unit, primitive_setting, symprec)
    try:
        with warnings.catch_warnings():
            # phonopy 4 warns that "auto" differs from phonopy 3's identity default; here "auto" is chosen on purpose
            warnings.filterwarnings("ignore", message=".*primitive_matrix defaulted to 'auto'.*")
            return Phonopy(unit, supercell_matrix=smat, primitive_matrix=primitive_setting, symprec=symprec, log_level=0)
    except (RuntimeError, ValueError) as exc:
        if isinstance(primitive_setting, str) and primitive_setting in ("auto", "P"):
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"phonopy cannot build the primitive cell from the primitive axes {_describe_axes(primitive_setting)} "
                         f"and the supercell {np.asarray(smat).tolist()} of this {len(unit)}-atom unit cell ({reason}); "
                         "use primitive 'auto' (--primitive-axis auto) or axes that are lattice vectors of the crystal.") from None


def cell_hessian(atoms: Atoms, calculator, *, displacement: float = 0.01, symprec: float = 1e-5) -> tuple[np.ndarray, int]:
    """The force constants of the periodic cell ``atoms`` itself as a Hessian of its ions: ``(H, n)`` with H
    (3N x 3N, eV/Å², Cartesian, the atoms in their order) the second derivatives of the energy with every
    periodic image of an atom moving with it (the Γ-point force constants of the cell, what its ions feel
    at fixed cell) and n the number of displaced cells evaluated. phonopy with the cell as its own supercell:
    symmetry-reduced displacements of ``displacement`` Å, forces in one batched call with the undisplaced
    cell, whose residual forces (a structure relaxed to a finite fmax) are subtracted, its force constants."""
    from phonopy import Phonopy

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*primitive_matrix.*")
        ph = Phonopy(to_phonopy_atoms(atoms), supercell_matrix=np.eye(3, dtype=int), primitive_matrix=None,
                     symprec=symprec, log_level=0)
    shift = ph.supercell.scaled_positions - atoms.get_scaled_positions(wrap=False)
    if not np.allclose(shift, np.round(shift), atol=1e-8):  # phonopy keeps the order of a 1x1x1 supercell
        raise RuntimeError("phonopy reordered the atoms of the cell")
    ph.generate_displacements(distance=displacement)
    cells = [to_ase_atoms(c) for c in ph.supercells_with_displacements]
    forces = np.array([r["forces"] for r in evaluate_batch(calculator, [to_ase_atoms(ph.supercell), *cells],
                                                           ("energy", "forces"))], dtype=float)
    ph.forces = forces[1:] - forces[0]
    ph.produce_force_constants()
    n = len(atoms)
    return np.asarray(ph.force_constants, dtype=float).transpose(0, 2, 1, 3).reshape(3 * n, 3 * n), len(cells)


def _check_nac_source(born_file, predictor, calculator, primitive_atoms: Atoms, symprec: float) -> None:
    """NAC needs Z* and eps_inf: a BORN file that is missing or does not fit the primitive cell, a predictor
    without ``predict_dielectric``, or no source at all raise :class:`InputError` now. Only the cheap cases are
    resolved (reading the file, or failing); a model's own prediction is made later, for the relaxed cell."""
    from workflows import nac as nac_module

    if (born_file is not None
            or (predictor is not None and not callable(getattr(predictor, "predict_dielectric", None)))
            or (predictor is None and nac_module.find_predictor(calculator) is None)):
        nac_module.resolve_born(born_file=born_file, predictor=predictor, calculator=calculator,
                                primitive_atoms=primitive_atoms, symprec=symprec)


def run_phonon(
    atoms: Atoms,
    calculator,
    *,
    relax: bool = True,
    fmax: float = 0.01,
    pressure: float = 0.0,
    relax_steps: int = 500,
    relax_optimizer: str = "BFGS",
    relax_mode: str = "full",
    primitive: Any = "auto",
    supercell: Any = None,
    min_length: float | None = None,
    displacement: float = 0.01,
    mesh: Any = (20, 20, 20),
    pdos: bool = False,
    group_velocities: bool = False,
    tmax: float = 1000.0,
    tstep: float = 10.0,
    nac: bool = False,
    born_file: str | os.PathLike | None = None,
    predictor: Any = None,
    nac_method: str = "gonze",
    nac_range: Any = None,
    symprec: float = 1e-5,
    output_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> PhononResult:
    """Harmonic phonons of ``atoms`` with forces from ``calculator`` (any ASE calculator).

    Parameters
    ----------
    atoms:
        The crystal (unit cell); left untouched.
    calculator:
        Any ASE calculator; MatterSim calculators (with ``calculate_batch``) are evaluated in batches.
    relax, fmax, pressure, relax_steps, relax_optimizer:
        Relax positions and cell first (``mattersim.relax.relax``, mode ``full``, keeping the space group
        found with ``symprec``) to ``fmax`` eV/Å at ``pressure`` GPa, at most ``relax_steps`` steps of
        ``relax_optimizer`` (``"BFGS"``: near a minimum, as phonon inputs are, it needs a quarter to a half
        of FIRE's steps; ``"FIRE"`` is the more forgiving choice far from one). ``relax=False`` uses the
        structure as given. ``relax_mode="fixed_cell"`` relaxes the positions only, at the given cell (phonons at
        a volume of one's choosing, e.g. a DFT or experimental one).
    primitive:
        ``"auto"`` (phonopy finds the primitive cell), a centring letter (``"F"``, ...), a 3x3 matrix
        or 9 numbers (phonopy's PRIMITIVE_AXES, relative to the unit cell), or None (the unit cell).
        Axes that make a cell smaller than the crystal's primitive cell, or a non-integer number of
        atoms, raise :class:`InputError` before any work.
    supercell, min_length:
        The supercell matrix (3 integers, or 3x3 in phonopy's ``DIM`` convention: the supercell's lattice
        vectors as columns in units of the unit cell's). When None, :func:`auto_supercell`: the supercell
        with the fewest atoms, keeping the crystal's point group, whose minimum image distance (shortest
        lattice vector) is >= ``min_length`` Å; ``min_length=None`` means ``max(10 Å, 2 x cutoff)`` with
        the model's cutoff from :func:`model_cutoff`. A supercell whose minimum image distance is below
        twice the cutoff is logged as a warning.
    displacement:
        Finite displacement in Å (phonopy default 0.01).
    mesh:
        q-point mesh (3 integers, Γ-centred) for DOS, projected DOS, thermal properties and group
        velocities, or one number: phonopy's length-based mesh density in Å.
    pdos:
        Also compute the projected DOS (``projected_dos.dat``, one column per primitive-cell atom; needs
        the eigenvectors on the full mesh, the slowest part of the post-processing, so only when asked).
    group_velocities:
        Also compute the group velocities on the mesh (``summary.json`` ``group_velocity``: mean |v| over all
        and over the acoustic branches, m/s); only when asked, since they cost more than the mesh itself.
    tmax, tstep:
        Thermal properties from 0 to ``tmax`` K in steps of ``tstep`` K.
    nac, born_file, predictor, nac_method:
        Non-analytical term correction (polar crystals): Born charges and ε∞ from a phonopy BORN file,
        a predictor, or the calculator (:func:`workflows.nac.resolve_born`); ``"gonze"`` or ``"wang"``.
        Giving ``born_file`` or ``predictor`` switches NAC on.
    nac_range:
        Where the model's force constants contain the dipole-dipole interaction (:mod:`workflows.dipole`).
        ``None`` (default): phonopy's plain NAC, right for force constants that contain the whole
        interaction (DFT, replayed forces). ``"auto"``: a cosine window from the model's cutoff - 2 Å to
        cutoff + 0.5 Å (plain NAC, with a log line, for a calculator that exposes no cutoff); a number R (a
        step at R Å) or ``(r_on, r_off)`` sets it. With a window the missing dipole-dipole tail is added to
        the force constants (the model's own frequencies at Γ are kept), so that the bands of a model
        whose force constants end within the window converge with the supercell size; see
        docs/phonon-nac.md for where this helps and where a model's own range is longer.
    symprec:
        Symmetry tolerance in Å (phonopy/spglib).
    output_dir:
        Where to write the outputs and the resumable ``forces.npz``; None writes nothing.
    batch_size:
        Supercells per force-evaluation chunk; default: as many as fit in 1024 atoms for batched
        MatterSim calculators, 1 for other calculators. Also the checkpoint interval.
    progress:
        Show a rich progress bar on stderr over the force evaluations.
    """
    import phonopy

    _check_inputs(atoms, fmax, relax_steps, displacement, tmax, tstep, nac_method, symprec)
    from mattersim.relax import _optimizer_class

    _optimizer_class(relax_optimizer)  # an unknown name fails here, before any work
    from mattersim.relax import normalise_mode

    relax_mode = normalise_mode(relax_mode)
    if getattr(calculator, "property_only", False):
        from mattersim.composite import no_energy_message

        raise InputError(no_energy_message(str(model_info(calculator).get("name")), "forces"))
    if born_file is not None or predictor is not None:
        nac = True
    from mattersim.registry import check_trained_elements  # elements the model was not trained on: before any work

    check_trained_elements(calculator, [atoms], properties=nac and born_file is None and predictor is None)
    mesh_setting = parse_mesh(mesh, "mesh")
    primitive_setting = parse_primitive(primitive, "primitive")
    supercell_setting = parse_supercell(supercell, "supercell")
    if min_length is not None and not (isinstance(min_length, (int, float, np.integer, np.floating))
                                       and min_length > 0 and math.isfinite(min_length)):
        raise InputError(f"min_length must be a positive length in Å (or None: automatic), not {min_length!r}.")
    if batch_size is not None and int(batch_size) < 1:
        raise InputError(f"batch_size must be a positive integer, not {batch_size!r}.")
    if born_file is not None and not Path(born_file).is_file():
        raise InputError(f"BORN file '{born_file}' does not exist; pass the path of a phonopy BORN file.")
    from workflows.dipole import parse_nac_range, window_for_model

    range_setting = parse_nac_range(nac_range)

    out = RunFolder.check(output_dir)  # a file in the way, or a folder that cannot be written: before any work
    cutoff, cutoff_source = model_cutoff(calculator)
    auto_length = float(min_length) if min_length is not None else max(DEFAULT_MIN_LENGTH_A, 2.0 * cutoff)
    # the cells of the input structure, before the relaxation and before anything is written: primitive axes
    # that do not fit this crystal, a supercell phonopy cannot use, or (with NAC) no or an unreadable source
    # of Born charges stop here (the relaxation keeps the space group, so the checks hold for the relaxed cell)
    _check_primitive_axes(to_phonopy_atoms(atoms), primitive_setting, symprec, supercell_setting)
    ph_input = _build_phonopy(atoms, np.eye(3, dtype=int), primitive_setting, symprec)
    if nac:
        _check_nac_source(born_file, predictor, calculator, to_ase_atoms(ph_input.primitive), symprec)
    folder = RunFolder(out, "phonon", logger).open()
    log = folder.log
    t_start = time.perf_counter()
    timings = {"relaxation": 0.0, "force_evaluation": 0.0, "post_processing": 0.0}
    info = model_info(calculator)
    try:
        input_atoms = atoms.copy()
        input_atoms.calc = None
        settings = {
            "relax": bool(relax), "fmax_eV_per_A": float(fmax), "pressure_GPa": float(pressure),
            "relax_steps": int(relax_steps), "relax_mode": relax_mode, "relax_symmetry": True,
            "relax_optimizer": str(relax_optimizer),
            "primitive": primitive_setting if isinstance(primitive_setting, (str, type(None))) else primitive_setting.tolist(),
            "supercell": None if supercell_setting is None else supercell_setting.tolist(),
            "min_length_A": auto_length if supercell_setting is None else None,
            "displacement_A": float(displacement), "symprec": float(symprec),
        }
        key = run_key(structure_record(input_atoms), settings, info, fmt=_FORCES_FORMAT)
        store = ArrayStore(out / _FORCES_FILE if out is not None else None, key)
        resumed = store.load(log)
        log.info(f"run_phonon: {input_atoms.get_chemical_formula()} ({len(input_atoms)} atoms), model "
                 f"{info.get('name')} (sha256 {info.get('sha256')}), output {out}")
        if resumed:
            log.info(f"resuming from {store.path}: {int(store.data['done'].sum()) if 'done' in store.data else 0} supercells already evaluated")

        # 1. relaxation -------------------------------------------------------------------------------
        relax_summary = None
        if relax and resumed and "relaxed_positions" in store.data:
            unit = Atoms(numbers=store.data["relaxed_numbers"], cell=store.data["relaxed_cell"],
                         positions=store.data["relaxed_positions"], pbc=True)
            if input_atoms.has("masses"):
                unit.set_masses(input_atoms.get_masses())
            relax_summary = json.loads(str(store.data["relax_summary"]))
            relax_summary["reused_from"] = _FORCES_FILE
            log.info("relaxation: reusing the relaxed structure stored in forces.npz")
        elif relax:
            from mattersim.relax import relax as relax_structure

            t0 = time.perf_counter()
            what = {"full": f"positions and cell, P = {pressure} GPa", "fixed_cell": "positions only, cell as given",
                    "fixed_volume": "positions and cell shape at the given volume"}[relax_mode]
            log.info(f"relaxation: {what}, fmax = {fmax} eV/Å, at most {relax_steps} steps")
            res = relax_structure(input_atoms, calculator, pressure=pressure, fmax=fmax, steps=relax_steps,
                                  mode=relax_mode, symmetry=True, symprec=symprec, optimizer=relax_optimizer)
            timings["relaxation"] = time.perf_counter() - t0
            unit = res.atoms.copy()
            unit.calc = None
            relax_summary = res.to_dict()
            relax_summary.pop("label", None)
            msg = (f"relaxation: {'converged' if res.converged else 'NOT converged'} after {res.steps} steps, "
                   f"E = {res.energy:.6f} eV, V {res.initial_volume:.3f} -> {res.volume:.3f} Å^3, fmax {res.fmax:.4g} eV/Å")
            (log.info if res.converged else log.warning)(msg)
            if not res.converged:
                log.warning(f"the relaxation did not reach fmax = {fmax} eV/Å within {relax_steps} steps; "
                            "phonons of a structure that is not at equilibrium can show spurious imaginary modes.")
            store.data.update({
                "relaxed_numbers": unit.numbers, "relaxed_cell": np.array(unit.cell[:]),
                "relaxed_positions": unit.positions, "relax_summary": np.array(json.dumps(to_builtin(relax_summary))),
            })
            store.save()
        else:
            unit = input_atoms
            log.info("relaxation: skipped (relax=False); the structure is used as given")

        # 2. phonopy setup ----------------------------------------------------------------------------
        if supercell_setting is not None:
            smat = supercell_setting
            choice = "given"
        else:
            from phonopy.structure.symmetry import Symmetry

            rotations = Symmetry(to_phonopy_atoms(unit), symprec=symprec).symmetry_operations["rotations"]
            smat = auto_supercell(unit.cell[:], auto_length, rotations)
            choice = (f"automatic: the fewest atoms with a minimum image distance >= {auto_length:g} Å"
                      + (" (min_length)" if min_length is not None else
                         f" (max({DEFAULT_MIN_LENGTH_A:g} Å, 2 x cutoff {cutoff:g} Å))") + " keeping the point group")
        ph = _build_phonopy(unit, smat, primitive_setting, symprec)
        ph.generate_displacements(distance=displacement)
        primitive_atoms = to_ase_atoms(ph.primitive)
        sc_widths = perpendicular_widths(ph.supercell.cell)
        sc_distance = min_image_distance(ph.supercell.cell)
        n_sc = len(ph.supercell)
        spacegroup = ph.symmetry.get_international_table()
        log.info(f"phonopy: space group {spacegroup}, primitive cell {len(ph.primitive)} atoms, supercell matrix "
                 f"{np.asarray(smat).tolist()} ({choice}; {n_sc} atoms, minimum image distance {sc_distance:.2f} Å, "
                 f"perpendicular widths {np.round(sc_widths, 2).tolist()} Å), "
                 f"{len(ph.supercells_with_displacements)} displaced supercells of {displacement} Å")
        if sc_distance < 2 * cutoff:
            what = ("an atom interacts with its own periodic image" if sc_distance < cutoff else
                    "a displaced atom and its periodic image can both be within the cutoff of one atom, so their "
                    "force constants are summed into one")
            log.warning(f"the supercell's minimum image distance {sc_distance:.2f} Å is below twice the model's "
                        f"cutoff (2 x {cutoff:g} Å, {cutoff_source}): {what}; use a larger supercell or leave "
                        "it out (automatic).")
        if n_sc > 2000:
            log.warning(f"the supercell has {n_sc} atoms; pass a smaller supercell or min_length if this is too slow.")

        if out is not None:  # the structure the phonons belong to (relaxed, if relax=True), phonopy's file name
            import ase.io

            ase.io.write(out / "POSCAR-unitcell", unit, format="vasp", direct=True, sort=False)

        # NAC parameters first: a missing source of Born charges should fail before the expensive part
        nac_summary: dict[str, Any] = {"enabled": bool(nac)}
        born_charges = None
        members_sym: list = []
        if nac:
            from workflows import nac as nac_module

            born = nac_module.resolve_born(born_file=born_file, predictor=predictor, calculator=calculator,
                                           primitive_atoms=primitive_atoms, symprec=symprec)
            born_sym, sym_report = nac_module.symmetrize(born, primitive_atoms, symprec)
            born_charges = born_sym
            params = dict(born_sym.to_phonopy_nac_params(method=nac_method))
            ph.nac_params = params
            nac_summary.update({"method": nac_method, "source": born_sym.source, "symmetrization": sym_report,
                                "symbols": list(primitive_atoms.get_chemical_symbols()),
                                "born": np.asarray(born_sym.born).tolist(), "epsilon": np.asarray(born_sym.epsilon).tolist()})
            log.info(f"NAC: {nac_method} method, Born charges and dielectric tensor from {born_sym.source}")
            if born.uncertainty:
                members_sym = nac_module.symmetrize_members(born, primitive_atoms, symprec)
                nac_summary["uncertainty"] = nac_module.uncertainty_report(born, members_sym)
                unc = nac_summary["uncertainty"]
                log.info(f"NAC uncertainty: max std of Z* {unc.get('born_std_max')} e, of eps_inf "
                         f"{unc.get('epsilon_std_max')} ({len(members_sym) or 'no'} ensemble members)")

        # 3. forces -----------------------------------------------------------------------------------
        supercells = [to_ase_atoms(ph.supercell)] + [to_ase_atoms(s) for s in ph.supercells_with_displacements]
        disp_atoms, disp_vectors = _displacement_table(ph.dataset)
        n_struct = len(supercells)
        if resumed and "done" in store.data:
            same = (store.data["forces"].shape == (n_struct, n_sc, 3)
                    and np.array_equal(store.data["disp_atoms"], disp_atoms)
                    and np.allclose(store.data["disp_vectors"], disp_vectors, atol=1e-10))
            if not same:
                log.warning("the displacements in forces.npz differ from the ones phonopy generates now (another "
                            "phonopy version?); evaluating all supercells again.")
                for k in ("forces", "energies", "done"):
                    store.data.pop(k, None)
        if "done" not in store.data:
            store.data.update({"forces": np.zeros((n_struct, n_sc, 3)), "energies": np.zeros(n_struct),
                               "done": np.zeros(n_struct, dtype=bool), "disp_atoms": disp_atoms,
                               "disp_vectors": disp_vectors})
        done = store.data["done"]
        todo = [i for i in range(n_struct) if not done[i]]
        n_evaluated = len(todo)
        batched = hasattr(calculator, "calculate_batch")
        chunk = int(batch_size) if batch_size is not None else (max(1, 1024 // n_sc) if batched else 1)
        log.info(f"forces: {n_struct} supercells (perfect + {n_struct - 1} displaced), {n_struct - len(todo)} reused "
                 f"from forces.npz, {len(todo)} to evaluate in chunks of {chunk}"
                 f"{' (batched model calls)' if batched else ''}")
        t0 = time.perf_counter()
        if todo and todo[0] == 0:
            # the perfect supercell's forces are the unit cell's, repeated (exact for a periodic model): one
            # call on the few atoms of the unit cell instead of one on the whole supercell
            cell_atoms = to_ase_atoms(ph.unitcell)
            r = evaluate_batch(calculator, [cell_atoms], ("energy", "forces"))[0]
            f = np.asarray(r["forces"], dtype=float).reshape(len(cell_atoms), 3)
            if not np.all(np.isfinite(f)):
                raise InputError("The calculator returned non-finite forces for the unit cell; check the structure and the model.")
            sc = ph.supercell
            store.data["forces"][0] = f[[sc.u2u_map[k] for k in sc.s2u_map]]
            store.data["energies"][0] = float(r["energy"]) * n_sc / len(cell_atoms)
            done[0] = True
            todo = todo[1:]
        with progress_bar(progress, len(todo), f"forces ({n_sc}-atom supercells)") as bar:
            for start in range(0, len(todo), chunk):
                idx = todo[start:start + chunk]
                results = evaluate_batch(calculator, [supercells[i] for i in idx], ("energy", "forces"))
                if len(results) != len(idx):
                    raise RuntimeError(f"evaluate_batch returned {len(results)} results for {len(idx)} structures")
                for i, r in zip(idx, results):
                    f = np.asarray(r["forces"], dtype=float).reshape(n_sc, 3)
                    if not np.all(np.isfinite(f)):
                        raise InputError(f"The calculator returned non-finite forces for supercell {i}; check the structure and the model.")
                    store.data["forces"][i] = f
                    store.data["energies"][i] = float(r["energy"])
                    done[i] = True
                store.save()
                bar.advance(len(idx))
        timings["force_evaluation"] = time.perf_counter() - t0
        forces = store.data["forces"]
        residual = float(np.linalg.norm(forces[0], axis=1).max())
        drift = float(np.abs(forces[1:].sum(axis=1)).max()) if n_struct > 1 else 0.0
        log.info(f"forces: largest residual force in the perfect supercell {residual:.3e} eV/Å; largest force "
                 f"drift (|sum of forces|) in a displaced supercell {drift:.3e} eV/Å; neither is subtracted")
        if residual > max(10 * fmax, 0.05):
            log.warning(f"the perfect supercell has residual forces up to {residual:.3g} eV/Å: the structure is not at "
                        "equilibrium for this model (relax it, or use relax=True); phonons may be unreliable.")

        # 4. force constants --------------------------------------------------------------------------
        t0 = time.perf_counter()
        ph.forces = forces[1:]
        ph.produce_force_constants(calculate_full_force_constants=False, show_drift=False)
        ph.symmetrize_force_constants(show_drift=False)
        window = None
        if nac:
            if range_setting == "auto":  # the model's cutoff, if it exposes one
                window = None if cutoff_source == _ASSUMED_CUTOFF else window_for_model(cutoff, cutoff_source)
            else:
                window = range_setting
            if window is not None:
                from workflows.dipole import complete_dipole_tail

                nac_summary["dipole_tail"] = complete_dipole_tail(ph, window)
                log.info(f"NAC: the model's force constants hold the dipole-dipole interaction within "
                         f"{window.r_on:g}-{window.r_off:g} Å ({window.source}); the missing tail was added, "
                         "keeping the frequencies at Γ (workflows.dipole)")
            else:
                why = ("nac_range=None: the force constants are taken to contain the whole dipole-dipole "
                       "interaction, as DFT's do" if range_setting is None else
                       "nac_range='auto' but the calculator exposes no cutoff; pass nac_range=(r_on, r_off)")
                nac_summary["dipole_tail"] = {"scheme": "none: phonopy's NAC on the force constants as computed",
                                              "reason": why}
                log.info(f"NAC: phonopy's plain {nac_method} NAC ({why})")

        # 5./6. post-processing -----------------------------------------------------------------------
        title = (f"{primitive_atoms.get_chemical_formula(mode='hill', empirical=True)} ({spacegroup}), "
                 f"{info.get('name') or 'model'}" + (", NAC" if nac_summary.get("enabled") else ""))
        summary = _post_process(ph, out, log, mesh_setting=mesh_setting, tmax=tmax, tstep=tstep, nac_summary=nac_summary,
                                primitive_atoms=primitive_atoms, born_charges=born_charges, member_charges=members_sym,
                                title=title, pdos=pdos, group_velocities=group_velocities)
        timings["post_processing"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start

        summary = {
            **summary_header("phonon", WORKFLOW_VERSION, info, {**settings, "mesh": mesh_setting, "mesh_gamma_centered": True,
                         "thermal_exclude_gamma_acoustic": True, "tmax_K": float(tmax),
                         "tstep_K": float(tstep), "pdos": bool(pdos), "group_velocities": bool(group_velocities), "nac": bool(nac), "nac_method": nac_method if nac else None,
                         "nac_range": None if window is None else window.to_dict(),
                         "born_file": None if born_file is None else str(born_file), "batch_size": chunk,
                         "force_constants": "phonopy finite displacements, compact, symmetrize_force_constants(level=1)"
                                            + ("; dipole-dipole tail beyond the window added (nac.dipole_tail)" if window else "")},
                             UNITS),
            "phonopy_version": phonopy.__version__,
            "structure": {
                "formula": unit.get_chemical_formula(mode="hill", empirical=False),
                "spacegroup": spacegroup,
                "n_atoms_unitcell": len(unit),
                "n_atoms_primitive": len(ph.primitive),
                "n_atoms_supercell": n_sc,
                "supercell_matrix": np.asarray(ph.supercell_matrix).tolist(),
                "primitive_matrix": None if ph.primitive_matrix is None else np.asarray(ph.primitive_matrix).tolist(),
                "supercell_perpendicular_widths_A": sc_widths.tolist(),
                "supercell_min_image_distance_A": sc_distance,
                "supercell_choice": choice,
                "model_cutoff_A": cutoff,
                "model_cutoff_source": cutoff_source,
                "unitcell": structure_record(unit),
            },
            "relaxation": relax_summary,
            "forces": {
                "n_supercells": n_struct - 1,
                "evaluated_now": n_evaluated,
                "reused": n_struct - n_evaluated,
                "perfect_supercell": "forces of the unit cell, repeated (exact for a periodic model)",
                "residual_force_max_eV_per_A": residual,
                "drift_max_eV_per_A": drift,
                "correction": "none: forces are used as computed (no residual-force or drift subtraction); phonopy's "
                              "translational symmetrisation of the force constants enforces the acoustic sum rule",
            },
            **summary,
            "timings_s": timings,
        }
        result = PhononResult(phonopy=ph, summary=summary, output_dir=out)
        if out is not None:
            written = {p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
            summary["files"] = sorted(written | {"phonopy.yaml", "summary.json"})
            _save_phonopy_yaml(ph, out / "phonopy.yaml")
            atomic_write_json(out / "summary.json", summary)
            log.info(f"done in {timings['total']:.1f} s (relaxation {timings['relaxation']:.1f} s, forces "
                     f"{timings['force_evaluation']:.1f} s, post-processing {timings['post_processing']:.1f} s)")
        return result
    finally:
        folder.close()


def phonon_properties(ph, mesh_setting=(20, 20, 20)) -> dict:
    """Frequencies, imaginary modes, group velocities and thermal properties at 300 K of a ``Phonopy`` object.

    The pure computation behind ``summary.json`` (no files, no plots, no logging), shared by
    :func:`run_phonon` and the benchmarks so that every phonon number goes through identical
    post-processing. ``ph`` has force constants (and ``nac_params`` when NAC is wanted); ``mesh_setting``
    is 3 integers (a Γ-centred mesh) or one number, phonopy's length-based mesh density in Å.

    Steps: frequencies at Γ (q = 0 without a direction: TO modes with NAC); the band structure along the
    seekpath path (:func:`band_path`, 51 points on the longest segment); the symmetry-reduced Γ-centred
    mesh with group velocities; harmonic thermal properties at 300 K with
    ``exclude_gamma_acoustic=True``; :func:`find_imaginary_modes` on mesh and band path.

    Returns the ``summary.json`` sections ``{"frequencies": {"omega_max_THz" (max over mesh and band
    path), "gamma_THz", "lowest_THz", "lowest_at"}, "imaginary_modes", "mesh", "group_velocity":
    {"mean_m_per_s", "acoustic_mean_m_per_s", "note"}, "thermal_300K": {"free_energy_kJ_per_mol",
    "entropy_J_per_K_per_mol", "heat_capacity_J_per_K_per_mol", ...}, "band_path"}`` (units in
    :data:`UNITS`; thermal properties per mole of primitive cells). Afterwards ``ph.mesh`` is that mesh,
    ``ph.band_structure`` the band path and ``ph.thermal_properties`` holds 300 K only.
    """
    return _phonon_properties(ph, parse_mesh(mesh_setting, "mesh"))[0]


def _phonon_properties(ph, mesh_setting, group_velocities: bool = True) -> tuple[dict, dict]:
    """:func:`phonon_properties` and the band path it used (for the plots); ``group_velocities=False``
    leaves them out (the ``group_velocity`` section then says so)."""
    # Γ and band structure
    ph.run_qpoints([[0.0, 0.0, 0.0]])
    gamma = np.asarray(ph.qpoints.frequencies[0], dtype=float)
    path = band_path(ph.primitive)
    ph.run_band_structure(path["qpoints"], path_connections=path["connections"], labels=path["labels"],
                          with_group_velocities=False)
    bs = ph.band_structure
    band_q = np.concatenate([np.asarray(q) for q in bs.qpoints])
    band_f = np.concatenate([np.asarray(f) for f in bs.frequencies])
    seg_names = []
    for (a, b), q in zip(path["segments"], bs.qpoints):
        seg_names += [f"{a}-{b}"] * len(q)

    # symmetry-reduced mesh, with group velocities when asked
    ph.run_mesh(mesh_setting, with_group_velocities=group_velocities, is_gamma_center=True)
    mesh = ph.mesh
    mesh_q = np.asarray(mesh.qpoints, dtype=float)
    mesh_f = np.asarray(mesh.frequencies, dtype=float)
    weights = np.asarray(mesh.weights, dtype=float)
    if group_velocities:
        gv = np.asarray(mesh.group_velocities, dtype=float)  # THz Å
        speed = np.linalg.norm(gv, axis=2) * THZ_ANGSTROM_TO_M_PER_S
        ok = np.isfinite(speed)
        w = np.repeat(weights[:, None], speed.shape[1], axis=1)
        sa, wa = speed[:, :3], w[:, :3]
        oka = np.isfinite(sa)
        gv_section = {"mean_m_per_s": float((speed * w)[ok].sum() / w[ok].sum()),
                      "acoustic_mean_m_per_s": float((sa * wa)[oka].sum() / wa[oka].sum()),
                      "max_m_per_s": float(speed[ok].max()),
                      "note": "|v| averaged over the mesh (q-point weights) and over all branches / the 3 lowest "
                              "branches; max_m_per_s: the largest |v| on the mesh"}
    else:
        gv_section = {"mean_m_per_s": None, "acoustic_mean_m_per_s": None, "max_m_per_s": None,
                      "note": "not computed (group_velocities=False; mattersim phonon --group-velocities)"}

    # the Γ-centred mesh contains the three acoustic modes at Γ (ν ≈ 0, whose ln ν term is an artefact)
    ph.run_thermal_properties(temperatures=[300.0, 900.0], exclude_gamma_acoustic=True)
    tp = ph.thermal_properties
    tp300_values = {k: float(np.ravel(getattr(tp, k))[0]) for k in ("free_energy", "entropy", "heat_capacity")}
    f900 = float(np.ravel(tp.free_energy)[1])
    from scipy import constants

    kj_per_mol_to_mev = 1e3 / (constants.e * constants.N_A / 1e3)  # kJ/mol (of primitive cells) -> meV
    delta_f = (f900 - tp300_values["free_energy"]) * kj_per_mol_to_mev / len(ph.primitive)

    # frequencies and imaginary modes
    omega_max = float(max(mesh_f.max(), band_f.max()))
    mesh_modes = find_imaginary_modes(mesh_q, mesh_f, where="mesh")
    band_modes = find_imaginary_modes(band_q, band_f, where="band", segments=seg_names)
    imaginary = _imaginary_report(mesh_modes, band_modes)
    lowest = _lowest_mode(mesh_q, mesh_f, band_q, band_f, seg_names)
    primitive_atoms = to_ase_atoms(ph.primitive)

    properties = {
        "frequencies": {
            "omega_max_THz": omega_max,
            "gamma_THz": gamma.tolist(),
            "lowest_THz": lowest["frequency_THz"],
            "lowest_at": lowest,
        },
        "imaginary_modes": imaginary,
        "mesh": {"numbers": np.asarray(mesh.mesh_numbers).tolist(), "gamma_centered": True,
                 "n_irreducible_q": len(mesh_q)},
        "group_velocity": gv_section,
        "thermal_300K": {
            "temperature_K": 300.0,
            "free_energy_kJ_per_mol": float(tp300_values["free_energy"]),
            "entropy_J_per_K_per_mol": float(tp300_values["entropy"]),
            "heat_capacity_J_per_K_per_mol": float(tp300_values["heat_capacity"]),
            "per": f"mole of primitive cells ({len(ph.primitive)} atoms, {primitive_atoms.get_chemical_formula(mode='hill')})",
        },
        "free_energy_change": {
            "from_K": 300.0, "to_K": 900.0,
            "delta_meV_per_atom": float(delta_f),
            "note": "harmonic F(900 K) - F(300 K) per atom, at this structure's volume",
        },
        "band_path": {"segments": [f"{a}-{b}" for a, b in path["segments"]], "bravais_lattice": path["bravais_lattice"],
                      "n_qpoints": int(len(band_q))},
    }
    return properties, path


def _post_process(ph, out: Path | None, log: RunLog, *, mesh_setting, tmax, tstep, nac_summary, primitive_atoms,
                  born_charges=None, member_charges=None, title: str = "", pdos: bool = False,
                  group_velocities: bool = False) -> dict:
    """Band structure, DOS, PDOS, thermal properties, group velocities, imaginary modes, files, plots
    (``title``: material and model, on every plot)."""
    # projected DOS: needs the full mesh with eigenvectors
    pdos_note = None if pdos else "not computed (pdos=False; mattersim phonon --pdos writes projected_dos.dat)"
    if out is not None and pdos:
        n_prim = len(ph.primitive)
        if isinstance(mesh_setting, list):
            n_q = int(np.prod(mesh_setting))
        else:
            try:
                from phonopy.phonon.grid import length2mesh  # phonopy 4
            except ImportError:  # pragma: no cover - phonopy 2 and 3
                from phonopy.structure.grid_points import length2mesh

            n_q = int(np.prod(length2mesh(mesh_setting, ph.primitive.cell)))
        memory = n_q * (3 * n_prim) ** 2 * 16
        if memory < 2e9:
            ph.run_mesh(mesh_setting, is_mesh_symmetry=False, with_eigenvectors=True, is_gamma_center=True)
            ph.run_projected_dos()
            ph.write_projected_dos(filename=out / "projected_dos.dat")
        else:
            pdos_note = f"skipped: eigenvectors on the full mesh would need {memory / 1e9:.1f} GB; use a smaller mesh"
            log.warning(f"projected DOS {pdos_note}")

    # Γ, band structure, symmetry-reduced mesh with group velocities, thermal properties at 300 K, imaginary modes
    properties, path = _phonon_properties(ph, mesh_setting, group_velocities)
    # DOS and thermal properties over the whole temperature range on the same mesh
    ph.run_total_dos()
    ph.run_thermal_properties(t_min=0, t_max=tmax, t_step=tstep, exclude_gamma_acoustic=True)

    omega_max = properties["frequencies"]["omega_max_THz"]
    gamma = np.asarray(properties["frequencies"]["gamma_THz"], dtype=float)
    imaginary = properties["imaginary_modes"]
    if imaginary["count"]:
        log.warning(f"{imaginary['count']} imaginary modes (below {IMAGINARY_THRESHOLD_THZ} THz) at "
                    f"{imaginary['q_points_mesh']} mesh q-points and {imaginary['q_points_band']} band-path q-points; "
                    f"most negative {_describe_mode(imaginary['most_negative_at'])}: the structure is dynamically "
                    "unstable for this model, or not relaxed, or the supercell is too small")
    else:
        log.info(f"no imaginary modes below {IMAGINARY_THRESHOLD_THZ} THz on the mesh or the band path")
    log.info(f"ω_max = {omega_max:.4f} THz; frequencies at Γ: {np.round(gamma, 4).tolist()} THz")

    if nac_summary.get("enabled"):
        from workflows import nac as nac_module

        lo_to = nac_module.gamma_lo_to(ph)
        if member_charges and len(member_charges) >= 2:
            # the same LO/TO evaluation with every ensemble member's (symmetrised) Z* and eps_inf
            spread = nac_module.lo_to_spread(ph, member_charges, lo_to)
            for entry, s in zip(lo_to["directions"], spread["directions"]):
                entry["lo_frequencies_std"] = s["lo_frequencies_std"]
                entry["to_frequencies_std"] = s["to_frequencies_std"]
            nac_summary.setdefault("uncertainty", {})["gamma_lo_to"] = to_builtin(spread)
            log.info("LO/TO uncertainty at Γ (std over members, THz): " + "; ".join(
                f"{s['direction']}: LO ±{np.round(s['lo_frequencies_std'], 4).tolist()}" for s in spread["directions"]))
        nac_summary["gamma_lo_to"] = to_builtin(lo_to)
        log.info(f"LO/TO at Γ: {json.dumps(to_builtin(lo_to))}")

    freqs = properties["frequencies"]
    frequencies = {
        "omega_max_THz": freqs["omega_max_THz"],
        "gamma_THz": freqs["gamma_THz"],
        "gamma_note": "at q = 0 exactly (without the NAC term, i.e. TO frequencies for polar crystals)" if nac_summary.get("enabled") else "at q = 0",
        "lowest_THz": freqs["lowest_THz"],
        "lowest_at": freqs["lowest_at"],
    }
    summary = {**properties, "frequencies": frequencies, "nac": nac_summary}
    if pdos_note:
        summary["projected_dos"] = pdos_note

    if out is not None:
        ph.write_yaml_band_structure(filename=out / "band.yaml")
        ph.write_total_dos(filename=out / "total_dos.dat")
        ph.write_yaml_thermal_properties(filename=out / "thermal_properties.yaml")
        if born_charges is not None:
            from workflows import nac as nac_module

            nac_module.write_born(out / "BORN", born_charges, primitive_atoms, symprec=ph.symmetry.tolerance)
            nac_summary["born_file_written"] = "BORN"

        _plot_band_dos(ph, path, out / "band_dos.png", title)
        _plot_thermal(ph, out / "thermal.png", title)
    return summary


def _lowest_mode(mesh_q, mesh_f, band_q, band_f, seg_names) -> dict:
    """Lowest frequency on mesh and band path, ignoring the 3 acoustic modes exactly at Γ."""
    best = None
    for where, qs, fs, names in (("mesh", mesh_q, mesh_f, None), ("band", band_q, band_f, seg_names)):
        for iq, (q, f) in enumerate(zip(qs, fs)):
            f = np.array(f, dtype=float)
            if np.allclose(q - np.rint(q), 0.0, atol=1e-8):
                f[np.argsort(np.abs(f))[:3]] = np.inf
            b = int(np.argmin(f))
            if np.isfinite(f[b]) and (best is None or f[b] < best["frequency_THz"]):
                best = {"where": where, "q": [float(x) for x in q], "band": b, "frequency_THz": float(f[b])}
                if names is not None:
                    best["segment"] = names[iq]
    return best or {"frequency_THz": None}


# ---------------------------------------------------------------------------------------------------------
# plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend change)
# ---------------------------------------------------------------------------------------------------------


def _plot_band_dos(ph, path: dict, filename: Path, title: str = "") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5))
    FigureCanvasAgg(fig)
    ax_b, ax_d = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.1, top=0.86 if title else 0.92, wspace=0.05)  # fixed: cheap
    bs = ph.band_structure
    for d, f in zip(bs.distances, bs.frequencies):
        ax_b.plot(d, f, color="tab:blue", lw=1.0)
    ticks, tick_labels = [], []
    labels = iter(path["labels"])
    ticks.append(bs.distances[0][0])
    tick_labels.append(next(labels))
    n_seg = len(bs.distances)
    for i, d in enumerate(bs.distances):
        ticks.append(d[-1])
        if i < n_seg - 1 and not path["connections"][i]:
            tick_labels.append(next(labels) + "|" + next(labels))
        else:
            tick_labels.append(next(labels))
    ax_b.set_xticks(ticks)
    ax_b.set_xticklabels(tick_labels)
    for x in ticks:
        ax_b.axvline(x, color="0.7", lw=0.6)
    ax_b.axhline(0.0, color="0.4", lw=0.6, ls="--")
    ax_b.set_xlim(ticks[0], ticks[-1])
    f_all = np.concatenate([np.ravel(f) for f in bs.frequencies])
    span = max(float(f_all.max()) - min(float(f_all.min()), 0.0), 1e-3)
    ax_b.set_ylim(min(float(f_all.min()), 0.0) - 0.03 * span, float(f_all.max()) + 0.05 * span)
    ax_b.set_ylabel("Frequency (THz)")
    ax_b.set_title("Phonon band structure")
    dos = ph.total_dos
    ax_d.plot(dos.dos, dos.frequency_points, color="k", lw=1.0)
    ax_d.fill_betweenx(dos.frequency_points, 0, dos.dos, color="0.85")
    ax_d.axhline(0.0, color="0.4", lw=0.6, ls="--")
    ax_d.set_xlabel("DOS (states/THz)")
    ax_d.set_xlim(left=0)
    if title:
        fig.suptitle(title)
    save_png(fig, filename, f"Phonon band structure and DOS: {title}")




def _plot_thermal(ph, filename: Path, title: str = "") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tp = {k: np.asarray(getattr(ph.thermal_properties, k)) for k in ("temperatures", "free_energy", "entropy", "heat_capacity")}
    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.84 if title else 0.9)
    ax.plot(tp["temperatures"], tp["free_energy"], label="F (kJ/mol)")
    ax.plot(tp["temperatures"], tp["entropy"], label="S (J/K/mol)")
    ax.plot(tp["temperatures"], tp["heat_capacity"], label="$C_v$ (J/K/mol)")
    ax.axhline(0.0, color="0.6", lw=0.6)
    ax.set_xlabel("Temperature (K)")
    ax.set_title("Harmonic thermal properties (per mole of primitive cells)", fontsize=10)
    if title:
        fig.suptitle(title)
    ax.legend()
    save_png(fig, filename, f"Harmonic thermal properties: {title}")
