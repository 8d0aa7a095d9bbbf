"""Export a trained Keras model to ONNX, prove parity on the MNIST test set, and write the model card.

    mnist-export --run runs/cnn --out models             # models/mnist-cnn.onnx + models/mnist-cnn.json
    mnist-export --run runs/cnn-smoke --out /tmp/export  # the smoke model (parity on its test subset)

The exported graph takes ``input`` float32 [batch, 28, 28, 1] in 0..1 and returns ``probabilities``
float32 [batch, 10]. Export fails (exit 1, nothing written) unless onnxruntime matches Keras on every
test image: max abs difference ≤ 1e-5 and identical argmax. The card's metrics come from the ONNX model
itself, run by onnxruntime: they describe exactly what ships.

A model with a reject-class head (11 logits) is calibrated on the way: the temperature T that minimises the
NLL of the validation digits (held-out training images, never the test set) is baked into the graph, so
``probabilities`` = softmax(digit logits / T). A second output ``ood_score`` float32 [batch] is the log-odds of
"not a digit" against all ten digits (reject logit − logsumexp of the digit logits): higher is less like one
handwritten digit. The card's ``trust.calibration`` records T and ECE/NLL/Brier on the test set before and after;
``python -m training.trust`` adds the verdict thresholds and the rest of ``trust``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.config import TrainConfig
from training.data import FILES, load_test_set

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
OOD_OUTPUT_NAME = "ood_score"
BATCH_DIM = "batch"
OPSET = 17
PARITY_ATOL = 1e-5
#: ``ood_score`` is a log-odds (tens at most): parity is checked relative to its size.
OOD_PARITY_ATOL = 1e-4
CARD_SCHEMA_VERSION = 1
DEFAULT_VERSION = "1.2.0"


class ExportError(RuntimeError):
    """The exported graph is not faithful to the Keras model."""


def to_onnx(model: Any, opset: int = OPSET, temperature: float | None = None) -> Any:
    """Convert through a ``tf.function`` (``from_keras`` does not support Keras 3), then tidy the names.

    A reject-class model (11 logits) becomes two outputs: ``probabilities`` = softmax(digit logits /
    ``temperature``) and ``ood_score`` = reject logit − logsumexp(digit logits)."""
    import tensorflow as tf
    import tf2onnx

    from training.model import NUM_CLASSES, REJECT, emits_logits

    spec = (tf.TensorSpec((None, 28, 28, 1), tf.float32, name=INPUT_NAME),)
    if emits_logits(model):
        inverse_t = 1.0 / (temperature or 1.0)

        @tf.function(input_signature=spec)  # type: ignore[untyped-decorator]
        def serve(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            z = model(x, training=False)
            digits = z[:, :NUM_CLASSES]
            # A constant made inside the function: one made outside would be captured as a graph input.
            scaled = digits * tf.constant(inverse_t, tf.float32)
            # logsumexp written out (logits are finite): tf.reduce_logsumexp converts to some 20 ONNX nodes of
            # NaN and infinity handling, which cost more at batch 1 than the arithmetic itself.
            top = tf.reduce_max(digits, axis=1, keepdims=True)
            lse = top + tf.math.log(tf.reduce_sum(tf.exp(digits - top), axis=1, keepdims=True))
            return tf.nn.softmax(scaled), tf.squeeze(z[:, REJECT : REJECT + 1] - lse, axis=1)

        names = [OUTPUT_NAME, OOD_OUTPUT_NAME]
    else:

        @tf.function(input_signature=spec)  # type: ignore[untyped-decorator]
        def serve(x: tf.Tensor) -> tf.Tensor:
            return model(x, training=False)

        names = [OUTPUT_NAME]
    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset)
    return _stable_constants(_rename_io(proto, names))


def _rename_io(proto: Any, outputs: list[str] | None = None) -> Any:
    """One input ``input``, the outputs ``probabilities`` (and ``ood_score``), a batch dimension named ``batch``."""
    graph = proto.graph
    outputs = outputs or [OUTPUT_NAME]
    if len(graph.output) != len(outputs):
        raise ExportError(f"the graph has {len(graph.output)} outputs, expected {outputs}")
    renames = {graph.input[0].name: INPUT_NAME}
    renames.update({value.name: name for value, name in zip(graph.output, outputs, strict=True)})
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in (graph.input[0], *graph.output):
        value.name = renames[value.name]
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = BATCH_DIM
    return proto


def _stable_constants(proto: Any) -> Any:
    """Name the constants tf2onnx made up (``const_axes__45``) by where the graph first uses them, and list every
    initializer in that order. tf2onnx merges equal constants and keeps whichever a hash-ordered set yields first,
    so its names and order change from one Python process to the next: the same weights exported twice would
    give two files, two sha256s and two cards."""
    import re

    graph = proto.graph
    first_use: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            first_use.setdefault(name, len(first_use))
    made_up = re.compile(r"__\d+$")
    initializers = sorted(graph.initializer, key=lambda i: (first_use.get(i.name, len(first_use)), i.name))
    renames = {i.name: f"const_{k}" for k, i in enumerate(initializers) if made_up.search(i.name)}
    taken = {i.name for i in initializers} | {o for node in graph.node for o in node.output}
    if taken & set(renames.values()):
        raise ExportError(f"constant names already in use: {sorted(taken & set(renames.values()))}")
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
    ordered = [type(i)() for i in initializers]
    for new, old in zip(ordered, initializers, strict=True):
        new.CopyFrom(old)
        new.name = renames.get(old.name, old.name)
    del graph.initializer[:]
    graph.initializer.extend(ordered)
    return proto


def ort_outputs(model: bytes | str | Path, x: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, np.ndarray | None]:
    """``probabilities`` and, when the graph has it, ``ood_score`` for every image of ``x`` (N×28×28×1)."""
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs() if o.name in (OUTPUT_NAME, OOD_OUTPUT_NAME)]
    runs = [session.run(names, {INPUT_NAME: x[i : i + batch]}) for i in range(0, len(x), batch)]
    probs = np.concatenate([r[0] for r in runs]) if runs else np.zeros((0, 10), np.float32)
    ood = np.concatenate([r[1] for r in runs]) if len(names) == 2 and runs else None
    return probs, ood


def check_parity(keras_probs: np.ndarray, onnx_probs: np.ndarray, atol: float = PARITY_ATOL) -> float:
    """Return the max abs difference; raise :class:`ExportError` if it exceeds ``atol`` or an argmax differs."""
    diff = float(np.max(np.abs(keras_probs - onnx_probs)))
    flipped = int(np.sum(keras_probs.argmax(1) != onnx_probs.argmax(1)))
    if diff > atol or flipped:
        raise ExportError(
            f"ONNX differs from Keras: max abs diff {diff:.2e} (limit {atol:.0e}), {flipped} predictions changed"
        )
    return diff


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Accuracy, error count and per-class accuracy (None for a class absent from ``y_true``)."""
    pred = probs.argmax(1)
    per_class = {
        str(c): round(float(np.mean(pred[y_true == c] == c)), 6) if np.any(y_true == c) else None for c in range(10)
    }
    return {
        "test_images": len(y_true),
        "test_accuracy": round(float(np.mean(pred == y_true)), 6),
        "test_errors": int(np.sum(pred != y_true)),
        "per_class_accuracy": per_class,
    }


def library_versions() -> dict[str, str]:
    import keras
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def calibrate(
    model: Any, config: TrainConfig, x_test: np.ndarray, y_test: np.ndarray, data_dir: Path | None
) -> dict[str, Any]:
    """Fit the temperature on the validation digits; ECE, NLL and Brier on the test digits before and after."""
    from training.calibrate import calibration_metrics, fit_temperature
    from training.data import load_mnist
    from training.model import digit_probabilities
    from training.train import split_data

    split = split_data(load_mnist(data_dir), config)
    x_val = (split.x_val.astype(np.float32) / 255.0)[..., None]
    val_logits = np.asarray(model.predict(x_val, batch_size=1000, verbose=0))[:, :10]
    temperature = fit_temperature(val_logits, split.y_val)
    test_logits = np.asarray(model.predict(x_test, batch_size=1000, verbose=0))
    return {
        "method": "temperature",
        "temperature": round(temperature, 6),
        "fitted_on": f"validation split of the training images ({len(split.y_val)} MNIST digits held out by "
        "mnist-train, never trained on); NLL minimised",
        "validation_before": calibration_metrics(digit_probabilities(val_logits, True), split.y_val),
        "validation_after": calibration_metrics(digit_probabilities(val_logits, True, temperature), split.y_val),
        "test_before": calibration_metrics(digit_probabilities(test_logits, True), y_test),
        "test_after": calibration_metrics(digit_probabilities(test_logits, True, temperature), y_test),
    }


def export(
    run_dir: Path, out_dir: Path, name: str = "mnist-cnn", version: str = DEFAULT_VERSION, data_dir: Path | None = None
) -> dict[str, Any]:
    """Export ``run_dir/model.keras`` to ``out_dir/<name>.onnx`` and write ``<name>.json``; return the card."""
    import keras
    import onnx

    from training.model import digit_probabilities, emits_logits, ood_score

    config = TrainConfig.load(run_dir / "config.json")
    run = json.loads((run_dir / "run.json").read_text())
    model = keras.models.load_model(run_dir / "model.keras")
    x_test, y_test = load_test_set(data_dir)
    if config.smoke:
        x_test, y_test = x_test[: config.smoke_test_images], y_test[: config.smoke_test_images]
    x = (x_test.astype(np.float32) / 255.0)[..., None]

    logits_head = emits_logits(model)
    calibration = calibrate(model, config, x, y_test, data_dir) if logits_head else None
    temperature = calibration["temperature"] if calibration else None
    proto = to_onnx(model, temperature=temperature)
    proto.doc_string = f"{name} {version}: MNIST digit classifier (input 0..1, white ink on black)"
    for key, value in {"name": name, "version": version}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx_bytes = proto.SerializeToString()

    raw = np.asarray(model.predict(x, batch_size=1000, verbose=0))
    keras_probs = digit_probabilities(raw, logits_head, temperature or 1.0)
    onnx_probs, onnx_ood = ort_outputs(onnx_bytes, x)
    max_diff = check_parity(keras_probs, onnx_probs)
    outputs: list[dict[str, Any]] = [{"name": OUTPUT_NAME, "dtype": "float32", "shape": [BATCH_DIM, 10]}]
    if logits_head:
        assert onnx_ood is not None
        ood_diff = float(np.max(np.abs(ood_score(raw) - onnx_ood)))
        if ood_diff > OOD_PARITY_ATOL:
            raise ExportError(f"ONNX ood_score differs from Keras: max abs diff {ood_diff:.2e}")
        outputs.append(
            {
                "name": OOD_OUTPUT_NAME,
                "dtype": "float32",
                "shape": [BATCH_DIM],
                "meaning": "log-odds of 'not a digit' against the ten digits; higher = less like one handwritten digit",
                "parity_max_abs_diff": ood_diff,
            }
        )

    card: dict[str, Any] = {
        "schema_version": CARD_SCHEMA_VERSION,
        "name": name,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "description": "Handwritten digit classifier trained on MNIST; 28x28 grayscale, white ink on black.",
        "architecture": config.model,
        "parameters": int(model.count_params()),
        "onnx": {
            "file": f"{name}.onnx",
            "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "bytes": len(onnx_bytes),
            "opset": OPSET,
            "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [BATCH_DIM, 28, 28, 1], "range": [0.0, 1.0]},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [BATCH_DIM, 10]},
            "outputs": outputs,
            "parity": {"images": len(x), "max_abs_diff": max_diff, "argmax_identical": True},
        },
        "metrics": classification_metrics(y_test, onnx_probs),
        "data": {
            "dataset": "MNIST",
            "sha256": dict(FILES),
            "train_images": run["train_images"],
            "validation_images": run["validation_images"],
            "smoke_subset": config.smoke,
        },
        "training": {
            "config": config.to_dict(),
            "epochs_run": run["epochs_run"],
            "best_val_accuracy": run["best_val_accuracy"],
            "wall_seconds": run["train_wall_seconds"],
            "images_per_second": run["images_per_second"],
            "hardware": run["hardware"],
            "finished": run["finished"],
        },
        "libraries": library_versions(),
    }
    if calibration is not None:
        card["trust"] = {"calibration": calibration}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.onnx").write_bytes(onnx_bytes)
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/cnn"), help="run directory from mnist-train")
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--name", default="mnist-cnn")
    parser.add_argument("--version", default=DEFAULT_VERSION)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args(argv)
    try:
        card = export(args.run, args.out, args.name, args.version, args.data_dir)
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    m = card["metrics"]
    print(
        f"wrote {args.out / card['onnx']['file']} (sha256 {card['onnx']['sha256'][:12]}…, opset {OPSET}); "
        f"parity max abs diff {card['onnx']['parity']['max_abs_diff']:.1e} on {m['test_images']} images; "
        f"test accuracy {m['test_accuracy']:.4%} ({m['test_errors']} errors)"
    )
    if "trust" in card:
        cal = card["trust"]["calibration"]
        print(
            f"temperature {cal['temperature']:.4f} (fitted on the validation digits); test ECE "
            f"{cal['test_before']['ece']:.2%} → {cal['test_after']['ece']:.2%}, "
            f"NLL {cal['test_before']['nll']:.4f} → {cal['test_after']['nll']:.4f}, "
            f"Brier {cal['test_before']['brier']:.4f} → {cal['test_after']['brier']:.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
