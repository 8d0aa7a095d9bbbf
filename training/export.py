"""Export a trained Keras model to ONNX, prove parity on the MNIST test set, and write the model card.

    mnist-export --run runs/cnn --out models             # models/mnist-cnn.onnx + models/mnist-cnn.json
    mnist-export --run runs/cnn-smoke --out /tmp/export  # the smoke model (parity on its test subset)

The exported graph takes ``input`` float32 [batch, 28, 28, 1] in 0..1 and returns ``probabilities``
float32 [batch, 10]. Export fails (exit 1, nothing written) unless onnxruntime matches Keras on every
test image: max abs difference ≤ 1e-5 and identical argmax. The card's metrics come from the ONNX model
itself, run by onnxruntime: they describe exactly what ships.
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
BATCH_DIM = "batch"
OPSET = 17
PARITY_ATOL = 1e-5
CARD_SCHEMA_VERSION = 1


class ExportError(RuntimeError):
    """The exported graph is not faithful to the Keras model."""


def to_onnx(model: Any, opset: int = OPSET) -> Any:
    """Convert through a ``tf.function`` (``from_keras`` does not support Keras 3), then tidy the names."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, 28, 28, 1), tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=spec)  # type: ignore[untyped-decorator]
    def serve(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=False)

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset)
    return _rename_io(proto)


def _rename_io(proto: Any) -> Any:
    """One input ``input``, one output ``probabilities``, and a batch dimension named ``batch``."""
    graph = proto.graph
    renames = {graph.input[0].name: INPUT_NAME, graph.output[0].name: OUTPUT_NAME}
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in (graph.input[0], graph.output[0]):
        value.name = renames[value.name]
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = BATCH_DIM
    return proto


def ort_predict(onnx_bytes: bytes, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


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


def export(
    run_dir: Path, out_dir: Path, name: str = "mnist-cnn", version: str = "1.0.0", data_dir: Path | None = None
) -> dict[str, Any]:
    """Export ``run_dir/model.keras`` to ``out_dir/<name>.onnx`` and write ``<name>.json``; return the card."""
    import keras
    import onnx

    config = TrainConfig.load(run_dir / "config.json")
    run = json.loads((run_dir / "run.json").read_text())
    model = keras.models.load_model(run_dir / "model.keras")
    x_test, y_test = load_test_set(data_dir)
    if config.smoke:
        x_test, y_test = x_test[: config.smoke_test_images], y_test[: config.smoke_test_images]
    x = (x_test.astype(np.float32) / 255.0)[..., None]

    proto = to_onnx(model)
    proto.doc_string = f"{name} {version}: MNIST digit classifier (input 0..1, white ink on black)"
    for key, value in {"name": name, "version": version}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx_bytes = proto.SerializeToString()

    keras_probs = model.predict(x, batch_size=1000, verbose=0)
    onnx_probs = ort_predict(onnx_bytes, x)
    max_diff = check_parity(keras_probs, onnx_probs)

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
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.onnx").write_bytes(onnx_bytes)
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/cnn"), help="run directory from mnist-train")
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--name", default="mnist-cnn")
    parser.add_argument("--version", default="1.0.0")
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
