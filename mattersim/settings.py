"""One parser per setting shared by the CLI, the workflows, the benchmarks and the data readers.

Each parser takes what a user writes (a string from a flag or a settings file) or what a Python caller
passes (numbers, lists, arrays), returns one canonical value, and raises one :class:`InputError` that
names the setting as the caller calls it (``name``: ``"--supercell"``, ``"supercell"``,
``"'phonopy.conf' line 1: DIM"``) and says what to write instead.

- :func:`parse_supercell`: phonopy's ``DIM``: one integer n (n n n), 3 integers (diagonal) or 9 (a 3x3
  matrix, row by row; the supercell's lattice vectors in units of the unit cell's) -> 3x3 int array;
- :func:`parse_mesh`: 3 positive integers (a Γ-centred mesh) or one length in Å (phonopy's mesh density);
- :func:`parse_primitive`: ``auto``, a centring letter (P, F, I, A, C, R) or 9 numbers (fractions such as
  1/2 allowed; phonopy's ``PRIMITIVE_AXES``) -> ``"auto"``, the letter or a 3x3 float array;
- :func:`parse_pressures`: ``0:200:20`` (start:stop:step in GPa, stop included), ``0,50,100`` or one
  number -> a sorted list of distinct pressures in GPa;
- :func:`parse_quantity`: a number with a unit (``200ps``, ``4MV/cm``) -> the value in the base unit of a
  unit table (e.g. :data:`TIME_UNITS_FS`) and the unit as written.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

import numpy as np

from mattersim.errors import InputError

__all__ = ["TIME_UNITS_FS", "as_matrix", "parse_mesh", "parse_numbers", "parse_pressures", "parse_primitive",
           "parse_quantity", "parse_supercell"]

_CENTRINGS = ("P", "F", "I", "A", "C", "R")
#: the largest number of pressures a range may expand to (a typo such as 0:200:0.002 is refused)
MAX_PRESSURES = 1000
#: time units -> fs
TIME_UNITS_FS = {"fs": 1.0, "ps": 1e3, "ns": 1e6}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def parse_quantity(text: str, units: dict[str, float], name: str, example: str, *,
                   default_unit: str | None = None) -> tuple[float, str]:
    """``text`` such as ``200ps`` -> (value x ``units[unit]``, the unit as written); units are matched
    without regard to case. ``default_unit`` (a key of ``units``) makes the unit optional. An
    InputError names ``name`` and shows ``example`` otherwise."""
    m = re.fullmatch(rf"\s*({_NUMBER})\s*([A-Za-zÅ/]*)\s*", str(text))
    unit = (m.group(2) or default_unit or "") if m else ""
    if not m or unit.lower() not in units:
        listed = ", ".join(sorted({u for u in units if u.isascii()}))
        raise InputError(f"{name} {text!r} needs a number and a unit ({listed}), e.g. {example}.")
    return float(m.group(1)) * units[unit.lower()], unit


def _tokens(text: str, convert, error: str) -> list:
    """The space- or comma-separated items of ``text``, each through ``convert``; InputError(error) if one fails."""
    try:
        return [convert(p) for p in text.replace(",", " ").split()]
    except (ValueError, ZeroDivisionError):
        raise InputError(error) from None


def _fraction(text: str) -> float:
    return float(Fraction(text))


def parse_numbers(value: Any, name: str) -> list[float]:
    """'2 2 2', '0 1/2 1/2 ...', '2,2,2' or a sequence of numbers -> floats (fractions allowed)."""
    if isinstance(value, str):
        return _tokens(value, _fraction, f"{name} {value!r} is not a list of numbers; write e.g. \"2 2 2\".")
    try:
        return [float(x) for x in np.asarray(value, dtype=float).ravel()]
    except (TypeError, ValueError):
        raise InputError(f"{name} {value!r} is not a list of numbers; write e.g. \"2 2 2\".") from None


def as_matrix(value: Any, name: str, *, integer: bool) -> np.ndarray:
    """1 number -> n*I; 3 numbers -> diagonal matrix; 9 numbers or 3x3 -> matrix; else InputError. Singular
    matrices and (for ``integer``) non-integers or a negative determinant are refused."""
    try:
        arr = np.array(value, dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be 3 numbers or a 3x3 matrix, not {value!r}.") from None
    if arr.shape in ((), (1,)):
        arr = np.eye(3) * float(arr.reshape(-1)[0])
    elif arr.shape == (3,):
        arr = np.diag(arr)
    elif arr.shape == (9,):
        arr = arr.reshape(3, 3)
    if arr.shape != (3, 3) or not np.all(np.isfinite(arr)):
        raise InputError(f"{name} must be 3 numbers or a 3x3 matrix, not {value!r}.")
    if integer:
        if not np.allclose(arr, np.rint(arr), atol=1e-8):
            raise InputError(f"{name} must contain integers, not {value!r}.")
        arr = np.rint(arr).astype(int)
    if abs(np.linalg.det(arr)) < 1e-8:
        raise InputError(f"{name} {np.asarray(value).tolist()} is singular (determinant 0); give three independent rows.")
    if integer and np.linalg.det(arr) < 0:
        raise InputError(f"{name} {np.asarray(value).tolist()} has a negative determinant; use a right-handed "
                         "supercell matrix.")
    return arr


def parse_supercell(value: Any, name: str = "supercell") -> np.ndarray | None:
    """phonopy's ``DIM`` -> 3x3 int matrix (None stays None: automatic)."""
    if value is None:
        return None
    hint = "give 3 positive integers (\"2 2 2\"), one (n for n n n) or 9 integers (a 3x3 matrix, row by row)"
    if isinstance(value, str):
        numbers = _tokens(value, int, f"{name} = {value!r} is not a list of integers; {hint}.")
        if len(numbers) not in (1, 3, 9):
            raise InputError(f"{name} has {len(numbers)} integers; {hint}.")
        value = numbers
    try:
        flat = np.asarray(value, dtype=float).ravel()
    except (TypeError, ValueError):  # not numbers: as_matrix below says so
        flat = np.zeros(0)
    if flat.size in (1, 3) and not np.all(flat >= 1):
        raise InputError(f"{name} {np.asarray(value).tolist()} has a value below 1; {hint}.")
    return as_matrix(value, name, integer=True)


def parse_mesh(value: Any, name: str = "mesh") -> float | list[int]:
    """3 positive integers (a Γ-centred mesh) -> [n1, n2, n3]; one positive number -> a length in Å."""
    hint = "give 3 positive integers (\"20 20 20\") or one length in Å (phonopy's mesh density, e.g. 50)"
    if isinstance(value, bool):
        raise InputError(f"{name} {value!r} is not understood; {hint}.")
    if isinstance(value, str):
        numbers = _tokens(value, float, f"{name} {value!r} is not understood; {hint}.")
    else:
        try:
            numbers = [float(x) for x in np.asarray(value, dtype=float).ravel()]
        except (TypeError, ValueError):
            raise InputError(f"{name} {value!r} is not understood; {hint}.") from None
    if len(numbers) == 1 and np.isfinite(numbers[0]) and numbers[0] > 0:
        return float(numbers[0])
    if len(numbers) == 3 and all(np.isfinite(v) and v >= 1 and v == int(v) for v in numbers):
        return [int(v) for v in numbers]
    raise InputError(f"{name} {value!r} is not understood; {hint}.")


def parse_primitive(value: Any, name: str = "primitive") -> str | np.ndarray:
    """``"auto"``, a centring letter or a 3x3 matrix (None: ``"P"``, the unit cell itself)."""
    if value is None:
        return "P"  # the unit cell (phonopy 4 reads primitive_matrix=None as "auto")
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "auto":
            return "auto"
        if text.upper() in _CENTRINGS:
            return text.upper()
        error = (f"{name} = {value!r} cannot be read; give 'auto', a centring letter (P, F, I, A, C, R) or 9 "
                 "numbers (fractions like 1/2 allowed, row by row).")
        value = _tokens(text, _fraction, error)
        if len(value) != 9:
            raise InputError(error)
    return as_matrix(value, name, integer=False)


def parse_pressures(value: Any, name: str = "pressures") -> list[float]:
    """``start:stop:step`` (GPa, stop included), a comma/space separated list or one number -> sorted,
    distinct pressures in GPa."""
    hint = "write start:stop:step in GPa (\"0:200:20\"), a list (\"0,50,100\") or one pressure"
    if isinstance(value, str) and ":" in value:
        parts = value.split(":")
        try:
            start, stop, step = (float(p) for p in parts) if len(parts) == 3 else (None, None, None)
        except ValueError:
            start = stop = step = None
        if start is None or not all(np.isfinite(x) for x in (start, stop, step)):
            raise InputError(f"{name} {value!r} is not understood; {hint}.")
        if step <= 0 or stop < start:
            raise InputError(f"{name} {value!r}: the step must be positive and stop >= start; {hint}.")
        count = int(np.floor((stop - start) / step + 1e-9)) + 1
        if count > MAX_PRESSURES:
            raise InputError(f"{name} {value!r} gives {count} pressures (at most {MAX_PRESSURES}); use a larger step.")
        values = [start + k * step for k in range(count)]
    else:
        values = parse_numbers(value, name)
        if not values or not all(np.isfinite(v) for v in values):
            raise InputError(f"{name} {value!r} is not understood; {hint}.")
    return sorted({round(v, 10) for v in values})
