"""One entry point for every benchmark: :func:`run_benchmark` (used by ``mattersim bench run``).

Targets:

- a known energy/force/stress set (:data:`benchmarks.datasets.SETS`), e.g. ``mpf-TP``;
- ``all``: the six known sets, each into ``OUTPUT/<set>/``;
- ``hex``: HEX from the file given as ``data`` (:mod:`benchmarks.hex`);
- ``elasticity``: bulk and shear moduli against the MP PBE elasticity set (:mod:`benchmarks.elasticity`;
  ``data``: its file, default ``../shared/data/matcalc/mp-binary-pbe-elasticity-2025.1.json.gz``);
- ``phonondb``: PhononDB entries under the folder ``data`` (:mod:`benchmarks.phonondb`), restricted to
  ``subset`` (a file of entry ids; by default ``benchmark_subset.txt`` next to the entries folder, when
  it exists);
- the path of any extxyz file with energy, forces and stress (a custom set named after the file).

Every model is loaded once and run on every set; results go to ``OUTPUT/<model>/`` (one set) or
``OUTPUT/<set>/<model>/`` (``all``). Reruns resume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from benchmarks.datasets import SETS, load_set
from mattersim.errors import InputError

__all__ = ["TARGETS", "run_benchmark"]

TARGETS = (*SETS, "all", "hex", "phonondb", "elasticity")


def _default_subset(root: Path) -> Path | None:
    for candidate in (root / "benchmark_subset.txt", root.parent / "benchmark_subset.txt"):
        if candidate.is_file():
            return candidate
    return None


def run_benchmark(target: str, models: Sequence[Any], output_dir: str | os.PathLike, *,
                  data: str | os.PathLike | None = None, subset: str | os.PathLike | None = None,
                  max_items: int | None = None, device: str = "cpu", dtype: str = "float32",
                  trust_pickle: bool = False, download: bool = True, progress: bool = True,
                  allow_untrained_elements: bool = False, displacement: float | None = None,
                  energy_convention: str | None = None, workers: int | None = None,
                  scheduler: str | None = None) -> list[dict]:
    """Run ``target`` for each of ``models`` (names, checkpoint paths or calculators); returns the
    ``metrics.json`` documents, one per (model, set). A structure with an element a model was not trained
    on fails alone (listed in ``failures``) unless ``allow_untrained_elements``. ``displacement``: the
    PhononDB prediction's finite displacement in Å (None: PhononDB's 0.01). ``energy_convention``
    (``raw``/``mp2020``): the energies of models that record none (checkpoint files, other calculators);
    registry models keep their own. ``workers`` (local Dask worker processes) or ``scheduler`` (an existing
    Dask cluster's address): the work runs as tasks there (:mod:`mattersim.distributed`: PhononDB and
    elasticity entries, energy/force/stress chunks), each worker loading the model once; the models must
    then be names or checkpoint paths."""
    from mattersim.conventions import check_convention
    from mattersim.distributed import TaskRunner

    runner = TaskRunner(workers=workers, scheduler=scheduler)  # checks the two options
    if runner.distributed and not all(isinstance(m, (str, os.PathLike)) for m in models):
        raise InputError("On Dask every worker loads the model itself: give models by name or checkpoint path.")
    if energy_convention is not None:
        check_convention(energy_convention, "--energy-convention")
    if not models:
        raise InputError("Give at least one model (--model NAME or a checkpoint path).")
    text = str(target).strip()
    lowered = text.lower()
    out = Path(output_dir)
    # check the inputs before loading any model
    if lowered == "hex":
        if data is None:
            raise InputError("The HEX benchmark needs its reference file: pass --data FILE (extxyz with energy, "
                             "forces and stress; see docs/benchmarks.md).")
        if not Path(data).is_file():
            raise InputError(f"--data {data}: no such file; the HEX benchmark needs its reference file (extxyz "
                             "with energy, forces and stress; see docs/benchmarks.md).")
        jobs = [("hex", None)]
    elif lowered == "phonondb":
        if data is None:
            raise InputError("The PhononDB benchmark needs its entries: pass --data DIR (a folder of PhononDB "
                             "entries or .tar.lzma archives; see docs/benchmarks.md).")
        if not Path(data).exists():
            raise InputError(f"--data {data}: no such folder (resolved from the current directory "
                             f"{Path.cwd()}); give the folder of PhononDB entries (<id>/POSCAR-unitcell, "
                             "FORCE_SETS, ...) or of .tar.lzma archives.")
        jobs = [("phonondb", None)]
    elif lowered == "elasticity":
        from benchmarks.elasticity import load_elasticity_set

        elastic_set = load_elasticity_set(data)  # checked before any model loads
        jobs = [("elasticity", None)]
    elif lowered == "all":
        sets = [load_set(name, data, download=download, progress=progress) for name in SETS]
        jobs = [("efs", (s, out / s.name)) for s in sets]
    else:
        dataset = load_set(text, data, download=download, progress=progress)
        jobs = [("efs", (dataset, out))]
    if max_items:
        jobs = [(kind, (arg[0].subset(range(min(int(max_items), len(arg[0])))), arg[1])) if kind == "efs"
                else (kind, arg) for kind, arg in jobs]

    entries = None
    if lowered == "phonondb":
        from benchmarks.phonondb import find_entries

        root = Path(data)
        subset_file = subset if subset is not None else (_default_subset(root) if root.is_dir() else None)
        entries = find_entries(root, subset=subset_file)

    documents = []
    with runner.started():
        for model in models:
            documents += _run_model(model, jobs, runner, entries, out, data=data, max_items=max_items, device=device,
                                    dtype=dtype, trust_pickle=trust_pickle, download=download, progress=progress,
                                    allow_untrained_elements=allow_untrained_elements, displacement=displacement,
                                    energy_convention=energy_convention, elastic_set=elastic_set if lowered == "elasticity" else None)
    return documents


def _run_model(model, jobs, runner, entries, out, *, data, max_items, device, dtype, trust_pickle, download, progress,
               allow_untrained_elements, displacement, energy_convention, elastic_set) -> list[dict]:
    from mattersim.calculator import model_info
    from mattersim.distributed import ModelSpec
    from mattersim.registry import load_calculator

    documents = []
    spec = (ModelSpec(model=str(model), device=device, dtype=dtype, trust_pickle=trust_pickle,
                      allow_untrained_elements=allow_untrained_elements) if runner.distributed else None)
    calc = load_calculator(model, device=device, dtype=dtype, trust_pickle=trust_pickle, download=download,
                           allow_untrained_elements=allow_untrained_elements)
    convention = energy_convention if model_info(calc).get("energy_convention") is None else None
    for kind, arg in jobs:
        if kind == "efs":
            from benchmarks.efs import run_efs

            dataset, folder = arg
            documents.append(run_efs(dataset, calc, folder, progress=progress, energy_convention=convention,
                                     runner=runner, spec=spec))
        elif kind == "elasticity":
            from benchmarks.elasticity import run_elasticity

            records, path, sha = elastic_set
            documents.append(run_elasticity(records, calc, out, max_entries=max_items, progress=progress,
                                            dataset={"name": "elasticity", "path": str(path), "sha256": sha},
                                            runner=runner, spec=spec))
        elif kind == "hex":
            from benchmarks.hex import run_hex

            documents.append(run_hex(data, calc, out, max_items=max_items, progress=progress,
                                     energy_convention=convention, runner=runner, spec=spec))
        else:
            from benchmarks.phonondb import run_phonondb

            kw = {} if displacement is None else {"displacement": float(displacement)}
            documents.append(run_phonondb(entries, calc, out, progress=progress, max_entries=max_items,
                                          runner=runner, spec=spec, **kw))
    return documents
