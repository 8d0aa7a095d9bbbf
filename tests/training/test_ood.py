"""The OOD suite: deterministic, split apart, drawn the way people send images, fed through the service's own
normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from training import ood
from training.data import Mnist, load_mnist
from training.ood import ALL_FAMILIES, DIGIT_LIKE, DIGIT_LIKE_GLYPHS, FAMILIES, FONTS, Digits, generate


@pytest.fixture(scope="module")
def mnist() -> Mnist:
    return load_mnist()


@pytest.fixture(scope="module")
def digits(mnist: Mnist) -> dict[str, Digits]:
    return {"train": Digits(mnist.x_train, mnist.y_train), "test": Digits(mnist.x_test, mnist.y_test)}


def test_the_same_split_is_the_same_images_every_time(digits: dict[str, Digits]) -> None:
    a = generate("held_out", 4, digits["test"])
    b = generate("held_out", 4, digits["test"])
    assert a.digest() == b.digest() and np.array_equal(a.images, b.images)
    assert a.sizes() == dict.fromkeys(ALL_FAMILIES, 4)
    # Image i does not depend on how many are drawn: a larger suite starts with the smaller one.
    c = generate("held_out", 6, digits["test"])
    for name in ALL_FAMILIES:
        assert np.array_equal(c.of(name)[:4], a.of(name))


def test_a_pinned_image_never_changes(digits: dict[str, Digits]) -> None:
    """Pillow, numpy or font changes that alter the suite show up here (and in the cards' suite digests)."""
    suite = generate("held_out", 2, digits["test"], families=("letters", "shapes", "several_digits"))
    assert suite.images.shape == (6, 28, 28) and suite.images.dtype == np.float32
    # Not a hash of the bytes (float rounding may differ across CPUs): the ink of each image, to a tolerance.
    ink = np.round(suite.images.sum(axis=(1, 2)), 1)
    assert np.all(ink > 5), ink


def test_splits_are_disjoint(digits: dict[str, Digits]) -> None:
    suites = {
        "train": generate("train", 30, digits["train"], FAMILIES),
        "fit": generate("fit", 30, digits["train"], FAMILIES),
        "held_out": generate("held_out", 30, digits["test"], FAMILIES),
    }
    seen: dict[bytes, str] = {}
    for split, suite in suites.items():
        for img, fam in zip(suite.images, suite.family, strict=True):
            name = suite.families[fam]
            if name == "near_blank" and float(img.max()) == 0.0:
                continue  # an all-zero 28×28 array is one image whatever the split
            key = img.tobytes()
            assert key not in seen or seen[key] == split, f"a {name} image of {split} is also in {seen[key]}"
            seen[key] = split
    assert set(FONTS["held_out"]).isdisjoint(FONTS["fit"]) and FONTS["fit"] == FONTS["train"]
    assert len(ood.SPLIT_SEEDS) == len(set(ood.SPLIT_SEEDS.values())) == 3


def test_held_out_composites_come_from_test_digits(digits: dict[str, Digits]) -> None:
    assert ood.digits_for("held_out", digits["train"], digits["test"]) is digits["test"]
    assert ood.digits_for("fit", digits["train"], digits["test"]) is digits["train"]


def test_images_are_model_inputs(digits: dict[str, Digits]) -> None:
    suite = generate("fit", 8, digits["train"])
    x = suite.images
    assert x.shape == (8 * len(ALL_FAMILIES), 28, 28) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0
    inked = [name for name in ALL_FAMILIES if name != "near_blank"]
    for name in inked:
        assert (suite.of(name).max(axis=(1, 2)) > 0.1).all(), f"{name} has an image without ink"
    # The service's normalisation: the ink fits a 20-pixel box, away from the frame's edge.
    assert not suite.of("letters")[:, [0, 27], :].any() and not suite.of("letters")[:, :, [0, 27]].any()


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f != "near_blank"])
def test_pages_are_dark_ink_on_light_paper(family: str, digits: dict[str, Digits]) -> None:
    ctx = ood.context("held_out", digits["test"])
    for i in range(6):
        page = ood.GENERATORS[family](np.random.default_rng(i), ctx)
        assert isinstance(page, np.ndarray) and page.ndim == 2 and min(page.shape) >= 16
        if family not in ("photo_crops", "noise", "textures"):  # those may cover the whole page
            assert np.median(page) > 0.6, f"{family}: the paper should be light"


def test_near_blank_includes_a_blank_pixel_array(digits: dict[str, Digits]) -> None:
    blank = generate("held_out", 60, digits["test"], families=("near_blank",)).images
    assert (blank.max(axis=(1, 2)) == 0).any(), "the blank 28×28 array people send must be in the suite"


def test_digit_like_glyphs_are_kept_apart() -> None:
    assert not set(ood.LETTERS + ood.SYMBOLS) & set(DIGIT_LIKE_GLYPHS)
    for glyph in "OoIlSZbqg":
        assert glyph in DIGIT_LIKE_GLYPHS
    assert DIGIT_LIKE not in FAMILIES and DIGIT_LIKE in ALL_FAMILIES


def test_fonts_are_the_ones_matplotlib_ships() -> None:
    for split in ("fit", "held_out"):
        for font in FONTS[split]:
            assert (ood.font_dir() / font).is_file()


def test_drawn_digits_are_seeded_and_go_through_the_service_normalisation(mnist: Mnist) -> None:
    a = ood.draw_digits(mnist.x_test[:12], seed=5)
    assert np.array_equal(a, ood.draw_digits(mnist.x_test[:12], seed=5))
    assert not np.array_equal(a, ood.draw_digits(mnist.x_test[:12], seed=6))
    assert a.shape == (12, 28, 28) and a.max() <= 1.0
    # Centred like MNIST: the centre of mass lands near (14, 14).
    rows = (a.sum(axis=2) * np.arange(28)).sum(axis=1) / a.sum(axis=(1, 2))
    assert np.all(np.abs(rows - 14) < 1.5)


def test_rank_filter_grows_and_shrinks_strokes() -> None:
    x = np.zeros((9, 9), np.float32)
    x[4, 4] = 1.0
    assert ood.rank_filter(x, 3, grow=True).sum() == 9
    assert ood.rank_filter(ood.rank_filter(x, 3, grow=True), 3, grow=False).sum() == 1
