"""PhononDB phonon benchmark (benchmarks.phonondb): entry reading, the DFT reference against phonopy's own
result on the same files, LO-TO physics, and an end-to-end run with a calculator that replays the DFT force
constants (scaled), whose predicted frequencies are known exactly."""

from __future__ import annotations

import io
import json
import lzma
import shutil
import tarfile
from pathlib import Path

import numpy as np
import phonopy
import pytest
from ase.calculators.calculator import Calculator, all_changes
from phonopy.file_IO import parse_FORCE_SETS

from benchmarks.phonondb import (
    DEFAULT_MESH_LENGTH,
    QUANTITIES,
    find_entries,
    load_entry,
    main,
    reference_phonopy,
    run_phonondb,
    stable_reference_ids,
)
from conftest import shared_path
from mattersim.errors import InputError
from workflows.nac import gamma_lo_to, lo_to_analytic
from workflows.phonon import phonon_properties

SIC = "mp-8062-20180417"  # 3C-SiC, 8-atom cubic cell, DIM 2 2 2, fcc primitive axes, with BORN
NASBF6 = "mp-5955-20180417"  # NaSbF6, DIM 1 1 1, no BORN; the DFT reference has imaginary modes
FCC_AXES = "0 1/2 1/2 1/2 0 1/2 1/2 1/2 0"


def _entries_dir() -> Path:
    return shared_path("data", "phonondb", "entries")


def _nacl_entry(tmp_path: Path) -> Path:
    """phonopy's NaCl example as a PhononDB-style folder (its phonopy_disp.yaml: DIM 2 2 2, F-centred axes)."""
    src = shared_path("data", "phonopy-examples", "NaCl")
    dst = tmp_path / "NaCl"
    dst.mkdir()
    for name in ("POSCAR-unitcell", "FORCE_SETS", "BORN"):
        shutil.copy(src / name, dst / name)
    (dst / "phonopy.conf").write_text(f"DIM = 2 2 2\nPRIMITIVE_AXIS = {FCC_AXES}\n")
    return dst


def _copy_entry(eid: str, tmp_path: Path, name: str | None = None) -> Path:
    dst = tmp_path / (name or eid)
    shutil.copytree(_entries_dir() / eid, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------
# the DFT reference equals phonopy's own result on the same files
# ---------------------------------------------------------------------------------------------------------


def _compare_frequencies(ours, theirs, qpoints):
    ours.run_qpoints(qpoints)
    theirs.run_qpoints(qpoints)
    fa, fb = np.asarray(ours.qpoints.frequencies), np.asarray(theirs.qpoints.frequencies)
    # the three acoustic modes at Γ are ~0 (square roots of round-off): compare them loosely
    soft = (np.abs(fb) < 1e-3)
    np.testing.assert_allclose(fa[~soft], fb[~soft], rtol=0, atol=1e-6)
    assert np.all(np.abs(fa[soft]) < 1e-3)
    assert soft.sum() == 3  # only the acoustic modes at Γ


@pytest.mark.parametrize("case", ["SiC", "NaCl"])
def test_reference_equals_phonopy_load(case, tmp_path):
    folder = _copy_entry(SIC, tmp_path) if case == "SiC" else _nacl_entry(tmp_path)
    entry = load_entry(folder)
    assert entry.has_born
    for nac in (False, True):
        ours = reference_phonopy(entry, nac=nac)
        theirs = phonopy.load(
            supercell_matrix=[2, 2, 2], primitive_matrix=[[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]],
            unitcell_filename=str(folder / "POSCAR-unitcell"), force_sets_filename=str(folder / "FORCE_SETS"),
            born_filename=str(folder / "BORN") if nac else None, is_nac=nac, log_level=0,
        )
        assert (ours.nac_params is None) == (not nac)
        if nac:
            np.testing.assert_allclose(ours.nac_params["born"], theirs.nac_params["born"], atol=1e-12)
            np.testing.assert_allclose(ours.nac_params["dielectric"], theirs.nac_params["dielectric"], atol=1e-12)
            assert ours.nac_params["factor"] == pytest.approx(theirs.nac_params.get("factor") or 14.399645, abs=1e-4)
        _compare_frequencies(ours, theirs, [[0, 0, 0], [0.13, 0.27, 0.41], [0.5, 0.5, 0.5]])

        # thermal properties at 300 K: ours through the shared post-processing, phonopy's directly
        props = phonon_properties(ours, DEFAULT_MESH_LENGTH)
        theirs.run_mesh(props["mesh"]["numbers"], is_gamma_center=True)
        theirs.run_thermal_properties(temperatures=[300.0], exclude_gamma_acoustic=True)
        tp = theirs.thermal_properties
        t300 = props["thermal_300K"]
        assert t300["free_energy_kJ_per_mol"] == pytest.approx(float(tp.free_energy[0]), abs=1e-6)
        assert t300["entropy_J_per_K_per_mol"] == pytest.approx(float(tp.entropy[0]), abs=1e-6)
        assert t300["heat_capacity_J_per_K_per_mol"] == pytest.approx(float(tp.heat_capacity[0]), abs=1e-6)


def test_sic_reference_physics():
    entry = load_entry(_entries_dir() / SIC)
    plain = phonon_properties(reference_phonopy(entry, nac=False), DEFAULT_MESH_LENGTH)
    ph = reference_phonopy(entry, nac=True)
    with_nac = phonon_properties(ph, DEFAULT_MESH_LENGTH)
    # 2-atom primitive cell; no imaginary modes; PBEsol 3C-SiC: TO(Γ) ≈ 23.6 THz (exp. 23.9), LO(Γ) ≈ 28.6 THz (exp. 29.2)
    assert len(ph.primitive) == 2
    assert plain["imaginary_modes"]["count"] == 0 and with_nac["imaginary_modes"]["count"] == 0
    lo_to = gamma_lo_to(ph)
    to = max(lo_to["to"])
    assert 22.5 < to < 24.5
    for d in lo_to["directions"]:  # one LO mode, raised above the two TO modes, in every direction (cubic)
        assert len(d["lo_frequencies"]) == 1
        assert d["lo_frequencies"][0] > to + 4.0
    # zincblende: ν_LO² - ν_TO² = Z*² e² / (ε0 ε∞ Ω μ)
    z, eps = float(ph.nac_params["born"][1][0][0]), float(ph.nac_params["dielectric"][0][0])
    analytic = np.sqrt(to**2 + lo_to_analytic(abs(z), eps, ph.primitive.volume, ph.primitive.masses))
    assert lo_to["directions"][0]["lo_frequencies"][0] == pytest.approx(analytic, abs=2e-3)
    # ω_max: without NAC the TO-derived maximum, with NAC the LO mode near Γ (~29 THz in PBEsol)
    assert 26.0 < plain["frequencies"]["omega_max_THz"] < 28.5
    assert 27.5 < with_nac["frequencies"]["omega_max_THz"] < 30.5
    assert with_nac["frequencies"]["omega_max_THz"] > plain["frequencies"]["omega_max_THz"] + 0.5


def test_phonon_properties_is_run_phonons_summary(tmp_path):
    """run_phonon's summary sections are phonon_properties of its force constants (one shared code path),
    also with files written and a length-based mesh (the projected-DOS branch)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from workflows.phonon import run_phonon

    result = run_phonon(bulk("Cu", "fcc", a=3.6), EMT(), relax=False, supercell=(3, 3, 3), mesh=12.0,
                        group_velocities=True, output_dir=tmp_path / "cu", progress=False)
    again = phonon_properties(result.phonopy, 12.0)
    for section in ("imaginary_modes", "mesh", "group_velocity", "thermal_300K", "band_path"):
        assert json.dumps(result.summary[section], sort_keys=True) == json.dumps(again[section], sort_keys=True), section
    for key in ("omega_max_THz", "gamma_THz", "lowest_THz", "lowest_at"):
        assert result.summary["frequencies"][key] == again["frequencies"][key]
    assert not (tmp_path / "cu" / "projected_dos.dat").exists()  # only with pdos=True


# ---------------------------------------------------------------------------------------------------------
# reading entries
# ---------------------------------------------------------------------------------------------------------


def _make_archive(folder: Path, dest: Path, *, settings_name: str = "phonon.conf") -> Path:
    """A PhononDB-mirror style <id>.tar.lzma (legacy LZMA 'alone' format) with a folder <id>/ inside."""
    eid = folder.name
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("POSCAR-unitcell", "FORCE_SETS", "BORN", "phonopy.conf"):
            arcname = f"{eid}/{settings_name if name == 'phonopy.conf' else name}"
            tar.add(folder / name, arcname=arcname)
        extra = b"phonopy:\n  version: 1.11\n"
        info = tarfile.TarInfo(f"{eid}/disp.yaml")
        info.size = len(extra)
        tar.addfile(info, io.BytesIO(extra))
    path = dest / f"{eid}.tar.lzma"
    with lzma.open(path, "wb", format=lzma.FORMAT_ALONE) as fh:
        fh.write(buf.getvalue())
    return path


def test_load_entry_folder_and_archive(tmp_path):
    folder = _entries_dir() / SIC
    entry = load_entry(folder)
    assert entry.id == SIC and len(entry.unitcell) == 8 and entry.unitcell.get_chemical_formula() == "C4Si4"
    np.testing.assert_array_equal(entry.supercell_matrix, 2 * np.eye(3, dtype=int))
    np.testing.assert_allclose(entry.primitive_matrix, [[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    assert entry.has_born and entry.born_path == str(folder / "BORN")
    ref = parse_FORCE_SETS(filename=str(folder / "FORCE_SETS"))
    assert entry.force_sets["natom"] == ref["natom"] == 64
    assert len(entry.force_sets["first_atoms"]) == len(ref["first_atoms"]) == 2
    for a, b in zip(entry.force_sets["first_atoms"], ref["first_atoms"]):
        assert a["number"] == b["number"]
        np.testing.assert_array_equal(a["displacement"], b["displacement"])
        np.testing.assert_array_equal(a["forces"], b["forces"])

    archive = _make_archive(folder, tmp_path)
    from_archive = load_entry(archive)
    assert from_archive.id == SIC and from_archive.source == archive
    assert from_archive.input_sha256 == entry.input_sha256  # same files, phonon.conf or phonopy.conf
    assert from_archive.born_text == entry.born_text and from_archive.born_path.endswith(f"{SIC}/BORN")
    np.testing.assert_array_equal(from_archive.supercell_matrix, entry.supercell_matrix)
    np.testing.assert_allclose(from_archive.unitcell.positions, entry.unitcell.positions)
    a, b = reference_phonopy(from_archive, nac=True), reference_phonopy(entry, nac=True)
    q = [[0.1, 0.2, 0.3]]
    a.run_qpoints(q)
    b.run_qpoints(q)
    np.testing.assert_allclose(a.qpoints.frequencies, b.qpoints.frequencies, atol=1e-10)

    # a folder of entries: folders and archives, sorted; a subset file; an id missing from the folder
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(_entries_dir() / NASBF6, root / NASBF6)
    shutil.copy(archive, root / archive.name)
    (root / ".hidden").mkdir()
    assert [p.name for p in find_entries(root)] == [NASBF6, archive.name]
    subset = tmp_path / "subset.txt"
    subset.write_text(f"# one id per line\n{SIC}\n")
    assert find_entries(root, subset) == [root / archive.name]
    with pytest.raises(InputError, match="not in"):
        find_entries(root, ["mp-0-20180417"])
    with pytest.raises(InputError, match="does not exist"):
        find_entries(tmp_path / "nowhere")


def _broken(tmp_path: Path, what: str) -> tuple[Path, tuple[str, ...]]:
    folder = _copy_entry(SIC, tmp_path, f"broken-{what}")
    conf = folder / "phonopy.conf"
    if what == "no-poscar":
        (folder / "POSCAR-unitcell").unlink()
        return folder, ("POSCAR-unitcell", str(folder))
    if what == "no-force-sets":
        (folder / "FORCE_SETS").unlink()
        return folder, ("FORCE_SETS", str(folder))
    if what == "no-settings":
        conf.unlink()
        return folder, ("phonopy.conf", str(folder))
    if what == "dim-count":
        conf.write_text(f"DIM = 2 2 2 2\nPRIMITIVE_AXIS = {FCC_AXES}\n")
        return folder, (str(conf), "line 1", "DIM", "4 integers", "3")
    if what == "dim-text":
        conf.write_text(f"DIM = 2 two 2\nPRIMITIVE_AXIS = {FCC_AXES}\n")
        return folder, (str(conf), "DIM", "integers")
    if what == "primitive-axis":
        conf.write_text("DIM = 2 2 2\nPRIMITIVE_AXIS = 0 1/2 1/2 1/2 0 1/2 1/2 1/2 x\n")
        return folder, (str(conf), "line 2", "PRIMITIVE_AXIS", "9 numbers")
    if what == "primitive-count":
        conf.write_text("DIM = 2 2 2\nPRIMITIVE_AXIS = 1/3 0 0 0 1 0 0 0 1\n")
        return folder, (str(conf), "PRIMITIVE_AXIS", "atoms")
    if what == "atom-count":
        conf.write_text(f"DIM = 1 1 1\nPRIMITIVE_AXIS = {FCC_AXES}\n")
        return folder, (str(folder / "FORCE_SETS"), "64-atom", "8 atoms", "DIM")
    if what == "truncated":
        lines = (folder / "FORCE_SETS").read_text().splitlines()
        (folder / "FORCE_SETS").write_text("\n".join(lines[:100]) + "\n")
        return folder, (str(folder / "FORCE_SETS"), "truncated", "displacement 2 of 2")
    if what == "bad-number":
        lines = (folder / "FORCE_SETS").read_text().splitlines()
        lines[10] = "  0.1 0.2 abc"
        (folder / "FORCE_SETS").write_text("\n".join(lines) + "\n")
        return folder, (str(folder / "FORCE_SETS"), "line 11", "not a number")
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["no-poscar", "no-force-sets", "no-settings", "dim-count", "dim-text",
                                  "primitive-axis", "primitive-count", "atom-count", "truncated", "bad-number"])
def test_load_entry_errors(what, tmp_path):
    folder, fragments = _broken(tmp_path, what)
    with pytest.raises(InputError) as info:
        load_entry(folder)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n" not in message


def test_load_entry_bad_archive(tmp_path):
    bad = tmp_path / "mp-1-20180417.tar.lzma"
    bad.write_bytes(b"not an archive at all")
    with pytest.raises(InputError, match="mp-1-20180417.tar.lzma"):
        load_entry(bad)
    # an archive without FORCE_SETS names the archive and the file
    folder = _copy_entry(SIC, tmp_path, "mp-2-20180417")
    archive = _make_archive(folder, tmp_path)
    buf = io.BytesIO()
    with tarfile.open(archive, "r:xz") as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src.getmembers():
            if not m.name.endswith("FORCE_SETS"):
                dst.addfile(m, src.extractfile(m))
    with lzma.open(archive, "wb", format=lzma.FORMAT_ALONE) as fh:
        fh.write(buf.getvalue())
    with pytest.raises(InputError) as info:
        load_entry(archive)
    assert "FORCE_SETS" in str(info.value) and str(archive) in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# end to end: a calculator that replays the DFT force constants, scaled
# ---------------------------------------------------------------------------------------------------------


class HarmonicDFT(Calculator):
    """Forces ``-scale * Φ u`` with Φ the DFT force constants of the given entries (u: displacement from the DFT
    supercell); zero forces and stress for a DFT unit cell, which is therefore already relaxed. Scaling Φ
    by ``s`` scales every frequency and group velocity by exactly √s."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, entries, scale=1.0):
        super().__init__()
        self.scale, self.calls, self.known = scale, 0, []
        for e in entries:
            ph = reference_phonopy(load_entry(e))
            ph.produce_force_constants(calculate_full_force_constants=True, show_drift=False)
            ph.symmetrize_force_constants(show_drift=False)
            self.known.append((np.array(ph.supercell.cell), np.array(ph.supercell.positions), ph.force_constants))

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.calls += 1
        a = self.atoms
        forces = np.zeros((len(a), 3))
        for cell, pos, fc in self.known:
            if len(a) == len(pos) and np.allclose(a.cell[:], cell, atol=1e-8):
                frac = np.linalg.solve(cell.T, (a.positions - pos).T).T
                forces = -self.scale * np.einsum("ijab,jb->ia", fc, (frac - np.round(frac)) @ cell)
                break
        self.results = {"energy": 0.0, "free_energy": 0.0, "forces": forces, "stress": np.zeros(6)}


class HarmonicDFTWithCharges(HarmonicDFT):
    """The same, plus a Z*/ε∞ predictor returning the DFT values of 3C-SiC (the 'model' NAC source)."""

    def __init__(self, entries, born, epsilon, scale=1.0):
        super().__init__(entries, scale)
        self.born, self.epsilon, self.predicted = np.asarray(born), np.asarray(epsilon), 0

    def predict_dielectric(self, atoms):
        assert len(atoms) == len(self.born)
        self.predicted += 1
        return self.born.copy(), self.epsilon.copy()


def _hand_mae(records, variant, quantity_key):
    return float(np.mean([abs(r["prediction"][variant][quantity_key] - r["reference"][variant][quantity_key])
                          for r in records])) if records else None


def test_run_phonondb_end_to_end(tmp_path):
    entries_dir = _entries_dir()
    broken, _ = _broken(tmp_path, "truncated")
    entries = [entries_dir / SIC, broken, entries_dir / NASBF6]
    scale = 1.1
    calc = HarmonicDFT([entries_dir / SIC, entries_dir / NASBF6], scale=scale)
    out = tmp_path / "results"
    doc = run_phonondb(entries, calc, out, progress=False)

    slug = "HarmonicDFT"
    folder = out / slug
    for name in ("metrics.json", "parity.npz", "run.log", f"entries/{SIC}.json", f"entries/{NASBF6}.json",
                 "entries/broken-truncated.json"):
        assert (folder / name).is_file(), name
    bench = json.loads((out / "benchmark.json").read_text())
    assert bench["benchmark"] == "phonondb" and bench["kind"] == "phonon" and bench["models"] == [slug]
    metrics_doc = json.loads((folder / "metrics.json").read_text())
    assert metrics_doc == json.loads(json.dumps(doc))
    for key in ("schema", "benchmark", "kind", "dataset", "model", "software", "date", "wall_time_s", "n_items",
                "n_done", "n_failed", "failures", "metrics", "groups", "settings"):
        assert key in metrics_doc, key
    assert metrics_doc["schema"] == "mattersim-benchmark/1"
    ds = metrics_doc["dataset"]
    assert ds["name"] == "phonondb" and ds["n_items"] == 3 and len(ds["sha256"]) == 64
    assert (metrics_doc["n_items"], metrics_doc["n_done"], metrics_doc["n_failed"]) == (3, 2, 1)
    # the broken entry is listed, with the reason, and did not stop the run
    [failure] = metrics_doc["failures"]
    assert failure["index"] == 1 and failure["id"] == "broken-truncated"
    assert failure["error"].startswith("InputError: ") and "truncated" in failure["error"] and "FORCE_SETS" in failure["error"]
    broken_json = json.loads((folder / "entries" / "broken-truncated.json").read_text())
    assert broken_json["status"] == "failed" and broken_json["error"]["type"] == "InputError"

    metrics = {m["key"]: m for m in metrics_doc["metrics"]}
    for m in metrics_doc["metrics"]:
        assert set(m) == {"key", "label", "unit", "value", "better"}
    values = {k: m["value"] for k, m in metrics.items()}
    assert values["n_entries"] == 3 and values["n_succeeded"] == 2 and values["n_failed"] == 1
    assert values["n_imaginary_reference"] == 1 and values["n_imaginary_prediction"] == 1  # NaSbF6
    assert values["n_counted"] == 1 and values["n_counted_nac"] == 1
    assert metrics["omega_max_mae_THz"]["unit"] == "THz" and metrics["omega_max_mae_THz"]["better"] == "lower"
    assert metrics["n_entries"]["better"] is None

    sic = json.loads((folder / "entries" / f"{SIC}.json").read_text())
    nasbf6 = json.loads((folder / "entries" / f"{NASBF6}.json").read_text())
    # physics: Φ_pred = 1.1 Φ_DFT on the same structure (relaxation: 0 steps) -> ω and v scale by √1.1 exactly
    assert sic["relaxation"]["converged"] and sic["relaxation"]["steps"] == 0
    assert sic["relaxation"]["volume_change_percent"] == pytest.approx(0.0, abs=1e-12)
    for rec in (sic, nasbf6):
        r, p = rec["reference"]["no_nac"], rec["prediction"]["no_nac"]
        assert p["omega_max_THz"] == pytest.approx(np.sqrt(scale) * r["omega_max_THz"], rel=1e-8)
        assert p["group_velocity_m_per_s"] == pytest.approx(np.sqrt(scale) * r["group_velocity_m_per_s"], rel=1e-8)
        assert p["heat_capacity_J_per_K_per_mol"] < r["heat_capacity_J_per_K_per_mol"]  # stiffer: fewer modes excited
        assert p["mesh"] == r["mesh"]
    # NAC on the same force constants with the entry's DFT BORN: LO raised above the no-NAC maximum
    assert sic["nac"] == "dft-born" and sic["has_born"]
    assert sic["prediction"]["nac"]["omega_max_THz"] > sic["prediction"]["no_nac"]["omega_max_THz"] + 0.5
    assert sic["reference"]["nac"]["omega_max_THz"] > sic["reference"]["no_nac"]["omega_max_THz"] + 0.5
    # no BORN: the NAC variant is the one without, and it is left out of the NAC metrics
    assert nasbf6["nac"] == "no BORN" and not nasbf6["has_born"]
    assert nasbf6["prediction"]["nac"] == nasbf6["prediction"]["no_nac"]
    assert nasbf6["reference"]["no_nac"]["imaginary_modes"] > 0

    # the MAEs are the hand computation over the per-entry jsons; the imaginary-mode entry in its own group
    groups = {m["key"]: m["value"] for m in metrics_doc["groups"]["with imaginary modes"]}
    parity = np.load(folder / "parity.npz")
    for name, key, tag, unit, _ in QUANTITIES:
        assert values[f"{name}_mae_{tag}"] == pytest.approx(_hand_mae([sic], "no_nac", key), rel=1e-12)
        assert values[f"{name}_mae_{tag}_nac"] == pytest.approx(_hand_mae([sic], "nac", key), rel=1e-12)
        assert groups[f"{name}_mae_{tag}"] == pytest.approx(_hand_mae([nasbf6], "no_nac", key), rel=1e-12)
        assert groups[f"{name}_mae_{tag}_nac"] is None  # no entry with BORN has imaginary modes
        assert metrics[f"{name}_mae_{tag}"]["unit"] == unit
        np.testing.assert_array_equal(parity[f"{name}__ref"], [sic["reference"]["no_nac"][key]])
        np.testing.assert_array_equal(parity[f"{name}__pred"], [sic["prediction"]["no_nac"][key]])
        np.testing.assert_array_equal(parity[f"{name}_nac__pred"], [sic["prediction"]["nac"][key]])
    assert values["omega_max_mae_THz"] == pytest.approx((np.sqrt(scale) - 1) * sic["reference"]["no_nac"]["omega_max_THz"])
    assert groups["n_counted"] == 1

    # resume: nothing is evaluated again, the metrics are the same
    calc.calls = 0
    again = run_phonondb(entries, calc, out, progress=False)
    assert calc.calls == 0
    assert again["settings"]["evaluated_now"] == 0 and again["settings"]["reused"] == 3
    assert [m["value"] for m in again["metrics"]] == [m["value"] for m in doc["metrics"]]
    assert again["failures"] == doc["failures"] and again["dataset"] == doc["dataset"]
    # other settings: evaluated afresh
    run_phonondb(entries[:1], calc, out, progress=False, mesh=(4, 4, 4))
    assert calc.calls > 0
    assert "reused" in (folder / "run.log").read_text()


def test_second_model_takes_the_reference_from_the_first(tmp_path):
    """The DFT reference does not depend on the model: a second model run into the same folder reads it from
    OUT/reference/ (identical values), and a stale or foreign cache file is recomputed, not trusted."""
    d = _entries_dir()
    out = tmp_path / "results"

    class Other(HarmonicDFT):
        pass

    run_phonondb([d / SIC], HarmonicDFT([d / SIC], scale=1.1), out, progress=False)
    first = json.loads((out / "HarmonicDFT" / "entries" / f"{SIC}.json").read_text())
    assert (out / "reference" / f"{SIC}.json").is_file() and first["timings_s"]["reference_cached"] == 0.0
    run_phonondb([d / SIC], Other([d / SIC], scale=1.2), out, progress=False)
    second = json.loads((out / "Other" / "entries" / f"{SIC}.json").read_text())
    assert second["timings_s"]["reference_cached"] == 1.0
    assert second["reference"] == first["reference"] and second["mesh"] == first["mesh"]
    # a cache written for other settings (here: a tampered key) is not used
    cache = out / "reference" / f"{SIC}.json"
    doc = json.loads(cache.read_text())
    doc["key"], doc["reference"]["no_nac"]["omega_max_THz"] = "0" * 64, -1.0
    cache.write_text(json.dumps(doc))

    class Third(HarmonicDFT):
        pass

    run_phonondb([d / SIC], Third([d / SIC], scale=1.3), out, progress=False)
    third = json.loads((out / "Third" / "entries" / f"{SIC}.json").read_text())
    assert third["timings_s"]["reference_cached"] == 0.0 and third["reference"] == first["reference"]


def test_stable_reference_ids_and_the_qha_run_that_takes_them(tmp_path, monkeypatch, capsys):
    """The entries whose DFT phonons have no imaginary mode, without a model: NaSbF6's DFT reference has
    them, 3C-SiC's not; an independent check with phonopy alone on the DFT files (its lowest mesh frequency,
    the three acoustic Γ modes aside). The references are kept where a run into the same folder takes them,
    and a second call computes nothing. The command writes the ids, one per line, and needs no model."""
    import benchmarks.phonondb as module

    d = _entries_dir()
    for eid, unstable in ((SIC, False), (NASBF6, True)):
        ph = reference_phonopy(load_entry(d / eid))
        ph.run_mesh(DEFAULT_MESH_LENGTH)
        freqs = np.array(ph.mesh.frequencies)
        gamma = np.flatnonzero(np.all(np.abs(ph.mesh.qpoints) < 1e-12, axis=1))
        assert len(gamma) == 1  # Γ-centred: Γ is on the mesh, and its three acoustic modes are left aside
        freqs[gamma[0], :3] = 0.0
        assert (freqs.min() < -0.01) == unstable
    out = tmp_path / "out"
    assert stable_reference_ids([d / SIC, d / NASBF6], out, progress=False) == [SIC]
    assert sorted(f.name for f in (out / "reference").iterdir()) == sorted([f"{SIC}.json", f"{NASBF6}.json"])

    def no_properties(*args, **kwargs):
        raise AssertionError("recomputed a cached reference")

    monkeypatch.setattr(module, "phonon_properties", no_properties)
    assert stable_reference_ids([d / NASBF6, d / SIC], out, progress=False) == [SIC]
    monkeypatch.undo()
    run_phonondb([d / SIC], HarmonicDFT([d / SIC], scale=1.1), out, progress=False)
    rec = json.loads((out / "HarmonicDFT" / "entries" / f"{SIC}.json").read_text())
    assert rec["timings_s"]["reference_cached"] == 1.0

    subset = tmp_path / "all.txt"
    subset.write_text(f"{SIC}\n{NASBF6}\n")
    ids = tmp_path / "stable.txt"
    assert main(["--entries", str(d), "--subset", str(subset), "--stable-reference-ids", str(ids), "--no-progress",
                 "-o", str(tmp_path / "cli")]) == 0
    assert ids.read_text() == f"{SIC}\n" and "1 of 2 entries" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--entries", str(d), "-o", str(tmp_path / "x")])  # neither a model nor --stable-reference-ids
    assert "--model is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "chgnet", "--entries", str(d), "--stable-reference-ids", str(ids), "-o", str(tmp_path / "x")])
    assert "without --model" in capsys.readouterr().err


def test_model_born_charges_and_identity(tmp_path):
    """A 'model' that reproduces the DFT force constants and Z*/ε∞: prediction = reference, NAC source 'model'."""
    entry_path = _entries_dir() / SIC
    ref = reference_phonopy(load_entry(entry_path), nac=True)
    calc = HarmonicDFTWithCharges([entry_path], ref.nac_params["born"], ref.nac_params["dielectric"])
    doc = run_phonondb([entry_path], calc, tmp_path / "out", progress=False, max_entries=5)
    rec = json.loads((tmp_path / "out" / "HarmonicDFTWithCharges" / "entries" / f"{SIC}.json").read_text())
    assert rec["nac"] == "model" and calc.predicted == 1
    for variant in ("no_nac", "nac"):
        for _, key, *_ in QUANTITIES:
            assert rec["prediction"][variant][key] == pytest.approx(rec["reference"][variant][key], rel=1e-7, abs=1e-7)
    values = {m["key"]: m["value"] for m in doc["metrics"]}
    assert values["omega_max_mae_THz_nac"] < 1e-6 and values["heat_capacity_mae_J_per_K_per_mol"] < 1e-6
    assert doc["settings"]["nac_sources"] == {"model": 1, "dft-born": 0, "no BORN": 0}


def test_main_with_checkpoint(tmp_path, small_checkpoint, capsys):
    """The command line with a real MatterSim checkpoint (random weights: only the machinery is checked)."""
    root = tmp_path / "entries"
    root.mkdir()
    shutil.copytree(_entries_dir() / SIC, root / SIC)
    (root / "subset.txt").write_text(f"{SIC}\n")
    out = tmp_path / "out"
    rc = main(["--model", str(small_checkpoint), "--entries", str(root), "--subset", str(root / "subset.txt"),
               "--max", "1", "--relax-steps", "2", "--mesh", "20", "--no-progress", "-o", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_entries"] == 1
    bench = json.loads((out / "benchmark.json").read_text())
    [slug] = bench["models"]
    doc = json.loads((out / slug / "metrics.json").read_text())
    assert doc["model"]["sha256"] and doc["n_items"] == 1
    rec = json.loads((out / slug / "entries" / f"{SIC}.json").read_text())
    if rec["status"] == "ok":  # random weights: whatever came out is recorded with its relaxation
        assert rec["relaxation"]["steps"] <= 2 and rec["nac"] == "dft-born"
    else:
        assert doc["failures"][0]["id"] == SIC
    # a bad entries folder: one error line, exit code 2
    assert main(["--model", str(small_checkpoint), "--entries", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "Error: " in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # phonopy's mesh fallbacks, the subject of this test
def test_non_simple_cell_reference_and_prediction_use_one_mesh(tmp_path):
    """mp-3527 (body-centred orthorhombic, PhononDB's primitive axes): for the 50 Å length phonopy builds a
    generalized regular grid and reports its diagonal as the mesh numbers; those numbers used as a plain
    mesh are another grid (F differs by about 4 kJ/mol). Replaying the DFT force constants as the
    'prediction' must give zero error on every metric."""
    entry_dir = _entries_dir() / "mp-3527-20180417"
    ref = reference_phonopy(load_entry(entry_dir))
    by_length = phonon_properties(ref, 50.0)
    by_numbers = phonon_properties(ref, by_length["mesh"]["numbers"])
    assert abs(by_length["thermal_300K"]["free_energy_kJ_per_mol"]
               - by_numbers["thermal_300K"]["free_energy_kJ_per_mol"]) > 1.0  # the hazard is real

    run_phonondb([entry_dir], HarmonicDFT([entry_dir], scale=1.0), tmp_path / "out", progress=False)
    rec = json.loads((tmp_path / "out" / "HarmonicDFT" / "entries" / "mp-3527-20180417.json").read_text())
    assert rec["status"] == "ok" and rec["mesh"] == rec["mesh_prediction"] and rec["mesh_definition"] == 50.0
    for variant in ("no_nac", "nac"):
        r, p = rec["reference"][variant], rec["prediction"][variant]
        for key in ("omega_max_THz", "group_velocity_m_per_s", "free_energy_kJ_per_mol", "entropy_J_per_K_per_mol",
                    "heat_capacity_J_per_K_per_mol", "group_velocity_max_m_per_s",
                    "free_energy_change_300_900_meV_per_atom"):
            # the force constants go through forces and back (and the acoustic sum rule once more): round-off,
            # 1e-5 relative at most, against the 4 kJ/mol of two different grids
            assert p[key] == pytest.approx(r[key], rel=1e-5, abs=1e-4), (variant, key)


class HarmonicDFTFailingOnAg(HarmonicDFT):
    """The same model, except that it fails on every structure with silver (mp-3527)."""

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        if atoms is not None and "Ag" in atoms.get_chemical_symbols():
            raise RuntimeError("no silver here")
        super().calculate(atoms, properties, system_changes)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # phonopy's mesh fallback for mp-3527
def test_report_ranks_models_on_their_common_entries(tmp_path):
    from benchmarks.report import make_report

    d = _entries_dir()
    names = [SIC, NASBF6, "mp-3527-20180417"]
    entries = [d / n for n in names]
    out = tmp_path / "results"
    run_phonondb(entries, HarmonicDFT(entries, scale=1.1), out, progress=False)
    run_phonondb(entries, HarmonicDFTFailingOnAg(entries, scale=1.2), out, progress=False)
    a = json.loads((out / "HarmonicDFT" / "metrics.json").read_text())
    b = json.loads((out / "HarmonicDFTFailingOnAg" / "metrics.json").read_text())
    count = lambda doc: {m["key"]: m["value"] for m in doc["metrics"]}["n_counted"]
    assert (count(a), count(b)) == (2, 1)  # NaSbF6 has imaginary modes in DFT; B fails on mp-3527

    doc = make_report([out], tmp_path / "report")
    common = doc["benchmarks"]["phonondb"]["common_entries"]
    assert common["ids"]["no_nac"] == [SIC]
    # on the common entry each MAE is that model's error on 3C-SiC alone: (sqrt(s) - 1) * the DFT value
    sic = json.loads((out / "HarmonicDFT" / "entries" / f"{SIC}.json").read_text())
    w_ref = sic["reference"]["no_nac"]["omega_max_THz"]
    for slug, scale in (("HarmonicDFT", 1.1), ("HarmonicDFTFailingOnAg", 1.2)):
        values = {m["key"]: m["value"] for m in common["metrics"][slug]}
        assert values["omega_max_mae_THz"] == pytest.approx((np.sqrt(scale) - 1) * w_ref, rel=1e-8)
        assert values["n_counted"] == 1
    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "Metrics on the entries common to all models" in md and "1 without NAC" in md
    assert "### Definitions" in md and "displacement: 0.01 Å for the prediction" in md


def test_displacement_is_a_setting_of_the_run(tmp_path):
    """--displacement reaches the prediction and is recorded; a harmonic model gives the same result."""
    d = _entries_dir()
    calc = HarmonicDFT([d / SIC], scale=1.1)
    doc = run_phonondb([d / SIC], calc, tmp_path / "a", progress=False, displacement=0.03)
    assert doc["settings"]["displacement_A"] == 0.03
    assert doc["definitions"]["displacement"].startswith("0.03 Å for the prediction")  # stated for the reader
    ref = run_phonondb([d / SIC], calc, tmp_path / "b", progress=False)
    assert ref["settings"]["displacement_A"] == 0.01
    assert "50 Å, the same length" in ref["definitions"]["mesh_rule"]
    va = {m["key"]: m["value"] for m in doc["metrics"]}
    vb = {m["key"]: m["value"] for m in ref["metrics"]}
    assert va["omega_max_mae_THz"] == pytest.approx(vb["omega_max_mae_THz"], rel=1e-6)


def test_cli_bench_run_rejects_a_bad_displacement(tmp_path):
    from typer.testing import CliRunner

    from conftest import assert_user_error
    from mattersim.cli import app

    result = CliRunner().invoke(app, ["bench", "run", "phonondb", "-m", "chgnet", "-o", str(tmp_path / "o"),
                                      "--displacement", "-0.01"])
    assert_user_error(result, "--displacement", "0.01")


def test_run_phonondb_at_the_dft_volume(tmp_path):
    from benchmarks.phonondb import AT_DFT_VOLUME

    entries_dir = _entries_dir()
    calc = HarmonicDFT([entries_dir / SIC])
    doc = run_phonondb([entries_dir / SIC], calc, tmp_path / "dftv", progress=False, at_dft_volume=True)
    assert doc["settings"]["relax_mode"] == AT_DFT_VOLUME
    assert "both at the DFT volume" in doc["definitions"]["free_energy_change"]
    assert "positions only, at the DFT cell" in doc["definitions"]["prediction"]
    sic = json.loads((tmp_path / "dftv" / "HarmonicDFT" / "entries" / f"{SIC}.json").read_text())
    assert sic["relaxation"]["volume_change_percent"] == pytest.approx(0.0, abs=1e-12)
    # the same force constants: the harmonic free-energy change is the DFT one exactly
    r, p = sic["reference"]["no_nac"], sic["prediction"]["no_nac"]
    assert p["omega_max_THz"] == pytest.approx(r["omega_max_THz"], rel=1e-8)


# ---------------------------------------------------------------------------------------------------------
# the QHA variant: a crystal whose quasi-harmonic G(T) is known independently
# ---------------------------------------------------------------------------------------------------------


class QuasiHarmonicDFT(Calculator):
    """One entry's DFT force constants at every volume, scaled so that every frequency goes as
    λ(v) = (v0/v)^γ (one Grüneisen parameter γ), plus the static energy e(v) = B (v - v0)² / (2 v0) per atom
    (v: volume per atom, v0 the DFT cell's). Its quasi-harmonic G(T) at P = 0 follows without any QHA code:
    a mode of frequency λω has F(λω, T) = λ F(ω, T/λ), so G(T) = min_v [e(v) + λ(v) F_DFT(T / λ(v))]."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, entry, gamma=1.5, bulk_modulus_GPa=120.0):
        super().__init__()
        self.ph = reference_phonopy(load_entry(entry))
        self.ph.produce_force_constants(calculate_full_force_constants=True, show_drift=False)
        self.ph.symmetrize_force_constants(show_drift=False)
        self.cell0 = np.array(self.ph.supercell.cell)
        self.frac0 = np.array(self.ph.supercell.scaled_positions)
        self.v0 = self.ph.unitcell.volume / len(self.ph.unitcell.numbers)
        self.gamma = gamma
        self.b = bulk_modulus_GPa / 160.21766208  # eV/Å^3

    def scale(self, v):
        return (self.v0 / v) ** self.gamma

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        n, cell = len(a), np.array(a.cell[:])
        v = a.get_volume() / n
        forces = np.zeros((n, 3))
        if n == len(self.frac0):  # a displaced supercell at some volume
            iso = (a.get_volume() / abs(np.linalg.det(self.cell0))) ** (1 / 3)
            assert np.allclose(cell, self.cell0 * iso, atol=1e-4), "not the entry's supercell, scaled"
            du = a.get_scaled_positions(wrap=False) - self.frac0
            du -= np.round(du)
            forces = -self.scale(v) ** 2 * np.einsum("ijab,jb->ia", self.ph.force_constants, du @ cell)
        pressure_term = self.b * (v - self.v0) / self.v0  # dE/dV: ASE's stress of a hydrostatic strain
        energy = n * 0.5 * self.b * (v - self.v0) ** 2 / self.v0
        self.results = {"energy": energy, "free_energy": energy, "forces": forces,
                        "stress": np.array([pressure_term] * 3 + [0.0] * 3)}

    def gibbs(self, temperature, mesh_numbers) -> float:
        """G(T) at P = 0 (eV/atom) by direct minimisation over v."""
        from phonopy.physical_units import get_physical_units
        from scipy.optimize import minimize_scalar

        self.ph.run_mesh(mesh_numbers, is_gamma_center=True)
        per_atom = get_physical_units().EvTokJmol * len(self.ph.primitive.numbers)

        def g(v):
            lam = self.scale(v)
            self.ph.run_thermal_properties(temperatures=[temperature / lam], exclude_gamma_acoustic=True)
            f = self.ph.thermal_properties.free_energy[0] / per_atom
            return 0.5 * self.b * (v - self.v0) ** 2 / self.v0 + lam * f

        best = minimize_scalar(g, bounds=(0.95 * self.v0, 1.12 * self.v0), method="bounded",
                               options={"xatol": 1e-7 * self.v0})
        return float(best.fun)


def test_qha_variant_matches_the_analytic_quasi_harmonic_crystal(tmp_path):
    entries_dir = _entries_dir()
    calc = QuasiHarmonicDFT(entries_dir / SIC)
    doc = run_phonondb([entries_dir / SIC], calc, tmp_path / "qha", progress=False, qha="-0.03:0.09:7")
    rec = json.loads((tmp_path / "qha" / "QuasiHarmonicDFT" / "entries" / f"{SIC}.json").read_text())
    qha = rec["prediction"]["qha"]
    assert qha["imaginary_volumes"] == 0 and qha["free_energy_monotonic"]
    expected = 1000 * (calc.gibbs(900.0, qha["mesh_numbers"]) - calc.gibbs(300.0, qha["mesh_numbers"]))
    got = qha["free_energy_change_300_900_meV_per_atom"]
    harmonic = rec["prediction"]["no_nac"]["free_energy_change_300_900_meV_per_atom"]
    # the harmonic change at V0 is the DFT's (the same force constants); the quasi-harmonic part (expansion
    # lowers G) is several meV/atom, and the workflow's EOS fits over 7 volumes find it to well under 1 %
    assert harmonic == pytest.approx(rec["reference"]["no_nac"]["free_energy_change_300_900_meV_per_atom"], rel=1e-6)
    assert expected - harmonic < -3.0
    assert got == pytest.approx(expected, abs=0.01 * abs(expected - harmonic))
    metrics = {m["key"]: m["value"] for m in doc["metrics"]}
    assert metrics["n_counted_qha"] == 1
    assert metrics["free_energy_change_qha_mae_meV_per_atom"] == pytest.approx(abs(got - harmonic), rel=1e-9)
    assert metrics["free_energy_change_qha_part_mean_meV_per_atom"] == pytest.approx(got - harmonic, rel=1e-9)
    assert "harmonic F(900 K) - F(300 K) at the DFT volume" in doc["definitions"]["free_energy_change_qha"]
    # the same QHA on top of a harmonic run's entry (harmonic_from): its results taken as they are, only the
    # QHA computed, the same number; a harmonic run at other settings (displacement) is not taken
    run_phonondb([entries_dir / SIC], calc, tmp_path / "harm", progress=False)
    harm_rec = json.loads((tmp_path / "harm" / "QuasiHarmonicDFT" / "entries" / f"{SIC}.json").read_text())
    reused = run_phonondb([entries_dir / SIC], calc, tmp_path / "reuse", progress=False, qha="-0.03:0.09:7",
                          harmonic_from=tmp_path / "harm")
    rec2 = json.loads((tmp_path / "reuse" / "QuasiHarmonicDFT" / "entries" / f"{SIC}.json").read_text())
    assert rec2["harmonic_from"]["key"] == harm_rec["key"] and rec2["key"] == rec["key"]
    assert "prediction" not in rec2["timings_s"] and rec2["timings_s"]["qha"] > 0
    assert rec2["reference"] == harm_rec["reference"] and rec2["relaxation"] == harm_rec["relaxation"]
    assert {k: v for k, v in rec2["prediction"].items() if k != "qha"} == harm_rec["prediction"]
    assert rec2["prediction"]["qha"]["free_energy_change_300_900_meV_per_atom"] == pytest.approx(got, rel=1e-9)
    assert {m["key"]: m["value"] for m in reused["metrics"]}["n_counted_qha"] == 1
    run_phonondb([entries_dir / SIC], calc, tmp_path / "harm2", progress=False, displacement=0.02)
    other = run_phonondb([entries_dir / SIC], calc, tmp_path / "reuse2", progress=False, qha="-0.03:0.09:7",
                         displacement=0.01, harmonic_from=tmp_path / "harm2")
    rec3 = json.loads((tmp_path / "reuse2" / "QuasiHarmonicDFT" / "entries" / f"{SIC}.json").read_text())
    assert other["n_done"] == 1 and "harmonic_from" not in rec3 and rec3["timings_s"]["prediction"] > 0
    with pytest.raises(InputError, match="with qha"):
        run_phonondb([entries_dir / SIC], calc, tmp_path / "x", harmonic_from=tmp_path / "harm")
    with pytest.raises(InputError, match="not a folder"):
        run_phonondb([entries_dir / SIC], calc, tmp_path / "x", qha="-0.03:0.09:7", harmonic_from=tmp_path / "none")
    # a QHA that fails (here: the model refuses every volume but the DFT cell's) keeps the harmonic results
    class FailsAwayFromV0(QuasiHarmonicDFT):
        def calculate(self, atoms=None, properties=None, system_changes=all_changes):
            if abs(atoms.get_volume() / len(atoms) - self.v0) > 1e-3 * self.v0:
                raise RuntimeError("out of range")
            super().calculate(atoms, properties, system_changes)

    failing = run_phonondb([entries_dir / SIC], FailsAwayFromV0(entries_dir / SIC), tmp_path / "fails", progress=False,
                           qha="-0.03:0.09:7")
    got = {m["key"]: m["value"] for m in failing["metrics"]}
    assert failing["n_done"] == 1 and got["n_counted_qha"] == 0 and got["n_qha_left_out_QHA_failed"] == 1
    assert got["omega_max_mae_THz"] == pytest.approx(0.0, abs=1e-6)
    # a model whose own phonons at V0 are unstable (the DFT force constants negated): the QHA is not run at
    # all (this calculator refuses every other volume, as above) and the entry is left out for that reason
    class UnstableAtV0(FailsAwayFromV0):
        def calculate(self, atoms=None, properties=None, system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            self.results["forces"] = -self.results["forces"]

    unstable = run_phonondb([entries_dir / SIC], UnstableAtV0(entries_dir / SIC), tmp_path / "unstable",
                            progress=False, qha="-0.03:0.09:7")
    rec = json.loads((tmp_path / "unstable" / "UnstableAtV0" / "entries" / f"{SIC}.json").read_text())
    assert rec["prediction"]["no_nac"]["imaginary_modes"] > 0
    assert rec["prediction"]["qha"] == {"skipped": "prediction imaginary modes at V0"}
    got = {m["key"]: m["value"] for m in unstable["metrics"]}
    assert got["n_counted_qha"] == 0 and got["n_qha_left_out_QHA_failed"] == 0
    assert got["n_qha_left_out_prediction_imaginary_modes_at_V0"] == 1
    # keyed apart from the harmonic run; not with at_dft_volume; a bad grid before any work
    plain = run_phonondb([entries_dir / SIC], HarmonicDFT([entries_dir / SIC]), tmp_path / "plain", progress=False)
    assert "free_energy_change_qha_mae_meV_per_atom" not in {m["key"] for m in plain["metrics"]}
    with pytest.raises(InputError, match="without at_dft_volume"):
        run_phonondb([entries_dir / SIC], calc, tmp_path / "x", qha="-0.03:0.09:7", at_dft_volume=True)
    with pytest.raises(InputError, match="qha"):
        run_phonondb([entries_dir / SIC], calc, tmp_path / "x", qha="-0.03:0.09")


def test_qha_selection_is_one_rule_for_skipped_and_computed_entries():
    """The QHA metric counts the entries of the harmonic one: an entry with imaginary modes in the reference
    or in the model's harmonic phonons at V0 is left out for that reason whether its QHA was skipped or (by an
    earlier version) computed; the QHA's own checks come after."""
    from benchmarks.phonondb import _qha_selection, _qha_skip_reason

    def rec(name, ref_imag, pred_imag, qha):
        return {"id": name, "status": "ok", "reference": {"no_nac": {"imaginary_modes": ref_imag}},
                "prediction": {"no_nac": {"imaginary_modes": pred_imag}, "qha": qha}}

    good = {"imaginary_volumes": 0, "free_energy_change_300_900_meV_per_atom": -100.0}
    records = [rec("ok", 0, 0, good),
               rec("ref", 3, 0, {"skipped": "reference imaginary modes"}),
               rec("ref-old", 2, 1, good),  # computed by an earlier version: the same reason
               rec("pred", 0, 4, {"skipped": "prediction imaginary modes at V0"}),
               rec("pred-old", 0, 1, good),
               rec("failed", 0, 0, {"error": "RuntimeError: x"}),
               rec("volume", 0, 0, {**good, "imaginary_volumes": 2}),
               rec("range", 0, 0, {**good, "free_energy_change_300_900_meV_per_atom": None}),
               {"id": "harmonic-only", "status": "ok", "prediction": {}},
               {"id": "failed-entry", "status": "failed"}]
    ok, reasons = _qha_selection(records)
    assert [r["id"] for r in ok] == ["ok"]
    assert reasons == {"reference imaginary modes": 2, "prediction imaginary modes at V0": 2, "QHA failed": 1,
                       "imaginary modes at a volume": 1, "volume outside the sampled range before 900 K": 1}
    assert _qha_skip_reason(records[2]["reference"], records[2]["prediction"]) == "reference imaginary modes"
    assert _qha_skip_reason(records[0]["reference"], records[0]["prediction"]) is None


def test_common_entries_of_the_qha_variant():
    """Runs of the QHA variant are ranked on the entries every model's QHA metric counts too: each model's
    QHA MAE over that intersection, by hand."""
    from benchmarks.phonondb import QUANTITIES, common_entry_metrics

    def rec(ref_imag, pred_imag, qha_value, ref_value=-100.0):
        side = {key: 1.0 for _, key, *_ in QUANTITIES}
        ref = {**side, "imaginary_modes": ref_imag, "free_energy_change_300_900_meV_per_atom": ref_value}
        pred = {**side, "imaginary_modes": pred_imag, "free_energy_change_300_900_meV_per_atom": -90.0}
        qha = ({"skipped": "x"} if qha_value is None else
               {"imaginary_volumes": 0, "free_energy_change_300_900_meV_per_atom": qha_value})
        return {"status": "ok", "has_born": False, "reference": {"no_nac": ref, "nac": ref},
                "prediction": {"no_nac": pred, "nac": pred, "qha": qha}}

    a = {"e1": rec(0, 0, -110.0), "e2": rec(0, 0, -120.0, -130.0), "e3": rec(0, 2, None), "e4": rec(1, 0, None)}
    b = {"e1": rec(0, 0, -105.0), "e2": rec(0, 3, None), "e3": rec(0, 0, -95.0), "e4": rec(1, 0, None)}
    common, metrics = common_entry_metrics({"a": a, "b": b})
    assert common["qha"] == ["e1"] and common["no_nac"] == ["e1"]
    got = {m: {x["key"]: x["value"] for x in metrics[m]} for m in ("a", "b")}
    assert got["a"]["free_energy_change_qha_mae_meV_per_atom"] == pytest.approx(10.0)
    assert got["b"]["free_energy_change_qha_mae_meV_per_atom"] == pytest.approx(5.0)
    assert got["a"]["n_counted_qha"] == got["b"]["n_counted_qha"] == 1
    # harmonic runs have no QHA entry set
    plain = {k: {**r, "prediction": {kk: v for kk, v in r["prediction"].items() if kk != "qha"}} for k, r in a.items()}
    assert "qha" not in common_entry_metrics({"a": plain, "b": plain})[0]
