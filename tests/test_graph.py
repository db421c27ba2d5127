"""Neighbour lists and three-body triplets against independent references (ASE's neighbour list, brute force)."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list

from mattersim.errors import InputError
from mattersim.graph import build_graph, build_structure_graph, threebody_triplets


def _pairs(atoms, cutoff):
    g = build_structure_graph(atoms, cutoff)
    return sorted(
        (int(i), int(j), tuple(int(s) for s in S), round(float(d), 6))
        for i, j, S, d in zip(g.edge_index[0], g.edge_index[1], g.edge_shift, g.edge_length)
    )


def _ase_pairs(atoms, cutoff):
    i, j, S, d = neighbor_list("ijSd", atoms, cutoff)
    return sorted((int(a), int(b), tuple(int(s) for s in sh), round(float(x), 6)) for a, b, sh, x in zip(i, j, S, d))


def _cases():
    rng = np.random.default_rng(0)
    tric = Atoms(
        "LiMnO2",
        cell=[[3.1, 0.2, 0.1], [0.9, 4.0, -0.3], [0.4, 1.3, 5.2]],
        scaled_positions=rng.random((4, 3)),
        pbc=True,
    )
    skew = Atoms("Si2", cell=[[3.0, 0, 0], [2.9, 0.8, 0], [0.3, 0.2, 2.5]], scaled_positions=[[0, 0, 0], [0.4, 0.5, 0.5]], pbc=True)
    tiny = Atoms("Cu", cell=[[0, 1.8, 1.8], [1.8, 0, 1.8], [1.8, 1.8, 0]], pbc=True)  # sees dozens of own images
    slab = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    slab.center(vacuum=10.0, axis=2)
    slab.pbc = [True, True, False]  # mixed periodicity with vacuum
    wire = Atoms("C2", positions=[[0, 0, 0], [1.3, 0.4, 0.2]], cell=[2.5, 20, 20], pbc=[True, False, False])
    return {"triclinic": tric, "skewed": skew, "tiny_cell": tiny, "slab": slab, "wire": wire}


@pytest.mark.parametrize("name", list(_cases()))
def test_neighbour_list_matches_ase(name):
    atoms = _cases()[name]
    assert _pairs(atoms, 5.0) == _ase_pairs(atoms, 5.0)


def test_tiny_cell_sees_own_images():
    g = build_structure_graph(_cases()["tiny_cell"], 5.0)
    assert np.all(g.edge_index[0] == 0) and np.all(g.edge_index[1] == 0)
    assert g.edge_index.shape[1] == len(_ase_pairs(_cases()["tiny_cell"], 5.0)) > 40


def test_non_periodic_is_boxed_without_images():
    mol = molecule("CH4")
    g = build_structure_graph(mol, 5.0, 4.0)
    assert g.pbc.all()
    # every pair of the 5 atoms within 5 Å, no periodic images
    assert g.edge_index.shape[1] == 5 * 4
    assert np.all(g.edge_shift == 0)
    assert np.allclose(np.diag(g.cell), mol.positions.max(0) - mol.positions.min(0) + 10.0)
    assert mol.cell.volume == 0  # the input is not modified


def test_zero_volume_cell_is_rejected():
    atoms = Atoms("Si2", positions=[[0, 0, 0], [1, 1, 1]], cell=[[3, 0, 0], [6, 0, 0], [0, 0, 3]], pbc=True)
    with pytest.raises(InputError, match="zero volume"):
        build_structure_graph(atoms)


def _brute_triplets(edge_index, lengths, cut):
    out = []
    for a in range(edge_index.shape[1]):
        for b in range(edge_index.shape[1]):
            if a != b and edge_index[0, a] == edge_index[0, b] and lengths[a] <= cut and lengths[b] <= cut:
                out.append((a, b))
    return sorted(out)


def test_triplets_match_brute_force():
    atoms = _cases()["triclinic"]
    g = build_structure_graph(atoms, 5.0)
    trip = threebody_triplets(torch.as_tensor(g.edge_index[0]), torch.as_tensor(g.edge_length), 4.0)
    assert sorted(map(tuple, trip.tolist())) == _brute_triplets(g.edge_index, g.edge_length, 4.0)
    # sorted by the first edge, as the official layout
    assert torch.all(trip[1:, 0] >= trip[:-1, 0])


def test_batch_offsets_and_dtypes():
    cases = _cases()
    structures = [cases["triclinic"], cases["tiny_cell"], cases["skewed"]]
    singles = [build_graph([s]) for s in structures]
    batch = build_graph(structures, dtype=torch.float64)
    assert batch.positions.dtype == torch.float64 and batch.cell.shape == (3, 3, 3)
    atom_off = edge_off = 0
    parts = []
    for k, single in enumerate(singles):
        e0, e1 = edge_off, edge_off + single.num_edges
        assert torch.equal(batch.edge_index[:, e0:e1] - atom_off, single.edge_index)
        assert torch.all(batch.edge_batch[e0:e1] == k)
        parts.append(single.triplets + edge_off)
        atom_off += single.num_atoms
        edge_off += single.num_edges
    assert torch.equal(batch.triplets, torch.cat(parts))
    assert batch.batch.tolist() == sum([[k] * len(s) for k, s in enumerate(structures)], [])


@pytest.mark.parametrize("name", list(_cases()))
def test_triplet_count_without_building_triplets(name):
    """The count the memory estimate uses equals the triplets collate builds; indices are stored as int32."""
    g = build_structure_graph(_cases()[name], 5.0, 4.0)
    assert g.edge_index.dtype == np.int32 and g.edge_shift.dtype == np.int32
    trip = threebody_triplets(torch.as_tensor(g.edge_index[0]).long(), torch.as_tensor(g.edge_length), 4.0)
    assert g.triplet_count(4.0) == trip.shape[0]
    assert g.triplet_count(3.0) == threebody_triplets(
        torch.as_tensor(g.edge_index[0]).long(), torch.as_tensor(g.edge_length), 3.0
    ).shape[0]
