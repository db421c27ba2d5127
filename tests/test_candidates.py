"""Candidate structures of a chemical system (workflows.candidates): the Materials Project through mp-api against
a local fake server (never the network), PyXtal random crystals, duplicates, compositions."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from mattersim.errors import InputError
from workflows.candidates import distinct, mp_candidates, parse_composition, random_structures


# ---------------------------------------------------------------------------------------------------------
# the Materials Project, through mp-api, against a local server that answers as the real API does (fake_mp
# in conftest.py)
# ---------------------------------------------------------------------------------------------------------


def test_mp_structures_of_the_system_and_its_subsystems(fake_mp, monkeypatch):
    pytest.importorskip("mp_api")
    monkeypatch.delenv("MP_API_KEY", raising=False)
    cands = mp_candidates(["Mg", "O"], api_key="k" * 32, endpoint=fake_mp.url, max_above_hull=0.2)
    labels = [lab for lab, _ in cands]
    # sorted by formula and id; B2 MgO (0.42 eV/atom above MP's hull) and the 64-atom cell are left out
    assert labels == ["Mg-mp-153", "MgO-mp-1265", "O2-mp-12957"]
    mgo = dict(cands)["MgO-mp-1265"]
    assert mgo.get_chemical_formula() == "Mg4O4" and mgo.get_volume() == pytest.approx(4.21 ** 3)
    assert mgo.info["material_id"] == "mp-1265" and mgo.calc is None
    (path, query, _), = [r for r in fake_mp.requests if r[0].startswith("/materials/summary")]
    # every sub-system, as MP writes a chemsys (sorted elements)
    assert sorted(query["chemsys"].split(",")) == ["Mg", "Mg-O", "O"]
    assert {"material_id", "structure"} <= set(query["_fields"].split(","))
    # no limit: B2 comes back; the key may come from the environment
    monkeypatch.setenv("MP_API_KEY", "k" * 32)
    labels = [lab for lab, _ in mp_candidates(["Mg", "O"], endpoint=fake_mp.url, max_above_hull=None)]
    assert "MgO-mp-1009129" in labels and "Mg-mp-99999" not in labels
    assert "Mg-mp-99999" in [lab for lab, _ in mp_candidates(["Mg", "O"], endpoint=fake_mp.url, max_above_hull=None,
                                                           max_atoms=None)]


def test_mp_errors_say_what_to_do(fake_mp, monkeypatch):
    pytest.importorskip("mp_api")
    monkeypatch.delenv("MP_API_KEY", raising=False)
    with pytest.raises(InputError, match="MP_API_KEY"):
        mp_candidates(["Mg", "O"], endpoint=fake_mp.url)
    with pytest.raises(InputError, match="did not answer.*MP_API_KEY"):  # a key the server refuses
        mp_candidates(["Mg", "O"], api_key="x" * 32, endpoint=fake_mp.url)
    with pytest.raises(InputError, match="127.0.0.1:9"):  # nothing listens there
        mp_candidates(["Mg", "O"], api_key="k" * 32, endpoint="http://127.0.0.1:9/")


def test_mp_without_mp_api_installed(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mp_api(name, *args, **kwargs):
        if name.startswith("mp_api"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mp_api)
    with pytest.raises(InputError, match="pip install mp-api"):
        mp_candidates(["Mg", "O"], api_key="k" * 32)


# ---------------------------------------------------------------------------------------------------------
# random crystals and duplicates
# ---------------------------------------------------------------------------------------------------------


def test_random_structures_are_reproducible_and_have_the_composition():
    pytest.importorskip("pyxtal")
    comp = parse_composition("LaH10")
    a = random_structures(comp, 4, seed=7, max_atoms=22)
    b = random_structures(comp, 4, seed=7, max_atoms=22)
    c = random_structures(comp, 4, seed=8, max_atoms=22)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.numbers, y.numbers)
        np.testing.assert_allclose(x.positions, y.positions)
        np.testing.assert_allclose(x.cell[:], y.cell[:])
    assert any(len(x) != len(y) or not np.allclose(x.positions, y.positions) for x, y in zip(a, c))
    for x in a:
        n_la, n_h = (x.get_chemical_symbols().count(el) for el in ("La", "H"))
        assert n_h == 10 * n_la and len(x) <= 22 and x.pbc.all()
        # no two atoms closer than 3/4 of their covalent radii (PyXtal alone lets H-H come to 0.35 Å)
        from ase.data import covalent_radii

        r = covalent_radii[x.numbers]
        d = x.get_all_distances(mic=True) + 10 * np.eye(len(x))
        assert (d >= 0.75 * (r[:, None] + r[None, :])).all() and d.min() > 0.46
    with pytest.raises(InputError, match="max_atoms"):
        random_structures(comp, 1, max_atoms=8)


def test_distinct_drops_the_same_crystal_at_another_volume_and_orientation():
    fcc = bulk("Cu", "fcc", a=3.6)
    fcc_big = bulk("Cu", "fcc", a=3.9, cubic=True)  # the same crystal: conventional cell, larger volume
    fcc_big.rotate(30, "z", rotate_cell=True)
    bcc = bulk("Cu", "bcc", a=2.9)
    assert distinct([fcc, bcc, fcc_big, bcc.repeat(2)]) == [0, 1]


def test_compositions_are_parsed_or_refused():
    assert parse_composition("LaH10") == {"La": 1, "H": 10}
    assert parse_composition(" Mg2SiO4 ") == {"Mg": 2, "Si": 1, "O": 4}
    for bad in ("", "Qq2", "la h"):
        with pytest.raises(InputError, match="not a chemical formula"):
            parse_composition(bad)
