"""LO-TO dispersion against the supercell size: phonopy's plain NAC and the dipole-tail completion.

    python -m benchmarks.nac_convergence [--model chgnet] [--charges dft|model] [--dims 2,3] [-o results.json]
                                         [--figure docs/figures/nac_convergence.png]

For PhononDB's 3C-SiC (mp-8062), MgO (mp-1265) and NaCl (mp-22862), the phonon workflow runs with the
model's force constants in 2x2x2 (64 atoms) and 3x3x3 (216 atoms) supercells of the conventional cell
(``--dims 3,4``: 216 and 512 atoms, for models whose own range exceeds the 64-atom cell),
with the DFT BORN file (``--charges dft``) or the charges predicted by ``mattersim-dielectric``
(``--charges model``), once with phonopy's plain NAC (``nac_range=None``) and once with the default
(``--nac-range``, default ``auto``: the dipole-dipole tail beyond the model's range added,
:mod:`workflows.dipole`);
both runs share the forces (``forces.npz``). The highest branch along Γ-X and Γ-L is compared between the
two supercells (largest change, THz) and checked for monotonicity where DFT's is (the DFT reference:
PhononDB's FORCE_SETS + BORN with phonopy's own NAC, 2x2x2). A figure shows the bands of both supercells
and DFT's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, parse_cases

CASES = {"3C-SiC": "mp-8062-20180417", "MgO": "mp-1265-20180417", "NaCl": "mp-22862-20180417"}
#: directions in reduced coordinates of the conventional cubic cell's reciprocal lattice
PATHS = {"Γ-X": (1.0, 0.0, 0.0), "Γ-L": (0.5, 0.5, 0.5)}
DIMS = (2, 3)
N_POINTS = 41
#: a branch counts as monotonic when it never rises by more than this between neighbouring points (THz)
MONOTONIC_TOL_THZ = 1e-3


def _entries() -> Path:
    return REPO.parent / "shared" / "data" / "phonondb" / "entries"


def highest_branch(ph, primitive_matrix) -> dict:
    """Highest frequency (THz) along each path, from just off Γ (the LO limit) to the zone boundary."""
    out = {}
    p = np.asarray(primitive_matrix, dtype=float)
    for name, end in PATHS.items():
        t = np.linspace(0.0, 1.0, N_POINTS)
        t[0] = 1e-4
        qs = np.array([x * (p.T @ np.asarray(end)) for x in t])
        ph.run_qpoints(qs)
        out[name] = np.asarray(ph.qpoints.frequencies)[:, -1].tolist()
    return out


def monotonic(values) -> bool:
    return bool(np.all(np.diff(np.asarray(values)) <= MONOTONIC_TOL_THZ))


def dft_reference(folder: Path) -> dict:
    import phonopy

    ref = phonopy.load(supercell_matrix=[2, 2, 2], primitive_matrix="F", unitcell_filename=str(folder / "POSCAR-unitcell"),
                       force_sets_filename=str(folder / "FORCE_SETS"), born_filename=str(folder / "BORN"), log_level=0)
    return highest_branch(ref, ref.primitive_matrix)


def run_case(name: str, folder: Path, calc, charges: str, work: Path, nac_range="auto", dims=DIMS) -> dict:
    from ase.io import read

    from workflows.phonon import run_phonon

    unit = read(folder / "POSCAR-unitcell", format="vasp")
    born = folder / "BORN" if charges == "dft" else None
    case = {"entry": folder.name, "dft": dft_reference(folder), "runs": {}}
    for dim in dims:
        for mode, setting in (("plain", None), ("completed", nac_range)):
            t0 = time.perf_counter()
            result = run_phonon(unit, calc, supercell=(dim, dim, dim), nac=True, born_file=born, nac_range=setting,
                                mesh=(4, 4, 4), output_dir=work / f"{name}-{dim}", progress=False)
            ph = result.phonopy
            case["runs"][f"{mode} {dim}"] = {
                "n_atoms": len(ph.supercell), "seconds": time.perf_counter() - t0,
                "bands": highest_branch(ph, ph.primitive_matrix),
                "dipole_tail": result.summary["nac"].get("dipole_tail"),
            }
    for mode in ("plain", "completed"):
        small, large = (case["runs"][f"{mode} {d}"]["bands"] for d in dims)
        case[mode] = {
            "max_change_THz": {p: float(np.abs(np.subtract(small[p], large[p])).max()) for p in PATHS},
            "monotonic_where_dft_is": {p: (not monotonic(case["dft"][p])) or (monotonic(small[p]) and monotonic(large[p]))
                                       for p in PATHS},
        }
    return case


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = report["cases"]
    fig, axes = plt.subplots(2, len(cases), figsize=(4.2 * len(cases), 6.4), sharex=True, squeeze=False)
    x = np.linspace(0, 1, N_POINTS)
    for col, (name, case) in enumerate(cases.items()):
        for row, mode in enumerate(("plain", "completed")):
            ax = axes[row][col]
            for p, style in zip(PATHS, ("-", "--")):
                ax.plot(x, case["dft"][p], "k" + style, lw=1.5, label=f"DFT {p}")
                for dim, color in zip(report["dims"], ("tab:blue", "tab:red")):
                    run = case["runs"][f"{mode} {dim}"]
                    ax.plot(x, run["bands"][p], style, color=color, lw=1.2, label=f"{run['n_atoms']} atoms {p}")
            change = max(case[mode]["max_change_THz"].values())
            sizes = " → ".join(str(case["runs"][f"{mode} {d}"]["n_atoms"]) for d in report["dims"])
            ax.set_title(f"{name}: {'phonopy plain NAC' if mode == 'plain' else 'dipole tail completed'}\n"
                         f"largest change {sizes} atoms: {change:.2f} THz", fontsize=9)
            ax.set_ylabel("highest branch (THz)")
            if row == 1:
                ax.set_xlabel("fraction of the path from Γ")
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"LO branch of {report['model']} force constants, Z* and ε∞ from {report['charges_source']}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Title": f"NAC convergence, {report['model']}"})
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="chgnet", help="potential for the force constants (default chgnet)")
    parser.add_argument("--charges", choices=("dft", "model"), default="dft",
                        help="Z* and eps_inf from PhononDB's BORN (dft) or from mattersim-dielectric (model)")
    parser.add_argument("--nac-range", default="auto", help="the window of the completed runs ('auto' or R_ON:R_OFF)")
    parser.add_argument("--dims", default=",".join(map(str, DIMS)),
                        help="the two supercells, n x n x n conventional cells (default 2,3: 64 and 216 atoms)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    parser.add_argument("-o", "--output", type=Path, default=None, help="write the report (json) here")
    parser.add_argument("--figure", type=Path, default=None, help="write the figure (PNG) here")
    args = parser.parse_args(argv)
    cases = parse_cases(parser, args.cases, CASES)
    try:
        dims = tuple(int(d) for d in args.dims.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 2 or not 1 <= dims[0] < dims[1]:
        parser.exit(2, f"{parser.prog}: error: --dims {args.dims!r}: give two growing sizes, e.g. 2,3 or 3,4\n")

    from mattersim.registry import load_calculator

    from mattersim.errors import MatterSimError

    model = args.model if args.charges == "dft" else f"{args.model}+mattersim-dielectric"
    try:
        calc = load_calculator(model)
    except MatterSimError as exc:  # an unknown model, weights that are not here, ...: one line
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    report = {"benchmark": "nac_convergence", "model": args.model, "charges": args.charges,
              "charges_source": "PhononDB BORN (DFT)" if args.charges == "dft" else "mattersim-dielectric",
              "nac_range": args.nac_range,
              "dims": list(dims), "supercells": [f"{d}x{d}x{d} conventional" for d in dims], "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            folder = _entries() / CASES[name]
            report["cases"][name] = case = run_case(name, folder, calc, args.charges, Path(tmp), args.nac_range, dims)
            sizes = "->".join(str(case["runs"][f"plain {d}"]["n_atoms"]) for d in dims)
            for mode in ("plain", "completed"):
                print(f"{name:7s} {mode:9s} change {sizes} atoms: "
                      + ", ".join(f"{p} {v:.3f} THz" for p, v in case[mode]["max_change_THz"].items())
                      + "; monotonic where DFT is: " + ", ".join(f"{p} {v}" for p, v in case[mode]["monotonic_where_dft_is"].items()),
                      flush=True)
    if args.figure is not None:
        plot(report, args.figure)
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=1))
    print(json.dumps({name: {m: case[m] for m in ("plain", "completed")} for name, case in report["cases"].items()}, indent=1))
    return report


if __name__ == "__main__":
    main()
