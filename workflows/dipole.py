"""Dipole-dipole force constants, and the non-analytical correction for force constants of short-ranged models.

phonopy's NAC (Gonze-Lee, and Wang's equivalent) assumes that the supercell force constants contain the
*whole* dipole-dipole interaction of the Born charges, as DFT's do: it subtracts the Ewald-summed
dipole-dipole force constants ``FC_dd`` of the supercell, Fourier-interpolates the short-ranged rest and adds
the dipole-dipole dynamical matrix back at every q. A machine-learned potential with a finite receptive field
has the dipole-dipole part only up to its range: its force constants are roughly
``FC_model = FC_sr + w(r) Phi_dd(r)`` with a window ``w`` that is 1 at short distances and 0 beyond the
model's range. Subtracting the full ``FC_dd`` then leaves ``-(1 - w) Phi_dd``, a long-ranged remainder that
the Fourier interpolation aliases: the LO branch wiggles between the q-points commensurate with the
supercell, and the bigger the supercell, the more it wiggles (measured in docs/phonon-nac.md).

:func:`complete_dipole_tail` adds the missing tail instead: ``FC = FC_model + (FC_dd - W)``, with ``W`` the
windowed dipole-dipole force constants (:func:`windowed_dipole_force_constants`). phonopy's own NAC on these
force constants subtracts ``FC_dd`` and interpolates ``FC_model - W``, which is short-ranged, so the bands
converge with the supercell size. By default the tail's value at q = 0 is taken out again by a short-range
term on the nearest neighbours (:func:`gamma_matching_force_constants`), so that the frequencies at Gamma
(the TO modes, and LO = TO + the non-analytical term) stay exactly the model's own: a model trained on
periodic DFT cells has learned the q = 0 response, lattice sums included. The completed force constants
are ordinary phonopy force constants: ``phonopy.yaml`` carries them with the BORN data, so plain phonopy
reproduces the bands.

Units: force constants eV/Å^2, distances Å, Born charges e, ``factor`` e^2/(4 pi eps0) in eV Å.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mattersim.errors import InputError

__all__ = [
    "DipoleWindow",
    "complete_dipole_tail",
    "dipole_force_constants",
    "gamma_matching_force_constants",
    "pair_dipole_force_constants",
    "parse_nac_range",
    "window_for_model",
    "windowed_dipole_force_constants",
]

#: The automatic window around a model's cutoff ``rc``: 1 below ``rc - WINDOW_INNER_A``, 0 beyond
#: ``rc + WINDOW_OUTER_A``, a cosine between (CHGNet, rc = 6 Å: 4 to 6.5 Å, where its force constants of
#: 3C-SiC lose their dipole-dipole part; docs/phonon-nac.md shows the measurement).
WINDOW_INNER_A = 2.0
WINDOW_OUTER_A = 0.5


@dataclass(frozen=True)
class DipoleWindow:
    """Where a model has the dipole-dipole interaction: weight 1 below ``r_on``, 0 beyond ``r_off`` (Å),
    ``(1 + cos(pi x)) / 2`` with ``x = (r - r_on) / (r_off - r_on)`` between (``r_on == r_off``: a step)."""

    r_on: float
    r_off: float
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("r_on", "r_off"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value) and value >= 0):
                raise InputError(f"the dipole window's {name} must be a length >= 0 in Å, not {value!r}.")
        if self.r_off < self.r_on:
            raise InputError(f"the dipole window must have r_on <= r_off, got {self.r_on} > {self.r_off} Å.")

    def weights(self, distances) -> np.ndarray:
        d = np.asarray(distances, dtype=float)
        if self.r_off <= self.r_on:
            return (d < self.r_on).astype(float)
        x = np.clip((d - self.r_on) / (self.r_off - self.r_on), 0.0, 1.0)
        return 0.5 * (1.0 + np.cos(np.pi * x))

    def to_dict(self) -> dict:
        return {"r_on_A": float(self.r_on), "r_off_A": float(self.r_off), "shape": "cosine" if self.r_off > self.r_on else "step",
                "source": self.source}


def window_for_model(cutoff: float, source: str = "") -> DipoleWindow:
    """The automatic window of a model with cutoff ``cutoff`` Å: cosine from ``cutoff - 2`` to ``cutoff + 0.5`` Å."""
    return DipoleWindow(max(0.0, cutoff - WINDOW_INNER_A), cutoff + WINDOW_OUTER_A,
                        source=f"automatic: model cutoff {cutoff:g} Å - {WINDOW_INNER_A:g} to + {WINDOW_OUTER_A:g} Å"
                               + (f" ({source})" if source else ""))


def parse_nac_range(value) -> DipoleWindow | str | None:
    """``nac_range`` as given by a user: ``"auto"``, ``None``/``"none"``/``"full"`` (phonopy's plain NAC),
    a number R (a step at R Å), a pair ``(r_on, r_off)`` or the text ``"R_ON:R_OFF"``; or a DipoleWindow."""
    if value is None or isinstance(value, DipoleWindow):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text in ("none", "full", "off"):
            return None
        parts = text.replace(",", ":").split(":")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (1, 2):
            raise InputError(f"nac_range must be 'auto', 'none', a range R in Å or R_ON:R_OFF (e.g. 4:6.5), not {value!r}.")
        value = numbers
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return DipoleWindow(float(value), float(value), source="given")
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        raise InputError(f"nac_range must be 'auto', None, a range R in Å or (r_on, r_off), not {value!r}.") from None
    if len(numbers) == 1:
        return DipoleWindow(numbers[0], numbers[0], source="given")
    if len(numbers) != 2:
        raise InputError(f"nac_range must be 'auto', None, a range R in Å or (r_on, r_off), not {value!r}.")
    return DipoleWindow(numbers[0], numbers[1], source="given")


def pair_dipole_force_constants(born_i, born_j, epsilon, vectors, factor: float) -> np.ndarray:
    """Force constants Phi_ab(i, j) (eV/Å^2) of two point dipoles ``Z_i u_i`` and ``Z_j u_j`` in a medium of
    dielectric tensor ``epsilon``, for separations ``vectors`` (n, 3) from i to j:
    ``Phi = factor det(eps)^-1/2 Z_i^T [eps^-1 / D^3 - 3 (eps^-1 d)(eps^-1 d)^T / D^5] Z_j`` with
    ``D = sqrt(d . eps^-1 . d)`` (Gonze and Lee, PRB 55, 10355 (1997), eq. 74); ``born_*`` (n, 3, 3) in
    phonopy's convention (first index: field). For isotropic charges ``q`` and eps = 1 this is the second
    derivative of the Coulomb energy ``factor q_i q_j / |r_i - r_j|`` with respect to ``u_i`` and ``u_j``."""
    d = np.asarray(vectors, dtype=float).reshape(-1, 3)
    eps = np.asarray(epsilon, dtype=float)
    inv = np.linalg.inv(eps)
    delta = d @ inv.T
    dist = np.sqrt(np.einsum("na,na->n", d, delta))
    kernel = (inv[None] / dist[:, None, None] ** 3
              - 3.0 * np.einsum("na,nb->nab", delta, delta) / dist[:, None, None] ** 5) / math.sqrt(np.linalg.det(eps))
    return float(factor) * np.einsum("nia,nij,njb->nab", np.asarray(born_i, float), kernel, np.asarray(born_j, float))


def _nac_arrays(phonon):
    from workflows.nac import default_nac_factor

    params = phonon.nac_params
    if not params or params.get("born") is None:
        raise InputError("the dipole-dipole force constants need Born charges and eps_inf on the phonon object "
                         "(phonon.nac_params); set NAC first.")
    factor = params.get("factor")
    return (np.asarray(params["born"], dtype=float), np.asarray(params["dielectric"], dtype=float),
            float(factor) if factor is not None else default_nac_factor())


def dipole_force_constants(phonon, erfc_tolerance: float = 1e-10) -> np.ndarray:
    """The Ewald-summed dipole-dipole force constants of ``phonon``'s supercell, in the shape of its force
    constants (what DFT's force constants contain), from phonopy's own Gonze-Lee machinery run on zero force
    constants, with so many reciprocal vectors that the real-space (erfc) part it leaves out is below
    ``erfc_tolerance`` at the shortest interatomic distance (phonopy's default of 300 vectors leaves out a
    short-ranged part, which its NAC does not need because it subtracts and adds the same smoothed term)."""
    from phonopy.harmonic.dynamical_matrix import DynamicalMatrixGL
    from scipy.special import erfcinv

    born, epsilon, factor = _nac_arrays(phonon)
    fc = phonon.force_constants
    if fc is None:
        raise InputError("the phonon object has no force constants yet.")
    atoms = _supercell_atoms(phonon)
    r_min = float(min(np.delete(atoms.get_distances(s, np.arange(len(atoms)), mic=True), s).min()
                      for s in phonon.primitive.p2s_map))
    # phonopy's Gaussian parameter is Lambda = G_cutoff sqrt(tr(eps)/3) / (2 sqrt(ln 1e10)) (G without 2 pi)
    # and the real-space part decays as erfc(2 pi Lambda r / sqrt(eps)): choose G_cutoff for erfc <= tolerance
    x = float(erfcinv(erfc_tolerance))
    g_cutoff = x * 2.0 * math.sqrt(math.log(1e10)) / (2.0 * math.pi * r_min)
    n_g = int(math.ceil(4.0 / 3.0 * math.pi * g_cutoff**3 * phonon.primitive.volume))
    dm = DynamicalMatrixGL(phonon.supercell, phonon.primitive, np.zeros_like(fc),
                           nac_params={"born": born, "dielectric": epsilon, "factor": factor},
                           num_G_points=max(300, n_g))
    dm.make_Gonze_nac_dataset()
    return -np.asarray(dm.short_range_force_constants, dtype=float)


def _supercell_atoms(phonon):
    from workflows.cells import to_ase_atoms

    return to_ase_atoms(phonon.supercell)


def _rows(phonon, fc_shape) -> np.ndarray:
    """Supercell index of each row of force constants of shape ``fc_shape`` (compact: the primitive atoms)."""
    n_sc = len(phonon.supercell)
    return np.arange(n_sc) if fc_shape[0] == n_sc else np.asarray(phonon.primitive.p2s_map)


def _primitive_index(phonon) -> np.ndarray:
    prim = phonon.primitive
    return np.asarray([prim.p2p_map[k] for k in prim.s2p_map], dtype=int)


def windowed_dipole_force_constants(phonon, window: DipoleWindow) -> np.ndarray:
    """``W``: the dipole-dipole force constants of every pair (all periodic images) closer than
    ``window.r_off``, weighted by ``window.weights(r)``, with the self terms that make the acoustic sum rule
    hold (``W(i, i) = -sum_j W(i, j)``); the shape of ``phonon.force_constants``."""
    from ase.neighborlist import neighbor_list

    born, epsilon, factor = _nac_arrays(phonon)
    shape = np.asarray(phonon.force_constants).shape
    out = np.zeros(shape)
    reach = max(window.r_on, window.r_off)
    if reach <= 0:
        return out
    i, j, vec, dist = neighbor_list("ijDd", _supercell_atoms(phonon), reach)
    rows = _rows(phonon, shape)
    row_of = np.full(len(phonon.supercell), -1)
    row_of[rows] = np.arange(len(rows))
    weights = window.weights(dist)
    keep = (row_of[i] >= 0) & (weights > 0)
    i, j, vec, weights = i[keep], j[keep], vec[keep], weights[keep]
    prim_index = _primitive_index(phonon)
    phi = pair_dipole_force_constants(born[prim_index[i]], born[prim_index[j]], epsilon, vec, factor)
    phi *= weights[:, None, None]
    np.add.at(out, (row_of[i], j), phi)
    np.add.at(out, (row_of[i], i), -phi)
    return out


def gamma_matching_force_constants(phonon, fc: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """A short-ranged force-constant term with the same q = 0 sums as ``fc`` (shape of phonopy's compact or
    full force constants): for every pair of primitive-cell atoms (k, k'), ``sum_j fc(k, j in k')`` is put
    in equal parts on the nearest atoms of sublattice k' (those within ``tol`` Å of the shortest distance),
    and on the atom itself for k = k'. The q = 0 block is invariant under the site symmetry, so the term
    keeps the crystal symmetry; it keeps the acoustic sum rule when ``fc`` does."""
    fc = np.asarray(fc, dtype=float)
    atoms = _supercell_atoms(phonon)
    rows = _rows(phonon, fc.shape)
    prim_index = _primitive_index(phonon)
    p2s = np.asarray(phonon.primitive.p2s_map)
    n_prim = len(p2s)
    out = np.zeros_like(fc)
    for r, s in enumerate(rows):
        a = prim_index[s]
        dist = atoms.get_distances(s, np.arange(len(atoms)), mic=True)
        for b in range(n_prim):
            members = np.flatnonzero(prim_index == b)
            block = fc[r, members].sum(axis=0)
            if b == a:
                out[r, s] += block
                continue
            d = dist[members]
            nearest = members[d < d.min() + tol]
            out[r, nearest] += block / len(nearest)
    return out


def complete_dipole_tail(phonon, window: DipoleWindow, *, keep_gamma: bool = True) -> dict:
    """Turn the force constants of a short-ranged model on ``phonon`` into ones that contain the whole
    dipole-dipole interaction, in place: ``FC + (FC_dd - W) - G``, with ``FC_dd`` from
    :func:`dipole_force_constants`, ``W`` from :func:`windowed_dipole_force_constants` and ``G`` the
    q = 0 part of the added tail (:func:`gamma_matching_force_constants`; ``keep_gamma=False`` leaves it in,
    for a model whose force constants are exactly "short range + windowed dipole-dipole").

    Needs the NAC parameters on ``phonon`` (``phonon.nac_params``). Returns a report for the summary."""
    fc_model = np.asarray(phonon.force_constants, dtype=float)
    tail = dipole_force_constants(phonon) - windowed_dipole_force_constants(phonon, window)
    correction = tail - gamma_matching_force_constants(phonon, tail) if keep_gamma else tail
    phonon.force_constants = fc_model + correction
    return {
        "scheme": "dipole tail completion for a short-ranged model",
        "window": window.to_dict(),
        "keep_gamma": bool(keep_gamma),
        "max_added_eV_per_A2": float(np.abs(correction).max()),
        "note": ("the model's force constants contain the dipole-dipole interaction only within the window; "
                 "the rest of the Ewald-summed dipole-dipole force constants (FC_dd - W) was added"
                 + (", less its q = 0 part (put on the nearest neighbours), so the frequencies at Gamma are "
                    "the model's own" if keep_gamma else "")
                 + ". phonopy.yaml holds these completed force constants; phonopy's NAC with the BORN data "
                   "reproduces the bands (the force sets in it give the model's raw force constants)."),
    }
