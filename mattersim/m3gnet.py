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

import contextlib
import math
import threading
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from mattersim.graph import Encoded, GraphBatch, edge_geometry
from mattersim.memory import MALLOC_TRIM, MemoryModel

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

    def angular_derivative(self, cos_theta: torch.Tensor) -> torch.Tensor:
        """d/d cos_theta of :meth:`angular`, shape (len(cos_theta), max_l)."""
        d = [torch.zeros_like(cos_theta)]
        if self.max_l > 1:
            d.append(torch.full_like(cos_theta, math.sqrt(3.0 / (4.0 * math.pi))))
        if self.max_l > 2:
            d.append(math.sqrt(5.0 / (16.0 * math.pi)) * 6.0 * cos_theta)
        if self.max_l > 3:
            d.append(math.sqrt(7.0 / (16.0 * math.pi)) * (15.0 * cos_theta**2 - 3.0))
        return torch.stack(d, dim=1)

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


# ---------------------------------------------------------------------------------------------------------
# memory-lean inference: what autograd keeps for forces and stress
# ---------------------------------------------------------------------------------------------------------
#
# Forces and stress differentiate the energy with respect to positions and strain only (the weights are
# frozen). Plain autograd keeps every intermediate of the per-edge chain, about 2600 numbers per edge and
# block with the v1 widths, and some 40 numbers per triplet. In inference the functions below keep only
# what the derivative needs and recompute the rest in backward, with the same forward arithmetic:
#
# - memory mode ``"fast"``: per edge and block the first- and second-layer pre-activations of the two
#   gated MLPs (8 * units numbers); the element-wise parts and the narrow products (inner width max_n or
#   max_n * max_l) are recomputed;
# - ``"lean"``: the first-layer pre-activations only (4 * units); the second-layer GEMMs are recomputed
#   (about 20 % more time than fast);
# - ``"recompute"``: only the edge features between blocks (2 * units with their copies); backward reruns
#   each chunk of each block with plain autograd (about 75 % more time than fast), for structures that do
#   not fit otherwise.
#
# Forces and stress of 512-atom Si, 1M model, float32, one CPU thread (CPU seconds of the model call):
# fast 0.84, lean 0.99, recompute 1.47; a whole ``Potential.predict`` in the fast mode takes within a few
# per cent of the plain-autograd code it replaces, with 2.7x less memory (benchmarks/speed_potential.py).
# The three-body basis keeps nothing per triplet in all three modes. These paths are first-derivative
# only: training (trainable weights or ``model.train()``) and ``create_graph=True``
# (:func:`twice_differentiable`) use plain autograd.

MEMORY_MODES = ("fast", "lean", "recompute")
_FLAGS = threading.local()


@contextlib.contextmanager
def _flag(name: str, value):
    old = getattr(_FLAGS, name, None)
    setattr(_FLAGS, name, value)
    try:
        yield
    finally:
        setattr(_FLAGS, name, old)


def memory_mode(mode: str = "fast"):
    """Context manager: how much the M3GNet forward keeps for the forces and stress backward (one of
    :data:`MEMORY_MODES`); results are the same in all modes."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode {mode!r} is not one of {MEMORY_MODES}")
    return _flag("mode", mode)


def twice_differentiable(enabled: bool = True):
    """Context manager: the forward pass records a graph that can be differentiated twice (forces in a
    loss); :func:`mattersim.potential.evaluate` enters it for ``create_graph=True``."""
    return _flag("twice", enabled)


def _current_mode() -> str:
    return getattr(_FLAGS, "mode", None) or "fast"


def _inference(module: nn.Module) -> bool:
    """Whether the first-derivative paths apply: evaluation mode, frozen weights, no double backward."""
    if module.training or getattr(_FLAGS, "twice", None):
        return False
    return not any(p.requires_grad for p in module.parameters())


class _HeapTrim:
    """Hands the C heap's free pages back to the operating system every few edge chunks of a large graph
    (the recompute mode, whose plain-autograd chunks allocate their temporaries afresh).

    Per-chunk temporaries (a few MB) are freed into glibc's heap, where small long-lived allocations
    (autograd nodes) settle in the holes; the next chunk then takes fresh memory, and resident memory grew
    to about 1.7x what autograd keeps (2000-atom Si: 1.21 GB instead of 0.70 GB). ``malloc_trim`` returns the
    free pages, at the price of faulting them in again; a no-op where it does not exist (non-glibc) and for
    tensors not on the CPU. The fast and lean modes avoid the churn instead (:class:`_Workspace`)."""

    every = 4

    def __init__(self, n_chunks: int, device: torch.device):
        self.active = MALLOC_TRIM is not None and device.type == "cpu" and n_chunks > self.every
        self.count = 0

    def tick(self) -> None:
        if self.active:
            self.count += 1
            if self.count % self.every == 0:
                MALLOC_TRIM(0)


def _silu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad * d silu(x) / dx``, in place in ``grad`` (autograd's own fused kernel)."""
    return torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=grad)


def _sigmoid_backward(grad: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``grad * s * (1 - s)`` for ``s = sigmoid(x)``, in place in ``grad`` (autograd's own fused kernel)."""
    return torch.ops.aten.sigmoid_backward.grad_input(grad, s, grad_input=grad)


class _ThreeBodyBasis(torch.autograd.Function):
    """``raw[e] = sum over triplets (e, k) of combine(radial[k], Y(cos theta_e,k))`` (the official three-body
    basis, summed onto the first edge), evaluated in triplet chunks and keeping no per-triplet tensor:
    backward recomputes the angles chunk by chunk."""

    @staticmethod
    def forward(ctx, edge_vec, edge_len, radial, triplets, sbf, chunk: int):
        ctx.save_for_backward(edge_vec, edge_len, radial, triplets)
        ctx.sbf, ctx.chunk = sbf, chunk
        raw = radial.new_zeros(radial.shape)
        for part in triplets.split(chunk):
            t_ij, t_ik = part[:, 0], part[:, 1]
            *_, cos_t = _ThreeBodyBasis._angles(edge_vec, edge_len, t_ij, t_ik)
            basis = sbf.combine(radial.index_select(0, t_ik), sbf.angular(torch.cos(torch.acos(cos_t))))
            raw.index_add_(0, t_ij, basis)
        return raw

    @staticmethod
    def _angles(edge_vec, edge_len, t_ij, t_ik):
        """The official ``cos_jik`` with its ingredients (same operations, same rounding)."""
        v_ij, v_ik = edge_vec.index_select(0, t_ij), edge_vec.index_select(0, t_ik)
        r_ij, r_ik = edge_len.index_select(0, t_ij), edge_len.index_select(0, t_ik)
        raw_cos = torch.sum(v_ij * v_ik, dim=1) / (r_ij * r_ik)
        return v_ij, v_ik, r_ij, r_ik, raw_cos, torch.clamp(raw_cos, min=-1.0 + 1e-7, max=1.0 - 1e-7)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        edge_vec, edge_len, radial, triplets = ctx.saved_tensors
        sbf = ctx.sbf
        grad_vec, grad_len, grad_radial = torch.zeros_like(edge_vec), torch.zeros_like(edge_len), torch.zeros_like(radial)
        t = (sbf.max_l, sbf.max_n)
        for part in triplets.split(ctx.chunk):
            t_ij, t_ik = part[:, 0], part[:, 1]
            v_ij, v_ik, r_ij, r_ik, raw_cos, cos_t = _ThreeBodyBasis._angles(edge_vec, edge_len, t_ij, t_ik)
            theta = torch.acos(cos_t)
            cos_c = torch.cos(theta)
            angular = sbf.angular(cos_c)  # (T, max_l)
            g = grad.index_select(0, t_ij).view(-1, *t)  # d/d basis, (T, max_l, max_n)
            grad_radial.index_add_(0, t_ik, (g * angular.unsqueeze(2)).view(g.shape[0], radial.shape[1]))
            grad_ang = (g * radial.index_select(0, t_ik).view(-1, *t)).sum(dim=2)  # (T, max_l)
            grad_c = (grad_ang * sbf.angular_derivative(cos_c)).sum(dim=1)
            # through cos(acos(c)) and the clamp, as autograd differentiates them
            grad_c = grad_c * -torch.sin(theta) * -(1 - cos_t * cos_t).rsqrt()
            grad_c = grad_c * ((raw_cos >= -1.0 + 1e-7) & (raw_cos <= 1.0 - 1e-7))
            denom = r_ij * r_ik
            grad_dot = (grad_c / denom).unsqueeze(1)
            grad_den = -grad_c * raw_cos / denom
            grad_vec.index_add_(0, t_ij, grad_dot * v_ik)
            grad_vec.index_add_(0, t_ik, grad_dot * v_ij)
            grad_len.index_add_(0, t_ij, grad_den * r_ik)
            grad_len.index_add_(0, t_ik, grad_den * r_ij)
        return grad_vec, grad_len, grad_radial, None, None, None


class _Workspace:
    """Scratch rows for one edge chunk's temporaries, reused chunk after chunk and block after block, in
    forward and then in backward: per chunk the forward allocates nothing but what backward keeps, and the
    backward nothing but the gradients it hands on, so the heap does not fragment (fresh temporaries per
    chunk, with small long-lived allocations settling in their holes, made resident memory grow by half as
    much again as what is kept, measured on 2000-atom Si)."""

    def __init__(self, like: torch.Tensor, rows: int, units: int, spherical: int, pool: "_KeptPool | None" = None):
        self.wide = like.new_empty((2, rows, 2 * units))
        self.narrow = like.new_empty((8, rows, units))
        self.sph = like.new_empty((4, rows, spherical))
        self.pool = pool if pool is not None else _KeptPool()

    @classmethod
    def for_chunks(cls, like: torch.Tensor, chunks: list["EdgeChunk"], units: int, pool=None) -> "_Workspace":
        rows = max((int(c.centre.shape[0]) for c in chunks), default=0)
        return cls(like, rows, units, chunks[0].threebody_sum.shape[1] if chunks else 0, pool)


class _KeptPool:
    """Buffers for what backward keeps (one per edge chunk and gated MLP), handed back by backward and
    reused by the next forward pass. Fresh buffers on every call cost a page fault per 4 kB (glibc gives the
    freed blocks back to the system at the end of each call): about 20 % of a 512-atom call on the 2-core
    test machine. Between calls the pool holds what the last call kept; each forward first drops what it
    will not use. The first buffers that backward hands back, ``release`` bytes of them, are freed instead:
    the gradients of the edge features wait between blocks (units numbers per edge) and need that room
    while the rest of what forward kept is still held."""

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self.release = 0

    @staticmethod
    def key(numel: int, like: torch.Tensor) -> tuple:
        return int(numel), like.dtype, like.device

    def retain(self, needed: dict[tuple, int]) -> None:
        """Keep at most ``needed[key]`` free buffers of each key."""
        for key in list(self._free):
            stack = self._free[key]
            del stack[needed.get(key, 0):]
            if not stack:
                del self._free[key]

    def take(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        try:
            return self._free[self.key(numel, like)].pop()
        except (KeyError, IndexError):
            return like.new_empty(int(numel))

    def give(self, buffer: torch.Tensor) -> None:
        if self.release > 0:
            self.release -= buffer.numel() * buffer.element_size()
            return
        self._free.setdefault(self.key(buffer.numel(), buffer), []).append(buffer)


def _silu_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch._C._nn.silu(x, out=out)  # F.silu's kernel, written into out


class _EdgeEncoder(torch.autograd.Function):
    """``silu(rbf @ W^T)``, the initial edge features, keeping nothing per edge (``F.silu`` keeps its input,
    ``units`` numbers per edge); backward recomputes the narrow (K = max_n) product."""

    @staticmethod
    def forward(ctx, rbf, weight):
        ctx.save_for_backward(rbf, weight)
        return F.silu(F.linear(rbf, weight))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rbf, weight = ctx.saved_tensors
        return _silu_backward(grad.clone(), F.linear(rbf, weight)) @ weight, None


class _GradSum:
    """The gradient of a per-atom input used by every edge chunk of a block (the gate, the first-layer
    tables), summed over the chunks' backward passes into one tensor that the last of them hands on; the
    others hand on None. (Each chunk handing on a dense per-atom gradient of its own costs time and memory
    that grow with atoms x chunks.)"""

    def __init__(self, like: torch.Tensor, n_chunks: int):
        self.shape, self.like, self.left, self.total = like.shape, like, n_chunks, None

    def add(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        if self.total is None:
            self.total = rows.new_zeros(self.shape)
        self.total.index_add_(0, index, rows)

    def done(self) -> torch.Tensor | None:
        self.left -= 1
        if self.left > 0:
            return None
        total, self.total, self.like = self.total, None, None
        return total


class _ThreeBodyUpdate(torch.autograd.Function):
    """``edge_attr += silu(x @ W_g^T) * sigmoid(x @ W_s^T)`` in place, with ``x = gate[centre] *
    threebody_sum`` (the three-body interaction of a block). Keeps no per-edge tensor: backward recomputes
    ``x`` from the per-atom ``gate`` and the shared ``threebody_sum``."""

    @staticmethod
    def forward(ctx, edge_attr, gate, centre, threebody_sum, w_g, w_s, ws: _Workspace, grad_gate: _GradSum):
        ctx.save_for_backward(gate, centre, threebody_sum, w_g, w_s)
        ctx.ws, ctx.grad_gate = ws, grad_gate
        e = edge_attr.shape[0]
        x = torch.index_select(gate, 0, centre, out=ws.sph[0, :e]).mul_(threebody_sum)
        z_g = F.silu(torch.mm(x, w_g.t(), out=ws.narrow[0, :e]), inplace=True)
        z_s = torch.mm(x, w_s.t(), out=ws.narrow[1, :e]).sigmoid_()
        ctx.mark_dirty(edge_attr)
        return edge_attr.addcmul_(z_g, z_s)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gate, centre, tbs, w_g, w_s = ctx.saved_tensors
        ws, e = ctx.ws, grad.shape[0]
        gate_e = torch.index_select(gate, 0, centre, out=ws.sph[0, :e])
        x = torch.mul(gate_e, tbs, out=ws.sph[1, :e])
        z_g = torch.mm(x, w_g.t(), out=ws.narrow[0, :e])
        s_s = torch.mm(x, w_s.t(), out=ws.narrow[1, :e]).sigmoid_()
        grad_zs = _sigmoid_backward(_silu_into(z_g, ws.narrow[2, :e]).mul_(grad), s_s)
        grad_zg = _silu_backward(torch.mul(grad, s_s, out=ws.narrow[3, :e]), z_g)
        grad_x = torch.mm(grad_zs, w_s, out=ws.sph[2, :e]).addmm_(grad_zg, w_g)
        grad_gate = grad_tbs = None
        if ctx.needs_input_grad[1]:
            ctx.grad_gate.add(centre, torch.mul(grad_x, tbs, out=ws.sph[3, :e]))
            grad_gate = ctx.grad_gate.done()
        if ctx.needs_input_grad[3]:
            grad_tbs = grad_x * gate_e
        ctx.ws = ctx.grad_gate = None
        return grad, grad_gate, None, grad_tbs, None, None, None, None


class _BondMLP(torch.autograd.Function):
    """A block's gated MLP on the bonds of an edge chunk, ``out = g * m`` with
    ``g = silu(silu(pre_g) @ W_g^T + b_g) * sigmoid(silu(pre_s) @ W_s^T + b_s)``,
    ``pre = table[centre] + table[N + neighbour] + edge_attr @ W_e`` (the first layer on
    ``concat(v_i, v_j, e_ij)`` with the atom blocks applied per atom) and ``m = act(rbf @ W_m^T)``.

    With ``agg`` None the edge features are updated in place, ``edge_attr += out``; otherwise the messages
    are summed onto their centre atoms in place, ``agg[centre] += out``. ``keep`` is what backward keeps:
    a buffer of ``ws.pool`` and views of it for ``pre`` and, in the fast mode, the second-layer
    pre-activations; backward gives the buffer back to the pool. An empty ``keep`` keeps nothing (no
    gradient wanted)."""

    @staticmethod
    def forward(ctx, edge_attr, agg, table, bond_pairs, centre, rbf, w_e, w_g, b_g, w_s, b_s, w_m,
                swish_m: bool, keep: tuple, ws: _Workspace, grad_table: _GradSum):
        e = edge_attr.shape[0]
        buffer, *keep = keep or (None,)
        pre = keep[0] if keep else ws.wide[0, :e]
        torch.index_select(table, 0, bond_pairs[:, 0], out=pre)
        pre.add_(torch.index_select(table, 0, bond_pairs[:, 1], out=ws.wide[1, :e]))
        pre.addmm_(edge_attr, w_e)
        a_g, a_s = _silu_into(pre, ws.wide[1, :e]).chunk(2, dim=1)
        p_g, p_s = (keep[1], keep[2]) if len(keep) == 3 else (ws.narrow[0, :e], ws.narrow[1, :e])
        torch.addmm(b_g, a_g, w_g.t(), out=p_g) if b_g is not None else torch.mm(a_g, w_g.t(), out=p_g)
        torch.addmm(b_s, a_s, w_s.t(), out=p_s) if b_s is not None else torch.mm(a_s, w_s.t(), out=p_s)
        m = torch.mm(rbf, w_m.t(), out=ws.narrow[2, :e])
        if swish_m:
            F.silu(m, inplace=True)
        gated = _silu_into(p_g, ws.narrow[3, :e]).mul_(torch.sigmoid(p_s, out=ws.narrow[4, :e]))
        if keep:
            ctx.swish_m, ctx.biases, ctx.aggregate = swish_m, (b_g, b_s), agg is not None
            # views of one buffer, kept as attributes (save_for_backward would check their shared version
            # counter, which the writes after saving advance)
            ctx.kept, ctx.buffer, ctx.ws, ctx.grad_table = keep, buffer, ws, grad_table
            ctx.save_for_backward(bond_pairs, centre, rbf, w_e, w_g, w_s, w_m)
        if agg is None:
            ctx.mark_dirty(edge_attr)
            return edge_attr.addcmul_(gated, m)
        ctx.mark_dirty(agg)
        return agg.index_add_(0, centre, gated.mul_(m))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        bond_pairs, centre, rbf, w_e, w_g, w_s, w_m = ctx.saved_tensors
        if ctx.kept is None:
            raise RuntimeError("the inference graph of M3GNet is differentiated once; to differentiate it "
                               "again, build it under mattersim.m3gnet.twice_differentiable()")
        pre, *kept = ctx.kept
        ctx.kept = None
        ws, e = ctx.ws, pre.shape[0]
        n = ws.narrow[:, :e]  # eight (e, h) scratch blocks
        grad_out = torch.index_select(grad, 0, centre, out=n[0]) if ctx.aggregate else grad
        if kept:
            p_g, p_s = kept
        else:
            a_g, a_s = _silu_into(pre, ws.wide[0, :e]).chunk(2, dim=1)
            p_g = torch.mm(a_g, w_g.t(), out=n[1]) if ctx.biases[0] is None else torch.addmm(ctx.biases[0], a_g, w_g.t(), out=n[1])
            p_s = torch.mm(a_s, w_s.t(), out=n[2]) if ctx.biases[1] is None else torch.addmm(ctx.biases[1], a_s, w_s.t(), out=n[2])
        z_m = torch.mm(rbf, w_m.t(), out=n[3])
        m = _silu_into(z_m, n[4]) if ctx.swish_m else z_m
        act_g, s_s = _silu_into(p_g, n[5]), torch.sigmoid(p_s, out=n[6])
        grad_rbf = None
        if ctx.needs_input_grad[5]:
            grad_m = torch.mul(act_g, s_s, out=n[7]).mul_(grad_out)
            grad_rbf = (_silu_backward(grad_m, z_m) if ctx.swish_m else grad_m) @ w_m
        grad_gated = torch.mul(grad_out, m, out=n[4] if ctx.swish_m else n[7])
        grad_pg = _silu_backward(torch.mul(grad_gated, s_s, out=n[3]), p_g)
        grad_ps = _sigmoid_backward(grad_gated.mul_(act_g), s_s)
        grad_a = torch.cat([torch.mm(grad_pg, w_g, out=n[5]), torch.mm(grad_ps, w_s, out=n[6])], dim=1,
                           out=ws.wide[1, :e])
        grad_pre = _silu_backward(grad_a, pre)
        grad_edge = grad_pre @ w_e.t()
        if not ctx.aggregate:
            grad_edge += grad
        grad_table = None
        if ctx.needs_input_grad[2]:
            ctx.grad_table.add(bond_pairs[:, 0], grad_pre)
            ctx.grad_table.add(bond_pairs[:, 1], grad_pre)
            grad_table = ctx.grad_table.done()
        grad_agg = grad if ctx.aggregate else None
        del pre, kept, p_g, p_s
        ctx.ws.pool.give(ctx.buffer)
        ctx.buffer = ctx.ws = ctx.grad_table = None
        return (grad_edge, grad_agg, grad_table, None, None, grad_rbf) + (None,) * 10


class _IndexAdd(torch.autograd.Function):
    """``target.index_add(0, index, source)`` keeping only ``index`` (``Tensor.index_add`` keeps ``source``
    too, one row per edge). Its backward is linear in the gradient: twice differentiable."""

    @staticmethod
    def forward(ctx, target, index, source, trim):
        ctx.save_for_backward(index)
        ctx.trim = trim
        return target.index_add(0, index, source)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        if ctx.trim is not None:
            ctx.trim.tick()
        return grad, None, grad.index_select(0, index) if ctx.needs_input_grad[2] else None, None


def index_add(target: torch.Tensor, index: torch.Tensor, source: torch.Tensor, trim=None) -> torch.Tensor:
    """``target.index_add(0, index, source)`` with autograd keeping only the index (``trim``: a
    :class:`_HeapTrim` ticked in backward)."""
    return _IndexAdd.apply(target, index, source, trim)


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
        differentiates the forces again); in training mode, with trainable weights or under
        :func:`twice_differentiable` the equivalent pair of ``index_select`` gathers is used instead."""
        if torch.is_grad_enabled() and (self.training or mlp.g[0].linear.weight.requires_grad
                                        or getattr(_FLAGS, "twice", None)):
            gathered = table.index_select(0, bond_pairs[:, 0]) + table.index_select(0, bond_pairs[:, 1])
        else:
            gathered = F.embedding_bag(bond_pairs, table, mode="sum")
        pre = torch.addmm(gathered, edge_attr, mlp.bond_weights(self.units)[1])
        return mlp.forward_first_layer_done(pre)

    def _bond_mlp(self, mlp: GatedMLP, dense: Dense, edge_attr, agg, table, c: EdgeChunk, keep, ws, grad_table):
        g, s = mlp.g[1].linear, mlp.sigma[1].linear
        return _BondMLP.apply(edge_attr, agg, table, c.bond_pairs, c.centre, c.rbf, mlp.bond_weights(self.units)[1],
                              g.weight, g.bias, s.weight, s.bias, dense.linear.weight, dense.activation == "swish",
                              keep, ws, grad_table)

    @staticmethod
    def _keep(flat: torch.Tensor, rows: int, widths: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """``(flat, view, ...)``: row-contiguous (rows, width) views of one buffer, the buffer first."""
        return (flat, *(v.view(rows, w) for v, w in zip(flat.split([rows * w for w in widths]), widths)))

    def _chunk(self, edge_attr, gate, table_edge, table_atom, centre, threebody_sum, rbf, bond_pairs):
        """The plain-autograd update of one edge chunk: new edge features and the messages to its centres."""
        edge_attr = self.three_body(edge_attr, gate, centre, threebody_sum)
        update = self._gated_on_bond(self.gated_mlp_edge, table_edge, edge_attr, bond_pairs)
        edge_attr = torch.addcmul(edge_attr, update, self.edge_layer_edge(rbf))
        messages = self._gated_on_bond(self.gated_mlp_atom, table_atom, edge_attr, bond_pairs)
        return edge_attr, messages * self.edge_layer_atom(rbf)

    def forward(self, atom_attr: torch.Tensor, edge_attrs: list[torch.Tensor], chunks: list[EdgeChunk],
                ws: "_Workspace | None" = None):
        """One message-passing block. Edges are processed chunk by chunk (each chunk's chain of per-edge
        operations stays in cache); atoms see the messages of all chunks. In inference the edge features
        are updated in place (``ws``: scratch rows shared by the blocks of one forward pass)."""
        gate = self.three_body.atom_mlp(atom_attr)
        table_edge = self._atom_table(self.gated_mlp_edge, atom_attr)
        table_atom = self._atom_table(self.gated_mlp_atom, atom_attr)
        new_edges = []
        aggregated = torch.zeros_like(atom_attr)
        inference = _inference(self)
        mode = _current_mode() if inference else "plain"
        tracked = torch.is_grad_enabled() and any(
            t.requires_grad for t in (atom_attr, *edge_attrs[:1], *(chunks[0][:2] if chunks else ()))
        )
        if mode in ("fast", "lean"):
            # backward keeps, per edge, both MLPs' first-layer pre-activations (2 x 2H) and, in the fast
            # mode, their second-layer ones (2 x 2H): one buffer per chunk and MLP, from the pool
            h = self.units
            widths = (2 * h, h, h) if mode == "fast" else (2 * h,)
            three = self.three_body.edge_gate_mlp
            w3_g, w3_s = three.g[0].linear.weight, three.sigma[0].linear.weight
            if ws is None:
                ws = _Workspace.for_chunks(atom_attr, chunks, h)
            sums = [_GradSum(t, len(chunks)) for t in (gate, table_edge, table_atom)]
            for edge_attr, c in zip(edge_attrs, chunks):
                keep_e = keep_a = ()
                if tracked:
                    e = int(c.centre.shape[0])
                    keep_e, keep_a = (self._keep(ws.pool.take(e * sum(widths), atom_attr), e, widths) for _ in "ea")
                edge_attr = _ThreeBodyUpdate.apply(edge_attr, gate, c.centre, c.threebody_sum, w3_g, w3_s, ws, sums[0])
                edge_attr = self._bond_mlp(self.gated_mlp_edge, self.edge_layer_edge, edge_attr, None, table_edge,
                                           c, keep_e, ws, sums[1])
                aggregated = self._bond_mlp(self.gated_mlp_atom, self.edge_layer_atom, edge_attr, aggregated,
                                            table_atom, c, keep_a, ws, sums[2])
                new_edges.append(edge_attr)
            return atom_attr + aggregated, new_edges
        recompute = mode == "recompute" and tracked
        trim = _HeapTrim(len(chunks), atom_attr.device) if recompute else None
        for edge_attr, c in zip(edge_attrs, chunks):
            args = (edge_attr, gate, table_edge, table_atom, c.centre, c.threebody_sum, c.rbf, c.bond_pairs)
            if recompute:  # keep the chunk's inputs only; backward reruns it
                edge_attr, messages = torch.utils.checkpoint.checkpoint(self._chunk, *args, use_reentrant=False)
            else:
                edge_attr, messages = self._chunk(*args)
            aggregated = (index_add(aggregated, c.centre, messages, trim) if inference
                          else aggregated.index_add(0, c.centre, messages))
            new_edges.append(edge_attr)
            if trim is not None:
                trim.tick()
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
        #: triplets per chunk of the three-body basis in inference (results do not depend on it)
        self.triplet_chunk = 32768
        self._kept_pool = _KeptPool()  # buffers reused from call to call (inference; not part of the state)
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

        # the radial basis and the cutoff weight depend on one edge only: evaluate per edge, gather per triplet
        smooth = polynomial_cutoff(edge_len, self.threebody_cutoff).unsqueeze(1)
        radial = self.sbf.radial(edge_len) * smooth
        if _inference(self):
            raw = _ThreeBodyBasis.apply(edge_vec, edge_len, radial, graph.triplets, self.sbf, self.triplet_chunk)
            threebody_sum = raw * smooth
        else:
            t_ij, t_ik = graph.triplets[:, 0], graph.triplets[:, 1]
            r_ij, r_ik = edge_len.index_select(0, t_ij), edge_len.index_select(0, t_ik)
            cos_jik = torch.sum(edge_vec.index_select(0, t_ij) * edge_vec.index_select(0, t_ik), dim=1) / (r_ij * r_ik)
            cos_jik = torch.clamp(cos_jik, min=-1.0 + 1e-7, max=1.0 - 1e-7)
            basis = self.sbf.combine(radial.index_select(0, t_ik), self.sbf.angular(torch.cos(torch.acos(cos_jik))))
            threebody_sum = torch.zeros_like(radial).index_add(0, t_ij, basis) * smooth

        weight_emb = self.atom_embedding.mlp[0].linear.weight  # one-hot @ W^T is a column lookup
        atom_attr = F.embedding(graph.numbers, weight_emb.t())
        rbf = self.rbf(edge_len)
        bond_pairs = torch.stack([centre, neighbour + atom_attr.shape[0]], dim=1)
        size = self.edge_chunk
        chunks = [
            EdgeChunk(*parts)
            for parts in zip(rbf.split(size), threebody_sum.split(size), centre.split(size), bond_pairs.split(size))
        ]
        ws = None
        if not _inference(self):
            edge_attrs = [self.edge_encoder(c.rbf) for c in chunks]
        else:
            encoder = self.edge_encoder.mlp[0]
            assert encoder.activation == "swish" and encoder.linear.bias is None
            edge_attrs = [_EdgeEncoder.apply(c.rbf, encoder.linear.weight) for c in chunks]
            if getattr(self, "_kept_pool", None) is None:  # a model unpickled from before the pool
                self._kept_pool = _KeptPool()
            ws = _Workspace.for_chunks(atom_attr, chunks, self.graph_conv[0].units, self._kept_pool)
            mode = _current_mode()
            if torch.is_grad_enabled() and edge_len.requires_grad and mode in ("fast", "lean"):
                width = (4 if mode == "fast" else 2) * self.graph_conv[0].units
                needed: dict[tuple, int] = {}
                for c in chunks:
                    key = _KeptPool.key(int(c.centre.shape[0]) * width, atom_attr)
                    needed[key] = needed.get(key, 0) + 2 * len(self.graph_conv)
                ws.pool.retain(needed)
                ws.pool.release = 2 * edge_len.shape[0] * self.graph_conv[0].units * atom_attr.element_size()
        for block in self.graph_conv:
            atom_attr, edge_attrs = block(atom_attr, edge_attrs, chunks, ws)
        return Encoded(atom_attr, None, edge_vec, edge_len)

    def get_model_args(self) -> dict:
        return dict(self.model_args)

    def memory_model(self, mode: str = "fast", itemsize: int = 4, grad: bool = True) -> MemoryModel:
        """Working memory (bytes) of one forces-and-stress call (``grad``) or energy-only call, from the
        widths, in a memory mode of :data:`MEMORY_MODES` (``"plain"``: training's plain autograd).

        Per edge: what each block keeps for backward (fast 8 units, lean 4 units, recompute the block's
        edge features, 2 units with their copy; plain autograd about 20 units + 2 max_n max_l), plus the
        edge features and their gradients waiting between blocks, the radial and three-body bases with what
        autograd keeps of them (2 units + 12 max_n max_l + 8 max_n + 32 numbers), plus the integer indices
        of the graph (about 100 bytes). Per triplet: its two int64 edge indices and the construction's
        temporaries (24 bytes; plain autograd keeps about 45 numbers more). Per atom: the per-atom tables
        and their gradients. Constant: the chunk workspace, a generous 30 units per edge of a chunk for the
        gradients each chunk hands on, and one triplet chunk's temporaries. Checked against measured peaks
        in benchmarks/speed_potential.py (within about 10 % from 512 atoms up)."""
        u, b = self.model_args["units"], self.model_args["num_blocks"]
        n = self.model_args["max_n"]
        sph = n * self.model_args["max_l"]
        chunk, f = self.edge_chunk, itemsize
        kept = {"fast": 8 * u, "lean": 4 * u, "recompute": 2 * u, "plain": 20 * u + 2 * sph}[mode]
        if not grad:
            return MemoryModel(per_atom=f * 8 * u + 200, per_edge=f * (2 * u + 4 * sph + 2 * n + 8) + 100,
                               per_triplet=24 + (f * 12 if mode == "plain" else 0),
                               constant=f * (chunk * 12 * u + self.triplet_chunk * 24))
        constant = f * (chunk * (12 * u + 4 * sph) + chunk * 30 * u + self.triplet_chunk * 64)
        if mode == "recompute":
            constant += f * chunk * (20 * u + 2 * sph)  # the chunk rerun with plain autograd
        return MemoryModel(
            per_atom=f * (b * 4 * u + 16 * u) + 200,
            per_edge=f * (b * kept + 2 * u + 12 * sph + 8 * n + 32) + 100,
            per_triplet=24 + (f * 45 if mode == "plain" else 0),
            constant=constant,
        )
