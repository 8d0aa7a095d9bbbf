"""Calibration: temperature scaling of the digit logits, and the measures that say whether confidence is honest.

    >>> import numpy as np
    >>> from training.calibrate import expected_calibration_error
    >>> expected_calibration_error(np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([0, 1]))
    0.35

The temperature is fitted by minimising the negative log-likelihood on held-out *training* images (the
validation split ``mnist-train`` keeps apart), never on the test set; ``mnist-export`` bakes it into the ONNX
graph, so the ``probabilities`` output is the calibrated one. numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Equal-width confidence bins for the expected calibration error and the reliability diagram.
ECE_BINS = 15
#: The temperature is searched in this range (log-spaced golden-section search on a convex objective).
T_RANGE = (0.05, 20.0)


def logsumexp(z: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """log(sum(exp(z))) along ``axis``, in float64, shifted by the maximum so that nothing overflows."""
    z = z.astype(np.float64)
    top = z.max(axis=axis, keepdims=True)
    out = top + np.log(np.exp(z - top).sum(axis=axis, keepdims=True))
    return np.asarray(out if keepdims else np.squeeze(out, axis=axis))


def log_softmax(z: np.ndarray) -> np.ndarray:
    return np.asarray(z.astype(np.float64) - logsumexp(z, axis=1, keepdims=True))


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true digit (probabilities floored at 1e-12)."""
    p = probs[np.arange(len(y)), y.astype(np.int64)].astype(np.float64)
    return float(-np.mean(np.log(np.maximum(p, 1e-12))))


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean squared distance between the probability vector and the one-hot truth (summed over the ten digits)."""
    onehot = np.eye(probs.shape[1])[y.astype(np.int64)]
    return float(np.mean(np.sum((probs.astype(np.float64) - onehot) ** 2, axis=1)))


@dataclass(frozen=True)
class Reliability:
    """Per-bin counts, mean confidence and accuracy (bins of equal width over [0, 1])."""

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    conf = probs.max(axis=1).astype(np.float64)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Right-closed bins, (a, b], with 0 in the first: the usual definition of ECE.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.int64)
    safe = np.maximum(count, 1)
    return Reliability(
        edges=edges,
        count=count,
        confidence=np.bincount(idx, weights=conf, minlength=bins) / safe,
        accuracy=np.bincount(idx, weights=correct, minlength=bins) / safe,
    )


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ over bins of (bin share) × |accuracy − mean confidence|, with ``bins`` equal-width confidence bins."""
    r = reliability(probs, y, bins)
    return round(float(np.sum(r.count * np.abs(r.accuracy - r.confidence)) / max(len(y), 1)), 10)


def calibration_metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """ECE (15 bins), NLL, Brier, accuracy and mean confidence, rounded for a model card."""
    return {
        "ece": round(expected_calibration_error(probs, y), 6),
        "nll": round(nll(probs, y), 6),
        "brier": round(brier(probs, y), 6),
        "accuracy": round(float(np.mean(probs.argmax(1) == y)), 6),
        "mean_confidence": round(float(np.mean(probs.max(1))), 6),
    }


def temperature_nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    lp = log_softmax(logits / temperature)
    return float(-np.mean(lp[np.arange(len(y)), y.astype(np.int64)]))


def fit_temperature(logits: np.ndarray, y: np.ndarray, t_range: tuple[float, float] = T_RANGE) -> float:
    """The temperature T minimising the NLL of softmax(logits / T). NLL is convex in 1/T, so a golden-section
    search over log T finds the minimum; 80 steps narrow the range far below float32 resolution."""
    lo, hi = math.log(t_range[0]), math.log(t_range[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = temperature_nll(logits, y, math.exp(a)), temperature_nll(logits, y, math.exp(b))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = temperature_nll(logits, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = temperature_nll(logits, y, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def logits_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """Logits (up to a per-row constant) that give ``probs`` again under softmax: log p."""
    return np.log(np.maximum(probs.astype(np.float64), 1e-38))
