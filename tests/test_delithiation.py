"""Li-rich cells and the delithiation analysis (workflows.delithiation) on hand-built structures."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import make_supercell

from mattersim.errors import InputError
from workflows.delithiation import Layers, analyse_snapshot, build_li_rich, layered_template, oxidation_state


def _limno2(n=(3, 3, 1)):
    cell = make_supercell(layered_template(), np.diag(n))
    cell.symbols[cell.symbols == "Co"] = "Mn"
    return cell


def test_builder_composition_layers_and_reproducibility():
    cell, info = build_li_rich(supercell="5 4 2", li_excess=24, seed=3)
    assert info["natoms"] == 480 and len(cell) == 480
    assert info["composition_per_O2"] == pytest.approx({"Li": 1.2, "Mn": 0.8, "O": 2.0})
    assert info["average_tm_oxidation_state"] == pytest.approx(3.5) and info["charge_balanced"]
    # spread evenly over the 6 TM layers of the 2-cell stack, and the Li layers keep only Li
    assert sum(info["substituted_per_tm_layer"]) == 24 and max(info["substituted_per_tm_layer"]) - min(
        info["substituted_per_tm_layer"]) <= 1 and len(info["substituted_per_tm_layer"]) == 6
    layers = Layers.from_structure(cell)
    li = np.flatnonzero(cell.symbols == "Li")
    mn = np.flatnonzero(cell.symbols == "Mn")
    assert not layers.in_li_layer(cell, mn).any()
    assert layers.in_li_layer(cell, li).sum() == 120  # the 120 Li of the Li layers; 24 more sit in TM layers
    again, info2 = build_li_rich(supercell="5 4 2", li_excess=24, seed=3)
    assert np.array_equal(again.numbers, cell.numbers) and info2 == info
    other, _ = build_li_rich(supercell="5 4 2", li_excess=24, seed=4)
    assert not np.array_equal(other.numbers, cell.numbers)
    _, info30 = build_li_rich(supercell="5 4 2", li_excess=30, seed=0)
    assert info30["composition_per_O2"]["Li"] == pytest.approx(1.25)


def test_builder_errors():
    with pytest.raises(InputError, match="not a transition metal"):
        build_li_rich(tm="Xx")
    with pytest.raises(InputError, match="li-excess"):
        build_li_rich(supercell="1 1 1", li_excess=10)
    with pytest.raises(InputError, match="layered LiMO2"):
        build_li_rich(template=make_supercell(layered_template(), np.eye(3, dtype=int))[[0, 1, 2]])


def test_oxidation_states_from_moments():
    assert [oxidation_state("Mn", m) for m in (3.1, -3.9, 4.6, 2.6)] == [4, 3, 2, 4]
    assert oxidation_state("Ni", 0.1) == 4 and oxidation_state("Ni", 1.8) == 2 and oxidation_state("Zr", 1) is None


def _move_pair(cell, distance):
    """Bring two O of one O layer (in-plane neighbours, 2.8 Å apart) to ``distance``."""
    o = np.flatnonzero(cell.symbols == "O")
    z = cell.get_scaled_positions()[o, 2]
    layer = o[np.abs(z - z[0]) < 1e-6]
    a, b = layer[0], layer[np.argsort(cell.get_distances(layer[0], layer, mic=True))[1]]
    vec = cell.get_distance(a, b, mic=True, vector=True)
    mid = cell.positions[a] + vec / 2
    cell.positions[a] = mid - vec / np.linalg.norm(vec) * distance / 2
    cell.positions[b] = mid + vec / np.linalg.norm(vec) * distance / 2
    return a, b


@pytest.mark.parametrize("distance, kind", [(1.21, "O2"), (1.33, "superoxo"), (1.47, "peroxo")])
def test_o_o_pairs_are_found_and_classified(distance, kind):
    cell = _limno2()
    layers = Layers.from_structure(cell)
    doc = analyse_snapshot(cell, layers)
    o = np.flatnonzero(cell.symbols == "O")
    every = cell.get_all_distances(mic=True)[np.ix_(o, o)][np.triu_indices(len(o), 1)]
    assert doc["o_o_pairs"] == [] and doc["o_o_shortest_A"] == pytest.approx(every.min(), abs=1e-9)
    assert 2.4 < doc["o_o_shortest_A"] < 2.8  # the shared edge of two MnO6 octahedra
    a, b = _move_pair(cell, distance)
    moments = np.zeros(len(cell))
    moments[[a, b]] = [0.8, 0.7]
    doc = analyse_snapshot(cell, layers, magmoms=moments)
    assert len(doc["o_o_pairs"]) == 1 and doc["o_o_counts"][kind] == 1
    pair = doc["o_o_pairs"][0]
    assert {pair["i"], pair["j"]} == {a, b} and pair["distance_A"] == pytest.approx(distance)
    assert doc["o_o_shortest_A"] == pytest.approx(distance)
    assert sorted(pair["magmoms_uB"]) == pytest.approx([0.7, 0.8]) and pair["charges_e"] is None
    assert doc["charges_note"].startswith("the model predicts no")


def test_a_rigid_translation_along_the_stacking_axis_is_no_migration():
    """The whole crystal moved by a third of a layer spacing (as a net drift would move it): nothing migrated;
    the same shift applied to the Mn alone puts them all in the Li layers."""
    cell = _limno2()
    layers = Layers.from_structure(cell)
    step = (layers.li_planes[0] - layers.tm_planes[0] + 0.5) % 1.0 - 0.5  # from a TM plane to a Li plane
    moved = cell.copy()
    moved.translate(moved.cell[2] * 0.7 * step)
    moved.wrap()
    assert analyse_snapshot(moved, layers)["migrated_counts"]["total"] == 0
    assert layers.shift(moved) == pytest.approx(0.7 * step, abs=1e-12)
    mn_only = cell.copy()
    mn = mn_only.symbols == "Mn"
    mn_only.positions[mn] += mn_only.cell[2] * 0.7 * step
    mn_only.wrap()
    assert analyse_snapshot(mn_only, layers)["migrated_counts"]["total"] == int(mn.sum())


def test_a_mn_in_a_tetrahedral_site_of_the_li_layer_is_a_migration():
    cell = _limno2()
    layers = Layers.from_structure(cell)
    doc = analyse_snapshot(cell, layers, magmoms=np.where(cell.symbols == "Mn", 3.9, 0.0))
    assert doc["migrated_counts"]["total"] == 0 and doc["tm_oxidation_mean"] == pytest.approx(3.0)
    # the tetrahedral site of the Li layer: above one O of the lower O layer, below a triangle of the upper one
    s = cell.get_scaled_positions()
    li_z = layers.li_planes[np.argmin(np.abs(layers.li_planes - 0.5))]
    o = np.flatnonzero(cell.symbols == "O")
    below = o[(s[o, 2] < li_z) & (s[o, 2] > li_z - 0.1)]
    above = o[(s[o, 2] > li_z) & (s[o, 2] < li_z + 0.1)]
    apex = below[0]
    d = cell.get_distances(apex, above, mic=True, vector=True)
    three = np.argsort(np.linalg.norm(d[:, :2], axis=1))[:3]
    site = cell.positions[apex] + (d[three].sum(axis=0)) / 4
    mn = np.flatnonzero(cell.symbols == "Mn")[0]
    cell.positions[mn] = site
    cell.wrap()
    doc = analyse_snapshot(cell, layers, magmoms=np.where(cell.symbols == "Mn", 3.9, 0.0))
    assert doc["migrated_counts"] == {"total": 1, "tetrahedral": 1, "octahedral": 0}
    assert doc["migrated_tm"][0]["index"] == mn and doc["migrated_tm"][0]["site"] == "tetrahedral"


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


class _Interrupt(Exception):
    pass


def _fresh_lj():
    from ase.calculators.calculator import all_changes
    from ase.calculators.lj import LennardJones

    class FreshLJ(LennardJones):
        """A pair potential for any element, rebuilt neighbour list at every call (bitwise reproducible), with
        moments on Mn that follow its surroundings (so that the analysis has something to track)."""

        implemented_properties = [*LennardJones.implemented_properties, "magmoms"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, ["energy", "forces", "stress", "energies"], ["numbers", *system_changes])
            self.results["magmoms"] = np.where(self.atoms.symbols == "Mn", 3.0 + 0.01 * np.sum(
                self.atoms.symbols == "Li"), 0.0)

    return FreshLJ(sigma=1.6, epsilon=0.02, rc=3.5, smooth=True)


def _small_cell():
    cell = make_supercell(layered_template(), np.diag([2, 1, 1]))
    cell.symbols[cell.symbols == "Co"] = "Mn"
    return cell


def test_removal_keeps_the_others_and_a_restart_across_removals_reproduces_the_run(tmp_path, monkeypatch):
    import ase.io

    from workflows.delithiation import DelithiationResult, run_delithiation

    cell = _small_cell()  # Li6 Mn6 O12: x = 1
    common = dict(temperature=300, timestep=1.0, remove_every=0.02, equilibrate=0.01, remove=2, until=1 / 3,
                  relax=False, seed=5, every=5, checkpoint_every=5)
    whole = run_delithiation(cell, _fresh_lj(), output_dir=tmp_path / "whole", **common)
    s = whole.series
    assert whole.summary["results"]["li_removed"] == 4 and whole.summary["results"]["segments"] == 3
    assert s["x"][0] == pytest.approx(1.0) and s["x"][-1] == pytest.approx(1 / 3)
    # across each removal: the other atoms keep their positions and velocities
    for k in (1, 2):
        before = ase.io.read(tmp_path / "whole" / "segments" / f"{k - 1:03d}" / "trajectory.extxyz", -1)
        after = ase.io.read(tmp_path / "whole" / "segments" / f"{k:03d}" / "trajectory.extxyz", 0)
        gone = np.array(whole.summary["results"]["removals"][k - 1]["original_indices"])
        assert len(gone) == 2
        snaps = ase.io.read(tmp_path / "whole" / "snapshots.extxyz", ":")
        from workflows.delithiation import _per_atom

        assert all(_per_atom(f, "magmoms") is not None for f in snaps)  # the model's moments travel along
        orig_before = [f for f in snaps if len(f) == len(before)][0].arrays["original_index"]
        keep = ~np.isin(orig_before, gone)
        assert np.array_equal(before.positions[keep], after.positions)
        # velocities: the same but for one common shift, the centre-of-mass velocity the removed Li left behind
        dv = after.get_velocities() - before.get_velocities()[keep]
        # (extxyz keeps momenta to 1e-8 amu Å per ASE time unit: velocities to about 1e-9)
        np.testing.assert_allclose(dv, np.broadcast_to(dv[0], dv.shape), rtol=0, atol=1e-8)
        assert np.abs(dv[0]).max() > 1e-6  # the removed atoms did carry momentum
        total = after.get_momenta().sum(axis=0)
        assert np.abs(total).max() < 1e-7 * len(after)
        assert set(before.symbols[~keep]) == {"Li"}
    # a run killed in the middle of the second interval continues to the same result
    calc = _fresh_lj()
    original, count = type(calc).calculate, [0]

    def stopping(self, *args, **kwargs):
        count[0] += 1
        if count[0] > 25:
            raise _Interrupt()
        original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(type(calc), "calculate", stopping)
        with pytest.raises(_Interrupt):
            run_delithiation(cell, calc, output_dir=tmp_path / "cut", **common)
    again = run_delithiation(cell, calc, output_dir=tmp_path / "cut", **common)
    for name, col in whole.series.items():
        assert np.array_equal(col, again.series[name], equal_nan=True), name
    loaded = DelithiationResult.load(tmp_path / "cut")
    assert loaded.summary["results"]["removals"] == whole.summary["results"]["removals"]
    for name in ("delithiation_vs_x.png", "delithiation_vs_time.png", "snapshots.extxyz", "start.extxyz"):
        assert (tmp_path / "cut" / name).is_file()
    assert any("charges" in note for note in loaded.summary["results"]["notes"])


def test_a_longer_hold_at_the_target_continues_the_finished_run(tmp_path):
    from workflows.delithiation import run_delithiation

    cell = _small_cell()  # Li6 Mn6 O12: x = 1; one removal of 3 Li reaches x = 1/2
    common = dict(temperature=300, timestep=1.0, remove_every=0.02, equilibrate=0.01, remove=3, until=0.5,
                  relax=False, seed=2, every=5, checkpoint_every=5)
    short = run_delithiation(cell, _fresh_lj(), hold=0.01, output_dir=tmp_path / "cont", **common)
    assert short.summary["results"]["time_ps"] == pytest.approx(0.01 + 0.01)
    assert short.summary["settings"]["hold_ps"] == 0.01
    longer = run_delithiation(cell, _fresh_lj(), hold=0.03, output_dir=tmp_path / "cont", **common)
    assert longer.summary["results"]["time_ps"] == pytest.approx(0.01 + 0.03)
    assert longer.series["x"][-1] == pytest.approx(0.5) and longer.summary["results"]["segments"] == 2
    fresh = run_delithiation(cell, _fresh_lj(), hold=0.03, output_dir=tmp_path / "fresh", **common)
    for name, col in fresh.series.items():  # continued = uninterrupted, bitwise
        assert np.array_equal(col, longer.series[name], equal_nan=True), name
    n = len(short.series["x"])
    assert np.array_equal(short.series["time_ps"], longer.series["time_ps"][:n])
    with pytest.raises(InputError, match=r"holds 0.03 ps at the target x already; give hold >= 0.03 ps"):
        run_delithiation(cell, _fresh_lj(), hold=0.01, output_dir=tmp_path / "cont", **common)
    # the default hold is one interval
    default = run_delithiation(cell, _fresh_lj(), output_dir=tmp_path / "default", **common)
    assert default.summary["results"]["time_ps"] == pytest.approx(0.01 + 0.02)
    with pytest.raises(InputError, match="hold = -1"):
        run_delithiation(cell, _fresh_lj(), hold=-1, output_dir=tmp_path / "bad", **common)


def test_delithiation_user_errors(tmp_path):
    from workflows.delithiation import run_delithiation

    cell = _small_cell()
    with pytest.raises(InputError, match="choose one of random"):
        run_delithiation(cell, _fresh_lj(), select="best", output_dir=tmp_path)
    with pytest.raises(InputError, match="target 0 <= x < 1"):
        run_delithiation(cell, _fresh_lj(), until=1.5, output_dir=tmp_path)
    from ase.calculators.lj import LennardJones

    class NoAtomicEnergies(LennardJones):
        implemented_properties = ["energy", "free_energy", "forces", "stress"]

    with pytest.raises(InputError, match="per-atom energies"):
        run_delithiation(cell, NoAtomicEnergies(), select="highest-energy", output_dir=tmp_path)


@pytest.mark.slow
def test_chgnet_moments_tell_mn3_from_mn4():
    """Relaxed (as the workflow does), CHGNet gives about 3.9 μB on Mn in LiMnO2 (Jahn-Teller Mn3+) and 3.1 μB
    in Li2MnO3 (Mn4+); on the unrelaxed LiCoO2 lattice LiMnO2's Mn has 3.3 μB, between the two."""
    pytest.importorskip("chgnet")
    from mattersim.registry import load_calculator
    from mattersim.relax import relax

    calc = load_calculator("chgnet")
    limno2 = _small_cell()  # Li Mn O2: Mn3+
    li2mno3, info = build_li_rich(supercell="3 1 1", li_excess=3, seed=0)  # Li4/3 Mn2/3 O2 = Li2MnO3: Mn4+
    assert info["average_tm_oxidation_state"] == pytest.approx(4.0)
    found = {}
    for name, atoms in (("LiMnO2", limno2), ("Li2MnO3", li2mno3)):
        a = relax(atoms, calc, fmax=0.05, steps=300).atoms.copy()
        a.calc = calc
        moments = a.get_magnetic_moments()
        found[name] = analyse_snapshot(a, Layers.from_structure(atoms), magmoms=moments)
    assert found["LiMnO2"]["tm_oxidation_mean"] == pytest.approx(3.0)
    assert found["Li2MnO3"]["tm_oxidation_mean"] == pytest.approx(4.0)
    assert found["LiMnO2"]["tm_moment_mean_uB"] > found["Li2MnO3"]["tm_moment_mean_uB"] + 0.5
