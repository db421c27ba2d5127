"""Periodic crystal graphs for the M3GNet backbone.

A structure becomes a directed graph: one edge ``i -> j`` for every neighbour ``j`` (any periodic image)
within ``cutoff`` of atom ``i``, found with vesin (triclinic and skewed cells, cells smaller than the cutoff
where an atom sees its own images, mixed periodicity). Three-body triplets are the ordered pairs of
distinct edges ``(i->j, i->k)`` sharing the centre atom ``i`` with both lengths ``<= threebody_cutoff``;
they are built vectorised in torch.

Geometry is not stored: an edge keeps its integer image shift, and the model recomputes the edge vector
``r_j + S @ cell - r_i`` from positions and cell, so forces and stress come from autograd.

Non-periodic input (``pbc`` all False) is placed in an orthorhombic box whose edges are the extent of the
molecule plus twice the larger cutoff, made periodic, as the official MatterSim implementation does; no
atom then sees a periodic image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch
from ase import Atoms
from vesin import NeighborList

from mattersim.errors import InputError


@dataclass
class StructureGraph:
    """The graph of one structure, in numpy, before batching (indices int32: 28 bytes per edge)."""

    positions: np.ndarray  # (n, 3) Å, wrapped into the cell along periodic directions
    cell: np.ndarray  # (3, 3) Å, rows are lattice vectors
    numbers: np.ndarray  # (n,) atomic numbers
    edge_index: np.ndarray  # (2, e) int32 [centre, neighbour]
    edge_shift: np.ndarray  # (e, 3) int32 image of the neighbour
    edge_length: np.ndarray  # (e,) Å, as found by the neighbour list
    pbc: np.ndarray  # (3,) bool, after boxing of a non-periodic input
    _triplets: dict = field(default_factory=dict, repr=False, compare=False)

    def triplet_count(self, threebody_cutoff: float) -> int:
        """Number of three-body triplets (:func:`threebody_triplets`) without building them: the ordered
        pairs of distinct edges with a common centre, both ``<= threebody_cutoff``."""
        key = float(threebody_cutoff)
        if key not in self._triplets:
            short = self.edge_index[0][self.edge_length <= key]
            k = np.bincount(short, minlength=len(self.numbers)).astype(np.int64)
            self._triplets[key] = int((k * (k - 1)).sum())
        return self._triplets[key]


@dataclass
class GraphBatch:
    """Several structures merged into one disconnected graph (torch tensors on one device)."""

    positions: torch.Tensor  # (N, 3)
    cell: torch.Tensor  # (B, 3, 3)
    numbers: torch.Tensor  # (N,) long
    batch: torch.Tensor  # (N,) long, structure of each atom
    edge_index: torch.Tensor  # (2, E) long, atom indices into the batch
    edge_shift: torch.Tensor  # (E, 3) float, image shifts
    edge_batch: torch.Tensor  # (E,) long, structure of each edge
    triplets: torch.Tensor  # (T, 2) long, edge indices (ij, ik)
    n_atoms: torch.Tensor  # (B,) long
    n_edges: torch.Tensor  # (B,) long
    num_structures: int

    @property
    def num_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])


class Encoded(NamedTuple):
    """What a backbone hands to the heads: atom features and the geometry of the graph's edges."""

    atom: torch.Tensor  # (N, d) invariant features
    equi: torch.Tensor | None  # (N, 3, d) equivariant features, or None (M3GNet backbone)
    edge_vec: torch.Tensor  # (E, 3) r_j + image - r_i, centre i = edge_index[0]
    edge_len: torch.Tensor  # (E,)


def edge_geometry(graph: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge vectors from centre to neighbour image (E, 3) and their lengths (E,), differentiable."""
    centre, neighbour = graph.edge_index[0], graph.edge_index[1]
    offsets = torch.bmm(graph.edge_shift.unsqueeze(1), cell.index_select(0, graph.edge_batch)).squeeze(1)
    vec = positions.index_select(0, neighbour) + offsets - positions.index_select(0, centre)
    return vec, torch.linalg.norm(vec, dim=1)


def _box_non_periodic(positions: np.ndarray, margin: float) -> np.ndarray:
    extent = positions.max(axis=0) - positions.min(axis=0)
    return np.diag(extent + 2.0 * margin)


def build_structure_graph(atoms: Atoms, cutoff: float = 5.0, threebody_cutoff: float = 4.0) -> StructureGraph:
    """Neighbour list of one structure within ``cutoff`` (Å)."""
    positions = np.asarray(atoms.positions, dtype=np.float64)
    if len(atoms) == 0:
        raise InputError("The structure has no atoms; give at least one atom.")
    if not np.all(np.isfinite(positions)):
        raise InputError("The structure has non-finite (NaN or infinite) atomic positions; fix the coordinates.")
    pbc = np.asarray(atoms.pbc, dtype=bool).copy()
    cell = np.asarray(atoms.cell[:], dtype=np.float64).copy()
    if not pbc.any():
        cell = _box_non_periodic(positions, max(cutoff, threebody_cutoff))
        pbc[:] = True
        positions = positions - positions.min(axis=0)
    else:
        volume = abs(np.linalg.det(cell))
        if volume < 1e-6:
            raise InputError(
                "The periodic cell has zero volume (degenerate or missing lattice vectors); "
                "give three independent lattice vectors or set pbc=False for a molecule."
            )
    # wrap into the cell along periodic directions (energies are invariant; forces are per atom)
    frac = np.linalg.solve(cell.T, positions.T).T
    frac[:, pbc] -= np.floor(frac[:, pbc])
    positions = frac @ cell

    nl = NeighborList(cutoff=float(cutoff), full_list=True)
    if pbc.all():
        periodic: bool | list[bool] = True
    else:
        periodic = [bool(p) for p in pbc]
    i, j, shifts, dist = nl.compute(points=positions, box=cell, periodic=periodic, quantities="ijSd")
    # sort by centre then neighbour, then shift, for a deterministic layout
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i))
    edge_index = np.stack([i[order], j[order]]).astype(np.int32)
    del i, j
    edge_shift = shifts[order].astype(np.int32)
    del shifts
    return StructureGraph(
        positions=positions,
        cell=cell,
        numbers=np.asarray(atoms.numbers, dtype=np.int64),
        edge_index=edge_index,
        edge_shift=edge_shift,
        edge_length=dist[order].astype(np.float64),
        pbc=pbc,
    )


def threebody_triplets(edge_center: torch.Tensor, edge_length: torch.Tensor, threebody_cutoff: float) -> torch.Tensor:
    """Ordered pairs of distinct edges sharing a centre atom, both within ``threebody_cutoff``.

    ``edge_center`` must be sorted (non-decreasing). Returns (T, 2) edge indices sorted by the first edge,
    the layout of the official implementation.
    """
    device = edge_center.device
    valid = torch.nonzero(edge_length <= threebody_cutoff, as_tuple=True)[0]
    if valid.numel() == 0:
        return torch.zeros((0, 2), dtype=torch.long, device=device)
    centers = edge_center[valid]
    # group the valid edges by centre (edges are sorted by centre already)
    _, counts = torch.unique_consecutive(centers, return_counts=True)
    group_start = torch.cumsum(counts, 0) - counts
    group_of_edge = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    n_partners = counts[group_of_edge]  # each edge pairs with every edge of its group
    first = torch.repeat_interleave(torch.arange(valid.numel(), device=device), n_partners)
    pair_start = torch.cumsum(n_partners, 0) - n_partners
    within = torch.arange(first.numel(), device=device) - torch.repeat_interleave(pair_start, n_partners)
    second = group_start[group_of_edge][first] + within
    keep = first != second
    return torch.stack([valid[first[keep]], valid[second[keep]]], dim=1)


def collate(
    graphs: Sequence[StructureGraph],
    threebody_cutoff: float = 4.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> GraphBatch:
    """Merge structure graphs into one batch with atom and edge index offsets."""
    n_atoms = np.array([len(g.numbers) for g in graphs], dtype=np.int64)
    n_edges = np.array([g.edge_index.shape[1] for g in graphs], dtype=np.int64)
    atom_offset = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
    edge_index = np.concatenate([g.edge_index.astype(np.int64) + off for g, off in zip(graphs, atom_offset)], axis=1)
    edge_length = np.concatenate([g.edge_length for g in graphs])
    as_long = dict(dtype=torch.long, device=device)
    edge_index_t = torch.as_tensor(edge_index, **as_long)
    triplets = threebody_triplets(
        edge_index_t[0], torch.as_tensor(edge_length, device=device), threebody_cutoff
    )
    n_atoms_t = torch.as_tensor(n_atoms, **as_long)
    n_edges_t = torch.as_tensor(n_edges, **as_long)
    structure_ids = torch.arange(len(graphs), device=device)
    return GraphBatch(
        positions=torch.as_tensor(np.concatenate([g.positions for g in graphs]), dtype=dtype, device=device),
        cell=torch.as_tensor(np.stack([g.cell for g in graphs]), dtype=dtype, device=device),
        numbers=torch.as_tensor(np.concatenate([g.numbers for g in graphs]), **as_long),
        batch=torch.repeat_interleave(structure_ids, n_atoms_t),
        edge_index=edge_index_t,
        edge_shift=torch.as_tensor(np.concatenate([g.edge_shift for g in graphs]), dtype=dtype, device=device),
        edge_batch=torch.repeat_interleave(structure_ids, n_edges_t),
        triplets=triplets,
        n_atoms=n_atoms_t,
        n_edges=n_edges_t,
        num_structures=len(graphs),
    )


def build_graph(
    structures: Sequence[Atoms],
    cutoff: float = 5.0,
    threebody_cutoff: float = 4.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> GraphBatch:
    """Neighbour lists of all structures, batched into one graph."""
    graphs = [build_structure_graph(a, cutoff, threebody_cutoff) for a in structures]
    return collate(graphs, threebody_cutoff, device=device, dtype=dtype)
