"""Keras architectures as pure functions: no data, no training, no side effects.

    >>> from training.model import build
    >>> build("seed").count_params()
    462858

``seed`` reproduces the published notebook (Conv/MaxPool stack, L2-regularized dense layers, softmax).
``cnn`` is the model we ship: BatchNorm conv blocks, dropout, global pooling. With ``reject_class`` its head
is 11 logits: the ten digits and "not a digit" (trained on generated negatives); the export turns them into
calibrated digit probabilities and an ``ood_score``. Augmentation is not part of either graph: :func:`augmenter`
is applied in the input pipeline, so the exported model is inference-only.
"""

from __future__ import annotations

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


def build_cnn(
    width: int = 32, dropout: float = 0.25, reject_class: bool = False, batchnorm_momentum: float = 0.99
) -> keras.Model:
    """The shipped model: 3 BatchNorm conv stages (28→14→7), global average pooling, dropout, then softmax-10,
    or (``reject_class``) 11 logits: ten digits and "not a digit". ``batchnorm_momentum`` is Keras' default: how
    slowly the statistics used at inference follow the batches."""
    inputs = keras.Input(INPUT_SHAPE, name="input")
    x = _conv_bn(inputs, width, "b1a", batchnorm_momentum)
    x = _conv_bn(x, width, "b1b", batchnorm_momentum)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = _conv_bn(x, 2 * width, "b2a", batchnorm_momentum)
    x = _conv_bn(x, 2 * width, "b2b", batchnorm_momentum)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = _conv_bn(x, 4 * width, "b3a", batchnorm_momentum)
    x = _conv_bn(x, 4 * width, "b3b", batchnorm_momentum)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    if reject_class:
        outputs = layers.Dense(NUM_CLASSES + 1, name=LOGITS_LAYER)(x)
    else:
        outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cnn")


def build(name: str, reject_class: bool = False, batchnorm_momentum: float = 0.99) -> keras.Model:
    """Build an architecture by its name (``seed`` or ``cnn``); only ``cnn`` has a reject-class head."""
    if name == "seed":
        if reject_class:
            raise ValueError("the seed model has no reject-class head")
        return build_seed_cnn()
    if name == "cnn":
        return build_cnn(reject_class=reject_class, batchnorm_momentum=batchnorm_momentum)
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
