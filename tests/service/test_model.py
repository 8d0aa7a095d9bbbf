"""OnnxClassifier: verification against the model card, graph introspection, session options, predictions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.model import MAX_RUN_BATCH, ModelCard, ModelLoadError, OnnxClassifier, load_model, session_options

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models"


def _copy_model(tmp_path: Path, card_edit: dict[str, Any] | None = None) -> Path:
    shutil.copy(MODEL_DIR / "mnist-cnn.onnx", tmp_path / "mnist-cnn.onnx")
    card = json.loads((MODEL_DIR / "mnist-cnn.json").read_text())
    card.update(card_edit or {})
    (tmp_path / "mnist-cnn.json").write_text(json.dumps(card))
    return tmp_path


def test_loads_the_committed_model_as_its_card_describes(classifier: OnnxClassifier, model_card: dict) -> None:
    assert (classifier.name, classifier.version) == (model_card["name"], model_card["version"])
    assert classifier.sha256 == model_card["onnx"]["sha256"]
    assert classifier.input.name == model_card["onnx"]["input"]["name"] == "input"
    assert classifier.output.name == model_card["onnx"]["output"]["name"] == "probabilities"
    assert list(classifier.input.shape) == model_card["onnx"]["input"]["shape"]
    assert list(classifier.output.shape) == model_card["onnx"]["output"]["shape"]
    assert classifier.warmed_up
    described = classifier.describe()
    assert described["metrics"]["test_accuracy"] == model_card["metrics"]["test_accuracy"]


def test_refuses_a_model_whose_hash_differs_from_its_card(tmp_path: Path) -> None:
    _copy_model(tmp_path, {"onnx": {"sha256": "0" * 64}})
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model(tmp_path, "mnist-cnn")


def test_refuses_a_tampered_model(tmp_path: Path) -> None:
    _copy_model(tmp_path)
    with (tmp_path / "mnist-cnn.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model(tmp_path, "mnist-cnn")


@pytest.mark.parametrize("broken", ["missing", "not json", "no version"])
def test_refuses_a_missing_or_incomplete_card(tmp_path: Path, broken: str) -> None:
    _copy_model(tmp_path)
    card = tmp_path / "mnist-cnn.json"
    if broken == "missing":
        card.unlink()
    elif broken == "not json":
        card.write_text("{")
    else:
        doc = json.loads(card.read_text())
        del doc["version"]
        card.write_text(json.dumps(doc))
    with pytest.raises(ModelLoadError):
        load_model(tmp_path, "mnist-cnn")


def test_refuses_a_missing_model_file(tmp_path: Path) -> None:
    card = ModelCard.from_file(MODEL_DIR / "mnist-cnn.json")
    with pytest.raises(ModelLoadError, match="not found"):
        OnnxClassifier(tmp_path / "nope.onnx", card)


def test_session_options_do_not_spin() -> None:
    options = session_options(intra_op_threads=1, inter_op_threads=1)
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_predicts_probabilities_for_real_digits(classifier: OnnxClassifier, mnist_test: tuple) -> None:
    x, y = mnist_test
    probs = classifier.predict(x[:200, ..., None].astype(np.float32) / 255.0)
    assert probs.shape == (200, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert (probs.argmax(axis=1) == y[:200]).mean() > 0.95


def test_large_inputs_are_split_without_changing_answers(classifier: OnnxClassifier, mnist_test: tuple) -> None:
    x = mnist_test[0][: MAX_RUN_BATCH + 5, ..., None].astype(np.float32) / 255.0
    whole = classifier.predict(x)
    assert whole.shape == (MAX_RUN_BATCH + 5, 10)
    np.testing.assert_allclose(whole[-5:], classifier.predict(x[-5:]), atol=1e-6)


@pytest.mark.parametrize("shape", [(28, 28, 1), (1, 28, 28), (1, 784), (0, 28, 28, 1), (2, 28, 28, 3)])
def test_refuses_wrong_shapes(classifier: OnnxClassifier, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected float32"):
        classifier.predict(np.zeros(shape, dtype=np.float32))
