"""Calibration measures and temperature fitting, against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from training.calibrate import (
    brier,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    logits_from_probabilities,
    nll,
    reliability,
)
from training.model import softmax


def test_ece_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.6, 0.4]])
    # bins (0.867, 0.933] holds 0.9 (right, |1 − 0.9| = 0.1) and (0.533, 0.6] holds 0.6 (wrong, |0 − 0.6| = 0.6)
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx((0.1 + 0.6) / 2)


def test_a_calibrated_forecaster_has_no_ece() -> None:
    rng = np.random.default_rng(0)
    conf = rng.choice([0.55, 0.75, 0.95], 300_000)
    right = rng.random(conf.size) < conf
    probs = np.stack([conf, 1 - conf], axis=1)
    y = np.where(right, 0, 1)
    assert expected_calibration_error(probs, y) < 0.003


def test_nll_and_brier() -> None:
    y = np.array([0, 1])
    sure = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert nll(sure, y) == pytest.approx(0.0) and brier(sure, y) == pytest.approx(0.0)
    half = np.full((2, 2), 0.5)
    assert nll(half, y) == pytest.approx(np.log(2)) and brier(half, y) == pytest.approx(0.5)
    m = calibration_metrics(half, y)
    assert set(m) == {"ece", "nll", "brier", "accuracy", "mean_confidence"}


def test_reliability_bins_count_every_sample() -> None:
    probs = softmax(np.random.default_rng(1).normal(0, 3, (1000, 10)))
    r = reliability(probs, np.zeros(1000, int))
    assert r.count.sum() == 1000 and len(r.edges) == 16


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_temperature_that_made_the_labels(true_t: float) -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (40_000, 10))
    p = softmax(logits / true_t)
    y = (p.cumsum(axis=1) > rng.random((len(p), 1))).argmax(axis=1)
    assert fit_temperature(logits, y) == pytest.approx(true_t, rel=0.05)


def test_temperature_undoes_itself_through_log_probabilities() -> None:
    logits = np.random.default_rng(3).normal(0, 4, (50, 10))
    t = 0.7
    calibrated = softmax(logits / t)
    back = softmax(logits_from_probabilities(calibrated) * t)
    np.testing.assert_allclose(back, softmax(logits), atol=1e-9)
