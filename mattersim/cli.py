"""The ``mattersim`` command line.

Commands: ``models`` (what is installed/cached), ``predict`` (energies, forces, stresses of structure
files), ``relax`` (batched relaxations with a summary), ``phonon`` (harmonic phonons with phonopy,
:mod:`workflows.phonon`), ``train`` / ``finetune`` (:mod:`mattersim.training`) and ``bench run`` /
``bench report`` (:mod:`benchmarks`). Heavy modules (torch, the model registry, ASE optimizers) are
imported inside the commands, so ``mattersim --help`` stays fast.

Every :class:`~mattersim.errors.MatterSimError` (a bad file, an unknown model, ...) is printed as one red
``Error: ...`` line on stderr and the command exits with code 2; a relaxation that did not converge exits
with code 1.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperGroup

from mattersim import __version__
from mattersim.errors import InputError, MatterSimError

#: the --model help of every command
MODEL_HELP = ("Model name (see 'mattersim models'), A+B (a potential plus a property model) or checkpoint path. "
              "Default: the best available offline, in this order: mattersim-v1.0.0-5M, mattersim-v1.0.0-1M "
              "(once downloaded), sevennet-0, chgnet; plus +mattersim-dielectric (Z*, eps_inf) when installed.")
#: the --allow-untrained-elements help of every command that loads a model
ALLOW_UNTRAINED_HELP = ("Run the model on elements it was not trained on (a warning instead of an error) where it can; "
                        "its results for them are an extrapolation.")
WORKERS_HELP = ("Run the independent tasks on N local Dask worker processes (each loads the model once); default: "
                "in this process. See docs/dask.md.")
SCHEDULER_HELP = "Run the independent tasks on an existing Dask cluster: its scheduler address (tcp://host:8786)."
EXIT_USER_ERROR = 2
EXIT_NOT_CONVERGED = 1


def _stderr_console():
    from mattersim.io import console

    return console(stderr=True, soft_wrap=True, highlight=False)


def _stdout_console():
    from mattersim.io import console

    return console(highlight=False)


def print_error(message: str) -> None:
    """One red ``Error: ...`` line on stderr (plain text when stderr is not a terminal)."""
    _stderr_console().print(f"Error: {message}", style="bold red", markup=False)


def print_warning(message: str) -> None:
    """One yellow ``Warning: ...`` line on stderr (plain text when stderr is not a terminal)."""
    _stderr_console().print(f"Warning: {message}", style="yellow", markup=False)


def _plain_metavar(param, ctx) -> str:
    """A help-text placeholder in the usual CLI style (``PATH``, ``INTEGER``, ``[a|b]``), for typer's
    Python-type labels (``<list[Path]>``, ``<str>``); empty for on/off flags."""
    if getattr(param, "is_flag", False):
        return ""
    try:
        label = param.display_type(ctx).strip("<>")
    except Exception:  # pragma: no cover - a parameter type typer cannot describe
        return "VALUE"
    many = label.startswith("list[")
    label = label[5:-1] if many else label
    if "|" in label:
        text = f"[{label}]"
    else:
        text = {"str": "TEXT", "int": "INTEGER", "float": "NUMBER", "bool": "BOOLEAN"}.get(label, label.upper())
        if text in ("PATH", "FILE", "DIRECTORY"):
            text = "PATH"
    return text + ("..." if many and not text.endswith("...") else "")


def _tidy_help(command, ctx) -> None:
    if not hasattr(command, "get_params"):
        return
    for param in command.get_params(ctx):
        if getattr(param, "param_type_name", "") == "argument":
            # the name column says it (FILES...); no type column
            if param.metavar is None:
                param.metavar = param.name.upper()  # typer adds "..." for several
            param.display_type_rich = lambda ctx=None: None
        elif param.name == "help" or getattr(param, "is_flag", False):
            param.metavar = ""
        elif param.metavar is None:
            param.metavar = _plain_metavar(param, ctx)
            if param.metavar.startswith("[") and len(param.metavar) > 16:
                # a long list of choices would squeeze the option names at 80 columns: name it, list it in the help
                choices = param.metavar.strip("[]").split("|")
                param.metavar = param.name.upper()
                param.help = f"{param.help or ''} One of: {', '.join(choices)}.".strip()


class _ErrorHandlingGroup(TyperGroup):
    """Turns :class:`MatterSimError` raised by any command into one line and exit code 2; gives help texts
    plain placeholders (``PATH``, ``INTEGER``) instead of typer's Python types."""

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _tidy_help(command, ctx)
        return command

    def main(self, *args, **kwargs):
        # typer's own help and usage errors: escape codes only on a terminal (typer forces them wherever
        # FORCE_COLOR, PY_COLORS or GITHUB_ACTIONS is set, into files and pipes too)
        try:
            from typer import rich_utils
        except ImportError:  # pragma: no cover - typer without rich
            return super().main(*args, **kwargs)
        saved = rich_utils.FORCE_TERMINAL
        from mattersim.io import terminal_flag

        if terminal_flag(sys.stdout) is False or terminal_flag(sys.stderr) is False:
            rich_utils.FORCE_TERMINAL = False
        try:
            return super().main(*args, **kwargs)
        finally:
            rich_utils.FORCE_TERMINAL = saved

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MatterSimError as exc:
            print_error(str(exc))
            sys.exit(EXIT_USER_ERROR)


app = typer.Typer(
    cls=_ErrorHandlingGroup,
    name="mattersim",
    help="MatterSim: a universal machine-learning interatomic potential for materials.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mattersim {__version__}")
        raise typer.Exit()


@app.callback()
def _main_callback(
    version: bool = typer.Option(
        False, "--version", "-V", help="Show the version and exit.", callback=_version_callback, is_eager=True
    ),
) -> None:
    """MatterSim: a universal machine-learning interatomic potential for materials."""


# ---------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------


def _load_calculator(model: Optional[str], device: str, float64: bool, trust_pickle: bool = False):
    from mattersim import registry

    return registry.load_calculator(model, device=device, dtype="float64" if float64 else "float32", trust_pickle=trust_pickle)


def _runner_and_spec(workers: Optional[int], scheduler: Optional[str], model: Optional[str], device: str, float64: bool,
                     trust_pickle: bool = False, allow_untrained_elements: bool = False):
    """The TaskRunner of --workers/--scheduler and the model spec its workers load (None in this process)."""
    from mattersim import registry
    from mattersim.distributed import ModelSpec, TaskRunner

    runner = TaskRunner(workers=workers, scheduler=scheduler)
    if not runner.distributed:
        return runner, None
    return runner, ModelSpec(model=str(model or registry.default_model()), device=device,
                             dtype="float64" if float64 else "float32", trust_pickle=trust_pickle,
                             allow_untrained_elements=allow_untrained_elements)


def _model_info(calc) -> dict[str, Any]:
    from mattersim.calculator import model_info

    return model_info(calc)


def _max_z(calc) -> int:
    potential = getattr(calc, "potential", None)
    return int(getattr(potential, "max_z", 94) or 94)


def _check_trained_elements(calc, structures, allow: bool, properties: bool = True) -> None:
    """Before any work: an element the model was not trained on is one error line, or with
    --allow-untrained-elements one warning line per model (see mattersim.registry.check_trained_elements)."""
    from mattersim.registry import check_trained_elements

    for message in check_trained_elements(calc, [a for _, a in structures], labels=[label for label, _ in structures],
                                          properties=properties, allow=allow, warn=False):
        print_warning(message)


def _revalidate_elements(structures, max_z: int) -> None:
    from mattersim.io import validate_structure

    if max_z >= 94:
        return
    for label, atoms in structures:
        validate_structure(atoms, max_z=max_z, label=label)


def _evaluate(calc, atoms_list, with_stress: list[bool]) -> list[dict]:
    """evaluate_batch over all structures: one call for the periodic ones (with stress), one for the rest."""
    from mattersim.calculator import evaluate_batch

    results: list[Optional[dict]] = [None] * len(atoms_list)
    for flag, props in ((True, ("energy", "forces", "stress")), (False, ("energy", "forces"))):
        idx = [i for i, s in enumerate(with_stress) if s == flag]
        if not idx:
            continue
        out = evaluate_batch(calc, [atoms_list[i] for i in idx], props)
        for i, r in zip(idx, out):
            r = dict(r)
            if not flag:
                r.pop("stress", None)  # no stress without a 3D-periodic cell
            results[i] = r
    return results  # type: ignore[return-value]


def _predicts_dielectric(calc) -> bool:
    """True for a property-only model (``mattersim-dielectric``) and for a composite with one."""
    return bool(getattr(calc, "property_only", False)) or callable(getattr(calc, "property_batch", None))


def _property_results(calc, atoms_list) -> list[dict]:
    """Z*, eps_inf and their ``*_std`` of every structure (the members' own predictions are left out)."""
    batch = calc.calculate_batch if getattr(calc, "property_only", False) else calc.property_batch
    out = []
    for r in batch(atoms_list):
        r = dict(r)
        r.pop("members", None)
        out.append(r)
    return out


def _display_labels(labels: list[str]) -> list[str]:
    """Shorter labels for tables and file names: the file name (plus @frame) when that stays unique."""
    short = []
    for label in labels:
        path, sep, frame = label.rpartition("@")
        if sep and frame.isdigit():
            short.append(f"{Path(path).name}@{frame}")
        else:
            short.append(Path(label).name or label)
    return short if len(set(short)) == len(short) else list(labels)


def _file_stem(label: str) -> str:
    """``dir/al.cif`` -> ``al``; ``dir/many.extxyz@3`` -> ``many_3``; ``dir/POSCAR`` -> ``POSCAR``."""
    path, sep, frame = label.rpartition("@")
    if not (sep and frame.isdigit()):
        path, frame = label, ""
    stem = Path(path).stem or Path(path).name or "structure"
    return f"{stem}_{frame}" if frame else stem


def _weights_location(path: Optional[str]) -> str:
    """Where a model's weights are: a cache path, or the Python package whose wheel ships them."""
    if path and "site-packages" in str(path):
        package = str(path).split("site-packages", 1)[1].strip("/\\").split("/")[0]
        return f"inside the {package} package"
    return _short_path(path)


def _short_path(path: Optional[str]) -> str:
    if not path:
        return "-"
    home = str(Path.home())
    return "~" + path[len(home):] if home not in ("/", "") and path.startswith(home + "/") else path


def _table(title: str):
    """A compact rich table (fits 80 columns for the usual numbers)."""
    from rich import box
    from rich.table import Table

    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))


def _print_rows(title: str, rows, red, columns=("quantity", "value"), wrap_values: bool = False) -> None:
    """A workflow result's ``rows()`` as a table on stdout: ``(quantity, value)`` pairs, the values of the rows
    for which ``red(quantity)`` is true in red (warnings, failed criteria)."""
    from rich.markup import escape

    table = _table(escape(title))
    table.add_column(columns[0], no_wrap=True)
    table.add_column(columns[1], no_wrap=not wrap_values)
    for quantity, value in rows:
        text = escape(value)
        table.add_row(escape(quantity), f"[red]{text}[/red]" if red(quantity) else text)
    _print_table(_stdout_console(), table)


def _print_table(console, table) -> None:
    """Print ``table`` no narrower than its no-wrap columns need: numbers are never cut off."""
    from rich.measure import Measurement

    needed = Measurement.get(console, console.options.update(width=10_000), table).maximum
    if needed > console.width:
        from rich.console import Console

        console = Console(file=console.file, width=needed, highlight=False, color_system=console.color_system and "auto")
    console.print(table)


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ---------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------


@app.command("models")
def models_command() -> None:
    """List the models this installation knows, whether they are available offline, and the default."""
    from mattersim import registry

    models = registry.list_models()
    try:
        default = registry.default_model()
    except MatterSimError:
        default = None
    console = _stdout_console()
    wide = console.width >= 140
    table = _table("MatterSim models")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("offline", no_wrap=True)
    table.add_column("default", no_wrap=True)
    table.add_column("energies", no_wrap=True)
    table.add_column("weights", overflow="fold")
    if wide:
        table.add_column("description", overflow="fold")
    default_parts = set(default.split("+")) if default is not None else set()
    for m in models:
        available = bool(m.get("available"))
        row = [
            str(m.get("name", "")),
            str(m.get("kind", "")),
            "[green]yes[/green]" if available else "[dim]no[/dim]",
            "*" if m.get("name") in default_parts else "",
            str(m.get("energy_convention") or "-"),
            _weights_location(m.get("path")),
        ]
        if wide:
            row.append(str(m.get("description", "") or ""))
        table.add_row(*row)
    console.print(table)
    if default is not None:
        console.print(f"Default model: {default}", markup=False)
    else:
        console.print("No model is available offline; download one (see 'mattersim models') or pass a checkpoint path.", markup=False)
    console.print("energies: raw = DFT energies as computed; mp2020 = with the Materials Project 2020 corrections "
                  "(see mattersim.conventions).", markup=False)


# ---------------------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------------------


@app.command("predict")
def predict_command(
    files: List[Path] = typer.Argument(..., help="Structure files (POSCAR, CIF, extxyz with all frames, ...)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write results to this .extxyz or .json file."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda."),
    float64: bool = typer.Option(False, "--float64", help="Evaluate in double precision."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading checkpoints that need full pickle (only for files you trust)."),
    allow_untrained_elements: bool = typer.Option(False, "--allow-untrained-elements", help=ALLOW_UNTRAINED_HELP),
) -> None:
    """Energy, energy/atom, largest force and pressure of every structure in FILES.

    With a property model (--model mattersim-dielectric, or POTENTIAL+mattersim-dielectric) also the Born
    effective charges Z* (per atom, 3x3, row-major in extxyz) and eps_inf (3x3) with their ensemble std.
    """
    import numpy as np
    from ase.units import GPa

    from mattersim.io import check_result_path, ensure_writable_file, read_structures, write_results

    if output is not None:
        check_result_path(output)  # fail before any work
        ensure_writable_file(output)
    structures = read_structures([str(f) for f in files])
    calc = _load_calculator(model, device, float64, trust_pickle)
    _revalidate_elements(structures, _max_z(calc))
    _check_trained_elements(calc, structures, allow_untrained_elements)
    atoms_list = [a for _, a in structures]
    property_only = bool(getattr(calc, "property_only", False))
    if property_only:
        results = [{} for _ in atoms_list]
    else:
        with_stress = [bool(np.asarray(a.pbc).all()) for a in atoms_list]
        results = _evaluate(calc, atoms_list, with_stress)
    if _predicts_dielectric(calc):
        for r, extra in zip(results, _property_results(calc, atoms_list)):
            r.update(extra)
    info = _model_info(calc)

    shown = _display_labels([label for label, _ in structures])
    if property_only:
        _print_property_table(structures, results, shown, info)
        if output is not None:
            write_results(output, atoms_list, results, info, labels=[label for label, _ in structures])
            _stdout_console().print(f"Wrote {len(results)} results to {output}", markup=False)
        return
    table = _predictions_table(info, ["E (eV)", "E/atom", "max|F| (eV/Å)", "P (GPa)"])
    for (label, atoms), r, label_shown in zip(structures, results, shown):
        n = len(atoms)
        energy = float(r["energy"])
        forces = r.get("forces")
        fmax = float(np.linalg.norm(np.asarray(forces).reshape(n, 3), axis=1).max()) if forces is not None else None
        stress = r.get("stress")
        pressure = None
        if stress is not None:
            s = np.asarray(stress, dtype=float)
            if s.size == 6:
                from ase.stress import voigt_6_to_full_3x3_stress

                s = voigt_6_to_full_3x3_stress(s)
            pressure = float(-np.trace(s.reshape(3, 3)) / 3.0 / GPa)
        table.add_row(
            label_shown, atoms.get_chemical_formula(mode="hill"), str(n), f"{energy:.6f}", f"{energy / n:.6f}", _fmt(fmax, ".4f"), _fmt(pressure, ".3f")
        )
    console = _stdout_console()
    _print_table(console, table)
    if output is not None:
        write_results(output, atoms_list, results, info, labels=[label for label, _ in structures])
        console.print(f"Wrote {len(results)} results to {output}", markup=False)


def _predictions_table(info, value_columns: list[str]):
    """The table of ``mattersim predict``: structure, formula, atoms, then right-aligned value columns."""
    table = _table(f"MatterSim predictions ({info.get('name', 'model')})")
    table.add_column("structure", overflow="fold", max_width=30)
    table.add_column("formula", no_wrap=True)
    table.add_column("atoms", justify="right", no_wrap=True)
    for name in value_columns:
        table.add_column(name, justify="right", no_wrap=True)
    return table


def _print_property_table(structures, results, shown, info) -> None:
    """Z* and eps_inf of every structure (property-only model)."""
    import numpy as np

    table = _predictions_table(info, ["ε∞ (tr/3)", "σ(ε∞) max", "max|Z*| (e)", "σ(Z*) max"])
    for (label, atoms), r, label_shown in zip(structures, results, shown):
        eps = np.asarray(r["dielectric_tensor"], dtype=float).reshape(3, 3)
        born = np.asarray(r["born_effective_charges"], dtype=float)
        eps_std = r.get("dielectric_tensor_std")
        born_std = r.get("born_effective_charges_std")
        table.add_row(
            label_shown, atoms.get_chemical_formula(mode="hill"), str(len(atoms)), f"{np.trace(eps) / 3:.4f}",
            _fmt(None if eps_std is None else float(np.max(eps_std)), ".4f"), f"{np.abs(born).max():.4f}",
            _fmt(None if born_std is None else float(np.max(born_std)), ".4f"),
        )
    _print_table(_stdout_console(), table)


# ---------------------------------------------------------------------------------------------------------
# relax
# ---------------------------------------------------------------------------------------------------------


class RelaxMode(str, Enum):
    full = "full"
    fixed_cell = "fixed-cell"
    fixed_volume = "fixed-volume"


class OptimizerName(str, Enum):
    FIRE = "FIRE"
    BFGS = "BFGS"
    LBFGS = "LBFGS"


class StructureFormat(str, Enum):
    poscar = "poscar"
    cif = "cif"


@app.command("relax")
def relax_command(
    files: List[Path] = typer.Argument(..., help="Structure files (POSCAR, CIF, extxyz with all frames, ...)."),
    pressure: float = typer.Option(0.0, "--pressure", "-p", help="Hydrostatic pressure in GPa (mode full)."),
    fmax: float = typer.Option(0.02, "--fmax", help="Force convergence threshold in eV/Å (includes cell forces)."),
    steps: int = typer.Option(500, "--steps", help="Maximum optimizer steps per structure."),
    mode: RelaxMode = typer.Option(RelaxMode.full, "--mode", help="Relax positions and cell (full), positions only, or at constant volume."),
    optimizer: OptimizerName = typer.Option(OptimizerName.FIRE, "--optimizer", help="ASE optimizer.", case_sensitive=False),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    outdir: Path = typer.Option(Path("relaxed"), "--output", "-o", help="Output directory."),
    trajectory: bool = typer.Option(False, "--trajectory", help="Also write each structure's ASE trajectory to OUTDIR/trajectories/."),
    structure_format: StructureFormat = typer.Option(StructureFormat.poscar, "--format", help="Format of the per-structure files."),
    max_atoms_per_batch: int = typer.Option(1024, "--max-atoms-per-batch", help="Atoms evaluated together in one model call."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda."),
    float64: bool = typer.Option(False, "--float64", help="Evaluate in double precision."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading checkpoints that need full pickle (only for files you trust)."),
    allow_untrained_elements: bool = typer.Option(False, "--allow-untrained-elements", help=ALLOW_UNTRAINED_HELP),
) -> None:
    """Relax every structure in FILES (batched) and write them, with a summary.json, to OUTDIR.

    Exit code 1 when any structure did not converge within --steps.
    """
    from mattersim.io import ensure_writable_dir, read_structures

    ensure_writable_dir(outdir)  # before any work
    structures = read_structures([str(f) for f in files])
    calc = _load_calculator(model, device, float64, trust_pickle)
    _revalidate_elements(structures, _max_z(calc))
    _check_trained_elements(calc, structures, allow_untrained_elements, properties=False)  # energies only

    from workflows.relax import run_relax  # lazily: the core never imports workflows at module level

    # the table and one summary line report non-convergence; no per-structure log lines on screen
    import logging

    quiet = logging.NullHandler()
    relax_logger = logging.getLogger("mattersim.relax")
    relax_logger.addHandler(quiet)
    try:
        run = run_relax(structures, calc, pressure=pressure, fmax=fmax, steps=steps, mode=mode.value,
                        optimizer=optimizer.value, max_atoms_per_batch=max_atoms_per_batch, trajectory=trajectory,
                        structure_format=structure_format.value, output_dir=outdir, progress=sys.stderr.isatty())
    finally:
        relax_logger.removeHandler(quiet)
    info = run.summary["model"]
    shown = _display_labels(run.labels)
    not_converged = [label for label, row in zip(shown, run.rows()) if not row["converged"]]
    show_enthalpy = pressure != 0.0
    table = _table(f"Relaxation ({mode.value}, P = {pressure:g} GPa, fmax = {fmax:g} eV/Å, {info.get('name', 'model')})")
    table.add_column("structure", overflow="fold", max_width=30)
    table.add_column("formula", no_wrap=True)
    table.add_column("conv.", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("E (eV)", justify="right", no_wrap=True)
    if show_enthalpy:
        table.add_column("H (eV)", justify="right", no_wrap=True)
    table.add_column("V (Å^3)", justify="right", no_wrap=True)
    table.add_column("ΔV", justify="right", no_wrap=True)
    table.add_column("P (GPa)", justify="right", no_wrap=True)
    for row, label_shown in zip(run.rows(), shown):
        vol = "-" if row["volume"] is None else f"{row['volume']:.2f}"
        dvol = "-" if row["volume_change_percent"] is None else f"{row['volume_change_percent']:+.1f}%"
        cells = [label_shown, row["formula"], "[green]yes[/green]" if row["converged"] else "[red]NO[/red]",
                 str(row["steps"]), f"{row['energy']:.4f}"]
        if show_enthalpy:
            cells.append(f"{row['enthalpy']:.4f}")
        cells += [vol, dvol, _fmt(row["pressure"], ".2f")]
        table.add_row(*cells)
    console = _stdout_console()
    _print_table(console, table)
    n = len(run.results)
    console.print(f"Wrote {n} relaxed structures, relaxed.extxyz and summary.json to {outdir}", markup=False)
    if not_converged:
        names = ", ".join(not_converged[:5]) + (", ..." if len(not_converged) > 5 else "")
        print_error(f"{len(not_converged)} of {n} structures did not converge within {steps} steps (fmax {fmax} eV/Å): {names}.")
        raise typer.Exit(EXIT_NOT_CONVERGED)


# ---------------------------------------------------------------------------------------------------------
# phonon
# ---------------------------------------------------------------------------------------------------------


class NacMethod(str, Enum):
    gonze = "gonze"
    wang = "wang"


@app.command("phonon")
def phonon_command(
    file: Path = typer.Argument(..., help="Structure file with one crystal (POSCAR, CIF, ...): the unit cell."),
    nac: bool = typer.Option(False, "--nac", help="Non-analytical term correction (LO-TO splitting) for polar crystals."),
    born: Optional[Path] = typer.Option(None, "--born", help="phonopy BORN file with Born charges and ε∞ of the primitive cell (implies --nac)."),
    nac_method: NacMethod = typer.Option(NacMethod.gonze, "--nac-method", help="NAC method.", case_sensitive=False),
    nac_range: str = typer.Option("none", "--nac-range", help="Where the model's force constants hold the dipole-dipole interaction; the tail beyond is added (docs/phonon-nac.md): 'none' (phonopy's plain NAC), 'auto' (the model's cutoff -2 to +0.5 Å), R or R_ON:R_OFF in Å."),
    supercell: Optional[str] = typer.Option(None, "--supercell", help='Supercell of the unit cell: "2 2 2" or 9 integers (a 3x3 matrix as phonopy\'s DIM); default: automatic from --min-length.'),
    min_length: Optional[float] = typer.Option(None, "--min-length", help="Automatic supercell: the one with the fewest atoms whose minimum image distance is at least this (Å); default max(10, 2 x the model's cutoff)."),
    displacement: float = typer.Option(0.01, "--displacement", help="Finite displacement in Å."),
    mesh: str = typer.Option("20 20 20", "--mesh", help='Γ-centred q mesh for DOS and thermal properties ("20 20 20"), or one number: a length in Å (density).'),
    pdos: bool = typer.Option(False, "--pdos", help="Also write the projected DOS (projected_dos.dat; the slowest part of the post-processing)."),
    group_velocities: bool = typer.Option(False, "--group-velocities", help="Also compute the mean group velocities on the mesh (summary.json)."),
    tmax: float = typer.Option(1000.0, "--tmax", help="Thermal properties from 0 K to TMAX (K)."),
    tstep: float = typer.Option(10.0, "--tstep", help="Temperature step (K)."),
    pressure: float = typer.Option(0.0, "--pressure", "-p", help="Pressure for the relaxation, GPa."),
    relax: bool = typer.Option(True, "--relax/--no-relax", help="Relax positions and cell first."),
    fmax: float = typer.Option(0.01, "--fmax", help="Relaxation force threshold in eV/Å."),
    relax_steps: int = typer.Option(500, "--relax-steps", help="Maximum relaxation steps."),
    primitive_axis: str = typer.Option("auto", "--primitive-axis", help="'auto' or 9 numbers (phonopy PRIMITIVE_AXES, fractions allowed)."),
    symprec: float = typer.Option(1e-5, "--symprec", help="Symmetry tolerance in Å."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    outdir: Path = typer.Option(Path("phonon"), "--output", "-o", help="Output directory (a rerun with the same inputs resumes there)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Supercells per batched force evaluation."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda."),
    float64: bool = typer.Option(False, "--float64", help="Evaluate in double precision (recommended for finite-difference phonons)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading checkpoints that need full pickle (only for files you trust)."),
    allow_untrained_elements: bool = typer.Option(False, "--allow-untrained-elements", help=ALLOW_UNTRAINED_HELP),
) -> None:
    """Phonons of the crystal in FILE (phonopy finite displacements): band structure, DOS, thermal properties.

    Writes phonopy.yaml (reopen with phonopy.load), band.yaml, total_dos.dat, projected_dos.dat (--pdos),
    thermal_properties.yaml, BORN (with NAC), plots, phonon.log and summary.json to OUTDIR.
    """
    from mattersim.io import read_structures
    from mattersim.settings import parse_mesh, parse_primitive, parse_supercell

    supercell_value = parse_supercell(supercell, "--supercell")
    mesh_value = parse_mesh(mesh, "--mesh")
    primitive_value = parse_primitive(primitive_axis, "--primitive-axis")
    from workflows.dipole import parse_nac_range

    range_value = parse_nac_range(nac_range)  # a typo fails before the model loads
    if born is not None and not born.is_file():
        raise InputError(f"BORN file '{born}' does not exist; pass the path of a phonopy BORN file to --born.")
    from mattersim.io import ensure_writable_dir

    ensure_writable_dir(outdir)  # before any work
    structures = read_structures([str(file)])
    if len(structures) != 1:
        raise InputError(f"'{file}' holds {len(structures)} structures; 'mattersim phonon' takes a file with one crystal.")
    label, atoms = structures[0]
    calc = _load_calculator(model, device, float64, trust_pickle)
    _revalidate_elements(structures, _max_z(calc))
    _check_trained_elements(calc, structures, allow_untrained_elements, properties=(nac and born is None))

    from workflows.phonon import run_phonon  # lazily: the core never imports workflows at module level

    import logging

    class _WarningLines(logging.Handler):  # the workflow's warnings (small supercell, imaginary modes): one line each
        def emit(self, record: logging.LogRecord) -> None:
            print_warning(record.getMessage())

    phonon_logger, warning_lines = logging.getLogger("mattersim.phonon"), _WarningLines(logging.WARNING)
    phonon_logger.addHandler(warning_lines)
    try:
        result = run_phonon(
            atoms, calc, relax=relax, fmax=fmax, pressure=pressure, relax_steps=relax_steps, primitive=primitive_value,
            supercell=supercell_value, min_length=min_length, displacement=displacement, mesh=mesh_value, pdos=pdos, group_velocities=group_velocities, tmax=tmax,
            tstep=tstep, nac=nac or born is not None, born_file=None if born is None else str(born),
            nac_method=nac_method.value, nac_range=range_value, symprec=symprec, output_dir=outdir, batch_size=batch_size, progress=True,
        )
    finally:
        phonon_logger.removeHandler(warning_lines)
    from rich.markup import escape

    s = result.summary
    st = s["structure"]
    table = _table(escape(f"Phonons of {st['formula']} ({st['spacegroup']}, {s['model'].get('name', 'model')})"))
    table.add_column("quantity", no_wrap=True)
    table.add_column("value", no_wrap=True)
    for quantity, value in result.rows():
        if quantity == "imaginary modes":
            value = f"[green]{escape(value)}[/green]" if value.startswith("none") else f"[red]{escape(value)}[/red]"
        else:
            value = escape(value)
        table.add_row(escape(quantity), value)
    console = _stdout_console()
    _print_table(console, table)


# ---------------------------------------------------------------------------------------------------------
# elastic
# ---------------------------------------------------------------------------------------------------------


@app.command("elastic")
def elastic_command(
    files: List[Path] = typer.Argument(..., help="Structure files, one crystal each (POSCAR, CIF, ...); with several, each goes to OUTDIR/<name>/."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    pressure: float = typer.Option(0.0, "--pressure", "-p", help="Pressure in GPa (relaxation and the Birch coefficients)."),
    strains: str = typer.Option("0.005,0.01", "--strains", help="Strain magnitudes, each applied as + and - to the 6 Voigt directions (0 < s <= 0.05)."),
    shear_strains: Optional[str] = typer.Option(None, "--shear-strains", help="Other magnitudes for the 3 shear directions (engineering strain, <= 0.1; pymatgen's and matcalc's shear amounts are tensor strains, half of ours); default: --strains."),
    fit: str = typer.Option("cubic", "--fit", help="cubic (slope at zero strain of a cubic polynomial, exact to O(s^4)) or linear (a straight line, as matcalc)."),
    relax: bool = typer.Option(True, "--relax/--no-relax", help="Relax positions and cell first (space group kept)."),
    clamped_ion: bool = typer.Option(False, "--clamped-ion", help="Do not relax the ions of the strained cells (default: relaxed-ion, the physical answer)."),
    fmax: float = typer.Option(0.005, "--fmax", help="Force threshold of the relaxation, eV/Å."),
    ion_fmax: Optional[float] = typer.Option(None, "--ion-fmax", help="Force threshold of the strained cells' ions (relaxed-ion), eV/Å; default --fmax / 10 (soft modes need it)."),
    relax_steps: int = typer.Option(500, "--relax-steps", help="Maximum steps of each relaxation."),
    symprec: float = typer.Option(1e-5, "--symprec", help="Symmetry tolerance in Å."),
    outdir: Path = typer.Option(Path("elastic"), "--output", "-o", help="Output directory (a rerun with the same inputs resumes there)."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda."),
    float64: bool = typer.Option(False, "--float64", help="Evaluate in double precision."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading checkpoints that need full pickle (only for files you trust)."),
    allow_untrained_elements: bool = typer.Option(False, "--allow-untrained-elements", help=ALLOW_UNTRAINED_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help=SCHEDULER_HELP),
) -> None:
    """Elastic tensor of the crystal in FILE from stress-strain relations: C_ij (IEEE setting), bulk/shear/
    Young's moduli, Poisson ratio, anisotropy, Born stability. Writes elastic.json, stress_strain.png,
    strained.extxyz and elastic.log to OUTDIR (OUTDIR/<name>/ per crystal with several files, with a table
    of all)."""
    from mattersim.io import ensure_writable_dir, read_structures
    from mattersim.settings import parse_numbers

    magnitudes = parse_numbers(strains, "--strains")
    shear_magnitudes = None if shear_strains is None else parse_numbers(shear_strains, "--shear-strains")
    runner, spec = _runner_and_spec(workers, scheduler, model, device, float64, trust_pickle, allow_untrained_elements)
    ensure_writable_dir(outdir)  # before any work
    structures = []
    for file in files:
        found = read_structures([str(file)])
        if len(found) != 1:
            raise InputError(f"'{file}' holds {len(found)} structures; 'mattersim elastic' takes one crystal per file.")
        structures.append(found[0])
    calc = _load_calculator(model, device, float64, trust_pickle)
    _revalidate_elements(structures, _max_z(calc))
    _check_trained_elements(calc, structures, allow_untrained_elements, properties=False)

    from workflows.elastic import run_elastic, run_elastic_many  # lazily: the core never imports workflows

    settings = dict(relax=relax, relax_ions=not clamped_ion, pressure=pressure, strains=magnitudes,
                    shear_strains=shear_magnitudes, fit=fit, fmax=fmax, ion_fmax=ion_fmax, relax_steps=relax_steps,
                    symprec=symprec)
    if len(files) > 1 or runner.distributed:
        from workflows.candidates import file_label
        from workflows.cells import unique_labels

        labels = unique_labels([file_label(Path(f), a) for f, (_, a) in zip(files, structures)])
        results = run_elastic_many(list(zip(labels, [a for _, a in structures])), calc, outdir, runner=runner,
                                   spec=spec, progress=sys.stderr.isatty(), **settings)
        rows = []
        for label, r in zip(labels, results):
            if isinstance(r, dict):
                rows.append((label, f"FAILED: {r['error'][:300]}"))
                continue
            m = r.summary["moduli"]
            rows.append((label, f"{r.summary['structure']['formula']} {r.summary['structure']['spacegroup']}: "
                                f"K_VRH {m['k_vrh_GPa']:.1f}, G_VRH {m['g_vrh_GPa']:.1f} GPa, "
                                f"{'stable' if r.stable else 'NOT Born-stable'} ({r.output_dir})"))
        failed = {label for label, r in zip(labels, results) if isinstance(r, dict)}
        _print_rows(f"Elastic constants ({_model_info(calc).get('name', 'model')})", rows,
                    lambda quantity: quantity in failed, columns=("crystal", "result"), wrap_values=True)
        if any(isinstance(r, dict) for r in results):
            raise typer.Exit(EXIT_NOT_CONVERGED)
        return
    result = run_elastic(structures[0][1], calc, output_dir=outdir, progress=sys.stderr.isatty(), **settings)
    s = result.summary
    _print_rows(f"Elastic constants of {s['structure']['formula']} ({s['structure']['spacegroup']}, "
                f"{s['model'].get('name', 'model')}), GPa", result.rows(),
                lambda quantity: quantity == "Born stability" and not result.stable)


# ---------------------------------------------------------------------------------------------------------
# md
# ---------------------------------------------------------------------------------------------------------


class Ensemble(str, Enum):
    nve = "nve"
    nvt = "nvt"
    npt = "npt"


class Thermostat(str, Enum):
    nose_hoover = "nose-hoover"
    langevin = "langevin"


@app.command("md")
def md_command(
    file: Path = typer.Argument(..., help="Structure file (POSCAR, CIF, extxyz: the last frame)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    ensemble: Ensemble = typer.Option(Ensemble.nvt, "--ensemble", help="nve (velocity Verlet), nvt or npt (MTK, anisotropic cell)."),
    thermostat: Thermostat = typer.Option(Thermostat.nose_hoover, "--thermostat", help="Nosé-Hoover chain or Langevin (nvt only)."),
    temperature: float = typer.Option(300.0, "--temperature", "-T", help="Temperature in K (thermostat, and the Maxwell-Boltzmann start)."),
    pressure: float = typer.Option(0.0, "--pressure", "-p", help="Pressure in GPa (npt)."),
    timestep: float = typer.Option(1.0, "--timestep", help="Time step in fs."),
    steps: int = typer.Option(1000, "--steps", help="Number of MD steps (a rerun with more steps extends a finished run)."),
    supercell: Optional[str] = typer.Option(None, "--supercell", help="Supercell of the input: \"2 2 2\" or 9 integers."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial velocities and of the Langevin noise."),
    every: int = typer.Option(10, "--every", help="Steps between trajectory frames and rows of md.csv."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Steps between checkpoints (a rerun continues from the last one)."),
    tdamp: Optional[float] = typer.Option(None, "--tdamp", help="Thermostat time constant in fs (default 100 time steps)."),
    pdamp: Optional[float] = typer.Option(None, "--pdamp", help="Barostat time constant in fs (default 1000 time steps)."),
    friction: float = typer.Option(0.01, "--friction", help="Langevin friction in 1/fs."),
    keep_velocities: bool = typer.Option(False, "--keep-velocities", help="Start from the velocities in FILE (extxyz momenta) instead of Maxwell-Boltzmann."),
    efield: Optional[str] = typer.Option(None, "--efield", help="Electric field schedule, e.g. sin:Emax=4MV/cm,period=200ps,axis=z (also const:, tri:, steps:)."),
    born: Optional[Path] = typer.Option(None, "--born", help="phonopy BORN file of the input cell: fixed Z* for --efield (default: Z* predicted by the model)."),
    born_every: int = typer.Option(10, "--born-every", help="Steps between predictions of Z* (the expensive part of a field run)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Reference structure (same atoms, e.g. the centrosymmetric phase): P is measured from it."),
    maps_at: Optional[str] = typer.Option(None, "--maps-at", help="Times in ps of the local polarization maps (ABO3 perovskites), e.g. 0,50,100."),
    skip_cycles: int = typer.Option(0, "--skip-cycles", help="Field cycles left out of the averaged P-E loop."),
    outdir: Path = typer.Option(Path("md"), "--output", "-o", help="Output directory (a rerun with the same inputs continues there)."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda."),
    float64: bool = typer.Option(False, "--float64", help="Evaluate in double precision."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading checkpoints that need full pickle (only for files you trust)."),
    allow_untrained_elements: bool = typer.Option(False, "--allow-untrained-elements", help=ALLOW_UNTRAINED_HELP),
) -> None:
    """Molecular dynamics with ASE's integrators, restartable, optionally in a time-dependent electric field
    (forces F0 + e Z*^T E(t), polarization, P-E loop). Writes trajectory.extxyz, md.csv, md.json, plots,
    checkpoint.npz and md.log to OUTDIR."""
    from mattersim.io import ensure_writable_dir, read_structures
    from mattersim.settings import parse_numbers

    from workflows.efield import parse_field  # lazily: the core never imports workflows at module level

    schedule = parse_field(efield)  # before loading the model
    times = None if maps_at is None else parse_numbers(maps_at, "--maps-at")
    if born is not None and efield is None:
        raise InputError("--born gives the Born charges of a field run; add --efield.")
    ensure_writable_dir(outdir)
    structures = read_structures([str(file)])
    atoms = structures[-1][1]
    ref_atoms = None
    if reference is not None:
        ref_atoms = read_structures([str(reference)])[-1][1]
    calc = _load_calculator(model, device, float64, trust_pickle)
    _revalidate_elements([structures[-1]], _max_z(calc))
    _check_trained_elements(calc, [structures[-1]], allow_untrained_elements, properties=efield is not None and born is None)

    from workflows.md import run_md

    result = run_md(atoms, calc, ensemble=ensemble.value, thermostat=thermostat.value, temperature=temperature,
                    pressure=pressure, timestep=timestep, steps=steps, supercell=supercell, seed=seed, every=every,
                    checkpoint_every=checkpoint_every, tdamp=tdamp, pdamp=pdamp, friction=friction, efield=schedule,
                    born=born, born_every=born_every, reference=ref_atoms, maps_at=times, skip_cycles=skip_cycles,
                    keep_velocities=keep_velocities, output_dir=outdir, progress=sys.stderr.isatty())
    s = result.summary
    _print_rows(f"MD of {s['structure']['formula']} ({s['model'].get('name', 'model')})", result.rows(), lambda q: False)


# ---------------------------------------------------------------------------------------------------------
# build li-rich, delithiate
# ---------------------------------------------------------------------------------------------------------

build_app = typer.Typer(cls=_ErrorHandlingGroup, help="Build structures for the workflows.", no_args_is_help=True)
app.add_typer(build_app, name="build")


@build_app.command("li-rich")
def build_li_rich_command(
    template: Optional[Path] = typer.Option(None, "--template", help="A layered LiMO2 file (default: R-3m LiCoO2 built in code)."),
    tm: str = typer.Option("Mn", "--tm", help="The transition metal that replaces M."),
    supercell: str = typer.Option("5 4 2", "--supercell", help="Supercell of the 12-atom hexagonal cell (5 4 2: 480 atoms)."),
    li_excess: int = typer.Option(24, "--li-excess", help="TM sites replaced by Li, spread over the TM layers (24 of 120: Li1.2Mn0.8O2)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the placement."),
    output: Path = typer.Option(..., "--output", "-o", help="Output structure file (POSCAR if the name has no known extension)."),
) -> None:
    """A Li-rich layered oxide: supercell of LiMO2, M -> TM, some TM -> Li (seeded). Prints its composition and
    charge balance."""
    from mattersim.io import atomic_path, ensure_writable_file, read_structures

    from workflows.delithiation import build_li_rich

    ensure_writable_file(output, option="--output")
    base = None if template is None else read_structures([str(template)])[-1][1]
    cell, info = build_li_rich(base, tm=tm, supercell=supercell, li_excess=li_excess, seed=seed)
    fmt = None if output.suffix.lower() in (".cif", ".extxyz", ".xyz", ".json", ".traj") else "vasp"
    with atomic_path(output) as tmp:
        cell.write(tmp, format=fmt, **({"direct": True, "sort": True} if fmt == "vasp" else {}))  # tmp keeps the suffix
    comp = ", ".join(f"{k} {v:.4g}" for k, v in info["composition_per_O2"].items())
    ox = info["average_tm_oxidation_state"]
    _print_rows(f"Li-rich cell {info['formula']} ({info['natoms']} atoms) -> {output}",
                [("composition per O2", comp), ("Li per TM layer", " ".join(map(str, info["substituted_per_tm_layer"]))),
                 ("average TM oxidation state", f"{ox:.3g} (Li+, O2-)" if ox is not None else "-"),
                 ("charge balance", "possible" if info["charge_balanced"] else "IMPOSSIBLE (TM beyond 2+..7+)")],
                lambda q: q == "charge balance" and not info["charge_balanced"])


def _time_ps(text: str, option: str) -> float:
    """A time such as 5ps or 500fs (a bare number is in ps) -> ps."""
    from mattersim.settings import TIME_UNITS_FS, parse_quantity

    fs, _ = parse_quantity(text, TIME_UNITS_FS, option, "5ps", default_unit="ps")
    if not fs > 0:
        raise InputError(f"{option} {text!r}: give a positive time, e.g. 5ps or 500fs.")
    return fs / 1000.0


class Selection(str, Enum):
    random = "random"
    lowest_coordination = "lowest-coordination"
    highest_energy = "highest-energy"


@app.command("delithiate")
def delithiate_command(
    file: Path = typer.Argument(..., help="The lithiated cell (e.g. from 'mattersim build li-rich')."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    temperature: float = typer.Option(1000.0, "--temperature", "-T", help="Temperature in K (NVT, Nosé-Hoover chain)."),
    timestep: float = typer.Option(1.0, "--timestep", help="Time step in fs."),
    remove_every: str = typer.Option("5ps", "--remove-every", help="Time between removals, e.g. 5ps."),
    remove: int = typer.Option(1, "--remove", help="Li atoms removed each time."),
    select: Selection = typer.Option(Selection.random, "--select", help="Which Li: random (seeded), the least O-coordinated, or the highest per-atom energy."),
    until: str = typer.Option("x=0", "--until", help="Target Li content, e.g. x=0 or x=0.5 (Li per two O)."),
    equilibrate: Optional[str] = typer.Option(None, "--equilibrate", help="NVT time before the first removal (default: --remove-every)."),
    hold: Optional[str] = typer.Option(None, "--hold", help="Time at the target x after the last removal (default: --remove-every); a larger --hold continues a finished run."),
    relax: bool = typer.Option(True, "--relax/--no-relax", help="Relax ions and cell first."),
    seed: int = typer.Option(0, "--seed", help="Seed of velocities and of the random choice."),
    every: int = typer.Option(100, "--every", help="Steps between analysed snapshots."),
    outdir: Path = typer.Option(Path("delithiation"), "--output", "-o", help="Output directory (a rerun continues there)."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda."),
    float64: bool = typer.Option(False, "--float64", help="Evaluate in double precision."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading checkpoints that need full pickle (only for files you trust)."),
    allow_untrained_elements: bool = typer.Option(False, "--allow-untrained-elements", help=ALLOW_UNTRAINED_HELP),
) -> None:
    """Delithiation MD: Li removed at intervals at high temperature, with TM moments and oxidation states,
    O moments, O-O pairs (O2, superoxo, peroxo) and TM migration tracked. Writes delithiation.csv/json, plots,
    snapshots.extxyz and one MD folder per interval to OUTDIR."""
    from mattersim.io import ensure_writable_dir, read_structures

    every_ps = _time_ps(remove_every, "--remove-every")
    equil_ps = None if equilibrate is None else _time_ps(equilibrate, "--equilibrate")
    hold_ps = None if hold is None else _time_ps(hold, "--hold")
    target = until.strip().lower().removeprefix("x=").strip()
    try:
        until_x = float(target)
    except ValueError:
        raise InputError(f"--until {until!r}: give the target Li content as x=0.5 (Li per two O).") from None
    ensure_writable_dir(outdir)
    structures = read_structures([str(file)])
    calc = _load_calculator(model, device, float64, trust_pickle)
    _revalidate_elements([structures[-1]], _max_z(calc))
    _check_trained_elements(calc, [structures[-1]], allow_untrained_elements, properties=False)

    from workflows.delithiation import run_delithiation

    result = run_delithiation(structures[-1][1], calc, temperature=temperature, timestep=timestep,
                              remove_every=every_ps, remove=remove, select=select.value, until=until_x,
                              equilibrate=equil_ps, hold=hold_ps, relax=relax, seed=seed, every=every,
                              output_dir=outdir, progress=sys.stderr.isatty())
    _print_rows(f"Delithiation ({result.summary['model'].get('name', 'model')})", result.rows(), lambda q: False)


# ---------------------------------------------------------------------------------------------------------
# qha
# ---------------------------------------------------------------------------------------------------------


@app.command("qha")
def qha_command(
    files: List[Path] = typer.Argument(..., help="Structure file(s), one crystal each; two or more phases of one composition also give their phase boundary."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    volumes: Optional[str] = typer.Option(None, "--volumes", help="Volume grid as V/V0 - 1: start:stop:count or a list (default -0.05:0.05:11)."),
    strains: Optional[str] = typer.Option(None, "--strains", help="Or linear strains a/a0 - 1 (start:stop:count or a list); not with --volumes."),
    tmax: float = typer.Option(1000.0, "--tmax", help="Highest temperature, K."),
    tstep: float = typer.Option(10.0, "--tstep", help="Temperature step, K."),
    pressures: str = typer.Option("0", "--pressures", help="Pressures for G(T, P), GPa: a list (0,10,20) or start:stop:step."),
    eos: str = typer.Option("vinet", "--eos", help="Equation of state: vinet, birch_murnaghan or murnaghan."),
    supercell: Optional[str] = typer.Option(None, "--supercell", help="Supercell matrix (phonopy DIM: 3 or 9 integers) at every volume; default automatic."),
    mesh: str = typer.Option("20 20 20", "--mesh", help="q-point mesh of the thermal properties: 3 integers or a length in Å."),
    nac: bool = typer.Option(False, "--nac", help="Non-analytical term correction at every volume (Z* and eps_inf from --born or the model)."),
    born: Optional[Path] = typer.Option(None, "--born", help="phonopy BORN file (Z* and eps_inf of the primitive cell, used at every volume; implies --nac)."),
    nac_method: NacMethod = typer.Option(NacMethod.gonze, "--nac-method", help="NAC method.", case_sensitive=False),
    fmax: float = typer.Option(0.01, "--fmax", help="Force threshold of the relaxations, eV/Å."),
    relax: bool = typer.Option(True, "--relax/--no-relax", help="Relax each structure to V0 first (space group kept)."),
    symprec: float = typer.Option(1e-5, "--symprec", help="Symmetry tolerance in Å."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Phase names, one per file, comma-separated (B1,B2); default the formula for one file, the file names for several. 'mattersim hull --qha' matches phases to candidates by these names."),
    workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help=SCHEDULER_HELP),
    outdir: Path = typer.Option(Path("qha"), "--output", "-o", help="Output directory (a rerun with the same inputs resumes there)."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda."),
    float64: bool = typer.Option(False, "--float64", help="Evaluate in double precision."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading checkpoints that need full pickle (only for files you trust)."),
    allow_untrained_elements: bool = typer.Option(False, "--allow-untrained-elements", help=ALLOW_UNTRAINED_HELP),
) -> None:
    """Quasi-harmonic G(T, P), V(T), thermal expansion, B_T(T), Cp(T) and Grüneisen parameter of the crystal(s)
    in FILES (phonons at every volume, phonopy's QHA); with several phases of one composition, their phase
    boundary P(T). Writes qha.json, plots, phonopy-qha's files per phase and qha.log to OUTDIR."""
    from mattersim.io import ensure_writable_dir, read_structures
    from mattersim.settings import parse_supercell

    smat = parse_supercell(supercell, "--supercell")
    runner, spec = _runner_and_spec(workers, scheduler, model, device, float64, trust_pickle, allow_untrained_elements)
    ensure_writable_dir(outdir)  # before any work
    structures = []
    for f in files:
        found = read_structures([str(f)])
        if len(found) != 1:
            raise InputError(f"'{f}' holds {len(found)} structures; 'mattersim qha' takes one crystal per file.")
        structures.append(found[0][1])
    calc = _load_calculator(model, device, float64, trust_pickle)
    pairs = [(str(f), a) for f, a in zip(files, structures)]
    _revalidate_elements(pairs, _max_z(calc))
    _check_trained_elements(calc, pairs, allow_untrained_elements, properties=(nac or born is not None) and born is None)

    from workflows.qha import run_qha  # lazily: the core never imports workflows at module level

    from workflows.candidates import file_label
    from workflows.cells import unique_labels

    # phase folders: --labels, else the formula for one file, the file names for several (B1.vasp and
    # POSCAR_B1 -> B1, as 'mattersim hull' labels its candidates, so that --qha finds them)
    if labels:
        labels = [x.strip() for x in labels.split(",")]
        if len(labels) != len(files) or not all(labels) or len(set(labels)) != len(labels):
            raise InputError(f"--labels needs {len(files)} distinct names, one per file, comma-separated; got {len(labels)}.")
    else:
        labels = ([structures[0].get_chemical_formula(mode="hill", empirical=True)] if len(files) == 1 else
                  unique_labels([file_label(Path(f), a) for f, a in zip(files, structures)]))
    result = run_qha(structures, calc, labels=labels, volumes=volumes, strains=strains, tmax=tmax, tstep=tstep,
                     pressures=pressures, eos=eos, supercell=smat, mesh=mesh, nac=nac, born_file=born,
                     nac_method=nac_method.value, fmax=fmax, relax=relax, symprec=symprec,
                     output_dir=outdir, progress=sys.stderr.isatty(), runner=runner, spec=spec)
    _print_rows(f"Quasi-harmonic thermodynamics ({result.summary['model'].get('name', 'model')})", result.rows(),
                lambda quantity: quantity.strip() == "WARNING", wrap_values=True)


# ---------------------------------------------------------------------------------------------------------
# hull
# ---------------------------------------------------------------------------------------------------------


@app.command("hull")
def hull_command(
    system: str = typer.Argument(..., help="Chemical system, elements joined by '-' (La-H, Mg-Si-O)."),
    structures: List[Path] = typer.Option([], "--structures", "-s", help="Candidate structure files or folders (POSCAR, CIF, extxyz), the elemental phases included; repeatable."),
    pressures: str = typer.Option("0", "--pressures", "-p", help="Pressures in GPa: start:stop:step (0:200:20) or a list (0,50,100)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    fmax: float = typer.Option(0.02, "--fmax", help="Force threshold of the relaxations, eV/Å."),
    steps: int = typer.Option(500, "--steps", help="Maximum steps of each relaxation."),
    chain: str = typer.Option("down", "--chain", help="down: start each pressure from the one above (highest first); up: the reverse; none: every pressure from the input."),
    optimizer: str = typer.Option("BFGS", "--optimizer", help="BFGS, FIRE or LBFGS (with ASE's FrechetCellFilter)."),
    mp: bool = typer.Option(False, "--mp", help="Add the Materials Project's structures of the system and its sub-systems (mp-api; needs MP_API_KEY)."),
    mp_max_above_hull: float = typer.Option(0.2, "--mp-max-above-hull", help="With --mp: only structures at most this far above MP's 0 GPa hull, eV/atom (negative: all)."),
    search: int = typer.Option(0, "--search", help="Random structure search: N PyXtal crystals per composition and pressure, relaxed; the lowest join the candidates."),
    compositions: Optional[str] = typer.Option(None, "--compositions", help="With --search: formulas to search, comma-separated (La,H,LaH10); default those of the candidates."),
    seed: int = typer.Option(0, "--seed", help="With --search: random seed (the same seed gives the same structures)."),
    search_max_atoms: int = typer.Option(12, "--search-max-atoms", help="With --search: most atoms per random cell."),
    qha: List[Path] = typer.Option([], "--qha", help="Folders written by 'mattersim qha' (phases labelled like the candidates): those phases enter with G(T, P); repeatable; needs --temperature."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-T", help="With --qha: the temperature of the hull, K."),
    workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help=SCHEDULER_HELP),
    outdir: Path = typer.Option(Path("hull"), "--output", "-o", help="Output directory (a rerun with the same inputs resumes there)."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda."),
    float64: bool = typer.Option(False, "--float64", help="Evaluate in double precision."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading checkpoints that need full pickle (only for files you trust)."),
    allow_untrained_elements: bool = typer.Option(False, "--allow-untrained-elements", help=ALLOW_UNTRAINED_HELP),
) -> None:
    """Enthalpy convex hull of a chemical system at each pressure: stable phases, distances above the hull,
    transition pressures, flags for relaxations that went wrong. Writes hull.json, hull.csv, relaxed
    structures and plots to OUTDIR."""
    import os

    from mattersim.io import ensure_writable_dir
    from workflows.candidates import load_candidates, mp_candidates, parse_system  # lazily: the core never imports workflows
    from workflows.hull import run_hull

    elements = parse_system(system)
    if not structures and not mp and not search:
        raise InputError("No candidate structures. Give them with --structures FILES_OR_FOLDERS (POSCAR, CIF, extxyz), "
                         "--mp (the Materials Project, with MP_API_KEY) or --search N --compositions La,H,LaH10 (a "
                         "random structure search), the elemental phases of the system included.")
    if temperature is not None and not qha:
        raise InputError("--temperature needs --qha: give the folders of 'mattersim qha' runs of the phases (their G(T, P)); "
                         "without them the hull is the static enthalpy one.")
    runner, spec = _runner_and_spec(workers, scheduler, model, device, float64, trust_pickle, allow_untrained_elements)
    ensure_writable_dir(outdir)  # before any work
    candidates = load_candidates(structures, elements) if structures else []
    if mp:
        candidates += mp_candidates(elements, endpoint=os.environ.get("MP_API_ENDPOINT"),
                                    max_above_hull=None if mp_max_above_hull < 0 else mp_max_above_hull)
    calc = _load_calculator(model, device, float64, trust_pickle)
    _revalidate_elements(candidates, _max_z(calc))
    _check_trained_elements(calc, candidates, allow_untrained_elements, properties=False)
    result = run_hull(candidates, calc, system=elements, pressures=pressures, fmax=fmax, steps=steps, chain=chain,
                      optimizer=optimizer, search=search, seed=seed, search_max_atoms=search_max_atoms,
                      compositions=[c for c in compositions.split(",") if c.strip()] if compositions else None,
                      qha=list(qha) or None, temperature=temperature, output_dir=outdir, progress=sys.stderr.isatty(),
                      runner=runner, spec=spec)
    _print_rows(f"Convex hull of {'-'.join(elements)} ({result.summary['model'].get('name', 'model')})", result.rows(),
                lambda quantity: quantity.startswith("FLAG"), columns=("pressure / phase", "stable phases / value"),
                wrap_values=True)


# ---------------------------------------------------------------------------------------------------------
# train / finetune
# ---------------------------------------------------------------------------------------------------------


def _run_training(config: Path, output: Optional[Path], progress: bool, finetune: bool, seed: Optional[int] = None) -> None:
    """Shared body of ``train`` and ``finetune``: check the mode, train, print the best validation MAEs."""
    import dataclasses

    from rich.markup import escape

    from mattersim.training import UNITS, load_config, train

    cfg = load_config(config)
    if finetune and not cfg.init_from:
        raise InputError(f"{config}: field 'init_from' is missing; 'mattersim finetune' starts from a checkpoint: set init_from "
                         "to a checkpoint path or a model name (or train from scratch with 'mattersim train').")
    if not finetune and cfg.init_from:
        raise InputError(f"{config}: field 'init_from' is set; 'mattersim train' trains from scratch: remove init_from, "
                         f"or run 'mattersim finetune {config}'.")
    if output is not None:
        cfg = dataclasses.replace(cfg, output=str(output))
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=int(seed))
    result = train(cfg, progress=progress)
    best = result.best_metrics or {}
    table = _table(f"{'Validation' if best.get('on', 'valid') == 'valid' else 'Training'} MAEs")
    for name, justify in (("quantity", "left"), ("MAE", "right"), ("unit", "left")):
        table.add_column(name, justify=justify, no_wrap=True)
    for term, unit in UNITS.items():
        if f"{term}_mae" in best:
            table.add_row(term, f"{best[f'{term}_mae']:.4g}", escape(unit))
    if "loss" in best:
        table.add_row("loss", f"{best['loss']:.4g}", "")
    console = _stdout_console()
    _print_table(console, table)
    note = ", stopped early" if result.stopped_early else ""
    console.print(f"Best epoch {result.best_epoch} of {result.epochs_done}{note}: {result.best_checkpoint}; "
                  f"log, history and last.pth in {result.output} ({result.wall_time_s:.1f} s)", markup=False)


@app.command("train")
def train_command(
    config: Path = typer.Argument(..., help="Training config (YAML or JSON) with 'model' and 'train'; see docs/training.md."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (overrides the config's 'output'; a rerun resumes there)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Overrides the config's seed (ensemble members)."),
) -> None:
    """Train a multi-task model from scratch; writes best.pth, last.pth, history.json and train.log."""
    _run_training(config, output, progress, finetune=False, seed=seed)


@app.command("finetune")
def finetune_command(
    config: Path = typer.Argument(..., help="Training config (YAML or JSON) with 'init_from' and 'train'; see docs/training.md."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (overrides the config's 'output'; a rerun resumes there)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Overrides the config's seed (ensemble members)."),
) -> None:
    """Fine-tune a checkpoint or registry model (optionally adding heads); writes best.pth, last.pth, history.json and train.log."""
    _run_training(config, output, progress, finetune=True, seed=seed)


# ---------------------------------------------------------------------------------------------------------
# benchmarks
# ---------------------------------------------------------------------------------------------------------

bench_app = typer.Typer(
    cls=_ErrorHandlingGroup,
    help="Benchmarks: energy/force/stress sets (MPF-TP family, HEX), PhononDB, side-by-side reports.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.command("run")
def bench_run_command(
    target: str = typer.Argument(..., help="A set (mpf-TP, mpf-alkali-TP, random-TP, alexandria-random-1k, "
                                           "mptrj-random-1k, mptrj-highest-stress-1k), 'all' (the six), 'hex', "
                                           "'phonondb', 'elasticity', or an extxyz file with energy, forces and stress."),
    model: List[str] = typer.Option(..., "--model", "-m", help="Model name or checkpoint path; repeat for several models."),
    outdir: Path = typer.Option(..., "--output", "-o", help="Output folder (a rerun resumes there)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder with the set files (default: $MATTERSIM_BENCHMARK_DATA, "
                                                           "then the cache, then download); the HEX file; the PhononDB entries folder; the elasticity file."),
    subset: Optional[Path] = typer.Option(None, "--subset", help="PhononDB: file of entry ids (default: benchmark_subset.txt next to the entries)."),
    max_items: Optional[int] = typer.Option(None, "--max", help="Only the first N structures / entries (quick checks)."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda."),
    float64: bool = typer.Option(False, "--float64", help="Evaluate MatterSim checkpoints in double precision."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow checkpoints that need full pickle (only files you trust)."),
    allow_untrained_elements: bool = typer.Option(False, "--allow-untrained-elements", help=ALLOW_UNTRAINED_HELP),
    download: bool = typer.Option(True, "--download/--no-download", help="Download missing sets and MatterSim weights."),
    displacement: Optional[float] = typer.Option(None, "--displacement", help="PhononDB: finite displacement of the prediction in Å (default PhononDB's 0.01)."),
    energy_convention: Optional[str] = typer.Option(None, "--energy-convention", help="raw or mp2020: the energies of models that record none (checkpoint files); registry models keep their own. Energies are compared in the reference's convention."),
    workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help=SCHEDULER_HELP),
) -> None:
    """Evaluate one or more models on a benchmark and write metrics, predictions, parity data and a log."""
    if energy_convention is not None:
        from mattersim.conventions import check_convention

        check_convention(energy_convention, "--energy-convention")
    if max_items is not None and max_items < 1:
        raise InputError(f"--max must be a positive integer, not {max_items}.")
    if displacement is not None and not (0 < displacement < 0.5):
        raise InputError(f"--displacement must be a length in Å between 0 and 0.5 (PhononDB uses 0.01), not {displacement}.")
    from mattersim.io import ensure_writable_dir

    ensure_writable_dir(outdir)  # before any work
    from benchmarks.run import run_benchmark  # lazily: the core never imports benchmarks at module level

    docs = run_benchmark(target, model, outdir, data=data, subset=subset, max_items=max_items, device=device,
                         dtype="float64" if float64 else "float32", trust_pickle=trust_pickle, download=download,
                         progress=True, allow_untrained_elements=allow_untrained_elements, displacement=displacement,
                         energy_convention=energy_convention, workers=workers, scheduler=scheduler)
    from rich.markup import escape

    table = _table(escape(f"Benchmark results ({outdir})"))
    for name in ("benchmark", "model", "metric", "value", "unit"):
        table.add_column(name, no_wrap=True)
    for doc in docs:
        first = True
        for m in doc["metrics"]:
            if m["value"] is None or m["key"].startswith("time_"):
                continue
            value = f"{m['value']:.4g}" if isinstance(m["value"], float) else str(m["value"])
            table.add_row(escape(doc["benchmark"]) if first else "", escape(str(doc["model"].get("name"))) if first else "",
                          escape(m["label"]), value, escape(m["unit"] or ""))
            first = False
        table.add_row("", "", "failed / done", f"{doc['n_failed']} / {doc['n_done']}", "")
        table.add_row("", "", "wall time", f"{doc['wall_time_s']:.1f}", "s")
    _print_table(_stdout_console(), table)


@bench_app.command("report")
def bench_report_command(
    dirs: List[Path] = typer.Argument(..., help="Output folders of 'mattersim bench run' (or folders holding several)."),
    output: Path = typer.Option(..., "--output", "-o", help="Report: a .md path (writes .md, .html, .json and a figures folder) or a folder."),
    title: Optional[str] = typer.Option(None, "--title", help="Report title."),
) -> None:
    """Side-by-side report (Markdown, self-contained HTML, JSON, PNG figures) of benchmark runs."""
    from benchmarks.report import make_report
    from mattersim.io import ensure_writable_dir, ensure_writable_file

    if output.suffix.lower() == ".md":
        ensure_writable_file(output)  # before any work
    else:
        ensure_writable_dir(output)
    make_report(dirs, output, title=title)
    _stdout_console().print(f"report written: {output}", markup=False)


def main() -> None:
    """Console-script entry point (``mattersim = "mattersim.cli:main"``)."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
