"""Non-analytical term correction (LO-TO splitting) for the phonon workflow.

Force constants from a short-ranged potential (MatterSim, or any finite-displacement calculation in a
periodic supercell) miss the long-range dipole-dipole interaction of polar crystals, so the longitudinal
optical (LO) modes come out degenerate with the transverse ones (TO) at Gamma. phonopy restores the
splitting from the Born effective charges Z* and the electronic (high-frequency) dielectric tensor
eps_inf. This module supplies and checks those two inputs and hands them to phonopy's own NAC machinery.

Conventions (identical to phonopy's ``BORN`` file and ``phonon.nac_params``):

- ``born[k, i, j]`` = Z*_k,ij = (Omega / e) dP_i / du_kj = (1 / e) dF_kj / dE_i: atom ``k`` of the
  primitive cell (phonopy's order), **first index i = electric field / polarisation direction**,
  **second index j = atomic displacement / force direction**, Cartesian, in units of the elementary
  charge e. Row ``i`` of a BORN-file line is ``Z[i][0] Z[i][1] Z[i][2]`` (row-major). phonopy contracts the
  first index with q (``q . Z``), so transposing a non-symmetric tensor changes the LO frequencies.
- ``epsilon[i, j]``: eps_inf, dimensionless, Cartesian, the clamped-ion (electronic) dielectric tensor.
- ``factor`` (``nac_params["factor"]``): e^2 / (4 pi eps0) in the calculator's units, 14.39965 eV Angstrom
  for eV / Angstrom / e (phonopy's default for VASP-like units, Hartree * Bohr).

See docs/phonon-nac.md.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from mattersim.errors import InputError
from mattersim.io import atomic_write_bytes
from workflows.cells import to_ase_atoms, to_phonopy_atoms

logger = logging.getLogger(__name__)

#: Corrections (in e for Z*, dimensionless for eps_inf) above which :func:`symmetrize` warns.
WARN_THRESHOLD = 0.1

#: q-directions (Cartesian) along which :func:`gamma_lo_to` approaches Gamma by default.
DEFAULT_DIRECTIONS = ((1, 0, 0), (1, 1, 0), (1, 1, 1))


def default_nac_factor() -> float:
    """e^2 / (4 pi eps0) in eV Angstrom (= Hartree * Bohr, phonopy's default for eV / Angstrom units)."""
    from phonopy.physical_units import get_physical_units

    units = get_physical_units()
    return float(units.Hartree * units.Bohr)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
@dataclass
class BornCharges:
    """Born effective charges and electronic dielectric tensor of one primitive cell.

    Attributes
    ----------
    born : ndarray, shape (n_prim_atoms, 3, 3)
        Z* in units of e, phonopy's convention ``born[atom][field/polarisation direction][displacement
        direction]`` (Cartesian), one tensor per atom of the primitive cell in phonopy's atom order.
    epsilon : ndarray, shape (3, 3)
        eps_inf, the electronic (clamped-ion) dielectric tensor, Cartesian, dimensionless.
    source : str
        Where the numbers came from: ``"BORN file <path>"``, ``"model <name>"`` or ``"arrays"``.
    uncertainty : dict or None
        Optional uncertainty estimates a predictor supplies: ``{"born": (n, 3, 3) std, "epsilon": (3, 3)
        std}`` and, for an ensemble, ``"members": [(born_k, epsilon_k), ...]`` (each member's own
        prediction), from which :func:`lo_to_spread` gives the uncertainty of the LO frequencies.
    factor : float or None
        The unit-conversion factor given on the first line of a BORN file, if any; None means phonopy's
        default for eV / Angstrom (:func:`default_nac_factor`).
    """

    born: np.ndarray
    epsilon: np.ndarray
    source: str = "arrays"
    uncertainty: dict | None = None
    factor: float | None = None

    def __post_init__(self) -> None:
        born = np.asarray(self.born, dtype=float)
        eps = np.asarray(self.epsilon, dtype=float)
        if eps.ndim == 0:
            eps = float(eps) * np.eye(3)
        if born.ndim == 1:  # isotropic charges, one number per atom
            born = born[:, None, None] * np.eye(3)[None]
        if born.ndim != 3 or born.shape[1:] != (3, 3):
            raise InputError(
                f"Born effective charges ({self.source}) have shape {born.shape}; give an array of shape "
                "(number of primitive-cell atoms, 3, 3) or one number per atom."
            )
        if eps.shape != (3, 3):
            raise InputError(
                f"dielectric tensor eps_inf ({self.source}) has shape {eps.shape}; give a 3x3 array or one number."
            )
        if not (np.all(np.isfinite(born)) and np.all(np.isfinite(eps))):
            raise InputError(
                f"Born charges or dielectric tensor ({self.source}) contain NaN or infinity; supply finite numbers."
            )
        self.born = np.ascontiguousarray(born)
        self.epsilon = np.ascontiguousarray(eps)

    @property
    def charge_sum(self) -> np.ndarray:
        """Sum of Z* over the atoms of the primitive cell (3, 3); zero for a charge-neutral set."""
        return self.born.sum(axis=0)

    def to_phonopy_nac_params(self, factor: float | None = None, method: str | None = None) -> dict:
        """The dict for ``phonon.nac_params``: born, dielectric, factor, and optionally method.

        ``factor`` overrides the unit factor (default: the one read from the BORN file, else
        :func:`default_nac_factor`). ``method`` is ``"gonze"`` (phonopy's default, Gonze-Lee dipole-dipole
        Ewald sum) or ``"wang"`` (Wang et al. 2010 mixed-space).
        """
        if factor is None:
            factor = self.factor if self.factor is not None else default_nac_factor()
        params: dict[str, Any] = {
            "born": np.array(self.born, dtype="double", order="C"),
            "dielectric": np.array(self.epsilon, dtype="double", order="C"),
            "factor": float(factor),
        }
        if method is not None:
            if method not in ("gonze", "wang"):
                raise InputError(f"NAC method {method!r} is unknown; use 'gonze' or 'wang'.")
            params["method"] = method
        return params


@runtime_checkable
class DielectricPredictor(Protocol):
    """Anything that gives Z* and eps_inf for a structure.

    ``predict_dielectric(atoms)`` returns ``(born (n, 3, 3), epsilon (3, 3))`` in the conventions of
    :class:`BornCharges` for the atoms of ``atoms`` (an ``ase.Atoms``) in their order.
    """

    def predict_dielectric(self, atoms) -> tuple[np.ndarray, np.ndarray]: ...


class FixedDielectric:
    """A :class:`DielectricPredictor` with explicit arrays (Z* per atom of the primitive cell, eps_inf).

    ``born`` may be (n, 3, 3) or n numbers (isotropic charges); ``epsilon`` (3, 3) or one number.
    """

    def __init__(self, born, epsilon, uncertainty: dict | None = None) -> None:
        bc = BornCharges(born, epsilon, source="arrays", uncertainty=uncertainty)
        self.born = bc.born
        self.epsilon = bc.epsilon
        self.uncertainty = uncertainty

    def predict_dielectric(self, atoms) -> tuple[np.ndarray, np.ndarray]:
        if len(atoms) != len(self.born):
            raise InputError(
                f"FixedDielectric has Z* for {len(self.born)} atoms but the primitive cell has {len(atoms)}; "
                "give one 3x3 tensor per primitive-cell atom in phonopy's atom order."
            )
        return self.born.copy(), self.epsilon.copy()


class _AsePropertiesPredictor:
    """Adapter: an ASE calculator implementing ``born_effective_charges`` and ``dielectric_tensor``.

    The calculator's arrays are taken to be in phonopy's convention (see the module docstring).
    """

    def __init__(self, calculator) -> None:
        self.calculator = calculator

    def predict_dielectric(self, atoms) -> tuple[np.ndarray, np.ndarray]:
        atoms = atoms.copy()
        atoms.calc = self.calculator
        born = np.asarray(self.calculator.get_property("born_effective_charges", atoms), dtype=float)
        eps = np.asarray(self.calculator.get_property("dielectric_tensor", atoms), dtype=float)
        return born.reshape(len(atoms), 3, 3), eps.reshape(3, 3)


def find_predictor(calculator) -> DielectricPredictor | None:
    """The Z*/eps_inf predictor a calculator offers, or None.

    The calculator itself when it has ``predict_dielectric``; an adapter when its
    ``implemented_properties`` list both ``born_effective_charges`` and ``dielectric_tensor``; else None.
    """
    if calculator is None:
        return None
    if callable(getattr(calculator, "predict_dielectric", None)):
        return calculator
    props = set(getattr(calculator, "implemented_properties", ()) or ())
    if {"born_effective_charges", "dielectric_tensor"} <= props:
        return _AsePropertiesPredictor(calculator)
    return None


# --------------------------------------------------------------------------------------------------
# Structures
# --------------------------------------------------------------------------------------------------
def _formula(prim) -> str:
    from collections import Counter

    counts = Counter(prim.symbols)
    return "".join(f"{s}{n}" for s, n in counts.items())


def _independent_atoms(prim, symprec: float) -> np.ndarray:
    from phonopy.structure.symmetry import Symmetry

    return np.asarray(Symmetry(prim, symprec=symprec).get_independent_atoms(), dtype=int)


# --------------------------------------------------------------------------------------------------
# BORN files
# --------------------------------------------------------------------------------------------------
def _check_born_text(text: str, path: Path, n_indep: int, indep: np.ndarray, prim) -> None:
    """Validate the layout phonopy's parser expects, with the real line numbers in the messages."""
    lines = text.splitlines()
    hint = (
        f"a BORN file has a first line (unit factor or comment), one line of 9 numbers for eps_inf, then one "
        f"line of 9 numbers per symmetry-independent atom ({n_indep} for {_formula(prim)}: primitive-cell atoms "
        f"{', '.join(str(i + 1) for i in indep)})"
    )
    if not lines or not lines[0].split():
        raise InputError(f"BORN file {path} line 1 is empty; {hint}.")
    for lineno in range(2, 3 + n_indep):
        if lineno > len(lines) or not lines[lineno - 1].split():
            what = "eps_inf" if lineno == 2 else f"Z* of primitive-cell atom {indep[lineno - 3] + 1}"
            raise InputError(
                f"BORN file {path} ends or has a blank line at line {lineno} where {what} was expected; {hint}."
            )
        tokens = lines[lineno - 1].split()
        if len(tokens) != 9:
            raise InputError(f"BORN file {path} line {lineno} has {len(tokens)} numbers instead of 9; {hint}.")
        try:
            [float(t) for t in tokens]
        except ValueError:
            raise InputError(f"BORN file {path} line {lineno} has a token that is not a number; {hint}.") from None
    extra = 3 + n_indep
    if extra <= len(lines) and lines[extra - 1].split():
        raise InputError(
            f"BORN file {path} line {extra} is one line too many (more atoms than the primitive cell's "
            f"symmetry-independent atoms, or a wrong primitive cell or symmetry tolerance); {hint}."
        )


def read_born(path, primitive, symprec: float = 1e-5) -> BornCharges:
    """Read a phonopy BORN file and expand Z* to every atom of ``primitive`` with the crystal symmetry.

    Uses phonopy's own parser (``phonopy.file_IO.parse_BORN_from_strings``), so the result equals what
    ``phonopy.load(..., born_filename=path)`` puts into ``nac_params``, including the unit factor of line 1.
    Raises :class:`InputError` (naming the file and line) for a missing or malformed file.
    """
    from phonopy.file_IO import parse_BORN_from_strings

    path = Path(path)
    prim = to_phonopy_atoms(primitive)
    if not path.is_file():
        raise InputError(f"BORN file {path} does not exist; pass the path of a phonopy BORN file (eps_inf and Z*).")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"BORN file {path} cannot be read ({exc}); check the path and permissions.") from None
    indep = _independent_atoms(prim, symprec)
    _check_born_text(text, path, len(indep), indep, prim)
    try:
        params = parse_BORN_from_strings(text, prim, symprec=symprec, is_symmetry=True)
    except Exception as exc:  # phonopy's BORNFileParseError and friends, after our own checks
        raise InputError(f"BORN file {path} could not be parsed by phonopy ({exc}); check its format.") from None
    return BornCharges(
        born=np.array(params["born"], dtype=float),
        epsilon=np.array(params["dielectric"], dtype=float),
        source=f"BORN file {path}",
        factor=params.get("factor"),
    )


def born_file_text(born: BornCharges, primitive, symprec: float = 1e-5) -> str:
    """The text of a phonopy BORN file for ``born`` (only the symmetry-independent atoms are listed).

    Line 1 is phonopy's comment line (``# epsilon and Z* of atoms ...``), preceded by the unit factor when
    ``born.factor`` is set. Numbers carry 12 decimals so phonopy reads back the same tensors. Raises
    :class:`InputError` when phonopy's expansion of the written lines would not reproduce ``born`` (Z* that
    do not obey the crystal symmetry: call :func:`symmetrize` first).
    """
    from phonopy.file_IO import parse_BORN_from_strings

    prim = to_phonopy_atoms(primitive)
    if len(born.born) != len(prim):
        raise InputError(
            f"Born charges ({born.source}) are given for {len(born.born)} atoms but the primitive cell has "
            f"{len(prim)}; give one tensor per primitive-cell atom."
        )
    indep = _independent_atoms(prim, symprec)
    head = "# epsilon and Z* of atoms " + " ".join(str(i + 1) for i in indep)
    if born.factor is not None:
        head = f"{born.factor!r} {head}"
    lines = [head, " ".join(f"{x:.12f}" for x in born.epsilon.ravel())]
    for i in indep:
        lines.append(" ".join(f"{x:.12f}" for x in born.born[i].ravel()))
    text = "\n".join(lines) + "\n"
    back = parse_BORN_from_strings(text, prim, symprec=symprec, is_symmetry=True)
    diff = float(np.abs(np.asarray(back["born"]) - born.born).max())
    if diff > 1e-6:
        raise InputError(
            f"Born charges ({born.source}) do not obey the symmetry of the primitive cell (a BORN file would "
            f"change them by up to {diff:.3g} e); symmetrise them first with workflows.nac.symmetrize."
        )
    return text


def write_born(path, born: BornCharges, primitive, symprec: float = 1e-5) -> Path:
    """Write ``born`` as a phonopy BORN file at ``path`` atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    text = born_file_text(born, primitive, symprec=symprec)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


# --------------------------------------------------------------------------------------------------
# Symmetrisation and charge neutrality
# --------------------------------------------------------------------------------------------------
def symmetrize(
    born: BornCharges,
    primitive,
    symprec: float = 1e-5,
    *,
    warn_threshold: float = WARN_THRESHOLD,
) -> tuple[BornCharges, dict]:
    """Symmetrise Z* and eps_inf with the crystal symmetry and enforce charge neutrality.

    Uses phonopy's ``symmetrize_borns_and_epsilon``, which (phonopy 4.9) averages Z* over the space-group
    operations (``Z_{g(k)} = R Z_k R^T``), averages eps_inf over the point group, and then subtracts the
    mean tensor ``sum_k Z*_k / n`` from every atom, so that ``sum_k Z*_k = 0`` (charge neutrality, the
    acoustic sum rule for charges). The mean of symmetric tensors is invariant under the point group, so
    the result stays symmetric. phonopy applies the same function again whenever ``nac_params`` are set on a
    ``Phonopy`` object with symmetry on, so the result is a fixed point of phonopy's own treatment.

    The two corrections are reported separately: ``symmetry_max_change`` (max |dZ*| in e of the pure
    symmetry average), ``neutrality_max_change`` (max |dZ*| of the neutrality shift, = max |sum| / n),
    ``epsilon_max_change``; ``charge_sum_before`` (sum of the input Z*), ``charge_sum_symmetrized`` (after
    the average, before the shift) and ``charge_sum_after`` (3x3 lists, e); ``warnings``: one sentence per
    correction larger than ``warn_threshold`` (also sent to ``logging.warning``; the others are logged at
    INFO level).
    """
    from phonopy.structure.symmetry import symmetrize_borns_and_epsilon

    prim = to_phonopy_atoms(primitive)
    if len(born.born) != len(prim):
        raise InputError(
            f"Born charges ({born.source}) are given for {len(born.born)} atoms but the primitive cell "
            f"{_formula(prim)} has {len(prim)}; give one tensor per primitive-cell atom in phonopy's order."
        )
    n = len(prim)
    sum_before = born.born.sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # phonopy warns above 0.1 e itself; we report it our way below
        z_sym, eps_sym = symmetrize_borns_and_epsilon(born.born, born.epsilon, prim, symprec=symprec)
        # The point-group average of the input charge sum is the charge sum of the averaged Z* before
        # phonopy's neutrality shift: recover it with the same function (its eps_inf branch).
        _, sum_symmetrized = symmetrize_borns_and_epsilon(born.born, sum_before, prim, symprec=symprec)
    z_sym = np.asarray(z_sym, dtype=float)
    eps_sym = np.asarray(eps_sym, dtype=float)
    shift = np.asarray(sum_symmetrized, dtype=float) / n
    z_average = z_sym + shift[None]  # symmetry average alone

    report: dict[str, Any] = {
        "symmetry_max_change": float(np.abs(z_average - born.born).max()),
        "neutrality_max_change": float(np.abs(shift).max()),
        "epsilon_max_change": float(np.abs(eps_sym - born.epsilon).max()),
        "charge_sum_before": sum_before.tolist(),
        "charge_sum_symmetrized": np.asarray(sum_symmetrized, dtype=float).tolist(),
        "charge_sum_after": z_sym.sum(axis=0).tolist(),
        "warnings": [],
    }
    described = {
        "symmetry_max_change": "symmetrising Z* with the crystal symmetry changed it by up to {:.4g} e",
        "neutrality_max_change": "enforcing charge neutrality (sum of Z* = 0) changed Z* by up to {:.4g} e",
        "epsilon_max_change": "symmetrising eps_inf changed it by up to {:.4g}",
    }
    for key, text in described.items():
        msg = text.format(report[key]) + f" ({born.source})"
        if report[key] > warn_threshold:
            msg += f", more than {warn_threshold:g}: check the source of Z* and eps_inf and the structure"
            report["warnings"].append(msg)
            logger.warning(msg)
        else:
            logger.info(msg)
    return replace(born, born=z_sym, epsilon=eps_sym), report


# --------------------------------------------------------------------------------------------------
# Choosing the source
# --------------------------------------------------------------------------------------------------
NO_SOURCE_MESSAGE = (
    "NAC needs Born effective charges and eps_inf but none were given; pass a phonopy BORN file with "
    "--born FILE, use a model with dielectric heads, or in Python pass FixedDielectric(born, epsilon) arrays."
)


def _predictor_source(predictor, calculator=None) -> str:
    if isinstance(predictor, FixedDielectric):
        return "arrays"
    for obj in (calculator, predictor):
        info = getattr(obj, "model_info", None) if obj is not None else None
        if isinstance(info, dict) and info.get("name"):
            return f"model {info['name']}"
    return f"model {type(calculator if calculator is not None else predictor).__name__}"


def _from_predictor(predictor, prim, source: str) -> BornCharges:
    atoms = to_ase_atoms(prim)
    out = predictor.predict_dielectric(atoms)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"{type(predictor).__name__}.predict_dielectric must return (born, epsilon)")
    born, eps = out
    born = np.asarray(born, dtype=float)
    if born.shape[:1] != (len(prim),):
        raise InputError(
            f"Z* from {source} has shape {born.shape} but the primitive cell has {len(prim)} atoms; give one "
            "3x3 tensor per primitive-cell atom."
        )
    return BornCharges(born, eps, source=source, uncertainty=getattr(predictor, "uncertainty", None))


def resolve_born(
    *,
    born_file=None,
    predictor: DielectricPredictor | None = None,
    calculator=None,
    primitive_atoms,
    symprec: float = 1e-5,
) -> BornCharges:
    """Z* and eps_inf for ``primitive_atoms`` from the first available source, in this order.

    1. ``born_file`` (``--born FILE``, a phonopy BORN file, :func:`read_born`);
    2. ``predictor`` (explicit arrays via :class:`FixedDielectric`, or any :class:`DielectricPredictor`);
    3. the model's own predictions, ``find_predictor(calculator)``.

    Raises :class:`InputError` saying how to provide one when there is none. The result is not yet
    symmetrised: pass it through :func:`symmetrize`.
    """
    prim = to_phonopy_atoms(primitive_atoms)
    if born_file is not None:
        return read_born(born_file, prim, symprec=symprec)
    if predictor is not None:
        if not callable(getattr(predictor, "predict_dielectric", None)):
            raise InputError(
                f"predictor {type(predictor).__name__} has no predict_dielectric(atoms) method; pass "
                "FixedDielectric(born, epsilon) or an object implementing DielectricPredictor."
            )
        return _from_predictor(predictor, prim, _predictor_source(predictor))
    found = find_predictor(calculator)
    if found is not None:
        return _from_predictor(found, prim, _predictor_source(found, calculator))
    raise InputError(NO_SOURCE_MESSAGE)


# --------------------------------------------------------------------------------------------------
# LO-TO at Gamma
# --------------------------------------------------------------------------------------------------
def _match_unchanged(freqs: np.ndarray, ref: np.ndarray, tol: float) -> tuple[list[int], list[int]]:
    """Indices of ``freqs`` without a partner in ``ref`` (raised modes) and of ``ref`` left over."""
    used = np.zeros(len(ref), dtype=bool)
    raised = []
    for i, f in enumerate(freqs):
        cand = np.where(~used & (np.abs(ref - f) <= tol))[0]
        if len(cand):
            used[cand[np.argmin(np.abs(ref[cand] - f))]] = True
        else:
            raised.append(i)
    return raised, [int(j) for j in np.where(~used)[0]]


def gamma_lo_to(
    phonon,
    directions: Sequence[Sequence[float]] = DEFAULT_DIRECTIONS,
    *,
    cartesian: bool = True,
    tol: float = 1e-4,
) -> dict:
    """Frequencies (THz) at Gamma approached along each direction, with the LO modes identified.

    ``phonon`` is a ``Phonopy`` object with force constants and ``nac_params`` set (the NAC method is
    ``phonon.nac_params["method"]``, default ``"gonze"``). ``directions`` are Cartesian (``cartesian=True``,
    the default: ``(1, 1, 0)`` is [110] in the Cartesian frame of the structure) or fractional coordinates of
    the reciprocal basis (phonopy's ``nac_q_direction``) with ``cartesian=False``.

    Returns ``{"method", "to": sorted frequencies at Gamma without NAC, "directions": [...]}`` where each
    entry has ``direction`` (as given), ``q_direction_reduced`` (what phonopy received), ``frequencies``
    (sorted), ``lo_indices`` / ``lo_frequencies`` (modes raised relative to the no-NAC frequencies: those
    without a partner within ``tol`` THz among them) and ``to_frequencies`` (the others).
    """
    if phonon.force_constants is None:
        raise InputError("the Phonopy object has no force constants; produce them before asking for LO-TO.")
    nac = phonon.nac_params
    gamma = np.zeros((1, 3))
    phonon.run_qpoints(gamma)  # q = 0 without a direction: phonopy leaves NAC out (TO)
    to = np.sort(np.asarray(phonon.qpoints.frequencies[0], dtype=float))
    out: dict[str, Any] = {
        "method": None if nac is None else nac.get("method", "gonze"),
        "to": to.tolist(),
        "directions": [],
    }
    cell = np.asarray(phonon.primitive.cell, dtype=float)  # rows a, b, c
    for d in directions:
        d = np.asarray(d, dtype=float)
        if d.shape != (3,) or np.linalg.norm(d) == 0:
            raise InputError(f"LO-TO direction {d.tolist()} is not a non-zero 3-vector; give e.g. (1, 1, 0).")
        q_red = cell @ d if cartesian else d  # q_cart = inv(cell) @ q_red  =>  q_red = cell @ q_cart
        q_red = q_red / np.abs(q_red).max()
        if nac is None:
            freqs = to.copy()
        else:
            phonon.run_qpoints(gamma, nac_q_direction=q_red)
            freqs = np.sort(np.asarray(phonon.qpoints.frequencies[0], dtype=float))
        raised, _ = _match_unchanged(freqs, to, tol)
        out["directions"].append(
            {
                "direction": d.tolist(),
                "q_direction_reduced": q_red.tolist(),
                "frequencies": freqs.tolist(),
                "lo_indices": raised,
                "lo_frequencies": [float(freqs[i]) for i in raised],
                "to_frequencies": [float(freqs[i]) for i in range(len(freqs)) if i not in raised],
            }
        )
    return out


# --------------------------------------------------------------------------------------------------
# Uncertainty (ensembles of Z*/eps_inf predictions)
# --------------------------------------------------------------------------------------------------
def member_charges(born: BornCharges) -> list[BornCharges]:
    """The members' own (Z*, eps_inf) of ``born.uncertainty["members"]`` as :class:`BornCharges` (or []).

    Each carries ``uncertainty={"spread_scale": ...}`` when the predictor calibrates its spread (the
    factors k of :class:`mattersim.composite.DielectricModel`), which :func:`lo_to_spread` uses."""
    unc = born.uncertainty or {}
    members = unc.get("members") or []
    scale = unc.get("spread_scale")
    out = []
    for k, member in enumerate(members):
        if isinstance(member, dict):
            z, eps = member.get("born"), member.get("epsilon")
        else:
            z, eps = member
        out.append(BornCharges(np.asarray(z, dtype=float), np.asarray(eps, dtype=float),
                               source=f"{born.source} member {k}", factor=born.factor,
                               uncertainty={"spread_scale": dict(scale)} if scale else None))
    return out


def symmetrize_members(born: BornCharges, primitive, symprec: float = 1e-5) -> list[BornCharges]:
    """Each member of ``born.uncertainty["members"]`` symmetrised like the mean (:func:`symmetrize`),
    without warnings (they are logged at INFO level)."""
    return [symmetrize(m, primitive, symprec, warn_threshold=np.inf)[0] for m in member_charges(born)]


def _max_per_atom(arr: np.ndarray) -> list[float]:
    arr = np.abs(np.asarray(arr, dtype=float))
    return arr.reshape(len(arr), -1).max(axis=1).tolist()


def uncertainty_report(born: BornCharges, symmetrized_members: Sequence[BornCharges] | None = None) -> dict | None:
    """The Z* / eps_inf uncertainty for ``summary.json``, or None when ``born`` carries none.

    From the predictor's standard deviations (as predicted, before symmetrisation): ``born_std`` (n, 3, 3,
    e), ``born_std_max_per_atom`` (largest component per primitive-cell atom), ``born_std_max``,
    ``epsilon_std`` (3, 3), ``epsilon_std_max``. With ``symmetrized_members`` (the members after the same
    symmetrisation as the mean, :func:`symmetrize_members`) also ``n_members``,
    ``born_std_symmetrized_max_per_atom`` and ``epsilon_std_symmetrized``: the spread of what enters NAC.
    """
    unc = born.uncertainty
    if not unc:
        return None
    report: dict[str, Any] = {}
    if unc.get("born") is not None:
        b = np.asarray(unc["born"], dtype=float).reshape(-1, 3, 3)
        report.update({"born_std": b.tolist(), "born_std_max_per_atom": _max_per_atom(b),
                       "born_std_max": float(np.abs(b).max())})
    if unc.get("epsilon") is not None:
        e = np.asarray(unc["epsilon"], dtype=float).reshape(3, 3)
        report.update({"epsilon_std": e.tolist(), "epsilon_std_max": float(np.abs(e).max())})
    members = list(symmetrized_members or [])
    report["n_members"] = len(members) if members else None
    scale = unc.get("spread_scale") or {}
    k_born, k_eps = float(scale.get("born", 1.0)), float(scale.get("epsilon", 1.0))
    report["spread_scale"] = {"born": k_born, "epsilon": k_eps} if scale else None
    if members:
        zs = np.stack([m.born for m in members])
        es = np.stack([m.epsilon for m in members])
        report["born_std_symmetrized_max_per_atom"] = _max_per_atom(k_born * zs.std(axis=0))
        report["epsilon_std_symmetrized"] = (k_eps * es.std(axis=0)).tolist()
    report["note"] = ("standard deviations over the ensemble members (population, 1/N), times the predictor's "
                      "calibration factor spread_scale where it has one: Z* in e, eps_inf dimensionless; "
                      "'_symmetrized' after the crystal-symmetry and charge-neutrality symmetrisation applied "
                      "to the mean")
    return report


def _same_force_constants(phonon):
    """A new ``Phonopy`` with the cells, symmetry tolerance and force constants of ``phonon`` (no NAC):
    setting NAC parameters on it leaves ``phonon``'s computed results alone (phonopy discards them)."""
    from phonopy import Phonopy

    clone = Phonopy(phonon.unitcell, supercell_matrix=phonon.supercell_matrix,
                    primitive_matrix=phonon.primitive_matrix, symprec=phonon.symmetry.tolerance, log_level=0)
    clone.force_constants = phonon.force_constants
    return clone


def lo_to_spread(phonon, members: Sequence[BornCharges], reference: dict, *, method: str | None = None,
                 cartesian: bool = True, spread_scale: dict | None = None) -> dict:
    """Spread over ensemble members of the frequencies at Gamma of :func:`gamma_lo_to` (THz).

    ``members``: each member's (Z*, eps_inf), already symmetrised like the mean (:func:`symmetrize_members`);
    ``reference``: :func:`gamma_lo_to` of ``phonon`` with the mean parameters (``phonon.nac_params``). The
    NAC parameters are set on a copy of ``phonon`` (same cells, symmetry tolerance and force constants, same
    ``method`` and unit factor; ``phonon`` itself and its computed band structure, mesh, ... are left
    untouched) and the sorted frequencies along each of the reference's directions are computed. Modes are
    matched by their rank (sorted frequencies), and the LO / TO modes are those the mean identified.

    Without a calibration (``spread_scale`` None, or all factors 1, and none carried by the members): the
    standard deviation of the members' frequencies. With one, ``{"born": k_Z, "epsilon": k_eps}`` (the factors by which the
    predictor scales the spread of Z* and of eps_inf), the spread is propagated to first order with physical
    inputs only: for every member k the frequency changes ``dZ_k = f(Z_k, eps_mean) - f(Z_mean, eps_mean)``
    and ``de_k = f(Z_mean, eps_k) - f(Z_mean, eps_mean)`` are computed (each input a real member's or the
    mean's, charge-neutral Z* and eps_inf >= 1), and the reported standard deviation is that of
    ``k_Z dZ_k + k_eps de_k`` over the members: the calibrated spread of the inputs carried through the
    linearised frequencies, without ever building an unphysical "stretched" member.

    Returns ``{"n_members", "method", "propagation", "spread_scale", "directions": [{"direction",
    "frequencies_std", "lo_frequencies_std", "to_frequencies_std", "member_lo_frequencies"}]}`` with
    population standard deviations (1/N); ``member_lo_frequencies`` are the members' own LO frequencies.
    """
    members = list(members)
    if len(members) < 2:
        raise InputError(f"the LO-TO spread needs at least two ensemble members, got {len(members)}.")
    if method is None:
        method = reference.get("method") or "gonze"
    if spread_scale is None:
        spread_scale = (members[0].uncertainty or {}).get("spread_scale")
    directions = [d["direction"] for d in reference["directions"]]
    nac_params = phonon.nac_params or {}
    factor = nac_params.get("factor")
    clone = _same_force_constants(phonon)

    def frequencies(charges: BornCharges) -> list:
        clone.nac_params = charges.to_phonopy_nac_params(factor=factor, method=method)
        return [d["frequencies"] for d in gamma_lo_to(clone, directions, cartesian=cartesian)["directions"]]

    member_freqs = np.asarray([frequencies(m) for m in members], dtype=float)  # (members, directions, modes)
    if spread_scale and any(float(v) != 1.0 for v in spread_scale.values()):
        if nac_params.get("born") is None:
            raise InputError("lo_to_spread with spread_scale needs the mean Z* and eps_inf set on the phonon "
                             "object (phonon.nac_params).")
        k_born, k_eps = float(spread_scale["born"]), float(spread_scale["epsilon"])
        mean = BornCharges(np.asarray(nac_params["born"], dtype=float), np.asarray(nac_params["dielectric"], dtype=float),
                           source="ensemble mean", factor=factor)
        f0 = np.asarray(frequencies(mean), dtype=float)
        deviations = np.asarray([
            k_born * (np.asarray(frequencies(replace(mean, born=m.born)), dtype=float) - f0)
            + k_eps * (np.asarray(frequencies(replace(mean, epsilon=m.epsilon)), dtype=float) - f0)
            for m in members])
        std = deviations.std(axis=0)
        propagation = ("first order: std over members of k_Z [f(Z_k, eps_mean) - f(mean)] + "
                       "k_eps [f(Z_mean, eps_k) - f(mean)]")
        scale_out = {"born": k_born, "epsilon": k_eps}
    else:
        std = member_freqs.std(axis=0)
        propagation = "std of the members' frequencies"
        scale_out = None
    out: dict[str, Any] = {"n_members": len(members), "method": method, "propagation": propagation,
                           "spread_scale": scale_out, "directions": []}
    for j, ref in enumerate(reference["directions"]):
        lo = [int(i) for i in ref["lo_indices"]]
        to = [i for i in range(std.shape[1]) if i not in lo]
        out["directions"].append({
            "direction": list(ref["direction"]),
            "frequencies_std": std[j].tolist(),
            "lo_frequencies_std": std[j, lo].tolist(),
            "to_frequencies_std": std[j, to].tolist(),
            "member_lo_frequencies": member_freqs[:, j, lo].tolist(),
        })
    return out


def lo_to_analytic(z: float, epsilon_inf: float, volume: float, masses: Sequence[float]) -> float:
    """nu_LO^2 - nu_TO^2 in THz^2 for a cubic diatomic crystal (rocksalt, CsCl, zincblende).

    omega_LO^2 - omega_TO^2 = Z*^2 e^2 / (eps0 eps_inf Omega mu), with ``z`` the isotropic Born charge (e),
    ``epsilon_inf`` the scalar electronic dielectric constant, ``volume`` Omega the primitive-cell volume
    (Angstrom^3) and ``masses`` the two atomic masses (amu; mu = m1 m2 / (m1 + m2)). Computed in SI and
    returned in ordinary-frequency units, nu = omega / (2 pi), as the difference of squares in THz^2, so
    ``nu_LO = sqrt(nu_TO**2 + lo_to_analytic(...))``.
    """
    from scipy import constants as c

    m1, m2 = (float(m) * c.atomic_mass for m in masses)
    mu = m1 * m2 / (m1 + m2)
    omega2 = (z * c.e) ** 2 / (c.epsilon_0 * epsilon_inf * volume * 1e-30 * mu)  # rad^2 / s^2
    return float(omega2 / (2 * np.pi) ** 2 / 1e24)


__all__ = [
    "BornCharges",
    "DielectricPredictor",
    "FixedDielectric",
    "find_predictor",
    "read_born",
    "born_file_text",
    "write_born",
    "symmetrize",
    "resolve_born",
    "gamma_lo_to",
    "lo_to_spread",
    "lo_to_analytic",
    "member_charges",
    "symmetrize_members",
    "uncertainty_report",
    "default_nac_factor",
    "NO_SOURCE_MESSAGE",
]
