"""Train one of the architectures on MNIST and save config, history and checkpoint together.

    mnist-train --model cnn                  # the shipped model, full schedule (27-43 min on 2 CPU cores)
    mnist-train --model seed                 # the published baseline: 20% validation, early stopping
    mnist-train --model cnn --smoke          # a tiny subset, seconds: for CI and quick checks
    python -m training.train --help

A run directory (default ``runs/<model>``) receives ``config.json``, ``history.json``, ``model.keras``
and ``run.json`` (wall time, hardware, library versions). ``mnist-evaluate`` and ``mnist-export`` read it.

The ``cnn`` model learns an 11th class, "not a digit", from negatives the OOD suite's ``train`` split generates
(training/ood.py; built from training digits, DejaVu fonts, its own seeds), and sees some of its training
digits a second time as people draw them, through the service's normalisation, so that the photo path stays
``digit``. Validation is on MNIST digits only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.config import TrainConfig
from training.data import Mnist, load_mnist

DEFAULT_RUNS = Path("runs")


@dataclass
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def split_data(mnist: Mnist, config: TrainConfig) -> Split:
    """Seeded shuffle of the 60k training images, then hold out ``validation_split`` of them."""
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(mnist.x_train))
    if config.smoke:
        order = order[: config.smoke_train_images + config.smoke_train_images // 4]
    n_val = round(len(order) * config.validation_split)
    train_idx, val_idx = order[n_val:], order[:n_val]
    return Split(mnist.x_train[train_idx], mnist.y_train[train_idx], mnist.x_train[val_idx], mnist.y_train[val_idx])


@dataclass
class TrainingSet:
    """uint8 images N×28×28 with labels 0–9, or 10 for "not a digit": the MNIST digits, and the extras (drawn
    digits and negatives) a reject-class model also learns from; counts of each kind for the run record."""

    x: np.ndarray
    y: np.ndarray
    x_extra: np.ndarray
    y_extra: np.ndarray
    counts: dict[str, int]

    def __len__(self) -> int:
        return len(self.x) + len(self.x_extra)


def training_set(split: Split, config: TrainConfig) -> TrainingSet:
    """The MNIST training digits, plus (reject-class models) drawn digits and generated negatives."""
    if not config.reject_class:
        empty = np.zeros((0, 28, 28), np.uint8)
        return TrainingSet(split.x_train, split.y_train, empty, empty[:, 0, 0], {"mnist_digits": len(split.x_train)})
    from service.preprocess import to_uint8
    from training.model import REJECT
    from training.ood import FAMILIES, Digits, default_workers, draw_digits, generate, train_counts

    n_drawn = config.smoke_drawn_digits if config.smoke else config.drawn_digits
    n_neg = config.smoke_negatives if config.smoke else config.negatives
    rng = np.random.default_rng(config.seed + 2)
    pick = np.sort(rng.choice(len(split.x_train), size=min(n_drawn, len(split.x_train)), replace=False))
    workers = default_workers()
    drawn = draw_digits(split.x_train[pick], seed=config.seed + 3, workers=workers)
    negatives = generate("train", train_counts(n_neg), Digits(split.x_train, split.y_train), FAMILIES, workers=workers)
    x_extra = np.concatenate([to_uint8(drawn), to_uint8(negatives.images)])
    y_extra = np.concatenate([split.y_train[pick], np.full(len(negatives.images), REJECT, np.uint8)])
    counts = {"mnist_digits": len(split.x_train), "drawn_digits": len(drawn), "negatives": len(negatives.images)}
    return TrainingSet(split.x_train, split.y_train, x_extra, y_extra.astype(np.uint8), counts)


def hardware() -> dict[str, Any]:
    """What the run ran on, for the model card."""
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpus": gpus, "platform": platform.platform()}


def library_versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def per_epoch(data: TrainingSet, config: TrainConfig) -> int:
    """Images one epoch shows: every MNIST digit, and ``extras_per_epoch`` of the extras (all if 0)."""
    extras = len(data.x_extra)
    if config.extras_per_epoch and not config.smoke:
        extras = min(extras, config.extras_per_epoch)
    return len(data.x) + extras


def make_training_dataset(data: TrainingSet, config: TrainConfig):  # type: ignore[no-untyped-def]
    """Shuffled, augmented batches; with extras, an endless stream that mixes them in at their share of an epoch
    (``fit`` is then given ``steps_per_epoch``)."""
    import tensorflow as tf

    if len(data.x_extra) == 0 or per_epoch(data, config) == len(data):
        x, y = np.concatenate([data.x, data.x_extra]), np.concatenate([data.y, data.y_extra])
        return make_dataset(x, y, config, training=True)
    digits = tf.data.Dataset.from_tensor_slices((data.x, data.y))
    digits = digits.shuffle(len(data.x), seed=config.seed, reshuffle_each_iteration=True).repeat()
    extras = tf.data.Dataset.from_tensor_slices((data.x_extra, data.y_extra))
    extras = extras.shuffle(len(data.x_extra), seed=config.seed + 1, reshuffle_each_iteration=True).repeat()
    share = (per_epoch(data, config) - len(data.x)) / per_epoch(data, config)
    mixed = tf.data.Dataset.sample_from_datasets([digits, extras], weights=[1 - share, share], seed=config.seed)
    return _batches(mixed, config, training=True)


def make_dataset(x: np.ndarray, y: np.ndarray, config: TrainConfig, training: bool):  # type: ignore[no-untyped-def]
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(x), seed=config.seed, reshuffle_each_iteration=True)
    return _batches(ds, config, training)


def _batches(ds, config: TrainConfig, training: bool):  # type: ignore[no-untyped-def]
    import tensorflow as tf

    from training.model import NUM_CLASSES, augmenter

    depth = NUM_CLASSES + 1 if config.reject_class else NUM_CLASSES

    def prepare(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images = tf.cast(images, tf.float32)[..., None] / 255.0
        return images, tf.one_hot(tf.cast(labels, tf.int32), depth)

    ds = ds.batch(config.batch_size).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if training and config.augment:
        aug = augmenter(config.rotation_degrees, config.shift_fraction, config.zoom_fraction, config.seed)
        ds = ds.map(lambda a, b: (aug(a, training=True), b), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def train(config: TrainConfig, out_dir: Path, data_dir: Path | None = None, verbose: int | str = "auto") -> Path:
    """Train, write the run directory, return the path of the saved Keras model."""
    import keras

    from training.model import build, tower_accuracy, tower_loss, tower_outputs

    out_dir.mkdir(parents=True, exist_ok=True)
    config.save(out_dir / "config.json")
    keras.utils.set_random_seed(config.seed)
    split = split_data(load_mnist(data_dir), config)
    started = time.perf_counter()
    data = training_set(split, config)
    prepare_wall = time.perf_counter() - started
    train_ds = make_training_dataset(data, config)
    val_ds = make_dataset(split.x_val, split.y_val, config, training=False)
    epoch_images = per_epoch(data, config)
    steps_per_epoch = int(np.ceil(epoch_images / config.batch_size))

    model = build(
        config.model,
        reject_class=config.reject_class,
        batchnorm_momentum=config.batchnorm_momentum,
        towers=config.towers,
        widths=config.widths,
    )
    # An ensemble trains through a view with every tower's logits, one loss each; the saved model averages them.
    trained = tower_outputs(model) if config.towers > 1 else model
    steps = steps_per_epoch * config.epochs
    if config.warmup_fraction > 0:
        warmup = int(steps * config.warmup_fraction)
        lr: Any = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=config.learning_rate / 10,
            decay_steps=steps - warmup,
            alpha=0.01,
            warmup_target=config.learning_rate,
            warmup_steps=warmup,
        )
    else:
        lr = config.learning_rate
    optimizer = (
        keras.optimizers.AdamW(lr, weight_decay=config.weight_decay)
        if config.weight_decay
        else keras.optimizers.Adam(lr)
    )
    if config.towers > 1:
        loss: Any = tower_loss(config.towers, config.label_smoothing)
        accuracy: Any = tower_accuracy(config.towers)
    else:
        loss = keras.losses.CategoricalCrossentropy(
            from_logits=config.reject_class, label_smoothing=config.label_smoothing
        )
        accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
    trained.compile(optimizer=optimizer, loss=loss, metrics=[accuracy])
    model_path = out_dir / "model.keras"
    callbacks: list[keras.callbacks.Callback] = [keras.callbacks.CSVLogger(str(out_dir / "history.csv"))]
    if config.early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=config.early_stopping_patience, restore_best_weights=True, verbose=1
            )
        )

    if config.reduce_lr_patience:
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.5, patience=config.reduce_lr_patience, min_lr=1e-5, verbose=1
            )
        )
    print(
        f"training {config.model} ({model.count_params():,} parameters) on {len(data):,} images "
        f"({', '.join(f'{v:,} {k}' for k, v in data.counts.items())}; prepared in {prepare_wall:.0f} s), "
        f"{epoch_images:,} per epoch, validating on {len(split.x_val):,}, {config.epochs} epochs",
        flush=True,
    )
    start = time.perf_counter()
    history = trained.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        # A finite dataset (no extras, or all of them every epoch) ends each epoch itself.
        steps_per_epoch=steps_per_epoch if epoch_images < len(data) else None,
        callbacks=callbacks,
        verbose=verbose,
    )
    wall = time.perf_counter() - start
    model.save(model_path)

    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    (out_dir / "history.json").write_text(json.dumps(hist, indent=1) + "\n")
    run = {
        "model": config.model,
        "parameters": int(model.count_params()),
        "epochs_run": len(hist.get("loss", [])),
        "train_images": len(split.x_train),
        "validation_images": len(split.x_val),
        "training_set": data.counts,
        "best_val_accuracy": max(hist.get("val_accuracy", [0.0])),
        "prepare_wall_seconds": round(prepare_wall, 1),
        "train_wall_seconds": round(wall, 1),
        "images_per_epoch": epoch_images,
        "images_per_second": round(steps_per_epoch * config.batch_size * len(hist.get("loss", [])) / wall, 1),
        "hardware": hardware(),
        "libraries": library_versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(f"trained in {wall:.0f} s; best val accuracy {run['best_val_accuracy']:.4f}; saved {model_path}")
    return model_path


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, Path, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["seed", "cnn"], default="cnn")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--smoke", action="store_true", help="small subset, 2 epochs: finishes in well under a minute")
    parser.add_argument("--out", type=Path, help="run directory (default runs/<model>[-smoke])")
    parser.add_argument("--data-dir", type=Path, help="MNIST cache directory (default $MNIST_DATA_DIR or ~/.cache)")
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    if args.smoke:
        overrides = {"epochs": 2, **overrides, "smoke": True}
        if args.model == "cnn":  # ~50 steps: at Keras' 0.99 the inference statistics would barely move
            overrides = {"batchnorm_momentum": 0.9, **overrides}
    config = TrainConfig.for_model(args.model, **overrides)
    out = args.out or DEFAULT_RUNS / (args.model + ("-smoke" if args.smoke else ""))
    return config, out, args.data_dir


def main(argv: list[str] | None = None) -> int:
    config, out, data_dir = parse_args(argv)
    train(config, out, data_dir, verbose=2 if not sys.stdout.isatty() else "auto")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
