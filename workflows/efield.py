"""Electric fields in MD: field schedules, field forces from Born charges, polarization, P-E loops.

The electric enthalpy of a crystal in a field E, to first order in the ionic displacements, adds to every
atom k the force

    F_k = F_k^0 + e Z*_k^T E,      (F_k)_j += sum_i Z*_k[i, j] E_i

with the Born effective charges Z*_k in phonopy's convention (``born[k, i, j]``: first index the field /
polarization direction, second the displacement direction; :mod:`workflows.nac`). With E in V/Å and Z* in
e, ``Z*^T E`` is a force in eV/Å. The polarization changes along a trajectory by

    dP_i = (1/V) sum_k Z*_k[i, j] dr_k,j       (e/Å², x 1602.18 -> μC/cm²)

accumulated step by step with unwrapped displacements (fractional steps taken to the nearest image and
multiplied by the current cell, so that a changing cell in NPT does not count as ionic displacement).

**Predicted Z* are not the derivative of any energy.** The field forces are then not conservative; nothing
here pretends otherwise: the potential energy is the model's, without a field term, and the work done by
the field, W = sum over steps of (F_field(old) + F_field(new))/2 . dr, is tracked beside it. For a static
field and fixed Z*, W = sum_k e (Z*_k^T E) . (r_k - r_k0) exactly, and E_kin + E_pot - W is conserved in
NVE. The field does not change the stress.

Units: fields in V/Å internally (1 V/Å = 100 MV/cm; schedules accept ``MV/cm``, ``kV/cm``, ``V/A``); times
in fs (schedules accept ``fs``, ``ps``, ``ns``); polarization in μC/cm² in every output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from mattersim.errors import InputError
from mattersim.settings import TIME_UNITS_FS, parse_quantity

__all__ = [
    "E_PER_A2_TO_UC_PER_CM2",
    "FieldCalculator",
    "FieldSchedule",
    "PerovskiteCells",
    "PolarizationTracker",
    "parse_field",
    "pe_loop",
    "polarization_change",
    "reference_in_supercell",
    "supercell_charges",
    "supercell_map",
]

#: e/Å² -> μC/cm² (1.602176634e-19 C / 1e-16 cm² = 1602.18 μC/cm²)
E_PER_A2_TO_UC_PER_CM2 = 1602.176634
#: field units -> V/Å
FIELD_UNITS = {"v/a": 1.0, "v/å": 1.0, "v/ang": 1.0, "mv/cm": 0.01, "kv/cm": 1e-5}
_AXES = {"x": (1.0, 0.0, 0.0), "y": (0.0, 1.0, 0.0), "z": (0.0, 0.0, 1.0)}
SCHEDULE_HELP = ("const:E=0.5MV/cm,axis=z | sin:Emax=4MV/cm,period=200ps,axis=z (E = Emax cos(2 pi t/T)) | "
                 "tri:Emax=4MV/cm,period=200ps,axis=z | steps:E=0;1;2;1;0 MV/cm,duration=10ps,axis=z; "
                 "axis x, y, z or three numbers ('1 1 0'); units MV/cm, kV/cm or V/A; times fs, ps or ns")


# --------------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSchedule:
    """E(t) along a fixed unit vector ``axis``; amplitudes in V/Å, times in fs.

    ``kind``: ``const`` (E = amplitude), ``sin`` (E = amplitude cos(2 pi t / period)), ``tri`` (a triangle
    wave with the phase of the cosine: +amplitude at t = 0, -amplitude at period/2), ``steps`` (``values``
    each held for ``duration``, the last one afterwards). ``unit``: the unit the user gave, for display.
    """

    kind: str
    axis: tuple[float, float, float]
    amplitude: float = 0.0
    period: float | None = None
    values: tuple[float, ...] = ()
    duration: float | None = None
    unit: str = "MV/cm"
    text: str = ""

    @property
    def periodic(self) -> bool:
        return self.kind in ("sin", "tri")

    def magnitude(self, t: float | np.ndarray) -> np.ndarray:
        """The signed field along ``axis`` at time(s) ``t`` (fs), V/Å."""
        t = np.asarray(t, dtype=float)
        if self.kind == "const":
            return np.full(t.shape, self.amplitude)
        if self.kind == "sin":
            return self.amplitude * np.cos(2.0 * np.pi * t / self.period)
        if self.kind == "tri":
            phase = np.mod(t / self.period, 1.0)
            return self.amplitude * np.where(phase <= 0.5, 1.0 - 4.0 * phase, 4.0 * phase - 3.0)
        index = np.minimum((t // self.duration).astype(int), len(self.values) - 1)
        return np.asarray(self.values)[np.maximum(index, 0)]

    def field(self, t: float) -> np.ndarray:
        """The field vector (3,) at time ``t`` (fs), V/Å."""
        return float(self.magnitude(t)) * np.asarray(self.axis)

    @property
    def zero(self) -> bool:
        return self.amplitude == 0.0 and not any(self.values)

    def to_dict(self) -> dict[str, Any]:
        scale = FIELD_UNITS[self.unit.lower()]
        doc = {"schedule": self.text, "kind": self.kind, "axis": list(self.axis), "unit": self.unit,
               "amplitude_V_per_A": self.amplitude, f"amplitude_{_unit_key(self.unit)}": self.amplitude / scale}
        if self.period is not None:
            doc["period_fs"] = self.period
        if self.kind == "steps":
            doc.update(values_V_per_A=list(self.values), duration_fs=self.duration)
        return doc


def _unit_key(unit: str) -> str:
    return unit.replace("/", "_per_").replace("Å", "A")


def _quantity(text: str, units: dict[str, float], what: str, spec: str) -> tuple[float, str]:
    return parse_quantity(text, units, f"--efield {spec!r}: {what}", "4MV/cm" if units is FIELD_UNITS else "200ps")


def _axis(text: str, spec: str) -> tuple[float, float, float]:
    text = text.strip().lower()
    if text in _AXES:
        return _AXES[text]
    try:
        vec = np.array([float(x) for x in re.split(r"[\s/]+", text) if x], dtype=float)
    except ValueError:
        vec = np.zeros(0)
    if vec.shape != (3,) or not np.linalg.norm(vec) > 0:
        raise InputError(f"--efield {spec!r}: axis={text!r} must be x, y, z or three numbers such as '1 1 0'.")
    return tuple(float(x) for x in vec / np.linalg.norm(vec))


def parse_field(spec: "str | FieldSchedule | None") -> FieldSchedule | None:
    """A :class:`FieldSchedule` from the CLI's ``--efield`` text (see :data:`SCHEDULE_HELP`); None stays None."""
    if spec is None or isinstance(spec, FieldSchedule):
        return spec
    text = str(spec).strip()
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    aliases = {"constant": "const", "static": "const", "sine": "sin", "cos": "sin", "triangle": "tri", "step": "steps"}
    kind = aliases.get(kind, kind)
    if kind not in ("const", "sin", "tri", "steps") or not rest:
        raise InputError(f"--efield {text!r} is not a field schedule; give one of: {SCHEDULE_HELP}.")
    args: dict[str, str] = {}
    for part in rest.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise InputError(f"--efield {text!r}: {part!r} is not key=value; give one of: {SCHEDULE_HELP}.")
        args[key.strip().lower()] = value.strip()
    needed = {"const": {"e", "axis"}, "sin": {"emax", "period", "axis"}, "tri": {"emax", "period", "axis"},
              "steps": {"e", "duration", "axis"}}[kind]
    missing, unknown = needed - set(args), set(args) - needed
    if missing or unknown:
        raise InputError(f"--efield {text!r}: {kind} takes {', '.join(sorted(needed))}"
                         + (f"; missing {', '.join(sorted(missing))}" if missing else "")
                         + (f"; unknown {', '.join(sorted(unknown))}" if unknown else "") + ".")
    axis = _axis(args["axis"], text)
    if kind == "steps":
        m = re.fullmatch(r"\s*(.*?)\s*([A-Za-zÅ/]+)\s*", args["e"])
        unit = m.group(2) if m else ""
        if unit.lower() not in FIELD_UNITS:
            raise InputError(f"--efield {text!r}: E={args['e']!r} needs values separated by ';' and a unit, "
                             "e.g. E=0;1;2;1;0 MV/cm.")
        try:
            values = tuple(float(v) * FIELD_UNITS[unit.lower()] for v in m.group(1).split(";") if v.strip())
        except ValueError:
            raise InputError(f"--efield {text!r}: E={args['e']!r} must be numbers separated by ';' and a unit, "
                             "e.g. E=0;1;2;1;0 MV/cm.") from None
        if not values:
            raise InputError(f"--efield {text!r}: E= has no values.")
        duration, _ = _quantity(args["duration"], TIME_UNITS_FS, "duration", text)
        if duration <= 0:
            raise InputError(f"--efield {text!r}: duration must be positive.")
        return FieldSchedule("steps", axis, max(abs(v) for v in values), values=values, duration=duration,
                             unit=unit, text=text)
    amplitude, unit = _quantity(args["e" if kind == "const" else "emax"], FIELD_UNITS, "the field", text)
    period = None
    if kind != "const":
        period, _ = _quantity(args["period"], TIME_UNITS_FS, "period", text)
        if period <= 0:
            raise InputError(f"--efield {text!r}: period must be positive.")
    return FieldSchedule(kind, axis, amplitude, period=period, unit=unit, text=text)


# --------------------------------------------------------------------------------------------------
# charges of the simulated cell
# --------------------------------------------------------------------------------------------------


def supercell_charges(unit: Atoms, born: np.ndarray, cell: Atoms, *, tol: float = 1e-3) -> np.ndarray:
    """Z* (n_cell, 3, 3) of every atom of ``cell`` (a supercell of ``unit``) from ``born`` (n_unit, 3, 3),
    matching atoms by their fractional position in ``unit``'s lattice (any supercell ordering)."""
    born = np.asarray(born, dtype=float)
    if born.shape != (len(unit), 3, 3):
        raise InputError(f"Born charges have shape {born.shape}; the unit cell has {len(unit)} atoms, so (n, 3, 3) "
                         f"with n = {len(unit)} is needed.")
    return born[supercell_map(unit, cell, tol=tol)]


def supercell_map(unit: Atoms, cell: Atoms, *, tol: float = 1e-3) -> np.ndarray:
    """For every atom of ``cell`` (a supercell of ``unit``), the index of the atom of ``unit`` it repeats."""
    inv = np.linalg.inv(unit.cell.array)
    frac_unit = unit.get_scaled_positions(wrap=True)
    frac = cell.positions @ inv
    delta = frac[:, None, :] - frac_unit[None, :, :]
    delta -= np.round(delta)
    dist = np.linalg.norm(delta @ unit.cell.array, axis=2)
    match = np.argmin(dist, axis=1)
    if np.any(dist[np.arange(len(cell)), match] > tol) or np.any(
            np.asarray(cell.numbers) != np.asarray(unit.numbers)[match]):
        raise InputError("The simulated cell is not a supercell of the cell the Born charges were given for; give "
                         "the BORN file of the input structure (the cell before --supercell).")
    return match


def reference_in_supercell(unit: Atoms, reference: Atoms, cell: Atoms) -> Atoms:
    """``reference`` (same atoms as ``unit``) repeated like ``cell`` (a supercell of ``unit``), each atom at
    the image nearest its partner in ``cell``: the fractional displacement of every atom from its reference,
    taken to the nearest image of ``unit``, is the same in every repeat (``make_supercell`` alone may wrap an
    atom of the reference into another repeat than its partner)."""
    d = reference.get_scaled_positions(wrap=False) - unit.get_scaled_positions(wrap=False)
    d -= np.round(d)
    out = cell.copy()
    out.calc = None
    out.positions = cell.positions + (d @ unit.cell.array)[supercell_map(unit, cell)]
    return out


# --------------------------------------------------------------------------------------------------
# the field calculator
# --------------------------------------------------------------------------------------------------


class FieldCalculator(Calculator):
    """``base`` (any ASE calculator) plus the field forces e Z*^T E(t) (see the module doc).

    ``charges``: fixed Z* of the simulated cell (n, 3, 3), or a predictor with ``predict_dielectric(atoms)``
    (:func:`workflows.nac.find_predictor`), evaluated at the current positions every ``born_every`` steps
    (taken from the base calculator's own results when it gives Z* with the forces, as a multi-task model
    does, at no extra cost).
    The MD loop sets :attr:`step` and :attr:`time` (fs) with :meth:`set_time` before each step; Z* are
    recomputed in the first evaluation at a step at least ``born_every`` after the last one. ``energy`` is
    the base model's (no field term: predicted Z* are not the derivative of an energy); ``field_forces``
    (n, 3), ``born_effective_charges`` (n, 3, 3) and ``field`` (3,) V/Å are in :attr:`results`.
    """

    def __init__(self, base, schedule: FieldSchedule, charges, *, born_every: int = 10, **kwargs):
        super().__init__(**kwargs)
        if born_every < 1:
            raise InputError(f"born_every = {born_every}: Z* must be recomputed every 1 or more steps.")
        self.base = base
        self.schedule = schedule
        self.born_every = int(born_every)
        self.predictor = None if isinstance(charges, np.ndarray) else charges
        self.born: np.ndarray | None = None if self.predictor is not None else np.asarray(charges, dtype=float)
        self.born_step: int | None = None if self.predictor is not None else 0
        self.born_evaluations = 0
        self.step, self.time = 0, 0.0
        props = list(getattr(base, "implemented_properties", None) or ("energy", "forces", "stress"))
        self.implemented_properties = list(dict.fromkeys([*props, "born_effective_charges", "field_forces"]))
        self.model_info = getattr(base, "model_info", None)

    def set_time(self, step: int, time_fs: float) -> None:
        """The MD step and time (fs) of the next evaluation (cached results stay valid)."""
        self.step, self.time = int(step), float(time_fs)

    def _charges(self, atoms: Atoms, base_results: dict) -> np.ndarray:
        if self.predictor is not None and (self.born is None or self.step - self.born_step >= self.born_every):
            free = base_results.get("born_effective_charges")  # a multi-task model gives Z* with the forces
            if free is not None and np.shape(free) == (len(atoms), 3, 3):
                born = np.asarray(free, dtype=float)
            else:
                born, _ = self.predictor.predict_dielectric(atoms)
            born = np.asarray(born, dtype=float).reshape(len(atoms), 3, 3)
            self.born, self.born_step = born, self.step
            self.born_evaluations += 1
        return self.born

    def calculate(self, atoms: Atoms | None = None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        wanted = [p for p in (properties or ["energy"]) if p not in ("born_effective_charges", "field_forces")]
        if "forces" not in wanted:
            wanted.append("forces")
        for prop in wanted:  # the base calculator caches its own results
            self.base.get_property(prop, self.atoms)
        results = {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v) for k, v in self.base.results.items()}
        born = self._charges(self.atoms, results)
        efield = self.schedule.field(self.time)
        extra = np.einsum("kij,i->kj", born, efield)
        results["forces"] = np.asarray(results["forces"], dtype=float) + extra
        results.update(field_forces=extra, born_effective_charges=born.copy(), field=efield)
        self.results = results


# --------------------------------------------------------------------------------------------------
# polarization
# --------------------------------------------------------------------------------------------------


def _unwrap_to(frac: np.ndarray, near: np.ndarray) -> np.ndarray:
    """``frac`` shifted by lattice vectors to the image nearest ``near`` (fractional coordinates)."""
    return frac - np.round(frac - near)


def polarization_change(atoms: Atoms, reference: Atoms, born: np.ndarray, born_reference: np.ndarray | None = None
                        ) -> np.ndarray:
    """P(atoms) - P(reference) in μC/cm², (1/V) sum_k Z*_k (r_k - r_k^ref) with the nearest images, Z* the
    mean of ``born`` and ``born_reference`` (the trapezoid rule of the path integral) and V of ``atoms``.

    The usual estimate of the spontaneous polarization of a ferroelectric from its centrosymmetric reference.
    """
    if len(atoms) != len(reference) or np.any(atoms.numbers != reference.numbers):
        raise InputError("The reference structure must have the same atoms in the same order as the structure.")
    s = atoms.get_scaled_positions(wrap=False)
    ref = _unwrap_to(reference.get_scaled_positions(wrap=False), s)
    u = (s - ref) @ atoms.cell.array
    z = np.asarray(born, dtype=float)
    if born_reference is not None:
        z = 0.5 * (z + np.asarray(born_reference, dtype=float))
    return np.einsum("kij,kj->i", z, u) / atoms.get_volume() * E_PER_A2_TO_UC_PER_CM2


@dataclass
class PolarizationTracker:
    """Step-by-step accounting of the polarization change and of the field's work along a trajectory.

    ``advance(atoms, born, field_forces)`` after every MD step: the fractional step is taken to the
    nearest image, ``dr = ds @ cell``, ``dP += (1/V) sum_k Zbar_k dr_k`` with Zbar the mean of the Z* before
    and after the step, ``W += sum_k (F_old + F_new)/2 . dr_k``. :attr:`displacement` is the unwrapped
    displacement of every atom from the start (or from ``reference``) in the current cell.
    """

    frac: np.ndarray               # unwrapped fractional positions now
    frac_reference: np.ndarray     # the reference (the start, or a given reference structure) near frac
    born: np.ndarray
    field_forces: np.ndarray
    polarization: np.ndarray = field(default_factory=lambda: np.zeros(3))  # e/Å²
    work: float = 0.0              # eV

    @classmethod
    def start(cls, atoms: Atoms, born: np.ndarray, field_forces: np.ndarray, reference: Atoms | None = None,
              born_reference: np.ndarray | None = None) -> "PolarizationTracker":
        s = atoms.get_scaled_positions(wrap=False)
        tracker = cls(s.copy(), s.copy(), np.asarray(born, dtype=float).copy(), np.asarray(field_forces).copy())
        if reference is not None:
            tracker.frac_reference = _unwrap_to(reference.get_scaled_positions(wrap=False), s)
            tracker.polarization = polarization_change(atoms, reference, born, born_reference) / E_PER_A2_TO_UC_PER_CM2
        return tracker

    def advance(self, atoms: Atoms, born: np.ndarray, field_forces: np.ndarray) -> None:
        s_new = atoms.get_scaled_positions(wrap=False)
        ds = s_new - self.frac
        ds -= np.round(ds)
        dr = ds @ atoms.cell.array
        zbar = 0.5 * (self.born + born)
        self.polarization = self.polarization + np.einsum("kij,kj->i", zbar, dr) / atoms.get_volume()
        self.work += float(np.sum(0.5 * (self.field_forces + field_forces) * dr))
        self.frac = self.frac + ds
        self.born, self.field_forces = np.asarray(born, dtype=float).copy(), np.asarray(field_forces).copy()

    def displacement(self, cell: np.ndarray) -> np.ndarray:
        return (self.frac - self.frac_reference) @ np.asarray(cell)

    @property
    def polarization_uC_cm2(self) -> np.ndarray:
        return self.polarization * E_PER_A2_TO_UC_PER_CM2

    def state(self) -> dict[str, np.ndarray]:
        return {"pol_frac": self.frac, "pol_frac_reference": self.frac_reference, "pol_born": self.born,
                "pol_field_forces": self.field_forces, "pol_polarization": self.polarization,
                "pol_work": np.array(self.work)}

    @classmethod
    def from_state(cls, arrays: dict) -> "PolarizationTracker":
        return cls(np.array(arrays["pol_frac"]), np.array(arrays["pol_frac_reference"]), np.array(arrays["pol_born"]),
                   np.array(arrays["pol_field_forces"]), np.array(arrays["pol_polarization"]),
                   float(arrays["pol_work"]))


class PerovskiteCells:
    """The unit cells of an ABO3 perovskite supercell, for local polarization maps.

    Each cell is centred on a B atom with its 6 nearest O and 8 nearest A (found in ``reference``); its
    polarization is

        P_b = (1 / V_cell) [Z*_B u_B + 1/2 sum_6 Z*_O u_O + 1/8 sum_8 Z*_A u_A],   V_cell = V / N_B,

    with u the displacements from the reference. Every O belongs to two cells and every A to eight, so the
    mean of P_b over the cells is the global (1/V) sum_k Z*_k u_k.
    """

    def __init__(self, reference: Atoms):
        symbols = np.array(reference.get_chemical_symbols())
        cations = sorted(set(symbols) - {"O"})
        counts = {s: int(np.sum(symbols == s)) for s in set(symbols)}
        n_o = counts.get("O", 0)
        if len(cations) != 2 or n_o == 0 or any(3 * counts[c] != n_o for c in cations):
            raise InputError(f"Local polarization maps need an ABO3 perovskite; {reference.get_chemical_formula()} "
                             "is not one (two cations in equal numbers and three O per formula unit).")
        from ase.neighborlist import neighbor_list

        a_pc = (reference.get_volume() / counts[cations[0]]) ** (1 / 3)
        i, j, d = neighbor_list("ijd", reference, 1.1 * np.sqrt(3) / 2 * a_pc)
        o_index = np.flatnonzero(symbols == "O")
        mean_o = {}
        for c in cations:  # B: the cation nearer to its O neighbours
            idx = np.flatnonzero(symbols == c)
            mean_o[c] = np.mean([np.sort(d[(i == k) & (symbols[j] == "O")])[:6].mean() for k in idx])
        b_sym, a_sym = sorted(cations, key=lambda c: mean_o[c])
        self.b_index = np.flatnonzero(symbols == b_sym)
        o_nb, a_nb = [], []
        for k in self.b_index:
            sel = i == k
            jj, dd = j[sel], d[sel]
            o = jj[symbols[jj] == "O"][np.argsort(dd[symbols[jj] == "O"])][:6]
            a = jj[symbols[jj] == a_sym][np.argsort(dd[symbols[jj] == a_sym])][:8]
            if len(o) != 6 or len(a) != 8:
                raise InputError(f"Local polarization maps: the {b_sym} atom {k} has {len(o)} O and {len(a)} "
                                 f"{a_sym} neighbours in the reference, not 6 and 8; the structure is not a perovskite "
                                 "supercell (give a reference structure close to the ideal perovskite).")
            o_nb.append(np.sort(o)), a_nb.append(np.sort(a))  # one summation order, whatever the distances
        self.o_neighbours, self.a_neighbours = np.array(o_nb), np.array(a_nb)
        shared_o = np.bincount(self.o_neighbours.ravel(), minlength=len(reference))[o_index]
        shared_a = np.bincount(self.a_neighbours.ravel(), minlength=len(reference))[symbols == a_sym]
        if np.any(shared_o != 2) or np.any(shared_a != 8):
            raise InputError("Local polarization maps: the cells found in the reference do not share every O between "
                             "two B and every A between eight B; use a supercell of the perovskite (at least 2x2x2 "
                             "of the 5-atom cell) close to its ideal structure.")
        self.a_symbol, self.b_symbol = a_sym, b_sym

    def local(self, displacement: np.ndarray, born: np.ndarray, volume: float) -> np.ndarray:
        """(N_B, 3) local polarizations in μC/cm² from displacements (n, 3) Å and Z* (n, 3, 3)."""
        zu = np.einsum("kij,kj->ki", np.asarray(born), np.asarray(displacement))
        cells = zu[self.b_index] + 0.5 * zu[self.o_neighbours].sum(axis=1) + 0.125 * zu[self.a_neighbours].sum(axis=1)
        return cells * len(self.b_index) / volume * E_PER_A2_TO_UC_PER_CM2


# --------------------------------------------------------------------------------------------------
# P-E loops
# --------------------------------------------------------------------------------------------------


def _crossing(x: np.ndarray, y: np.ndarray) -> float | None:
    """x where y first changes sign (linear interpolation), or None."""
    sign = np.sign(y)
    for k in range(len(y) - 1):
        if sign[k] == 0:
            return float(x[k])
        if sign[k] * sign[k + 1] < 0:
            return float(x[k] - y[k] * (x[k + 1] - x[k]) / (y[k + 1] - y[k]))
    return None


def _branch_points(field: np.ndarray, pol: np.ndarray) -> dict[str, float | None]:
    """Coercive fields and remanent polarizations of one loop sampled on phase bins over one period
    (cosine phase: the descending branch first)."""
    n = len(field)
    dE = np.gradient(field)
    out: dict[str, float | None] = {}
    for name, mask in (("descending", dE < 0), ("ascending", dE > 0)):
        idx = np.flatnonzero(mask)
        if len(idx) < 2:
            out.update({f"coercive_{name}": None, f"remanent_{name}": None})
            continue
        starts = [k for k in idx if not mask[(k - 1) % n]]  # the branch as one run along the period
        k, order = (starts[0] if starts else idx[0]), []
        while mask[k % n] and len(order) < n:
            order.append(k % n)
            k += 1
        out[f"coercive_{name}"] = _crossing(field[order], pol[order])
        out[f"remanent_{name}"] = _crossing(pol[order], field[order])
    return out


def pe_loop(time_fs: np.ndarray, polarization: np.ndarray, schedule: FieldSchedule, *, bins: int = 100,
            skip_cycles: int = 0) -> dict[str, Any] | None:
    """The P-E loop of a periodic schedule averaged over its complete cycles.

    ``polarization``: the component along the field axis (μC/cm²) at ``time_fs``. The samples of every
    complete cycle (after ``skip_cycles``) are interpolated onto ``bins`` phase points; the loop is their
    mean with the standard deviation over cycles as its spread. Coercive fields: E where P crosses zero on
    the descending (E falling) and ascending branches; remanent polarizations: P where E crosses zero on
    each. ``asymmetry``: |E_c(asc) + E_c(desc)| / mean |E_c| (0 for a symmetric loop), the same for P_r.
    Fields in the user's unit and V/Å. None for a non-periodic schedule or fewer than one complete cycle.
    """
    if not schedule.periodic:
        return None
    t = np.asarray(time_fs, dtype=float)
    p = np.asarray(polarization, dtype=float)
    period = schedule.period
    n_cycles = int(np.floor(t[-1] / period + 1e-9)) if len(t) else 0
    cycles = list(range(skip_cycles, n_cycles))
    if not cycles:
        return None
    phase = (np.arange(bins) + 0.5) / bins
    field_bins = schedule.magnitude(phase * period)
    per_cycle, used = [], []
    for c in cycles:
        sel = (t >= c * period - 1e-9) & (t <= (c + 1) * period + 1e-9)
        if sel.sum() < 4:
            continue
        per_cycle.append(np.interp(c * period + phase * period, t[sel], p[sel]))
        used.append(c)
    if not per_cycle:
        return None
    loops = np.array(per_cycle)
    mean, spread = loops.mean(axis=0), loops.std(axis=0)
    scale = FIELD_UNITS[schedule.unit.lower()]
    points = _branch_points(field_bins, mean)
    per = [_branch_points(field_bins, row) for row in loops]

    def shown(field):  # V/Å -> the user's unit
        return None if field is None else field / scale

    def asym(a, b):
        if a is None or b is None or abs(a) + abs(b) == 0:
            return None
        return abs(a + b) / ((abs(a) + abs(b)) / 2)

    unit = schedule.unit
    doc = {
        "cycles_used": used,
        "unit_field": unit,
        "unit_polarization": "uC/cm^2",
        "phase": phase.tolist(),
        "field": (field_bins / scale).tolist(),
        "polarization_mean": mean.tolist(),
        "polarization_std": spread.tolist(),
        "coercive_field_descending": shown(points["coercive_descending"]),
        "coercive_field_ascending": shown(points["coercive_ascending"]),
        "remanent_polarization_descending": points["remanent_descending"],
        "remanent_polarization_ascending": points["remanent_ascending"],
        "coercive_field_per_cycle": [[shown(q["coercive_descending"]), shown(q["coercive_ascending"])] for q in per],
        "remanent_polarization_per_cycle": [[q["remanent_descending"], q["remanent_ascending"]] for q in per],
    }
    doc["coercive_asymmetry"] = asym(doc["coercive_field_descending"], doc["coercive_field_ascending"])
    doc["remanent_asymmetry"] = asym(doc["remanent_polarization_descending"], doc["remanent_polarization_ascending"])
    ecs = [abs(x) for x in (doc["coercive_field_descending"], doc["coercive_field_ascending"]) if x is not None]
    doc["coercive_field_mean"] = float(np.mean(ecs)) if ecs else None
    doc["switched"] = len(ecs) == 2
    return doc

