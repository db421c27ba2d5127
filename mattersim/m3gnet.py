"""The MatterSim v1 backbone: an M3GNet graph network, number-for-number the official model.

The module tree and parameter names are those of the official implementation, so the official checkpoint
files (``mattersim-v1.0.0-1M.pth``, ``-5M.pth``) load unchanged with ``strict=True``. The arithmetic is
the same function, rearranged for speed where the rearrangement is exact in real arithmetic:

- The first layer of each gated MLP acts on ``concat(v_i, v_j, e_ij)``; its weight is split into the
  three blocks, the two atom blocks are applied once per atom and gathered onto the edges (a third of the
  per-edge multiply-adds).
- The three-body sum ``sum_k sigmoid(W v_i) * basis_ijk * f(r_ij) f(r_ik)`` has a factor that only depends
  on the centre atom ``i``; the remaining sum over ``k`` is the same in every block and is computed once.

Results agree with the official code to float32 rounding (about 1e-7 relative).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mattersim.graph import Encoded, GraphBatch, edge_geometry

#: model_args of the official v1 architecture (1M checkpoint); the 5M one differs in ``units``/blocks.
DEFAULT_MODEL_ARGS = {
    "num_blocks": 4,
    "units": 128,
    "max_l": 4,
    "max_n": 4,
    "cutoff": 5.0,
    "max_z": 94,
    "threebody_cutoff": 4.0,
}


def cached(module: nn.Module, name: str, tensors: list[torch.Tensor], build):
    """``build()``, cached on ``module`` while ``tensors`` (weights or buffers) are frozen and unchanged.

    Derived constants (fused weight blocks, recursion matrices) are rebuilt whenever a source tensor is
    modified in place, replaced, moved, or requires grad (training builds them anew every call)."""
    if any(t.requires_grad for t in tensors):
        return build()
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    hit = module.__dict__.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build()
    module.__dict__[name] = (key, value)
    return value


class Dense(nn.Module):
    """A linear layer with an optional activation (``None``, ``"swish"`` or ``"sigmoid"``)."""

    def __init__(self, in_dim: int, out_dim: int, activation: str | None, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activate(self.linear(x), self.activation)


def activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "swish":
        return F.silu(x)  # x * sigmoid(x), one fused kernel forward and backward
    if activation == "sigmoid":
        return torch.sigmoid(x)
    return x


class MLP(nn.Module):
    def __init__(self, in_dim: int, out_dims: list[int], activation: str | None, bias: bool = True):
        super().__init__()
        dims = [in_dim] + list(out_dims)
        self.mlp = nn.Sequential(*[Dense(dims[k], dims[k + 1], activation, bias) for k in range(len(out_dims))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class GatedMLP(nn.Module):
    """``g(x) * sigma(x)``: two MLPs of the same widths, the last layer of ``sigma`` a sigmoid."""

    def __init__(self, in_dim: int, out_dims: list[int], activation, bias: bool = True):
        super().__init__()
        acts = [activation] * len(out_dims) if isinstance(activation, str) or activation is None else list(activation)
        gate_acts = acts[:-1] + ["sigmoid"]
        dims = [in_dim] + list(out_dims)
        self.g = nn.Sequential(*[Dense(dims[k], dims[k + 1], acts[k], bias) for k in range(len(out_dims))])
        self.sigma = nn.Sequential(*[Dense(dims[k], dims[k + 1], gate_acts[k], bias) for k in range(len(out_dims))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g(x) * self.sigma(x)

    def forward_first_layer_done(self, pre: torch.Tensor) -> torch.Tensor:
        """Finish the MLPs given the pre-activations of both first layers, ``concat(g, sigma)``."""
        if self.g[0].activation == self.sigma[0].activation:
            h_g, h_s = activate(pre, self.g[0].activation).chunk(2, dim=1)
        else:
            pre_g, pre_s = pre.chunk(2, dim=1)
            h_g, h_s = activate(pre_g, self.g[0].activation), activate(pre_s, self.sigma[0].activation)
        for layer_g, layer_s in zip(self.g[1:], self.sigma[1:]):
            h_g = layer_g(h_g)
            h_s = layer_s(h_s)
        return h_g * h_s

    def bond_weights(self, units: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """First-layer weights of g and sigma stacked (2H output rows) and split by input block:
        ``(W_atoms^T (U, 4H) = [centre | neighbour], W_edge^T (U, 2H), bias (2H,) or None)``.

        Cached while the weights are frozen (inference); rebuilt whenever they change or train.
        """
        g, s = self.g[0].linear, self.sigma[0].linear

        def build():
            w = torch.cat([g.weight, s.weight], dim=0)  # (2H, 3U)
            bias = torch.cat([g.bias, s.bias]) if g.bias is not None else None
            w_atoms = torch.cat([w[:, :units], w[:, units : 2 * units]], dim=0).t().contiguous()
            return w_atoms, w[:, 2 * units :].t().contiguous(), bias

        return cached(self, "_bond_weights", [t for t in (g.weight, s.weight, g.bias, s.bias) if t is not None], build)


class SmoothBesselBasis(nn.Module):
    """Smooth radial Bessel basis (DimeNet / M3GNet) with zero value and derivatives at the cutoff."""

    def __init__(self, r_max: float, max_n: int):
        super().__init__()
        self.max_n = max_n
        n = torch.arange(0, max_n).float()[None, :]
        pi, sqrt2 = 3.1415926535897, 1.41421356237
        fnr = (-1) ** n * sqrt2 * pi / r_max**1.5 * (n + 1) * (n + 2) / torch.sqrt(2 * n**2 + 6 * n + 5)
        en = n**2 * (n + 2) ** 2 / (4 * (n + 1) ** 4 + 1)
        dn = [torch.tensor(1.0)]
        for k in range(1, max_n):
            dn.append(1 - en[0, k] / dn[-1])
        self.register_buffer("dn", torch.stack(dn))
        self.register_buffer("en", en)
        self.register_buffer("fnr_weights", fnr)
        self.register_buffer("n_1_pi_cutoff", ((torch.arange(0, max_n).float() + 1) * pi / r_max).reshape(1, -1))
        self.register_buffer("n_2_pi_cutoff", ((torch.arange(0, max_n).float() + 2) * pi / r_max).reshape(1, -1))
        self.register_buffer("r_max", torch.tensor(float(r_max)))

    def recursion_matrix(self) -> torch.Tensor:
        """M with g = f @ M: the orthogonalising recursion g_k = (f_k + sqrt(e_k / d_(k-1)) g_(k-1)) / sqrt(d_k),
        a fixed linear map, applied to the identity."""

        def build():
            eye = torch.eye(self.max_n, dtype=self.dn.dtype, device=self.dn.device)
            rows = [eye[0]]
            for k in range(1, self.max_n):
                rows.append(1 / torch.sqrt(self.dn[k]) * (eye[k] + torch.sqrt(self.en[0, k] / self.dn[k - 1]) * rows[-1]))
            return torch.stack(rows, dim=1)

        return cached(self, "_recursion", [self.dn, self.en], build)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        x1 = r.unsqueeze(-1) * self.n_1_pi_cutoff
        x2 = r.unsqueeze(-1) * self.n_2_pi_cutoff
        fnr = self.fnr_weights * (torch.sin(x1) / x1 + torch.sin(x2) / x2)
        return fnr @ self.recursion_matrix()


# Spherical Bessel functions j_l(z_ln x) written as in the official code: coefficients per order
# (rows of ``coef``), evaluated at x = r / cutoff.
_SPH_BESSEL_ROOTS = [
    [3.14159274101257, 6.28318548202515, 9.42477798461914, 12.5663709640503],
    [4.49340963363647, 7.7252516746521, 10.9041213989258, 14.0661935806274],
    [5.76345920562744, 9.09501171112061, 12.322940826416, 15.5146026611328],
    [6.9879322052002, 10.4171180725098, 13.6980228424072, 16.9236221313477],
]
_SPH_BESSEL_COEF = {
    1: [
        [-1.02446483277785, -1.00834335996107, -1.00419641763893, -1.00252381898662],
        [0.22799275301076, 0.130525632358311, 0.092093290316619, 0.0712718627992818],
    ],
    2: [
        [-1.04807944170731, -1.01861796359391, -1.01002272174988, -1.00628955560036],
        [0.545547077361439, 0.335992298618515, 0.245888396928293, 0.194582402961821],
        [0.0946561878721665, 0.0369424811413594, 0.0199537107571916, 0.0125418876146463],
    ],
    3: [
        [1.06942831392075, 1.0292173312802, 1.01650804843248, 1.01069656069999],
        [0.918235852195231, 0.592803493701152, 0.445250264272671, 0.358326327374518],
        [0.328507713452024, 0.142266673367543, 0.0812617757677838, 0.0529328657590962],
        [0.0470107184508114, 0.0136570088173405, 0.0059323726279831, 0.00312775039221944],
    ],
}


class SphericalBasisLayer(nn.Module):
    """Three-body basis: spherical Bessel functions of r_ik times spherical harmonics of the angle."""

    def __init__(self, max_n: int, max_l: int, cutoff: float):
        super().__init__()
        if max_l > 4 or max_n > 4:
            raise ValueError("the v1 spherical basis supports max_l <= 4 and max_n <= 4")
        self.max_n, self.max_l, self.cutoff = max_n, max_l, cutoff
        self.register_buffer("factor", torch.sqrt(torch.tensor(2.0 / cutoff**3)))
        coef = torch.zeros(4, 9, 4)
        coef[0, 0, :] = torch.tensor(_SPH_BESSEL_ROOTS[0])
        for order, amps in _SPH_BESSEL_COEF.items():
            for k, amp in enumerate(amps):
                coef[order, 2 * k, :] = torch.tensor(amp)
                coef[order, 2 * k + 1, :] = torch.tensor(_SPH_BESSEL_ROOTS[order])
        self.register_buffer("coef", coef)

    def radial_coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The official per-order formulas as ``(P_sin(x) sin(a x) + P_cos(x) cos(a x)) / x^(order+1)``:
        roots ``a`` (1, S), polynomial coefficients of P_sin and P_cos (4, S) in powers x^0..x^3, and the
        denominators' exponents (S,), columns order-major as the official basis."""

        def build():
            c = self.coef[:, :, : self.max_l]
            zero = torch.zeros_like(c[0, 0])
            # rows: x^0, x^1, x^2, x^3 ; one block of max_l columns per order
            p_sin = [torch.stack([torch.ones_like(zero), zero, zero, zero])]
            p_cos = [torch.stack([zero, zero, zero, zero])]
            roots = [c[0, 0]]
            if self.max_n > 1:
                p_sin.append(torch.stack([c[1, 2], zero, zero, zero]))
                p_cos.append(torch.stack([zero, c[1, 0], zero, zero]))
                roots.append(c[1, 1])
            if self.max_n > 2:
                p_sin.append(torch.stack([c[2, 4], zero, c[2, 0], zero]))
                p_cos.append(torch.stack([zero, -c[2, 2], zero, zero]))
                roots.append(c[2, 1])
            if self.max_n > 3:
                p_sin.append(torch.stack([c[3, 6], zero, -c[3, 2], zero]))
                p_cos.append(torch.stack([zero, -c[3, 4], zero, c[3, 0]]))
                roots.append(c[3, 1])
            orders = torch.arange(len(roots), dtype=c.dtype, device=c.device).repeat_interleave(self.max_l)
            return torch.cat(roots).unsqueeze(0), torch.cat(p_sin, dim=1), torch.cat(p_cos, dim=1), orders + 1

        return cached(self, "_radial", [self.coef], build)

    def radial(self, r: torch.Tensor) -> torch.Tensor:
        """Spherical Bessel functions of r, shape (len(r), max_n * max_l), order-major as the official code."""
        roots, p_sin, p_cos, exponents = self.radial_coefficients()
        x = (r / self.cutoff).unsqueeze(1)
        powers = torch.cat([torch.ones_like(x), x, x * x, x * x * x], dim=1)  # (E, 4)
        z = x * roots
        value = (powers @ p_sin) * torch.sin(z) + (powers @ p_cos) * torch.cos(z)
        return value / x.pow(exponents) * self.factor

    def angular(self, cos_theta: torch.Tensor) -> torch.Tensor:
        """Spherical harmonics Y_l0 for l < max_l, shape (len(cos_theta), max_l)."""
        sh = [torch.full_like(cos_theta, 0.5 * math.sqrt(1.0 / math.pi))]
        if self.max_l > 1:
            sh.append(math.sqrt(3.0 / (4.0 * math.pi)) * cos_theta)
        if self.max_l > 2:
            sh.append(math.sqrt(5.0 / (16.0 * math.pi)) * (3.0 * cos_theta**2 - 1.0))
        if self.max_l > 3:
            sh.append(math.sqrt(7.0 / (16.0 * math.pi)) * cos_theta * (5.0 * cos_theta**2 - 3.0))
        return torch.stack(sh, dim=1)

    def combine(self, radial: torch.Tensor, angular: torch.Tensor) -> torch.Tensor:
        """radial (T, max_n*max_l) times angular (T, max_l) repeated max_n times along the basis axis."""
        t = radial.shape[0]
        return (radial.view(t, self.max_l, self.max_n) * angular.unsqueeze(2)).view(t, self.max_l * self.max_n)


def polynomial_cutoff(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    x = r / cutoff
    return torch.clamp(1 - 6 * x**5 + 15 * x**4 - 10 * x**3, min=0.0)


class ThreeDInteraction(nn.Module):
    def __init__(self, units: int, spherical_dim: int):
        super().__init__()
        self.atom_mlp = Dense(units, spherical_dim, "sigmoid")
        self.edge_gate_mlp = GatedMLP(spherical_dim, [units], "swish", bias=False)

    def forward(self, edge_attr, atom_gate, edge_center, threebody_sum):
        """``atom_gate = atom_mlp(v)``; threebody_sum[ij] = sum_k basis_ijk f(r_ij) f(r_ik).

        The official gate ``sigmoid(W v_i)`` multiplies every triplet of centre ``i``; it is applied after
        the sum over ``k``, which is therefore shared by all blocks."""
        e_tilde = atom_gate.index_select(0, edge_center) * threebody_sum
        gate = self.edge_gate_mlp
        return torch.addcmul(edge_attr, gate.g[0](e_tilde), gate.sigma[0](e_tilde))


class EdgeChunk(NamedTuple):
    """A slice of the edges and what the blocks need of it (see :meth:`M3Gnet.atomic_energies`)."""

    rbf: torch.Tensor  # (e, max_n)
    threebody_sum: torch.Tensor  # (e, max_n * max_l)
    centre: torch.Tensor  # (e,)
    bond_pairs: torch.Tensor  # (e, 2): [centre, N + neighbour]


class MainBlock(nn.Module):
    def __init__(self, units: int, max_n: int, max_l: int):
        super().__init__()
        self.units = units
        self.gated_mlp_atom = GatedMLP(3 * units, [units, units], "swish")
        self.edge_layer_atom = Dense(max_n, units, "swish", bias=False)
        self.gated_mlp_edge = GatedMLP(3 * units, [units, units], "swish")
        self.edge_layer_edge = Dense(max_n, units, None, bias=False)
        self.three_body = ThreeDInteraction(units, max_n * max_l)

    def _atom_table(self, mlp: GatedMLP, atom_attr: torch.Tensor) -> torch.Tensor:
        """The centre and neighbour blocks of ``mlp``'s first layer applied per atom, stacked (2N, 2H)."""
        w_atoms, _, bias = mlp.bond_weights(self.units)
        per_centre, per_neighbour = (atom_attr @ w_atoms).chunk(2, dim=1)
        if bias is not None:
            per_centre = per_centre + bias
        return torch.cat([per_centre, per_neighbour], dim=0)

    def _gated_on_bond(self, mlp: GatedMLP, table, edge_attr, bond_pairs) -> torch.Tensor:
        """``mlp(concat(v_i, v_j, e_ij))``: one fused gather-and-sum (embedding_bag) of the per-atom rows,
        accumulated into the GEMM of the edge block.

        ``embedding_bag`` has no second derivative, which training on forces and stress needs (the loss
        differentiates the forces again); in training mode or with trainable weights the equivalent pair
        of ``index_select`` gathers is used instead."""
        if torch.is_grad_enabled() and (self.training or mlp.g[0].linear.weight.requires_grad):
            gathered = table.index_select(0, bond_pairs[:, 0]) + table.index_select(0, bond_pairs[:, 1])
        else:
            gathered = F.embedding_bag(bond_pairs, table, mode="sum")
        pre = torch.addmm(gathered, edge_attr, mlp.bond_weights(self.units)[1])
        return mlp.forward_first_layer_done(pre)

    def forward(self, atom_attr: torch.Tensor, edge_attrs: list[torch.Tensor], chunks: list[EdgeChunk]):
        """One message-passing block. Edges are processed chunk by chunk (each chunk's chain of per-edge
        operations stays in cache); atoms see the messages of all chunks."""
        gate = self.three_body.atom_mlp(atom_attr)
        table_edge = self._atom_table(self.gated_mlp_edge, atom_attr)
        table_atom = self._atom_table(self.gated_mlp_atom, atom_attr)
        new_edges = []
        aggregated = torch.zeros_like(atom_attr)
        for edge_attr, c in zip(edge_attrs, chunks):
            edge_attr = self.three_body(edge_attr, gate, c.centre, c.threebody_sum)
            update = self._gated_on_bond(self.gated_mlp_edge, table_edge, edge_attr, c.bond_pairs)
            edge_attr = torch.addcmul(edge_attr, update, self.edge_layer_edge(c.rbf))
            messages = self._gated_on_bond(self.gated_mlp_atom, table_atom, edge_attr, c.bond_pairs)
            aggregated = aggregated.index_add(0, c.centre, messages * self.edge_layer_atom(c.rbf))
            new_edges.append(edge_attr)
        return atom_attr + aggregated, new_edges


class AtomScaling(nn.Module):
    """Per-element affine map of the atomic energies: ``scale[Z] * e + shift[Z]``."""

    def __init__(self, max_z: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(max_z + 1))
        self.register_buffer("shift", torch.zeros(max_z + 1))

    def forward(self, energies: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        return self.scale[numbers] * energies + self.shift[numbers]


class M3Gnet(nn.Module):
    """M3GNet energy model. ``forward`` returns per-atom energies (eV) given a batch and its geometry."""

    def __init__(
        self,
        num_blocks: int = 4,
        units: int = 128,
        max_l: int = 4,
        max_n: int = 4,
        cutoff: float = 5.0,
        max_z: int = 94,
        threebody_cutoff: float = 4.0,
    ):
        super().__init__()
        self.model_args = dict(
            num_blocks=num_blocks, units=units, max_l=max_l, max_n=max_n,
            cutoff=cutoff, max_z=max_z, threebody_cutoff=threebody_cutoff,
        )
        self.cutoff, self.threebody_cutoff, self.max_z = float(cutoff), float(threebody_cutoff), max_z
        #: edges per chunk in the message-passing blocks (a speed setting: results do not depend on it)
        self.edge_chunk = 2048
        self.rbf = SmoothBesselBasis(cutoff, max_n)
        self.sbf = SphericalBasisLayer(max_n, max_l, cutoff)
        self.edge_encoder = MLP(max_n, [units], "swish", bias=False)
        self.graph_conv = nn.ModuleList([MainBlock(units, max_n, max_l) for _ in range(num_blocks)])
        self.final = GatedMLP(units, [units, units, 1], ["swish", "swish", None])
        self.atom_embedding = MLP(max_z + 1, [units], None, bias=False)
        self.normalizer = AtomScaling(max_z)
        for m in self.modules():  # the official initialisation, for training from scratch
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
        nn.init.uniform_(self.atom_embedding.mlp[0].linear.weight, -0.05, 0.05)

    kind = "m3gnet"

    def atomic_energies(self, graph: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Per-atom energies for the given (possibly strained, autograd-tracked) positions and cells."""
        return self.readout(self.encode(graph, positions, cell), graph)

    def readout(self, enc, graph: GraphBatch) -> torch.Tensor:
        """Per-atom energies from the encoded atom features (the official final gated MLP and scaling)."""
        return self.normalizer(self.final(enc.atom).view(-1), graph.numbers)

    def encode(self, graph: GraphBatch, positions: torch.Tensor, cell: torch.Tensor):
        """Atom features after the message-passing blocks, with the edge geometry, for energy and heads
        (a :class:`mattersim.graph.Encoded` without equivariant features)."""
        centre, neighbour = graph.edge_index[0], graph.edge_index[1]
        # centre -> neighbour vectors; the official code uses neighbour -> centre, the exact negation (the
        # products and norms below do not see the sign)
        edge_vec, edge_len = edge_geometry(graph, positions, cell)

        t_ij, t_ik = graph.triplets[:, 0], graph.triplets[:, 1]
        r_ij, r_ik = edge_len.index_select(0, t_ij), edge_len.index_select(0, t_ik)
        cos_jik = torch.sum(edge_vec.index_select(0, t_ij) * edge_vec.index_select(0, t_ik), dim=1) / (r_ij * r_ik)
        cos_jik = torch.clamp(cos_jik, min=-1.0 + 1e-7, max=1.0 - 1e-7)
        # the radial basis and the cutoff weight depend on one edge only: evaluate per edge, gather per triplet
        smooth = polynomial_cutoff(edge_len, self.threebody_cutoff).unsqueeze(1)
        radial_ik = (self.sbf.radial(edge_len) * smooth).index_select(0, t_ik)
        basis = self.sbf.combine(radial_ik, self.sbf.angular(torch.cos(torch.acos(cos_jik))))
        threebody_sum = torch.zeros(edge_len.shape[0], basis.shape[1], dtype=basis.dtype, device=basis.device)
        threebody_sum = threebody_sum.index_add(0, t_ij, basis) * smooth

        weight_emb = self.atom_embedding.mlp[0].linear.weight  # one-hot @ W^T is a column lookup
        atom_attr = F.embedding(graph.numbers, weight_emb.t())
        rbf = self.rbf(edge_len)
        bond_pairs = torch.stack([centre, neighbour + atom_attr.shape[0]], dim=1)
        size = self.edge_chunk
        chunks = [
            EdgeChunk(*parts)
            for parts in zip(rbf.split(size), threebody_sum.split(size), centre.split(size), bond_pairs.split(size))
        ]
        edge_attrs = [self.edge_encoder(c.rbf) for c in chunks]
        for block in self.graph_conv:
            atom_attr, edge_attrs = block(atom_attr, edge_attrs, chunks)
        return Encoded(atom_attr, None, edge_vec, edge_len)

    def get_model_args(self) -> dict:
        return dict(self.model_args)
