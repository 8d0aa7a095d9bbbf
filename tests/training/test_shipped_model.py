"""The committed model: onnxruntime alone reproduces its card on the full real test set."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

MODELS = Path(__file__).resolve().parents[2] / "models"
ONNX = MODELS / "mnist-cnn.onnx"
CARD = MODELS / "mnist-cnn.json"


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads(CARD.read_text())


def test_card_matches_the_committed_file(card: dict) -> None:
    assert card["name"] == "mnist-cnn"
    assert card["onnx"]["sha256"] == hashlib.sha256(ONNX.read_bytes()).hexdigest()
    assert card["data"]["smoke_subset"] is False, "the shipped model must come from the full schedule"
    assert card["training"]["wall_seconds"] > 0


def test_committed_model_reaches_its_card_accuracy_with_onnxruntime_alone(card: dict, mnist_test) -> None:
    x, y = mnist_test
    session = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    probs = np.concatenate(
        [
            session.run(["probabilities"], {"input": (x[i : i + 2000, ..., None] / 255.0).astype(np.float32)})[0]
            for i in range(0, 10000, 2000)
        ]
    )
    errors = int(np.sum(probs.argmax(1) != y))
    assert errors == card["metrics"]["test_errors"]
    assert np.mean(probs.argmax(1) == y) == pytest.approx(card["metrics"]["test_accuracy"], abs=1e-6)
    assert errors <= 30, f"the shipped model must score ≥ 99.70% (≤ 30 errors), it has {errors}"
