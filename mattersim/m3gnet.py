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

import torch
import torch.nn as nn
import torch.nn.functional as F

from mattersim.graph import GraphBatch

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

    def split_first_layer(self, units: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """First-layer weights of g and sigma stacked, split into (centre, neighbour, edge) column blocks."""
        w = torch.cat([self.g[0].linear.weight, self.sigma[0].linear.weight], dim=0)  # (2H, 3U)
        b = None
        if self.g[0].linear.bias is not None:
            b = torch.cat([self.g[0].linear.bias, self.sigma[0].linear.bias])
        return w[:, :units], w[:, units : 2 * units], w[:, 2 * units :], b


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

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        x1 = r.unsqueeze(-1) * self.n_1_pi_cutoff
        x2 = r.unsqueeze(-1) * self.n_2_pi_cutoff
        fnr = self.fnr_weights * (torch.sin(x1) / x1 + torch.sin(x2) / x2)
        gn = [fnr[:, 0]]
        for k in range(1, self.max_n):
            gn.append(1 / torch.sqrt(self.dn[k]) * (fnr[:, k] + torch.sqrt(self.en[0, k] / self.dn[k - 1]) * gn[-1]))
        return torch.stack(gn, dim=1)


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

    def radial(self, r: torch.Tensor) -> torch.Tensor:
        """Spherical Bessel functions of r, shape (len(r), max_n * max_l), order-major as the official code."""
        x = (r / self.cutoff).unsqueeze(1)
        c = self.coef[:, :, : self.max_l]
        orders = [torch.sin(c[0, 0] * x) / x]
        if self.max_n > 1:
            orders.append((c[1, 0] * x * torch.cos(c[1, 1] * x) + c[1, 2] * torch.sin(c[1, 3] * x)) / x**2)
        if self.max_n > 2:
            orders.append(
                (c[2, 0] * x**2 * torch.sin(c[2, 1] * x) - c[2, 2] * x * torch.cos(c[2, 3] * x)
                 + c[2, 4] * torch.sin(c[2, 5] * x)) / x**3
            )
        if self.max_n > 3:
            orders.append(
                (c[3, 0] * x**3 * torch.cos(c[3, 1] * x) - c[3, 2] * x**2 * torch.sin(c[3, 3] * x)
                 - c[3, 4] * x * torch.cos(c[3, 5] * x) + c[3, 6] * torch.sin(c[3, 7] * x)) / x**4
            )
        return torch.cat(orders, dim=1) * self.factor

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

    def forward(self, r: torch.Tensor, cos_theta: torch.Tensor) -> torch.Tensor:
        """The three-body basis of triplets with second-edge length r and angle cosine cos_theta."""
        return self.combine(self.radial(r), self.angular(cos_theta))


def polynomial_cutoff(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    x = r / cutoff
    return torch.clamp(1 - 6 * x**5 + 15 * x**4 - 10 * x**3, min=0.0)


class ThreeDInteraction(nn.Module):
    def __init__(self, units: int, spherical_dim: int):
        super().__init__()
        self.atom_mlp = Dense(units, spherical_dim, "sigmoid")
        self.edge_gate_mlp = GatedMLP(spherical_dim, [units], "swish", bias=False)

    def forward(self, edge_attr, atom_attr, edge_center, threebody_sum):
        # threebody_sum[ij] = sum_k basis_ijk f(r_ij) f(r_ik); the atom gate depends on the centre only
        e_tilde = self.atom_mlp(atom_attr).index_select(0, edge_center) * threebody_sum
        gate = self.edge_gate_mlp
        return torch.addcmul(edge_attr, gate.g[0](e_tilde), gate.sigma[0](e_tilde))


class MainBlock(nn.Module):
    def __init__(self, units: int, max_n: int, max_l: int):
        super().__init__()
        self.units = units
        self.gated_mlp_atom = GatedMLP(3 * units, [units, units], "swish")
        self.edge_layer_atom = Dense(max_n, units, "swish", bias=False)
        self.gated_mlp_edge = GatedMLP(3 * units, [units, units], "swish")
        self.edge_layer_edge = Dense(max_n, units, None, bias=False)
        self.three_body = ThreeDInteraction(units, max_n * max_l)

    def _gated_on_bond(self, mlp: GatedMLP, atom_attr, edge_attr, bond_pairs) -> torch.Tensor:
        """``mlp(concat(v_i, v_j, e_ij))`` with the atom blocks of the first layer applied per atom.

        ``bond_pairs`` is (E, 2) ``[i, N + j]``: one fused gather-and-sum (embedding_bag) of the centre and
        neighbour rows of the per-atom table, accumulated into the edge-block GEMM.
        """
        w_center, w_neighbour, w_edge, bias = mlp.split_first_layer(self.units)
        per_atom = atom_attr @ torch.cat([w_center, w_neighbour], dim=0).t()  # (N, 4H)
        per_centre, per_neighbour = per_atom.chunk(2, dim=1)
        if bias is not None:
            per_centre = per_centre + bias
        gathered = F.embedding_bag(bond_pairs, torch.cat([per_centre, per_neighbour], dim=0), mode="sum")
        pre = torch.addmm(gathered, edge_attr, w_edge.t())
        return mlp.forward_first_layer_done(pre)

    def forward(self, atom_attr, edge_attr, rbf, edge_index, threebody_sum):
        bond_pairs = torch.stack([edge_index[0], edge_index[1] + atom_attr.shape[0]], dim=1)
        edge_attr = self.three_body(edge_attr, atom_attr, edge_index[0], threebody_sum)
        update = self._gated_on_bond(self.gated_mlp_edge, atom_attr, edge_attr, bond_pairs)
        edge_attr = torch.addcmul(edge_attr, update, self.edge_layer_edge(rbf))
        messages = self._gated_on_bond(self.gated_mlp_atom, atom_attr, edge_attr, bond_pairs) * self.edge_layer_atom(rbf)
        atom_attr = atom_attr.index_add(0, edge_index[0], messages)
        return atom_attr, edge_attr


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

    def atomic_energies(self, graph: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Per-atom energies for the given (possibly strained, autograd-tracked) positions and cells."""
        centre, neighbour = graph.edge_index[0], graph.edge_index[1]
        offsets = torch.bmm(graph.edge_shift.unsqueeze(1), cell.index_select(0, graph.edge_batch)).squeeze(1)
        edge_vec = positions.index_select(0, centre) - (positions.index_select(0, neighbour) + offsets)
        edge_len = torch.linalg.norm(edge_vec, dim=1)

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
        edge_attr = self.edge_encoder(rbf)
        for block in self.graph_conv:
            atom_attr, edge_attr = block(atom_attr, edge_attr, rbf, graph.edge_index, threebody_sum)
        energies = self.final(atom_attr).view(-1)
        return self.normalizer(energies, graph.numbers)

    def get_model_args(self) -> dict:
        return dict(self.model_args)
