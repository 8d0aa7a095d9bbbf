"""Training configuration: one dataclass that travels with every artifact it produced.

>>> from training.config import TrainConfig
>>> TrainConfig.for_model("cnn").epochs
30
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ModelName = Literal["seed", "cnn"]


@dataclass
class TrainConfig:
    """Everything that decides what a training run produces."""

    model: ModelName = "cnn"
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 3e-3
    """Peak learning rate (the one-cycle schedule warms up to it, then decays by cosine)."""
    warmup_fraction: float = 0.15
    weight_decay: float = 4e-3
    label_smoothing: float = 0.05
    validation_split: float = 1 / 12
    """Fraction of the 60k training images held out for validation (1/12 = the usual 5,000)."""
    augment: bool = True
    rotation_degrees: float = 10.0
    shift_fraction: float = 0.1
    zoom_fraction: float = 0.1
    early_stopping_patience: int = 0
    """Stop when validation loss has not improved for this many epochs; 0 runs the full schedule."""
    reduce_lr_patience: int = 0
    """Halve the learning rate when validation loss stalls this many epochs; 0 keeps the schedule as is."""
    reject_class: bool = False
    """An 11th output, "not a digit", trained on generated negatives (training/ood.py, ``train`` split)."""
    negatives: int = 0
    """Training negatives drawn from the OOD suite's ``train`` split, shared among its families by
    ``training.ood.TRAIN_SHARES`` (needs ``reject_class``)."""
    drawn_digits: int = 0
    """Training digits also given as people draw them (photo path, ``service.preprocess.to_mnist``), as positives."""
    extras_per_epoch: int = 0
    """Drawn digits and negatives sampled into each epoch next to all the MNIST digits (0: all of them, every
    epoch). Each epoch still sees every MNIST training digit once; the extras come round every few epochs."""
    widths: tuple[int, int, int] = (32, 64, 128)
    """Channels of the ``cnn`` model's three stages (of each tower)."""
    towers: int = 1
    """Networks trained side by side in one model, their logits averaged (``cnn`` with the reject class only)."""
    batchnorm_momentum: float = 0.99
    """How slowly BatchNorm's inference statistics follow the batches (Keras' default; the ``cnn`` model only)."""
    seed: int = 42
    smoke: bool = False
    """Train on a small subset (CI and quick checks), not the full data."""
    smoke_train_images: int = 2048
    smoke_test_images: int = 1024
    smoke_negatives: int = 450
    smoke_drawn_digits: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.widths = (int(self.widths[0]), int(self.widths[1]), int(self.widths[2]))  # a list from config.json
        if self.towers > 1 and not self.reject_class:
            raise ValueError("towers need the reject-class head (reject_class=True)")

    @classmethod
    def for_model(cls, model: ModelName, **overrides: Any) -> TrainConfig:
        """Defaults tuned for each architecture; keyword overrides win."""
        base: dict[str, Any]
        if model == "seed":
            # The published notebook: plain Adam, 20% held out, early stopping on validation loss.
            base = dict(
                model="seed",
                epochs=30,
                batch_size=64,
                learning_rate=1e-3,
                warmup_fraction=0.0,
                weight_decay=0.0,
                label_smoothing=0.0,
                validation_split=0.2,
                augment=False,
                early_stopping_patience=5,
                reduce_lr_patience=2,
            )
        else:
            base = dict(
                model="cnn",
                reject_class=True,
                negatives=20_000,
                drawn_digits=8_000,
                extras_per_epoch=12_000,
                towers=2,
                widths=(16, 48, 96),
            )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """JSON's view: what config.json and the model card hold (``widths`` as a list)."""
        return {**dataclasses.asdict(self), "widths": list(self.widths)}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls(**json.loads(path.read_text()))
