"""Delithiation MD case study of a Li-rich Mn oxide: trends of TM/O moments, O-O pairs and migration.

    python -m benchmarks.delithiation [--model chgnet] --work DIR [-o docs/reports/delithiation-li-rich]
    python -m benchmarks.delithiation --full --work DIR --device cuda        (the full protocol, for a GPU)

Reduced protocol (default, for a 2-core CPU): the LiCoO2-templated cell 2x2x1 (48 atoms) with 2 of its 12 TM
sites replaced by Li (Li14Mn10O24, x = 1.17), relaxed, 0.2 ps of NVT at 1000 K (Nosé-Hoover chain, 1 fs),
then one Li removed at random every 0.2 ps until x = 0, held 8 ps at x = 0 (O-O pairing and Mn migration are
slow and happen at low x), a snapshot analysed every 20 steps (11 ps in all).

Full protocol (``--full``): 5x4x2 (480 atoms), 24 substitutions (Li1.2Mn0.8O2), 1000 K, 1 fs, 5 ps of
equilibration, one Li every 5 ps until x = 0 (144 removals, about 725 ps), held 175 ps at x = 0 (about
900 ps in all), a snapshot every 100 steps.

Reported (``delithiation_case.json`` in ``-o``, with the run's own ``delithiation.json``, csv and plots
copied there): the protocol, the first and last values of the tracked quantities, the largest O-O pair
counts, migrated TMs, throughput in atom-steps/s of the MD alone and with the analysis, and the analysis
share of the time (goal of issue 19: under 5 %).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from benchmarks.common import software_versions, utc_now, write_report

REDUCED = dict(supercell="2 2 1", li_excess=2, remove_every=0.2, equilibrate=0.2, hold=8.0, every=20)
FULL = dict(supercell="5 4 2", li_excess=24, remove_every=5.0, equilibrate=5.0, hold=175.0, every=100)


def run(model: str, work: Path, full: bool, device: str = "cpu", progress: bool = True) -> dict:
    from mattersim.registry import load_calculator
    from workflows.delithiation import build_li_rich, run_delithiation

    p = FULL if full else REDUCED
    calc = load_calculator(model, device=device)
    cell, info = build_li_rich(tm="Mn", supercell=p["supercell"], li_excess=p["li_excess"], seed=0)
    result = run_delithiation(cell, calc, temperature=1000.0, timestep=1.0, remove_every=p["remove_every"],
                              equilibrate=p["equilibrate"], hold=p["hold"], remove=1, select="random", until=0.0,
                              seed=0, every=p["every"], output_dir=work, progress=progress)
    s, res = result.series, result.summary["results"]

    def ends(name):
        col = s[name][np.isfinite(s[name])]
        return [float(col[0]), float(col[-1])] if len(col) else None

    def first(name):  # when a pair or a migrated TM is first seen (ps), None if never
        seen = np.flatnonzero(s[name] > 0)
        return float(s["time_ps"][seen[0]]) if len(seen) else None

    md_s, an_s = res["md_wall_s"], res["analysis_wall_s"]
    atom_steps = res["atom_steps_per_s"] * md_s
    return {
        "created": utc_now(), "software": software_versions(), "model": model, "device": device,
        "protocol": {**p, "temperature_K": 1000.0, "timestep_fs": 1.0, "select": "random", "until_x": 0.0,
                     "cell": info["formula"], "natoms": info["natoms"]},
        "x_start_end": [res["x_start"], res["x_end"]], "li_removed": res["li_removed"], "time_ps": res["time_ps"],
        "tm_moment_mean_uB_start_end": ends("tm_moment_mean_uB"),
        "tm_oxidation_mean_start_end": ends("tm_oxidation_mean"),
        "o_moment_mean_uB_start_end": ends("o_moment_mean_uB"),
        "o_moment_max_uB_start_end": ends("o_moment_max_uB"),
        "o_o_shortest_A_start_end": ends("o_o_shortest_A"),
        "o_o_shortest_A_mean_lithiated_vs_x0": [float(np.nanmean(s["o_o_shortest_A"][s["x"] >= res["x_start"] - 1e-9])),
                                                float(np.nanmean(s["o_o_shortest_A"][s["x"] <= 1e-9]))],
        "o_o_shortest_A_min": float(np.nanmin(s["o_o_shortest_A"])),
        "first_time_ps": {k: first(k) for k in ("peroxo", "superoxo", "O2", "migrated_tm", "migrated_tetrahedral")},
        "max_counts": {k: int(np.nanmax(s[k])) for k in ("O2", "superoxo", "peroxo", "migrated_tm",
                                                          "migrated_tetrahedral")},
        "end_counts": {k: int(s[k][-1]) for k in ("O2", "superoxo", "peroxo", "migrated_tm")},
        "atom_steps_per_s_md": atom_steps / md_s, "atom_steps_per_s_with_analysis": atom_steps / (md_s + an_s),
        "analysis_share": res["analysis_share"], "goal_analysis_share_below": 0.05, "notes": res["notes"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="chgnet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = run(args.model, args.work, args.full, args.device, not args.no_progress)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        for name in ("delithiation.json", "delithiation.csv", "delithiation_vs_x.png", "delithiation_vs_time.png"):
            if (args.work / name).exists():
                shutil.copy(args.work / name, args.output / name)
        (args.output / "delithiation_case.json").write_text(json.dumps(report, indent=2))
    write_report(report, None)


if __name__ == "__main__":
    main()
