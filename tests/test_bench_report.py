"""benchmarks.report: side-by-side Markdown/HTML/JSON reports with figures, from fake results folders."""

from __future__ import annotations

import hashlib
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import SCHEMA, metric, metrics_document, model_slug, write_benchmark_json
from benchmarks.report import REPORT_SCHEMA, best_flags, format_value, main, make_report, resolve_output
from mattersim.errors import InputError
from mattersim.io import atomic_write_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

HEX_DATASET = {"name": "HEX", "path": "/data/hex.extxyz", "sha256": "ab" * 32, "n_items": 30}
PHON_DATASET = {"name": "PhononDB-PBE", "path": "/data/phonondb", "sha256": "cd" * 32, "n_items": 4}


def _model(name: str, version: str) -> dict:
    return {"name": name, "version": version, "kind": "mattersim", "source": f"/weights/{name}.pth",
            "sha256": hashlib.sha256(name.encode()).hexdigest(), "package": f"mattersim {version}"}


MODEL_A = _model("model-a", "1.0")
MODEL_B = _model("model-b", "2.1")
MODEL_C = _model("model-c", "0.1")


def _write_run(folder: Path, *, benchmark: str, kind: str, dataset: dict, model: dict, metrics: list[dict],
               failures: list[dict] = (), groups: dict | None = None, parity: dict | None = None,
               date: str | None = None, n_items: int = 30) -> Path:
    slug = model_slug(model)
    write_benchmark_json(folder, benchmark=benchmark, kind=kind, dataset=dataset, slug=slug)
    doc = metrics_document(benchmark=benchmark, kind=kind, dataset=dataset, model=model, metrics=metrics,
                           n_items=n_items, n_done=n_items - len(failures), failures=list(failures),
                           wall_time_s=12.5, groups=groups)
    if date:
        doc["date"] = date
    atomic_write_json(folder / slug / "metrics.json", doc)
    if parity:
        np.savez(folder / slug / "parity.npz", **parity)
    return folder / slug


def _hex_metrics(e_mae, f_mae, r2, n_atoms, tied, maybe):
    return [
        metric("energy_mae", "MAE energy", "eV/atom", e_mae, "lower"),
        metric("force_mae", "MAE force", "eV/Å", f_mae, "lower"),
        metric("r2", "R2 energy", None, r2, "higher"),
        metric("n_atoms", "atoms evaluated", None, n_atoms, None),
        metric("tied", "Tied metric", "GPa", tied, "lower"),
        metric("maybe", "Sometimes missing", "GPa", maybe, "lower"),
    ]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """root/hex (model-a, model-b with failures, model-c in progress), root/phonondb (model-a),
    other/phonondb (model-b), old/phonondb (an older model-a run)."""
    base = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(1)
    e_ref = rng.normal(size=40)
    f_ref = rng.normal(size=30000)  # above the scatter subsample limit
    hex_dir = base / "root" / "hex"
    _write_run(hex_dir, benchmark="hex", kind="energy-force", dataset=HEX_DATASET, model=MODEL_A,
               metrics=_hex_metrics(0.05, 0.1, 0.9, 1200, 0.2, None),
               groups={"0-25 GPa": [metric("energy_mae", "MAE energy", "eV/atom", 0.04, "lower")],
                       "25-50 GPa": [metric("energy_mae", "MAE energy", "eV/atom", 0.07, "lower")]},
               parity={"energy__ref": e_ref, "energy__pred": e_ref + 0.05,
                       "force__ref": f_ref, "force__pred": f_ref + rng.normal(scale=0.1, size=f_ref.size)})
    failures = [{"index": i, "id": f"hex-{i:03d}", "error": f"RuntimeError: boom {i}"} for i in range(25)]
    _write_run(hex_dir, benchmark="hex", kind="energy-force", dataset=HEX_DATASET, model=MODEL_B,
               metrics=_hex_metrics(0.08, 0.07, 0.95, 1100, 0.2, 0.3), failures=failures,
               groups={"0-25 GPa": [metric("energy_mae", "MAE energy", "eV/atom", 0.06, "lower")]},
               parity={"energy__ref": e_ref[:20], "energy__pred": e_ref[:20] - 0.1,
                       "force__ref": f_ref[:900], "force__pred": f_ref[:900] * 1.1})
    # model-c: listed in benchmark.json, folder exists with a log, no metrics.json yet
    write_benchmark_json(hex_dir, benchmark="hex", kind="energy-force", dataset=HEX_DATASET, slug="model-c")
    (hex_dir / "model-c").mkdir()
    (hex_dir / "model-c" / "run.log").write_text("started\n")

    w_ref = rng.uniform(1, 20, size=4)
    phon = dict(benchmark="phonondb", kind="phonon", dataset=PHON_DATASET, n_items=4)
    _write_run(base / "root" / "phonondb", **phon, model=MODEL_A, date="2025-06-01T00:00:00+00:00",
               metrics=[metric("omega_max_mae", "MAE omega_max", "THz", 0.31, "lower")],
               parity={"omega_max__ref": w_ref, "omega_max__pred": w_ref + 0.3})
    _write_run(base / "other" / "phonondb", **phon, model=MODEL_B, date="2025-05-01T00:00:00+00:00",
               metrics=[metric("omega_max_mae", "MAE omega_max", "THz", 0.22, "lower")],
               parity={"omega_max__ref": w_ref, "omega_max__pred": w_ref - 0.2})
    _write_run(base / "old" / "phonondb", **phon, model=MODEL_A, date="2024-01-01T00:00:00+00:00",
               metrics=[metric("omega_max_mae", "MAE omega_max", "THz", 9.99, "lower")],
               parity={"omega_max__ref": w_ref, "omega_max__pred": w_ref + 9.99})
    return base


@pytest.fixture(scope="module")
def report(results):
    out = results / "out"
    doc = make_report([results / "root", results / "other", results / "old"], out, title="Test report")
    return {"doc": doc, "out": out, "md": (out / "report.md").read_text(encoding="utf-8"),
            "html": (out / "report.html").read_text(encoding="utf-8")}


def _table_rows(md: str, heading: str) -> dict[str, list[str]]:
    """The table right after ``heading`` in the Markdown: {first cell: other cells} plus the header row."""
    lines = md.splitlines()
    start = lines.index(heading)
    rows: dict[str, list[str]] = {}
    in_table = False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            in_table = True
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set(cells[0]) <= {"-", " "}:
                continue
            if "__header__" not in rows:
                rows["__header__"] = cells[1:]
            else:
                rows[cells[0]] = cells[1:]
        elif in_table:
            break
    return rows


def _section(md: str, start: str, end: str = "## ") -> str:
    i = md.index(start)
    j = md.find("\n" + end, i + len(start))
    return md[i: j if j >= 0 else len(md)]


def test_markdown_table_values_and_bold(report):
    hex_md = _section(report["md"], "## Benchmark: hex")
    rows = _table_rows(hex_md, "### Metrics")
    assert rows["__header__"] == ["model-a (1.0)", "model-b (2.1)"]
    assert rows["MAE energy (eV/atom) ↓"] == ["**0.05**", "0.08"]  # lower is better
    assert rows["MAE force (eV/Å) ↓"] == ["0.1", "**0.07**"]
    assert rows["R2 energy ↑"] == ["0.9", "**0.95**"]  # higher is better
    assert rows["atoms evaluated"] == ["1200", "1100"]  # better None: no bold
    assert rows["Tied metric (GPa) ↓"] == ["**0.2**", "**0.2**"]  # ties all bold
    assert rows["Sometimes missing (GPa) ↓"] == ["–", "**0.3**"]  # None shown as a dash
    # one line per model with counts and wall time
    assert "- model-a (1.0): 30 items, 30 done, 0 failed, time 12.5 s" in hex_md
    assert "- model-b (2.1): 30 items, 5 done, 25 failed, time 12.5 s" in hex_md


def test_group_tables(report):
    hex_md = _section(report["md"], "## Benchmark: hex")
    rows = _table_rows(hex_md, "### Group: 0-25 GPa")
    assert rows["MAE energy (eV/atom) ↓"] == ["**0.04**", "0.06"]
    rows = _table_rows(hex_md, "### Group: 25-50 GPa")
    assert rows["MAE energy (eV/atom) ↓"] == ["**0.07**", "–"]


def test_failures_capped_and_in_progress_noted(report):
    md, doc = report["md"], report["doc"]
    fails = _section(md, "### Failures", "### ")
    assert "model-b (2.1): 25 failed item(s)" in fails
    assert "- item 0 (hex-000): RuntimeError: boom 0" in fails
    assert "- item 19 (hex-019): RuntimeError: boom 19" in fails
    assert "hex-020" not in fails
    assert "and 5 more" in fails
    assert len(doc["benchmarks"]["hex"]["models"]["model-b"]["failures"]) == 25  # all of them in the json
    # the in-progress model is a warning, not a column
    assert re.search(r"model 'model-c' .*no metrics\.json", md)
    assert "model-c" not in _table_rows(md, "### Metrics")["__header__"]
    assert doc["benchmarks"]["hex"]["in_progress"][0]["model"] == "model-c"
    assert any("model-c" in w for w in doc["warnings"])


def test_merge_same_benchmark_and_keep_newest(report):
    md, doc = report["md"], report["doc"]
    phon = _section(md, "## Benchmark: phonondb")
    rows = _table_rows(phon, "### Metrics")
    assert rows["__header__"] == ["model-a (1.0)", "model-b (2.1)"]
    assert rows["MAE omega_max (THz) ↓"] == ["0.31", "**0.22**"]  # the newer model-a run, not 9.99
    assert "9.99" not in phon
    assert set(doc["benchmarks"]) == {"hex", "phonondb"}
    assert doc["benchmarks"]["phonondb"]["sources"]["model-a"].endswith(str(Path("root") / "phonondb" / "model-a"))
    assert any("found twice" in w and "kept the newer" in w for w in doc["warnings"])


class _Balance(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.strong: list[str] = []
        self._in_strong = False

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)
        self._in_strong = tag == "strong"

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()
        self._in_strong = False

    def handle_data(self, data):
        if self._in_strong:
            self.strong.append(data)


def test_html_self_contained_and_same_numbers(report):
    text, doc = report["html"], report["doc"]
    assert text.startswith("<!DOCTYPE html>")
    assert 'src="http' not in text and "href=" not in text and "<link" not in text and "<script" not in text
    assert text.count('src="data:image/png;base64,') == len(doc["figures"])
    parser = _Balance()
    parser.feed(text)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    for bold in ("0.05", "0.07", "0.95", "0.2", "0.3", "0.04", "0.22"):
        assert bold in parser.strong
    for plain in ("<td>0.08</td>", "<td>1200</td>", "<td>–</td>", "<td>0.31</td>"):
        assert plain in text
    assert "Test report" in text and "RuntimeError: boom 3" in text and "model-c" in text


def test_html_escapes_text(results, tmp_path):
    folder = tmp_path / "x"
    _write_run(folder, benchmark="esc", kind="k", dataset=HEX_DATASET, model=_model("m<b>", "1&2"),
               metrics=[metric("m", "<script>alert(1)</script>", None, 1.5, "lower")],
               failures=[{"index": 0, "id": "<i>", "error": "a < b & c"}])
    make_report([folder], tmp_path / "esc.md")
    text = (tmp_path / "esc.html").read_text(encoding="utf-8")
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "m&lt;b&gt; (1&amp;2)" in text and "a &lt; b &amp; c" in text


def test_json_round_trip_with_identities(report):
    out, doc = report["out"], report["doc"]
    loaded = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert loaded == doc
    assert loaded["schema"] == REPORT_SCHEMA and loaded["created"]
    hex_ = loaded["benchmarks"]["hex"]
    assert hex_["dataset"]["sha256"] == HEX_DATASET["sha256"]
    assert loaded["benchmarks"]["phonondb"]["dataset"]["sha256"] == PHON_DATASET["sha256"]
    a = hex_["models"]["model-a"]
    assert a["model"] == MODEL_A  # full identity, full sha256
    assert a["schema"] == SCHEMA and a["software"] and a["groups"]["0-25 GPa"][0]["value"] == 0.04
    # the md shows the short hash and the dataset/model/software sections
    md = report["md"]
    models = _table_rows(md, "## Models")
    assert models["model-a"][:6] == ["1.0", "mattersim", "–", "/weights/model-a.pth", MODEL_A["sha256"][:12],
                                     "mattersim 1.0"]  # "–": model-a records no energy convention
    assert MODEL_A["sha256"] not in md
    datasets = _table_rows(md, "## Datasets")
    assert datasets["hex"][:4] == ["HEX", "/data/hex.extxyz", HEX_DATASET["sha256"][:12], "30"]
    runs = _section(md, "## Runs")
    assert "2025-06-01T00:00:00+00:00" in runs and "python " in runs


def test_figures_are_pngs_for_each_quantity(report):
    out, doc = report["out"], report["doc"]
    names = {Path(f).name for f in doc["figures"]}
    for bench, q in (("hex", "energy"), ("hex", "force"), ("phonondb", "omega_max")):
        for kind in ("parity", "error"):
            assert f"{bench}__{q}__{kind}.png" in names
    assert len(names) == 6
    for rel in doc["figures"]:
        assert rel.startswith("figures/")
        data = (out / rel).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
        assert f"]({rel})" in report["md"]


def test_output_stem_and_cli(results, tmp_path, capsys):
    md, html_, js, figs = resolve_output(tmp_path / "sub" / "cmp.md")
    assert (md.name, html_.name, js.name, figs.name) == ("cmp.md", "cmp.html", "cmp.json", "cmp_figures")
    rc = main([str(results / "other" / "phonondb"), "-o", str(tmp_path / "sub" / "cmp.md"), "--title", "CLI"])
    assert rc == 0
    for p in (md, html_, js):
        assert p.is_file()
    assert sorted(p.name for p in figs.iterdir()) == ["phonondb__omega_max__error.png",
                                                      "phonondb__omega_max__parity.png"]
    assert "](cmp_figures/phonondb__omega_max__parity.png)" in md.read_text(encoding="utf-8")
    assert json.loads(js.read_text())["title"] == "CLI"
    assert not list(tmp_path.rglob("*.tmp"))
    rc = main([str(tmp_path / "missing"), "-o", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("Error: ") and str(tmp_path / "missing") in err


def _good_metrics_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "bad"
    _write_run(folder, benchmark="b", kind="k", dataset=HEX_DATASET, model=MODEL_A,
               metrics=[metric("m", "M", None, 1.0)])
    return folder


def test_bad_inputs_raise_input_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match=re.escape(str(missing))):
        make_report([missing], tmp_path / "o")

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(InputError, match="no benchmark.json") as exc:
        make_report([empty], tmp_path / "o")
    assert str(empty) in str(exc.value)

    folder = _good_metrics_dir(tmp_path)
    mpath = folder / "model-a" / "metrics.json"
    with pytest.raises(InputError, match="model folder") as exc:  # a model folder instead of the benchmark folder
        make_report([folder / "model-a"], tmp_path / "o")

    mpath.write_text('{"schema": "mattersim-benchmark/1", "metr')
    with pytest.raises(InputError, match="not valid JSON") as exc:
        make_report([folder], tmp_path / "o")
    assert str(mpath) in str(exc.value)

    for bad, what in (({"schema": "something-else/9", "metrics": [], "model": {}}, "schema"),
                      ({"schema": SCHEMA, "metrics": [{"label": "no key"}], "model": {}}, "metrics"),
                      ({"schema": SCHEMA, "metrics": [], "model": "x"}, "model"),
                      ({"schema": SCHEMA, "metrics": [{"key": "k", "value": "1.0"}], "model": {}}, "non-numeric"),
                      ([1, 2], "JSON object")):
        mpath.write_text(json.dumps(bad))
        with pytest.raises(InputError, match=what) as exc:
            make_report([folder], tmp_path / "o")
        assert str(mpath) in str(exc.value)

    (folder / "benchmark.json").write_text("{}")
    with pytest.raises(InputError, match="benchmark") as exc:
        make_report([folder], tmp_path / "o")
    assert str(folder / "benchmark.json") in str(exc.value)

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="existing file"):
        make_report([_good_metrics_dir(tmp_path / "g")], afile)
    assert not (tmp_path / "o").exists()  # nothing written on error


def test_format_and_best_helpers():
    assert format_value(None) == "–" and format_value(float("nan")) == "–"
    assert format_value(3.0) == "3" and format_value(0.012345) == "0.01235" and format_value(123456.7) == "123457"
    assert format_value(2.5e-5) == "2.5e-05" and format_value(3.21e7 + 0.5) == "3.2100e+07" and format_value(3e7) == "30000000"
    assert best_flags([1.0, 2.0, None], "lower") == [True, False, False]
    assert best_flags([1.0, 2.0, 2.0], "higher") == [False, True, True]
    assert best_flags([1.0, 2.0], None) == [False, False]
    assert best_flags([None, None], "lower") == [False, False]


def test_parity_figure_keeps_its_axis_labels_inside_the_image():
    """Two panels of large stresses (hundreds of GPa): the x-axis label used to be cut off at the bottom.
    Nothing drawn may touch the image border: its outermost rows and columns are background."""
    import io

    import matplotlib.image as mpimg

    from benchmarks.report import _error_png, _parity_png

    r = np.random.default_rng(0).normal(size=3000) * 100
    data = {"a": ("chgnet", r, 1.1 * r), "b": ("sevennet-0 with a long label", r, 1.2 * r)}
    for png in (_parity_png("mptrj-highest-stress-1k", "stress", data),
                _error_png("mptrj-highest-stress-1k", "stress", data)):
        img = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
        for edge in (img[:2], img[-2:], img[:, :2], img[:, -2:]):
            assert edge.min() > 0.9, "a label or marker reaches the image border (cut off)"


def test_every_phonondb_parity_quantity_has_a_unit():
    """The figures label their axes with the unit of each parity quantity, the NAC and QHA variants included."""
    from benchmarks.phonondb import QUANTITIES
    from benchmarks.report import _unit_of

    for name, _key, _tag, unit, _label in QUANTITIES:
        assert _unit_of(name) == unit and _unit_of(f"{name}_nac") == unit, name
    assert _unit_of("free_energy_change_qha") == "meV/atom" and _unit_of("nonsense") is None


def test_parity_limits_keep_the_references_and_push_wild_predictions_to_the_edge():
    """A few predictions hundreds of GPa off (unstable tensors' Reuss averages) must not set the axes: the
    limits hold every reference value and the central 99 % of the predictions, the rest is counted."""
    from benchmarks.report import _parity_limits, _parity_png, _unit_of

    ref = np.linspace(1.0, 300.0, 1000)
    pred = 0.9 * ref
    pred[:5] = [-800.0, -500.0, 2000.0, 900.0, -300.0]
    lo, hi = _parity_limits({"a": ("m", ref, pred)})
    assert lo <= 1.0 and hi >= 300.0  # every reference value is inside
    assert -50 < lo and hi < 350  # the five wild ones are not
    assert _parity_png("elasticity", "shear_modulus", {"a": ("m", ref, pred)})[:8] == b"\x89PNG\r\n\x1a\n"
    assert _unit_of("bulk_modulus") == _unit_of("shear_modulus") == "GPa"


def test_a_resumed_run_reports_the_summed_entry_time_not_only_its_last_invocation():
    from benchmarks.report import _time_text

    assert _time_text({"wall_time_s": 12.5}) == "12.5 s"
    assert _time_text({"wall_time_s": 0.6, "settings": {"compute_time_s": 7200.0, "reused": 3953}}) == (
        "2.00 h summed over entries; last invocation 0.6 s, 3953 entries reused")
    assert _time_text({"wall_time_s": 90.0, "settings": {"compute_time_s": 150.0, "reused": 0}}) == (
        "2.5 min summed over entries; wall 90.0 s")


def test_error_histogram_legend_stays_above_the_peaks():
    """Narrow error distributions (a peak at zero, as SevenNet-0's bulk moduli give) used to reach into the
    legend's box: the legend must sit entirely above the tallest bar, for one to five models."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from benchmarks.report import _error_figure

    rng = np.random.default_rng(1)
    ref = rng.uniform(1.0, 300.0, 4000)
    for n_models in (1, 2, 5):
        data = {f"m{i}": (f"model-{i} (version {i})", ref, ref + rng.laplace(scale=2.0 + i, size=ref.size))
                for i in range(n_models)}
        fig = _error_figure("elasticity", "bulk_modulus", data)
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)  # lays out the figure and places the legend ("best") as the PNG gets it
        ax = fig.axes[0]
        box = ax.get_legend().get_window_extent(renderer)
        legend_bottom = ax.transData.inverted().transform((box.x0, box.y0))[1]
        tallest = max(float(np.max(patch.get_path().vertices[:, 1])) for patch in ax.patches)
        assert legend_bottom > tallest, (n_models, legend_bottom, tallest)
