"""Evaluate a trained model on the 10k MNIST test images: metrics, a JSON report and PNG plots.

    mnist-evaluate --run runs/cnn                 # writes runs/cnn/report.json and runs/cnn/plots/*.png
    mnist-evaluate --run runs/seed --docs docs    # also copies the plots to docs/seed-*.png
    mnist-evaluate --onnx models/mnist-cnn.onnx   # the shipped ONNX model, onnxruntime only

The report holds accuracy, error count, per-class precision/recall/F1, the confusion matrix and the most
confused (true, predicted) pairs. Plots: confusion matrix, errors per class, misclassified gallery,
sample predictions and (for a run) the training curves.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from training.data import load_test_set
from training.export import classification_metrics, ort_outputs

CLASSES = list(range(10))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int = 10) -> np.ndarray:
    """Rows are true digits, columns predicted digits."""
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true.astype(np.int64), y_pred.astype(np.int64)), 1)
    return cm


def report(y_true: np.ndarray, probs: np.ndarray, top_pairs: int = 10) -> dict[str, Any]:
    """Everything the README and the model card quote, as plain JSON types."""
    y_pred = probs.argmax(1)
    cm = confusion_matrix(y_true, y_pred)
    tp = np.diag(cm).astype(float)
    precision = tp / np.maximum(cm.sum(0), 1)
    recall = tp / np.maximum(cm.sum(1), 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    pairs = sorted(((int(off[t, p]), t, p) for t in CLASSES for p in CLASSES if off[t, p]), reverse=True)
    return {
        **classification_metrics(y_true, probs),
        "per_class": {
            str(c): {
                "precision": round(float(precision[c]), 6),
                "recall": round(float(recall[c]), 6),
                "f1": round(float(f1[c]), 6),
                "support": int(cm[c].sum()),
                "errors": int(cm[c].sum() - cm[c, c]),
            }
            for c in CLASSES
        },
        "confusion_matrix": cm.tolist(),
        "most_confused": [{"true": t, "predicted": p, "count": n} for n, t, p in pairs[:top_pairs]],
        "misclassified_indices": np.flatnonzero(y_pred != y_true).tolist(),
    }


def plot_all(
    x: np.ndarray,
    y_true: np.ndarray,
    probs: np.ndarray,
    rep: dict[str, Any],
    out: Path,
    title: str,
    history: dict[str, list[float]] | None = None,
) -> list[Path]:
    """Write the PNGs; return their paths. Small figures: they are committed under docs/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    y_pred = probs.argmax(1)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = out / f"{name}.png"
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    cm = np.array(rep["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(6, 5.4))
    shown = cm.copy()
    np.fill_diagonal(shown, 0)
    im = ax.imshow(shown, cmap="Reds")
    for t in CLASSES:
        for p in CLASSES:
            ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=7, color="black" if t != p else "tab:blue")
    ax.set(
        xticks=CLASSES,
        yticks=CLASSES,
        xlabel="predicted",
        ylabel="true",
        title=f"{title}: confusion matrix (off-diagonal shaded)",
    )
    fig.colorbar(im, ax=ax, fraction=0.046)
    save(fig, "confusion_matrix")

    errors = [rep["per_class"][str(c)]["errors"] for c in CLASSES]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(CLASSES, errors, color="tab:red")
    ax.set(
        xticks=CLASSES,
        xlabel="true digit",
        ylabel="misclassified",
        title=f"{title}: {rep['test_errors']} errors by true class",
    )
    save(fig, "errors_by_class")

    wrong = np.flatnonzero(y_pred != y_true)[:48]
    if len(wrong):
        cols = 12
        rows = int(np.ceil(len(wrong) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 1.1))
        for ax in np.atleast_1d(axes).ravel():
            ax.axis("off")
        for ax, i in zip(np.atleast_1d(axes).ravel(), wrong, strict=False):
            ax.imshow(x[i], cmap="gray_r")
            ax.set_title(f"{y_true[i]}→{y_pred[i]} {probs[i].max():.0%}", fontsize=7)
        fig.suptitle(f"{title}: misclassified test digits (true→predicted, confidence)", fontsize=9)
        save(fig, "misclassified")

    fig, axes = plt.subplots(3, 8, figsize=(8, 3.4))
    for ax, i in zip(axes.ravel(), range(24), strict=False):
        ax.imshow(x[i], cmap="gray_r")
        ax.set_title(
            f"{y_pred[i]} ({probs[i].max():.0%})",
            fontsize=8,
            color="tab:green" if y_pred[i] == y_true[i] else "tab:red",
        )
        ax.axis("off")
    fig.suptitle(f"{title}: predictions on the first test digits", fontsize=9)
    save(fig, "sample_predictions")

    if history and "loss" in history:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
        epochs = range(1, len(history["loss"]) + 1)
        a1.plot(epochs, history["loss"], label="train")
        if "val_loss" in history:
            a1.plot(epochs, history["val_loss"], label="validation")
        a1.set(xlabel="epoch", ylabel="loss", title="loss", yscale="log")
        a1.legend()
        a2.plot(epochs, history.get("accuracy", []), label="train")
        if "val_accuracy" in history:
            a2.plot(epochs, history["val_accuracy"], label="validation")
        a2.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0.97, 1.0))
        a2.legend()
        fig.suptitle(f"{title}: training curves", fontsize=9)
        save(fig, "training_curves")
    return written


def predict_run(run_dir: Path, x: np.ndarray) -> np.ndarray:
    """The run's digit probabilities (for a reject-class model: softmax over the ten digit logits, T = 1)."""
    import keras

    from training.model import digit_probabilities, emits_logits

    model = keras.models.load_model(run_dir / "model.keras")
    raw = np.asarray(model.predict(x[..., None], batch_size=1000, verbose=0))
    return digit_probabilities(raw, emits_logits(model))


def evaluate(
    run_dir: Path | None = None,
    onnx_path: Path | None = None,
    out: Path | None = None,
    docs: Path | None = None,
    data_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate a run directory's Keras model or an ONNX file; write report.json and plots."""
    if (run_dir is None) == (onnx_path is None):
        raise ValueError("give exactly one of run_dir or onnx_path")
    x_u8, y = load_test_set(data_dir)
    history = None
    if run_dir is not None:
        config = json.loads((run_dir / "config.json").read_text())
        if config.get("smoke"):
            x_u8, y = x_u8[: config["smoke_test_images"]], y[: config["smoke_test_images"]]
        x = x_u8.astype(np.float32) / 255.0
        probs = predict_run(run_dir, x)
        title = run_dir.name
        hist_path = run_dir / "history.json"
        history = json.loads(hist_path.read_text()) if hist_path.exists() else None
        out = out or run_dir
    else:
        assert onnx_path is not None
        x = x_u8.astype(np.float32) / 255.0
        probs, _ = ort_outputs(onnx_path, x[..., None])
        title = onnx_path.stem
        out = out or onnx_path.parent / f"{onnx_path.stem}-eval"
    rep = report(y, probs)
    rep["title"] = title
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
    plots = plot_all(x, y, probs, rep, out / "plots", title, history)
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        for p in plots:
            shutil.copy(p, docs / f"{title}-{p.name}")
    return rep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="run directory from mnist-train")
    src.add_argument("--onnx", type=Path, help="an exported ONNX model (onnxruntime only)")
    parser.add_argument("--out", type=Path, help="where report.json and plots/ go (default: the run directory)")
    parser.add_argument("--docs", type=Path, help="also copy the plots here as <name>-<plot>.png")
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args(argv)
    rep = evaluate(args.run, args.onnx, args.out, args.docs, args.data_dir)
    print(
        f"{rep['title']}: test accuracy {rep['test_accuracy']:.4%}, {rep['test_errors']} errors of {rep['test_images']}"
    )
    print(
        "most confused (true→predicted):",
        ", ".join(f"{p['true']}→{p['predicted']} ×{p['count']}" for p in rep["most_confused"][:5]),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
