"""Quasi-harmonic thermodynamics: G(T, P), thermal expansion, bulk modulus, Cp and phase boundaries.

:func:`run_qha` takes one or more crystals (phases) and any ASE calculator with stress:

1. relaxes each phase (positions and cell, space group kept) to its static equilibrium volume V0;
2. at each volume of the grid (``volumes``: V/V0 - 1, or ``strains``: linear scale factors - 1) relaxes the
   positions *and the cell shape* at fixed volume, space group kept (a scaled cell alone gives wrong thermal
   expansion for non-cubic crystals), all volumes of all phases together through
   :class:`mattersim.relax.BatchRelaxer`;
3. computes harmonic phonons at every volume (finite displacements, the phase's supercell at every volume),
   all displaced supercells of all volumes and phases through one queue of batched model calls, each volume's
   forces resumable in its own sub-folder;
4. runs the quasi-harmonic approximation on F(V, T) = E(V) + F_vib(V, T) (+ PV) with phonopy's building
   blocks (:func:`qha_from_arrays`): V(T), the volumetric thermal expansion, B_T(T), Cp(T), the thermodynamic
   Grüneisen parameter and G(T) at each pressure; the electronic free energy is ignored (the electrons stay
   in their ground state: what the potential models);
5. flags what invalidates the numbers: imaginary modes at a volume, a vibrational free energy that is not
   monotonic in volume, mode frequencies that jump between volumes, a poor EOS fit, and temperatures where
   the equilibrium volume leaves the sampled range (the results stop there);
6. with two or more phases of one composition, the phase boundary P(T) where their G(T, P) cross, beside
   the static (0 K, no zero-point energy) transition pressure.

Units: energies eV (per primitive cell in phonopy's files, per atom in ``qha.json``'s G(T, P) table),
volumes Å^3, temperatures K, pressures and bulk moduli GPa, thermal expansion 1/K, heat capacities J/K/mol
(per mole of primitive cells, phonopy's unit), free energies of phonopy's ``thermal_properties.yaml`` kJ/mol.

Outputs (``output_dir``): ``qha.json`` (summary header, every curve, the checks), ``qha.log``,
``gibbs.png``, ``phase_boundary.png`` (two or more phases), and per phase a folder ``<label>/`` with
phonopy-qha's inputs (``e-v.dat``, ``thermal_properties.yaml-NN``; ``phonopy-qha e-v.dat
thermal_properties.yaml-*`` re-runs the fit), its outputs at the first pressure (``helmholtz-volume.dat``,
``volume-temperature.dat``, ``thermal_expansion.dat``, ``gibbs-temperature.dat``,
``bulk_modulus-temperature.dat``, ``Cp-temperature_polyfit.dat``, ``gruneisen-temperature.dat``), the
relaxed cells ``POSCAR-NN``, ``qha.png`` and the resumable stores (``relaxations.npz``, ``V-NN/forces.npz``).
"""

from __future__ import annotations

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
from mattersim.io import progress_bar, safe_filename, to_builtin
from mattersim.settings import parse_mesh, parse_pressures, parse_supercell
from workflows.cells import structure_record, to_ase_atoms, to_phonopy_atoms, unique_labels
from workflows.outputs import ArrayStore, RunFolder, figure, load_summary, run_key, summary_header

__all__ = ["EOS_NAMES", "QHARunResult", "check_free_energy_monotonic", "find_mode_jumps", "parse_volume_grid",
           "phase_boundary", "qha_from_arrays", "qha_from_files", "relax_at_volumes", "run_qha",
           "static_transition_pressure"]

logger = logging.getLogger("mattersim.qha")

WORKFLOW_VERSION = 1
EOS_NAMES = ("vinet", "birch_murnaghan", "murnaghan")
UNITS = {"energy": "eV", "volume": "Å^3", "temperature": "K", "pressure": "GPa", "bulk_modulus": "GPa",
         "thermal_expansion": "1/K", "heat_capacity": "J/K/mol (per mole of primitive cells)",
         "gibbs_table": "eV/atom", "force": "eV/Å", "frequency": "THz"}
DEFAULT_VOLUMES = "-0.05:0.05:11"
#: fewest volumes phonopy's QHA accepts
MIN_VOLUMES = 5
#: relative RMS residual of the EOS fit (of the free-energy range over the volumes) called poor
POOR_FIT = 0.02
_RELAX_STORE = "relaxations.npz"
_FORCES_STORE = "forces.npz"


# ---------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------


def parse_volume_grid(value: Any, name: str = "volumes") -> list[float]:
    """``"start:stop:n"`` (n evenly spaced values, both ends included), a comma/space separated list or a
    sequence -> sorted distinct fractions (V/V0 - 1 for volumes, a/a0 - 1 for strains). At least 5
    values, each above -0.5 and below 1."""
    hint = f"write start:stop:count (\"{DEFAULT_VOLUMES}\") or a list (\"-0.04,-0.02,0,0.02,0.04\")"
    if isinstance(value, str) and ":" in value:
        parts = value.split(":")
        try:
            start, stop, count = float(parts[0]), float(parts[1]), float(parts[2]) if len(parts) == 3 else None
        except (ValueError, IndexError):
            count = None
        if count is None or len(parts) != 3 or count != int(count) or not (math.isfinite(start) and math.isfinite(stop)):
            raise InputError(f"{name} {value!r} is not understood; {hint}.")
        values = list(np.linspace(start, stop, int(count))) if count >= 1 else []
    else:
        from mattersim.settings import parse_numbers

        try:
            values = parse_numbers(value, name)
        except InputError:  # its hint ("2 2 2") is a supercell's, not a volume grid's
            raise InputError(f"{name} {value!r} is not understood; {hint}.") from None
    values = sorted({round(float(v), 12) for v in values})
    if len(values) < MIN_VOLUMES:
        raise InputError(f"{name} {value!r} gives {len(values)} distinct values; the quasi-harmonic fit needs at least "
                         f"{MIN_VOLUMES} (11 are usual); {hint}.")
    if not all(math.isfinite(v) and -0.5 < v < 1.0 for v in values):
        raise InputError(f"{name} {value!r}: every value must be a fraction between -0.5 and 1 (e.g. -0.05 for 5 % "
                         f"smaller); {hint}.")
    return values


# ---------------------------------------------------------------------------------------------------------
# the quasi-harmonic approximation on arrays (phonopy's building blocks)
# ---------------------------------------------------------------------------------------------------------


def qha_from_arrays(volumes, energies, temperatures, free_energy, entropy, cv, *, eos: str = "vinet",
                    pressure: float | None = None, lattice_lengths=None, monoclinic_or_triclinic: bool = False):
    """phonopy's :class:`phonopy.qha.qha.QHAResult` from per-volume arrays, as :func:`phonopy.qha.qha.run_qha`
    computes it after its own thermal-property step (which needs ``Phonopy`` objects; this takes the numbers
    of ``thermal_properties.yaml`` files or of phonons computed elsewhere).

    ``volumes`` (n_v, Å^3) and ``energies`` (n_v, eV) per cell, the cell the thermal properties refer to
    (phonopy: the primitive cell); ``temperatures`` (n_t, K, ascending; the last one is consumed by finite
    differences); ``free_energy`` (n_t, n_v, kJ/mol), ``entropy`` and ``cv`` (n_t, n_v, J/K/mol): phonopy's
    thermal-property units; ``pressure`` GPa adds PV; ``lattice_lengths`` (n_v, 3, Å) gives a(T), b(T), c(T).
    Temperatures where the EOS fit fails are skipped (phonopy's rule)."""
    from phonopy.physical_units import get_physical_units
    from phonopy.qha.calc import (compute_entropy_enthalpy_temperature, compute_gruneisen_parameters,
                                  compute_heat_capacity_p_polyfit, compute_volumetric_thermal_expansion)
    from phonopy.qha.eos import fit_to_eos, get_eos
    from phonopy.qha.qha import QHACpPolyfitData, QHALatticeData, QHAResult

    units = get_physical_units()
    volumes = np.asarray(volumes, dtype=float)
    el = np.asarray(energies, dtype=float).copy()
    temps_in = np.asarray(temperatures, dtype=float)
    fe_ev = np.asarray(free_energy, dtype=float) / units.EvTokJmol
    entropy = np.asarray(entropy, dtype=float) / (units.EvTokJmol * 1000.0)
    cv = np.asarray(cv, dtype=float) / (units.EvTokJmol * 1000.0)
    if pressure is not None:
        el = el + volumes * float(pressure) / units.EVAngstromToGPa
    eos_func = get_eos(eos)
    kept, params, fes = [], [], []
    for i in range(len(temps_in)):
        fe = fe_ev[i] + el
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scipy's covariance warnings on exact data
                p = fit_to_eos(volumes, fe, eos_func)
        except (RuntimeError, TypeError, ValueError):
            continue
        if p is None or not np.all(np.isfinite(p)):
            continue
        kept.append(i)
        params.append(p)
        fes.append(fe)
    if len(kept) < 3:
        raise InputError("The equation of state could not be fitted to F(V) at 3 or more temperatures: the free "
                         "energies have no minimum in the sampled volume range; widen it (volumes) or check the "
                         "phonons for imaginary modes.")
    temps = temps_in[kept]
    params = np.array(params, dtype=float)
    fes = np.array(fes, dtype=float)
    v_eq, g, b = params[:, 3].copy(), params[:, 0].copy(), params[:, 1].copy()
    cv_k, s_k = cv[kept], entropy[kept]
    beta = compute_volumetric_thermal_expansion(temps, v_eq)
    gamma = compute_gruneisen_parameters(volumes, v_eq, b, beta, cv_k)
    poly = compute_heat_capacity_p_polyfit(temps, volumes, v_eq, cv_k, s_k)
    cp = QHACpPolyfitData(
        heat_capacities=poly.cp, dsdv=poly.dsdv,
        volume_cv_parameters=np.array(poly.volume_cv_parameters),
        volume_entropy_parameters=np.array(poly.volume_entropy_parameters),
        volume_cv=np.array([np.array([volumes, cv_k[j]]).T for j in range(1, len(temps) - 1)]),
        volume_entropy=np.array([np.array([volumes, s_k[j]]).T for j in range(1, len(temps) - 1)]))
    se = compute_entropy_enthalpy_temperature(temps, volumes, v_eq, s_k, g)
    n = len(temps) - 1
    lattice = None
    if lattice_lengths is not None and not monoclinic_or_triclinic:
        from phonopy.qha.lattice import LatticeParametersFit, compute_axial_thermal_expansion

        try:
            fit = LatticeParametersFit(volumes, np.asarray(lattice_lengths, dtype=float), degree=2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # extrapolation beyond the volumes: the caller stops the curves there
                abc = fit.evaluate(v_eq)
            lattice = QHALatticeData(lattice_parameters=abc[:n],
                                     axial_thermal_expansions=compute_axial_thermal_expansion(temps, abc))
        except RuntimeError:
            lattice = None
    return QHAResult(temperatures=temps[:n], volumes=volumes, helmholtz_volume=fes[:n], eos_name=eos,
                     eos_parameters=params[:n], equilibrium_volumes=v_eq[:n], gibbs_free_energies=g[:n],
                     entropy_temperature=se.entropy[:n], enthalpy_temperature=se.enthalpy[:n], bulk_moduli=b[:n],
                     thermal_expansion=beta, gruneisen_parameters=gamma, heat_capacity_P=cp, lattice=lattice)


def qha_from_files(ev_file: str | os.PathLike, thermal_files: Sequence[str | os.PathLike], *, eos: str = "vinet",
                   pressure: float | None = None):
    """:func:`qha_from_arrays` on phonopy-qha's inputs: ``e-v.dat`` and one ``thermal_properties.yaml`` per
    volume, in the order of the volumes (what ``phonopy-qha e-v.dat thermal_properties.yaml-*`` reads)."""
    from phonopy.file_IO import read_thermal_properties_yaml, read_v_e

    for path in [ev_file, *thermal_files]:
        if not Path(path).is_file():
            raise InputError(f"'{path}' does not exist; pass phonopy-qha's e-v.dat and thermal_properties.yaml files.")
    try:
        volumes, energies = read_v_e(ev_file)
        temperatures, cv, entropy, fe, _, _ = read_thermal_properties_yaml([str(p) for p in thermal_files])
    except Exception as exc:  # phonopy's readers raise bare errors on malformed files
        raise InputError(f"phonopy cannot read the QHA input files ({type(exc).__name__}: {exc}); check e-v.dat "
                         "(two columns: volume, energy) and the thermal_properties.yaml files.") from None
    if len(volumes) != len(thermal_files):
        raise InputError(f"'{ev_file}' has {len(volumes)} volumes but {len(thermal_files)} thermal_properties files "
                         "were given; give one file per volume, in the same order.")
    return qha_from_arrays(volumes, energies, temperatures, fe, entropy, cv, eos=eos, pressure=pressure)


def _volume_range_end(result) -> tuple[int, float | None]:
    """How many temperatures of ``result`` have their equilibrium volume inside the sampled volumes, and the
    first temperature where it is not (None if it never leaves)."""
    v = np.asarray(result.equilibrium_volumes)
    lo, hi = float(np.min(result.volumes)), float(np.max(result.volumes))
    outside = np.nonzero((v < lo) | (v > hi))[0]
    if len(outside) == 0:
        return len(v), None
    return int(outside[0]), float(result.temperatures[outside[0]])


def _eos_residual(result) -> float:
    """The largest RMS deviation of F(V) from the fitted EOS over the temperatures, relative to the range
    of F over the volumes."""
    from phonopy.qha.eos import get_eos

    func = get_eos(result.eos_name)
    worst = 0.0
    for fe, p in zip(result.helmholtz_volume, result.eos_parameters):
        fit = func(np.asarray(result.volumes), p)
        span = float(np.ptp(fe)) or 1.0
        worst = max(worst, float(np.sqrt(np.mean((fit - fe) ** 2))) / span)
    return worst


# ---------------------------------------------------------------------------------------------------------
# checks that catch unphysical phonons
# ---------------------------------------------------------------------------------------------------------


def check_free_energy_monotonic(volumes, temperatures, free_energy, tol_kj_mol: float = 1e-2) -> dict:
    """Temperatures at which the vibrational free energy F_vib(V) (kJ/mol, (n_t, n_v)) is not monotonic in V
    beyond ``tol_kj_mol`` (0.01 kJ/mol, 0.1 meV per cell: well above the rounding noise of float32 forces):
    phonons that stiffen and soften again as the crystal expands, a sign of a potential whose curvature is not
    smooth in volume (CHGNet's Al). Monotonic decreasing is the normal case; increasing
    (negative thermal expansion) is allowed but reported."""
    order = np.argsort(np.asarray(volumes, dtype=float))
    fe = np.asarray(free_energy, dtype=float)[:, order]
    temps = np.asarray(temperatures, dtype=float)
    bad, increasing = [], []
    for t, row in zip(temps, fe):
        d = np.diff(row)
        big = d[np.abs(d) > tol_kj_mol]
        if len(big) and np.any(big > 0) and np.any(big < 0):
            bad.append(float(t))
        elif len(big) and np.all(big > 0):
            increasing.append(float(t))
    return {"non_monotonic_temperatures_K": bad, "increasing_temperatures_K": increasing,
            "ok": not bad, "tolerance_kJ_per_mol": tol_kj_mol}


def find_mode_jumps(volumes, qpoints, frequencies, tol_thz: float = 0.05) -> list[dict]:
    """Modes whose frequency (sorted band index at each q-point) is not monotonic in volume: ``frequencies``
    (n_v, n_q, n_bands) THz on the same q-points at every volume. A smooth potential gives frequencies that
    fall (or rise) steadily with volume; a back-and-forth beyond ``tol_thz`` between neighbouring volumes is
    a mode-order jump or an unconverged phonon. Returns the worst case per band."""
    order = np.argsort(np.asarray(volumes, dtype=float))
    f = np.asarray(frequencies, dtype=float)[order]
    d = np.diff(f, axis=0)  # (n_v - 1, n_q, n_b)
    up = np.where(d > tol_thz, d, 0.0).max(axis=0)
    down = np.where(d < -tol_thz, -d, 0.0).max(axis=0)
    both = np.minimum(up, down)  # the smaller of the two opposite moves: how far it goes back
    out = []
    for band in range(f.shape[2]):
        iq = int(np.argmax(both[:, band]))
        if both[iq, band] > 0:
            out.append({"band": band, "q": [float(x) for x in np.asarray(qpoints)[iq]],
                        "reversal_THz": float(both[iq, band]),
                        "frequencies_THz": [float(x) for x in f[:, iq, band]]})
    return sorted(out, key=lambda m: -m["reversal_THz"])


# ---------------------------------------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------------------------------------


def phase_boundary(temperatures, pressures, g_a, g_b) -> np.ndarray:
    """P(T) (GPa) where two phases' Gibbs energies per atom cross: ``g_a``, ``g_b`` (n_p, n_t) on the
    ``pressures`` (GPa, ascending) and ``temperatures`` grid; linear interpolation of ΔG = G_b - G_a in P
    between the grid pressures that bracket its sign change (the lowest such pressure if several); NaN where
    ΔG keeps its sign over the pressure range."""
    p = np.asarray(pressures, dtype=float)
    dg = np.asarray(g_b, dtype=float) - np.asarray(g_a, dtype=float)
    out = np.full(len(np.asarray(temperatures)), np.nan)
    for j in range(dg.shape[1]):
        col = dg[:, j]
        for i in range(len(p) - 1):
            if not (np.isfinite(col[i]) and np.isfinite(col[i + 1])):
                continue
            if col[i] == 0.0:
                out[j] = p[i]
                break
            if col[i] * col[i + 1] < 0:
                out[j] = p[i] + (p[i + 1] - p[i]) * col[i] / (col[i] - col[i + 1])
                break
        else:
            if np.isfinite(col[-1]) and col[-1] == 0.0:
                out[j] = p[-1]
    return out


def _static_enthalpy(volumes, energies, eos: str, n_atoms: int):
    """(P grid GPa, H eV/atom, V Å^3/atom) of the static lattice from an EOS fit of E(V) per atom, on volumes
    from 0.6 to 1.15 V0 (P from the fit's derivative)."""
    from phonopy.qha.eos import fit_to_eos, get_eos

    v = np.asarray(volumes, dtype=float) / n_atoms
    e = np.asarray(energies, dtype=float) / n_atoms
    func = get_eos(eos)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = fit_to_eos(v, e, func)
    if params is None:
        raise InputError("The static E(V) could not be fitted to the equation of state; widen the volume range.")
    grid = np.linspace(0.6, 1.15, 2000) * params[3]
    h = 1e-5 * params[3]
    p = -(func(grid + h, params) - func(grid - h, params)) / (2 * h)  # eV/Å^3
    return p * _gpa(), func(grid, params) + p * grid, grid


def static_transition_pressure(volumes_a, energies_a, n_atoms_a, volumes_b, energies_b, n_atoms_b,
                               eos: str = "vinet") -> float | None:
    """The 0 K transition pressure (GPa, no zero-point energy) where the static enthalpies per atom of two
    phases cross, from EOS fits of their E(V) (any cells; ``n_atoms_*`` atoms per cell); None if they do
    not cross between the two fits' pressure ranges (volumes 0.6-1.15 V0)."""
    pa, ha, _ = _static_enthalpy(volumes_a, energies_a, eos, n_atoms_a)
    pb, hb, _ = _static_enthalpy(volumes_b, energies_b, eos, n_atoms_b)
    lo, hi = max(pa.min(), pb.min()), min(pa.max(), pb.max())
    if not lo < hi:
        return None
    grid = np.linspace(lo, hi, 4000)
    # P decreases along the volume grid: interpolate on the reversed (ascending) arrays
    dh = np.interp(grid, pb[::-1], hb[::-1]) - np.interp(grid, pa[::-1], ha[::-1])
    crossing = np.nonzero(np.sign(dh[:-1]) * np.sign(dh[1:]) < 0)[0]
    if len(crossing) == 0:
        return None
    i = int(crossing[0])
    return float(grid[i] + (grid[i + 1] - grid[i]) * dh[i] / (dh[i] - dh[i + 1]))


# ---------------------------------------------------------------------------------------------------------
# relaxations at fixed volume
# ---------------------------------------------------------------------------------------------------------


def scaled_to_volume(atoms: Atoms, fraction: float) -> Atoms:
    """``atoms`` scaled isotropically to the volume ``(1 + fraction) V`` (fractional positions kept)."""
    out = atoms.copy()
    out.calc = None
    out.set_cell(np.array(atoms.cell[:]) * (1.0 + fraction) ** (1.0 / 3.0), scale_atoms=True)
    return out


def relax_at_volumes(atoms: Atoms, calculator, fractions: Sequence[float], *, fmax: float = 0.01, steps: int = 500,
                     symprec: float = 1e-5, optimizer: str = "BFGS"):
    """Each volume ``(1 + x) V`` of ``atoms`` (x in ``fractions``) with positions and cell shape relaxed at
    that fixed volume, space group kept, all in one :class:`mattersim.relax.BatchRelaxer`; returns its
    :class:`mattersim.relax.RelaxResult` list."""
    from mattersim.relax import BatchRelaxer

    relaxer = BatchRelaxer(calculator, fmax=fmax, steps=steps, mode="fixed_volume", optimizer=optimizer,
                           symmetry=True, symprec=symprec)
    return relaxer.relax([scaled_to_volume(atoms, x) for x in fractions])


# ---------------------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------------------


@dataclass
class QHARunResult:
    """A finished :func:`run_qha`: ``summary`` (the content of ``qha.json``) and ``output_dir``.
    ``phase(label)`` gives one phase's curves; ``gibbs(label)`` its G(T, P) table (eV/atom)."""

    summary: dict
    output_dir: Path | None = None

    @property
    def labels(self) -> list[str]:
        return [p["label"] for p in self.summary["phases"]]

    def phase(self, label: str | None = None) -> dict:
        phases = self.summary["phases"]
        if label is None:
            return phases[0]
        for p in phases:
            if p["label"] == label:
                return p
        raise InputError(f"No phase {label!r} in this QHA run; phases: {', '.join(self.labels)}.")

    def gibbs(self, label: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(temperatures K, pressures GPa, G eV/atom with shape (n_p, n_t), NaN beyond the sampled volumes)."""
        t = self.phase(label)["gibbs_table"]
        g = np.array([[np.nan if x is None else x for x in row] for row in t["G_eV_per_atom"]], dtype=float)
        return np.array(t["temperatures_K"], dtype=float), np.array(t["pressures_GPa"], dtype=float), g

    def value_at(self, quantity: str, temperature: float, label: str | None = None) -> float:
        """A curve of the first pressure (``volume_A3``, ``thermal_expansion_per_K``, ``bulk_modulus_GPa``,
        ``cp_J_per_K_per_mol``, ``gruneisen``, ``gibbs_eV``) interpolated at ``temperature`` K."""
        c = self.phase(label)["curves"]
        t = np.array(c["temperatures_K"], dtype=float)
        y = np.array([np.nan if x is None else x for x in c[quantity]], dtype=float)
        if not len(t):
            raise InputError("This phase has no curves: its equilibrium volume is outside the sampled volumes (see its warnings).")
        if not t[0] <= temperature <= t[-1]:
            raise InputError(f"{temperature} K is outside the computed range {t[0]:g}-{t[-1]:g} K.")
        return float(np.interp(temperature, t, y))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``qha.json`` to ``directory`` (the phase folders are written by :func:`run_qha`)."""
        with RunFolder(directory, "qha", logger) as folder:
            folder.record(self.summary.get("files", []))
            folder.file("qha.json")
            self.summary["files"] = folder.files
            folder.write_json("qha.json", self.summary)
        self.output_dir = Path(directory)
        return self.output_dir

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "QHARunResult":
        directory = Path(directory)
        return cls(summary=load_summary(directory, "qha.json", [], "run_qha / 'mattersim qha'"), output_dir=directory)

    def rows(self) -> list[tuple[str, str]]:
        """(quantity, value) lines that ``mattersim qha`` prints."""
        rows = []
        for p in self.summary["phases"]:
            c = p["curves"]
            name = f"{p['label']} ({p['structure']['formula']}, {p['structure']['spacegroup']})"
            t = np.array(c["temperatures_K"], dtype=float)
            reach = f"results to {t[-1]:g} K" if len(t) else "no temperature inside the sampled volumes"
            rows.append((name, f"V0 (static) {p['static']['v0_A3_per_atom']:.4f} Å^3/atom, B0 {p['static']['b0_GPa']:.2f} GPa, "
                               f"{len(p['volumes'])} volumes, {reach} (P = {c['pressure_GPa']:g} GPa)"))
            for temp in (300.0,):
                if len(t) and t[0] <= temp <= t[-1]:
                    rows.append((f"  at {temp:g} K", f"alpha_V {self.value_at('thermal_expansion_per_K', temp, p['label']):.4e} /K, "
                                 f"B_T {self.value_at('bulk_modulus_GPa', temp, p['label']):.2f} GPa, "
                                 f"Cp {self.value_at('cp_J_per_K_per_mol', temp, p['label']):.2f} J/K/mol, "
                                 f"V {self.value_at('volume_A3', temp, p['label']) / p['structure']['n_atoms_primitive']:.4f} Å^3/atom"))
            for w in p["warnings"]:
                rows.append(("  WARNING", w))
        for b in self.summary.get("phase_boundaries", []):
            static = b["static_transition_pressure_GPa"]
            slope = b.get("slope_GPa_per_K")
            rows.append((f"boundary {b['phases'][0]} / {b['phases'][1]}",
                         f"static (0 K, no ZPE) {'none in range' if static is None else f'{static:.2f} GPa'}; "
                         f"P(T) at {b['first_temperature_K']:g} K: {_fmt(b['first_pressure_GPa'])} GPa"
                         + (f", dP/dT {slope * 1000:.3f} MPa/K" if slope is not None else "")))
        if self.output_dir is not None:
            rows.append(("output", str(self.output_dir)))
        return rows


def _fmt(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.2f}"


# ---------------------------------------------------------------------------------------------------------
# the workflow
# ---------------------------------------------------------------------------------------------------------


def _check(structures, calculator, labels, tmax, tstep, eos, fmax, displacement) -> tuple[list[Atoms], list[str]]:
    if isinstance(structures, Atoms):
        structures = [structures]
    structures = list(structures)
    if not structures:
        raise InputError("run_qha needs at least one structure.")
    for k, a in enumerate(structures):
        if not isinstance(a, Atoms):
            raise InputError(f"structure {k + 1} must be an ase.Atoms object, not {type(a).__name__}.")
        if len(a) == 0 or not np.asarray(a.pbc).all() or abs(a.cell.volume) < 1e-6:
            raise InputError(f"structure {k + 1} ({a.get_chemical_formula()}) is not a 3D-periodic crystal (pbc=True "
                             "and a cell with volume); phonons and thermal expansion need one.")
    props = getattr(calculator, "implemented_properties", None)
    if getattr(calculator, "property_only", False) or (props is not None and "stress" not in props):
        raise InputError(f"The model '{model_info(calculator).get('name')}' predicts no stress; the relaxations at fixed "
                         "volume need stresses. Use a potential with stress (MatterSim, CHGNet, SevenNet).")
    if not (isinstance(tmax, (int, float)) and math.isfinite(tmax) and tmax > 0):
        raise InputError(f"tmax must be a positive temperature in K, not {tmax!r}.")
    if not (isinstance(tstep, (int, float)) and math.isfinite(tstep) and 0 < tstep <= tmax / 2):
        raise InputError(f"tstep must be a positive temperature step in K, at most tmax / 2, not {tstep!r}.")
    if eos not in EOS_NAMES:
        raise InputError(f"Unknown equation of state {eos!r}; use one of {', '.join(EOS_NAMES)}.")
    if not (isinstance(fmax, (int, float)) and fmax > 0):
        raise InputError(f"fmax must be positive (eV/Å), not {fmax!r}.")
    if not (isinstance(displacement, (int, float)) and 0 < displacement <= 0.1):
        raise InputError(f"displacement must be in (0, 0.1] Å, not {displacement!r}.")
    if labels is None:
        labels = []
        for a in structures:
            labels.append(a.info.get("label") or a.get_chemical_formula(mode="hill", empirical=True))
    labels = [safe_filename(str(x)) for x in labels]
    if len(labels) != len(structures):
        raise InputError(f"{len(labels)} labels for {len(structures)} structures; give one label per structure.")
    return structures, unique_labels(labels)  # two phases of one formula: MgO, MgO-2


@dataclass
class _Volume:
    index: int
    fraction: float
    atoms: Atoms
    energy: float
    converged: bool
    ph: Any = None
    store: ArrayStore | None = None
    supercells: list | None = None


@dataclass
class _Phase:
    label: str
    input: Atoms
    unit: Atoms | None = None
    folder: Path | None = None
    store: ArrayStore | None = None
    smat: Any = None
    volumes: list | None = None
    relax_summary: dict | None = None


def run_qha(structures: Atoms | Sequence[Atoms], calculator, *, labels: Sequence[str] | None = None,
            volumes: Any = None, strains: Any = None, tmax: float = 1000.0, tstep: float = 10.0,
            pressures: Any = 0.0, eos: str = "vinet", supercell: Any = None, min_length: float | None = None,
            mesh: Any = (20, 20, 20), displacement: float = 0.01, nac: bool = False,
            born_file: str | os.PathLike | None = None, predictor: Any = None, nac_method: str = "gonze",
            relax: bool = True, fmax: float = 0.01,
            relax_steps: int = 500, optimizer: str = "BFGS", symprec: float = 1e-5,
            output_dir: str | os.PathLike | None = None, batch_size: int | None = None,
            progress: bool = True, runner: Any = None, spec: Any = None) -> QHARunResult:
    """Quasi-harmonic thermodynamics of one or more phases (see the module docstring).

    ``structures``: one crystal or several phases (``labels`` name them; default the formula);
    ``calculator``: any ASE calculator with forces and stress. ``volumes``: the volume grid as V/V0 - 1
    (``"start:stop:count"`` or a list; default ``"-0.05:0.05:11"``), or ``strains``: linear strains a/a0 - 1
    (V/V0 = (1 + s)^3; not both). ``tmax``, ``tstep`` (K): the temperature grid from 0 K. ``pressures`` (GPa,
    :func:`mattersim.settings.parse_pressures`): G(T, P) and the curves at each; the first one is the
    headline. ``eos``: vinet, birch_murnaghan or murnaghan. ``supercell`` (phonopy DIM) or automatic from the
    relaxed V0 cell (:func:`workflows.phonon.auto_supercell` with ``min_length``, default max(10 Å, 2 x
    cutoff)); the same supercell at every volume. ``mesh``: q-mesh of the thermal properties (3 integers or a
    length in Å). ``displacement`` (Å). ``relax``/``fmax``/``relax_steps``/``optimizer``/``symprec``: the V0
    relaxation (``relax=False``: the structure is V0 as given) and the fixed-volume ones (always).
    ``nac`` (implied by ``born_file`` or ``predictor``): phonopy's non-analytical correction (``nac_method``
    gonze or wang) at every volume, with Z* and eps_inf from a phonopy BORN file (the same at every volume),
    a predictor or the model's own predictions (at each volume's cell); it changes the LO modes near Γ only,
    so the free energies little. ``batch_size``: supercells per batched model call (default: ~1024 atoms per
    call). ``runner`` (:class:`mattersim.distributed.TaskRunner` on Dask) with ``spec`` (the model each
    worker loads): the displaced supercells' forces run there, one task per volume, stored here as they
    come back; relaxations and the QHA stay in this process."""
    from workflows.phonon import DEFAULT_MIN_LENGTH_A, _build_phonopy, auto_supercell, model_cutoff

    if volumes is not None and strains is not None:
        raise InputError("Give volumes or strains, not both.")
    if strains is not None:
        grid = parse_volume_grid(strains, "strains")
        fractions = [(1.0 + s) ** 3 - 1.0 for s in grid]
        grid_kind = "strains"
    else:
        grid = parse_volume_grid(DEFAULT_VOLUMES if volumes is None else volumes, "volumes")
        fractions = list(grid)
        grid_kind = "volumes"
    structures, labels = _check(structures, calculator, labels, tmax, tstep, eos, fmax, displacement)
    pressure_list = parse_pressures(pressures, "pressures")
    mesh_setting = parse_mesh(mesh, "mesh")
    smat_given = parse_supercell(supercell, "supercell")
    if batch_size is not None and int(batch_size) < 1:
        raise InputError(f"batch_size must be a positive integer, not {batch_size!r}.")
    nac = bool(nac or born_file is not None or predictor is not None)
    if nac_method not in ("gonze", "wang"):
        raise InputError(f"Unknown NAC method {nac_method!r}; use gonze or wang.")
    if born_file is not None and not Path(born_file).is_file():
        raise InputError(f"BORN file '{born_file}' does not exist; pass the path of a phonopy BORN file.")
    from mattersim.registry import check_trained_elements

    check_trained_elements(calculator, structures, properties=nac and born_file is None and predictor is None)
    out = RunFolder.check(output_dir)
    info = model_info(calculator)
    cutoff, cutoff_source = model_cutoff(calculator)
    length = float(min_length) if min_length is not None else max(DEFAULT_MIN_LENGTH_A, 2.0 * cutoff)
    settings = {"grid": grid_kind, "grid_values": grid, "volume_fractions": fractions, "tmax_K": float(tmax),
                "tstep_K": float(tstep), "pressures_GPa": pressure_list, "eos": eos,
                "supercell": None if smat_given is None else smat_given.tolist(),
                "min_length_A": None if smat_given is not None else length, "mesh": mesh_setting,
                "displacement_A": float(displacement), "nac": nac, "nac_method": nac_method if nac else None,
                "born_file": None if born_file is None else str(born_file), "relax": bool(relax), "fmax_eV_per_A": float(fmax),
                "relax_steps": int(relax_steps), "optimizer": str(optimizer), "symprec": float(symprec),
                "thermal_exclude_gamma_acoustic": True, "electronic_free_energy": "ignored (ground-state electrons)"}
    phase_settings = {k: v for k, v in settings.items() if k not in ("tmax_K", "tstep_K", "pressures_GPa", "eos")}
    timings = {"relaxation": 0.0, "force_evaluation": 0.0, "qha": 0.0}
    t_start = time.perf_counter()
    with RunFolder(out, "qha", logger) as folder:
        log = folder.log
        phases = [_Phase(label=lab, input=a.copy()) for lab, a in zip(labels, structures)]
        for ph_ in phases:
            ph_.input.calc = None
            ph_.folder = None if out is None else out / ph_.label
            if ph_.folder is not None:
                ph_.folder.mkdir(parents=True, exist_ok=True)
            key = run_key(structure_record(ph_.input), phase_settings, info)
            ph_.store = ArrayStore(None if ph_.folder is None else ph_.folder / _RELAX_STORE, key)
            ph_.store.load(log)
        log.info(f"run_qha: {len(phases)} phase(s) ({', '.join(labels)}), model {info.get('name')}, "
                 f"{len(fractions)} volumes ({grid_kind} {grid[0]:+g} to {grid[-1]:+g}), T 0-{tmax:g} K, "
                 f"P {pressure_list} GPa, EOS {eos}, output {out}")

        # 1. V0 relaxations (one structure each) ---------------------------------------------------------
        t0 = time.perf_counter()
        for ph_ in phases:
            d = ph_.store.data
            if "unit_cell" in d:
                ph_.unit = Atoms(numbers=d["unit_numbers"], cell=d["unit_cell"], positions=d["unit_positions"], pbc=True)
                ph_.relax_summary = json.loads(str(d["unit_summary"]))
                log.info(f"{ph_.label}: reusing the V0 relaxation from {_RELAX_STORE}")
                continue
            if relax:
                from mattersim.relax import relax as relax_structure

                res = relax_structure(ph_.input, calculator, fmax=fmax, steps=relax_steps, mode="full",
                                      symmetry=True, symprec=symprec, optimizer=optimizer)
                if not res.converged or not np.isfinite(res.energy):
                    raise InputError(f"Phase {ph_.label}: the structure did not relax to fmax = {fmax} eV/Å within "
                                     f"{relax_steps} steps (fmax {res.fmax:.3g} eV/Å): the QHA of a structure that is not "
                                     "at a minimum is meaningless. Raise relax_steps or check the structure.")
                ph_.unit = res.atoms.copy()
                ph_.relax_summary = res.to_dict()
                log.info(f"{ph_.label}: V0 relaxation converged after {res.steps} steps, V {res.initial_volume:.4f} -> "
                         f"{res.volume:.4f} Å^3")
            else:
                ph_.unit = ph_.input.copy()
                ph_.relax_summary = None
            ph_.unit.calc = None
            if ph_.input.has("masses"):
                ph_.unit.set_masses(ph_.input.get_masses())
            d.update({"unit_numbers": ph_.unit.numbers, "unit_cell": np.array(ph_.unit.cell[:]),
                      "unit_positions": ph_.unit.positions,
                      "unit_summary": np.array(json.dumps(to_builtin(ph_.relax_summary)))})
            ph_.store.save()

        # 2. fixed-volume relaxations, all phases and volumes together ------------------------------------
        pending = [ph_ for ph_ in phases if "volume_cells" not in ph_.store.data]
        if pending:
            log.info(f"relaxing positions and cell shape at {len(fractions)} fixed volumes for {len(pending)} phase(s), "
                     "space group kept (one batched relaxation)")
            from mattersim.relax import BatchRelaxer

            relaxer = BatchRelaxer(calculator, fmax=fmax, steps=relax_steps, mode="fixed_volume", optimizer=optimizer,
                                   symmetry=True, symprec=symprec)
            jobs = [(ph_, scaled_to_volume(ph_.unit, x)) for ph_ in pending for x in fractions]
            results = relaxer.relax([a for _, a in jobs])
            for k, ph_ in enumerate(pending):
                rs = results[k * len(fractions):(k + 1) * len(fractions)]
                ph_.store.data.update({
                    "volume_cells": np.array([np.array(r.atoms.cell[:]) for r in rs]),
                    "volume_positions": np.array([r.atoms.positions for r in rs]),
                    "volume_energies": np.array([r.energy for r in rs]),
                    "volume_converged": np.array([r.converged for r in rs]),
                    "volume_fmax": np.array([r.fmax for r in rs]),
                    "volume_steps": np.array([r.steps for r in rs])})
                ph_.store.save()
        timings["relaxation"] = time.perf_counter() - t0
        for ph_ in phases:
            d = ph_.store.data
            ph_.volumes = []
            for i, x in enumerate(fractions):
                a = ph_.unit.copy()
                a.set_cell(d["volume_cells"][i])
                a.positions = d["volume_positions"][i]
                ph_.volumes.append(_Volume(i, x, a, float(d["volume_energies"][i]), bool(d["volume_converged"][i])))
            bad = [f"{v.fraction:+.3f}" for v in ph_.volumes if not v.converged]
            if bad:
                log.warning(f"{ph_.label}: the fixed-volume relaxation did not reach fmax {fmax} eV/Å at volume(s) {', '.join(bad)} "
                            f"(largest fmax {float(np.max(d['volume_fmax'])):.3g} eV/Å); their phonons may show spurious modes.")

        # 3. phonopy at every volume; the displaced supercells of all volumes in one queue ----------------
        from phonopy.structure.symmetry import Symmetry

        queue = []
        for ph_ in phases:
            if smat_given is not None:
                ph_.smat = smat_given
            else:
                rotations = Symmetry(to_phonopy_atoms(ph_.unit), symprec=symprec).symmetry_operations["rotations"]
                ph_.smat = auto_supercell(ph_.unit.cell[:], length, rotations)
            for v in ph_.volumes:
                v.ph = _build_phonopy(v.atoms, ph_.smat, "auto", symprec)
                v.ph.generate_displacements(distance=displacement)
                v.supercells = [to_ase_atoms(s) for s in v.ph.supercells_with_displacements]
                n_sc = len(v.ph.supercell)
                vdir = None if ph_.folder is None else ph_.folder / f"V-{v.index:02d}"
                if vdir is not None:
                    vdir.mkdir(exist_ok=True)
                key = run_key(structure_record(v.atoms), {"supercell": np.asarray(ph_.smat).tolist(),
                                                          "displacement_A": float(displacement), "symprec": symprec}, info)
                v.store = ArrayStore(None if vdir is None else vdir / _FORCES_STORE, key)
                v.store.load(log)
                if v.store.data.get("forces") is None or v.store.data["forces"].shape != (len(v.supercells), n_sc, 3):
                    v.store.data = {"forces": np.zeros((len(v.supercells), n_sc, 3)), "done": np.zeros(len(v.supercells), bool)}
                queue += [(v, i) for i in range(len(v.supercells)) if not v.store.data["done"][i]]
        n_total = sum(len(v.supercells) for p in phases for v in p.volumes)
        n_atoms_max = max(len(v.ph.supercell) for p in phases for v in p.volumes)
        chunk = int(batch_size) if batch_size is not None else (max(1, 1024 // n_atoms_max) if hasattr(calculator, "calculate_batch") else 1)
        log.info(f"forces: {n_total} displaced supercells over {len(phases) * len(fractions)} volumes, "
                 f"{n_total - len(queue)} reused, {len(queue)} to evaluate in chunks of {chunk}")
        t0 = time.perf_counter()
        if runner is not None and runner.distributed:
            _forces_on_dask(runner, spec, queue, chunk, progress)
        else:
            with progress_bar(progress, len(queue), "QHA forces") as bar:
                for start in range(0, len(queue), chunk):
                    part = queue[start:start + chunk]
                    res = evaluate_batch(calculator, [v.supercells[i] for v, i in part], ("energy", "forces"))
                    _store_forces(part, [r["forces"] for r in res])
                    bar.advance(len(part))
        timings["force_evaluation"] = time.perf_counter() - t0

        # 4. thermal properties per volume, checks, QHA per pressure --------------------------------------
        t0 = time.perf_counter()
        temperatures = np.arange(0.0, float(tmax) + 1.5 * float(tstep), float(tstep))  # one extra: finite differences
        summaries = []
        for ph_ in phases:
            if nac:
                _set_nac(ph_, born_file, predictor, calculator, nac_method, symprec, log)
            summaries.append(_phase_qha(ph_, temperatures, pressure_list, eos, mesh_setting, tmax, log, folder, info))
        boundaries = _boundaries(phases, summaries, eos, log)
        timings["qha"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        summary = {**summary_header("qha", WORKFLOW_VERSION, info, settings, UNITS, timings),
                   "model_cutoff_A": cutoff, "model_cutoff_source": cutoff_source,
                   "phases": summaries, "phase_boundaries": boundaries,
                   "notes": ["electronic free energy ignored: the static energy E(V) is the model's ground-state energy",
                             "phonopy's QHA (run_qha's algorithm on these arrays): the last temperature is consumed by "
                             "finite differences; results stop where V(T) leaves the sampled volumes"]}
        result = QHARunResult(summary=summary, output_dir=folder.path)
        if folder.path is not None:
            folder.write_with("gibbs.png", lambda p: _plot_gibbs(p, summaries, info))
            if boundaries:
                folder.write_with("phase_boundary.png", lambda p: _plot_boundaries(p, boundaries, info))
            folder.record(f"{s['label']}/{name}" for s in summaries for name in s["files"])
            folder.file("qha.json")
            summary["files"] = folder.files
            folder.write_json("qha.json", summary)
            log.info(f"done in {timings['total']:.1f} s (relaxations {timings['relaxation']:.1f} s, forces "
                     f"{timings['force_evaluation']:.1f} s, QHA {timings['qha']:.1f} s)")
    return result


def _store_forces(part: list, forces: list) -> None:
    """Forces of the displaced supercells ``part`` ((volume, index) pairs) into their volumes' stores."""
    touched = {}
    for (v, i), f in zip(part, forces):
        f = np.asarray(f, dtype=float).reshape(-1, 3)
        if not np.all(np.isfinite(f)):
            raise InputError(f"The calculator returned non-finite forces for a displaced supercell at volume "
                             f"{v.fraction:+.3f}; check the structure and the volume range.")
        v.store.data["forces"][i] = f
        v.store.data["done"][i] = True
        touched[id(v)] = v
    for v in touched.values():
        v.store.save()


def _volume_forces(calculator, payload) -> list[np.ndarray]:
    """The forces of one volume's displaced supercells (a Dask task), in batched calls of ``chunk``."""
    supercells, chunk = payload
    out = []
    for start in range(0, len(supercells), chunk):
        out += [np.asarray(r["forces"], dtype=float) for r in
                evaluate_batch(calculator, supercells[start:start + chunk], ("energy", "forces"))]
    return out


def _forces_on_dask(runner, spec, queue: list, chunk: int, progress: bool) -> None:
    """The supercells of ``queue`` on Dask, one task per volume; each volume's forces are stored here as its
    task comes back. A volume whose task failed is an error naming it, after the others are stored (a
    rerun resumes with it alone)."""
    groups: dict[int, tuple] = {}
    for v, i in queue:
        groups.setdefault(id(v), (v, []))[1].append(i)
    groups_list = list(groups.values())
    failed = []

    def on_result(r) -> None:
        v, idx = groups_list[r.index]
        if r.ok:
            _store_forces([(v, i) for i in idx], r.value)
        else:
            failed.append(f"volume {v.fraction:+.3f}: {r.error['type']}: {r.error['message'][:200]}")

    with runner.started():
        runner.run(_volume_forces, [([v.supercells[i] for i in idx], chunk) for v, idx in groups_list], spec=spec,
                   on_result=on_result, progress=progress, description="QHA forces")
    if failed:
        raise InputError("Force evaluations failed on Dask (the finished volumes are stored; rerun to resume): "
                         + "; ".join(failed))


def _set_nac(ph_: _Phase, born_file, predictor, calculator, method: str, symprec: float, log) -> None:
    """phonopy's NAC parameters at every volume of a phase (workflows.nac: BORN file, predictor or the
    model's own Z* and eps_inf, symmetrised)."""
    from workflows import nac as nac_module

    for v in ph_.volumes:
        born = nac_module.resolve_born(born_file=born_file, predictor=predictor, calculator=calculator,
                                       primitive_atoms=to_ase_atoms(v.ph.primitive), symprec=symprec)
        born_sym, _ = nac_module.symmetrize(born, to_ase_atoms(v.ph.primitive), symprec)
        v.ph.nac_params = dict(born_sym.to_phonopy_nac_params(method=method))
    log.info(f"{ph_.label}: NAC ({method}) at every volume, Z* and eps_inf from {born_sym.source}")


def _mesh_numbers(ph_: _Phase, mesh_setting) -> list[int]:
    """One regular q-mesh for every volume of a phase: the given numbers, or a length (Å) turned into numbers
    on the primitive cell of the volume nearest V0 (phonopy's ``length2mesh``, symmetry-adapted). phonopy
    given the length at each volume would pick numbers per volume (they change as the cell grows) and, for
    non-simple cells, a generalized grid: F_vib(V) would jump between grids and the mode-jump check would
    compare different q-points."""
    if not isinstance(mesh_setting, float):
        return [int(n) for n in mesh_setting]
    from phonopy.phonon.grid import length2mesh

    p = min(ph_.volumes, key=lambda v: abs(v.fraction)).ph
    rotations = p.primitive_symmetry.pointgroup_operations
    return [int(n) for n in length2mesh(mesh_setting, p.primitive.cell, rotations=rotations)]


def _phase_qha(ph_: _Phase, temperatures, pressures, eos, mesh_setting, tmax, log, folder: RunFolder, info) -> dict:
    """Force constants, thermal properties and checks at every volume of one phase, then its QHA at each
    pressure; writes the phase folder's files; returns the phase's part of ``qha.json``."""
    from workflows.phonon import find_imaginary_modes

    n_v = len(ph_.volumes)
    fe = np.zeros((len(temperatures), n_v))
    s = np.zeros_like(fe)
    cv = np.zeros_like(fe)
    mesh_f, mesh_q, imaginary = [], None, []
    mesh_numbers = _mesh_numbers(ph_, mesh_setting)
    for v in ph_.volumes:
        p = v.ph
        p.forces = v.store.data["forces"]
        p.produce_force_constants(calculate_full_force_constants=False, show_drift=False)
        p.symmetrize_force_constants(show_drift=False)
        p.run_mesh(mesh_numbers, is_gamma_center=True)
        # the three acoustic modes at Γ (zero frequency, finite only by rounding) are left out, as in the phonon
        # workflow: kT ln(hν/kT) of a ~1e-7 THz mode would add a spurious, volume-dependent free energy
        p.run_thermal_properties(t_min=0.0, t_max=float(temperatures[-1]), t_step=float(temperatures[1] - temperatures[0]),
                                 exclude_gamma_acoustic=True)
        tp = p.thermal_properties
        if len(tp.temperatures) != len(temperatures) or not np.allclose(tp.temperatures, temperatures):
            raise RuntimeError(f"phonopy's temperature grid ({len(tp.temperatures)} points) differs from the QHA's "
                               f"({len(temperatures)}); report this with the tmax and tstep used.")
        fe[:, v.index], s[:, v.index], cv[:, v.index] = tp.free_energy, tp.entropy, tp.heat_capacity
        mesh_q = np.asarray(p.mesh.qpoints)
        mesh_f.append(np.asarray(p.mesh.frequencies))
        modes = find_imaginary_modes(mesh_q, mesh_f[-1], where="mesh")
        if modes:
            worst = min(modes, key=lambda m: m["frequency_THz"])
            imaginary.append({"volume_index": v.index, "volume_fraction": v.fraction, "count": len(modes),
                              "most_negative_THz": worst["frequency_THz"], "q": worst["q"]})
    prim0 = ph_.volumes[0].ph.primitive
    n_prim, n_unit = len(prim0), len(ph_.unit)
    vols = np.array([v.ph.primitive.volume for v in ph_.volumes])
    energies = np.array([v.energy for v in ph_.volumes]) * n_prim / n_unit
    lengths = np.array([np.linalg.norm(v.ph.unitcell.cell, axis=1) for v in ph_.volumes])
    sg = ph_.volumes[0].ph.symmetry.get_international_table()
    sg_number = ph_.volumes[0].ph.symmetry.dataset.number
    kept_symmetry = all(v.ph.symmetry.dataset.number == sg_number for v in ph_.volumes)
    low_symmetry = sg_number < 16

    warnings_ = []
    if imaginary:
        warnings_.append("imaginary modes at volume(s) " + ", ".join(
            f"{m['volume_fraction']:+.3f} ({m['count']} modes, down to {m['most_negative_THz']:.3f} THz at q = "
            f"{np.round(m['q'], 4).tolist()})" for m in imaginary) + ": their free energies leave out those modes; "
            "the QHA is not reliable there (dynamically unstable for this model, or a supercell too small)")
    mono = check_free_energy_monotonic(vols, temperatures, fe)
    if not mono["ok"]:
        ts = mono["non_monotonic_temperatures_K"]
        warnings_.append(f"the vibrational free energy is not monotonic in volume at {len(ts)} temperature(s) "
                         f"({ts[0]:g}-{ts[-1]:g} K): the model's phonons stiffen and soften again as the crystal expands; "
                         "thermal expansion, B_T(T) and the Grüneisen parameter are not trustworthy")
    jumps = find_mode_jumps(vols, mesh_q, np.array(mesh_f))
    if jumps:
        j = jumps[0]
        warnings_.append(f"{len(jumps)} phonon band(s) move back and forth between volumes (worst: band {j['band']} at "
                         f"q = {np.round(j['q'], 4).tolist()}, reversal {j['reversal_THz']:.3f} THz): mode-order jumps or "
                         "unsmooth forces; the Grüneisen parameters and thermal expansion are affected")
    if not kept_symmetry:
        warnings_.append("the space group changed between volumes; the volumes are not one phase")

    curves_by_p, gibbs_rows, files = [], [], []
    first = None
    for k, pressure in enumerate(pressures):
        q = qha_from_arrays(vols, energies, temperatures, fe, s, cv, eos=eos, pressure=pressure,
                            lattice_lengths=lengths, monoclinic_or_triclinic=low_symmetry)
        n_in, t_out = _volume_range_end(q)
        if k == 0:
            first, first_n, first_out = q, n_in, t_out
        grid_t = temperatures[:-1]
        g_row = np.full(len(grid_t), np.nan)
        if n_in:  # on the common grid (a temperature whose EOS fit failed is interpolated over)
            inside = grid_t <= q.temperatures[n_in - 1] + 1e-9
            g_row[inside] = np.interp(grid_t[inside], q.temperatures[:n_in], q.gibbs_free_energies[:n_in]) / n_prim
        gibbs_rows.append(g_row)
        curves_by_p.append({"pressure_GPa": pressure, "volume_left_range_at_K": t_out})
    q, n_in = first, first_n
    resid = _eos_residual(q)
    if first_out is not None and n_in == 0:
        warnings_.append(f"at P = {pressures[0]:g} GPa the equilibrium volume ({q.equilibrium_volumes[0]:.3f} Å^3) is outside "
                         f"the sampled range {vols.min():.3f}-{vols.max():.3f} already at {first_out:g} K: no curves at this "
                         "pressure; centre the volume grid on the volume at this pressure (G(T, P) at the other pressures "
                         "is kept where it is inside)")
    elif first_out is not None:
        warnings_.append(f"at P = {pressures[0]:g} GPa the equilibrium volume leaves the sampled range at {first_out:g} K "
                         f"(V = {q.equilibrium_volumes[n_in]:.3f} Å^3 outside {vols.min():.3f}-{vols.max():.3f}); results stop "
                         "there: widen the volume range (e.g. volumes -0.05:0.10:16)")
    late: dict[float, list[float]] = {}
    for c in curves_by_p[1:]:
        if c["volume_left_range_at_K"] is not None:
            late.setdefault(c["volume_left_range_at_K"], []).append(c["pressure_GPa"])
    if late:
        warnings_.append("the equilibrium volume leaves the sampled range at " + "; ".join(
            f"{temp:g} K for P = " + (f"{ps[0]:g} GPa" if len(ps) == 1 else f"{ps[0]:g}-{ps[-1]:g} GPa ({len(ps)} pressures)")
            for temp, ps in sorted(late.items())) + " (G(T, P) is NaN beyond)")
    if resid > POOR_FIT:
        warnings_.append(f"poor EOS fit: RMS residual up to {100 * resid:.2g} % of the free-energy range over the volumes "
                         f"({eos}); try another eos or a narrower volume range")
    for w in warnings_:
        log.warning(f"{ph_.label}: {w}")

    t = q.temperatures[:n_in]
    cp = q.heat_capacity_P.heat_capacities[:n_in] * (_ev_to_jmol())
    curves = {
        "pressure_GPa": pressures[0],
        "temperatures_K": t.tolist(),
        "volume_A3": q.equilibrium_volumes[:n_in].tolist(),
        "thermal_expansion_per_K": q.thermal_expansion[:n_in].tolist(),
        "linear_thermal_expansion_per_K": (q.thermal_expansion[:n_in] / 3.0).tolist(),
        "bulk_modulus_GPa": (q.bulk_moduli[:n_in] * _gpa()).tolist(),
        "cp_J_per_K_per_mol": cp.tolist(),
        "gruneisen": q.gruneisen_parameters[:n_in].tolist(),
        "gibbs_eV": q.gibbs_free_energies[:n_in].tolist(),
        "entropy_J_per_K_per_mol": (q.entropy_temperature[:n_in] * _ev_to_jmol()).tolist(),
        "notes": "per primitive cell; thermal_expansion is volumetric (1/V dV/dT), linear = volumetric / 3 (exact for "
                 "cubic crystals; see lattice for the axes); the first entries of thermal expansion, Cp and Grüneisen "
                 "are 0 by phonopy's finite differences",
    }
    if q.lattice is not None:
        curves["lattice_parameters_A"] = q.lattice.lattice_parameters[:n_in].tolist()
        curves["axial_thermal_expansion_per_K"] = q.lattice.axial_thermal_expansions[:n_in].tolist()
    from phonopy.qha.eos import fit_to_eos, get_eos

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        static = fit_to_eos(vols, energies, get_eos(eos))
    cells = [np.array(v.atoms.cell[:]) for v in ph_.volumes]
    ca = [float(np.linalg.norm(c[2]) / np.linalg.norm(c[0])) for c in cells]
    doc = {
        "label": ph_.label,
        "structure": {"formula": ph_.unit.get_chemical_formula(mode="hill"), "spacegroup": sg,
                      "spacegroup_number": int(sg_number), "n_atoms_unitcell": n_unit, "n_atoms_primitive": n_prim,
                      "supercell_matrix": np.asarray(ph_.smat).tolist(),
                      "n_atoms_supercell": len(ph_.volumes[0].ph.supercell), "unitcell_V0": structure_record(ph_.unit)},
        "relaxation": ph_.relax_summary,
        "volumes": [{"index": v.index, "fraction": v.fraction, "volume_primitive_A3": float(vols[v.index]),
                     "energy_primitive_eV": float(energies[v.index]), "relax_converged": v.converged,
                     "c_over_a": ca[v.index], "spacegroup": v.ph.symmetry.get_international_table(),
                     "n_displacements": len(v.supercells)} for v in ph_.volumes],
        "static": {"e0_eV_per_atom": float(static[0]) / n_prim, "b0_GPa": float(static[1]) * _gpa(),
                   "b0_prime": float(static[2]), "v0_A3_per_atom": float(static[3]) / n_prim},
        "curves": curves,
        "pressures": curves_by_p,
        "gibbs_table": {"temperatures_K": temperatures[:-1].tolist(),
                        "pressures_GPa": list(pressures),
                        "G_eV_per_atom": [[None if not np.isfinite(x) else float(x) for x in row] for row in gibbs_rows],
                        "meaning": "G(T, P) = min_V [E(V) + F_vib(V, T) + P V] per atom (eV/atom); None beyond the "
                                   "sampled volumes"},
        "mesh_numbers": mesh_numbers,
        "checks": {"imaginary_modes": imaginary, "free_energy_monotonic": mono, "mode_jumps": jumps[:20],
                   "eos_max_relative_residual": resid, "symmetry_kept": kept_symmetry},
        "warnings": warnings_,
    }
    if folder.path is not None:
        files = _write_phase_files(folder.path / ph_.label, ph_, q, n_in, vols, energies, doc, info)
    doc["files"] = files
    return doc


def _gpa() -> float:
    """eV/Å^3 -> GPa, phonopy's constant (so that our numbers are phonopy-qha's to the last digit)."""
    from phonopy.physical_units import get_physical_units

    return get_physical_units().EVAngstromToGPa


def _ev_to_jmol() -> float:
    from phonopy.physical_units import get_physical_units

    return get_physical_units().EvTokJmol * 1000.0


def _truncated(q, n: int):
    """phonopy's QHAResult limited to its first ``n`` temperatures (for its file writers)."""
    import dataclasses

    from phonopy.qha.qha import QHACpPolyfitData

    cp = q.heat_capacity_P
    m = max(n - 1, 0)
    cp_n = QHACpPolyfitData(heat_capacities=cp.heat_capacities[:n], dsdv=cp.dsdv[:n],
                            volume_cv_parameters=cp.volume_cv_parameters[:m],
                            volume_entropy_parameters=cp.volume_entropy_parameters[:m],
                            volume_cv=cp.volume_cv[:m], volume_entropy=cp.volume_entropy[:m])
    lat = q.lattice
    if lat is not None:
        lat = dataclasses.replace(lat, lattice_parameters=lat.lattice_parameters[:n],
                                  axial_thermal_expansions=lat.axial_thermal_expansions[:n])
    return dataclasses.replace(
        q, temperatures=q.temperatures[:n], helmholtz_volume=q.helmholtz_volume[:n], eos_parameters=q.eos_parameters[:n],
        equilibrium_volumes=q.equilibrium_volumes[:n], gibbs_free_energies=q.gibbs_free_energies[:n],
        entropy_temperature=q.entropy_temperature[:n], enthalpy_temperature=q.enthalpy_temperature[:n],
        bulk_moduli=q.bulk_moduli[:n], thermal_expansion=q.thermal_expansion[:n],
        gruneisen_parameters=q.gruneisen_parameters[:n], heat_capacity_P=cp_n, lattice=lat)


def _write_phase_files(path: Path, ph_: _Phase, q, n_in: int, vols, energies, doc, info) -> list[str]:
    import ase.io
    from phonopy.qha import output

    from mattersim.io import atomic_path

    names = []

    def write(name, writer):
        with atomic_path(path / name) as tmp:
            writer(tmp)
        names.append(name)

    write("e-v.dat", lambda p: Path(p).write_text(
        "#   cell volume (Å^3)   energy of cell other than phonon (eV); primitive cell, "
        f"{info.get('name')}\n" + "".join(f"{v:20.10f} {e:20.10f}\n" for v, e in zip(vols, energies))))
    for v in ph_.volumes:
        write(f"thermal_properties.yaml-{v.index:02d}", lambda p, v=v: v.ph.write_yaml_thermal_properties(filename=p))
        write(f"POSCAR-{v.index:02d}", lambda p, v=v: ase.io.write(p, v.atoms, format="vasp", direct=True))
    qt = _truncated(q, n_in)
    for name, fn in (("helmholtz-volume.dat", output.write_helmholtz_volume),
                     ("volume-temperature.dat", output.write_volume_temperature),
                     ("thermal_expansion.dat", output.write_thermal_expansion),
                     ("gibbs-temperature.dat", output.write_gibbs_temperature),
                     ("bulk_modulus-temperature.dat", output.write_bulk_modulus_temperature),
                     ("gruneisen-temperature.dat", output.write_gruneisen_temperature)):
        write(name, lambda p, fn=fn: fn(qt, filename=p))
    # phonopy's C_P writer writes three more files, by default into the working directory: all four go to a
    # scratch folder inside the phase folder first, then each into place (atomically)
    import tempfile

    extra = {"filename": "Cp-temperature_polyfit.dat", "filename_ev": "entropy-volume.dat",
             "filename_cvv": "Cv-volume.dat", "filename_dsdvt": "dsdv-temperature.dat"}
    with tempfile.TemporaryDirectory(dir=path, prefix=".cp-") as scratch:
        output.write_heat_capacity_P(qt, **{k: os.path.join(scratch, v) for k, v in extra.items()})
        for v in extra.values():
            os.replace(os.path.join(scratch, v), path / v)
            names.append(v)
    write("qha.png", lambda p: _plot_phase(p, doc, q, n_in, info))
    return names + [_RELAX_STORE] + [f"V-{v.index:02d}/{_FORCES_STORE}" for v in ph_.volumes]


# ---------------------------------------------------------------------------------------------------------
# phase boundaries and plots
# ---------------------------------------------------------------------------------------------------------


def _composition(atoms: Atoms) -> tuple:
    from math import gcd
    from functools import reduce

    symbols, counts = np.unique(atoms.get_chemical_symbols(), return_counts=True)
    g = reduce(gcd, [int(c) for c in counts])
    return tuple((str(sym), int(c) // g) for sym, c in zip(symbols, counts))


def _boundaries(phases: list[_Phase], summaries: list[dict], eos: str, log) -> list[dict]:
    out = []
    for i in range(len(phases)):
        for j in range(i + 1, len(phases)):
            if _composition(phases[i].unit) != _composition(phases[j].unit):
                continue
            a, b = summaries[i], summaries[j]
            t = np.array(a["gibbs_table"]["temperatures_K"], dtype=float)
            p = np.array(a["gibbs_table"]["pressures_GPa"], dtype=float)
            ga = np.array([[np.nan if x is None else x for x in r] for r in a["gibbs_table"]["G_eV_per_atom"]])
            gb = np.array([[np.nan if x is None else x for x in r] for r in b["gibbs_table"]["G_eV_per_atom"]])
            p_t = phase_boundary(t, p, ga, gb) if len(p) > 1 else np.full(len(t), np.nan)
            va = [v["volume_primitive_A3"] for v in a["volumes"]]
            ea = [v["energy_primitive_eV"] for v in a["volumes"]]
            vb = [v["volume_primitive_A3"] for v in b["volumes"]]
            eb = [v["energy_primitive_eV"] for v in b["volumes"]]
            static = static_transition_pressure(va, ea, a["structure"]["n_atoms_primitive"], vb, eb,
                                                b["structure"]["n_atoms_primitive"], eos)
            ok = np.isfinite(p_t)
            slope = float(np.polyfit(t[ok], p_t[ok], 1)[0]) if ok.sum() >= 3 else None
            doc = {"phases": [a["label"], b["label"]], "temperatures_K": t.tolist(),
                   "pressure_GPa": [None if not np.isfinite(x) else float(x) for x in p_t],
                   "first_temperature_K": float(t[0]), "first_pressure_GPa": None if not ok[0] else float(p_t[0]),
                   "static_transition_pressure_GPa": static, "slope_GPa_per_K": slope,
                   "meaning": f"P(T) where G_{b['label']} = G_{a['label']} per atom (linear interpolation between the "
                              "pressures given; None where they do not cross in that range); static: 0 K enthalpies of "
                              "the static lattice, no zero-point energy; slope: straight-line fit of P(T), GPa/K"}
            if len(p) < 2:
                log.warning(f"phase boundary {a['label']} / {b['label']}: give two or more pressures (e.g. pressures "
                            "0:600:50) that bracket the transition to get P(T)")
            elif not ok.any():
                log.warning(f"phase boundary {a['label']} / {b['label']}: G(T, P) do not cross between {p[0]:g} and "
                            f"{p[-1]:g} GPa" + (f" (the static transition is at {static:.1f} GPa)" if static is not None else ""))
            out.append(doc)
    return out


def _plot_phase(path, doc, q, n_in, info) -> None:
    from phonopy.qha.eos import get_eos

    c = doc["curves"]
    t = np.array(c["temperatures_K"])

    def draw(axs):
        ax = axs[0, 0]
        func = get_eos(q.eos_name)
        vv = np.linspace(q.volumes.min(), q.volumes.max(), 200)
        for k in np.unique(np.linspace(0, max(n_in - 1, 0), 6).astype(int)):
            line = ax.plot(vv, func(vv, q.eos_parameters[k]), "-", lw=1, label=f"{q.temperatures[k]:g} K")[0]
            ax.plot(q.volumes, q.helmholtz_volume[k], "o", ms=3, color=line.get_color())
        ax.plot(q.equilibrium_volumes[:n_in], q.gibbs_free_energies[:n_in], "k--", lw=1, label="minima")
        ax.set_xlabel("V (Å$^3$, primitive cell)"), ax.set_ylabel("F (eV)"), ax.legend(fontsize=7)
        for ax, key, label in ((axs[0, 1], "volume_A3", "V (Å$^3$)"),
                               (axs[0, 2], "thermal_expansion_per_K", r"$\alpha_V$ (1/K)"),
                               (axs[1, 0], "bulk_modulus_GPa", r"$B_T$ (GPa)"),
                               (axs[1, 1], "cp_J_per_K_per_mol", r"$C_P$ (J/K/mol)"),
                               (axs[1, 2], "gruneisen", r"Grüneisen $\gamma$")):
            ax.plot(t, c[key], "-")
            ax.set_xlabel("T (K)"), ax.set_ylabel(label)

    figure(path, f"{doc['label']} ({doc['structure']['formula']}, {doc['structure']['spacegroup']}), "
                  f"{info.get('name') or 'model'}, QHA at P = {c['pressure_GPa']:g} GPa", draw,
            shape=(2, 3), figsize=(13, 7.5))


def _plot_gibbs(path, summaries, info) -> None:
    def draw(ax):
        for s in summaries:
            t = np.array(s["gibbs_table"]["temperatures_K"])
            for p, row in zip(s["gibbs_table"]["pressures_GPa"], s["gibbs_table"]["G_eV_per_atom"]):
                ax.plot(t, [np.nan if x is None else x for x in row], label=f"{s['label']}, {p:g} GPa")
        ax.set_xlabel("T (K)"), ax.set_ylabel("G (eV/atom)")
        ax.legend(fontsize=7)

    figure(path, f"Gibbs free energy, {info.get('name') or 'model'}", draw)


def _plot_boundaries(path, boundaries, info) -> None:
    def draw(ax):
        for b in boundaries:
            p = [np.nan if x is None else x for x in b["pressure_GPa"]]
            line = ax.plot(p, b["temperatures_K"], label=f"{b['phases'][0]} / {b['phases'][1]} (QHA)")[0]
            if b["static_transition_pressure_GPa"] is not None:
                ax.plot([b["static_transition_pressure_GPa"]], [0], "s", color=line.get_color(), label="static, 0 K")
        ax.set_xlabel("P (GPa)"), ax.set_ylabel("T (K)")
        ax.legend(fontsize=8)

    figure(path, f"Phase boundary, {info.get('name') or 'model'}", draw)
