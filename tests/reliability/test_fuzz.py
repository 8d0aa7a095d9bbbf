"""Fuzzing the input decoders with hypothesis: random, truncated and corrupted bytes, random base64 and JSON.

    pytest tests/reliability/test_fuzz.py        # a few hundred cases per property, seconds

Whatever arrives, the outcome is a typed domain error (an HTTP 4xx with a stable code) or a valid MNIST-form
image (float32 28×28 in 0..1): never another exception, which the service would answer with a 500.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from service_helpers import dark_on_light

from service.codec import item_image, parse_batch, parse_predict
from service.errors import ServiceError
from service.preprocess import FORMATS, decode_base64, decode_image

MAX_PIXELS = 4096 * 4096
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
#: The codes a bad image may produce; anything else would be a new, undocumented outcome.
IMAGE_ERRORS = {"invalid_input", "undecodable_image", "image_too_large", "empty_image"}


def encoded(digit: np.ndarray) -> dict[str, bytes]:
    """One real digit as a scan-like photo, in every format the service opens."""
    picture = Image.fromarray(dark_on_light(digit, size=64))
    out = {}
    for fmt in FORMATS:
        buffer = io.BytesIO()
        (picture.convert("RGB") if fmt == "JPEG" else picture).save(buffer, format=fmt)
        out[fmt] = buffer.getvalue()
    return out


@pytest.fixture(scope="module")
def samples(mnist_test: tuple) -> dict[str, bytes]:
    return encoded(mnist_test[0][0])


def assert_image_or_domain_error(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd files; the outcome is what counts
        try:
            image = decode_image(data, MAX_PIXELS)
        except ServiceError as exc:
            assert exc.status_code in (415, 422) and exc.code in IMAGE_ERRORS, (exc.code, exc.message)
            return
    assert image.shape == (28, 28) and image.dtype == np.float32
    assert np.isfinite(image).all() and 0.0 <= image.min() and image.max() <= 1.0


def test_every_sample_decodes_whole(samples: dict[str, bytes]) -> None:
    for data in samples.values():
        assert decode_image(data, MAX_PIXELS).max() > 0.5


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    assert_image_or_domain_error(data)


SIGNATURES = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF", b"II*\x00", b"MM\x00*"]


@FUZZ
@given(header=st.sampled_from(SIGNATURES), tail=st.binary(max_size=512))
def test_random_bytes_behind_a_real_signature(header: bytes, tail: bytes) -> None:
    assert_image_or_domain_error(header + tail)


@FUZZ
@given(fmt=st.sampled_from(FORMATS), cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_images(samples: dict[str, bytes], fmt: str, cut: float) -> None:
    data = samples[fmt]
    assert_image_or_domain_error(data[: int(len(data) * cut)])


FLIP = st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255))  # (where in the file, xor mask)


@FUZZ
@given(fmt=st.sampled_from(FORMATS), flips=st.lists(FLIP, min_size=1, max_size=8))
def test_corrupted_images(samples: dict[str, bytes], fmt: str, flips: list[tuple[float, int]]) -> None:
    data = bytearray(samples[fmt])
    for where, mask in flips:
        data[int(len(data) * where)] ^= mask
    assert_image_or_domain_error(bytes(data))


@FUZZ
@given(text=st.text(max_size=200) | st.from_regex(r"\Adata:image/png;base64,[A-Za-z0-9+/=_-]{0,80}\Z"))
def test_base64_text(text: str) -> None:
    try:
        data = decode_base64(text)
    except ServiceError as exc:
        assert exc.status_code == 422 and exc.code == "invalid_input"
        return
    assert isinstance(data, bytes)


SCALARS = st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=False) | st.text(max_size=8)
KEYS = st.sampled_from(["pixels", "scale", "normalize", "image_base64", "top_k", "return_image", "items", "x"])
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5), max_leaves=30
)
ROW = st.lists(st.integers(-5, 300) | st.floats(-1, 2), min_size=28, max_size=28)


def assert_parsed_or_domain_error(parse: object, body: bytes) -> None:
    try:
        parsed = parse(body)  # type: ignore[operator]
        images = [item_image(item) for item in parsed.items]
    except ServiceError as exc:
        assert exc.status_code in (413, 422), (exc.code, exc.message)
        return
    for image in images:
        assert image is None or (image.shape == (28, 28) and image.dtype == np.float32)


@FUZZ
@given(document=JSON)
def test_random_json_documents(document: object) -> None:
    body = json.dumps(document).encode()
    assert_parsed_or_domain_error(parse_predict, body)
    assert_parsed_or_domain_error(lambda b: parse_batch(b, max_items=8), body)


@FUZZ
@given(st.lists(ROW, min_size=26, max_size=30), st.sampled_from(["0-255", "0-1", "0-100"]), st.booleans())
def test_nearly_right_pixel_arrays(rows: list[list[float]], scale: str, normalize: bool) -> None:
    item = {"pixels": rows, "scale": scale, "normalize": normalize}
    assert_parsed_or_domain_error(parse_predict, json.dumps(item).encode())
    assert_parsed_or_domain_error(lambda b: parse_batch(b, max_items=8), json.dumps({"items": [item, item]}).encode())


@FUZZ
@given(body=st.binary(max_size=512))
def test_random_request_bodies(body: bytes) -> None:
    assert_parsed_or_domain_error(parse_predict, body)
