"""Model registry: turn a model name, a checkpoint path or a calculator into a ready ASE calculator.

Names it knows (case-insensitive; see :data:`KNOWN_MODELS` and ``docs/models.md``):

- ``mattersim-v1.0.0-1M``, ``mattersim-v1.0.0-5M``: the official MatterSim v1 weights, downloaded once
  into ``<cache>/models/`` (see :func:`cache_dir`) and loaded with :meth:`Potential.from_checkpoint`;
- ``chgnet``: CHGNet 0.3.0, shipped inside the ``chgnet`` package;
- ``sevennet-0``: SevenNet-0 (11Jul2024), shipped inside the ``sevenn`` package;
- ``mattersim-dielectric``: Born effective charges and eps_inf only (an ensemble of multi-task models,
  :func:`mattersim.composite.load_dielectric`; its ``member_*.pth`` files live in
  ``mattersim/pretrained/mattersim-dielectric/`` or ``$MATTERSIM_DIELECTRIC_DIR``).

Anything else may be a path to an existing checkpoint file (loaded with :meth:`Potential.from_checkpoint`),
``"A+B"``: potential ``A`` (a name or checkpoint path) for energies, forces and stress plus property model
``B`` (``mattersim-dielectric`` or a multi-task checkpoint with dielectric heads) for Z* and eps_inf
(:class:`mattersim.composite.CompositeCalculator`), or, from Python, an ASE calculator object (returned as
it is).

Every calculator returned by :func:`load_calculator` carries ``calc.model_info``, a dict with at least
``name``, ``version``, ``source`` (weights file or package), ``sha256`` (of the weights file, or None)
and ``kind`` (``"mattersim-v1"``, ``"chgnet"``, ``"sevennet"``, ``"checkpoint"``, ``"dielectric"``,
``"composite"`` or ``"ase"``), and, for the models loaded here, ``elements`` (what the model was trained
on: SevenNet-0's type map, MPtrj for CHGNet, the model card for MatterSim v1, ``elements.json`` for the
dielectric model, the embedding for a checkpoint file) with ``elements_source``. Such a calculator refuses
a structure with another element in one line (:class:`~mattersim.errors.UntrainedElementError`), or,
loaded with ``allow_untrained_elements=True``, warns once and runs where the model can
(:func:`check_trained_elements` makes the same check up front, before any work).

Nothing here downloads anything unless a MatterSim model is asked for by name, is not cached, and
``download=True``; :func:`default_model` only ever picks a model that is already on this machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib.util
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.error import URLError
from urllib.request import Request, urlopen

from mattersim.adapters import batched_chgnet_calculator, batched_sevennet_calculator
from mattersim.errors import CheckpointError, InputError, ModelNotAvailableError
from mattersim.io import file_sha256  # public here too (registry.file_sha256)

__all__ = [
    "DIELECTRIC_MODEL",
    "KNOWN_MODELS",
    "MPTRJ_ELEMENTS",
    "ElementCheck",
    "ModelSpec",
    "cache_dir",
    "check_trained_elements",
    "default_model",
    "download_file",
    "download_model",
    "file_sha256",
    "is_available",
    "list_models",
    "load_calculator",
    "load_ensemble",
    "model_path",
    "models_dir",
    "resolve_name",
    "trained_elements",
]

#: Environment variable that moves the cache (models live in ``$MATTERSIM_HOME/models``).
ENV_HOME = "MATTERSIM_HOME"

#: Where the official ``download_checkpoint`` of microsoft/mattersim fetches the v1 weights from.
OFFICIAL_URL_PREFIX = "https://raw.githubusercontent.com/microsoft/mattersim/main/pretrained_models/"

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".tar", ".pkl")
_DTYPES = ("float32", "float64")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one named model."""

    name: str
    kind: str  # "mattersim-v1" | "chgnet" | "sevennet" | "dielectric"
    description: str
    version: str
    license: str
    filename: str | None = None  # file name in <cache>/models (downloadable models only)
    url: str | None = None  # where download_model fetches it
    sha256: str | None = None  # published hash, when there is one
    size: int | None = None  # published size in bytes, when there is one
    package: str | None = None  # the PyPI package that ships or needs it
    aliases: tuple[str, ...] = ()
    # atomic numbers of the elements its training set holds (documented; see docs/models.md), or None where
    # the model itself says (SevenNet's type map, the dielectric model's elements.json)
    elements: tuple[int, ...] | None = None
    # the DFT energy convention it was trained on (mattersim.conventions.ENERGY_CONVENTIONS); None for a
    # model that predicts no energies
    energy_convention: str | None = "raw"


#: The 89 elements of MPtrj (the Materials Project relaxation trajectories that CHGNet 0.3.0 and SevenNet-0
#: were trained on, and of the Materials Project and Alexandria structures behind MatterSim v1's "89
#: elements"): H to Bi and Ac to Pu (Z 1-83, 89-94). Po, At, Rn, Fr and Ra (Z 84-88) have no entries.
#: SevenNet-0's type map is exactly this set, and CHGNet's embedding rows of Z 84-88 still have the scale
#: of their random initialisation (tests/test_elements.py checks both).
MPTRJ_ELEMENTS: tuple[int, ...] = tuple(range(1, 84)) + tuple(range(89, 95))


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="mattersim-v1.0.0-5M",
            kind="mattersim-v1",
            description="MatterSim v1.0.0, 5M-parameter M3GNet (official weights, downloaded once)",
            version="1.0.0",
            license="MIT",
            filename="mattersim-v1.0.0-5M.pth",
            url=OFFICIAL_URL_PREFIX + "mattersim-v1.0.0-5M.pth",
            # No hash or size is published; the sha256 of what was downloaded is stored next to the
            # file (<file>.sha256) and checked on every load.
            aliases=("mattersim-5m", "mattersim-v1-5m"),
            elements=MPTRJ_ELEMENTS,
        ),
        ModelSpec(
            name="mattersim-v1.0.0-1M",
            kind="mattersim-v1",
            description="MatterSim v1.0.0, 1M-parameter M3GNet (official weights, downloaded once)",
            version="1.0.0",
            license="MIT",
            filename="mattersim-v1.0.0-1M.pth",
            url=OFFICIAL_URL_PREFIX + "mattersim-v1.0.0-1M.pth",
            aliases=("mattersim-1m", "mattersim-v1-1m"),
            elements=MPTRJ_ELEMENTS,
        ),
        ModelSpec(
            name="sevennet-0",
            kind="sevennet",
            description="SevenNet-0 (11Jul2024), shipped inside the sevenn package",
            version="11Jul2024",
            license="MIT (sevenn 0.13; releases before the licence change were GPL-3.0)",
            package="sevenn",
            aliases=("7net-0", "sevennet"),
            elements=MPTRJ_ELEMENTS,
        ),
        ModelSpec(
            name="chgnet",
            kind="chgnet",
            description="CHGNet 0.3.0 (MPtrj), shipped inside the chgnet package; also predicts magmoms",
            version="0.3.0",
            license="BSD-3-Clause (Modified BSD)",
            package="chgnet",
            aliases=("chgnet-0.3.0",),
            elements=MPTRJ_ELEMENTS,
            # trained on MPtrj's corrected_total_energy (the MP2020 compatibility corrections added)
            energy_convention="mp2020",
        ),
        ModelSpec(
            name="mattersim-dielectric",
            kind="dielectric",
            description="Born effective charges Z* and eps_inf only (ensemble of multi-task models trained on "
                        "PhononDB); combine it with a potential: <potential>+mattersim-dielectric",
            version="see card.json",
            license="model MIT; training data PhononDB by A. Togo, CC BY 4.0",
            energy_convention=None,
        ),
    )
}

#: Name of the property-only dielectric model.
DIELECTRIC_MODEL = "mattersim-dielectric"

#: Order in which :func:`default_model` picks the first potential available offline (it adds
#: ``+mattersim-dielectric`` when that model is installed).
DEFAULT_ORDER = ("mattersim-v1.0.0-5M", "mattersim-v1.0.0-1M", "sevennet-0", "chgnet")

_CHGNET_WEIGHTS = ("pretrained", "0.3.0", "chgnet_0.3.0_e29f68s314m37.pth.tar")
_SEVENNET_WEIGHTS = ("SevenNet_0__11Jul2024", "checkpoint_sevennet_0.pth")


# --------------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The mattersim cache: ``$MATTERSIM_HOME`` if set, else ``~/.cache/mattersim`` (not created here)."""
    env = os.environ.get(ENV_HOME, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mattersim"


def models_dir() -> Path:
    """Where downloaded weights live: ``<cache_dir()>/models``."""
    return cache_dir() / "models"


def _aliases() -> dict[str, str]:
    table: dict[str, str] = {}
    for spec in KNOWN_MODELS.values():
        for alias in (spec.name, *spec.aliases):
            table[alias.lower()] = spec.name
        if spec.filename:
            table[spec.filename.lower()] = spec.name
    return table


def resolve_name(name: str) -> str:
    """The canonical registry name of ``name`` (case-insensitive, aliases and ``.pth`` file names allowed).

    Raises :class:`ModelNotAvailableError` naming the known models (and a close match) if unknown.
    """
    key = str(name).strip().lower()
    table = _aliases()
    if key in table:
        return table[key]
    known = ", ".join(KNOWN_MODELS)
    close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.6)
    hint = f"did you mean '{table[close[0]]}'? " if close else ""
    raise ModelNotAvailableError(
        f"Unknown model '{name}': {hint}use one of {known}, or the path of an existing checkpoint file."
    )


def _spec(name: str) -> ModelSpec:
    return KNOWN_MODELS[resolve_name(name)]


def model_path(name: str) -> Path:
    """Where the weights of a downloadable model go: ``<cache>/models/<official file name>``."""
    spec = _spec(name)
    if spec.kind == "dielectric":
        from mattersim.composite import ENV_DIELECTRIC_DIR, dielectric_dir

        raise ModelNotAvailableError(
            f"Model '{spec.name}' is not downloaded: its member_<k>.pth files live in {dielectric_dir()} "
            f"(or in ${ENV_DIELECTRIC_DIR}); see docs/dielectric-model.md for how to train them."
        )
    if spec.filename is None:
        raise ModelNotAvailableError(
            f"Model '{spec.name}' ships inside the {spec.package} package and has no file in the "
            f"mattersim cache; install it with pip install 'mattersim[{spec.package}]'."
        )
    return models_dir() / spec.filename


def _legacy_dirs() -> list[Path]:
    """Other places the official weights may already be: the official package's own cache."""
    return [Path.home() / ".local" / "mattersim" / "pretrained_models"]


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _package_version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - metadata missing is not an error here
        return None


def _weights_file(spec: ModelSpec) -> Path | None:
    """The weights file of ``spec`` on this machine, or None (no download, no heavy import)."""
    if spec.kind == "mattersim-v1":
        assert spec.filename is not None
        for folder in (models_dir(), *_legacy_dirs()):
            candidate = folder / spec.filename
            if candidate.is_file():
                return candidate
        return None
    if spec.kind == "chgnet":
        pkg = _package_dir("chgnet")
        candidate = pkg.joinpath(*_CHGNET_WEIGHTS) if pkg else None
        return candidate if candidate is not None and candidate.is_file() else None
    if spec.kind == "sevennet":
        pkg = _package_dir("sevenn")
        if pkg is None:
            return None
        for base in (pkg / "pretrained_potentials", Path.home() / ".cache" / "sevennet"):
            candidate = base.joinpath(*_SEVENNET_WEIGHTS)
            if candidate.is_file():
                return candidate
        return None
    if spec.kind == "dielectric":
        from mattersim.composite import dielectric_dir, member_files

        return dielectric_dir() if member_files() else None
    return None  # pragma: no cover - every kind is handled above


def is_available(name: str) -> bool:
    """True if model ``name`` can be loaded on this machine without any download."""
    return _weights_file(_spec(name)) is not None


def _available_names() -> list[str]:
    return [name for name in DEFAULT_ORDER if is_available(name)]


def _available_text() -> str:
    names = _available_names()
    return ", ".join(names) if names else "none (pip install 'mattersim[chgnet]' gives one)"


def list_models() -> list[dict[str, Any]]:
    """One dict per known model: ``name``, ``kind``, ``description``, ``version``, ``license``,
    ``energy_convention`` (``raw`` or ``mp2020``, see :mod:`mattersim.conventions`), ``available``
    (loadable offline now), ``path`` (weights file on this machine, or None; the members'
    folder for ``mattersim-dielectric``) and ``source`` (download URL, package name or folder)."""
    rows = []
    for spec in KNOWN_MODELS.values():
        path = _weights_file(spec)
        version, source = spec.version, spec.url or spec.package
        if spec.kind == "dielectric":
            from mattersim.composite import card_version, dielectric_dir

            version = card_version() if path is not None else None
            source = str(dielectric_dir())
        rows.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "description": spec.description,
                "version": version,
                "license": spec.license,
                "energy_convention": spec.energy_convention,
                "available": path is not None,
                "path": str(path) if path is not None else None,
                "source": source,
            }
        )
    return rows


def default_model() -> str:
    """The best model available offline here.

    The potential is the first available of 5M, then 1M MatterSim (if cached), sevennet-0, chgnet; when the
    dielectric model ``mattersim-dielectric`` is installed it is added for Z* and eps_inf, e.g.
    ``"sevennet-0+mattersim-dielectric"`` (a :class:`~mattersim.composite.CompositeCalculator`).
    """
    for name in DEFAULT_ORDER:
        if is_available(name):
            return f"{name}+{DIELECTRIC_MODEL}" if is_available(DIELECTRIC_MODEL) else name
    raise ModelNotAvailableError(
        "No model is available offline on this machine: put mattersim-v1.0.0-1M.pth in "
        f"{models_dir()}, or install one with pip install 'mattersim[chgnet]'."
    )


# --------------------------------------------------------------------------------------------------
# Hashes and downloads
# --------------------------------------------------------------------------------------------------


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _recorded_sha256(path: Path) -> str | None:
    side = _sidecar(path)
    if not side.is_file():
        return None
    try:
        text = side.read_text().split()
    except OSError:
        return None
    return text[0].lower() if text else None


@contextlib.contextmanager
def _progress_bar(label: str, total: int | None, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    from mattersim.io import console

    with Progress(*columns, console=console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    label: str,
    size: int | None = None,
    sha256: str | None = None,
    check: Callable[[Path], str | None] | None = None,
    progress: bool = True,
    unavailable: type[Exception] = ModelNotAvailableError,
    offline_hint: str = "",
    invalid: type[Exception] = CheckpointError,
) -> tuple[Path, str]:
    """Download ``url`` to ``dest`` atomically and return ``(dest, sha256)``.

    The data go to a temporary file in ``dest``'s folder, which is renamed into place only after the
    size (``Content-Length`` and ``size`` if given), the sha256 (if given) and ``check(tmp_path)``
    (returns an error text or None) pass; the sha256 is then stored next to it as ``<file>.sha256``.
    A network failure raises ``unavailable`` naming the URL and the exact path to copy the file to by
    hand (plus ``offline_hint``); a bad download raises ``invalid`` and leaves nothing behind.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        received = 0
        try:
            from mattersim import __version__

            request = Request(url, headers={"User-Agent": f"mattersim/{__version__}"})
            with urlopen(request, timeout=60) as response, os.fdopen(fd, "wb") as out:
                fd = -1
                length = response.headers.get("Content-Length")
                expected = int(length) if length and length.isdigit() else None
                with _progress_bar(dest.name, expected or size, progress) as advance:
                    while True:
                        block = response.read(1 << 20)
                        if not block:
                            break
                        out.write(block)
                        digest.update(block)
                        received += len(block)
                        advance(len(block))
        except (URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise unavailable(
                f"Could not download {label} from {url} ({reason}); download that URL on a machine with "
                f"internet access and copy the file to {dest}{offline_hint}."
            ) from exc
        sha = digest.hexdigest()
        if expected is not None and received != expected:
            raise invalid(
                f"Download of {label} from {url} stopped after {received} of {expected} bytes; run the "
                "command again to retry."
            )
        if size is not None and received != size:
            raise invalid(
                f"Downloaded {label} has {received} bytes instead of the published {size}; the file at "
                f"{url} has changed, so copy a known-good file to {dest} by hand."
            )
        if sha256 is not None and sha != sha256.lower():
            raise invalid(
                f"Downloaded {label} has sha256 {sha} instead of the published {sha256}; nothing was "
                f"saved, so copy a known-good file to {dest} by hand or retry."
            )
        problem = check(tmp) if check is not None else None
        if problem:
            raise invalid(f"What {url} returned for {label} {problem}; copy the real file to {dest} by hand.")
        os.replace(tmp, dest)
        side = _sidecar(dest)
        side_tmp = side.with_name(side.name + ".part")
        side_tmp.write_text(f"{sha}  {dest.name}\n")
        os.replace(side_tmp, side)
        return dest, sha
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def _torch_zip_problem(path: Path) -> str | None:
    from mattersim.checkpoint import checkpoint_file_problem

    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04":  # the official weights are torch zip archives
        found = checkpoint_file_problem(path) or "a pickle stream, not a zip archive"
        return f"is not a PyTorch checkpoint: it is {found}"
    found = checkpoint_file_problem(path)
    return None if found is None else f"is not a complete PyTorch checkpoint: it is {found}"


def download_model(name: str, *, progress: bool = True) -> Path:
    """Download the weights of ``name`` into ``<cache>/models/`` and return the file's path.

    The file is written to a temporary file in the same folder and renamed into place only after its
    size (``Content-Length`` and any published size), its sha256 (if published) and its format (a
    torch zip archive) check out; the sha256 of what was downloaded is stored next to it as
    ``<file>.sha256``. Offline, raises :class:`ModelNotAvailableError` naming the exact path to copy
    the file to by hand and the models available offline now.
    """
    spec = _spec(name)
    dest = model_path(spec.name)
    assert spec.url is not None
    path, _ = download_file(
        spec.url, dest, label=f"model '{spec.name}'", size=spec.size, sha256=spec.sha256,
        check=_torch_zip_problem, progress=progress,
        offline_hint=f", or use a model available offline now: {_available_text()}",
    )
    return path


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _check_args(device: str, dtype: str) -> None:
    if dtype not in _DTYPES:
        raise InputError(f"dtype must be 'float32' or 'float64', got {dtype!r}.")
    if not isinstance(device, str) or not device:
        raise InputError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}.")


def _attach(calc: Any, info: dict[str, Any]) -> Any:
    try:
        calc.model_info = info
    except AttributeError:  # pragma: no cover - calculators with __slots__
        pass
    return calc


def _float32_only(name: str, dtype: str) -> None:
    if dtype != "float32":
        warnings.warn(
            f"Model '{name}' runs in float32 only; dtype={dtype!r} is ignored for it.", stacklevel=3
        )


def _from_potential(potential: Any, *, kind: str, name: str, version: str | None,
                    path: Path | None, sha256: str | None, device: str, dtype: str,
                    extra: dict[str, Any] | None = None) -> Any:
    from mattersim.calculator import MatterSimCalculator

    identity = dict(getattr(potential, "identity", None) or {})
    calc = MatterSimCalculator(potential)
    info = dict(identity)
    info.update({
        "name": name or identity.get("name"),
        "version": version or identity.get("version"),
        "source": str(path) if path is not None else identity.get("source"),
        "sha256": sha256 or identity.get("sha256"),
        "kind": kind,
        "device": device,
        "dtype": dtype,
    })
    info.update(extra or {})
    return _attach(calc, info)


def _load_checkpoint_file(path: Path, *, device: str, dtype: str, trust_pickle: bool) -> Any:
    from mattersim.potential import Potential

    potential = Potential.from_checkpoint(path, device=device, dtype=dtype, trust_pickle=trust_pickle)
    identity = dict(getattr(potential, "identity", None) or {})
    sha = identity.get("sha256") or file_sha256(path)
    return _from_potential(
        potential, kind="checkpoint", name=identity.get("name") or path.stem,
        version=identity.get("version"), path=path.resolve(), sha256=sha, device=device, dtype=dtype,
    )


def _load_mattersim(spec: ModelSpec, *, device: str, dtype: str, trust_pickle: bool,
                    download: bool) -> Any:
    path = _weights_file(spec)
    if path is None:
        if not download:
            raise ModelNotAvailableError(
                f"Model '{spec.name}' is not on this machine and download=False; copy "
                f"{spec.url} to {model_path(spec.name)}, or use a model available offline now: "
                f"{_available_text()}."
            )
        path = download_model(spec.name)
    sha = file_sha256(path)
    recorded = _recorded_sha256(path)
    if recorded is not None and recorded != sha:
        raise CheckpointError(
            f"Weights file {path} does not match the sha256 recorded in {_sidecar(path)} when it was "
            "downloaded; delete both files and load the model again to re-download it."
        )
    if spec.sha256 is not None and sha != spec.sha256.lower():
        raise CheckpointError(
            f"Weights file {path} is not the published '{spec.name}' (sha256 {sha} instead of "
            f"{spec.sha256}); delete it and load the model again to re-download it."
        )
    from mattersim.potential import Potential

    potential = Potential.from_checkpoint(
        path, device=device, dtype=dtype, trust_pickle=trust_pickle, name=spec.name
    )
    return _from_potential(
        potential, kind="mattersim-v1", name=spec.name, version=spec.version, path=path,
        sha256=sha, device=device, dtype=dtype,
        extra={"license": spec.license, "url": spec.url, "energy_convention": spec.energy_convention},
    )


def _missing_package(spec: ModelSpec, exc: Exception) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"Model '{spec.name}' needs the {spec.package} package ({exc}); install it with "
        f"pip install 'mattersim[{spec.package}]' or use a model available offline now: "
        f"{_available_text()}."
    )


def _load_chgnet(spec: ModelSpec, *, device: str, dtype: str) -> Any:
    _float32_only(spec.name, dtype)
    try:
        from chgnet.model import CHGNet
    except ImportError as exc:
        raise _missing_package(spec, exc) from exc
    # chgnet 0.4 warns on every stress evaluation about its own internal tensor conversion
    warnings.filterwarnings(
        "ignore", message="Converting a tensor with requires_grad=True", category=UserWarning, module="chgnet"
    )
    with contextlib.redirect_stdout(io.StringIO()):  # chgnet prints banners
        model = CHGNet.load(model_name=spec.version, use_device=device, verbose=False)
        calc = batched_chgnet_calculator(model, device=device)
    path = _weights_file(spec)
    return _attach(calc, {
        "name": spec.name,
        "version": spec.version,
        "source": str(path) if path else f"chgnet {_package_version('chgnet')}",
        "sha256": file_sha256(path) if path else None,
        "kind": "chgnet",
        "package": f"chgnet {_package_version('chgnet')}",
        "license": spec.license,
        "energy_convention": spec.energy_convention,
        "device": device,
        "dtype": "float32",
    })


def _load_sevennet(spec: ModelSpec, *, device: str, dtype: str) -> Any:
    _float32_only(spec.name, dtype)
    try:
        from sevenn.calculator import SevenNetCalculator  # noqa: F401 - is sevenn there?
    except ImportError as exc:
        raise _missing_package(spec, exc) from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tensor product accelerator", torch.load notices
        calc = batched_sevennet_calculator("7net-0", device=device)  # SevenNetCalculator + calculate_batch
    path = _weights_file(spec)
    return _attach(calc, {
        "name": spec.name,
        "version": spec.version,
        "source": str(path) if path else f"sevenn {_package_version('sevenn')}",
        "sha256": file_sha256(path) if path else None,
        "kind": "sevennet",
        "package": f"sevenn {_package_version('sevenn')}",
        "license": spec.license,
        "energy_convention": spec.energy_convention,
        "device": device,
        "dtype": "float32",
    })


# --------------------------------------------------------------------------------------------------
# Trained elements
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ElementCheck:
    """The elements a loaded model was trained on, and what it does with the others.

    ``trained``: atomic numbers of its training set; ``runnable``: those it can evaluate at all (its type map
    or element embedding), None for no limit beyond ``trained``; ``allow``: run on elements outside
    ``trained`` (but inside ``runnable``) with a warning instead of an error; ``accepted``: the untrained
    elements already allowed and reported (each is reported once per calculator).
    """

    model: str
    trained: frozenset[int]
    runnable: frozenset[int] | None
    source: str
    holder: str = "element embedding"  # what ``runnable`` is, for messages
    allow: bool = False
    accepted: set[int] = dataclasses.field(default_factory=set)


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"


def element_ranges(numbers: Any) -> str:
    """``"H-Bi, Ac-Pu"``: the elements of ``numbers`` (atomic numbers) as runs of consecutive Z."""
    zs = sorted(set(int(z) for z in numbers))
    runs: list[list[int]] = []
    for z in zs:
        if runs and z == runs[-1][-1] + 1:
            runs[-1].append(z)
        else:
            runs.append([z])
    return ", ".join(_symbol(r[0]) if len(r) == 1 else f"{_symbol(r[0])}-{_symbol(r[-1])}" for r in runs)


def _elements_text(zs: list[int]) -> str:
    names = [f"{_symbol(z)} (Z={z})" for z in sorted(zs)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _where(structures: list, labels: list[str] | None, holders: list[int]) -> tuple[str, str]:
    """(``"structure 'x'"`` / ``"2 structures ('x', 'y')"``, ``"contains"`` / ``"contain"``)."""
    def name(k: int) -> str:
        return repr(str(labels[k])) if labels is not None else f"#{k}"

    if len(holders) == 1:
        if labels is None and len(structures) == 1:
            return "the structure", "contains"
        return f"structure {name(holders[0])}", "contains"
    shown = ", ".join(name(k) for k in holders[:3]) + (", ..." if len(holders) > 3 else "")
    return f"{len(holders)} structures ({shown})", "contain"


def _enforce(check: ElementCheck, structures: list, labels: list[str] | None, *, allow: bool | None,
             warn: bool) -> list[str]:
    """Raise :class:`UntrainedElementError` for elements outside ``check.trained`` (unless allowed and
    runnable); return (and with ``warn`` also ``warnings.warn``) one message for newly allowed ones."""
    import numpy as np

    from mattersim.errors import UntrainedElementError, UntrainedElementWarning

    present = [set(np.unique(np.asarray(a.numbers)).tolist()) for a in structures]
    outside = set().union(*present) - check.trained if present else set()
    if not outside:
        return []
    cannot = sorted(z for z in outside if check.runnable is not None and z not in check.runnable)
    # elements allowed before are not reported again, unless the caller says now that they are not allowed
    bad = cannot or sorted(outside if allow is False else outside - check.accepted)
    if not bad:
        return []
    where, verb = _where(structures, labels, [k for k, p in enumerate(present) if p & set(bad)])
    els, them = _elements_text(bad), ("it" if len(bad) == 1 else "them")
    known = f"{len(check.trained)} elements: {element_ranges(check.trained)}"  # what it was trained on
    if cannot:
        runnable = check.runnable or frozenset()
        raise UntrainedElementError(
            f"{where[0].upper()}{where[1:]} {verb} {els}, which model {check.model} was not trained on and cannot "
            f"evaluate at all (its {check.holder} holds {len(runnable)} elements: {element_ranges(runnable)}), not "
            f"even with --allow-untrained-elements; remove {them} or use another model."
        )
    if not (check.allow if allow is None else allow):
        raise UntrainedElementError(
            f"{where[0].upper()}{where[1:]} {verb} {els}, which model {check.model} was not trained on (it was "
            f"trained on {known}), so its results would be an extrapolation; remove {them}, use a model trained on "
            f"{them}, or pass --allow-untrained-elements (allow_untrained_elements=True in Python) to run anyway."
        )
    check.accepted.update(bad)
    message = (f"Model {check.model} runs on {els} in {where} although it was not trained on {them} (it was trained "
               f"on {known}), as --allow-untrained-elements (allow_untrained_elements=True) allows; treat its "
               f"results there as an extrapolation.")
    if warn:
        warnings.warn(message, UntrainedElementWarning, stacklevel=3)
    return [message]


_CHECKED_CLASSES: dict[type, type] = {}


def _checked_class(cls: type) -> type:
    """A subclass of the calculator class ``cls`` whose ``calculate``, ``calculate_batch`` and ``set_atoms``
    (ASE calls it on ``atoms.calc = calc``; SevenNet's raises a bare ValueError there) first check the
    elements against ``self.element_check``. A subclass, not wrapped instance methods, so that copies of the
    calculator check their own structures."""
    if getattr(cls, "_checks_elements", False):
        return cls
    if cls in _CHECKED_CLASSES:
        return _CHECKED_CLASSES[cls]
    namespace: dict[str, Any] = {"_checks_elements": True, "__module__": cls.__module__,
                                 "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}

    def _one(self, atoms):
        target = atoms if atoms is not None else getattr(self, "atoms", None)
        if target is not None:
            _enforce(self.element_check, [target], None, allow=None, warn=True)

    if callable(getattr(cls, "calculate", None)):
        def calculate(self, atoms=None, *args, **kwargs):
            _one(self, atoms)
            return super(checked, self).calculate(atoms, *args, **kwargs)
        namespace["calculate"] = calculate
    if callable(getattr(cls, "set_atoms", None)):
        def set_atoms(self, atoms, *args, **kwargs):
            _one(self, atoms)
            return super(checked, self).set_atoms(atoms, *args, **kwargs)
        namespace["set_atoms"] = set_atoms
    if callable(getattr(cls, "calculate_batch", None)):
        def calculate_batch(self, structures, *args, **kwargs):
            structures = list(structures)
            _enforce(self.element_check, structures, None, allow=None, warn=True)
            return super(checked, self).calculate_batch(structures, *args, **kwargs)
        calculate_batch.__doc__ = getattr(cls.calculate_batch, "__doc__", None)
        namespace["calculate_batch"] = calculate_batch
    def __reduce_ex__(self, protocol):  # copies and pickles name the importable class, then re-check
        return _restore_checked, (cls,), self.__dict__

    namespace["__reduce_ex__"] = __reduce_ex__
    checked = type(cls.__name__, (cls,), namespace)
    _CHECKED_CLASSES[cls] = checked
    return checked


def _restore_checked(cls: type) -> Any:
    calc = cls.__new__(cls)  # its state (with its element_check) is set by copy / pickle next
    calc.__class__ = _checked_class(cls)
    return calc


def _install_element_check(calc: Any, trained: Any, runnable: Any, source: str, *, allow: bool,
                           holder: str = "element embedding") -> Any:
    """Give ``calc`` its :class:`ElementCheck` (``calc.element_check``), record the trained elements in
    ``model_info`` (``elements``: symbols in order of Z, ``elements_source``), and make its ``calculate``,
    ``calculate_batch`` and ``set_atoms`` refuse structures with other elements (one
    :class:`UntrainedElementError` line instead of the model's own traceback or silent extrapolation)."""
    info = getattr(calc, "model_info", None) or {}
    check = ElementCheck(
        model=str(info.get("name") or type(calc).__name__), trained=frozenset(int(z) for z in trained),
        runnable=None if runnable is None else frozenset(int(z) for z in runnable), source=source,
        holder=holder, allow=bool(allow),
    )
    try:
        calc.element_check = check
        calc.__class__ = _checked_class(type(calc))
    except (AttributeError, TypeError):  # pragma: no cover - calculators with __slots__
        return calc
    if isinstance(info, dict):
        info["elements"] = [_symbol(z) for z in sorted(check.trained)]
        info["elements_source"] = source
    return calc


def _element_parts(calc: Any, properties: bool = True) -> list[Any]:
    """The calculators whose element checks apply: a composite's potential (and its property model when
    ``properties``), else ``calc`` itself."""
    if hasattr(calc, "potential_calc") and hasattr(calc, "property_model"):
        parts = [calc.potential_calc] + ([calc.property_model] if properties else [])
    else:
        parts = [calc]
    return [p for p in parts if isinstance(getattr(p, "element_check", None), ElementCheck)]


def trained_elements(calc: Any) -> list[str] | None:
    """The symbols (in order of Z) of the elements every part of ``calc`` was trained on, or None if unknown."""
    parts = _element_parts(calc)
    if not parts:
        return None
    common = frozenset.intersection(*(p.element_check.trained for p in parts))
    return [_symbol(z) for z in sorted(common)]


def check_trained_elements(
    calc: Any,
    structures: Any,
    *,
    labels: Any = None,
    properties: bool = True,
    allow: bool | None = None,
    warn: bool = True,
) -> list[str]:
    """Check, before any work, that ``structures`` (an Atoms or a list) hold only elements ``calc`` was trained on.

    For a composite ``A+B`` the potential is checked and, with ``properties`` (Z*/eps_inf wanted), the
    property model too. An element outside a model's training set raises :class:`UntrainedElementError`
    naming the element(s), the structure(s) (``labels``) and the model, unless ``allow`` (default: what
    :func:`load_calculator` was given as ``allow_untrained_elements``) is true and the model can represent
    the element: then one message per model is returned (and, with ``warn``, issued as an
    :class:`UntrainedElementWarning`) and the calculator runs on it from then on. An element a model cannot
    represent at all (outside SevenNet's type map, beyond an embedding) is always an error. Calculators
    not from :func:`load_calculator` (no ``element_check``) are not checked.
    """
    from ase import Atoms

    items = [structures] if isinstance(structures, Atoms) else list(structures)
    names = None if labels is None else [str(x) for x in ([labels] if isinstance(labels, str) else labels)]
    messages: list[str] = []
    for part in _element_parts(calc, properties):
        messages += _enforce(part.element_check, items, names, allow=allow, warn=warn)
    return messages


def _set_allow(calc: Any, allow: bool) -> None:
    for part in _element_parts(calc):
        part.element_check.allow = bool(allow)


def _range(max_z: Any) -> range:
    return range(1, int(max_z) + 1)


def _checkpoint_elements(calc: Any, *, allow: bool) -> Any:
    """A MatterSim-format checkpoint: no record of its training elements, so every element its embedding holds."""
    max_z = int(getattr(getattr(calc, "potential", None), "max_z", 94) or 94)
    return _install_element_check(
        calc, _range(max_z), _range(max_z), allow=allow,
        source=f"not recorded in the checkpoint: every element its embedding holds (Z 1-{max_z})",
    )


def _dielectric_elements(model: Any, *, allow: bool) -> Any:
    """The dielectric model: the elements of its training split (``elements.json`` next to the members)."""
    import json

    members = list(getattr(model, "members", None) or [])
    max_z = min((int(m.max_z) for m in members), default=94)
    folder = (getattr(model, "model_info", None) or {}).get("source")
    record = Path(str(folder)) / "elements.json" if folder else None
    trained: Any = _range(max_z)
    source = f"not recorded next to the members (no elements.json): every element their embedding holds (Z 1-{max_z})"
    if record is not None and record.is_file():
        from ase.data import atomic_numbers

        try:
            doc = json.loads(record.read_text(encoding="utf-8"))
            trained = [atomic_numbers[s] for s in doc["elements"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{record}: unreadable list of training elements ({type(exc).__name__}: {exc}); it must be JSON "
                'with "elements": ["H", "Li", ...]; restore the file that came with the model.'
            ) from None
        source = f"{record.name}: {doc.get('source') or 'the elements of the training data'}"
    return _install_element_check(model, trained, _range(max_z), source=source, allow=allow)


def _looks_like_path(text: str) -> bool:
    return (
        os.sep in text
        or (os.altsep is not None and os.altsep in text)
        or text.startswith("~")
        or text.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def load_calculator(
    model: Any = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    trust_pickle: bool = False,
    download: bool = True,
    allow_untrained_elements: bool = False,
) -> Any:
    """An ASE calculator for ``model``, with ``calc.model_info`` set.

    ``model`` may be None (:func:`default_model`), a registry name (:data:`KNOWN_MODELS`), the path of
    an existing checkpoint file (str or Path; loaded with ``Potential.from_checkpoint``), ``"A+B"`` (a
    :class:`~mattersim.composite.CompositeCalculator`: potential ``A``, a name or checkpoint path, plus
    property model ``B``, ``mattersim-dielectric`` or a multi-task checkpoint with dielectric heads), a
    ``Potential`` object, or an ASE calculator (returned as it is). ``"mattersim-dielectric"`` alone gives
    the property-only :class:`~mattersim.composite.DielectricModel`. ``download=False`` forbids
    fetching MatterSim weights that are not cached. ``dtype`` applies to MatterSim checkpoints;
    chgnet and sevennet-0 run in float32. ``trust_pickle`` is passed on to ``Potential.from_checkpoint``.

    Every calculator loaded here knows the elements its model was trained on (``model_info["elements"]``,
    symbols in order of Z, and ``model_info["elements_source"]``; ``calc.element_check``) and refuses a
    structure with any other element with one :class:`~mattersim.errors.UntrainedElementError` line (an
    :class:`~mattersim.errors.InputError`). ``allow_untrained_elements=True`` turns that into one
    :class:`~mattersim.errors.UntrainedElementWarning` per model and element where the model can still run
    (CHGNet and MatterSim embed every element up to Pu; SevenNet-0 cannot run an element outside its type
    map, so that stays an error). :func:`check_trained_elements` makes the same check up front.
    """
    _check_args(device, dtype)
    from ase.calculators.calculator import BaseCalculator

    if isinstance(model, BaseCalculator):
        if allow_untrained_elements:
            _set_allow(model, True)
        if getattr(model, "model_info", None) is None:
            _attach(model, {
                "name": type(model).__name__,
                "version": None,
                "source": type(model).__module__,
                "sha256": None,
                "kind": "ase",
            })
        return model
    calc = _load(model, device=device, dtype=dtype, trust_pickle=trust_pickle, download=download,
                 allow=allow_untrained_elements)
    return _with_elements(calc, allow=allow_untrained_elements)


def load_ensemble(paths: Sequence[Any], **kwargs) -> Any:
    """An :class:`~mattersim.ensemble.EnsembleCalculator` of checkpoint files, registry names or calculators
    (:func:`load_calculator` with ``kwargs`` each)."""
    from mattersim.ensemble import EnsembleCalculator

    return EnsembleCalculator([load_calculator(p, **kwargs) for p in paths])


def _load(model: Any, *, device: str, dtype: str, trust_pickle: bool, download: bool, allow: bool) -> Any:
    """The calculator of ``model`` before its element check is installed (a composite's parts have theirs)."""
    if type(model).__name__ == "Potential" and type(model).__module__ == "mattersim.potential":
        identity = dict(getattr(model, "identity", None) or {})
        return _from_potential(
            model, kind="checkpoint", name=identity.get("name"), version=identity.get("version"),
            path=None, sha256=identity.get("sha256"), device=device, dtype=dtype,
        )
    if model is None:
        model = default_model()
    if isinstance(model, os.PathLike):
        path = Path(model).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"Checkpoint file '{path}' does not exist (or is not a file); pass an existing "
                f"checkpoint or one of the model names: {', '.join(KNOWN_MODELS)}."
            )
        return _load_checkpoint_file(path, device=device, dtype=dtype, trust_pickle=trust_pickle)
    if not isinstance(model, str):
        raise InputError(
            f"model must be a model name, a checkpoint path or an ASE calculator, not a "
            f"{type(model).__name__}."
        )
    text = model.strip()
    path = Path(text).expanduser()
    if text and path.is_file():
        return _load_checkpoint_file(path, device=device, dtype=dtype, trust_pickle=trust_pickle)
    if "+" in text:
        return _load_composite(text, device=device, dtype=dtype, trust_pickle=trust_pickle, download=download,
                               allow=allow)
    if text.lower() not in _aliases() and _looks_like_path(text):
        raise CheckpointError(
            f"Checkpoint file '{text}' does not exist; pass an existing checkpoint or one of the "
            f"model names: {', '.join(KNOWN_MODELS)}."
        )
    spec = _spec(text)
    if spec.kind == "mattersim-v1":
        return _load_mattersim(spec, device=device, dtype=dtype, trust_pickle=trust_pickle,
                               download=download)
    if spec.kind == "chgnet":
        return _load_chgnet(spec, device=device, dtype=dtype)
    if spec.kind == "sevennet":
        return _load_sevennet(spec, device=device, dtype=dtype)
    if spec.kind == "dielectric":
        from mattersim.composite import load_dielectric

        return load_dielectric(device=device, dtype=dtype, trust_pickle=trust_pickle)
    raise AssertionError(f"unhandled model kind {spec.kind}")  # pragma: no cover


def _with_elements(calc: Any, *, allow: bool) -> Any:
    """Install the element check of a freshly loaded calculator (see :func:`load_calculator`)."""
    info = getattr(calc, "model_info", None) or {}
    kind = info.get("kind")
    if kind == "composite":
        _set_allow(calc, allow)
        common = trained_elements(calc)
        if common is not None and isinstance(info, dict):
            info["elements"] = common
            info["elements_source"] = "the elements both the potential and the property model were trained on"
        return calc
    if isinstance(getattr(calc, "element_check", None), ElementCheck):
        _set_allow(calc, allow)
        return calc
    if kind == "mattersim-v1":
        spec = KNOWN_MODELS[resolve_name(str(info.get("name")))]
        max_z = int(getattr(getattr(calc, "potential", None), "max_z", 94) or 94)
        return _install_element_check(
            calc, spec.elements or _range(max_z), _range(max_z), allow=allow,
            source=f"MatterSim v1 model card: {len(spec.elements or ())} elements (those of its Materials Project "
                   "and Alexandria sources); the checkpoint holds no list",
        )
    if kind == "checkpoint":
        return _checkpoint_elements(calc, allow=allow)
    if kind == "chgnet":
        spec = KNOWN_MODELS["chgnet"]
        embedding = getattr(getattr(getattr(calc, "model", None), "atom_embedding", None), "embedding", None)
        rows = int(getattr(embedding, "num_embeddings", 94))  # row k embeds Z = k + 1
        return _install_element_check(
            calc, spec.elements or (), _range(rows), allow=allow,
            source=f"CHGNet {spec.version} was trained on MPtrj ({len(spec.elements or ())} elements); its "
                   f"embedding holds Z 1-{rows}",
        )
    if kind == "sevennet":
        type_map = getattr(calc, "type_map", None)
        known = sorted(int(z) for z in type_map) if isinstance(type_map, dict) and type_map else \
            KNOWN_MODELS["sevennet-0"].elements or ()
        return _install_element_check(
            calc, known, known, allow=allow, holder="type map",
            source=f"the type map of the SevenNet-0 checkpoint ({len(known)} elements, its MPtrj training set)",
        )
    if kind == "dielectric":
        return _dielectric_elements(calc, allow=allow)
    return calc  # an ASE calculator of the caller's: its elements are unknown


_COMPOSITE_HINT = ("write POTENTIAL+PROPERTY_MODEL, e.g. sevennet-0+mattersim-dielectric or "
                   "chgnet+path/to/multitask.pth")


def _load_property_model(text: str, *, device: str, dtype: str, trust_pickle: bool) -> Any:
    """The Z*/eps_inf part of ``A+B``: ``mattersim-dielectric`` or a multi-task checkpoint with those heads."""
    from mattersim.composite import DielectricModel, load_dielectric

    path = Path(text).expanduser()
    if path.is_file():
        from mattersim.potential import Potential

        potential = Potential.from_checkpoint(path, device=device, dtype=dtype, trust_pickle=trust_pickle)
        identity = potential.identity
        return DielectricModel([potential], info={"name": identity["name"], "version": identity.get("version"),
                                                  "sha256": identity["sha256"], "source": identity["source"],
                                                  "device": device, "dtype": dtype})
    if text.lower() not in _aliases() and _looks_like_path(text):
        raise CheckpointError(
            f"Checkpoint file '{text}' does not exist; the part after '+' must be {DIELECTRIC_MODEL} or an "
            "existing checkpoint of a multi-task model with born_effective_charges and dielectric_tensor heads."
        )
    spec = _spec(text)
    if spec.kind != "dielectric":
        raise InputError(
            f"'{spec.name}' is a potential, not a property model: the part after '+' must be {DIELECTRIC_MODEL} "
            "or a checkpoint of a multi-task model with born_effective_charges and dielectric_tensor heads; "
            f"{_COMPOSITE_HINT}."
        )
    return load_dielectric(device=device, dtype=dtype, trust_pickle=trust_pickle)


def _load_composite(text: str, *, device: str, dtype: str, trust_pickle: bool, download: bool,
                    allow: bool = False) -> Any:
    """``"A+B"``: potential A (name or checkpoint path) with property model B (Z*, eps_inf)."""
    from mattersim.composite import CompositeCalculator

    left, _, right = text.rpartition("+")
    left, right = left.strip(), right.strip()
    if not left or not right or "+" in left:
        raise InputError(f"Model '{text}' is not of the form POTENTIAL+PROPERTY_MODEL (one '+'); {_COMPOSITE_HINT}.")
    if _aliases().get(left.lower()) == DIELECTRIC_MODEL:
        raise InputError(
            f"'{left}' predicts no energies and cannot be the potential in '{text}'; put a potential first: "
            f"{_COMPOSITE_HINT}."
        )
    # the (small) property model first, so that a mistake there shows before a potential is downloaded
    properties = _with_elements(_load_property_model(right, device=device, dtype=dtype, trust_pickle=trust_pickle),
                                allow=allow)
    potential = load_calculator(left, device=device, dtype=dtype, trust_pickle=trust_pickle, download=download,
                                allow_untrained_elements=allow)
    return CompositeCalculator(potential, properties)
