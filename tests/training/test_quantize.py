"""The int8 model: mnist-quantize's pieces on the committed float model, and the shipped int8 file against its card."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime.quantization")

from training import quantize
from training.data import Mnist, load_mnist

MODELS = Path(__file__).resolve().parents[2] / "models"
FP32, FP32_CARD = MODELS / "mnist-cnn.onnx", MODELS / "mnist-cnn.json"
INT8, INT8_CARD = MODELS / "mnist-cnn-int8.onnx", MODELS / "mnist-cnn-int8.json"


@pytest.fixture(scope="module")
def fp32_card() -> dict:
    return json.loads(FP32_CARD.read_text())


@pytest.fixture(scope="module")
def mnist() -> Mnist:
    return load_mnist()


def test_calibration_images_come_from_the_training_split(fp32_card: dict, mnist: Mnist) -> None:
    from training.config import TrainConfig
    from training.train import split_data

    x = quantize.calibration_images(fp32_card, 40, mnist)
    assert x.shape == (40, 28, 28, 1) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    split = split_data(mnist, TrainConfig(**fp32_card["training"]["config"]))
    train = {img.tobytes() for img in split.x_train}
    assert all((np.rint(img[..., 0] * 255).astype(np.uint8)).tobytes() in train for img in x)
    # For a model with an ood_score: the same digits first, then training digits drawn as people draw them, then
    # non-digits from the OOD suite's train split; none of the last two is a training digit as it stands.
    both = quantize.calibration_images(fp32_card, 40, mnist, negatives=20, drawn=10)
    assert both.shape == (70, 28, 28, 1) and np.array_equal(both[:40], x) and 0 <= both.min() and both.max() <= 1
    assert not any((np.rint(img[..., 0] * 255).astype(np.uint8)).tobytes() in train for img in both[40:])
    assert all(img.max() > 0.5 for img in both[40:50])  # drawn digits: ink, centred as to_mnist centres it
    again = quantize.calibration_images(fp32_card, 40, mnist, negatives=20, drawn=10)
    assert np.array_equal(both, again)  # seeded: the same calibration set, so the same int8 bytes


def test_a_quantized_model_serves_like_the_float_one(
    tmp_path: Path, fp32_card: dict, mnist: Mnist, mnist_test: tuple
) -> None:
    from service.model import load_files

    x_cal = quantize.calibration_images(fp32_card, 100, mnist)
    out = tmp_path / "mnist-cnn-int8.onnx"
    quantize.quantize(FP32, out, x_cal)
    x, y = (mnist_test[0][:1000].astype(np.float32) / 255.0)[..., None], mnist_test[1][:1000]
    fp32, int8 = quantize.measure(FP32, x, y), quantize.measure(out, x, y)
    card = quantize.build_card(fp32_card, out, "mnist-cnn-int8", fp32, int8, {"images": 100})
    assert card["onnx"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    # Everything of the float card but its trust section: python -m training.trust writes the int8 model's own.
    assert set(card) >= set(fp32_card) - {"trust"} and "trust" not in card
    assert card["quantization"]["from"]["sha256"] == fp32_card["onnx"]["sha256"]
    assert card["onnx"]["parity"]["argmax_agreement"] >= 990
    (tmp_path / "mnist-cnn-int8.json").write_text(json.dumps(card))
    served = load_files(out, tmp_path / "mnist-cnn-int8.json")  # the service's checks: hash, tensors, warm-up
    assert served.name == "mnist-cnn-int8"
    assert np.mean(served.predict(x).argmax(1) == y) >= fp32["metrics"]["test_accuracy"] - 0.01


@pytest.mark.skipif(not INT8.exists(), reason="no int8 model shipped")
def test_the_shipped_int8_model_keeps_its_promises(fp32_card: dict, mnist_test: tuple) -> None:
    card = json.loads(INT8_CARD.read_text())
    assert card["name"] == "mnist-cnn-int8" and card["onnx"]["file"] == INT8.name
    assert card["onnx"]["sha256"] == hashlib.sha256(INT8.read_bytes()).hexdigest()
    assert card["quantization"]["from"]["sha256"] == fp32_card["onnx"]["sha256"], "quantized from the shipped model"
    calibration = card["quantization"]["calibration"]  # made with the calibration set mnist-quantize makes today
    assert (
        calibration["images"]
        == quantize.CALIBRATION_IMAGES + quantize.CALIBRATION_DRAWN + quantize.CALIBRATION_NEGATIVES
    )
    x, y = (mnist_test[0].astype(np.float32) / 255.0)[..., None], mnist_test[1]
    probs = quantize.predict(quantize.service_session(INT8), x)
    reference = quantize.predict(quantize.reference_session(INT8), x)
    # The integer kernels this CPU picks must compute what the QDQ graph says: onnxruntime's unoptimised run of
    # the same graph (Q/DQ in float) is the CPU-independent yardstick. With full 8-bit weights, AVX2 without VNNI
    # saturates 16-bit pair sums and 12 of 10,000 answers moved; the 7-bit weights leave no room for that.
    assert int(np.sum(probs.argmax(1) != reference.argmax(1))) <= 1
    # Requantisation rounds in float, and float rounding may differ between CPUs (FMA or not) by one step on a
    # rare image: one error either way is honest; more means the model is not the one the card describes.
    errors = int(np.sum(probs.argmax(1) != y))
    assert abs(errors - card["metrics"]["test_errors"]) <= 1, (errors, card["metrics"]["test_errors"])
    assert card["quantization"]["reference_agreement"]["argmax_agreement"] >= len(y) - 1
    drop_pp = (fp32_card["metrics"]["test_accuracy"] - card["metrics"]["test_accuracy"]) * 100
    assert drop_pp <= quantize.MAX_DROP_PP + 1e-9
    # The calibration method the card names is the one the quantizer keeps on the validation digits.
    x_val, y_val = quantize.validation_digits(fp32_card, load_mnist())
    drop_pp = (quantize.accuracy(FP32, x_val, y_val) - quantize.accuracy(INT8, x_val, y_val)) * 100
    assert drop_pp <= quantize.MAX_DROP_PP
    calibration = card["quantization"]["calibration"]
    if calibration["method"] == quantize.FALLBACK_METHOD:  # only when the first choice lost validation accuracy
        assert calibration["replaced"][quantize.CALIBRATION_METHOD] > quantize.MAX_DROP_PP, calibration
    else:
        assert calibration["method"] == quantize.CALIBRATION_METHOD and "replaced" not in calibration


def test_a_method_that_loses_validation_accuracy_is_replaced_by_min_max(tmp_path: Path, capsys) -> None:
    # With a limit no model can meet (int8 must gain 5 points), the percentile model counts as one that loses
    # accuracy: the quantizer must fall back to min-max, and say so in the card (--force writes it regardless).
    code = quantize.main(["--calibration-images", "100", "--max-drop-pp", "-5", "--force", "--out", str(tmp_path)])
    assert code == 0
    said = re.search(
        r"^percentile: ([+-]\d+\.\d+) pp on the validation digits; quantizing again with minmax$",
        capsys.readouterr().out,
        re.M,
    )
    assert said, "the fallback is announced"
    calibration = json.loads((tmp_path / "mnist-cnn-int8.json").read_text())["quantization"]["calibration"]
    assert calibration["method"] == quantize.FALLBACK_METHOD != quantize.CALIBRATION_METHOD
    # the card names the method replaced and what it lost, as announced (not min-max's own figure)
    assert list(calibration["replaced"]) == [quantize.CALIBRATION_METHOD]
    assert calibration["replaced"][quantize.CALIBRATION_METHOD] == pytest.approx(float(said.group(1)), abs=5e-4)
    assert calibration["validation_accuracy_drop_pp"] < 1  # min-max keeps this model's accuracy
    # drawn digits and non-digits scale with --calibration-images (1,000 + 1,000 + 2,000 at the default)
    assert calibration["images"] == 400 and "100 other training digits drawn" in calibration["source"]
    assert (tmp_path / "mnist-cnn-int8.onnx").stat().st_size > 0


@pytest.mark.parametrize("count", ["0", "100000"])
def test_a_calibration_set_the_training_split_cannot_hold_is_refused(count: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        quantize.main(["--calibration-images", count, "--out", "/nonexistent"])
    assert exit_info.value.code == 2
    assert f"--calibration-images {count}: calibration digits must be between 1 and the" in capsys.readouterr().err
