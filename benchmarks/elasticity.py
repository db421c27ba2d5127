"""Elasticity benchmark: bulk and shear moduli (VRH) of a model against DFT, :func:`run_elasticity`.

Reference: matcalc's MP PBE elasticity set (``mp-binary-pbe-elasticity-2025.1.json.gz``: 3953 binary
compounds, Materials Project PBE ``bulk_modulus_vrh`` / ``shear_modulus_vrh`` in GPa; data CC BY from the
Materials Project, file BSD-3-Clause from matcalc). Any JSON (or ``.json.gz``) list of records
``{"mp_id", "formula", "structure" (a pymatgen Structure dict), "bulk_modulus_vrh", "shear_modulus_vrh"}``
works.

Prediction: :func:`workflows.elastic.run_elastic` on the MP structure with the model: relaxation (cell and
positions, space group kept), strains of 0.5 % and 1 % in the symmetry-independent Voigt directions,
relaxed-ion by default (``relax_ions=False`` for clamped-ion), K_VRH and G_VRH (GPa).

Metrics (``metrics.json``): MAE of K_VRH and G_VRH over the entries that succeeded, the same over the
entries the model predicts mechanically stable, counts (entries, succeeded, failed, predicted unstable);
``parity.npz``: ``bulk_modulus__ref/__pred``, ``shear_modulus__ref/__pred``. Files: the layout of
:mod:`benchmarks.common`, plus ``entries/<id>.json`` (one per entry: reference, prediction, tensor,
stability, timings, or the error); a rerun resumes (entries with the same model, settings and input are
reused).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks.common import (compute_times, entry_key, metric, metrics_document, model_folder, peak_rss_mib,
                               print_metrics_main, run_entry_tasks, utc_now, write_benchmark_json)
from mattersim.calculator import model_info
from mattersim.distributed import ModelSpec, TaskRunner, add_dask_options
from mattersim.errors import InputError
from mattersim.io import RunLog, atomic_path, atomic_write_json, safe_filename
from workflows.outputs import model_identity

__all__ = ["DEFAULT_FILE", "load_elasticity_set", "run_elasticity"]

logger = logging.getLogger("mattersim.bench")

ENTRY_SCHEMA = "mattersim-benchmark/elasticity-entry/1"
#: the matcalc file's name, looked for in ../shared/data/matcalc/ next to the repository by default
DEFAULT_FILE = "mp-binary-pbe-elasticity-2025.1.json.gz"
QUANTITIES = (("bulk_modulus", "bulk_modulus_vrh", "K_VRH MAE"), ("shear_modulus", "shear_modulus_vrh", "G_VRH MAE"))


def default_path() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "matcalc" / DEFAULT_FILE


def load_elasticity_set(path: str | os.PathLike | None = None) -> tuple[list[dict], Path, str]:
    """``(records, path, sha256)`` of an elasticity reference file (see the module docstring); every record
    is checked (id, structure, both moduli) and a bad one is named by its index and field."""
    path = Path(path) if path is not None else default_path()
    if not path.is_file():
        raise InputError(f"Elasticity reference file '{path}' does not exist; pass the matcalc file {DEFAULT_FILE} "
                         "(or any JSON list of {mp_id, structure, bulk_modulus_vrh, shear_modulus_vrh}) with --data.")
    raw = path.read_bytes()
    try:
        text = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        records = json.loads(text)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"'{path}' is not a readable JSON (or gzipped JSON) file ({type(exc).__name__}: {exc}); "
                         "download it again.") from None
    if not isinstance(records, list) or not records:
        raise InputError(f"'{path}' holds no list of records; expected [{{mp_id, structure, bulk_modulus_vrh, "
                         "shear_modulus_vrh}, ...].")
    for k, rec in enumerate(records):
        missing = [f for f in ("mp_id", "structure", "bulk_modulus_vrh", "shear_modulus_vrh")
                   if not isinstance(rec, dict) or rec.get(f) is None]
        if missing:
            raise InputError(f"'{path}', record {k}: no {', '.join(missing)}; every record needs mp_id, structure "
                             "(a pymatgen Structure dict), bulk_modulus_vrh and shear_modulus_vrh (GPa).")
    return records, path, hashlib.sha256(raw).hexdigest()


def _atoms(rec: dict):
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_atoms(Structure.from_dict(rec["structure"]))


def _evaluate(rec: dict, calculator, settings: dict) -> dict:
    from workflows.elastic import run_elastic

    t0 = time.perf_counter()
    atoms = _atoms(rec)
    result = run_elastic(atoms, calculator, relax=True, relax_ions=settings["ions"] == "relaxed-ion",
                         strains=settings["strains"], fmax=settings["fmax_eV_per_A"],
                         ion_fmax=settings.get("ion_fmax_eV_per_A"), relax_steps=settings["relax_steps"],
                         symprec=settings["symprec"])
    s = result.summary
    return {
        "status": "ok",
        "formula": s["structure"]["formula"],
        "spacegroup": s["structure"]["spacegroup"],
        "n_atoms": len(atoms),
        "reference": {"bulk_modulus_vrh": float(rec["bulk_modulus_vrh"]), "shear_modulus_vrh": float(rec["shear_modulus_vrh"])},
        "prediction": {"bulk_modulus_vrh": s["moduli"]["k_vrh_GPa"], "shear_modulus_vrh": s["moduli"]["g_vrh_GPa"]},
        "elastic_tensor_ieee_GPa": s["elastic_tensor"]["ieee_GPa"],
        "stable": s["stability"]["stable"],
        "failing_criteria": s["stability"]["failing"],
        "fit_max_relative_residual": s["fit"]["max_relative_residual"],
        "n_strained_cells": s["strain_set"]["n_strained_cells"],
        "relaxation_steps": (s.get("relaxation") or {}).get("steps"),
        "ion_relaxation": s.get("ion_relaxation"),
        "timings_s": {**s["timings_s"], "entry": time.perf_counter() - t0},
    }


def _entry_task(calculator, payload) -> dict:
    rec, settings = payload
    return _evaluate(rec, calculator, settings)


def _describe(doc: dict) -> str:
    p, r = doc["prediction"], doc["reference"]
    return (f"K {p['bulk_modulus_vrh']:.1f} (ref {r['bulk_modulus_vrh']:.1f}), G {p['shear_modulus_vrh']:.1f} "
            f"(ref {r['shear_modulus_vrh']:.1f}) GPa{'' if doc['stable'] else ', UNSTABLE'}")


def _metrics(records: list[dict], n_entries: int, n_failed: int) -> tuple[list[dict], dict, dict]:
    ok = [r for r in records if r.get("status") == "ok"]
    stable = [r for r in ok if r.get("stable")]
    out, parity, groups = [], {}, {"predicted stable": []}
    for name, key, label in QUANTITIES:
        ref = np.array([r["reference"][key] for r in ok], dtype=float)
        pred = np.array([r["prediction"][key] if r["prediction"][key] is not None else np.nan for r in ok], dtype=float)
        finite = np.isfinite(ref) & np.isfinite(pred)
        err = np.abs(pred - ref)[finite]
        out.append(metric(f"{name}_mae_GPa", label, "GPa", float(np.mean(err)) if finite.any() else None))
        # robust beside the mean: the Reuss average of a (nearly) unstable tensor can be any number (-6e4 GPa)
        out.append(metric(f"{name}_median_ae_GPa", label.replace("MAE", "median |error|"), "GPa",
                          float(np.median(err)) if finite.any() else None))
        parity[f"{name}__ref"], parity[f"{name}__pred"] = ref[finite], pred[finite]
        s_ref = np.array([r["reference"][key] for r in stable], dtype=float)
        s_pred = np.array([r["prediction"][key] for r in stable], dtype=float)
        groups["predicted stable"].append(metric(f"{name}_mae_GPa", label, "GPa",
                                                 float(np.mean(np.abs(s_pred - s_ref))) if len(stable) else None))
    groups["predicted stable"].append(metric("n_counted", "Entries", None, len(stable), None))
    out += [metric("n_entries", "Entries", None, n_entries, None),
            metric("n_succeeded", "Succeeded entries", None, len(ok), None),
            metric("n_failed", "Failed entries", None, n_failed, "lower"),
            metric("n_unstable_prediction", "Entries the model predicts mechanically unstable", None,
                   len(ok) - len(stable), None),
            metric("n_unstable_gamma", "Entries whose relaxed structure has unstable Γ modes (model's Hessian)", None,
                   sum(1 for r in ok if (r.get("ion_relaxation") or {}).get("unstable_gamma_modes")), None)]
    return out, groups, parity


def definitions(settings: dict) -> dict:
    """What the elasticity numbers mean (``definitions`` of ``metrics.json``)."""
    return {
        "reference": "Materials Project PBE elastic tensors (K_VRH, G_VRH in GPa; matcalc's MP binary set)",
        "prediction": f"workflows.elastic.run_elastic: relaxation (cell and positions, symmetry kept, fmax "
                      f"{settings['fmax_eV_per_A']:g} eV/Å), strains ±{settings['strains']} in the symmetry-independent "
                      f"Voigt directions, {settings['ions']} (the strained cells' ions to "
                      f"{settings.get('ion_fmax_eV_per_A', settings['fmax_eV_per_A']):g} eV/Å, BFGS from the model's "
                      "Γ-point Hessian, its unstable modes held), slopes of a cubic fit, point-group averaged",
        "moduli": "Voigt-Reuss-Hill averages (pymatgen ElasticTensor)",
        "groups": "'predicted stable': only the entries whose predicted tensor passes the Born criteria",
        "energy_convention": "not used: elastic constants depend on stresses only",
    }


def run_elasticity(records: Sequence[dict], calculator, output_dir: str | os.PathLike, *, relax_ions: bool = True,
                   strains: Sequence[float] = (0.005, 0.01), fmax: float = 0.005, relax_steps: int = 500,
                   symprec: float = 1e-3, max_entries: int | None = None, progress: bool = True,
                   dataset: dict | None = None, benchmark: str = "elasticity", runner=None, spec=None) -> dict:
    """Benchmark ``calculator`` on the elasticity ``records`` (:func:`load_elasticity_set`) into
    ``output_dir``; returns the ``metrics.json`` document. A failing entry is listed, never fatal; a rerun
    resumes. ``symprec`` (Å) is looser than the workflow's default, as
    MP structures are not exactly symmetric. ``runner``/``spec``: the entries as tasks on Dask
    (:func:`benchmarks.common.run_entry_tasks`)."""
    from workflows.elastic import ION_FMAX_DIVISOR  # run_elastic's default, recorded in the entries' key

    t_start = time.perf_counter()
    items = list(records)[: max_entries] if max_entries is not None else list(records)
    info = model_info(calculator)
    root, slug, out = model_folder(output_dir, benchmark, info)
    entries_dir = out / "entries"
    entries_dir.mkdir(parents=True, exist_ok=True)
    settings = {"ions": "relaxed-ion" if relax_ions else "clamped-ion", "strains": sorted(float(s) for s in strains),
                "fmax_eV_per_A": float(fmax), "ion_fmax_eV_per_A": float(fmax) / ION_FMAX_DIVISOR,
                "relax_steps": int(relax_steps),
                "symprec": float(symprec), "strain_frame": "the crystal's standard orientation (spglib)"}
    model_id = model_identity(info)
    failures, fingerprints, jobs = [], [], []
    with RunLog(out / "run.log", logger) as log:
        log.info(f"{benchmark}: {len(items)} entries, model {info.get('name')}, {settings['ions']}, output {out}")
        for index, rec in enumerate(items):
            eid = str(rec.get("mp_id", index))
            input_sha = hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()
            fingerprints.append(f"{eid} {input_sha}")
            key = entry_key(ENTRY_SCHEMA, model_id, settings, input_sha)
            jobs.append({"index": index, "id": eid, "path": entries_dir / f"{safe_filename(eid)}.json", "key": key,
                         "record": {"schema": ENTRY_SCHEMA, "id": eid, "key": key, "settings": settings, "date": utc_now()},
                         "payload": (rec, settings)})
        records_out, n_new, n_reused = run_entry_tasks(
            jobs, _entry_task, calculator=calculator, runner=runner, spec=spec, log=log, progress=progress,
            description=f"{benchmark} · {info.get('name')}", describe=_describe)
        for doc in records_out:
            if doc.get("status") != "ok":
                failures.append({"index": doc["index"], "id": doc["id"],
                                 "error": f"{doc['error']['type']}: {str(doc['error']['message'])[:500]}"})
        metrics, groups, parity = _metrics(records_out, len(items), len(failures))
        dataset = dict(dataset or {})
        dataset.setdefault("name", benchmark)
        dataset.update({"n_items": len(items),
                        "entries_sha256": hashlib.sha256("\n".join(sorted(fingerprints)).encode()).hexdigest()})
        dataset.setdefault("sha256", dataset["entries_sha256"])
        doc = metrics_document(benchmark=benchmark, kind="elasticity", dataset=dataset, model=info, metrics=metrics,
                               n_items=len(items), n_done=sum(r.get("status") == "ok" for r in records_out),
                               failures=failures, wall_time_s=time.perf_counter() - t_start, groups=groups,
                               extra={**settings, **compute_times(records_out), "evaluated_now": n_new, "reused": n_reused,
                                      "peak_rss_mib": peak_rss_mib()},
                               definitions=definitions(settings))
        with atomic_path(out / "parity.npz") as tmp:
            np.savez(tmp, **parity)
        atomic_write_json(out / "metrics.json", doc)
        write_benchmark_json(root, benchmark=benchmark, kind="elasticity", dataset=dataset, slug=slug)
        log.info("done: " + ", ".join(f"{m['key']} {m['value']:.4g}" for m in metrics if m["value"] is not None))
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.elasticity --model M [--data FILE] [--max N] [--clamped-ion] -o OUT``."""
    from mattersim.registry import load_calculator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="model name or checkpoint path (repeatable)")
    parser.add_argument("--data", default=None, help=f"reference file (default: ../shared/data/matcalc/{DEFAULT_FILE})")
    parser.add_argument("--max", type=int, default=None, help="only the first N entries")
    parser.add_argument("--clamped-ion", action="store_true", help="do not relax the ions of the strained cells")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-o", "--output", required=True)
    add_dask_options(parser)
    args = parser.parse_args(argv)

    def documents():
        records, path, sha = load_elasticity_set(args.data)
        with TaskRunner(workers=args.workers, scheduler=args.scheduler) as runner:
            for name in args.model:
                spec = ModelSpec(model=name) if runner.distributed else None
                yield run_elasticity(records, load_calculator(name), args.output, relax_ions=not args.clamped_ion,
                                     max_entries=args.max, progress=not args.no_progress,
                                     dataset={"name": "elasticity", "path": str(path), "sha256": sha},
                                     runner=runner, spec=spec)

    return print_metrics_main(documents())

if __name__ == "__main__":
    raise SystemExit(main())
