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
``"composite"`` or ``"ase"``).

Nothing here downloads anything unless a MatterSim model is asked for by name, is not cached, and
``download=True``; :func:`default_model` only ever picks a model that is already on this machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.error import URLError
from urllib.request import Request, urlopen

from mattersim.adapters import batched_chgnet_calculator
from mattersim.errors import CheckpointError, InputError, ModelNotAvailableError

__all__ = [
    "DIELECTRIC_MODEL",
    "KNOWN_MODELS",
    "ModelSpec",
    "cache_dir",
    "default_model",
    "download_file",
    "download_model",
    "file_sha256",
    "is_available",
    "list_models",
    "load_calculator",
    "model_path",
    "models_dir",
    "resolve_name",
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
        ),
        ModelSpec(
            name="sevennet-0",
            kind="sevennet",
            description="SevenNet-0 (11Jul2024), shipped inside the sevenn package",
            version="11Jul2024",
            license="MIT (sevenn 0.13; releases before the licence change were GPL-3.0)",
            package="sevenn",
            aliases=("7net-0", "sevennet"),
        ),
        ModelSpec(
            name="chgnet",
            kind="chgnet",
            description="CHGNet 0.3.0 (MPtrj), shipped inside the chgnet package; also predicts magmoms",
            version="0.3.0",
            license="BSD-3-Clause (Modified BSD)",
            package="chgnet",
            aliases=("chgnet-0.3.0",),
        ),
        ModelSpec(
            name="mattersim-dielectric",
            kind="dielectric",
            description="Born effective charges Z* and eps_inf only (ensemble of multi-task models trained on "
                        "PhononDB); combine it with a potential: <potential>+mattersim-dielectric",
            version="see card.json",
            license="model MIT; training data PhononDB by A. Togo, CC BY 4.0",
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
    ``available`` (loadable offline now), ``path`` (weights file on this machine, or None; the members'
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


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file, memoised on (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_cached(str(p), st.st_size, st.st_mtime_ns)


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
    from rich.console import Console
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
    with Progress(*columns, console=Console(stderr=True)) as bar:
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
    with open(path, "rb") as handle:
        magic = handle.read(4)
    return None if magic == b"PK\x03\x04" else "is not a PyTorch checkpoint (no zip header)"


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
        sha256=sha, device=device, dtype=dtype, extra={"license": spec.license, "url": spec.url},
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
        "device": device,
        "dtype": "float32",
    })


def _load_sevennet(spec: ModelSpec, *, device: str, dtype: str) -> Any:
    _float32_only(spec.name, dtype)
    try:
        from sevenn.calculator import SevenNetCalculator
    except ImportError as exc:
        raise _missing_package(spec, exc) from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tensor product accelerator", torch.load notices
        calc = SevenNetCalculator("7net-0", device=device)
    path = _weights_file(spec)
    return _attach(calc, {
        "name": spec.name,
        "version": spec.version,
        "source": str(path) if path else f"sevenn {_package_version('sevenn')}",
        "sha256": file_sha256(path) if path else None,
        "kind": "sevennet",
        "package": f"sevenn {_package_version('sevenn')}",
        "license": spec.license,
        "device": device,
        "dtype": "float32",
    })


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
    """
    _check_args(device, dtype)
    from ase.calculators.calculator import BaseCalculator

    if isinstance(model, BaseCalculator):
        if getattr(model, "model_info", None) is None:
            _attach(model, {
                "name": type(model).__name__,
                "version": None,
                "source": type(model).__module__,
                "sha256": None,
                "kind": "ase",
            })
        return model
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
        return _load_composite(text, device=device, dtype=dtype, trust_pickle=trust_pickle, download=download)
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


def _load_composite(text: str, *, device: str, dtype: str, trust_pickle: bool, download: bool) -> Any:
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
    properties = _load_property_model(right, device=device, dtype=dtype, trust_pickle=trust_pickle)
    potential = load_calculator(left, device=device, dtype=dtype, trust_pickle=trust_pickle, download=download)
    return CompositeCalculator(potential, properties)
