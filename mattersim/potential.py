"""Batched evaluation of a MatterSim energy model: energies, forces and stress for many structures.

Forces are ``-dE/dr`` and the stress is ``(1/V) dE/d(strain)`` (eV/Å^3, ASE sign convention: positive is
tensile, pressure = -trace/3), both by automatic differentiation of the same energy, so they are exactly
conservative. Many structures are merged into one graph per forward pass; the batch size is bounded by a
maximum number of atoms and of edges (memory grows with edges), and a structure larger than the bounds is
evaluated alone. Defaults: 4096 atoms and 16384 edges per batch on the CPU (about 0.5 GB of autograd
memory with the 1M model), 400000 edges on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols

from mattersim.errors import InputError
from mattersim.graph import GraphBatch, StructureGraph, build_structure_graph, collate
from mattersim.heads import ATOM_TASKS

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float": torch.float32, "double": torch.float64}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"dtype {dtype!r} is not supported; use 'float32' or 'float64'.") from None


def check_elements(atoms: Atoms, max_z: int, label: str = "structure") -> None:
    numbers = np.asarray(atoms.numbers)
    bad = sorted(set(int(z) for z in numbers if z < 1 or z > max_z))
    if bad:
        names = ", ".join(f"{chemical_symbols[z] if 0 <= z < len(chemical_symbols) else '?'} (Z={z})" for z in bad)
        raise InputError(
            f"{label}: element {names} is outside the model's range (H to {chemical_symbols[max_z]}, Z <= {max_z}); "
            "remove it or use a model that covers it."
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
        from mattersim.registry import file_sha256

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

    def batches(self, graphs: Sequence[StructureGraph]) -> Iterable[list[int]]:
        """Indices of structures grouped greedily, in order, under the atom and edge bounds."""
        current: list[int] = []
        n_atoms = n_edges = 0
        for k, g in enumerate(graphs):
            a, e = len(g.numbers), g.edge_index.shape[1]
            if current and (n_atoms + a > self.max_atoms_per_batch or n_edges + e > self.max_edges_per_batch):
                yield current
                current, n_atoms, n_edges = [], 0, 0
            current.append(k)
            n_atoms += a
            n_edges += e
        if current:
            yield current

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
        for idx in self.batches(graphs):
            batch = collate([graphs[k] for k in idx], self.threebody_cutoff, device=self.device, dtype=self.dtype)
            out = self(batch, forces=forces, stress=stress)
            atom_splits = batch.n_atoms.tolist()
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
