"""The phonon workflow against the tools a user would otherwise pick, with the same potential and settings.

    python -m benchmarks.speed_phonon [--models chgnet,sevennet-0] [--cases Si,3C-SiC,MgO,BaTiO3]
                                      [--device cpu] [-o results.json]

For each crystal and potential, in one process, side by side (each tool twice, alternated; the faster run
of each is kept):

- **mattersim**: ``run_phonon`` (batched force evaluation, symmetry-keeping relaxation, all its outputs
  written: phonopy.yaml, band.yaml, DOS, thermal properties, plots, summary.json);
- **matcalc**: ``matcalc.PhononCalc`` (0.7; its FIRE relaxation with a Frechet cell filter, one ASE call
  per displaced supercell, its own mesh and thermal properties, phonon.yaml), then the band structure
  along the same path;
- **phonopy by hand**: the loop a user writes: ASE FIRE + FrechetCellFilter relaxation, ``Phonopy``,
  ``generate_displacements``, one ``atoms.get_forces()`` per supercell, ``produce_force_constants``,
  band structure, 20x20x20 mesh, total DOS, thermal properties, ``phonopy.yaml``.

Same settings for all three: the crystal's primitive cell as the unit cell, the supercell matrix that
``run_phonon`` chooses (minimum image distance >= max(10 Å, 2 x cutoff)), 0.01 Å displacements, relaxation
of positions and cell to 1e-3 eV/Å, thermal properties 0-1000 K in 10 K steps, the DFT BORN file of
PhononDB for 3C-SiC (NAC). Times are split into relaxation, force evaluation and post-processing; the
outputs are compared at the band path's q-points (largest |Δf| against mattersim, THz, as each tool gives
them and with the peers' force constants given the same acoustic-sum-rule symmetrisation that run_phonon
applies; what remains comes from the three relaxed structures, reported as lattice lengths).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk

from benchmarks.common import REPO, parse_cases, software_versions, utc_now
from workflows.cells import to_phonopy_atoms

FMAX = 1e-3  # tight enough that the three relaxations agree (the bands then agree within 0.01 THz)
DISPLACEMENT = 0.01
MESH = (20, 20, 20)
RELAX_STEPS = 500
SIC_BORN = REPO.parent / "shared" / "data" / "phonondb" / "entries" / "mp-8062-20180417" / "BORN"


def batio3_tetragonal() -> Atoms:
    a, c = 3.99, 4.04
    return Atoms("BaTiO3", cell=[a, a, c],
                 scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.515], [0.5, 0.5, -0.025], [0.5, 0, 0.485], [0, 0.5, 0.485]],
                 pbc=True)


CASES = {
    "Si": (lambda: bulk("Si", "diamond", a=5.43), None),
    "3C-SiC": (lambda: bulk("SiC", "zincblende", a=4.36), SIC_BORN),
    "MgO": (lambda: bulk("MgO", "rocksalt", a=4.21), None),
    "BaTiO3": (batio3_tetragonal, None),
}


def _nac(ph, born):
    if born is None:
        return
    from phonopy.file_IO import parse_BORN

    from workflows.nac import default_nac_factor

    params = parse_BORN(ph.primitive, filename=str(born))
    params.setdefault("factor", default_nac_factor())
    ph.nac_params = params


def _ase_relax(atoms, calc):
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    atoms = atoms.copy()
    atoms.calc = calc
    opt = FIRE(FrechetCellFilter(atoms), logfile=None)
    opt.run(fmax=FMAX, steps=RELAX_STEPS)
    return atoms, opt.nsteps


def _post(ph, path, work: Path) -> None:
    """What the peers' users run after the forces: band structure, mesh, DOS, thermal properties, yaml."""
    ph.run_band_structure(path["qpoints"], path_connections=path["connections"], labels=path["labels"])
    ph.run_mesh(MESH, is_gamma_center=True)
    ph.run_total_dos()
    ph.run_thermal_properties(t_min=0, t_max=1000, t_step=10)
    ph.save(str(work / "phonopy.yaml"))


def run_mattersim(atoms, calc, smat, born, work: Path) -> dict:
    from workflows.phonon import run_phonon

    t0 = time.perf_counter()
    res = run_phonon(atoms, calc, fmax=FMAX, supercell=smat, primitive=None, displacement=DISPLACEMENT, mesh=MESH,
                     born_file=born, output_dir=work, progress=False)
    total = time.perf_counter() - t0
    t = res.summary["timings_s"]
    return {"phonopy": res.phonopy, "relaxation": t["relaxation"], "force_evaluation": t["force_evaluation"],
            "post_processing": total - t["relaxation"] - t["force_evaluation"], "total": total,
            "relaxation_steps": (res.summary.get("relaxation") or {}).get("steps"),
            "cell": np.array(res.phonopy.unitcell.cell)}


def run_by_hand(atoms, calc, smat, born, work: Path, path) -> dict:
    from phonopy import Phonopy

    t0 = time.perf_counter()
    relaxed, steps = _ase_relax(atoms, calc)
    t1 = time.perf_counter()
    ph = Phonopy(to_phonopy_atoms(relaxed), supercell_matrix=smat, primitive_matrix=None)
    ph.generate_displacements(distance=DISPLACEMENT)
    forces = []
    for sc in ph.supercells_with_displacements:
        a = Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
        a.calc = calc
        forces.append(a.get_forces().copy())
    t2 = time.perf_counter()
    ph.forces = forces
    ph.produce_force_constants()
    _nac(ph, born)
    _post(ph, path, work)
    t3 = time.perf_counter()
    return {"phonopy": ph, "relaxation": t1 - t0, "force_evaluation": t2 - t1, "post_processing": t3 - t2,
            "total": t3 - t0, "relaxation_steps": steps, "cell": np.array(relaxed.cell)}


def run_matcalc(atoms, calc, smat, born, work: Path, path) -> dict:
    import matcalc

    import matcalc._phonon as mp

    timing = {"force_evaluation": 0.0}
    original = mp.run_pes_calc

    def timed(structure, calculator, **kw):  # the per-supercell force calls (relaxation steps excluded)
        t = time.perf_counter()
        out = original(structure, calculator, **kw)
        timing["force_evaluation"] += time.perf_counter() - t
        return out

    mp.run_pes_calc = timed
    try:
        calc_obj = matcalc.PhononCalc(calc, atom_disp=DISPLACEMENT, supercell_matrix=smat, fmax=FMAX, max_steps=RELAX_STEPS,
                                      relax_structure=True, write_phonon=str(work / "phonon.yaml"))
        t0 = time.perf_counter()
        relax_t = {}
        original_relax = calc_obj._relax_structure

        def timed_relax(structure):
            t = time.perf_counter()
            out = original_relax(structure)
            relax_t["s"] = time.perf_counter() - t
            return out

        calc_obj._relax_structure = timed_relax
        out = calc_obj.calc(atoms)
        ph = out["phonon"]
        _nac(ph, born)
        ph.run_band_structure(path["qpoints"], path_connections=path["connections"], labels=path["labels"])
        total = time.perf_counter() - t0
    finally:
        mp.run_pes_calc = original
    relaxed = out["final_structure"]
    return {"phonopy": ph, "relaxation": relax_t.get("s", 0.0), "force_evaluation": timing["force_evaluation"],
            "post_processing": total - relax_t.get("s", 0.0) - timing["force_evaluation"], "total": total,
            "relaxation_steps": None, "cell": np.array(relaxed.lattice.matrix)}


def _band_frequencies(ph, qpoints, symmetrize: bool = False) -> np.ndarray:
    """Frequencies at ``qpoints``; ``symmetrize``: on a copy of the force constants with phonopy's
    translational symmetrisation, which run_phonon applies and the peers do not (comparison only)."""
    if symmetrize:
        fc = ph.force_constants.copy()
        ph.symmetrize_force_constants()
    ph.run_qpoints(qpoints)
    out = np.asarray(ph.qpoints.frequencies, dtype=float)
    if symmetrize:
        ph.force_constants = fc
    return out


def _tools() -> tuple[str, ...]:
    try:
        import matcalc  # noqa: F401
    except ImportError:
        print("matcalc is not installed (pip install 'mattersim[peers]' or matcalc==0.7.0): compared with "
              "phonopy by hand only", flush=True)
        return ("mattersim", "phonopy_by_hand")
    return ("mattersim", "matcalc", "phonopy_by_hand")


def run(models, cases, repeats: int = 2, device: str = "cpu") -> dict:
    from phonopy import Phonopy
    from phonopy.structure.symmetry import Symmetry

    from mattersim.registry import load_calculator
    from workflows.phonon import DEFAULT_MIN_LENGTH_A, auto_supercell, band_path, model_cutoff

    tools = _tools()
    report = {"benchmark": "speed_phonon", "date": utc_now(), "device": device, "software": software_versions(),
              "settings": {"fmax_eV_per_A": FMAX, "displacement_A": DISPLACEMENT, "mesh": MESH, "repeats": repeats},
              "results": {}}
    for model in models:
        calc = load_calculator(model, device=device)
        cutoff = model_cutoff(calc)[0]
        for name in cases:
            build, born = CASES[name]
            atoms = build()
            rotations = Symmetry(to_phonopy_atoms(atoms)).symmetry_operations["rotations"]
            smat = auto_supercell(atoms.cell[:], max(DEFAULT_MIN_LENGTH_A, 2 * cutoff), rotations).tolist()
            path = band_path(Phonopy(to_phonopy_atoms(atoms), supercell_matrix=smat, primitive_matrix=None).primitive)
            qpoints = np.concatenate([np.asarray(q) for q in path["qpoints"]])
            best: dict = {}
            for _ in range(repeats):
                for tool in tools:
                    with tempfile.TemporaryDirectory() as tmp:
                        work = Path(tmp)
                        if tool == "mattersim":
                            r = run_mattersim(atoms, calc, smat, born, work)
                        elif tool == "matcalc":
                            r = run_matcalc(atoms, calc, smat, born, work, path)
                        else:
                            r = run_by_hand(atoms, calc, smat, born, work, path)
                    if tool not in best or r["total"] < best[tool]["total"]:
                        best[tool] = r
            ref = _band_frequencies(best["mattersim"]["phonopy"], qpoints)
            row = {"supercell_matrix": smat, "supercell_atoms": len(best["mattersim"]["phonopy"].supercell),
                   "nac": born is not None, "tools": {}}
            for tool, r in best.items():
                f = _band_frequencies(r["phonopy"], qpoints)
                row["tools"][tool] = {
                    **{k: round(float(r[k]), 3) for k in ("relaxation", "force_evaluation", "post_processing", "total")},
                    "relaxation_steps": r["relaxation_steps"],
                    "lattice_lengths_A": np.round(np.linalg.norm(r["cell"], axis=1), 5).tolist(),
                    "band_max_abs_diff_vs_mattersim_THz": float(np.abs(f - ref).max()),
                    "band_max_abs_diff_vs_mattersim_same_asr_THz":
                        float(np.abs(_band_frequencies(r["phonopy"], qpoints, symmetrize=tool != "mattersim") - ref).max()),
                }
            peers = [t for t in row["tools"] if t != "mattersim"]
            fastest = min(peers, key=lambda t: row["tools"][t]["total"])
            row["fastest_peer"] = fastest
            row["speedup_vs_fastest_peer"] = row["tools"][fastest]["total"] / row["tools"]["mattersim"]["total"]
            report["results"][f"{model}/{name}"] = row
            print(json.dumps({f"{model}/{name}": {t: {k: v for k, v in d.items() if k in ("relaxation", "force_evaluation", "post_processing", "total", "band_max_abs_diff_vs_mattersim_THz")}
                                                    for t, d in row["tools"].items()}}), flush=True)
            print(f"{model}/{name}: mattersim {row['speedup_vs_fastest_peer']:.2f}x faster than {fastest}", flush=True)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="chgnet,sevennet-0")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args(argv)
    from mattersim.errors import MatterSimError

    try:
        report = run(args.models.split(","), parse_cases(parser, args.cases, CASES), args.repeats, args.device)
    except MatterSimError as exc:  # an unknown model, weights that are not here, ...: one line
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    text = json.dumps(report, indent=1)
    if args.output:
        args.output.write_text(text)
    print(json.dumps({k: {"speedup_vs_fastest_peer": v["speedup_vs_fastest_peer"], "fastest_peer": v["fastest_peer"]}
                      for k, v in report["results"].items()}, indent=1))


if __name__ == "__main__":
    main()
