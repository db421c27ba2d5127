"""Side-by-side reports of benchmark results: Markdown, self-contained HTML, JSON and PNG figures.

Input: one or more results folders in the layout described in :mod:`benchmarks.common` (a folder with
``benchmark.json`` and one ``<model-slug>/metrics.json`` + ``parity.npz`` per model), or a parent folder
whose direct sub-folders are such folders. Runs of the same benchmark from several folders are merged into
one table (one column per model); when the same model appears twice for one benchmark the newest run (by
its ``date``) is kept and the report says so. A model listed in ``benchmark.json`` that has no
``metrics.json`` yet (a run still in progress, or interrupted) is skipped with a warning line.

Output (:func:`make_report`), all files written atomically (temporary file + rename):

* ``output`` ending in ``.md`` (or ``.html`` / ``.json``): its stem ``S`` is used and the report is
  ``S.md``, ``S.html``, ``S.json`` and the figures folder ``S_figures/``;
* any other ``output`` is a folder (created if needed): ``report.md``, ``report.html``, ``report.json``
  and ``figures/`` inside it.

The Markdown links the PNGs by relative path; the HTML embeds them as base64 ``data:`` URIs with inline
CSS, so it is one file that can be mailed around. The JSON (schema ``mattersim-benchmark-report/1``) keeps
every ``metrics.json`` in full (all failures, full sha256 hashes) and the relative paths of the figures.

Command line: ``python -m benchmarks.report DIR [DIR ...] -o OUT [--title T]``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import SCHEMA, utc_now
from mattersim.errors import InputError, MatterSimError
from mattersim.io import atomic_write_bytes, atomic_write_json, safe_filename

__all__ = [
    "REPORT_SCHEMA",
    "QUANTITY_UNITS",
    "MAX_FAILURES_SHOWN",
    "MAX_SCATTER_POINTS",
    "make_report",
    "resolve_output",
    "collect_runs",
    "format_value",
    "best_flags",
    "main",
]

log = logging.getLogger("mattersim")

REPORT_SCHEMA = "mattersim-benchmark-report/1"

#: Units of the quantities found in ``parity.npz`` (anything else is shown without a unit).
QUANTITY_UNITS: dict[str, str] = {
    "energy": "eV/atom",
    "force": "eV/Å",
    "forces": "eV/Å",
    "stress": "GPa",
    "omega_max": "THz",
    "group_velocity": "m/s",
    "group_velocity_max": "m/s",
    "free_energy": "kJ/mol",
    "free_energy_change": "meV/atom",
    "free_energy_change_qha": "meV/atom",
    "entropy": "J/K/mol",
    "heat_capacity": "J/K/mol",
    "bulk_modulus": "GPa",
    "shear_modulus": "GPa",
}

#: Failed items listed per model in the Markdown/HTML (the JSON keeps all of them).
MAX_FAILURES_SHOWN = 20
#: Points per model drawn in a parity scatter plot (deterministic subsample); histograms use all points.
MAX_SCATTER_POINTS = 20000
_SEED = 0
_DPI = 100


# ---------------------------------------------------------------------------------------------------------
# reading the results folders
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelRun:
    """One finished (model, benchmark) run: its ``metrics.json`` and where it came from."""

    slug: str
    folder: Path
    metrics: dict

    @property
    def date(self) -> str:
        return str(self.metrics.get("date") or "")


@dataclass
class Benchmark:
    """All runs of one benchmark, merged over the input folders."""

    name: str
    kind: str | None
    dataset: dict
    folders: list[Path] = field(default_factory=list)
    models: dict[str, ModelRun] = field(default_factory=dict)
    in_progress: list[dict] = field(default_factory=list)


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{what} '{path}' cannot be read ({exc.strerror or exc}); check its permissions.") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InputError(
            f"{what} '{path}' is not valid JSON ({exc}); it is corrupt or half-written, re-run that benchmark "
            "(mattersim bench run) or remove the folder."
        ) from exc


def _benchmark_dirs(path: Path) -> list[Path]:
    """The benchmark folders a user-given path stands for (itself, or its direct sub-folders)."""
    if not path.exists():
        raise InputError(f"Benchmark results folder '{path}' does not exist; check the path.")
    if path.is_file():
        if path.name == "benchmark.json":
            return [path.parent]
        raise InputError(
            f"'{path}' is a file; pass the benchmark results folder that contains benchmark.json "
            "(written by `mattersim bench run SET -o DIR`)."
        )
    if (path / "benchmark.json").is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_dir() and (p / "benchmark.json").is_file())
    if not found:
        hint = ""
        if (path / "metrics.json").is_file():
            hint = f" (it looks like a model folder: pass its parent '{path.parent}')"
        raise InputError(
            f"'{path}' contains no benchmark.json, neither directly nor in a folder directly inside it{hint}; "
            "pass a folder written by `mattersim bench run SET -o DIR`, or a folder holding several of them."
        )
    return found


def _check_metrics(doc: Any, path: Path) -> dict:
    fix = "re-run that model (mattersim bench run) or remove its folder"
    if not isinstance(doc, dict):
        raise InputError(f"Metrics file '{path}' does not hold a JSON object; {fix}.")
    if doc.get("schema") != SCHEMA:
        raise InputError(
            f"Metrics file '{path}' has schema {doc.get('schema')!r}, expected {SCHEMA!r}; "
            f"it was written by another version of mattersim, {fix}."
        )
    metrics = doc.get("metrics")
    if not isinstance(metrics, list) or not all(isinstance(m, dict) and "key" in m for m in metrics):
        raise InputError(f"Metrics file '{path}' has no valid 'metrics' list of {{'key', 'label', ...}} entries; {fix}.")
    if not isinstance(doc.get("model"), dict):
        raise InputError(f"Metrics file '{path}' has no 'model' identity; {fix}.")
    groups = doc.get("groups") or {}
    if not isinstance(groups, dict) or not all(
        isinstance(g, list) and all(isinstance(m, dict) and "key" in m for m in g) for g in groups.values()
    ):
        raise InputError(f"Metrics file '{path}' has an invalid 'groups' entry (expected name -> list of metrics); {fix}.")
    if not isinstance(doc.get("failures", []), list):
        raise InputError(f"Metrics file '{path}' has an invalid 'failures' entry (expected a list); {fix}.")
    for m in metrics + [m for g in groups.values() for m in g]:
        v = m.get("value")
        if v is not None and not isinstance(v, (int, float)):
            raise InputError(f"Metrics file '{path}' has a non-numeric value for metric {m.get('key')!r}; {fix}.")
    return doc


def _parse_date(text: str) -> datetime | None:
    try:
        d = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    if d.tzinfo is None:  # treat naive dates as UTC, for comparison only
        from datetime import timezone

        d = d.replace(tzinfo=timezone.utc)
    return d


def _newer(a: ModelRun, b: ModelRun) -> bool:
    """Is ``a`` newer than ``b`` (by date; unparsable dates count as oldest)?"""
    da, db = _parse_date(a.date), _parse_date(b.date)
    if da is None:
        return False
    if db is None:
        return True
    return da > db


def collect_runs(run_dirs: Sequence[str | os.PathLike]) -> tuple[dict[str, Benchmark], list[str]]:
    """Read and merge the results folders.

    Returns ``({benchmark name: Benchmark}, notes)`` in the order the benchmarks were first found;
    ``notes`` are the warning lines the report shows (in-progress models, duplicates, mismatches).
    Raises :class:`InputError` for a missing path, a folder without benchmark.json, or an unreadable or
    malformed benchmark.json / metrics.json.
    """
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise InputError("No benchmark results folder was given; pass at least one folder written by `mattersim bench run`.")
    folders: list[Path] = []
    for given in run_dirs:
        for folder in _benchmark_dirs(Path(given)):
            if folder.resolve() not in [f.resolve() for f in folders]:
                folders.append(folder)

    benchmarks: dict[str, Benchmark] = {}
    notes: list[str] = []
    for folder in folders:
        bpath = folder / "benchmark.json"
        bdoc = _read_json(bpath, "Benchmark file")
        if not isinstance(bdoc, dict) or not bdoc.get("benchmark"):
            raise InputError(f"Benchmark file '{bpath}' has no 'benchmark' name; re-run the benchmark or remove the folder.")
        if bdoc.get("schema") != SCHEMA:
            raise InputError(
                f"Benchmark file '{bpath}' has schema {bdoc.get('schema')!r}, expected {SCHEMA!r}; "
                "it was written by another version of mattersim, re-run the benchmark."
            )
        listed = bdoc.get("models") or []
        if not isinstance(listed, list):
            raise InputError(f"Benchmark file '{bpath}' has an invalid 'models' entry (expected a list of folder names).")
        name = str(bdoc["benchmark"])
        dataset = bdoc.get("dataset") if isinstance(bdoc.get("dataset"), dict) else {}
        bench = benchmarks.get(name)
        if bench is None:
            bench = benchmarks[name] = Benchmark(name=name, kind=bdoc.get("kind"), dataset=dataset)
        elif dataset.get("sha256") and bench.dataset.get("sha256") and dataset["sha256"] != bench.dataset["sha256"]:
            notes.append(
                f"{name}: the dataset in '{folder}' (sha256 {str(dataset['sha256'])[:12]}) differs from the one in "
                f"'{bench.folders[0]}' (sha256 {str(bench.dataset['sha256'])[:12]}); the columns are not comparable."
            )
        bench.folders.append(folder)

        slugs = [str(s) for s in listed]
        # a model folder with metrics.json but not (yet) listed, e.g. two runs racing on benchmark.json
        slugs += sorted(p.name for p in folder.iterdir()
                        if p.is_dir() and p.name not in slugs and (p / "metrics.json").is_file())
        for slug in slugs:
            mpath = folder / slug / "metrics.json"
            if not mpath.is_file():
                bench.in_progress.append({"model": slug, "folder": str(folder / slug)})
                notes.append(
                    f"{name}: model '{slug}' is listed in '{bpath}' but has no metrics.json yet "
                    "(run in progress or interrupted); skipped."
                )
                continue
            doc = _check_metrics(_read_json(mpath, "Metrics file"), mpath)
            if doc.get("benchmark") not in (None, name):
                raise InputError(
                    f"Metrics file '{mpath}' is for benchmark {doc.get('benchmark')!r} but sits in the folder of "
                    f"{name!r} ('{bpath}'); move it to the right results folder."
                )
            run = ModelRun(slug=slug, folder=folder / slug, metrics=doc)
            old = bench.models.get(slug)
            if old is None:
                bench.models[slug] = run
                continue
            keep, drop = (run, old) if _newer(run, old) else (old, run)
            bench.models[slug] = keep
            notes.append(
                f"{name}: model '{slug}' was found twice ('{old.folder}' and '{run.folder}'); kept the newer run "
                f"from '{keep.folder}' (date {keep.date or '?'}), ignored '{drop.folder}' (date {drop.date or '?'})."
            )
    for bench in benchmarks.values():
        done = set(bench.models)
        # an in-progress entry is moot when another folder has a finished run of that model
        bench.in_progress = [p for p in bench.in_progress if p["model"] not in done]
    return benchmarks, notes


# ---------------------------------------------------------------------------------------------------------
# formatting helpers
# ---------------------------------------------------------------------------------------------------------


def format_value(value: float | None) -> str:
    """A metric value as shown in the tables: "–" for None, integers as such, else 4 significant digits."""
    if value is None:
        return "–"
    v = float(value)
    if not math.isfinite(v):
        return "–"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    a = abs(v)
    if a >= 1e6:
        return f"{v:.4e}"
    if a >= 1e4:
        return f"{v:.0f}"
    return f"{v:.4g}"


def best_flags(values: Sequence[float | None], better: str | None) -> list[bool]:
    """Which values are the best of the row (``better`` "lower"/"higher"; None → none); ties all best."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    if better not in ("lower", "higher") or not present:
        return [False] * len(values)
    best = min(present) if better == "lower" else max(present)
    return [v is not None and math.isfinite(v) and math.isclose(v, best, rel_tol=1e-9, abs_tol=1e-15) for v in values]


def _duration(seconds: Any) -> str:
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(s):
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _time_text(m: dict) -> str:
    """How long a model's run took. A resumed run's ``wall_time_s`` is only its last invocation's (entries
    from earlier ones reused), so the per-entry times summed (``compute_time_s`` in its settings) come first
    where recorded."""
    wall = _duration(m.get("wall_time_s"))
    settings = m.get("settings") or {}
    if settings.get("compute_time_s") is None:
        return wall
    text = f"{_duration(settings['compute_time_s'])} summed over entries"
    if settings.get("reused"):
        return f"{text}; last invocation {wall}, {settings['reused']} entries reused"
    return f"{text}; wall {wall}"


def _one_line(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text if text is not None else "").split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _short_hash(h: Any) -> str:
    return str(h)[:12] if h else "–"


def _model_header(run: ModelRun) -> str:
    info = run.metrics.get("model") or {}
    name = str(info.get("name") or run.slug)
    version = info.get("version")
    return f"{name} ({version})" if version not in (None, "") else name


# ---------------------------------------------------------------------------------------------------------
# a tiny document model rendered both to Markdown and to HTML (so both carry the same content)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    text: str
    bold: bool = False


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str
    css: str | None = None


@dataclass
class Bullets:
    items: list[str]
    css: str | None = None


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    numeric: bool = False  # right-align all columns but the first (metric tables)


@dataclass
class Image:
    path: str  # relative to the Markdown file
    alt: str
    png: bytes


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*[]<>|"})


def _md(text: str) -> str:
    return str(text).translate(_MD_SPECIAL)


def _render_md(blocks: list) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + _md(b.text), ""]
        elif isinstance(b, Para):
            out += [_md(b.text), ""]
        elif isinstance(b, Bullets):
            out += ["- " + _md(item) for item in b.items] + [""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(_md(h) for h in b.header) + " |")
            out.append("|" + "|".join([" --- "] + [" ---: " if b.numeric else " --- "] * (len(b.header) - 1)) + "|")
            for row in b.rows:
                cells = [f"**{_md(c.text)}**" if c.bold else _md(c.text) for c in row]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        elif isinstance(b, Image):
            out += [f"![{_md(b.alt)}]({b.path})", ""]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #aaa; padding-bottom: .1em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #bbb; padding: .25em .6em; }
th { background: #eee; }
td { text-align: left; }
table.num td { text-align: right; font-variant-numeric: tabular-nums; }
table.num td:first-child { text-align: left; }
td strong { color: #064; }
.warn { color: #8a4b00; }
.small { font-size: 0.9em; color: #555; }
img { max-width: 100%; height: auto; display: block; margin: .5em 0 1em 0; }
"""


def _render_html(blocks: list, title: str) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            cls = f' class="{b.css}"' if b.css else ""
            out.append(f"<p{cls}>{e(b.text)}</p>")
        elif isinstance(b, Bullets):
            cls = f' class="{b.css}"' if b.css else ""
            out.append(f"<ul{cls}>" + "".join(f"<li>{e(item)}</li>" for item in b.items) + "</ul>")
        elif isinstance(b, Table):
            out.append('<table class="num">' if b.numeric else "<table>")
            out.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr></thead>")
            out.append("<tbody>")
            for row in b.rows:
                cells = [f"<td><strong>{e(c.text)}</strong></td>" if c.bold else f"<td>{e(c.text)}</td>" for c in row]
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode("ascii")
            out.append(f'<img src="data:image/png;base64,{data}" alt="{e(b.alt)}">')
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------------


def _unit_of(quantity: str) -> str | None:
    """The unit of a parity quantity; a PhononDB NAC variant (``omega_max_nac``) has its base quantity's."""
    return QUANTITY_UNITS.get(quantity, QUANTITY_UNITS.get(quantity.removesuffix("_nac")))


def _load_parity(run: ModelRun, notes: list[str], bench: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{quantity: (ref, pred)}`` from a model's parity.npz (finite pairs only); problems become notes."""
    path = run.folder / "parity.npz"
    if not path.is_file():
        notes.append(f"{bench}: model '{run.slug}' has no parity.npz ('{path}'); no figures for it.")
        return {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
    except Exception as exc:  # zipfile / numpy raise many types
        notes.append(f"{bench}: '{path}' cannot be read ({_one_line(exc, 120)}); no figures for model '{run.slug}'.")
        return {}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in sorted(arrays):
        if not key.endswith("__ref"):
            continue
        q = key[: -len("__ref")]
        pred_key = f"{q}__pred"
        if pred_key not in arrays:
            notes.append(f"{bench}: '{path}' has {key} but no {pred_key}; quantity '{q}' skipped for '{run.slug}'.")
            continue
        try:
            ref = np.asarray(arrays[key], dtype=float).ravel()
            pred = np.asarray(arrays[pred_key], dtype=float).ravel()
        except (TypeError, ValueError):
            notes.append(f"{bench}: '{path}' has non-numeric arrays for '{q}'; skipped for '{run.slug}'.")
            continue
        if ref.shape != pred.shape:
            notes.append(
                f"{bench}: '{path}' has {ref.size} reference but {pred.size} predicted values for '{q}'; "
                f"skipped for '{run.slug}'."
            )
            continue
        ok = np.isfinite(ref) & np.isfinite(pred)
        out[q] = (ref[ok], pred[ok])
    return out


def _subsample(n: int, limit: int) -> np.ndarray | slice:
    if n <= limit:
        return slice(None)
    return np.sort(np.random.default_rng(_SEED).choice(n, size=limit, replace=False))


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # "tight": the bounding box of everything drawn, so that no label is cut off whatever the panel layout
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.08)
    return buf.getvalue()


def _parity_limits(data: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """Shared axis limits: every reference value and the central 99 % of the predictions, so that a few wild
    predictions (a mechanically unstable tensor's Reuss average, a blown-up frame) do not shrink the rest
    into a corner; the predictions outside are drawn at the edge."""
    refs = np.concatenate([r for _, r, _ in data.values()] or [np.zeros(0)])
    preds = np.concatenate([p for _, _, p in data.values()] or [np.zeros(0)])
    values = [refs] + ([np.percentile(preds, [0.5, 99.5])] if preds.size else [])
    allv = np.concatenate(values)
    lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
    pad = 0.03 * (hi - lo) if hi > lo else 0.5 * max(abs(hi), 1.0)
    return lo - pad, hi + pad


def _parity_png(bench: str, quantity: str, data: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> bytes:
    """One panel per model (shared limits, :func:`_parity_limits`), subsampled small markers, predictions
    beyond the limits as crosses at the edge (counted in the title), the y = x line, MAE in the title."""
    from matplotlib.figure import Figure

    unit = _unit_of(quantity)
    u = f" ({unit})" if unit else ""
    n = len(data)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.8 * ncols, 3.6 * nrows + 0.4), layout="constrained")
    lo, hi = _parity_limits(data)
    for i, (slug, (label, ref, pred)) in enumerate(data.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        idx = _subsample(ref.size, MAX_SCATTER_POINTS)
        size = 6 if ref.size <= 2000 else 2
        r, p = ref[idx], pred[idx]
        out = (p < lo) | (p > hi)
        ax.scatter(r[~out], p[~out], s=size, alpha=0.5, linewidths=0, color=f"C{i}", rasterized=True)
        if out.any():
            ax.scatter(r[out], np.clip(p[out], lo, hi), s=12, marker="x", linewidths=0.6, color="0.35",
                       clip_on=False, rasterized=True)
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal", adjustable="box")
        mae = float(np.mean(np.abs(pred - ref))) if ref.size else float("nan")
        shown = "" if ref.size <= MAX_SCATTER_POINTS else f", {MAX_SCATTER_POINTS} shown"
        beyond = int(np.count_nonzero((pred < lo) | (pred > hi)))
        edge = f"\n{beyond} beyond the axes: × at the edge" if beyond else ""
        ax.set_title(f"{label}\nMAE {format_value(mae)}{' ' + unit if unit else ''} (n={ref.size}{shown}){edge}",
                     fontsize=9)
        ax.set_xlabel(f"reference {quantity}{u}", fontsize=9)
        ax.set_ylabel(f"predicted {quantity}{u}", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{bench}: {quantity} parity", fontsize=11)
    return _png(fig)


def _error_png(bench: str, quantity: str, data: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> bytes:
    """Step histograms of pred - ref, all points, models overlaid, shared bins over the central 99 %."""
    return _png(_error_figure(bench, quantity, data))


def _error_figure(bench: str, quantity: str, data: dict[str, tuple[str, np.ndarray, np.ndarray]]):
    """The figure of :func:`_error_png`; headroom above the tallest bar keeps the legend off the peaks."""
    from matplotlib.figure import Figure

    unit = _unit_of(quantity)
    errors = {slug: (label, pred - ref) for slug, (label, ref, pred) in data.items()}
    allerr = np.concatenate([err for _, err in errors.values()] or [np.zeros(1)])
    if allerr.size == 0:
        allerr = np.zeros(1)
    lo, hi = (float(x) for x in np.percentile(allerr, [0.5, 99.5]))
    if not hi > lo:
        lo, hi = lo - 0.5 * max(abs(lo), 1e-6), hi + 0.5 * max(abs(hi), 1e-6)
    bins = np.linspace(lo, hi, 61)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    tallest, shown = 0.0, 0
    for i, (slug, (label, err)) in enumerate(errors.items()):
        if err.size == 0:
            continue
        clipped = np.clip(err, lo, hi)
        mae = float(np.mean(np.abs(err)))
        heights, _, _ = ax.hist(clipped, bins=bins, weights=np.full(err.size, 1.0 / err.size), histtype="step",
                                lw=1.5, color=f"C{i}",
                                label=f"{label}: MAE {format_value(mae)}{' ' + unit if unit else ''}, n={err.size}")
        tallest, shown = max(tallest, float(np.max(heights))), shown + 1
    if tallest > 0:  # room for the legend's rows above the data
        ax.set_ylim(0.0, tallest * (1.12 + 0.08 * shown))
    ax.axvline(0.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel(f"predicted − reference {quantity}{f' ({unit})' if unit else ''}  [outliers clipped to the edges]",
                  fontsize=9)
    ax.set_ylabel("fraction of points", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8)
    ax.set_title(f"{bench}: {quantity} error distribution", fontsize=11)
    return fig


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------


def resolve_output(output: str | os.PathLike) -> tuple[Path, Path, Path, Path]:
    """``(md, html, json, figures folder)`` paths for ``output``.

    ``OUT.md`` (or ``.html`` / ``.json``) → ``OUT.md``, ``OUT.html``, ``OUT.json``, ``OUT_figures/``;
    anything else is a folder → ``report.md``, ``report.html``, ``report.json``, ``figures/`` inside it.
    """
    out = Path(output)
    if out.suffix.lower() in (".md", ".html", ".json"):
        stem = out.with_suffix("")
        if stem.is_dir():
            raise InputError(f"Report output '{out}' would clash with the folder '{stem}'; choose another name.")
        return (stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".html"),
                stem.with_name(stem.name + ".json"), stem.with_name(stem.name + "_figures"))
    if out.exists() and not out.is_dir():
        raise InputError(
            f"Report output '{out}' is an existing file; pass a folder, or a name ending in .md (e.g. {out}.md)."
        )
    return out / "report.md", out / "report.html", out / "report.json", out / "figures"


def _metric_table(runs: list[ModelRun], lists: list[list[dict]], notes: list[str], where: str) -> Table:
    """Rows = metrics (union, first-appearance order), columns = models, best per row bold."""
    order: list[str] = []
    meta: dict[str, dict] = {}
    values: list[dict[str, float | None]] = []
    for run, metrics in zip(runs, lists):
        vals: dict[str, float | None] = {}
        for m in metrics:
            key = str(m["key"])
            if key not in meta:
                order.append(key)
                meta[key] = m
            elif (m.get("unit") or None) != (meta[key].get("unit") or None):
                notes.append(
                    f"{where}: metric '{key}' has unit {m.get('unit')!r} for '{run.slug}' but "
                    f"{meta[key].get('unit')!r} for another model; the row mixes units."
                )
            v = m.get("value")
            vals[key] = None if v is None else float(v)
        values.append(vals)
    rows = []
    for key in order:
        m = meta[key]
        better = m.get("better")
        row_vals = [vals.get(key) for vals in values]
        flags = best_flags(row_vals, better)
        label = str(m.get("label") or key)
        if m.get("unit"):
            label += f" ({m['unit']})"
        arrow = {"lower": " ↓", "higher": " ↑"}.get(better, "")
        rows.append([Cell(label + arrow)] + [Cell(format_value(v), bold=f) for v, f in zip(row_vals, flags)])
    return Table(["Metric"] + [_model_header(r) for r in runs], rows, numeric=True)


def _common_entries_section(body: list, runs: list[ModelRun], notes: list[str], bench: str) -> dict | None:
    """PhononDB-type runs: the MAEs of every model on the entries all of them count (and how many); returns
    ``{"ids": {variant: ids}, "metrics": {model: metrics}}`` for report.json (None without entry files)."""
    from benchmarks.phonondb import common_entry_metrics, read_entry_records

    records = {r.slug: read_entry_records(r.folder) for r in runs}
    missing = [slug for slug, recs in records.items() if not recs]
    if missing:
        notes.append(f"{bench}: no entries/*.json for {', '.join(missing)}; no table on common entries.")
        return None
    common, metrics = common_entry_metrics(records)
    body.append(Heading(3, "Metrics on the entries common to all models"))
    qha = (f"; {len(common['qha'])} for the QHA variant (counted by every model's QHA metric)"
           if "qha" in common else "")
    body.append(Para(f"The same entries for every model: {len(common['no_nac'])} without NAC, "
                     f"{len(common['nac'])} with NAC (succeeded for all models, no imaginary mode in the "
                     f"reference nor in any prediction){qha}. The table above counts each model's own entries.",
                     css="small"))
    body.append(_metric_table(runs, [metrics[r.slug] for r in runs], notes, f"{bench} / common entries"))
    return {"ids": common, "metrics": metrics}


def _definition_text(value: Any) -> str:
    """One line for a ``definitions`` value; the energy-convention record is spelled out."""
    if isinstance(value, dict) and "reference" in value and "conversion" in value:
        model = value.get("model") or "not recorded"
        text = (f"reference {value.get('reference')}, model {model} ({value.get('model_source', '–')}); "
                f"conversion: {value.get('conversion')}")
        if value.get("n_not_convertible"):
            text += f"; {value['n_not_convertible']} structure(s) not convertible, left out of the converted MAE"
        return text
    return _one_line(value, 600)


def _definitions_block(runs: list[ModelRun]) -> list[str]:
    """The ``definitions`` of the runs' metrics.json, one bullet per key; a key whose value differs between
    models gets one clause per model. Runs written before definitions existed contribute nothing."""
    keys: list[str] = []
    for r in runs:
        for k in (r.metrics.get("definitions") or {}):
            if k not in keys:
                keys.append(k)
    items = []
    for k in keys:
        texts = {_model_header(r): _definition_text((r.metrics.get("definitions") or {}).get(k, "–")) for r in runs}
        distinct = set(texts.values())
        body = distinct.pop() if len(distinct) == 1 else "; ".join(f"{m}: {t}" for m, t in texts.items())
        items.append(f"{k.replace('_', ' ')}: {body}")
    return items


def _software_line(sw: dict) -> str:
    parts = [f"{k} {v}" for k, v in (sw or {}).items() if v and k != "platform"]
    return ", ".join(parts) or "–"


def make_report(run_dirs: Sequence[str | os.PathLike], output: str | os.PathLike, *, title: str | None = None) -> dict:
    """Write the Markdown, HTML and JSON reports and the PNG figures for ``run_dirs``; return the JSON document.

    ``run_dirs``: benchmark results folders (each with ``benchmark.json``) or parents of such folders.
    ``output``: ``NAME.md`` (→ ``NAME.md/.html/.json`` + ``NAME_figures/``) or a folder
    (→ ``report.md/.html/.json`` + ``figures/`` inside). See :func:`resolve_output`.
    Raises :class:`~mattersim.errors.InputError` for unusable inputs.
    """
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    run_dirs = list(run_dirs)
    benchmarks, notes = collect_runs(run_dirs)
    md_path, html_path, json_path, fig_dir = resolve_output(output)
    title = title or "MatterSim benchmark report"
    created = utc_now()

    body: list = []
    figures: list[str] = []
    fig_notes: list[str] = []
    taken: set[str] = set()
    common_docs: dict[str, dict | None] = {}
    for bench in benchmarks.values():
        runs = list(bench.models.values())
        body.append(Heading(2, f"Benchmark: {bench.name}"))
        ds = bench.dataset or {}
        body.append(Para(
            f"Kind: {bench.kind or '–'}. Dataset: {ds.get('name') or '–'} ({ds.get('n_items', '–')} items, "
            f"sha256 {_short_hash(ds.get('sha256'))}). Results from: " + ", ".join(str(f) for f in bench.folders) + ".",
            css="small"))
        if bench.in_progress:
            body.append(Bullets([f"Warning: model '{p['model']}' has no metrics.json yet (run in progress or "
                                 f"interrupted); not in the tables." for p in bench.in_progress], css="warn"))
        if not runs:
            body.append(Para("No model has finished this benchmark yet.", css="warn"))
            continue

        body.append(Heading(3, "Metrics"))
        body.append(_metric_table(runs, [r.metrics.get("metrics") or [] for r in runs], notes, bench.name))
        body.append(Para("↓ lower is better, ↑ higher is better; the best value of each row is in bold; "
                         "– = not available.", css="small"))
        body.append(Bullets([
            f"{_model_header(r)}: {r.metrics.get('n_items', '–')} items, {r.metrics.get('n_done', '–')} done, "
            f"{r.metrics.get('n_failed', len(r.metrics.get('failures') or []))} failed, "
            f"time {_time_text(r.metrics)}"
            for r in runs]))
        defs = _definitions_block(runs)
        if defs:
            body.append(Heading(3, "Definitions"))
            body.append(Para("What each number means, as recorded in each model's metrics.json (force/stress "
                             "definitions, energy convention, displacement, mesh rule); software versions are in "
                             "the Runs table.", css="small"))
            body.append(Bullets(defs, css="small"))

        if bench.kind == "phonon" and len(runs) >= 2:
            common_docs[bench.name] = _common_entries_section(body, runs, notes, bench.name)

        group_names: list[str] = []
        for r in runs:
            for g in (r.metrics.get("groups") or {}):
                if g not in group_names:
                    group_names.append(g)
        for g in group_names:
            body.append(Heading(3, f"Group: {g}"))
            body.append(_metric_table(runs, [(r.metrics.get("groups") or {}).get(g) or [] for r in runs], notes,
                                      f"{bench.name} / {g}"))

        failed = [r for r in runs if r.metrics.get("failures")]
        if failed:
            body.append(Heading(3, "Failures"))
            for r in failed:
                fails = r.metrics["failures"]
                body.append(Para(f"{_model_header(r)}: {len(fails)} failed item(s)"))
                items = [
                    f"item {f.get('index', '?')} ({f.get('id', '?')}): {_one_line(f.get('error'))}"
                    if isinstance(f, dict) else _one_line(f)
                    for f in fails[:MAX_FAILURES_SHOWN]
                ]
                if len(fails) > MAX_FAILURES_SHOWN:
                    items.append(f"… and {len(fails) - MAX_FAILURES_SHOWN} more (all are listed in {json_path.name})")
                body.append(Bullets(items))

        # figures
        parity: dict[str, dict[str, tuple[str, np.ndarray, np.ndarray]]] = {}
        for r in runs:
            for q, (ref, pred) in _load_parity(r, fig_notes, bench.name).items():
                parity.setdefault(q, {})[r.slug] = (_model_header(r), ref, pred)
        if parity:
            body.append(Heading(3, "Figures"))
        for q, data in parity.items():
            base = safe_filename(f"{bench.name}__{q}", taken)
            for kind, maker, what in (("parity", _parity_png, "parity plot"), ("error", _error_png, "error histogram")):
                png = maker(bench.name, q, data)
                name = f"{base}__{kind}.png"
                atomic_write_bytes(fig_dir / name, png)
                rel = f"{fig_dir.name}/{name}"  # the figures folder always sits beside the .md
                figures.append(rel)
                body.append(Image(rel, f"{bench.name}: {q} {what}", png))
    notes += fig_notes
    for note in notes:
        log.warning("bench report: %s", note)

    # models, datasets, runs
    tail: list = [Heading(2, "Models")]
    seen: dict[tuple, list[str]] = {}
    idents: dict[tuple, dict] = {}
    for bench in benchmarks.values():
        for r in bench.models.values():
            info = r.metrics.get("model") or {}
            key = (info.get("name") or r.slug, info.get("version"), info.get("sha256"))
            idents.setdefault(key, info)
            seen.setdefault(key, []).append(bench.name)
    tail.append(Table(
        ["Model", "Version", "Kind", "Energy convention", "Source", "sha256", "Package", "Benchmarks"],
        [[Cell(str(k[0])), Cell(str(info.get("version") or "–")), Cell(str(info.get("kind") or "–")),
          Cell(str(info.get("energy_convention") or "–")),
          Cell(str(info.get("source") or "–")), Cell(_short_hash(info.get("sha256"))),
          Cell(str(info.get("package") or "–")), Cell(", ".join(seen[k]))]
         for k, info in idents.items()]))
    tail.append(Heading(2, "Datasets"))
    tail.append(Table(
        ["Benchmark", "Dataset", "Path", "sha256", "Items"],
        [[Cell(b.name), Cell(str(b.dataset.get("name") or "–")), Cell(str(b.dataset.get("path") or "–")),
          Cell(_short_hash(b.dataset.get("sha256"))), Cell(str(b.dataset.get("n_items", "–")))]
         for b in benchmarks.values()]))
    tail.append(Heading(2, "Runs"))
    tail.append(Table(
        ["Benchmark", "Model", "Date", "Time", "Software", "Platform", "Folder"],
        [[Cell(b.name), Cell(_model_header(r)), Cell(r.date or "–"), Cell(_time_text(r.metrics)),
          Cell(_software_line(r.metrics.get("software") or {})),
          Cell(str((r.metrics.get("software") or {}).get("platform") or "–")), Cell(str(r.folder))]
         for b in benchmarks.values() for r in b.models.values()]))

    head: list = [Heading(1, title), Para(f"Created {created} from " + ", ".join(str(Path(p)) for p in run_dirs) + ".",
                                          css="small")]
    head.append(Para("Benchmarks: " + ", ".join(
        f"{b.name} ({len(b.models)} model{'s' if len(b.models) != 1 else ''})" for b in benchmarks.values()) + "."))
    if notes:
        head += [Heading(2, "Warnings"), Bullets(["Warning: " + n for n in notes], css="warn")]
    blocks = head + body + tail

    doc = {
        "schema": REPORT_SCHEMA,
        "created": created,
        "title": title,
        "inputs": [str(Path(p)) for p in run_dirs],
        "benchmarks": {
            b.name: {
                "kind": b.kind,
                "dataset": b.dataset,
                "folders": [str(f) for f in b.folders],
                "models": {slug: r.metrics for slug, r in b.models.items()},
                "sources": {slug: str(r.folder) for slug, r in b.models.items()},
                "in_progress": b.in_progress,
                **({"common_entries": common_docs[b.name]} if common_docs.get(b.name) else {}),
            }
            for b in benchmarks.values()
        },
        "figures": figures,
        "warnings": notes,
    }
    _write_text(md_path, _render_md(blocks))
    _write_text(html_path, _render_html(blocks, title))
    atomic_write_json(json_path, doc)
    return doc


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.report DIR [DIR ...] -o OUT [--title T]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Side-by-side report (Markdown, HTML, JSON, PNG figures) of benchmark results folders.")
    parser.add_argument("dirs", nargs="+", help="benchmark results folders (with benchmark.json) or their parents")
    parser.add_argument("-o", "--output", required=True,
                        help="NAME.md (writes NAME.md/.html/.json and NAME_figures/) or a folder "
                             "(writes report.md/.html/.json and figures/ inside)")
    parser.add_argument("--title", default=None, help="report title")
    args = parser.parse_args(argv)
    try:
        make_report(args.dirs, args.output, title=args.title)
    except MatterSimError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    md, html_path, json_path, figs = resolve_output(args.output)
    print(f"wrote {md}, {html_path}, {json_path} and {figs}{os.sep}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
