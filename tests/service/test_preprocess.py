"""Preprocessing: pixel arrays, images of any size and colour → the MNIST form the model was trained on."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image
from service_helpers import dark_on_light, jpeg_bytes, png_bytes, png_claiming_size

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.preprocess import (
    CENTRE,
    PixelBudget,
    check_media_type,
    decode_base64,
    decode_image,
    from_pixels,
    to_mnist,
    to_png_base64,
    to_uint8,
)

MAX_PIXELS = 4096 * 4096


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    idx = np.arange(image.shape[0])
    mass = image.sum()
    return float((image.sum(axis=1) * idx).sum() / mass), float((image.sum(axis=0) * idx).sum() / mass)


def ink_box(image: np.ndarray, threshold: float = 0.2) -> tuple[int, int]:
    rows = np.flatnonzero((image >= threshold).any(axis=1))
    cols = np.flatnonzero((image >= threshold).any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def test_pixels_on_both_scales_agree(mnist_test: tuple) -> None:
    digit = mnist_test[0][0]
    a = from_pixels(digit.tolist(), "0-255")
    b = from_pixels((digit / 255.0).tolist(), "0-1")
    assert a.dtype == np.float32 and a.shape == (28, 28)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, digit / 255.0, atol=1e-6)


@pytest.mark.parametrize(
    ("pixels", "scale", "message"),
    [
        (np.zeros((27, 28)), "0-255", "28×28"),
        (np.zeros((28, 28, 1)), "0-255", "28×28"),
        (np.full((28, 28), np.nan), "0-255", "NaN"),
        (np.full((28, 28), np.inf), "0-1", "NaN or Infinity"),
        (np.full((28, 28), 256.0), "0-255", "0..255"),
        (np.full((28, 28), 2.0), "0-1", "0..1"),
        (np.full((28, 28), -1.0), "0-255", "0..255"),
    ],
)
def test_bad_pixels_are_refused(pixels: np.ndarray, scale: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        from_pixels(pixels.tolist(), scale)  # type: ignore[arg-type]


def test_mnist_digit_is_left_as_it_was(mnist_test: tuple) -> None:
    """MNIST digits already are in MNIST form: normalising them again barely moves a pixel."""
    for digit in mnist_test[0][:50]:
        out = to_mnist(digit.astype(np.float32) / 255.0)
        assert np.abs(out - digit / 255.0).mean() < 0.03


def test_scan_at_280_dark_on_light_becomes_the_mnist_digit(mnist_test: tuple) -> None:
    digit = mnist_test[0][0]
    out = decode_image(png_bytes(dark_on_light(digit)), MAX_PIXELS)
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out[0].max() == 0.0  # background black again
    assert np.abs(out - digit / 255.0).mean() < 0.05
    cy, cx = centre_of_mass(out)
    assert abs(cy - CENTRE) < 1.0 and abs(cx - CENTRE) < 1.0


def test_off_centre_small_digit_is_cropped_fitted_and_centred(mnist_test: tuple) -> None:
    page = np.full((600, 400), 255, dtype=np.uint8)
    page[20:100, 300:380] = dark_on_light(mnist_test[0][1], size=80)
    out = decode_image(png_bytes(page), MAX_PIXELS)
    assert max(ink_box(out)) in (19, 20, 21)
    cy, cx = centre_of_mass(out)
    assert abs(cy - CENTRE) < 1.0 and abs(cx - CENTRE) < 1.0


def test_aspect_ratio_is_kept() -> None:
    bar = np.zeros((300, 300), dtype=np.uint8)
    bar[140:160, 50:250] = 255  # a 200×20 white bar on black
    out = decode_image(png_bytes(bar), MAX_PIXELS)
    height, width = ink_box(out)
    assert width == 20 and 1 <= height <= 3


def test_colour_jpeg_and_light_on_dark_images(mnist_test: tuple) -> None:
    digit = mnist_test[0][2]
    reference = decode_image(png_bytes(dark_on_light(digit)), MAX_PIXELS)
    ink = (255 - dark_on_light(digit))[..., None] / 255.0
    blue_on_yellow = np.rint((1 - ink) * [250, 230, 80] + ink * [20, 20, 160]).astype(np.uint8)
    for data in (
        jpeg_bytes(dark_on_light(digit)),
        png_bytes(255 - dark_on_light(digit)),  # white ink on black, like MNIST itself
        png_bytes(blue_on_yellow),
        jpeg_bytes(blue_on_yellow),
    ):
        out = decode_image(data, MAX_PIXELS)
        assert np.abs(out - reference).mean() < 0.06


def test_strokes_on_a_transparent_canvas_are_ink_whatever_their_colour(mnist_test: tuple) -> None:
    digit = mnist_test[0][3]
    alpha = np.asarray(Image.fromarray(digit).resize((280, 280), Image.Resampling.BICUBIC))
    reference = decode_image(png_bytes(dark_on_light(digit)), MAX_PIXELS)
    for colour in ((0, 0, 0), (255, 255, 255), (200, 30, 30)):
        rgba = np.zeros((280, 280, 4), dtype=np.uint8)
        rgba[..., :3] = colour
        rgba[..., 3] = alpha
        out = decode_image(png_bytes(rgba), MAX_PIXELS)
        assert np.abs(out - reference).mean() < 0.05, colour


@pytest.mark.parametrize("image", [np.full((100, 100), 255, np.uint8), np.zeros((50, 80), np.uint8)])
def test_blank_images_are_refused(image: np.ndarray) -> None:
    with pytest.raises(InvalidInput) as error:
        decode_image(png_bytes(image), MAX_PIXELS)
    assert error.value.code == "empty_image"


@pytest.mark.parametrize(("width", "height"), [(5000, 5000), (100_000, 100_000), (1, 20_000_000)])
def test_decompression_bombs_are_refused_before_decoding(width: int, height: int) -> None:
    data = png_claiming_size(width, height)
    assert len(data) < 100_000
    start = time.perf_counter()
    with pytest.raises(InvalidInput) as error:
        decode_image(data, MAX_PIXELS)
    assert error.value.code == "image_too_large"
    assert time.perf_counter() - start < 0.5


def test_the_pixel_limit_is_configurable(mnist_test: tuple) -> None:
    data = png_bytes(dark_on_light(mnist_test[0][0], size=100))
    decode_image(data, 100 * 100)
    with pytest.raises(InvalidInput, match="more than the 9999 allowed"):
        decode_image(data, 100 * 100 - 1)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", png_bytes(np.zeros((10, 10), np.uint8))[:40], b"%PDF-1.4\n%%EOF", b"GIF89a"],
)
def test_undecodable_bytes_are_invalid_input(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        decode_image(data, MAX_PIXELS)


def test_base64_forms() -> None:
    raw = bytes(range(256))
    plain = base64.b64encode(raw).decode()
    assert decode_base64(plain) == raw
    assert decode_base64("data:image/png;base64," + plain) == raw
    assert decode_base64(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw
    assert decode_base64(plain[:60] + "\n" + plain[60:]) == raw
    for bad in ("***", "data:image/png,abc", "a"):
        with pytest.raises(InvalidInput):
            decode_base64(bad)


def test_media_types_of_uploads() -> None:
    for ok in ("image/png", "image/jpeg; charset=binary", "application/octet-stream", None, ""):
        check_media_type(ok)
    with pytest.raises(UnsupportedMediaType):
        check_media_type("text/plain")


def test_the_image_the_model_saw_round_trips(mnist_test: tuple) -> None:
    image = mnist_test[0][4].astype(np.float32) / 255.0
    png = base64.b64decode(to_png_base64(image))
    decoded = np.asarray(Image.open(io.BytesIO(png)))
    np.testing.assert_array_equal(decoded, to_uint8(image))
    np.testing.assert_array_equal(to_uint8(image), mnist_test[0][4])


# --- regressions: wide samples, cards in a transparent margin, data URLs, the per-request pixel budget ---------


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_16_bit_and_float_images_are_scaled_not_clipped(mnist_test: tuple, classifier: object) -> None:
    """A dark-on-light 16-bit PNG was clipped to 8 bits (all paper, no ink) and refused as blank."""
    digit = mnist_test[0][0]
    reference = decode_image(png_bytes(dark_on_light(digit)), MAX_PIXELS)
    paper = dark_on_light(digit).astype(np.float64) / 255.0
    wide = Image.fromarray(np.rint(paper * 65535).astype(np.uint16))
    assert wide.mode.startswith("I;16")
    as_float = Image.fromarray(paper.astype(np.float32), mode="F")
    for data in (_encoded(wide, "PNG"), _encoded(wide, "TIFF"), _encoded(as_float, "TIFF")):
        out = decode_image(data, MAX_PIXELS)
        assert np.abs(out - reference).mean() < 0.02


def test_an_opaque_card_in_a_transparent_margin_is_read_for_what_is_on_it(mnist_test: tuple) -> None:
    """A white card with a dark digit, pasted in a transparent margin, was read as the card's outline."""
    x, _ = mnist_test
    for i in range(10):
        rgba = np.zeros((400, 400, 4), dtype=np.uint8)
        rgba[60:340, 60:340, :3] = dark_on_light(x[i])[..., None]
        rgba[60:340, 60:340, 3] = 255
        out = decode_image(png_bytes(rgba), MAX_PIXELS)
        reference = decode_image(png_bytes(dark_on_light(x[i])), MAX_PIXELS)
        assert np.abs(out - reference).mean() < 0.02, i


def test_data_url_prefixes_in_any_case() -> None:
    payload = png_bytes(np.eye(28, dtype=np.uint8) * 255)
    encoded = base64.b64encode(payload).decode()
    for prefix in ("data:image/png;base64,", "DATA:image/png;BASE64,", "Data:IMAGE/PNG;Base64,"):
        assert decode_base64(prefix + encoded) == payload


def test_a_request_has_a_pixel_budget_over_all_its_images() -> None:
    budget = PixelBudget(max_pixels=3 * 512 * 512)
    page = png_bytes(np.pad(np.eye(100, dtype=np.uint8) * 255, 206))  # 512 × 512
    for _ in range(3):
        decode_image(page, MAX_PIXELS, budget)
    with pytest.raises(PayloadTooLarge) as refused:
        decode_image(page, MAX_PIXELS, budget)
    assert refused.value.code == "too_many_pixels" and refused.value.status_code == 413


def test_large_images_are_reduced_without_a_second_full_copy(mnist_test: tuple) -> None:
    """A 4096² RGBA drawing decodes to the same digit as a small one (reduce() on the raster, no copy first)."""
    digit = mnist_test[0][4]
    alpha = np.asarray(Image.fromarray(digit).resize((4096, 4096), Image.Resampling.BILINEAR))
    rgba = np.zeros((4096, 4096, 4), dtype=np.uint8)
    rgba[..., 3] = alpha
    out = decode_image(png_bytes(rgba), MAX_PIXELS)
    reference = decode_image(png_bytes(dark_on_light(digit)), MAX_PIXELS)
    assert np.abs(out - reference).mean() < 0.05


def test_a_broken_exif_block_is_read_unrotated_not_a_500(mnist_test: tuple) -> None:
    page = dark_on_light(mnist_test[0][0])
    plain, broken = io.BytesIO(), io.BytesIO()
    Image.fromarray(page).save(plain, "PNG")
    Image.fromarray(page).save(broken, "PNG", exif=bytes.fromhex("4578696600004d4d002a"))  # "Exif\0\0MM\0*": cut off
    assert np.array_equal(decode_image(broken.getvalue(), MAX_PIXELS), decode_image(plain.getvalue(), MAX_PIXELS))


def test_a_16_bit_image_is_judged_the_same_at_any_size() -> None:
    """A 16-bit image using only 0..255 was blank at 600 px (scaled by 65535) and a digit at 1100 px (reduced, then
    scaled by the range its samples used)."""
    outcomes = []
    for side in (600, 1100):
        page = np.full((side, side), 255, np.uint16)
        page[side // 5 : 4 * side // 5, side // 2 - side // 20 : side // 2 + side // 20] = 0
        try:
            decode_image(png_bytes(page), MAX_PIXELS)
            outcomes.append("digit")
        except InvalidInput as exc:
            outcomes.append(exc.code)
    assert outcomes[0] == outcomes[1]
