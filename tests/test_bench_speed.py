"""The phonon speed benchmark runs and its tools agree (no timing is asserted: speed is measured in the
benchmark itself, never in tests)."""

import pytest


@pytest.mark.slow
def test_speed_phonon_tools_give_the_same_bands():
    pytest.importorskip("chgnet")
    from benchmarks.speed_phonon import run

    report = run(["chgnet"], ["Si"], repeats=1)
    row = report["results"]["chgnet/Si"]
    assert set(row["tools"]) >= {"mattersim", "phonopy_by_hand"}
    for tool, r in row["tools"].items():
        assert r["total"] >= r["relaxation"] + r["force_evaluation"] > 0
        # relaxed to 1e-3 eV/Å by each tool: the lattice constants agree to 1e-3 Å and the bands (with the
        # same acoustic-sum-rule symmetrisation) to a few hundredths of a THz
        assert abs(r["lattice_lengths_A"][0] - row["tools"]["mattersim"]["lattice_lengths_A"][0]) < 1e-3
        assert r["band_max_abs_diff_vs_mattersim_same_asr_THz"] < 0.05, (tool, r)
    assert row["speedup_vs_fastest_peer"] > 0
