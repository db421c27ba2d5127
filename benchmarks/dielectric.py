"""Accuracy of a Z* / eps_inf model on PhononDB BORN data, and LO-TO at Gamma for validation materials.

:func:`evaluate_dielectric` predicts every entry of an id list (e.g. the shipped model's untouched test
split) and reports, per tensor element, the MAE, RMSE and median absolute error of Z* (e) and eps_inf,
for three groups: materials with mean eps_inf <= 20 (the accuracy goal), all non-metallic materials,
and the metallic / narrow-gap ones (listed separately in the split), plus how often the DFT value lies
within two ensemble standard deviations. It writes ``metrics.json``, ``predictions.npz`` and parity plots
(``parity_born.png``, ``parity_epsilon.png``).

:func:`validation_table` compares, for named PhononDB entries, the predicted and DFT Z* (symmetry-
independent atoms) and eps_inf, and the LO and TO frequencies at Gamma that phonopy gives with the
entry's DFT force constants (its ``FORCE_SETS``) and either the DFT ``BORN`` or the predicted values, so
that the difference is the dielectric model's alone.

Usage: ``python -m benchmarks.dielectric evaluate MODEL ENTRIES_DIR IDS_FILE [METALLIC_IDS_FILE] -o OUT``;
``python -m benchmarks.dielectric package RUN... --entries DIR --version V`` ships trained members
(:func:`package`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mattersim.io import atomic_path, atomic_write_json

#: PhononDB entries of the model card's validation table: (label, id)
VALIDATION = (
    ("3C-SiC", "mp-8062-20180417"),
    ("MgO", "mp-1265-20180417"),
    ("NaCl", "mp-22862-20180417"),
    ("GaN (wurtzite)", "mp-804-20180417"),
    ("BaTiO3 (cubic)", "mp-2998-20180417"),
)


def _predict(model, structures: Sequence) -> list[dict]:
    """Mean Z*, eps_inf and (ensembles) their member std for each structure."""
    structures = list(structures)
    if hasattr(model, "property_batch"):  # a potential+dielectric composite
        results = model.property_batch(structures)
    elif hasattr(model, "calculate_batch"):  # the dielectric model, an ensemble, a multi-task calculator
        results = model.calculate_batch(structures)
    else:  # any DielectricPredictor
        results = [dict(zip(("born_effective_charges", "dielectric_tensor"), model.predict_dielectric(a)))
                   for a in structures]
    out = []
    for res in results:
        out.append({k: np.asarray(res[k]) for k in ("born_effective_charges", "dielectric_tensor",
                                                     "born_effective_charges_std", "dielectric_tensor_std")
                    if k in res})
    return out


def _stats(errors: np.ndarray) -> dict:
    e = np.abs(np.asarray(errors, dtype=float).ravel())
    if e.size == 0:
        return {"n": 0, "mae": None, "rmse": None, "median": None}
    return {"n": int(e.size), "mae": float(e.mean()), "rmse": float(np.sqrt(np.mean(e**2))), "median": float(np.median(e))}


def _within(errors: np.ndarray, std: np.ndarray | None, ref: np.ndarray) -> float | None:
    """Fraction of the non-zero DFT elements whose error is within two ensemble standard deviations (None
    without an ensemble). Elements zero by symmetry (|DFT| < 1e-3) are left out: there both the error
    and the spread are round-off."""
    if std is None or std.size == 0 or np.isnan(std).all():
        return None
    keep = np.abs(ref) >= 1e-3
    return float(np.mean(np.abs(errors[keep]) <= 2 * std[keep]))


def _rank_correlation(errors: Sequence[float], sigmas: Sequence[float]) -> float | None:
    """Spearman rank correlation between per-material |error| and sigma (None without a spread)."""
    from scipy.stats import spearmanr

    e, s = np.asarray(errors, dtype=float), np.asarray(sigmas, dtype=float)
    keep = np.isfinite(e) & np.isfinite(s)
    if keep.sum() < 3 or np.ptp(s[keep]) == 0:
        return None
    return float(spearmanr(e[keep], s[keep]).statistic)


def spread_ranking(born_err, born_std, born_ref, eps_err, eps_std) -> dict:
    """Does the spread rank materials by error? Per material: Z*, the mean |error| and mean sigma over the
    non-zero DFT elements; eps_inf, the same over the diagonal. Returns the Spearman rank correlations
    (``born_effective_charges``, ``dielectric_tensor``) and how many materials entered."""
    zb_e, zb_s = [], []
    for err, std, ref in zip(born_err, born_std, born_ref):
        keep = np.abs(np.asarray(ref)) >= 1e-3
        if keep.any():
            zb_e.append(float(np.abs(np.asarray(err)[keep]).mean()))
            zb_s.append(float(np.asarray(std)[keep].mean()))
    ee = [float(np.abs(np.diagonal(e)).mean()) for e in eps_err]
    es = [float(np.diagonal(s).mean()) for s in eps_std]
    return {"born_effective_charges": _rank_correlation(zb_e, zb_s), "dielectric_tensor": _rank_correlation(ee, es),
            "materials": len(ee), "definition": "Spearman rank correlation between the per-material mean |error| "
            "and mean sigma (Z*: non-zero DFT elements; eps_inf: diagonal)"}


def calibrate_spread(model, entries_root: str | Path, ids) -> dict[str, float]:
    """Per property, the factor k that puts 95 % of the non-zero DFT elements of ``ids`` within 2 k sigma
    of the ensemble mean (k = 0.95 quantile of |error| / sigma, over 2). ``model`` must report the raw
    member spread (no ``spread_scale``): the factor multiplies it."""
    from mattersim.data import read_phonondb

    scales = getattr(model, "spread_scale", None) or {}
    if any(float(k) != 1.0 for k in scales.values()):
        raise ValueError("calibrate_spread needs the raw member spread: load the model without spread_scale")
    samples = read_phonondb(entries_root, ids)
    preds = _predict(model, [s.atoms for s in samples])
    scale = {}
    for prop in ("born_effective_charges", "dielectric_tensor"):
        ref = np.concatenate([np.ravel(s.labels[prop]) for s in samples])
        pred = np.concatenate([np.ravel(p[prop]) for p in preds])
        std = np.concatenate([np.ravel(p[f"{prop}_std"]) for p in preds])
        keep = (np.abs(ref) >= 1e-3) & (std > 0)
        scale[prop] = float(np.quantile(np.abs(pred - ref)[keep] / std[keep], 0.95) / 2)
    return scale


def _parity(path: Path, ref: np.ndarray, pred: np.ndarray, label: str, log: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=130)
    ax.scatter(ref, pred, s=4, alpha=0.4, edgecolors="none")
    lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"DFT {label}")
    ax.set_ylabel(f"predicted {label}")
    mae = float(np.mean(np.abs(pred - ref)))
    ax.set_title(f"{label}: MAE {mae:.3g} ({ref.size} elements)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def evaluate_dielectric(model, entries_root: str | Path, ids: str | Path | Sequence[str], output: str | Path, *,
                        metallic_ids: str | Path | Sequence[str] | None = None) -> dict:
    """Test-set metrics of ``model`` (a calculator predicting Z* and eps_inf); see the module docstring."""
    from mattersim.calculator import model_info
    from mattersim.data import read_phonondb

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    groups_samples = {"main": read_phonondb(entries_root, ids)}
    if metallic_ids is not None:
        groups_samples["metallic"] = read_phonondb(entries_root, metallic_ids)
    arrays: dict[str, Any] = {}
    per_material = {}
    for name, samples in groups_samples.items():
        preds = _predict(model, [s.atoms for s in samples])
        eps_ref = np.stack([s.labels["dielectric_tensor"] for s in samples])
        eps_pred = np.stack([p["dielectric_tensor"] for p in preds])
        per_material[name] = {
            "ids": [s.source for s in samples],
            "eps_ref": eps_ref, "eps_pred": eps_pred,
            "eps_std": np.stack([p.get("dielectric_tensor_std", np.full((3, 3), np.nan)) for p in preds]),
            "born_ref": [s.labels["born_effective_charges"] for s in samples],
            "born_pred": [p["born_effective_charges"] for p in preds],
            "born_std": [p.get("born_effective_charges_std", np.full_like(p["born_effective_charges"], np.nan))
                         for p in preds],
        }
    metrics: dict[str, Any] = {}
    main = per_material["main"]
    mean_eps = np.trace(main["eps_ref"], axis1=1, axis2=2) / 3
    selections = {"mean_eps_le_20": mean_eps <= 20.0, "all_non_metallic": np.ones_like(mean_eps, dtype=bool)}
    for label, mask in selections.items():
        idx = np.flatnonzero(mask)
        born_err = np.concatenate([(main["born_pred"][i] - main["born_ref"][i]).ravel() for i in idx])
        born_std = np.concatenate([main["born_std"][i].ravel() for i in idx])
        born_ref = np.concatenate([main["born_ref"][i].ravel() for i in idx])
        eps_err = (main["eps_pred"][idx] - main["eps_ref"][idx]).ravel()
        eps_std = main["eps_std"][idx].ravel()
        # diagonal elements only: in symmetric crystals most off-diagonal elements are zero in both the DFT
        # and the prediction, which pulls the all-element median to ~0
        born_diag = np.concatenate([np.diagonal(main["born_pred"][i] - main["born_ref"][i], axis1=1, axis2=2).ravel()
                                    for i in idx])
        eps_diag = np.diagonal(main["eps_pred"][idx] - main["eps_ref"][idx], axis1=1, axis2=2).ravel()
        ranking = spread_ranking([main["born_pred"][i] - main["born_ref"][i] for i in idx],
                                 [main["born_std"][i] for i in idx], [main["born_ref"][i] for i in idx],
                                 main["eps_pred"][idx] - main["eps_ref"][idx], main["eps_std"][idx])
        metrics[label] = {
            "materials": int(idx.size),
            "spread_rank_correlation": ranking,
            "born_effective_charges": {**_stats(born_err), "within_2_std": _within(born_err, born_std, born_ref),
                                       "diagonal": _stats(born_diag)},
            "dielectric_tensor": {**_stats(eps_err),
                                  "within_2_std": _within(eps_err, eps_std, main["eps_ref"][idx].ravel()),
                                  "diagonal": _stats(eps_diag)},
        }
    if "metallic" in per_material:
        met = per_material["metallic"]
        eps_err = (met["eps_pred"] - met["eps_ref"]).ravel()
        rel = (np.trace(met["eps_pred"], axis1=1, axis2=2) / np.trace(met["eps_ref"], axis1=1, axis2=2))
        metrics["metallic"] = {
            "materials": len(met["ids"]),
            "dielectric_tensor": _stats(eps_err),
            "mean_eps_ratio_pred_over_dft": [float(x) for x in rel],
            "born_effective_charges": _stats(np.concatenate([(p - r).ravel() for p, r in
                                                              zip(met["born_pred"], met["born_ref"])])),
        }
    metrics["model"] = model_info(model)
    metrics["wall_time_s"] = time.perf_counter() - start
    born_ref = np.concatenate([b.ravel() for b in main["born_ref"]])
    born_pred = np.concatenate([b.ravel() for b in main["born_pred"]])
    _parity(out / "parity_born.png", born_ref, born_pred, "Z* element (e)")
    _parity(out / "parity_epsilon.png", main["eps_ref"].reshape(len(mean_eps), -1)[:, [0, 4, 8]].ravel(),
            main["eps_pred"].reshape(len(mean_eps), -1)[:, [0, 4, 8]].ravel(), "eps_inf diagonal", log=True)
    arrays.update(born_ref=born_ref, born_pred=born_pred, eps_ref=main["eps_ref"], eps_pred=main["eps_pred"],
                  eps_std=main["eps_std"], ids=np.array(main["ids"]))
    with atomic_path(out / "predictions.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def validation_table(model, entries_root: str | Path, entries: Sequence[tuple[str, str]] = VALIDATION) -> list[dict]:
    """Per material: predicted vs DFT Z* (independent atoms) and eps_inf; LO/TO at Gamma from the DFT
    force constants with the DFT or the predicted Z*/eps_inf (entries with ``FORCE_SETS``)."""
    from benchmarks.phonondb import load_entry, reference_phonopy
    from mattersim.data import read_phonondb_entry
    from workflows import nac as nac_module

    rows = []
    for label, eid in entries:
        folder = Path(entries_root) / eid
        sample, _ = read_phonondb_entry(folder)
        pred = _predict(model, [sample.atoms])[0]
        row: dict[str, Any] = {
            "material": label, "id": eid, "formula": sample.atoms.get_chemical_formula(),
            "epsilon_dft": float(np.trace(sample.labels["dielectric_tensor"]) / 3),
            "epsilon_pred": float(np.trace(pred["dielectric_tensor"]) / 3),
            "epsilon_std": float(np.trace(pred["dielectric_tensor_std"]) / 3) if "dielectric_tensor_std" in pred else None,
        }
        # Z* of each species: the isotropic part (trace / 3) of its first atom
        seen = {}
        for k, sym in enumerate(sample.atoms.get_chemical_symbols()):
            if sym not in seen:
                seen[sym] = {
                    "dft": float(np.trace(sample.labels["born_effective_charges"][k]) / 3),
                    "pred": float(np.trace(pred["born_effective_charges"][k]) / 3),
                    "std": (float(np.trace(pred["born_effective_charges_std"][k]) / 3)
                            if "born_effective_charges_std" in pred else None),
                }
        row["born_isotropic"] = seen
        if (folder / "FORCE_SETS").is_file():
            entry = load_entry(folder)
            ph = reference_phonopy(entry, nac=True)
            dft = nac_module.gamma_lo_to(ph)
            born = nac_module.resolve_born(predictor=model, primitive_atoms=ph.primitive)
            born_sym, _ = nac_module.symmetrize(born, ph.primitive)
            ph.nac_params = born_sym.to_phonopy_nac_params(method=ph.nac_params.get("method", "gonze"))
            ours = nac_module.gamma_lo_to(ph)
            d0, p0 = dft["directions"][0], ours["directions"][0]  # along [100]
            row["lo_THz_dft"] = d0["lo_frequencies"]
            row["lo_THz_pred"] = p0["lo_frequencies"]
            row["to_THz"] = d0["to_frequencies"]
        rows.append(row)
    return rows


#: structures whose predictions card.json records for the regression test (tests/test_dielectric_model.py)
REGRESSION = ("mp-8062-20180417", "mp-1265-20180417", "mp-804-20180417")


def package(runs: Sequence[str | Path], entries_root: str | Path, *, version: str, figures: str | Path,
            append: bool = False) -> dict:
    """Ship trained members: copy each run's ``best.pth`` to ``mattersim/pretrained/mattersim-dielectric/
    member_<k>.pth``, calibrate the ensemble spread on the validation split (:func:`calibrate_spread`),
    evaluate on the untouched test split, and write ``card.json`` (version, members, training runs, split
    sizes, spread calibration, test metrics, validation table, regression values). With ``append`` the
    members already shipped (and their card entries) are kept and the runs become the next members."""
    import json
    import shutil

    from mattersim.composite import load_dielectric, member_files
    from mattersim.data import read_phonondb_entry
    from mattersim.dielectric import MODEL_DIR
    from mattersim.registry import file_sha256

    members = []
    if append:
        old = {m["file"]: m for m in json.loads((MODEL_DIR / "card.json").read_text()).get("members", [])}
        for path in member_files(MODEL_DIR):
            entry = dict(old.get(path.name) or {"file": path.name})
            entry["sha256"] = file_sha256(path)
            members.append(entry)
    start = len(members)
    for k, run in enumerate(runs, start=start):
        run = Path(run)
        shutil.copyfile(run / "best.pth", MODEL_DIR / f"member_{k}.pth")
        history = json.loads((run / "history.json").read_text())
        members.append({"file": f"member_{k}.pth", "sha256": file_sha256(MODEL_DIR / f"member_{k}.pth"),
                        "history": history})
    split = {name: len((MODEL_DIR / f"{name}.txt").read_text().split())
             for name in ("train", "train_metallic", "valid", "valid_metallic", "test", "test_metallic")}
    card = {"name": "mattersim-dielectric", "version": version, "members": members, "split": split}
    atomic_write_json(MODEL_DIR / "card.json", card)  # uncalibrated first
    card["spread_scale"] = calibrate_spread(load_dielectric(MODEL_DIR), entries_root, MODEL_DIR / "valid.txt")
    atomic_write_json(MODEL_DIR / "card.json", card)
    model = load_dielectric(MODEL_DIR)  # calibrated
    figures = Path(figures)
    metrics = evaluate_dielectric(model, entries_root, MODEL_DIR / "test.txt", figures,
                                  metallic_ids=MODEL_DIR / "test_metallic.txt")
    rows = validation_table(model, entries_root)
    regression = {}
    for eid in REGRESSION:
        sample, _ = read_phonondb_entry(Path(entries_root) / eid)
        res = model.calculate_batch([sample.atoms])[0]
        regression[eid] = {"numbers": sample.atoms.numbers, "cell": sample.atoms.cell[:],
                           "scaled_positions": sample.atoms.get_scaled_positions(),
                           **{k: res[k] for k in ("born_effective_charges", "dielectric_tensor",
                                                  "dielectric_tensor_std")}}
    card.update(test_metrics=metrics, validation=rows, regression=regression)
    atomic_write_json(MODEL_DIR / "card.json", card)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    from mattersim.registry import load_calculator

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="metrics of a model on an id list, and the validation table")
    ev.add_argument("model")
    ev.add_argument("entries")
    ev.add_argument("ids")
    ev.add_argument("metallic_ids", nargs="?")
    ev.add_argument("-o", "--output", required=True)
    pk = sub.add_parser("package", help="ship trained members with their card.json")
    pk.add_argument("runs", nargs="+", help="training output folders (best.pth, history.json)")
    pk.add_argument("--entries", required=True)
    pk.add_argument("--version", required=True)
    pk.add_argument("--figures", default="docs/figures/dielectric")
    pk.add_argument("--append", action="store_true", help="keep the shipped members; the runs become the next ones")
    args = parser.parse_args(argv)
    if args.command == "package":
        card = package(args.runs, args.entries, version=args.version, figures=args.figures, append=args.append)
        metrics, rows = card["test_metrics"], card["validation"]
    else:
        # the test split may hold elements the training split lacks: evaluate them (with a warning) too
        model = load_calculator(args.model, allow_untrained_elements=True)
        metrics = evaluate_dielectric(model, args.entries, args.ids, args.output, metallic_ids=args.metallic_ids)
        rows = validation_table(model, args.entries)
        atomic_write_json(Path(args.output) / "validation.json", rows)
    for group in ("mean_eps_le_20", "all_non_metallic"):
        m = metrics[group]
        rank = m["spread_rank_correlation"]
        print(f"{group}: {m['materials']} materials; Z* MAE {m['born_effective_charges']['mae']:.4f} e, "
              f"eps_inf MAE {m['dielectric_tensor']['mae']:.4f}; 2 sigma coverage Z* "
              f"{m['born_effective_charges']['within_2_std']}, eps {m['dielectric_tensor']['within_2_std']}; "
              f"rank correlation |error| vs sigma Z* {rank['born_effective_charges']}, eps {rank['dielectric_tensor']}")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
