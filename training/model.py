"""Keras architectures as pure functions: no data, no training, no side effects.

    >>> from training.model import build
    >>> build("seed").count_params()
    462858

``seed`` reproduces the published notebook (Conv/MaxPool stack, L2-regularized dense layers, softmax).
``cnn`` is the model we ship: BatchNorm conv blocks, dropout, global pooling. With ``reject_class`` its head
is 11 logits: the ten digits and "not a digit" (trained on generated negatives); the export turns them into
calibrated digit probabilities and an ``ood_score``. The shipped ``cnn`` (``TrainConfig``: ``towers=2``) is two
such networks, narrower, side by side in one graph, each trained on its own loss, their logits averaged.
Augmentation is not part of either graph: :func:`augmenter` is applied in the input pipeline, so the exported model
is inference-only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import layers, regularizers

from training.calibrate import logsumexp

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
#: Index of the "not a digit" logit in a reject-class head.
REJECT = NUM_CLASSES
LOGITS_LAYER = "logits"


def build_seed_cnn(l2: float = 1e-4) -> keras.Model:
    """The published baseline: two Conv/MaxPool blocks, two L2-regularized dense layers, softmax-10."""
    reg = regularizers.L2(l2)
    inputs = keras.Input(INPUT_SHAPE, name="input")
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", kernel_regularizer=reg, name="dense1")(x)
    x = layers.Dropout(0.25, name="dropout1")(x)
    x = layers.Dense(128, activation="relu", kernel_regularizer=reg, name="dense2")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="seed")


def _conv_bn(x: keras.KerasTensor, filters: int, name: str, momentum: float) -> keras.KerasTensor:
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=momentum, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _tower(
    inputs: keras.KerasTensor, widths: Sequence[int], dropout: float, momentum: float, prefix: str
) -> keras.KerasTensor:
    """Three BatchNorm conv stages (28→14→7) of ``widths`` channels, global average pooling and dropout: the
    features of one network."""
    x = _conv_bn(inputs, widths[0], f"{prefix}b1a", momentum)
    x = _conv_bn(x, widths[0], f"{prefix}b1b", momentum)
    x = layers.MaxPooling2D(name=f"{prefix}pool1")(x)
    x = _conv_bn(x, widths[1], f"{prefix}b2a", momentum)
    x = _conv_bn(x, widths[1], f"{prefix}b2b", momentum)
    x = layers.MaxPooling2D(name=f"{prefix}pool2")(x)
    x = _conv_bn(x, widths[2], f"{prefix}b3a", momentum)
    x = _conv_bn(x, widths[2], f"{prefix}b3b", momentum)
    x = layers.GlobalAveragePooling2D(name=f"{prefix}gap")(x)
    return layers.Dropout(dropout, name=f"{prefix}dropout")(x)


def build_cnn(
    widths: Sequence[int] = (32, 64, 128),
    dropout: float = 0.25,
    reject_class: bool = False,
    batchnorm_momentum: float = 0.99,
    towers: int = 1,
) -> keras.Model:
    """The ``cnn`` architecture: 3 BatchNorm conv stages (28→14→7), global average pooling, dropout, then softmax-10,
    or (``reject_class``) 11 logits: ten digits and "not a digit". ``batchnorm_momentum`` is Keras' default: how
    slowly the statistics used at inference follow the batches.

    ``towers`` > 1 (reject-class models only) builds that many such networks side by side on the same input, each
    with its own logits (``t0_logits``, ...), and averages their logits: an ensemble in one graph, trained with a
    loss on each tower (:func:`tower_outputs`), so that the towers learn independently."""
    inputs = keras.Input(INPUT_SHAPE, name="input")
    if towers > 1:
        if not reject_class:
            raise ValueError("towers need the reject-class head")
        heads = [
            layers.Dense(NUM_CLASSES + 1, name=f"t{i}_{LOGITS_LAYER}")(
                _tower(inputs, widths, dropout, batchnorm_momentum, f"t{i}_")
            )
            for i in range(towers)
        ]
        return keras.Model(inputs, layers.Average(name=LOGITS_LAYER)(heads), name="cnn")
    x = _tower(inputs, widths, dropout, batchnorm_momentum, "")
    if reject_class:
        outputs = layers.Dense(NUM_CLASSES + 1, name=LOGITS_LAYER)(x)
    else:
        outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cnn")


def tower_heads(model: keras.Model) -> list[keras.layers.Layer]:
    """The logits layers of each tower of a model built with ``towers`` > 1 (empty for a single network)."""
    return [layer for layer in model.layers if layer.name.startswith("t") and layer.name.endswith(f"_{LOGITS_LAYER}")]


def tower_outputs(model: keras.Model) -> keras.Model:
    """The model to train an ensemble with: the same layers, every tower's logits side by side (towers × 11), so
    that the loss (:func:`tower_loss`) trains each tower on its own."""
    heads = tower_heads(model)
    return keras.Model(model.inputs, layers.Concatenate(name="tower_logits")([h.output for h in heads]))


def _per_tower(y_pred: Any, towers: int) -> list[Any]:
    """The training view's output (towers × 11 logits side by side) split into each tower's 11 logits."""
    n = NUM_CLASSES + 1
    return [y_pred[:, i * n : (i + 1) * n] for i in range(towers)]


def tower_loss(towers: int, label_smoothing: float) -> Any:
    """Cross-entropy of each tower's logits against the labels, averaged over the towers."""
    ce = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing)

    def loss(y_true: Any, y_pred: Any) -> Any:
        return sum(ce(y_true, logits) for logits in _per_tower(y_pred, towers)) / towers

    return loss


def tower_accuracy(towers: int) -> Any:
    """Accuracy of the averaged logits, the answer the exported model gives."""

    def accuracy(y_true: Any, y_pred: Any) -> Any:
        return keras.metrics.categorical_accuracy(y_true, sum(_per_tower(y_pred, towers)) / towers)

    return accuracy


def build(
    name: str,
    reject_class: bool = False,
    batchnorm_momentum: float = 0.99,
    towers: int = 1,
    widths: Sequence[int] = (32, 64, 128),
) -> keras.Model:
    """Build an architecture by its name (``seed`` or ``cnn``); only ``cnn`` has a reject-class head."""
    if name == "seed":
        if reject_class or towers > 1:
            raise ValueError("the seed model has no reject-class head and one network")
        return build_seed_cnn()
    if name == "cnn":
        return build_cnn(widths=widths, reject_class=reject_class, batchnorm_momentum=batchnorm_momentum, towers=towers)
    raise ValueError(f"unknown model {name!r}; choose one of ['cnn', 'seed']")


def emits_logits(model: keras.Model) -> bool:
    """Whether the model ends in the reject-class logits (else in softmax digit probabilities)."""
    return bool(model.layers[-1].name == LOGITS_LAYER)


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.asarray(np.exp(z - logsumexp(z, axis=axis, keepdims=True)))


def digit_probabilities(outputs: np.ndarray, logits: bool, temperature: float = 1.0) -> np.ndarray:
    """The ten digit probabilities from a model's raw outputs (softmax over the digit logits, at ``temperature``)."""
    if not logits:
        return outputs
    return softmax(outputs[:, :NUM_CLASSES].astype(np.float64) / temperature).astype(np.float32)


def ood_score(outputs: np.ndarray) -> np.ndarray:
    """Log-odds of "not a digit" against all ten digits: reject logit − logsumexp(digit logits)."""
    z = outputs.astype(np.float64)
    return np.asarray(z[:, REJECT] - logsumexp(z[:, :NUM_CLASSES], axis=1), dtype=np.float32)


def augmenter(rotation_degrees: float, shift: float, zoom: float, seed: int) -> keras.Sequential:
    """Small random rotations, shifts and zooms, applied to training batches only (never exported)."""
    return keras.Sequential(
        [
            layers.RandomRotation(rotation_degrees / 360.0, fill_mode="constant", seed=seed),
            layers.RandomTranslation(shift, shift, fill_mode="constant", seed=seed + 1),
            layers.RandomZoom(zoom, zoom, fill_mode="constant", seed=seed + 2),
        ],
        name="augment",
    )
