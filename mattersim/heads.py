"""Property heads of the multi-task model, usable on either backbone (transformer or M3GNet v1).

A head reads the backbone's :class:`~mattersim.graph.Encoded` output (invariant atom features, optional
equivariant ones, and the edge geometry) and returns one property:

- :class:`ScalarHead`: per-atom scalars, magnetic moments (μB) and Bader charges (e). One neighbour
  cross-attention layer (queries from the atom's invariant features; keys and values from the neighbours'
  invariant features, joined, on the transformer, by the invariant norms of their equivariant features),
  then an MLP with layer norm and GELU. With ``zero_sum`` (charges) the per-structure mean is removed, so
  the charges of every structure sum to zero by construction.
- :class:`BornChargeHead`: Born effective charges ``Z*_i`` (e), 3x3 per atom, after ETGNN:
  ``Z*_i = sum_c [ sum_j p_i p_j m_ij u_ij (x) u_ij + sum_{j != k} p_i a_k b_j m_ik m_ij u_ki (x) u_ij ] + q_i I``
  with unit bond vectors ``u_ij`` (centre i to neighbour j), smooth cutoff weights ``m_ij``, learned
  per-atom scalars ``p, a, b`` (``C`` channels each) and an isotropic term ``q_i``. The second sum is
  evaluated in O(edges) as ``-p_i [A_i (x) B_i - sum_j a_j b_j m_ij^2 u_ij (x) u_ij]`` with
  ``A_i = sum_k a_k m_ik u_ik``, ``B_i = sum_j b_j m_ij u_ij``; ``a != b`` lets ``Z*`` be non-symmetric,
  as it is in low-symmetry crystals. The per-structure mean is subtracted at the end, so ``sum_i Z*_i = 0``
  (charge neutrality, the acoustic sum rule) holds by construction.
- :class:`DielectricHead`: the electronic dielectric tensor ``eps_inf`` (3x3 per structure):
  ``eps_inf = I + (1/N) sum_i [ sum_j sum_c s(p_i) s(p_j) m_ij u_ij (x) u_ij + s(q_i) I ]`` with
  ``s = softplus``: symmetric, and ``eps_inf - I`` positive semi-definite (``eps_inf >= 1``, as physics
  requires) by construction.

Convention: ``Z*[atom][field / polarisation direction][displacement direction]`` (phonopy's BORN order).
Each head holds ``scale`` and ``shift`` buffers that training sets from the data (saved in the
checkpoint): scalar heads output ``scale * raw + shift``, the Born head ``scale * raw`` (a shift would
cancel in the neutrality projection), the dielectric head ``I + |scale| * chi + |shift| * I``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mattersim.graph import Encoded, GraphBatch
from mattersim.m3gnet import polynomial_cutoff
from mattersim.transformer import GaussianBasis, neighbour_softmax

#: per-atom tasks and per-structure tasks, with their output shapes after the leading axis
ATOM_TASKS = {"magmoms": (), "charges": (), "born_effective_charges": (3, 3)}
STRUCTURE_TASKS = {"dielectric_tensor": (3, 3)}
TASKS = tuple(ATOM_TASKS) + tuple(STRUCTURE_TASKS)
UNITS = {"magmoms": "μB", "charges": "e", "born_effective_charges": "e", "dielectric_tensor": "1"}


def _mlp(width_in: int, width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width_in), nn.Linear(width_in, width), nn.GELU(),
                         nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, out))


def structure_mean(values: torch.Tensor, graph: GraphBatch) -> torch.Tensor:
    """Per-structure mean of per-atom values (N, ...) -> (B, ...)."""
    sums = torch.zeros((graph.num_structures,) + tuple(values.shape[1:]), dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, graph.batch, values)
    counts = graph.n_atoms.to(values.dtype).view((-1,) + (1,) * (values.dim() - 1))
    return sums / counts


class _Head(nn.Module):
    def __init__(self, in_width: int, equi_width: int, cutoff: float, num_gaussians: int):
        super().__init__()
        self.in_width, self.equi_width, self.cutoff = int(in_width), int(equi_width), float(cutoff)
        self.rbf = GaussianBasis(cutoff, num_gaussians)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("shift", torch.zeros(()))

    def inputs(self, enc: Encoded) -> torch.Tensor:
        """Invariant per-atom inputs: atom features, plus |e|^2 per channel when equivariant ones exist."""
        if self.equi_width and enc.equi is not None:
            return torch.cat([enc.atom, torch.sum(enc.equi * enc.equi, dim=1)], dim=-1)
        return enc.atom

    def edge_terms(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """Smooth cutoff weights m_ij (E,) and unit bond vectors u_ij (E, 3)."""
        cut = polynomial_cutoff(enc.edge_len, self.cutoff) * (enc.edge_len < self.cutoff)
        unit = enc.edge_vec / enc.edge_len.clamp_min(1e-9).unsqueeze(1)
        return cut, unit


class ScalarHead(_Head):
    """Per-atom scalar property (magnetic moments; Bader charges with ``zero_sum``)."""

    def __init__(self, in_width: int, equi_width: int = 0, width: int = 64, num_heads: int = 4,
                 num_gaussians: int = 16, cutoff: float = 5.0, zero_sum: bool = False):
        super().__init__(in_width, equi_width, cutoff, num_gaussians)
        self.zero_sum = bool(zero_sum)
        self.heads, self.width = int(num_heads), int(width)
        d_in = in_width + (equi_width or 0)
        self.norm = nn.LayerNorm(d_in)
        self.q = nn.Linear(d_in, width)
        self.kv = nn.Linear(d_in, 2 * width)
        self.self_value = nn.Linear(d_in, width)
        self.bias = nn.Linear(num_gaussians, num_heads)
        self.mlp = _mlp(width, width, 1)

    def forward(self, enc: Encoded, graph: GraphBatch) -> torch.Tensor:
        h = self.norm(self.inputs(enc))
        centre, neighbour = graph.edge_index[0], graph.edge_index[1]
        cut, _ = self.edge_terms(enc)
        dh = self.width // self.heads
        q = self.q(h).view(-1, self.heads, dh)
        k, v = self.kv(h).view(-1, 2, self.heads, dh).unbind(1)
        scores = torch.sum(q.index_select(0, centre) * k.index_select(0, neighbour), dim=-1) / dh**0.5
        attn = neighbour_softmax(scores + self.bias(self.rbf(enc.edge_len)), cut, centre, graph.num_atoms)
        msg = torch.zeros_like(q).index_add(0, centre, v.index_select(0, neighbour) * attn.unsqueeze(-1))
        out = self.mlp(self.self_value(h) + msg.reshape(-1, self.width)).view(-1)
        out = self.scale * out + self.shift
        if self.zero_sum:
            out = out - structure_mean(out, graph).index_select(0, graph.batch)
        return out


class BornChargeHead(_Head):
    """Born effective charges Z* (N, 3, 3) with sum over each structure's atoms exactly zero."""

    def __init__(self, in_width: int, equi_width: int = 0, width: int = 64, channels: int = 8,
                 num_gaussians: int = 16, cutoff: float = 5.0):
        super().__init__(in_width, equi_width, cutoff, num_gaussians)
        self.channels = int(channels)
        d_in = in_width + (equi_width or 0)
        self.scalars = _mlp(d_in, width, 4 * channels + 1)  # p, a, b, pair weights w, isotropic q
        self.radial = nn.Linear(num_gaussians, channels)

    def forward(self, enc: Encoded, graph: GraphBatch) -> torch.Tensor:
        c = self.channels
        s = self.scalars(self.inputs(enc))
        p, a, b, w, q = s[:, :c], s[:, c : 2 * c], s[:, 2 * c : 3 * c], s[:, 3 * c : 4 * c], s[:, 4 * c]
        centre, neighbour = graph.edge_index[0], graph.edge_index[1]
        cut, u = self.edge_terms(enc)
        radial = self.radial(self.rbf(enc.edge_len)) * cut.unsqueeze(1)  # (E, C), vanishes at r_c
        uu = u.unsqueeze(2) * u.unsqueeze(1)  # (E, 3, 3)
        n = graph.num_atoms
        # term 1: sum_j p_i p_j m_ij u (x) u
        pj = p.index_select(0, neighbour) * radial  # (E, C)
        t1 = torch.zeros((n, c, 3, 3), dtype=s.dtype, device=s.device)
        t1 = t1.index_add(0, centre, pj[:, :, None, None] * uu[:, None])
        t1 = torch.einsum("nc,ncxy->nxy", p * w, t1)
        # term 2: sum_{j != k} p_i a_k b_j m_ik m_ij u_ki (x) u_ij
        ak = a.index_select(0, neighbour) * radial
        bj = b.index_select(0, neighbour) * radial
        A = torch.zeros((n, c, 3), dtype=s.dtype, device=s.device).index_add(0, centre, ak[:, :, None] * u[:, None])
        B = torch.zeros((n, c, 3), dtype=s.dtype, device=s.device).index_add(0, centre, bj[:, :, None] * u[:, None])
        diag = torch.zeros((n, c, 3, 3), dtype=s.dtype, device=s.device)
        diag = diag.index_add(0, centre, (ak * bj)[:, :, None, None] * uu[:, None])
        t2 = -torch.einsum("nc,ncxy->nxy", p, A.unsqueeze(3) * B.unsqueeze(2) - diag)
        eye = torch.eye(3, dtype=s.dtype, device=s.device)
        z = self.scale * (t1 + t2 + q[:, None, None] * eye)
        return z - structure_mean(z, graph).index_select(0, graph.batch)


class DielectricHead(_Head):
    """Electronic dielectric tensor eps_inf (B, 3, 3): symmetric, eps_inf - I positive semi-definite."""

    def __init__(self, in_width: int, equi_width: int = 0, width: int = 64, channels: int = 8,
                 num_gaussians: int = 16, cutoff: float = 5.0):
        super().__init__(in_width, equi_width, cutoff, num_gaussians)
        self.channels = int(channels)
        d_in = in_width + (equi_width or 0)
        self.scalars = _mlp(d_in, width, channels + 1)
        self.radial = nn.Linear(num_gaussians, channels)

    def forward(self, enc: Encoded, graph: GraphBatch) -> torch.Tensor:
        c = self.channels
        s = self.scalars(self.inputs(enc))
        p, q = F.softplus(s[:, :c]), F.softplus(s[:, c])
        centre, neighbour = graph.edge_index[0], graph.edge_index[1]
        cut, u = self.edge_terms(enc)
        radial = F.softplus(self.radial(self.rbf(enc.edge_len))) * cut.unsqueeze(1)  # (E, C) >= 0
        pair = (p.index_select(0, centre) * p.index_select(0, neighbour) * radial).sum(1)  # (E,) >= 0
        uu = u.unsqueeze(2) * u.unsqueeze(1)
        eye = torch.eye(3, dtype=s.dtype, device=s.device)
        per_atom = torch.zeros((graph.num_atoms, 3, 3), dtype=s.dtype, device=s.device)
        per_atom = per_atom.index_add(0, centre, pair[:, None, None] * uu) + q[:, None, None] * eye
        chi = structure_mean(per_atom, graph)
        return eye + torch.abs(self.scale) * chi + torch.abs(self.shift) * eye


def build_head(task: str, in_width: int, equi_width: int, cutoff: float, *, width: int = 64, num_heads: int = 4,
               channels: int = 8, num_gaussians: int = 16) -> _Head:
    """The head of ``task`` (one of :data:`TASKS`) for a backbone of feature width ``in_width``."""
    common = dict(width=width, num_gaussians=num_gaussians, cutoff=cutoff)
    if task in ("magmoms", "charges"):
        return ScalarHead(in_width, equi_width, num_heads=num_heads, zero_sum=task == "charges", **common)
    if task == "born_effective_charges":
        return BornChargeHead(in_width, equi_width, channels=channels, **common)
    if task == "dielectric_tensor":
        return DielectricHead(in_width, equi_width, channels=channels, **common)
    raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
