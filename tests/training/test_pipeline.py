"""Smoke training → evaluation → ONNX export with parity, end to end on real MNIST (seconds, not minutes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from training.config import TrainConfig  # noqa: E402
from training.evaluate import evaluate, report  # noqa: E402
from training.export import ExportError, check_parity, export  # noqa: E402
from training.train import main as train_main  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "cnn-smoke"
    assert train_main(["--model", "cnn", "--smoke", "--epochs", "3", "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def exported(smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("models")
    card = export(smoke_run, out, name="smoke", version="0.0.1")
    return out, card


def test_smoke_run_writes_config_history_and_checkpoint(smoke_run: Path) -> None:
    assert {p.name for p in smoke_run.iterdir()} >= {
        "config.json",
        "history.json",
        "history.csv",
        "model.keras",
        "run.json",
    }
    config = TrainConfig.load(smoke_run / "config.json")
    assert config.smoke and config.epochs == 3 and config.model == "cnn" and config.reject_class
    # the shipped recipe: two towers (config.json stores the widths as a list; loading gives the tuple back)
    assert config.towers == 2 and config.widths == (16, 48, 96)
    assert config == TrainConfig.for_model("cnn", smoke=True, epochs=3, batchnorm_momentum=0.9)
    history = json.loads((smoke_run / "history.json").read_text())
    assert len(history["loss"]) == 3 and history["loss"][-1] < history["loss"][0]
    assert history["accuracy"][-1] > 0.5  # it learns, even on 2k images
    run = json.loads((smoke_run / "run.json").read_text())
    assert run["train_wall_seconds"] > 0 and run["hardware"]["cpu_count"] >= 1
    counts = run["training_set"]
    assert counts["negatives"] == config.smoke_negatives
    assert counts["drawn_digits"] == config.smoke_drawn_digits


def test_export_names_io_and_batch_dimension(exported: tuple[Path, dict[str, Any]]) -> None:
    out, _ = exported
    model = onnx.load(out / "smoke.onnx")
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["probabilities", "ood_score"]
    for value in (model.graph.input[0], *model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert len(model.graph.output[1].type.tensor_type.shape.dim) == 1
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [28, 28, 1]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert {p.key: p.value for p in model.metadata_props} == {"name": "smoke", "version": "0.0.1"}


def test_export_names_constants_the_same_way_in_every_process(exported: tuple[Path, dict[str, Any]]) -> None:
    # tf2onnx names the constants it makes up with a counter and, of equal ones, keeps whichever a hash-ordered
    # set yields first: other names and another initializer order in another process. The export renames them
    # by first use, so both spellings of the same graph must come out as the very bytes that were shipped.
    from training.export import _stable_constants

    out, _ = exported
    shipped = onnx.load(out / "smoke.onnx")
    made_up = [i.name for i in shipped.graph.initializer if i.name.startswith("const_")]
    assert made_up, "the graph has constants tf2onnx made up"

    def as_tf2onnx_might(suffixes: list[int], reverse: bool) -> Any:
        variant = onnx.ModelProto()
        variant.CopyFrom(shipped)
        names = {name: f"const_axes__{n}" for name, n in zip(made_up, suffixes, strict=True)}
        for node in variant.graph.node:
            node.input[:] = [names.get(n, n) for n in node.input]
        inits = list(variant.graph.initializer)
        for init in inits:
            init.name = names.get(init.name, init.name)
        copies = [type(i)() for i in inits]
        for c, i in zip(copies, inits, strict=True):
            c.CopyFrom(i)
        del variant.graph.initializer[:]
        variant.graph.initializer.extend(reversed(copies) if reverse else copies)
        return variant

    first = as_tf2onnx_might([40 + 3 * k for k in range(len(made_up))], reverse=False)
    second = as_tf2onnx_might([90 - 2 * k for k in range(len(made_up))], reverse=True)
    assert first.SerializeToString() != second.SerializeToString()
    for variant in (first, second):
        assert _stable_constants(variant).SerializeToString() == shipped.SerializeToString()


def test_model_card_describes_exactly_the_shipped_file(exported: tuple[Path, dict[str, Any]], mnist_test) -> None:
    import hashlib

    out, card = exported
    assert json.loads((out / "smoke.json").read_text()) == card
    assert card["onnx"]["sha256"] == hashlib.sha256((out / "smoke.onnx").read_bytes()).hexdigest()
    assert card["onnx"]["parity"]["max_abs_diff"] <= 1e-5
    for key in ("name", "version", "created", "parameters", "metrics", "data", "training", "libraries"):
        assert key in card
    assert card["data"]["sha256"]["t10k-images-idx3-ubyte"].startswith("0fa7898d")
    assert card["training"]["wall_seconds"] > 0 and "cpu" in card["training"]["hardware"]
    assert card["training"]["config"]["smoke"] is True
    assert set(card["metrics"]["per_class_accuracy"]) == {str(d) for d in range(10)}
    # The card's accuracy is what onnxruntime alone measures on the same images.
    x, y = mnist_test
    n = card["metrics"]["test_images"]
    session = ort.InferenceSession(str(out / "smoke.onnx"), providers=["CPUExecutionProvider"])
    probs = session.run(["probabilities"], {"input": (x[:n, ..., None] / 255.0).astype(np.float32)})[0]
    assert int(np.sum(probs.argmax(1) != y[:n])) == card["metrics"]["test_errors"]
    # and the exported model reads digits: 3 epochs on 2k images reach 96 %. With BatchNorm statistics that barely
    # moved from their initial values (Keras' default momentum over these 72 steps) the same run answered 11 %.
    assert card["metrics"]["test_accuracy"] > 0.8, card["metrics"]["test_accuracy"]


def test_parity_check_fails_on_a_changed_prediction() -> None:
    probs = np.full((4, 10), 0.01, dtype=np.float32)
    probs[:, 3] = 0.91
    assert check_parity(probs, probs + 1e-7) < 1e-5
    with pytest.raises(ExportError, match="max abs diff"):
        check_parity(probs, probs + 1e-3)
    flipped = probs.copy()
    flipped[0, [3, 4]] = flipped[0, [4, 3]]
    with pytest.raises(ExportError, match="1 predictions changed"):
        check_parity(probs, flipped, atol=1.0)


def test_evaluate_writes_report_and_plots(smoke_run: Path, tmp_path: Path) -> None:
    rep = evaluate(run_dir=smoke_run, docs=tmp_path / "docs")
    assert rep["test_images"] == 1024
    assert np.array(rep["confusion_matrix"]).sum() == 1024
    assert rep["test_errors"] == len(rep["misclassified_indices"])
    names = {p.name for p in (tmp_path / "docs").iterdir()}
    assert {
        "cnn-smoke-confusion_matrix.png",
        "cnn-smoke-training_curves.png",
        "cnn-smoke-sample_predictions.png",
        "cnn-smoke-errors_by_class.png",
    } <= names
    assert (smoke_run / "report.json").exists()


def test_report_counts_confusions() -> None:
    y = np.array([0, 1, 2, 9, 9, 9])
    pred = np.array([0, 1, 2, 4, 4, 9])
    rep = report(y, np.eye(10)[pred])
    assert rep["test_errors"] == 2 and rep["test_accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    assert rep["most_confused"][0] == {"true": 9, "predicted": 4, "count": 2}
    assert rep["per_class"]["9"]["recall"] == pytest.approx(1 / 3, abs=1e-6)
    assert rep["per_class"]["4"]["precision"] == 0.0


def test_the_card_carries_the_calibration(exported: tuple[Path, dict[str, Any]]) -> None:
    _, card = exported
    cal = card["trust"]["calibration"]
    assert cal["method"] == "temperature" and cal["temperature"] > 0
    assert cal["test_after"]["nll"] <= cal["test_before"]["nll"] + 1e-6
    assert cal["test_after"]["accuracy"] == cal["test_before"]["accuracy"]  # a temperature never changes the argmax
    assert [o["name"] for o in card["onnx"]["outputs"]] == ["probabilities", "ood_score"]


def test_trust_fits_a_verdict_the_service_accepts(exported: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from service.model import load_files
    from training.trust import process

    out, _ = exported
    assert process(out, "smoke", tmp_path / "docs", None, workers=1, cost_rounds=1) == 0
    card = json.loads((out / "smoke.json").read_text())
    verdict = card["trust"]["verdict"]
    assert set(verdict) == {"ood_output", "not_a_digit_at_or_above", "unsure_below_confidence"}
    assert set(card["trust"]) >= {"calibration", "ood", "selective", "cost", "drawn_digits"}
    assert (tmp_path / "docs" / "trust.md").exists() and (tmp_path / "docs" / "trust-reliability.png").exists()
    served = load_files(out / "smoke.onnx", out / "smoke.json")  # hash, tensors, warm-up; the verdict parses
    assert served.name == "smoke"
