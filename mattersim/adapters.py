"""Adapters that give other potentials our batched interface (``calculate_batch``) and memory budget.

``mattersim.calculator.evaluate_batch`` uses ``calculate_batch`` when a calculator has it, so phonon
displacements, relaxations and benchmarks evaluate many structures per model call with these potentials
too. Results follow :mod:`mattersim.calculator`: energy eV, forces eV/Å, stress 3x3 eV/Å^3 (ASE sign).

Batches are sized by the memory budget of :mod:`mattersim.memory` (``calc.memory_budget``, bytes; from
``memory_budget_gb``, ``$MATTERSIM_MEMORY_BUDGET_GB`` or the default) with an estimate from each model's
own graph (``calc.memory_model``, coefficients measured with this package's versions, see below); a
structure above the budget is evaluated alone.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import all_changes
from ase.stress import voigt_6_to_full_3x3_stress

from mattersim.io import full_stress
from mattersim.memory import GB, MemoryModel, budget_batches, resolve_budget

log = logging.getLogger("mattersim")
MIB = 2**20
#: the class default of ``memory_budget`` (instances made by the factories resolve their own)
DEFAULT_BUDGET = 8 * GB

#: CHGNet 0.3.0 (chgnet 0.4.2, float32, CPU, forces+stress+magmoms without a graph of the derivatives):
#: bytes per directed atom-graph edge (6 Å) and per bond-graph angle (bonds <= 3 Å), fitted on the peaks
#: of Si (216, 512, 1000 atoms), fcc Cu (256) and NaCl (216) in fresh processes; they lie 1-12 % above
#: the measured ones
CHGNET_MEMORY = MemoryModel(per_atom=0, per_edge=0.0225 * MIB, per_triplet=0.026 * MIB, constant=16 * MIB)
#: SevenNet-0 (sevenn 0.13, float32, CPU): bytes per directed edge (5 Å), fitted on Si (216, 512) and
#: fcc Cu (256): 1.5-3 % above the measured peaks
SEVENNET_MEMORY = MemoryModel(per_atom=0, per_edge=0.132 * MIB, constant=80 * MIB)
#: SevenNet's edges per batch on the CPU (see ``BatchedSevenNetCalculator.cpu_max_edges``)
SEVENNET_CPU_MAX_EDGES = 4096


def isolated_in_box(atoms: Atoms, cutoff: float, model: str = "this model") -> tuple[Atoms, bool]:
    """``(atoms, False)`` for a structure periodic in all three directions; for an isolated molecule or
    cluster (no periodic direction), a copy in an orthorhombic box whose periodic images lie more than
    ``cutoff`` (the model's largest graph cutoff, Å) + 1 Å away, and True. A model whose graph only joins
    atoms within its cutoff then sees exactly the isolated structure (no edge to an image), so energies and
    forces are those of the molecule; the stress of the box is meaningless and is not reported.
    Mixed periodicity (slabs, wires) raises :class:`InputError`: such a model needs a full 3D cell there."""
    from mattersim.errors import InputError

    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.all() and atoms.cell.rank == 3:
        return atoms, False
    if pbc.any():
        raise InputError(f"{model} needs a cell periodic in all three directions, or an isolated molecule (no "
                         f"periodic direction); this structure has pbc={pbc.tolist()}: add vacuum and make it "
                         "periodic (atoms.pbc = True), or use a model that handles slabs (sevennet-0, MatterSim).")
    boxed = atoms.copy()
    pos = boxed.get_positions()
    extent = pos.max(axis=0) - pos.min(axis=0) if len(boxed) else np.zeros(3)
    size = extent + float(cutoff) + 1.0
    boxed.set_cell(np.diag(size))
    boxed.set_positions(pos - pos.min(axis=0) + 0.5 * (float(cutoff) + 1.0))
    boxed.pbc = True
    return boxed, True


def _warn_if_over(calc, label: str, n_atoms: int, need: int) -> None:
    if need > calc.memory_budget:
        log.warning(f"{label} ({n_atoms} atoms) needs about {need / GB:.2f} GB with {calc.model_info_name}, more "
                    f"than the memory budget of {calc.memory_budget / GB:.2f} GB (MATTERSIM_MEMORY_BUDGET_GB); "
                    "evaluating it alone anyway.")


class _NoCreateGraph:
    """Stands in for ``torch`` (and ``torch.autograd``) in CHGNet's model module: ``autograd.grad`` there
    never builds a graph of the derivatives; everything else is the real module."""

    def __init__(self, real, grad_only: bool = False):
        self._real = real
        if not grad_only:
            self.autograd = _NoCreateGraph(real.autograd, grad_only=True)

    def grad(self, *args, **kwargs):
        kwargs["create_graph"] = False
        return self._real.grad(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)


@contextlib.contextmanager
def chgnet_first_derivatives():
    """CHGNet computes forces and stress with ``create_graph=True`` (so that training can differentiate
    them again); at inference that graph is never used but holds most of the memory (Si, 216 atoms: 1.04
    GB without this, 0.27 GB with it, and 2.8x faster). Inside this context CHGNet's model module sees
    ``autograd.grad`` without ``create_graph``; the first derivatives are the same (float32 rounding).
    It swaps a module global, so do not train a CHGNet in another thread meanwhile."""
    import chgnet.model.model as module

    real = getattr(module, "torch", None)
    if real is None or isinstance(real, _NoCreateGraph):  # another chgnet layout, or already inside
        yield
        return
    module.torch = _NoCreateGraph(real)
    try:
        yield
    finally:
        module.torch = real


def batched_chgnet_calculator(model, device: str = "cpu", batch_size: int = 16, memory_budget_gb: float | None = None):
    """A ``CHGNetCalculator`` for ``model`` that also evaluates lists of structures in batches of at most
    ``batch_size`` structures and ``memory_budget_gb`` of estimated memory (:data:`CHGNET_MEMORY`)."""
    calc = __getattr__("BatchedCHGNetCalculator")(model=model, use_device=device)
    calc.batch_size = int(batch_size)
    calc.memory_budget = resolve_budget(memory_budget_gb, device)
    return calc


def batched_sevennet_calculator(model: str = "7net-0", device: str = "cpu", memory_budget_gb: float | None = None):
    """A ``SevenNetCalculator`` that also evaluates lists of structures in batches: the graphs of a batch are
    merged (torch_geometric's collater, as ``sevenn``'s own batched inference) and evaluated in one call,
    with at most ``memory_budget_gb`` of estimated memory (:data:`SEVENNET_MEMORY`) per call."""
    calc = __getattr__("BatchedSevenNetCalculator")(model, device=device)
    calc.memory_budget = resolve_budget(memory_budget_gb, device)
    return calc


def __getattr__(name: str):
    """The adapter classes, built on first use (they import chgnet / sevenn) and then importable by name
    (copies and pickles of a calculator name its class)."""
    builders = {"BatchedCHGNetCalculator": _chgnet_class, "BatchedSevenNetCalculator": _sevennet_class}
    if name not in builders:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = builders[name]()
    cls.__module__, cls.__qualname__, cls.__name__ = __name__, name, name
    globals()[name] = cls
    return cls


def _chgnet_class() -> type:
    from chgnet.model.dynamics import CHGNetCalculator
    from pymatgen.io.ase import AseAtomsAdaptor

    class BatchedCHGNetCalculator(CHGNetCalculator):
        """``CHGNetCalculator`` with ``calculate_batch`` (batches under ``memory_budget``) and inference
        without a graph of the derivatives (:func:`chgnet_first_derivatives`)."""

        memory_model = CHGNET_MEMORY
        model_info_name = "CHGNet"
        batch_size = 16
        memory_budget = DEFAULT_BUDGET

        def _cutoff(self) -> float:
            conv = self.model.graph_converter
            return float(max(conv.atom_graph_cutoff, conv.bond_graph_cutoff))

        def calculate(self, atoms: Atoms | None = None, properties=None, system_changes=all_changes) -> None:
            """CHGNet's ASE path; an isolated molecule is evaluated in a box larger than the cutoff
            (:func:`isolated_in_box`; CHGNet itself needs a lattice), without stress."""
            atoms = atoms if atoms is not None else self.atoms
            boxed, isolated = isolated_in_box(atoms, self._cutoff(), "CHGNet")
            props = [p for p in (properties or self.implemented_properties) if not (isolated and p == "stress")]
            with chgnet_first_derivatives():
                super().calculate(boxed, props, system_changes)
            if isolated:
                self.results.pop("stress", None)
                self.atoms = atoms.copy()  # ASE's cache compares against the structure the caller gave

        def memory_sizes(self, structures: Sequence[Atoms]) -> list[tuple[int, int, int]]:
            """``(atoms, atom-graph edges, bond-graph angles)`` of each structure (estimated with vesin)."""
            from mattersim.memory import pair_counts

            conv = self.model.graph_converter
            out = []
            for a in structures:
                a = isolated_in_box(a, self._cutoff(), "CHGNet")[0]
                (edges, _), (_, angles) = pair_counts(a, [conv.atom_graph_cutoff, conv.bond_graph_cutoff])
                out.append((len(a), edges, angles))
            return out

        def calculate_batch(self, structures: Sequence[Atoms], properties=None) -> list[dict]:
            """Per structure: energy and, unless ``properties`` leaves them out, forces, stress and magmoms.
            CHGNet differentiates its energy once per derivative (forces, stress: two backward passes), so
            leaving forces out (clamped-ion elastic constants need stresses only) saves about a third of a call."""
            stress = properties is None or "stress" in properties
            forces = properties is None or "forces" in properties
            task = "e" + ("f" if forces else "") + ("sm" if stress else "")
            boxed = [isolated_in_box(a, self._cutoff(), "CHGNet") for a in structures]
            graphs = [
                self.model.graph_converter(AseAtomsAdaptor.get_structure(a)).to(self.device) for a, _ in boxed
            ]
            sizes = [(len(a), int(g.atom_graph.shape[0]), int(g.bond_graph.shape[0])) for a, g in zip(structures, graphs)]
            out: list = [None] * len(structures)
            for idx in budget_batches(sizes, self.memory_model, self.memory_budget, max_structures=self.batch_size):
                if len(idx) == 1:
                    _warn_if_over(self, f"structure {idx[0]}", sizes[idx[0]][0], self.memory_model(*sizes[idx[0]]))
                self.model.eval()
                with chgnet_first_derivatives():  # CHGNet's predict_graph, which refuses the tasks without "f"
                    pred = self.model([graphs[k] for k in idx], task=task)
                for pos, k in enumerate(idx):
                    out[k] = {key: pred[key][pos].detach().cpu().numpy() for key in ("e", "f", "s", "m") if key in pred}
                # the energy keeps the forward pass's graph (CHGNet retains it for the second derivative):
                # dropped before the next batch, which would otherwise run with two batches' activations
                del pred
            results = []
            for atoms, (_, isolated), p in zip(structures, boxed, out):
                factor = len(atoms) if self.model.is_intensive else 1
                energy = float(p["e"]) * factor
                res = {"energy": energy, "free_energy": energy}
                if "f" in p:
                    res["forces"] = np.asarray(p["f"], dtype=float)
                if "m" in p:
                    res["magmoms"] = np.asarray(p["m"], dtype=float)
                if not isolated and stress:  # a molecule's box has no meaningful stress
                    res["stress"] = full_stress(np.asarray(p["s"]) * self.stress_weight)
                results.append(res)
            return results

    return BatchedCHGNetCalculator


def _sevennet_class() -> type:
    import sevenn._keys as KEY
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.calculator import SevenNetCalculator
    from sevenn.train.dataload import unlabeled_atoms_to_graph
    from torch_geometric.loader.dataloader import Collater

    class BatchedSevenNetCalculator(SevenNetCalculator):
        """``SevenNetCalculator`` with ``calculate_batch``: merged graphs, batches under ``memory_budget``."""

        memory_model = SEVENNET_MEMORY
        model_info_name = "SevenNet"
        memory_budget = DEFAULT_BUDGET
        #: edges per merged batch on the CPU (a speed cap, beside the memory budget): larger batches are
        #: slower per structure there (120 mpf-alkali-TP frames: 8.7 s at 2048 edges, 9.1 s at 4096, 14.6 s at
        #: 16384, 30.7 s at the 8 GB default budget,
        #: 11.6 s one by one); None = no cap (GPUs)
        cpu_max_edges = SEVENNET_CPU_MAX_EDGES

        def memory_sizes(self, structures: Sequence[Atoms]) -> list[tuple[int, int, int]]:
            """``(atoms, edges, 0)`` of each structure (estimated with vesin)."""
            from mattersim.memory import pair_counts

            return [(len(a), pair_counts(a, [self.cutoff])[0][0], 0) for a in structures]

        def calculate_batch(self, structures: Sequence[Atoms], properties=None) -> list[dict]:
            """Per structure: energy, forces, stress (SevenNet computes all three in one pass; ``properties``
            is accepted for the common interface)."""
            graphs = []
            for atoms in structures:
                SevenNetCalculator.set_atoms(self, atoms)  # SevenNet's own check of its type map
                data = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, self.cutoff, with_shift=False))
                if self.modal:
                    data[KEY.DATA_MODALITY] = self.modal
                graphs.append(data)
            sizes = [(len(a), int(g[KEY.EDGE_IDX].shape[1]), 0) for a, g in zip(structures, graphs)]
            results: list = [None] * len(structures)
            collate = Collater([], follow_batch=None, exclude_keys=None)
            on_cpu = str(self.device).startswith("cpu")
            cap = self.cpu_max_edges if on_cpu and self.cpu_max_edges else float("inf")
            for idx in budget_batches(sizes, self.memory_model, self.memory_budget, max_edges=cap):
                if len(idx) == 1:
                    _warn_if_over(self, f"structure {idx[0]}", sizes[idx[0]][0], self.memory_model(*sizes[idx[0]]))
                batch = collate([graphs[k] for k in idx]).to(self.device)
                self.model.set_is_batch_data(True)
                try:
                    output = self.model(batch)
                finally:
                    self.model.set_is_batch_data(False)
                energy = output[KEY.PRED_TOTAL_ENERGY].detach().cpu().numpy().astype(float)
                split = [len(structures[k]) for k in idx]
                forces = np.split(output[KEY.PRED_FORCE].detach().cpu().numpy().astype(float), np.cumsum(split)[:-1])
                per_atom = np.split(output[KEY.ATOMIC_ENERGY].detach().cpu().numpy().astype(float).reshape(-1),
                                    np.cumsum(split)[:-1])
                # SevenNet's stress is -sigma in (xx yy zz xy yz zx); ASE's Voigt order is xx yy zz yz xz xy
                stress = (-output[KEY.PRED_STRESS]).detach().cpu().numpy().astype(float)[:, [0, 1, 2, 4, 5, 3]]
                for pos, k in enumerate(idx):
                    results[k] = {
                        "energy": float(energy[pos]),
                        "free_energy": float(energy[pos]),
                        "energies": per_atom[pos],
                        "forces": forces[pos],
                        "stress": voigt_6_to_full_3x3_stress(stress[pos]),
                    }
                del batch, output
            return results

    return BatchedSevenNetCalculator
