"""benchmarks.dielectric: does the ensemble spread rank materials by error, and the calibration's input."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.dielectric import calibrate_spread, spread_ranking


def _materials(sigmas, errors):
    """Two-atom materials whose Z* errors and sigmas are the given per-material numbers."""
    born_ref = [np.stack([np.eye(3) * 2.0, -np.eye(3) * 2.0]) for _ in sigmas]
    born_err = [np.stack([np.eye(3) * e, -np.eye(3) * e]) for e in errors]
    born_std = [np.full((2, 3, 3), s) for s in sigmas]
    eps_err = np.stack([np.eye(3) * e for e in errors])
    eps_std = np.stack([np.full((3, 3), s) for s in sigmas])
    return born_err, born_std, born_ref, eps_err, eps_std


def test_rank_correlation_of_error_and_spread():
    sigmas = [0.1, 0.2, 0.3, 0.4, 0.5]
    same = spread_ranking(*_materials(sigmas, [0.01, 0.05, 0.06, 0.2, 0.9]))
    assert same["born_effective_charges"] == pytest.approx(1.0) and same["dielectric_tensor"] == pytest.approx(1.0)
    reverse = spread_ranking(*_materials(sigmas, [0.9, 0.2, 0.06, 0.05, 0.01]))
    assert reverse["born_effective_charges"] == pytest.approx(-1.0)
    assert reverse["materials"] == 5
    # a constant spread ranks nothing
    assert spread_ranking(*_materials([0.3] * 5, [0.1, 0.2, 0.3, 0.4, 0.5]))["dielectric_tensor"] is None


def test_zero_reference_elements_do_not_enter_the_z_ranking():
    born_err, born_std, born_ref, eps_err, eps_std = _materials([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    # material 0's off-diagonal elements (zero in DFT) get a huge error: they must not count
    born_err[0] = born_err[0] + 50.0 * (1 - np.eye(3))
    assert spread_ranking(born_err, born_std, born_ref, eps_err, eps_std)["born_effective_charges"] == pytest.approx(1.0)


def test_calibration_refuses_an_already_calibrated_model():
    class Calibrated:
        spread_scale = {"born_effective_charges": 11.0, "dielectric_tensor": 12.0}

    with pytest.raises(ValueError, match="raw member spread"):
        calibrate_spread(Calibrated(), "unused", [])
