"""benchmarks.speed_elastic's agreement check: our workflow against matcalc's ElasticityCalc, an independent
implementation, on the same relaxed structure (matcalc is an optional peer: skipped where it is missing)."""

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

pytest.importorskip("matcalc")


def test_agreement_with_matcalc_on_emt_metals():
    from benchmarks.speed_elastic import agreement

    cases = [("Cu", bulk("Cu", "fcc", a=3.6)), ("Ni", bulk("Ni", "fcc", a=3.5))]
    both = agreement(EMT(), cases, ["clamped"])["clamped"]
    out = both["comparison_shears"]
    assert out["n_stable"] == 2 and all("error" not in r for r in out["rows"])
    for r in out["rows"]:
        # the same crystal, strains and fit. K (normal strains of 0.5 % and 1 %): matcalc fits against the
        # Green-Lagrange strain s + s²/2, we against s, 3e-4 apart (0.04 GPa); G: the two tools' finite shears of
        # 5 % and 10 % differ (matcalc's F upper-triangular, ours symmetric), 0.7-1 % apart here
        assert r["mattersim"]["k"] == pytest.approx(r["matcalc"]["k"], rel=1e-3)
        assert r["mattersim"]["g"] == pytest.approx(r["matcalc"]["g"], rel=0.02)
        assert np.isfinite(r["mattersim"]["g"]) and r["mattersim"]["g"] > 0
    small = both["small_shears"]
    assert small["n_stable"] == 2 and small["shear_strains_engineering"] == [0.005, 0.01]
    for r, large in zip(small["rows"], out["rows"]):
        # at shears ten times smaller the finite-shear difference, quadratic in the shear, falls about a
        # hundredfold: a straight line is the tangent and both tools give the same converged G
        assert r["mattersim"]["g"] == pytest.approx(r["matcalc"]["g"], rel=1e-3)
        assert (abs(r["mattersim"]["g"] - r["matcalc"]["g"])
                < abs(large["mattersim"]["g"] - large["matcalc"]["g"]) / 5)
        assert r["mattersim"]["k"] == pytest.approx(r["matcalc"]["k"], rel=1e-3)
