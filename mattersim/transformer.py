"""The MatterSim-MT backbone: a GeoMFormer-style transformer with invariant and equivariant streams.

Architecture (after the MatterSim-MT paper and GeoMFormer, Chen et al. 2024):

- **Graph.** Directed edges ``i -> j`` to every periodic image ``j`` within ``r_c`` (5 Å), from
  :mod:`mattersim.graph`; ``r_ij = r_j + S @ cell - r_i``. Keys and values of an image are those of its
  original atom (the edge's neighbour index), so a periodic crystal is one finite graph.
- **Smooth cutoff.** ``m_ij = 1 - 6x^5 + 15x^4 - 10x^3`` with ``x = |r_ij| / r_c`` (zero value, slope and
  curvature at ``r_c``); Gaussian basis ``Phi_k(r) = exp(-(r - mu_k)^2 / (2 sigma^2))``, ``mu_k`` evenly
  spaced on ``[0, r_c]``, ``sigma`` their spacing.
- **Embedding.** ``x_i = Emb(Z_i) + b_i``, centrality ``b_i = sum_j Linear(m_ij Phi(|r_ij|))``;
  equivariant features ``e_i = sum_j m_ij W Phi(|r_ij|) (x) r_ij/|r_ij|`` (shape 3 x width; the invariant
  "1" component of the paper's ``concat(1, r/|r|)`` is the centrality).
- **Blocks.** Each block has the four attention modules, pre-normalised and residual: invariant
  self-attention (queries, keys, values from ``x``), equivariant self-attention (from ``e``; scores are
  inner products over x, y, z), invariant cross-attention (queries from ``x``, keys and values from the
  invariants ``<A e_j, B e_j>``) and equivariant cross-attention (scores from ``x``, values
  ``(W1 x_j) (x) r_ij/|r_ij| + (W2 x_j) * (W3 e_j)``); then a feed-forward module in which the
  equivariant update is gated by the invariant stream. Every score has a learned bias from ``Phi(|r_ij|)``.
  A preset's "attention layers" are four per block.
- **Neighbour attention.** ``a_ij = m_ij * softmax_j(s_ij + log m_ij)``: the softmax weights multiplied by
  ``m_ij``, with ``m_ij`` also inside the normalisation so that a neighbour crossing ``r_c`` changes no
  weight discontinuously (energies, forces and stress stay smooth; MD conserves energy).
- **Energy.** An MLP of the final invariant features gives per-atom energies, then a per-element affine map
  (scale, reference energy); forces and stress follow by autograd (:mod:`mattersim.potential`).

Every operation on the equivariant stream is linear in it over the channel axis, or multiplies it by
invariants, so rotating the input rotates ``e`` and leaves ``x`` unchanged (tested).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from mattersim.graph import Encoded, GraphBatch, edge_geometry
from mattersim.m3gnet import AtomScaling, polynomial_cutoff

#: size presets after the MatterSim-MT paper's table; "tiny" is for tests and quick experiments
PRESETS: dict[str, dict] = {
    "1M": dict(num_gaussians=64, num_blocks=2, width=128, num_heads=8),
    "10M": dict(num_gaussians=128, num_blocks=3, width=320, num_heads=16),
    "tiny": dict(num_gaussians=16, num_blocks=1, width=32, num_heads=4),
}


class GaussianBasis(nn.Module):
    """``exp(-(r - mu_k)^2 / (2 sigma^2))`` with ``K`` centres evenly spaced on [0, cutoff]."""

    def __init__(self, cutoff: float, num: int):
        super().__init__()
        self.register_buffer("centres", torch.linspace(0.0, float(cutoff), int(num)))
        spacing = float(cutoff) / max(int(num) - 1, 1)
        self.coeff = -0.5 / spacing**2

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.coeff * (r.unsqueeze(-1) - self.centres) ** 2)


def neighbour_softmax(scores: torch.Tensor, weight: torch.Tensor, centre: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """``m_ij * softmax_j(s_ij + log m_ij)`` over the neighbours ``j`` of each centre ``i``.

    scores (E, H), weight (E,) the smooth cutoff ``m_ij`` in [0, 1], centre (E,). Rows of a centre with
    no neighbours are empty; the weights of a centre sum to at most 1.
    """
    heads = scores.shape[1]
    index = centre.unsqueeze(1).expand(-1, heads)
    smax = torch.full((num_atoms, heads), -torch.inf, dtype=scores.dtype, device=scores.device)
    smax = smax.scatter_reduce(0, index, scores.detach(), reduce="amax", include_self=True)
    m = weight.unsqueeze(1)
    w = m * torch.exp(scores - smax.index_select(0, centre))
    denom = torch.zeros((num_atoms, heads), dtype=scores.dtype, device=scores.device).index_add(0, centre, w)
    denom = denom.index_select(0, centre)
    return m * w / torch.where(denom > 0, denom, torch.ones_like(denom))


def equi_norm(e: torch.Tensor, weight: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Rotation-equivariant layer norm of (N, 3, d) features: divide by ``sqrt(mean_c |e_c|^2 + eps)``.

    ``eps = 1`` keeps the map smooth with a bounded gradient where ``e`` vanishes, as it does at every
    centre of inversion: a small ``eps`` would turn a 0.001 Å displacement from such a site into features
    of order one (forces of thousands of eV/Å; the crossing test in tests/test_multitask.py).
    """
    rms = torch.sqrt(torch.mean(torch.sum(e * e, dim=1), dim=-1, keepdim=True) + eps)  # (N, 1)
    return e / rms.unsqueeze(1) * weight


class Context(NamedTuple):
    centre: torch.Tensor  # (E,)
    neighbour: torch.Tensor  # (E,)
    cut: torch.Tensor  # (E,) m_ij
    unit: torch.Tensor  # (E, 3)
    rbf: torch.Tensor  # (E, K)
    num_atoms: int


class _Attention(nn.Module):
    """Shared plumbing: per-head scores with a radial bias, neighbour softmax, aggregation, output map."""

    def __init__(self, width: int, num_heads: int, num_gaussians: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} must be a multiple of num_heads {num_heads}")
        self.width, self.heads, self.head_dim = width, num_heads, width // num_heads
        self.bias = nn.Linear(num_gaussians, num_heads)

    def weights(self, q: torch.Tensor, k: torch.Tensor, ctx: Context, reduce_dims: tuple[int, ...]) -> torch.Tensor:
        """q (N, ..., H, dh) at centres, k (N, ..., H, dh) at neighbours -> attention weights (E, H)."""
        qe = q.index_select(0, ctx.centre)
        ke = k.index_select(0, ctx.neighbour)
        n = 1
        for dim in reduce_dims:
            n *= q.shape[dim]
        scores = torch.sum(qe * ke, dim=reduce_dims) / math.sqrt(n) + self.bias(ctx.rbf)
        return neighbour_softmax(scores, ctx.cut, ctx.centre, ctx.num_atoms)

    def heads_view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:-1], self.heads, self.head_dim)

    def aggregate(self, attn: torch.Tensor, values: torch.Tensor, ctx: Context) -> torch.Tensor:
        """sum_j a_ij v_ij; values (E, ..., H, dh) per edge -> (N, ..., d)."""
        shape = (attn.shape[0],) + (1,) * (values.dim() - 3) + (self.heads, 1)
        weighted = values * attn.view(shape)
        out = torch.zeros((ctx.num_atoms,) + tuple(values.shape[1:]), dtype=values.dtype, device=values.device)
        out = out.index_add(0, ctx.centre, weighted)
        return out.reshape(*out.shape[:-2], self.width)


class InvariantSelfAttention(_Attention):
    def __init__(self, width, num_heads, num_gaussians):
        super().__init__(width, num_heads, num_gaussians)
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, e, ctx):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        attn = self.weights(self.heads_view(q), self.heads_view(k), ctx, (-1,))
        values = self.heads_view(v).index_select(0, ctx.neighbour)
        return x + self.out(self.aggregate(attn, values, ctx)), e


class EquivariantSelfAttention(_Attention):
    def __init__(self, width, num_heads, num_gaussians):
        super().__init__(width, num_heads, num_gaussians)
        self.norm_weight = nn.Parameter(torch.ones(width))
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x, e, ctx):
        q, k, v = self.qkv(equi_norm(e, self.norm_weight)).chunk(3, dim=-1)  # (N, 3, d) each
        attn = self.weights(self.heads_view(q), self.heads_view(k), ctx, (1, -1))
        values = self.heads_view(v).index_select(0, ctx.neighbour)
        return x, e + self.out(self.aggregate(attn, values, ctx))


class InvariantCrossAttention(_Attention):
    """Queries from the invariant stream; keys and values from invariants of the equivariant stream."""

    def __init__(self, width, num_heads, num_gaussians):
        super().__init__(width, num_heads, num_gaussians)
        self.norm = nn.LayerNorm(width)
        self.norm_weight = nn.Parameter(torch.ones(width))
        self.q = nn.Linear(width, width)
        self.pair = nn.Linear(width, 4 * width, bias=False)
        self.out = nn.Linear(width, width)

    def forward(self, x, e, ctx):
        q = self.q(self.norm(x))
        a1, b1, a2, b2 = self.pair(equi_norm(e, self.norm_weight)).chunk(4, dim=-1)
        # no layer norm on these invariants: they vanish together at centres of inversion, where a norm
        # would amplify second-order changes (force constants) by 1/sqrt(eps)
        k, v = torch.sum(a1 * b1, dim=1), torch.sum(a2 * b2, dim=1)
        attn = self.weights(self.heads_view(q), self.heads_view(k), ctx, (-1,))
        values = self.heads_view(v).index_select(0, ctx.neighbour)
        return x + self.out(self.aggregate(attn, values, ctx)), e


class EquivariantCrossAttention(_Attention):
    """Scores from the invariant stream; equivariant values built from the invariant features of the
    neighbour, the bond direction and the neighbour's equivariant features."""

    def __init__(self, width, num_heads, num_gaussians):
        super().__init__(width, num_heads, num_gaussians)
        self.norm = nn.LayerNorm(width)
        self.norm_weight = nn.Parameter(torch.ones(width))
        self.qk = nn.Linear(width, 2 * width)
        self.inv_values = nn.Linear(width, 2 * width)
        self.equi_values = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x, e, ctx):
        xn = self.norm(x)
        q, k = self.qk(xn).chunk(2, dim=-1)
        attn = self.weights(self.heads_view(q), self.heads_view(k), ctx, (-1,))
        radial, gate = self.inv_values(xn).chunk(2, dim=-1)
        ev = self.equi_values(equi_norm(e, self.norm_weight))
        values = (radial.index_select(0, ctx.neighbour).unsqueeze(1) * ctx.unit.unsqueeze(-1)
                  + (gate.unsqueeze(1) * ev).index_select(0, ctx.neighbour))  # (E, 3, d)
        return x, e + self.out(self.aggregate(attn, self.heads_view(values), ctx))


class FeedForward(nn.Module):
    """Invariant MLP; equivariant update gated by the invariant stream."""

    def __init__(self, width: int, factor: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inv = nn.Sequential(nn.Linear(width, factor * width), nn.GELU(), nn.Linear(factor * width, width))
        self.gate = nn.Linear(width, width)
        self.norm_weight = nn.Parameter(torch.ones(width))
        self.equi_in = nn.Linear(width, width, bias=False)
        self.equi_out = nn.Linear(width, width, bias=False)

    def forward(self, x, e):
        xn = self.norm(x)
        gate = torch.sigmoid(self.gate(xn)).unsqueeze(1)
        e = e + self.equi_out(self.equi_in(equi_norm(e, self.norm_weight)) * gate)
        return x + self.inv(xn), e


class TransformerBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, num_gaussians: int, ffn_factor: int = 2):
        super().__init__()
        self.attention = nn.ModuleList([
            InvariantSelfAttention(width, num_heads, num_gaussians),
            EquivariantSelfAttention(width, num_heads, num_gaussians),
            InvariantCrossAttention(width, num_heads, num_gaussians),
            EquivariantCrossAttention(width, num_heads, num_gaussians),
        ])
        self.ffn = FeedForward(width, ffn_factor)

    def forward(self, x, e, ctx):
        for module in self.attention:
            x, e = module(x, e, ctx)
        return self.ffn(x, e)


class TransformerBackbone(nn.Module):
    """GeoMFormer-style energy model; ``atomic_energies`` like :class:`mattersim.m3gnet.M3Gnet`."""

    kind = "transformer"

    def __init__(
        self,
        width: int = 128,
        num_blocks: int = 2,
        num_heads: int = 8,
        num_gaussians: int = 64,
        cutoff: float = 5.0,
        max_z: int = 94,
        ffn_factor: int = 2,
    ):
        super().__init__()
        self.model_args = dict(width=width, num_blocks=num_blocks, num_heads=num_heads,
                               num_gaussians=num_gaussians, cutoff=cutoff, max_z=max_z, ffn_factor=ffn_factor)
        self.cutoff, self.max_z, self.width = float(cutoff), int(max_z), int(width)
        self.threebody_cutoff = 0.0  # no three-body triplets: the graph builder then makes none
        self.embedding = nn.Embedding(max_z + 1, width)
        self.rbf = GaussianBasis(cutoff, num_gaussians)
        self.centrality = nn.Linear(num_gaussians, width, bias=False)  # a bias per edge would jump at r_c
        self.equi_init = nn.Linear(num_gaussians, width, bias=False)
        self.blocks = nn.ModuleList(
            [TransformerBlock(width, num_heads, num_gaussians, ffn_factor) for _ in range(num_blocks)]
        )
        self.final_norm = nn.LayerNorm(width)
        self.energy = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))
        self.normalizer = AtomScaling(max_z)
        nn.init.normal_(self.embedding.weight, std=1.0)

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "TransformerBackbone":
        if preset not in PRESETS:
            raise ValueError(f"unknown transformer preset {preset!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[preset], **overrides})

    def get_model_args(self) -> dict:
        return dict(self.model_args)

    def encode(self, graph: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> Encoded:
        vec, length = edge_geometry(graph, positions, cell)
        centre, neighbour = graph.edge_index[0], graph.edge_index[1]
        cut = polynomial_cutoff(length, self.cutoff) * (length < self.cutoff)
        rbf = self.rbf(length)
        unit = vec / length.clamp_min(1e-9).unsqueeze(1)
        n = graph.num_atoms
        ctx = Context(centre, neighbour, cut, unit, rbf, n)
        weighted = rbf * cut.unsqueeze(1)
        x = self.embedding(graph.numbers)
        x = x + torch.zeros_like(x).index_add(0, centre, self.centrality(weighted))
        e_edge = self.equi_init(weighted).unsqueeze(1) * unit.unsqueeze(-1)  # (E, 3, d)
        e = torch.zeros((n, 3, self.width), dtype=x.dtype, device=x.device).index_add(0, centre, e_edge)
        for block in self.blocks:
            x, e = block(x, e, ctx)
        return Encoded(self.final_norm(x), e, vec, length)

    def readout(self, enc: Encoded, graph: GraphBatch) -> torch.Tensor:
        return self.normalizer(self.energy(enc.atom).view(-1), graph.numbers)

    def atomic_energies(self, graph: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        return self.readout(self.encode(graph, positions, cell), graph)
