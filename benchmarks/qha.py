"""QHA benchmarks: thermal expansion and bulk modulus against experiment and DFT, the MgO B1-B2 boundary,
and speed against matcalc's ``QHACalc``.

    python -m benchmarks.qha [--cases al,si,mgo,speed] [--models sevennet-0,chgnet] [-o results.json]

- ``al``, ``si``: :func:`workflows.qha.run_qha` on fcc Al and diamond Si (automatic supercell, 20x20x20
  mesh, volumes -4 % to +8 %): volumetric and linear alpha(300 K) and B_T(300 K), next to experiment
  (linear alpha: Al 23.1e-6 /K, Si 2.6e-6 /K; B: Al 76 GPa, Si 98 GPa) and, for Al, the DFT (PBE) QHA of
  phonopy's Al-QHA example replayed through :func:`workflows.qha.qha_from_files` (alpha_V 7.345e-5 /K,
  B_T 68.59 GPa at 300 K). CHGNet shows the warnings (its Al phonons are not smooth in volume).
- ``mgo``: MgO B1 (rock salt) and B2 (CsCl) with volumes from -45 % to -15 % of each phase's V0 and
  pressures 300-700 GPa: the boundary P(T) from 0 to 3000 K, its slope dP/dT, and the static transition
  pressure, next to the static PBE value from the literature (about 500 GPa).
- ``speed``: matcalc 0.7 ``QHACalc`` and ``run_qha`` on Al with the same calculator, the same linear scale
  factors (0.99-1.03, 5 volumes), the same supercell (4x4x4 primitive), displacement 0.01 Å, fmax 1e-3 eV/Å
  and temperatures, side by side in one process: wall times and their ratio, alpha(300 K) and B(300 K) of
  each (issue 15's goal: ours at least 2x faster, relaxed at each volume as both are).

Each case prints one line per result and everything goes to ``-o`` (JSON).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks.common import parse_cases, peak_rss_mib, software_versions, utc_now, write_report

CASES = ("al", "si", "mgo", "speed")
EXPERIMENT = {"Al": {"linear_alpha_300K_per_K": 23.1e-6, "bulk_modulus_GPa": 76.0},
              "Si": {"linear_alpha_300K_per_K": 2.6e-6, "bulk_modulus_GPa": 98.0}}
DFT_AL = {"source": "phonopy Al-QHA example (VASP PBE), replayed", "alpha_V_300K_per_K": 7.345e-5, "B_T_300K_GPa": 68.59}
STATIC_PBE_MGO_B1_B2_GPA = 500.0


def _structures():
    from ase.build import bulk

    mgo_b2 = bulk("MgO", "cesiumchloride", a=2.65)
    return {"Al": bulk("Al", "fcc", a=4.04), "Si": bulk("Si", "diamond", a=5.43),
            "MgO-B1": bulk("MgO", "rocksalt", a=4.21), "MgO-B2": mgo_b2}


def _headline(result, label=None) -> dict:
    out = {"warnings": result.phase(label)["warnings"]}
    try:
        a = result.value_at("thermal_expansion_per_K", 300.0, label)
        out.update({"alpha_V_300K_per_K": a, "linear_alpha_300K_per_K": a / 3.0,
                    "B_T_300K_GPa": result.value_at("bulk_modulus_GPa", 300.0, label)})
    except Exception as exc:  # the curves stopped below 300 K: say so
        out["error"] = str(exc)
    return out


def run_crystal(name: str, model: str, device: str, out_root: Path) -> dict:
    from mattersim.registry import load_calculator
    from workflows.qha import run_qha

    calc = load_calculator(model, device=device)
    t0 = time.perf_counter()
    res = run_qha(_structures()[name], calc, volumes="-0.04:0.08:13", output_dir=out_root / f"{name}-{model}",
                  progress=False)
    row = {"crystal": name, "model": model, "wall_s": time.perf_counter() - t0, **_headline(res),
           "experiment": EXPERIMENT[name]}
    if name == "Al":
        row["dft_qha"] = DFT_AL
    print(f"{name} {model}: linear alpha(300 K) {row.get('linear_alpha_300K_per_K', float('nan')):.3e} /K "
          f"(exp {EXPERIMENT[name]['linear_alpha_300K_per_K']:.2e}), B_T(300 K) {row.get('B_T_300K_GPa', float('nan')):.1f} GPa "
          f"(exp {EXPERIMENT[name]['bulk_modulus_GPa']:g}); {len(row['warnings'])} warning(s); {row['wall_s']:.0f} s", flush=True)
    for w in row["warnings"]:
        print(f"    WARNING {w[:200]}", flush=True)
    return row


def run_mgo(model: str, device: str, out_root: Path) -> dict:
    from mattersim.registry import load_calculator
    from workflows.qha import run_qha

    calc = load_calculator(model, device=device)
    s = _structures()
    t0 = time.perf_counter()
    res = run_qha([s["MgO-B1"], s["MgO-B2"]], calc, labels=["B1", "B2"], volumes="-0.45:-0.15:11",
                  pressures="300:700:25", tmax=3000.0, tstep=50.0, output_dir=out_root / f"mgo-{model}", progress=False)
    (b,) = res.summary["phase_boundaries"]
    p = np.array([np.nan if x is None else x for x in b["pressure_GPa"]], dtype=float)
    t = np.array(b["temperatures_K"], dtype=float)
    row = {"model": model, "wall_s": time.perf_counter() - t0, "static_transition_GPa": b["static_transition_pressure_GPa"],
           "static_pbe_literature_GPa": STATIC_PBE_MGO_B1_B2_GPA, "slope_GPa_per_K": b["slope_GPa_per_K"],
           "boundary": {"T_K": t.tolist(), "P_GPa": [None if not np.isfinite(x) else float(x) for x in p]},
           "warnings": {lab: res.phase(lab)["warnings"] for lab in ("B1", "B2")}}
    at = {temp: (float(np.interp(temp, t, p)) if np.isfinite(p).any() else None) for temp in (300.0, 1500.0, 3000.0)}
    row["P_at_K"] = at
    print(f"MgO B1-B2 {model}: static {row['static_transition_GPa']} GPa (PBE literature ~{STATIC_PBE_MGO_B1_B2_GPA:g}), "
          f"P(300/1500/3000 K) {at}, dP/dT {row['slope_GPa_per_K']} GPa/K; {row['wall_s']:.0f} s", flush=True)
    return row


def run_speed(model: str, device: str, out_root: Path) -> dict:
    from matcalc import QHACalc

    from mattersim.registry import load_calculator
    from workflows.qha import run_qha

    calc = load_calculator(model, device=device)
    al = _structures()["Al"]
    factors = [0.99, 1.0, 1.01, 1.02, 1.03]
    smat = np.diag([4, 4, 4])
    common = {"fmax": 1e-3, "t_max": 600.0, "t_step": 10.0}
    # warm-up of both paths (model compilation, first calls), outside the timing
    run_qha(al, calc, strains=[f - 1 for f in factors], supercell=smat, mesh=[9, 9, 9], tmax=100.0, fmax=common["fmax"],
            progress=False)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_qha(al, calc, strains=[f - 1 for f in factors], supercell=smat, displacement=0.01, mesh=[20, 20, 20],
                       tmax=common["t_max"], tstep=common["t_step"], fmax=common["fmax"], output_dir=Path(tmp) / "q",
                       progress=False)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = QHACalc(calc, scale_factors=factors, fmax=common["fmax"], t_max=common["t_max"], t_step=common["t_step"],
                       phonon_calc_kwargs={"supercell_matrix": smat, "atom_disp": 0.01, "min_length": None,
                                           "write_phonon": False}).calc(al.copy())
    t_peer = time.perf_counter() - t0
    temps = np.asarray(peer["temperatures"])
    i = int(np.argmin(np.abs(temps - 300.0)))
    row = {"model": model, "time_mattersim_s": t_ours, "time_matcalc_s": t_peer, "ratio_matcalc_over_mattersim": t_peer / t_ours,
           "mattersim": _headline(ours), "matcalc": {"alpha_V_300K_per_K": float(peer["thermal_expansion_coefficients"][i]),
                                                    "B_T_300K_GPa": float(peer["bulk_modulus_P"][i])},
           "settings": {"scale_factors": factors, "supercell": smat.tolist(), **common}}
    print(f"speed {model} (Al, 5 volumes, 4x4x4): mattersim {t_ours:.1f} s, matcalc {t_peer:.1f} s, ratio {t_peer / t_ours:.2f}; "
          f"alpha_V(300 K) {row['mattersim'].get('alpha_V_300K_per_K')} vs {row['matcalc']['alpha_V_300K_per_K']}, "
          f"B_T {row['mattersim'].get('B_T_300K_GPa')} vs {row['matcalc']['B_T_300K_GPa']} GPa", flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="al,si,mgo,speed")
    parser.add_argument("--models", default="sevennet-0,chgnet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("qha-benchmark"), help="folder for the runs (resumable)")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args(argv)
    cases = parse_cases(parser, args.cases, CASES)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    report = {"date": utc_now(), "software": software_versions(), "results": {c: [] for c in cases}}
    for case in cases:
        for model in models:
            if case in ("al", "si"):
                report["results"][case].append(run_crystal(case.capitalize(), model, args.device, args.work))
            elif case == "mgo" and model == models[0]:
                report["results"][case].append(run_mgo(model, args.device, args.work))
            elif case == "speed" and model == models[0]:
                report["results"][case].append(run_speed(model, args.device, args.work))
    report["peak_rss_mib"] = peak_rss_mib()
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
