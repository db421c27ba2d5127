"""One parser per setting (mattersim.settings): what users write, what Python callers pass, one clear error."""

from __future__ import annotations

import numpy as np
import pytest

from mattersim.errors import InputError
from mattersim.settings import parse_mesh, parse_pressures, parse_primitive, parse_supercell


def test_supercell_forms_agree():
    diag = np.diag([2, 2, 3])
    for value in ("2 2 3", "2,2,3", [2, 2, 3], np.array([2, 2, 3]), "2 0 0 0 2 0 0 0 3", diag, diag.tolist()):
        assert np.array_equal(parse_supercell(value), diag), value
    assert np.array_equal(parse_supercell("3"), 3 * np.eye(3, dtype=int))
    assert parse_supercell(None) is None
    skew = "-1 1 1 1 -1 1 1 1 -1"  # the fcc -> conventional supercell (4 cells)
    assert round(np.linalg.det(parse_supercell(skew))) == 4


@pytest.mark.parametrize("value,fragments", [
    ("2 x 2", ("--supercell", "not a list of integers", "3 positive integers")),
    ("2 2", ("--supercell has 2 integers", "9 integers")),
    ("2 0 2", ("--supercell", "below 1")),
    ("1 0 0 0 1 0 0 0 0", ("--supercell", "singular")),
    ("-1 0 0 0 1 0 0 0 1", ("--supercell", "negative determinant")),
    ([1.5, 2, 2], ("--supercell", "integers")),
    (["a", "b", "c"], ("--supercell", "3 numbers or a 3x3 matrix")),  # from Python: an error, not a ValueError
])
def test_supercell_errors_name_the_flag(value, fragments):
    with pytest.raises(InputError) as info:
        parse_supercell(value, "--supercell")
    for fragment in fragments:
        assert fragment in str(info.value)


def test_mesh_forms():
    assert parse_mesh("20 20 20") == [20, 20, 20] and parse_mesh([4, 4, 6]) == [4, 4, 6]
    assert parse_mesh("50") == 50.0 and parse_mesh(50) == 50.0 and parse_mesh(np.float64(32.5)) == 32.5
    for bad in ("20 20", "0 1 1", "2.5 2 2", "-5", "x", True, [0.0]):
        with pytest.raises(InputError, match="--mesh .* 3 positive integers"):
            parse_mesh(bad, "--mesh")


def test_primitive_forms():
    fcc = parse_primitive("0 1/2 1/2 1/2 0 1/2 1/2 1/2 0")
    assert np.allclose(fcc, 0.5 * (np.ones((3, 3)) - np.eye(3)))
    assert parse_primitive("auto") == "auto" and parse_primitive(" AUTO ") == "auto"
    assert parse_primitive("f") == "F" and parse_primitive(None) == "P"
    assert np.allclose(parse_primitive(np.eye(3)), np.eye(3))
    with pytest.raises(InputError, match=r"--primitive-axis = '0 1/2 1/2' cannot be read.*9 numbers"):
        parse_primitive("0 1/2 1/2", "--primitive-axis")
    with pytest.raises(InputError, match="singular"):
        parse_primitive("1 0 0 0 1 0 0 0 0")


def test_pressures():
    assert parse_pressures("0:200:20") == [float(p) for p in range(0, 201, 20)]  # stop included
    assert parse_pressures("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_pressures("100, 0 50") == [0.0, 50.0, 100.0]  # sorted
    assert parse_pressures("0,0,10") == [0.0, 10.0] and parse_pressures(5) == [5.0]
    assert parse_pressures("-10:10:10") == [-10.0, 0.0, 10.0]  # tension allowed
    for bad, fragment in (("0:200", "start:stop:step"), ("0:200:0", "step must be positive"),
                          ("200:0:10", "stop >= start"), ("0:1000:0.001", "at most"), ("a,b", "not a list")):
        with pytest.raises(InputError, match=fragment):
            parse_pressures(bad, "--pressures")


def test_parse_quantity_units_and_errors():
    from mattersim.settings import TIME_UNITS_FS, parse_quantity

    assert parse_quantity("200ps", TIME_UNITS_FS, "period", "200ps") == (2e5, "ps")
    assert parse_quantity(" 1.5e3 FS ", TIME_UNITS_FS, "period", "200ps") == (1500.0, "FS")
    assert parse_quantity("5", TIME_UNITS_FS, "--remove-every", "5ps", default_unit="ps") == (5000.0, "ps")
    for bad in ("5", "5 min", "ps", "1..2ps"):
        with pytest.raises(InputError, match=r"'period' .* needs a number and a unit \(fs, ns, ps\), e.g. 200ps"):
            parse_quantity(bad, TIME_UNITS_FS, "'period'", "200ps")
