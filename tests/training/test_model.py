"""Architectures: shapes, parameter counts, and no augmentation inside the graphs."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from training.model import augmenter, build, digit_probabilities, emits_logits, ood_score  # noqa: E402


@pytest.mark.parametrize(("name", "params"), [("seed", 462_858), ("cnn", 289_066)])
def test_builders_give_softmax_over_ten_digits(name: str, params: int) -> None:
    model = build(name)
    assert model.count_params() == params
    assert model.input_shape == (None, 28, 28, 1)
    probs = np.asarray(model(np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32), training=False))
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_reject_class_head_gives_eleven_logits() -> None:
    model = build("cnn", reject_class=True)
    assert model.count_params() == 289_066 + 129 and emits_logits(model) and not emits_logits(build("cnn"))
    raw = np.asarray(model(np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32), training=False))
    assert raw.shape == (3, 11)
    probs = digit_probabilities(raw, logits=True, temperature=0.5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # ood_score is the log-odds of the reject class against all ten digits.
    p11 = np.exp(raw - raw.max(1, keepdims=True))
    p11 /= p11.sum(1, keepdims=True)
    np.testing.assert_allclose(ood_score(raw), np.log(p11[:, 10] / p11[:, :10].sum(1)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no reject-class"):
        build("seed", reject_class=True)


def test_seed_model_is_the_published_shape() -> None:
    model = build("seed")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Conv2D") == 2 and kinds.count("MaxPooling2D") == 2
    dense = [layer for layer in model.layers if type(layer).__name__ == "Dense"]
    assert [d.units for d in dense] == [256, 128, 10]
    assert all(d.kernel_regularizer is not None for d in dense[:-1])


@pytest.mark.parametrize("name", ["seed", "cnn"])
def test_no_augmentation_layer_is_part_of_an_exported_graph(name: str) -> None:
    assert not [layer for layer in build(name).layers if type(layer).__name__.startswith("Random")]


def test_augmenter_changes_training_batches_only() -> None:
    aug = augmenter(10, 0.1, 0.1, seed=1)
    x = np.zeros((4, 28, 28, 1), dtype=np.float32)
    x[:, 10:18, 12:16] = 1.0
    assert np.array_equal(np.asarray(aug(x, training=False)), x)
    assert not np.array_equal(np.asarray(aug(x, training=True)), x)


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build("resnet")


def test_towers_are_an_ensemble_in_one_graph_trained_one_loss_each() -> None:
    from training.model import tower_accuracy, tower_heads, tower_loss, tower_outputs

    model = build("cnn", reject_class=True, towers=2, widths=(16, 48, 96))
    assert model.count_params() == 313_718 and emits_logits(model)
    x = np.random.default_rng(0).random((5, 28, 28, 1), dtype=np.float32)
    mean = np.asarray(model(x, training=False))
    heads = [np.asarray(keras.Model(model.inputs, h.output)(x, training=False)) for h in tower_heads(model)]
    assert len(heads) == 2 and mean.shape == (5, 11)
    assert not np.allclose(heads[0], heads[1])  # two networks, not one copied
    np.testing.assert_allclose(mean, (heads[0] + heads[1]) / 2, rtol=1e-5, atol=1e-6)
    # The training view shares the layers and puts both towers' logits side by side.
    both = np.asarray(tower_outputs(model)(x, training=False))
    np.testing.assert_allclose(both, np.concatenate(heads, axis=1), rtol=1e-5, atol=1e-6)
    y = keras.utils.to_categorical([0, 3, 10, 7, 10], 11)
    ce = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.05)
    expected = (float(ce(y, heads[0])) + float(ce(y, heads[1]))) / 2
    np.testing.assert_allclose(float(tower_loss(2, 0.05)(y, both)), expected, rtol=1e-5)
    accuracy = np.asarray(tower_accuracy(2)(y, both))
    np.testing.assert_array_equal(accuracy, (mean.argmax(1) == y.argmax(1)).astype(np.float32))
    with pytest.raises(ValueError, match="reject-class"):
        build("cnn", towers=2)
    from training.config import TrainConfig

    with pytest.raises(ValueError, match="reject-class"):  # refused before any data is prepared
        TrainConfig(towers=2)
