"""The msgspec/numpy fast path of service.codec means exactly what pydantic's validation of the request models means.

Every document is parsed twice, once as the service does it and once with the fast path switched off (pydantic
alone, as before the codec existed); the images, options and error messages must be the same.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from service import codec
from service.core import Answer, judge
from service.errors import ServiceError
from service.model import VerdictRule

ZEROS = [[0] * 28 for _ in range(28)]


def digit(value: float = 200, row: int = 14) -> list[list[float]]:
    pixels: list[list[float]] = [[0] * 28 for _ in range(28)]
    pixels[row][10:18] = [value] * 8
    return pixels


def outcome(parse: Any, body: bytes) -> Any:
    """What a route would make of the body: (images or base64 strings, top_k, return_image), or the error."""
    try:
        parsed = parse(body)
        seen = []
        for index, item in enumerate(parsed.items):
            try:
                image = codec.item_image(item)
            except ServiceError as exc:
                return ("item error", index, type(exc).__name__, exc.code, exc.message)
            seen.append(item.image_base64 if image is None else image.tolist())
        return (seen, parsed.top_k, parsed.return_image)
    except ServiceError as exc:
        return ("error", type(exc).__name__, exc.code, exc.message, exc.index)


def both_ways(monkeypatch: pytest.MonkeyPatch, parse: Any, body: bytes) -> tuple[Any, Any]:
    fast = outcome(parse, body)

    def refuse(*_: Any) -> Any:
        raise codec._NeedsPydantic

    with monkeypatch.context() as patch:
        patch.setattr(codec, "_fast_items", refuse)
        patch.setattr(codec, "_parse_text", lambda *_: None)
        slow = outcome(parse, body)
    return fast, slow


SINGLE = [
    {"pixels": digit()},
    {"pixels": digit(0.8), "scale": "0-1"},
    {"pixels": digit(200.5), "scale": "0-255", "top_k": 3, "return_image": True},
    {"pixels": digit(), "normalize": True},
    {"pixels": [[True, *([0] * 27)], *ZEROS[1:]], "scale": "0-1"},
    {"pixels": digit(), "top_k": None, "return_image": None, "image_base64": None},
    {"image_base64": "iVBORw0KGgo="},
    # pydantic's lax conversions: the fast path steps aside and pydantic accepts them as before
    {"pixels": [["12", *([0] * 27)], *ZEROS[1:]]},
    {"pixels": digit(), "normalize": "yes", "top_k": "2"},
    {"pixels": digit(), "top_k": 2.0},
    # errors: pydantic's own message, or from_pixels' for values out of range
    {"pixels": digit(300)},
    {"pixels": digit(2.0), "scale": "0-1"},
    {"pixels": digit(-1)},
    {"pixels": ZEROS[:27]},
    {"pixels": [*ZEROS[:27], [0] * 27]},
    {"pixels": [[None] * 28] * 28},
    {"pixels": [[[0]] * 28] * 28},
    {"pixels": 7},
    {"pixels": []},
    {"pixels": digit(), "scale": "0-100"},
    {"pixels": digit(), "scale": ["0-1"]},
    {"pixels": digit(), "normalize": None},
    {"pixels": digit(), "image_base64": "AAAA"},
    {},
    {"image_base64": ""},
    {"image_base64": 12},
    {"pixels": digit(), "top_k": 11},
    {"pixels": digit(), "top_k": True},
    {"pixels": digit(), "return_image": "maybe"},
    {"pixels": digit(), "unknown": 1},
    {"pixels": [[10**30] * 28] * 28},
]


@pytest.mark.parametrize("document", SINGLE, ids=range(len(SINGLE)))
def test_single_requests_mean_the_same_both_ways(monkeypatch: pytest.MonkeyPatch, document: dict) -> None:
    fast, slow = both_ways(monkeypatch, codec.parse_predict, json.dumps(document).encode())
    assert fast == slow


@pytest.mark.parametrize(
    "body",
    [b'{"pixels": [', b"[]", b"null", b'"pixels"', b"", b'{"pixels": NaN}', b'{"pixels": [[Infinity]]}'],
)
def test_bodies_that_are_not_plain_json_objects(monkeypatch: pytest.MonkeyPatch, body: bytes) -> None:
    fast, slow = both_ways(monkeypatch, codec.parse_predict, body)
    assert fast == slow and fast[0] == "error"


def test_nan_in_pixels_says_finite(monkeypatch: pytest.MonkeyPatch) -> None:
    body = json.dumps({"pixels": ZEROS}).replace("0", "NaN", 1).encode()
    fast, slow = both_ways(monkeypatch, codec.parse_predict, body)
    assert fast == slow and "finite" in fast[3]


BATCHES = [
    {"items": [{"pixels": digit(v)} for v in (10, 100, 255)]},
    {"items": [{"pixels": digit(0.5), "scale": "0-1"}, {"pixels": digit()}, {"image_base64": "AAAA"}], "top_k": 2},
    {"items": [{"pixels": digit()}, {"pixels": digit(), "normalize": True}], "return_image": True},
    {"items": [{"pixels": digit()}, {"pixels": digit(256)}, {"pixels": digit(-3)}]},
    {"items": [{"pixels": digit()}, {"pixels": ZEROS[:20]}]},
    {"items": [{"pixels": digit()}, {"pixels": digit(), "top_k": 2}]},
    {"items": [{"pixels": digit()}, "seven"]},
    {"items": []},
    {"items": {"pixels": digit()}},
    {"items": [{"pixels": digit()}], "extra": True},
    {"pixels": digit()},
]


@pytest.mark.parametrize("document", BATCHES, ids=range(len(BATCHES)))
def test_batches_mean_the_same_both_ways(monkeypatch: pytest.MonkeyPatch, document: dict) -> None:
    fast, slow = both_ways(monkeypatch, lambda b: codec.parse_batch(b, max_items=10), json.dumps(document).encode())
    assert fast == slow


def test_too_many_items_is_refused_before_the_items_are_read() -> None:
    body = json.dumps({"items": [{"pixels": digit()}] * 5 + [{"pixels": "not even pixels"}]}).encode()
    with pytest.raises(ServiceError) as error:
        codec.parse_batch(body, max_items=4)
    assert error.value.code == "too_many_items" and error.value.status_code == 413


def test_the_fast_path_scales_like_from_pixels() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (3, 28, 28))
    body = json.dumps({"items": [{"pixels": p.tolist()} for p in pixels]}).encode()
    parsed = codec.parse_batch(body, max_items=10)
    assert all(item.image is not None and item.image.dtype == np.float32 for item in parsed.items)
    np.testing.assert_array_equal(np.stack([item.image for item in parsed.items]), (pixels / 255.0).astype(np.float32))


def test_predictions_round_and_rank() -> None:
    probs = np.array([[0.1, 0.7, 0.2, 0, 0, 0, 0, 0, 0, 0], [0.3] * 3 + [0.1] + [0] * 6], dtype=np.float32)
    digits, confidence, verdicts = judge(probs, VerdictRule(unsure_below_confidence=0.5))
    answer = Answer("m", "1", probs, digits, confidence, verdicts)
    out = codec.predictions(answer, np.zeros((2, 28, 28), np.float32), top_k=2, return_image=True)
    assert out[0]["digit"] == 1 and out[0]["confidence"] == 0.7 == max(out[0]["probabilities"])
    assert [o["verdict"] for o in out] == ["digit", "unsure"]
    assert out[0]["probabilities"] == [round(float(p), 6) for p in probs[0]]
    assert out[0]["top_k"] == [{"digit": 1, "probability": 0.7}, {"digit": 2, "probability": 0.2}]
    assert [c["digit"] for c in out[1]["top_k"]] == [0, 1]  # ties keep digit order
    assert out[1]["image"]["width"] == 28 and len(out[1]["image"]["pixels"]) == 28
    assert json.loads(codec.encode({"predictions": out})) == {"predictions": out}


@pytest.mark.parametrize("depth", [70, 300, 100_000])
def test_deeply_nested_json_is_invalid_input_not_a_crash(monkeypatch: pytest.MonkeyPatch, depth: int) -> None:
    nested = b"[" * depth + b"1" + b"]" * depth
    for body in (b'{"pixels": ' + nested + b"}", nested):
        fast, slow = both_ways(monkeypatch, codec.parse_predict, body)
        assert fast == slow and fast[0] == "error" and fast[2] == "invalid_input"
    batch = b'{"items": [{"pixels": ' + nested + b"}]}"
    fast, slow = both_ways(monkeypatch, lambda b: codec.parse_batch(b, max_items=10), batch)
    assert fast == slow and fast[0] == "error"


def test_too_many_items_is_refused_even_when_the_envelope_is_also_wrong() -> None:
    body = json.dumps({"items": [{"pixels": digit()}] * 5, "unexpected": 1}).encode()
    with pytest.raises(ServiceError) as error:
        codec.parse_batch(body, max_items=4)
    assert error.value.code == "too_many_items" and error.value.status_code == 413


def test_a_batch_of_bad_items_stops_at_the_first_one() -> None:
    """pydantic would report all 1,024 × 784 bad pixels (about a gigabyte of error dicts); one item's are enough."""
    import tracemalloc

    bad = {"pixels": [[None] * 28 for _ in range(28)]}
    body = json.dumps({"items": [bad] * 1024, "unexpected": 1}).encode()
    tracemalloc.start()
    try:
        with pytest.raises(ServiceError) as error:
            codec.parse_batch(body, max_items=1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.value.status_code == 422 and error.value.index == 0
    assert str(error.value).startswith("items[0].pixels[0][0]: Input should be a valid number (and 783 more)")
    assert peak < 100 * 2**20, f"parsing the bad batch allocated {peak / 2**20:.0f} MiB"


# --- the text path: a plain 28×28 integer array read by numpy from the body's text ------------------------------


def _without_text_path(monkeypatch: pytest.MonkeyPatch, body: bytes) -> Any:
    with monkeypatch.context() as patch:
        patch.setattr(codec, "_parse_text", lambda *_: None)
        return outcome(codec.parse_predict, body)


def _layouts(pixels: list[list[int]]) -> list[bytes]:
    """The same document written in ways clients write it: spacing, key order, options, newlines."""
    compact = json.dumps({"pixels": pixels}, separators=(",", ":")).encode()
    return [
        json.dumps({"pixels": pixels, "scale": "0-255"}).encode(),
        compact,
        json.dumps({"scale": "0-255", "top_k": 3, "pixels": pixels, "return_image": False}).encode(),
        json.dumps({"pixels": pixels}, indent=2).encode(),
        b'  {\n "pixels" :\t' + json.dumps(pixels).encode() + b" }  ",
        json.dumps({"pixels": pixels, "scale": "0-1"}).encode(),  # out of range for 0-1 unless 0/1
    ]


def test_the_text_path_reads_what_a_json_parser_reads(monkeypatch: pytest.MonkeyPatch, mnist_test: tuple) -> None:
    taken = 0
    for digit_image in mnist_test[0][:5]:
        for body in _layouts(digit_image.astype(int).tolist()):
            text = outcome(codec.parse_predict, body)
            assert text == _without_text_path(monkeypatch, body), body[:80]
            assert outcome(codec.parse_predict, bytearray(body)) == text  # as the routes read a body
            taken += codec._parse_text(body, False, 1) is not None
    assert taken >= 20  # the common forms do take it


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ((b"[0, 0, 0", b"[00, 0, 0"), "leading zero (not JSON)"),
        ((b"[0, 0, 0", b"[-0, 0, 0"), "a sign"),
        ((b"[0, 0, 0", b"[1.5, 0, 0"), "a fraction"),
        ((b"[0, 0, 0", b"[1e2, 0, 0"), "an exponent"),
        ((b"[0, 0, 0", b"[99999999999999999999999, 0, 0"), "too long for int64"),
        ((b"[0, 0, 0", b"[300, 0, 0"), "out of range"),
        ((b"[0, 0, 0", b"[0, 0, 0, 0"), "a row of 29"),
        ((b"[0, 0, 0", b"[[0], 0, 0"), "nested deeper"),
        ((b'"scale": "0-255"', b'"scale": "0-255", "pixels": 0'), "a second pixels key"),
        ((b'"scale": "0-255"', b'"scale": "0-255", "normalize": true'), "normalize asked"),
        ((b'"scale": "0-255"', b'"scale": "0-255", "extra": 1'), "an unknown field"),
        ((b'"scale": "0-255"', b'"scale": "0-255", "image_base64": "x"'), "two sources"),
        ((b'"scale": "0-255"}', b'"scale": "0-255"'), "not JSON"),
    ],
)
def test_anything_else_leaves_the_text_path_with_the_same_outcome(
    monkeypatch: pytest.MonkeyPatch, change: tuple[bytes, bytes], why: str
) -> None:
    body = json.dumps({"pixels": ZEROS, "scale": "0-255"}).encode().replace(*change, 1)
    assert body != json.dumps({"pixels": ZEROS, "scale": "0-255"}).encode(), why
    assert outcome(codec.parse_predict, body) == _without_text_path(monkeypatch, body), why


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"[0,", b"[2 5 5,"),  # whitespace inside a number: not JSON
        (b"[0,", b"[1\n0,"),
        (b"[[", b"[5["),  # stray digits beside brackets
        (b"],[", b"]7,["),
        (b"],[", b"],3["),
        (b"[0,0,", b"[,00,"),  # an empty slot and a leading zero
    ],
)
def test_the_text_path_refuses_what_is_not_json_and_never_raises(
    monkeypatch: pytest.MonkeyPatch, old: bytes, new: bytes
) -> None:
    rows = b"[" + b",".join(b"[" + b",".join([b"0"] * 28) + b"]" for _ in range(28)) + b"]"
    body = b'{"pixels": ' + rows.replace(old, new, 1) + b"}"
    assert codec._text_arrays(body, 1) is None or codec._parse_text(body, False, 1) is None
    assert outcome(codec.parse_predict, body) == _without_text_path(monkeypatch, body)
    assert outcome(codec.parse_predict, body)[0] == "error"


def _batch_without_text_path(monkeypatch: pytest.MonkeyPatch, body: bytes, max_items: int = 1024) -> Any:
    with monkeypatch.context() as patch:
        patch.setattr(codec, "_parse_text", lambda *_: None)
        return outcome(lambda b: codec.parse_batch(b, max_items), body)


def test_the_batch_text_path_reads_what_a_json_parser_reads(monkeypatch: pytest.MonkeyPatch, mnist_test: tuple) -> None:
    """A whole batch of plain digits is read from the text at once; every layout means what pydantic makes of it."""
    digits = [image.astype(int).tolist() for image in mnist_test[0][:64]]
    bodies = [
        json.dumps({"items": [{"pixels": d, "scale": "0-255"} for d in digits]}).encode(),
        json.dumps({"items": [{"pixels": d} for d in digits]}, separators=(",", ":")).encode(),
        json.dumps(
            {"top_k": 2, "items": [{"scale": "0-255", "pixels": d} for d in digits], "return_image": False}, indent=1
        ).encode(),
        json.dumps(
            {
                "items": [{"pixels": [[min(v, 1) for v in row] for row in d], "scale": "0-1"} for d in digits[:3]]
                + [{"pixels": d} for d in digits[3:]]
            }
        ).encode(),
    ]
    for body in bodies:
        assert codec._parse_text(body, True, 1024) is not None, body[:80]
        text = outcome(lambda b: codec.parse_batch(b, 1024), body)
        assert text == _batch_without_text_path(monkeypatch, body), body[:80]
        assert len(text[0]) == 64


@pytest.mark.parametrize(
    ("document", "why"),
    [
        ({"items": [{"pixels": ZEROS}, {"pixels": ZEROS, "scale": "0-1", "normalize": True}]}, "normalize asked"),
        ({"items": [{"pixels": ZEROS}, {"image_base64": "AAAA"}]}, "an encoded item"),
        ({"items": [{"pixels": ZEROS}, {"pixels": digit(300)}]}, "out of range"),
        ({"items": [{"pixels": ZEROS}, {"pixels": ZEROS, 'a"pixels': ZEROS}]}, "a key ending in pixels"),
        ({"items": [{"pixels": ZEROS}], "pixels": ZEROS}, "pixels outside the items"),
        ({"items": [{"pixels": ZEROS}] * 5}, "more items than allowed"),
        ({"items": [{"pixels": ZEROS}, {"pixels": ZEROS, "top_k": 3}]}, "an option inside an item"),
    ],
)
def test_a_batch_not_in_the_plain_form_leaves_the_text_path_with_the_same_outcome(
    monkeypatch: pytest.MonkeyPatch, document: dict, why: str
) -> None:
    body = json.dumps(document).encode()
    fast = outcome(lambda b: codec.parse_batch(b, 4), body)
    assert fast == _batch_without_text_path(monkeypatch, body, 4), why


def test_a_duplicate_pixels_key_in_a_batch_item_means_what_json_says(monkeypatch: pytest.MonkeyPatch) -> None:
    item = b'{"pixels": ' + json.dumps(digit(9)).encode() + b', "pixels": ' + json.dumps(digit(200)).encode() + b"}"
    body = b'{"items": [' + item + b"]}"
    assert outcome(lambda b: codec.parse_batch(b, 4), body) == _batch_without_text_path(monkeypatch, body, 4)


def test_a_large_batch_of_digits_is_read_holding_little_more_than_its_images(mnist_test: tuple) -> None:
    """1,024 digits (3.2 MB as float32): no tree of Python numbers, no int64 copy of the whole batch."""
    import tracemalloc

    images = mnist_test[0][np.arange(1024) % len(mnist_test[0])]
    body = bytearray(json.dumps({"items": [{"pixels": image.tolist()} for image in images]}).encode())
    tracemalloc.start()
    try:
        parsed = codec.parse_batch(body, max_items=1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parsed.images is not None
    np.testing.assert_array_equal(parsed.images, (images / 255.0).astype(np.float32))
    result = parsed.images.nbytes
    assert peak < 2 * result, f"parsing held {peak / 2**20:.1f} MiB for a {result / 2**20:.1f} MiB result"
