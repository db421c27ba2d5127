"""The multi-task model (MatterSim-MT): one backbone, its energy readout, and property heads.

``MultiTaskModel(backbone, tasks)`` predicts per-atom energies (so energy, forces and stress follow by
autograd in :class:`mattersim.potential.Potential`, as for the v1 model) and, from the same atom features,
any of :data:`mattersim.heads.TASKS`:

====================== ============ ======= ===============================================
task                   shape        unit    constraint by construction
====================== ============ ======= ===============================================
magmoms                (N,)         μB      (ferromagnetic ordering, as in the training data)
charges                (N,)         e       Bader charges sum to zero per structure
born_effective_charges (N, 3, 3)    e       sum over atoms is zero (charge neutrality)
dielectric_tensor      (B, 3, 3)    1       symmetric, eps_inf - I positive semi-definite
====================== ============ ======= ===============================================

The backbone is either the transformer (:mod:`mattersim.transformer`, presets "1M", "10M", "tiny") or
the v1 M3GNet (:mod:`mattersim.m3gnet`, which also loads official checkpoints, so heads can be added to
pretrained MatterSim v1 weights). A model is fully described by its plain-data :attr:`config`, which the
checkpoint stores (:mod:`mattersim.checkpoint`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from mattersim.graph import GraphBatch
from mattersim.heads import TASKS, build_head
from mattersim.m3gnet import DEFAULT_MODEL_ARGS, M3Gnet
from mattersim.transformer import PRESETS, TransformerBackbone

#: default head sizes (width of the head MLPs, attention heads, tensor channels, radial basis)
DEFAULT_HEAD_ARGS = {"width": 64, "num_heads": 4, "channels": 8, "num_gaussians": 16}


def build_backbone(spec: dict) -> nn.Module:
    """A backbone from ``{"kind": "transformer", "preset": "1M", ...overrides}`` or
    ``{"kind": "m3gnet", ...model_args}``."""
    spec = dict(spec)
    kind = spec.pop("kind", "transformer")
    if kind == "transformer":
        preset = spec.pop("preset", None)
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown transformer preset {preset!r}; choose one of {sorted(PRESETS)}")
        return TransformerBackbone(**{**(PRESETS[preset] if preset else {}), **spec})
    if kind == "m3gnet":
        unknown = sorted(set(spec) - set(DEFAULT_MODEL_ARGS))
        if unknown:
            raise ValueError(f"backbone m3gnet: unknown model_args {unknown}; known: {sorted(DEFAULT_MODEL_ARGS)}")
        return M3Gnet(**{**DEFAULT_MODEL_ARGS, **spec})
    raise ValueError(f"unknown backbone kind {kind!r}; use 'transformer' or 'm3gnet'")


class MultiTaskModel(nn.Module):
    """Backbone + energy readout + property heads; ``forward`` returns a dict of predictions."""

    def __init__(self, backbone: nn.Module, tasks: Sequence[str] = (), head_args: dict | None = None):
        super().__init__()
        tasks = tuple(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; choose from {list(TASKS)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks {list(tasks)} repeat a task")
        self.backbone = backbone
        self.tasks = tasks
        self.head_args = {**DEFAULT_HEAD_ARGS, **(head_args or {})}
        in_width = backbone.width if hasattr(backbone, "width") else backbone.model_args["units"]
        equi_width = in_width if getattr(backbone, "kind", "") == "transformer" else 0
        self.heads = nn.ModuleDict(
            {t: build_head(t, in_width, equi_width, backbone.cutoff, **self.head_args) for t in tasks}
        )

    # the interface Potential and the graph builder use
    @property
    def cutoff(self) -> float:
        return self.backbone.cutoff

    @property
    def threebody_cutoff(self) -> float:
        return self.backbone.threebody_cutoff

    @property
    def max_z(self) -> int:
        return self.backbone.max_z

    @property
    def normalizer(self):
        """The per-element energy scale and reference (shift) of the backbone."""
        return self.backbone.normalizer

    @property
    def config(self) -> dict:
        return {
            "backbone": {"kind": self.backbone.kind, **self.backbone.get_model_args()},
            "tasks": list(self.tasks),
            "head_args": dict(self.head_args),
        }

    @classmethod
    def from_config(cls, config: dict) -> "MultiTaskModel":
        return cls(build_backbone(config["backbone"]), config.get("tasks", ()), config.get("head_args"))

    def get_model_args(self) -> dict:
        return self.config

    def atomic_energies(self, graph: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        return self.backbone.atomic_energies(graph, positions, cell)

    def forward(self, graph: GraphBatch, positions: torch.Tensor, cell: torch.Tensor,
                tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``energies`` (N,) and every task's prediction (all of :attr:`tasks` unless ``tasks`` is given)."""
        enc = self.backbone.encode(graph, positions, cell)
        out = {"energies": self.backbone.readout(enc, graph)}
        for task in self.tasks if tasks is None else tasks:
            out[task] = self.heads[task](enc, graph)
        return out
