"""Batched evaluation of a MatterSim energy model: energies, forces and stress for many structures.

Forces are ``-dE/dr`` and the stress is ``(1/V) dE/d(strain)`` (eV/Å^3, ASE sign convention: positive is
tensile, pressure = -trace/3), both by automatic differentiation of the same energy, so they are exactly
conservative. Many structures are merged into one graph per forward pass; a batch is bounded by a maximum
number of atoms and of edges (speed settings: 4096 atoms and 16384 edges on the CPU, 400000 edges on a
GPU) and by a memory budget (:mod:`mattersim.memory`): the estimated working memory of the call, from its
atoms, edges and triplets (:meth:`M3Gnet.memory_model`), stays under ``memory_budget_gb``. A structure
larger than the bounds is evaluated alone, in the fastest of the model's memory modes
(:data:`mattersim.m3gnet.MEMORY_MODES`) that fits the budget, or in the lowest-memory one.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols

from mattersim.errors import InputError
from mattersim.graph import GraphBatch, StructureGraph, build_structure_graph, collate
from mattersim.heads import ATOM_TASKS
from mattersim.io import file_sha256
from mattersim.m3gnet import MEMORY_MODES, memory_mode, twice_differentiable
from mattersim.memory import GB, MemoryModel, budget_batches, resolve_budget

log = logging.getLogger("mattersim")

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float": torch.float32, "double": torch.float64}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"dtype {dtype!r} is not supported; use 'float32' or 'float64'.") from None


def check_elements(atoms: Atoms, max_z: int, label: str = "structure") -> None:
    """An :class:`InputError` for an element the model cannot represent at all (beyond its element embedding,
    Z > ``max_z``, or Z < 1). Whether the model was *trained* on an element is a separate check, made by the
    calculators of :func:`mattersim.registry.load_calculator` (:func:`mattersim.registry.check_trained_elements`)."""
    numbers = np.asarray(atoms.numbers)
    bad = sorted(set(int(z) for z in numbers if z < 1 or z > max_z))
    if bad:
        names = ", ".join(f"{chemical_symbols[z] if 0 <= z < len(chemical_symbols) else '?'} (Z={z})" for z in bad)
        raise InputError(
            f"{label}: element {names} is beyond the model's element embedding (H to {chemical_symbols[max_z]}, "
            f"Z <= {max_z}), so the model cannot evaluate it; remove it or use a model that covers it."
        )


def evaluate(
    model: torch.nn.Module,
    graph: GraphBatch,
    *,
    forces: bool = True,
    stress: bool = True,
    tasks: Sequence[str] | None = None,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """Energies (B,), per-atom ``energies`` (N,), ``forces`` (N, 3) eV/Å, ``stress`` (B, 3, 3) eV/Å^3 and,
    for a multi-task model, its property predictions (``tasks``, default all), for a batched graph.

    Forces are ``-dE/dr`` and stress ``(1/V) dE/d(strain)`` at zero strain. ``create_graph=True`` keeps
    the graph of the derivatives so that a loss on forces and stress can be differentiated (training).
    """
    positions, cell = graph.positions, graph.cell
    with torch.enable_grad():
        inputs = []
        if forces:
            positions = positions.detach().requires_grad_(True)
            inputs.append(positions)
        strain = None
        if stress:
            strain = torch.zeros_like(cell, requires_grad=True)
            inputs.append(strain)
            deform = torch.eye(3, dtype=cell.dtype, device=cell.device) + strain
            cell_s = torch.bmm(cell, deform)
            pos_s = torch.bmm(positions.unsqueeze(1), deform[graph.batch]).squeeze(1)
        else:
            cell_s, pos_s = cell, positions
        with twice_differentiable() if create_graph else nullcontext():
            if getattr(model, "tasks", ()):
                out = dict(model(graph, pos_s, cell_s, tasks=tasks))
            else:
                out = {"energies": model.atomic_energies(graph, pos_s, cell_s)}
        atomic = out["energies"]
        energy = torch.zeros(graph.num_structures, dtype=atomic.dtype, device=atomic.device)
        out["energy"] = energy.index_add(0, graph.batch, atomic)
        if inputs and (out["energy"].requires_grad or create_graph):
            grads = torch.autograd.grad(out["energy"].sum(), inputs, allow_unused=True, create_graph=create_graph)
        else:
            grads = [None] * len(inputs)
        if forces:
            out["forces"] = -grads[0] if grads[0] is not None else torch.zeros_like(positions)
        if stress:
            g = grads[-1] if grads[-1] is not None else torch.zeros_like(strain)
            volume = torch.abs(torch.linalg.det(cell))
            out["stress"] = g / volume[:, None, None]
    return out


class Potential(torch.nn.Module):
    """An energy model with batched inference of energies, per-atom energies, forces and stress."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_atoms_per_batch: int = 4096,
        max_edges_per_batch: int | None = None,
        memory_budget_gb: float | None = None,
        identity: dict | None = None,
    ):
        super().__init__()
        self.dtype = resolve_dtype(dtype)
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model.requires_grad_(False)  # inference: autograd only through positions and strain
        self.max_atoms_per_batch = int(max_atoms_per_batch)
        if max_edges_per_batch is None:
            # CPU: past ~16k edges a batch gains nothing (the per-call overhead is already amortised) and
            # larger ones lose to fresh-memory page faults (benchmarks/speed_phonon.py); GPUs want large ones
            max_edges_per_batch = 16_384 if self.device.type == "cpu" else 400_000
        self.max_edges_per_batch = int(max_edges_per_batch)
        #: working memory allowed per model call, bytes (:func:`mattersim.memory.resolve_budget`)
        self.memory_budget = resolve_budget(memory_budget_gb, self.device)
        self.identity = dict(identity or {"name": type(model).__name__, "version": None, "source": None, "sha256": None})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        trust_pickle: bool = False,
        name: str | None = None,
        version: str | None = None,
        **kwargs,
    ) -> "Potential":
        """Load an official-format MatterSim v1 checkpoint (``mattersim-v1.0.0-1M.pth`` or a fine-tuned
        one) or one of our multi-task checkpoints (:func:`mattersim.checkpoint.save_model`)."""
        from mattersim.checkpoint import build_m3gnet, build_multitask, is_multitask_checkpoint, read_checkpoint

        path = Path(path)
        ckpt = read_checkpoint(path, trust_pickle=trust_pickle)
        multitask = is_multitask_checkpoint(ckpt)
        model = build_multitask(ckpt, path) if multitask else build_m3gnet(ckpt, path)
        identity = {
            "name": name or path.stem,
            "version": version,
            "kind": "mattersim-mt" if multitask else "mattersim-v1",
            "source": str(path.resolve()),
            "sha256": file_sha256(path),
            "model_args": model.get_model_args(),
        }
        if multitask:
            identity["tasks"] = list(model.tasks)
        return cls(model, device=device, dtype=dtype, identity=identity, **kwargs)

    @property
    def cutoff(self) -> float:
        return self.model.cutoff

    @property
    def threebody_cutoff(self) -> float:
        return self.model.threebody_cutoff

    @property
    def max_z(self) -> int:
        return self.model.max_z

    # ------------------------------------------------------------------ evaluation
    @property
    def tasks(self) -> tuple[str, ...]:
        """The property heads of the model (empty for an energy-only model)."""
        return tuple(getattr(self.model, "tasks", ()))

    def forward(self, graph: GraphBatch, forces: bool = True, stress: bool = True) -> dict[str, torch.Tensor]:
        """Energies (B,), per-atom energies (N,), forces (N, 3), stress (B, 3, 3) and the model's property
        predictions of a batched graph, detached."""
        return {k: v.detach() for k, v in evaluate(self.model, graph, forces=forces, stress=stress).items()}

    def graphs(self, structures: Sequence[Atoms], labels: Sequence[str] | None = None) -> list[StructureGraph]:
        out = []
        for k, atoms in enumerate(structures):
            label = labels[k] if labels is not None else f"structure {k}"
            check_elements(atoms, self.max_z, label)
            out.append(build_structure_graph(atoms, self.cutoff, self.threebody_cutoff))
        return out

    def memory_model(self, mode: str = "fast", grad: bool = True) -> MemoryModel:
        """Bytes of one call from its atoms, edges and triplets (:meth:`M3Gnet.memory_model`), in a memory
        mode of :data:`mattersim.m3gnet.MEMORY_MODES`; ``grad``: forces or stress wanted."""
        backbone = getattr(self.model, "backbone", self.model)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        if hasattr(backbone, "memory_model"):
            return backbone.memory_model(mode, itemsize, grad)
        # a backbone without its own coefficients: a rough, deliberately generous figure from its widths
        args = backbone.get_model_args() if hasattr(backbone, "get_model_args") else {}
        width = int(args.get("units") or args.get("width") or 128)
        blocks = int(args.get("num_blocks") or 4)
        return MemoryModel(per_atom=itemsize * 64 * width * blocks, per_edge=itemsize * 32 * width * blocks,
                           per_triplet=64, constant=64 * 2**20)

    def memory_estimate(self, n_atoms: int, n_edges: int, n_triplets: int = 0, *, mode: str = "fast",
                        grad: bool = True) -> int:
        """Estimated working memory (bytes) of one call on a batch of this size."""
        return self.memory_model(mode, grad)(n_atoms, n_edges, n_triplets)

    def memory_mode_for(self, n_atoms: int, n_edges: int, n_triplets: int = 0, grad: bool = True) -> str:
        """The fastest memory mode whose estimate fits the budget, else the one with the lowest estimate."""
        need = {m: self.memory_estimate(n_atoms, n_edges, n_triplets, mode=m, grad=grad) for m in MEMORY_MODES}
        fits = [m for m in MEMORY_MODES if need[m] <= self.memory_budget]
        return fits[0] if fits else min(MEMORY_MODES, key=need.__getitem__)

    def _log_mode(self, label: str, size, mode: str, grad: bool) -> None:
        fast, need = (self.memory_estimate(*size, mode=m, grad=grad) for m in ("fast", mode))
        budget = f"the memory budget of {self.memory_budget / GB:.2f} GB (memory_budget_gb, MATTERSIM_MEMORY_BUDGET_GB)"
        if need > self.memory_budget:
            log.warning(f"{label} ({size[0]} atoms, {size[1]} edges) needs about {need / GB:.2f} GB even in the "
                        f"'{mode}' memory mode, more than {budget}; evaluating it alone anyway.")
        else:
            log.info(f"{label} ({size[0]} atoms, {size[1]} edges) needs about {fast / GB:.2f} GB in the fast "
                     f"memory mode, more than {budget}; evaluating it in the '{mode}' mode (about {need / GB:.2f} GB).")

    @staticmethod
    def graph_size(g: StructureGraph, threebody_cutoff: float) -> tuple[int, int, int]:
        """``(atoms, edges, triplets)`` of a structure graph."""
        return len(g.numbers), g.edge_index.shape[1], g.triplet_count(threebody_cutoff)

    def batches(self, graphs: Sequence[StructureGraph], grad: bool = True) -> Iterable[list[int]]:
        """Indices of structures grouped greedily, in order, under the atom and edge bounds and the memory
        budget (estimate of the fast mode)."""
        sizes = [self.graph_size(g, self.threebody_cutoff) for g in graphs]
        estimate = self.memory_model("fast", grad)
        return budget_batches(sizes, estimate, self.memory_budget, max_atoms=self.max_atoms_per_batch,
                              max_edges=self.max_edges_per_batch)

    def predict(
        self,
        structures: Sequence[Atoms] | Atoms,
        *,
        forces: bool = True,
        stress: bool = True,
        labels: Sequence[str] | None = None,
    ) -> list[dict]:
        """Results per structure: ``energy`` (eV), ``energies`` (n,), ``forces`` (n, 3) eV/Å,
        ``stress`` (3, 3) eV/Å^3 and, for a multi-task model, ``magmoms`` (n,), ``charges`` (n,),
        ``born_effective_charges`` (n, 3, 3) and ``dielectric_tensor`` (3, 3), as float64 numpy arrays."""
        if isinstance(structures, Atoms):
            structures = [structures]
        graphs = self.graphs(structures, labels)
        results: list[dict] = [{} for _ in graphs]
        grad = forces or stress
        for idx in self.batches(graphs, grad=grad):
            size = [sum(x) for x in zip(*(self.graph_size(graphs[k], self.threebody_cutoff) for k in idx))]
            mode = self.memory_mode_for(*size, grad=grad)
            if mode != "fast":
                self._log_mode(labels[idx[0]] if labels is not None else f"structure {idx[0]}", size, mode, grad)
            batch = collate([graphs[k] for k in idx], self.threebody_cutoff, device=self.device, dtype=self.dtype)
            with memory_mode(mode):
                out = self(batch, forces=forces, stress=stress)
            atom_splits = batch.n_atoms.tolist()
            del batch
            energy = out["energy"].double().cpu().numpy()
            per_atom = torch.split(out["energies"].double().cpu(), atom_splits)
            f_split = torch.split(out["forces"].double().cpu(), atom_splits) if forces else None
            task_split = {t: torch.split(out[t], atom_splits) for t in self.tasks if t in out and t in ATOM_TASKS}
            for pos, k in enumerate(idx):
                res = {"energy": float(energy[pos]), "energies": per_atom[pos].numpy()}
                if forces:
                    res["forces"] = f_split[pos].numpy()
                if stress:
                    res["stress"] = out["stress"][pos].double().cpu().numpy()
                for task in self.tasks:
                    if task in out:
                        res[task] = (task_split[task][pos] if task in task_split else out[task][pos]).double().cpu().numpy()
                results[k] = res
        return results
