"""What every workflow writes, in one place: the run folder, the resumable array store, the summary header.

A workflow (see docs/writing-a-workflow.md) is ``run_<name>(structure, calculator, *, settings...,
output_dir=None) -> <Name>Result``. Its plumbing comes from here:

- :class:`RunFolder`: the output folder, checked before any work (:meth:`RunFolder.check`), created on
  :meth:`RunFolder.open`, with the workflow's log file ``<name>.log`` and atomic writes that record every file
  written (the summary lists them); ``output_dir=None`` gives a folder that writes nothing.
- :class:`ArrayStore`: a resumable ``.npz`` of named arrays keyed on the structure, the settings and the
  model identity (:func:`run_key`); written atomically after each unit of work, so that an interrupted run
  resumes where it stopped and a run with other inputs never reuses it (the old file is kept as ``.old``).
- :func:`summary_header`: the keys that open every ``summary.json`` / ``<name>.json`` (workflow name and
  version, software versions, platform, model identity, settings with units, timings, files written).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mattersim.errors import InputError
from mattersim.io import RunLog, atomic_path, atomic_write_json, ensure_writable_dir, to_builtin

__all__ = ["ArrayStore", "RunFolder", "SOFTWARE", "load_summary", "model_identity", "run_key", "software_versions", "summary_header"]

#: the packages whose versions shape the numbers (recorded in every summary and benchmark)
SOFTWARE = ("mattersim", "torch", "numpy", "scipy", "ase", "phonopy", "spglib", "pymatgen", "chgnet", "sevenn")


def software_versions() -> dict[str, str | None]:
    """Versions of Python, the platform and the packages that shape the numbers (None: not installed)."""
    return dict(_software_versions())


@functools.lru_cache(maxsize=1)
def _software_versions() -> dict[str, str | None]:
    # looked up once per process: reading the installed packages' metadata takes ~30 ms, which a benchmark
    # of thousands of small workflow runs would pay every time
    out: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in SOFTWARE:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def model_identity(info: dict, *, potential_only: bool = True) -> dict:
    """The part of a calculator's ``model_info`` that decides its numbers (name, version, kind, sha256,
    dtype, model arguments; the class and module of a plain ASE calculator). For a composite (potential +
    property model) the potential's identity, since forces and energies come from it alone, unless
    ``potential_only=False`` (results that use the property model too, such as predicted NAC)."""
    if potential_only and info.get("kind") == "composite" and isinstance(info.get("potential"), dict):
        info = info["potential"]
    model = {k: info.get(k) for k in ("name", "version", "kind", "sha256", "dtype", "model_args")}
    if model.get("sha256") is None:  # ASE calculators: their class and module
        model["source"] = info.get("source")
    return model


def run_key(structure: Any, settings: dict, info: dict, *, fmt: int = 1) -> str:
    """sha256 of the structure record, the settings and the model identity (:func:`model_identity`): what an
    :class:`ArrayStore` must match to be reused. ``fmt``: the store's layout version."""
    doc = {"format": fmt, "structure": structure, "settings": settings, "model": model_identity(info)}
    return hashlib.sha256(json.dumps(to_builtin(doc), sort_keys=True, default=str).encode()).hexdigest()


class ArrayStore:
    """A resumable ``.npz`` of named numpy arrays (``data``) belonging to one run (``key``).

    ``load(log)`` reads the file when its key matches (True), moves a file of another run aside to
    ``<name>.old`` and starts afresh (False), and treats an unreadable file as absent (False). ``save()``
    writes atomically. With ``path=None`` nothing is read or written (a run without an output folder).
    """

    def __init__(self, path: str | os.PathLike | None, key: str):
        self.path = Path(path) if path is not None else None
        self.key = key
        self.data: dict[str, np.ndarray] = {}

    def load(self, log: RunLog | logging.Logger) -> bool:
        if self.path is None or not self.path.exists():
            return False
        try:
            with np.load(self.path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except Exception as exc:  # half-written by another program, a foreign file
            log.warning(f"{self.path} is unreadable ({type(exc).__name__}: {exc}); starting afresh.")
            return False
        if str(data.get("key", "")) != self.key:
            backup = self.path.with_name(self.path.name + ".old")
            os.replace(self.path, backup)
            log.warning(f"{self.path} was computed for a different structure, settings, model or data; moved it "
                        f"to {backup.name} and starting afresh.")
            return False
        data.pop("key", None)
        self.data = data
        return True

    def save(self) -> None:
        if self.path is None:
            return
        with atomic_path(self.path) as tmp:
            np.savez(tmp, key=np.array(self.key), **self.data)


class RunFolder:
    """The output folder of one workflow run (or none: ``path=None`` writes nothing).

    ``RunFolder.check(path)`` before any work, creating nothing (a file in the way, or a folder that cannot be
    written, is an :class:`InputError` naming it and ``option``); ``open()`` creates it and starts ``<workflow>.log``;
    ``write_json`` / ``write_with`` write atomically and remember the names for :attr:`files`; ``close()`` (or
    the ``with`` block) closes the log. ``log`` works without a folder too (to ``logger`` only).
    """

    def __init__(self, path: str | os.PathLike | None, workflow: str, logger: logging.Logger | None = None, *,
                 option: str = "output_dir"):
        self.path = Path(path) if path is not None else None
        self.workflow = workflow
        self.option = option
        self._logger = logger or logging.getLogger(f"mattersim.{workflow}")
        self._written: set[str] = set()
        self.log: RunLog = RunLog(None, self._logger)

    @staticmethod
    def check(path: str | os.PathLike | None, option: str = "output_dir") -> Path | None:
        """Check, before any work and without creating anything, that ``path`` is or can become a folder
        that accepts files (None passes): a file in the way or an unwritable parent is an InputError."""
        if path is None:
            return None
        folder = Path(os.fspath(path))
        if folder.exists() and not folder.is_dir():
            raise InputError(f"Output folder '{folder}' exists and is not a folder; choose another {option}.")
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(f"Output folder '{folder}' cannot be created or written ('{existing}' is not a writable "
                             f"folder); choose another {option}.")
        return folder

    def open(self) -> "RunFolder":
        if self.path is not None:
            ensure_writable_dir(self.path, option=self.option)
            self.log = RunLog(self.path / f"{self.workflow}.log", self._logger)
            self._written.add(f"{self.workflow}.log")
        return self

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> "RunFolder":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def file(self, name: str) -> Path | None:
        """The path of ``name`` in the folder (recorded as written), or None without a folder."""
        if self.path is None:
            return None
        self._written.add(name)
        return self.path / name

    def write_json(self, name: str, doc: Any) -> Path | None:
        path = self.file(name)
        if path is not None:
            atomic_write_json(path, doc)
        return path

    def write_with(self, name: str, writer) -> Path | None:
        """``writer(tmp_path)`` writes the file; it replaces ``name`` atomically when the writer succeeds."""
        path = self.file(name)
        if path is not None:
            with atomic_path(path) as tmp:
                writer(tmp)
        return path

    def record(self, names: Iterable[str]) -> None:
        """Names written by other code (phonopy, matplotlib helpers) into the folder."""
        self._written.update(names)

    @property
    def files(self) -> list[str]:
        """Names of the files written (or being written: the summary lists itself), sorted, relative to the folder."""
        return sorted(self._written) if self.path is not None else []


def summary_header(workflow: str, version: int | str, info: dict, settings: dict, units: dict,
                   timings: dict | None = None, files: list[str] | None = None) -> dict:
    """The keys that open every workflow summary: ``workflow``, ``workflow_version``, ``mattersim_version``,
    ``software`` (:func:`software_versions`), ``platform``, ``model`` (the calculator's ``model_info``),
    ``settings`` (numbers with their unit in the key name or in ``units``), ``units``, ``timings_s`` and
    ``files`` (when given)."""
    software = software_versions()
    header = {
        "workflow": workflow,
        "workflow_version": version,
        "mattersim_version": software.get("mattersim"),
        "software": software,
        "platform": software["platform"],
        "model": info,
        "settings": settings,
        "units": units,
    }
    if timings is not None:
        header["timings_s"] = timings
    if files is not None:
        header["files"] = files
    return header


def load_summary(directory: str | os.PathLike, name: str, others: Iterable[str], what: str) -> dict:
    """The JSON summary ``name`` of a finished run in ``directory`` (for the ``<Name>Result.load`` methods),
    after checking that it and the files ``others`` exist; an InputError naming the file otherwise.
    ``what``: the workflow, for the message (e.g. "run_relax / 'mattersim relax'")."""
    directory = Path(directory)
    for path in [directory / o for o in others] + [directory / name]:
        if not path.is_file():
            raise InputError(f"'{path}' does not exist; pass the output folder of a finished {what}.")
    path = directory / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"'{path}' is not readable JSON ({exc}); run the {what} again.") from None


def save_png(fig, filename, title: str) -> None:
    """PNG at 150 dpi with a Title field; fast zlib level (the default level costs more than the drawing)."""
    fig.savefig(filename, dpi=150, metadata={"Title": title}, pil_kwargs={"compress_level": 1})


def figure(path, title: str, draw, *, shape=(1, 1), figsize=(6.5, 4.5), squeeze: bool = True) -> None:
    """A PNG at ``path``: ``draw(axes)`` on a new matplotlib figure of ``shape`` panels (``squeeze`` as in
    ``plt.subplots``), ``title`` above and in the file's metadata (:func:`save_png`); the figure is closed
    even when drawing fails."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*shape, figsize=figsize, squeeze=squeeze)
    try:
        draw(axes)
        fig.suptitle(title)
        fig.tight_layout()
        save_png(fig, path, title)
    finally:
        plt.close(fig)
