"""The photo path on digits given the way people give them: the committed model through the real preprocessing.

    .venv/bin/python -m pytest tests/service/test_photo_robustness.py -s     # prints the figure

1,000 MNIST test digits are drawn as dark ink on a white 280×280 canvas at random sizes, positions and stroke
thicknesses, with varied ink and paper tones, encoded as PNG or JPEG, then decoded and normalised by
``service.preprocess.decode_image`` and classified by the shipped ONNX model. The figure (overall and broken
down by stroke thickness and size) is printed and written to test-artifacts/photo-robustness.json.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from service.model import load_model
from service.preprocess import as_model_input, decode_image
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
SAMPLES = 1000
SEED = 20240611
REQUIRED_ACCURACY = 0.97
CANVAS = 280
#: Side of the 28×28 MNIST frame once drawn: the digit itself (20/28 of it) is then 60 to 180 px tall.
FRAME_SIDE = (84, 252)
#: Stroke thickness change, as a fraction of the scaled MNIST stroke: from thinner to much bolder pens.
THICKNESS = (-0.4, 1.0)
#: An MNIST stroke is about this many pixels wide in the 28×28 frame.
MNIST_STROKE = 2.2
JPEG_FRACTION = 0.3


def render_as_people_give_it(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, dict[str, float]]:
    """A 28×28 white-on-black MNIST digit → PNG/JPEG bytes of dark ink on a white 280×280 canvas."""
    side = int(rng.integers(FRAME_SIDE[0], FRAME_SIDE[1] + 1))
    ink = Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)
    # Thicker or thinner pens: grey-level dilation/erosion by a square proportional to the stroke.
    thickness = float(rng.uniform(*THICKNESS))
    kernel = 2 * round(abs(thickness) * MNIST_STROKE * side / 28 / 2) + 1
    if kernel > 1:
        ink = ink.filter(ImageFilter.MaxFilter(kernel) if thickness > 0 else ImageFilter.MinFilter(kernel))
    sheet = Image.new("L", (CANVAS, CANVAS), 0)
    sheet.paste(ink, (int(rng.integers(0, CANVAS - side + 1)), int(rng.integers(0, CANVAS - side + 1))))
    paper, pen = rng.uniform(225, 255), rng.uniform(0, 70)
    alpha = np.asarray(sheet, dtype=np.float32) / 255.0
    page = Image.fromarray(np.clip(np.rint(paper + (pen - paper) * alpha), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    jpeg = rng.random() < JPEG_FRACTION
    if jpeg:
        page.save(buffer, format="JPEG", quality=int(rng.integers(70, 96)))
    else:
        page.save(buffer, format="PNG")
    return buffer.getvalue(), {"side": side, "thickness": thickness, "jpeg": float(jpeg)}


def _breakdown(correct: np.ndarray, values: np.ndarray, edges: list[float], names: list[str]) -> dict[str, dict]:
    bins = np.digitize(values, edges[1:-1])
    return {
        name: {"n": int((bins == i).sum()), "accuracy": round(float(correct[bins == i].mean()), 4)}
        for i, name in enumerate(names)
        if (bins == i).any()
    }


def test_photos_of_mnist_digits_are_read_correctly(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    started = time.perf_counter()
    images, labels = mnist_test
    rng = np.random.default_rng(SEED)
    chosen = rng.choice(len(images), SAMPLES, replace=False)
    max_pixels = Settings().max_image_pixels

    inputs, sides, thicknesses = [], [], []
    for i in chosen:
        data, params = render_as_people_give_it(images[i], rng)
        inputs.append(decode_image(data, max_pixels))
        sides.append(params["side"])
        thicknesses.append(params["thickness"])
    model = load_model(ROOT / "models", "mnist-cnn", warm_up=False)
    predicted = model.predict(as_model_input(inputs)).argmax(axis=1)
    correct = predicted == labels[chosen]
    accuracy = float(correct.mean())
    # The same digits as MNIST gives them (already centred 28×28) bound what the photo path can reach.
    plain = model.predict((images[chosen] / 255.0).astype(np.float32)[..., np.newaxis]).argmax(axis=1)
    plain_accuracy = float((plain == labels[chosen]).mean())

    report = {
        "model": {"name": model.name, "version": model.version},
        "samples": SAMPLES,
        "seed": SEED,
        "accuracy": round(accuracy, 4),
        "same_digits_as_mnist_gives_them": round(plain_accuracy, 4),
        "by_thickness": _breakdown(
            correct, np.array(thicknesses), [-1.0, -0.15, 0.25, 0.6, 2.0], ["thinner", "as drawn", "bolder", "boldest"]
        ),
        "by_digit_height_px": _breakdown(
            correct,
            np.array(sides) * 20 / 28,
            [0, 90, 120, 150, 1000],
            ["60-90", "90-120", "120-150", "150-180"],
        ),
        "seconds": round(time.perf_counter() - started, 2),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "photo-robustness.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(
        f"\nphoto path: {accuracy:.1%} of {SAMPLES} rendered MNIST test digits read correctly "
        f"(same digits as 28×28 MNIST: {plain_accuracy:.1%}); model {model.name} {model.version}"
    )

    assert accuracy >= REQUIRED_ACCURACY, json.dumps(report, indent=2)


def test_rendering_is_what_people_give(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    """The rendered sheets really are dark ink on light paper, 280×280."""
    images, _ = mnist_test
    rng = np.random.default_rng(SEED)
    for digit in images[:20]:
        data, _params = render_as_people_give_it(digit, rng)
        page = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
        assert page.shape == (CANVAS, CANVAS)
        assert np.median(page) > 200, "paper should be light"
        assert page.min() < 110, "ink should be dark"
