"""JSON in and out of the predict routes, without building pydantic objects for every pixel.

    parsed = parse_batch(body, max_items=1024)   # items (pixels already a checked float32 28×28 when given)
    answer = encode({"predictions": predictions(probs, images, top_k=3, return_image=False), "model": ref})

Requests: msgspec turns the body into Python objects and numpy turns every item's ``pixels`` into one array
(one array for a whole batch), validated for shape and range in a few vectorised operations. This fast path
accepts exactly the documents the request models in :mod:`service.schemas` accept, with the same meaning,
provided every field has its documented JSON type. Anything else — malformed JSON, NaN/Infinity tokens,
numbers written as strings, a wrong shape, an unknown field, no image or two — goes to pydantic, which
either accepts it (lax conversions) or produces the error message it always did. The models remain the
contract and what the OpenAPI document shows.

Answers: probabilities are rounded in numpy and msgspec writes the body; no response model is built (the
routes still declare their response models, for the documentation).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgspec
import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from service.core import Answer
from service.errors import PayloadTooLarge, validation_error
from service.preprocess import SIZE, Scale, from_pixels, to_mnist, to_png_base64, to_uint8
from service.schemas import BatchRequest, PredictItem, PredictRequest

FloatImage = npt.NDArray[np.float32]

#: Probabilities are answered to this many decimals: float32 carries no more that matters.
DECIMALS = 6

_ITEM_FIELDS = frozenset(PredictItem.model_fields)
_REQUEST_FIELDS = frozenset(PredictRequest.model_fields)
_BATCH_FIELDS = frozenset(BatchRequest.model_fields)
_SCALE_TOP: dict[str, float] = {"0-255": 255.0, "0-1": 1.0}
#: Items converted per numpy call: bounds the int64/float64 intermediate to a fraction of a megabyte.
_CONVERT_ROWS = 64
#: numpy kinds a JSON array of numbers can become: bool (true/false count as 1/0, as pydantic's lax floats),
#: signed and unsigned integers, floats.
_NUMERIC_KINDS = frozenset("biuf")


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs microseconds per digit
class Item:
    """One digit as the routes need it."""

    image: FloatImage | None = None
    """The pixels, validated and scaled to float32 28×28 in 0..1 (fast path, no normalisation asked)."""
    pixels: Any = None
    """Pixels still to check and scale with :func:`~service.preprocess.from_pixels` (array or nested lists)."""
    image_base64: str | None = None
    scale: Scale = "0-255"
    normalize: bool = False


@dataclass(slots=True)
class Parsed:
    """A predict or batch request body: its items and the answer options it carries (None: not given)."""

    items: list[Item]
    top_k: int | None = None
    return_image: bool | None = None
    images: FloatImage | None = None
    """Every item's image as one float32 n × 28 × 28, when all of them were plain in-range pixels."""


# msgspec rather than orjson: as fast, and it builds the Python objects straight from the text, where orjson
# first builds a whole document tree (a 1,000-image batch would cost 13 MB more at its peak).
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class _NeedsPydantic(Exception):
    """The document is not in the plain documented form: pydantic decides what it means."""


#: What sends a body to pydantic: not JSON, nested deeper than msgspec recurses, or not in the plain form.
_NOT_PLAIN = (msgspec.DecodeError, RecursionError, _NeedsPydantic)


#: The brackets and commas of a 28×28 array, once its digits and whitespace are taken out.
_SKELETON = b"[" + b",".join([b"[" + b"," * (SIZE - 1) + b"]"] * SIZE) + b"]"
_WHITESPACE = b" \t\r\n"
_BRACKETS_AWAY = bytes.maketrans(b"[]", b"  ")
_MATRIX_END = re.compile(rb"\]\s*\]")
#: Powers of ten: the number of digits a non-negative integer is written with, by searchsorted.
#: The longest compact 28×28 array of int64 numbers (19 digits each): how far the quick look for its end goes.
_LONGEST_COMPACT = len(_SKELETON) + 19 * SIZE * SIZE
_POW10 = np.array([10**k for k in range(1, 19)], dtype=np.int64)


def _is_skeleton(compact: bytes) -> bool:
    """A 28×28 array of digit runs, without whitespace: the skeleton of brackets and commas, no slot empty."""
    if compact.translate(None, b"0123456789") != _SKELETON:
        return False
    return b",," not in compact and b"[," not in compact and b",]" not in compact


def _digits_written(values: npt.NDArray[np.int64], largest: int) -> int:
    """How many digits the non-negative ``values`` (``largest`` the largest) take written in decimal without
    leading zeros."""
    count = values.size
    for power in _POW10:
        if power > largest:
            break
        count += int(np.count_nonzero(values >= power))
    return count


@dataclass(slots=True)
class _TextArrays:
    """Where a body's ``pixels`` arrays are written (see :func:`_text_arrays`), and the rest of the body."""

    spans: list[tuple[int, int]]
    digits: int
    """How many digits the arrays' numbers are written with, all together."""
    rest: bytes
    """The body with each array replaced by ``0``."""


def _text_arrays(body: bytes | bytearray, most: int) -> _TextArrays | None:
    """Every ``pixels`` array of a body in the common form — 28 rows of 28 JSON integers — in the order written;
    None for anything else (or for more than ``most`` of them).

    Turning 784 numbers into Python objects and then into an array is most of what parsing a pixels body costs;
    here each array's text, without its whitespace, must be digits in exactly a 28×28 array's skeleton of brackets
    and commas (then :func:`_read_arrays` has numpy read the numbers). The rest of the document is decoded as
    usual, and the caller checks that each ``0`` stands where a ``pixels`` value belongs.
    """
    spans: list[tuple[int, int]] = []
    rest: list[bytes | bytearray] = []
    digits = 0
    done = 0
    key = body.find(b'"pixels"')
    while key >= 0:
        if len(spans) == most:
            return None
        start = body.find(b"[", key)
        if start < 0 or body[key + 8 : start].strip() != b":":
            return None
        # The end of a compactly written array (a quick look, as far as such an array can reach), else the general one.
        end = body.find(b"]]", start, start + _LONGEST_COMPACT) + 2
        compact = bytes(body[start:end]).translate(None, _WHITESPACE) if end > 1 else b""
        if not _is_skeleton(compact):
            end_match = _MATRIX_END.search(body, start)
            if end_match is None:
                return None
            end = end_match.end()
            compact = bytes(body[start:end]).translate(None, _WHITESPACE)
            if not _is_skeleton(compact):
                return None
        spans.append((start, end))
        digits += len(compact) - len(_SKELETON)  # every other character is a digit
        rest += (body[done:start], b"0")
        done = end
        key = body.find(b'"pixels"', done)
    if not spans:
        return None
    rest.append(body[done:])
    return _TextArrays(spans, digits, b"".join(rest))


def _read_arrays(body: bytes | bytearray, found: _TextArrays, tops: list[float]) -> FloatImage | None:
    """The arrays :func:`_text_arrays` found, each divided by its scale's top (float32 n × 28 × 28, as
    :func:`~service.preprocess.from_pixels` computes it); None when one is not what a JSON parser reads, or lies
    outside its scale's range (the full parse then says how).

    numpy must read each array's text, as written, into 784 numbers, and the text must hold exactly as many digits
    as those numbers are written with (so no leading zeros, nothing numpy would read differently from a JSON
    parser). A block of arrays at a time: only the float32 result is kept whole.
    """
    images = np.empty((len(found.spans), SIZE, SIZE), np.float32)
    one_scale, lowest = tops.count(tops[0]) == len(tops), min(tops)
    digits = 0
    for first in range(0, len(found.spans), _CONVERT_ROWS):
        block = found.spans[first : first + _CONVERT_ROWS]
        text = b",".join([body[start:end] for start, end in block]) if len(block) > 1 else bytes(body[slice(*block[0])])
        try:
            # The text as written, whitespace kept: "2 5 5" or a digit beside a bracket is not a number, and numpy's
            # parser stops there (ValueError), as a JSON parser would.
            values = np.fromstring(text.translate(_BRACKETS_AWAY), dtype=np.int64, sep=",")
        except ValueError:
            return None
        if values.size != len(block) * SIZE * SIZE or values.min() < 0:
            return None
        values = values.reshape(-1, SIZE, SIZE)
        largest = int(values.max())
        top: float | npt.NDArray[np.float64] = tops[0]
        if not one_scale:
            top = np.array(tops[first : first + len(block)])[:, None, None]
        if largest > lowest and (values > top).any():
            return None
        digits += _digits_written(values, largest)
        np.divide(values, top, out=images[first : first + len(block)], casting="unsafe")  # float64 maths
    if digits != found.digits:
        return None  # leading zeros, or a number too long for int64
    return images


def _parse_text(body: bytes | bytearray, batch: bool, most: int) -> Parsed | None:
    """:func:`parse_predict` or :func:`parse_batch` for a body whose every item is plain pixels in the common form
    (see :func:`_text_arrays`), or None to parse it in full (which also finds and words any error)."""
    found = _text_arrays(body, most)
    if found is None:
        return None
    try:
        doc = _decode(found.rest)
    except _NOT_PLAIN:
        return None
    if type(doc) is not dict:
        return None
    if batch:
        items, allowed = doc.get("items"), _ITEM_FIELDS
        if not doc.keys() <= _BATCH_FIELDS or type(items) is not list or len(items) != len(found.spans):
            return None
    else:
        items, allowed = [doc], _REQUEST_FIELDS
    scales: list[str] = []
    for item in items:
        if type(item) is not dict or not item.keys() <= allowed:
            return None
        pixels = item.get("pixels")
        if type(pixels) is not int or pixels != 0:
            return None  # an array taken out was not this item's own "pixels" value
        if "image_base64" in item or item.get("normalize", False) is not False:
            return None
        scale = item.get("scale", "0-255")
        if type(scale) is not str or scale not in _SCALE_TOP:
            return None
        scales.append(scale)
    try:
        top_k, return_image = _options(doc)
    except _NeedsPydantic:
        return None
    images = _read_arrays(body, found, [_SCALE_TOP[scale] for scale in scales])
    if images is None:
        return None
    parsed = [Item(image=image, scale=scale) for image, scale in zip(images, cast(list[Scale], scales), strict=True)]
    return Parsed(parsed, top_k, return_image, images)


def parse_predict(body: bytes | bytearray) -> Parsed:
    """A ``POST /v1/predict`` JSON body (see :class:`~service.schemas.PredictRequest`)."""
    fast = _parse_text(body, False, 1)
    if fast is not None:
        return fast
    try:
        doc = _decode(body)
        if type(doc) is not dict:
            raise _NeedsPydantic
        return _fast_parsed([doc], _REQUEST_FIELDS, doc)
    except _NOT_PLAIN:
        request: PredictRequest = _validate(PredictRequest, body)
        return Parsed([_from_model(request)], request.top_k, request.return_image)


def parse_batch(body: bytes | bytearray, max_items: int) -> Parsed:
    """A ``POST /v1/predict/batch`` JSON body; more than ``max_items`` items is :class:`PayloadTooLarge`."""
    fast = _parse_text(body, True, max_items)
    if fast is not None:
        return fast
    items: Any = None
    try:
        doc = _decode(body)
        items = doc.get("items") if type(doc) is dict else None
        if type(items) is list and len(items) > max_items:
            raise too_many_items(len(items), max_items)  # before any item is looked at, whatever else is wrong
        if type(doc) is not dict or not doc.keys() <= _BATCH_FIELDS:
            raise _NeedsPydantic
        if type(items) is not list or not items:
            raise _NeedsPydantic
        return _fast_parsed(items, _ITEM_FIELDS, doc)
    except _NOT_PLAIN:
        if type(items) is list:
            _first_bad_item(items)
        request: BatchRequest = _validate(BatchRequest, body)
        if len(request.items) > max_items:
            raise too_many_items(len(request.items), max_items) from None
        return Parsed([_from_model(item) for item in request.items], request.top_k, request.return_image)


def too_many_items(count: int, max_items: int, at_least: bool = False) -> PayloadTooLarge:
    counted = f"at least {count}" if at_least else str(count)
    return PayloadTooLarge(f"{counted} items is more than the {max_items} one batch may carry", code="too_many_items")


def _first_bad_item(items: list[Any]) -> None:
    """Validate items one by one and stop at the first bad one.

    pydantic reports every bad value of a whole document: 1,024 items of 784 bad pixels each would cost gigabytes and
    seconds on the event loop. One item's errors are bounded (784 at most).
    """
    for index, item in enumerate(items):
        try:
            PredictItem.model_validate_json(msgspec.json.encode(item))
        except ValidationError as exc:
            errors = [{**e, "loc": ("items", index, *e.get("loc", ()))} for e in exc.errors(include_url=False)]
            raise validation_error(errors) from None


def _validate(model: type[Any], body: bytes | bytearray) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


def _from_model(item: PredictItem) -> Item:
    return Item(pixels=item.pixels, image_base64=item.image_base64, scale=item.scale, normalize=item.normalize)


def _options(doc: Mapping[str, Any]) -> tuple[int | None, bool | None]:
    top_k, return_image = doc.get("top_k"), doc.get("return_image")
    if top_k is not None and not (type(top_k) is int and 1 <= top_k <= 10):
        raise _NeedsPydantic
    if return_image is not None and type(return_image) is not bool:
        raise _NeedsPydantic
    return top_k, return_image


def _fast_parsed(docs: Sequence[Any], allowed: frozenset[str], options: Mapping[str, Any]) -> Parsed:
    top_k, return_image = _options(options)
    items, images = _fast_items(docs, allowed)
    return Parsed(items, top_k, return_image, images)


def _fast_items(docs: Sequence[Any], allowed: frozenset[str]) -> tuple[list[Item], FloatImage | None]:
    """Items in their documented form; every ``pixels`` of the lot becomes one array, checked at once.

    Also answers that array when it holds every item's image, in order (see :attr:`Parsed.images`)."""
    fields: list[tuple[Any, str | None, Any, bool]] = []
    pixel_rows: list[int] = []
    for index, doc in enumerate(docs):
        if type(doc) is not dict or not doc.keys() <= allowed:
            raise _NeedsPydantic
        pixels, encoded = doc.get("pixels"), doc.get("image_base64")
        scale, normalize = doc.get("scale", "0-255"), doc.get("normalize", False)
        if (pixels is None) == (encoded is None) or type(normalize) is not bool:
            raise _NeedsPydantic
        if type(scale) is not str or scale not in _SCALE_TOP:
            raise _NeedsPydantic
        if encoded is not None and (type(encoded) is not str or not encoded):
            raise _NeedsPydantic
        if pixels is not None:
            if type(pixels) is not list:
                raise _NeedsPydantic
            pixel_rows.append(index)
        fields.append((pixels, encoded, scale, normalize))
    images, in_range = _scale_block([fields[i][0] for i in pixel_rows], [fields[i][2] for i in pixel_rows])
    where = {row: j for j, row in enumerate(pixel_rows)}
    items = []
    for index, (pixels, encoded, scale, normalize) in enumerate(fields):
        j = where.get(index)
        if j is None:
            items.append(Item(image_base64=encoded, scale=scale, normalize=normalize))
        elif in_range[j] and not normalize:
            items.append(Item(image=images[j], scale=scale))
        else:  # out of range (from_pixels will say how, as it always did) or to be normalised
            items.append(Item(pixels=pixels, scale=scale, normalize=normalize))
    every_item = len(pixel_rows) == len(items) and all(item.image is not None for item in items)
    return items, images if every_item else None


def _scale_block(pixels: list[Any], scales: Sequence[str]) -> tuple[FloatImage, npt.NDArray[np.bool_]]:
    """All the pixel arrays as one float32 n × 28 × 28 in 0..1 (computed as :func:`from_pixels` does), and which
    of them lay in their scale's range; pydantic's judgement for anything but n × 28 × 28 numbers."""
    n = len(pixels)
    top = np.fromiter((_SCALE_TOP[s] for s in scales), dtype=np.float64, count=n)
    images = np.empty((n, SIZE, SIZE), np.float32)
    in_range = np.empty(n, np.bool_)
    # A slice at a time: numpy makes int64 or float64 of the lists, twice the float32 result if done at once.
    for start in range(0, n, _CONVERT_ROWS):
        part = slice(start, start + _CONVERT_ROWS)
        try:
            block = np.array(pixels[part])
        except (ValueError, TypeError, OverflowError):
            raise _NeedsPydantic from None  # ragged, nested deeper, or not numbers
        if block.shape != (len(block), SIZE, SIZE) or block.dtype.kind not in _NUMERIC_KINDS:
            raise _NeedsPydantic  # strings (pydantic may accept them as numbers), nulls, wrong shape
        in_range[part] = (block.min(axis=(1, 2)) >= 0) & (block.max(axis=(1, 2)) <= top[part])
        np.divide(block, top[part, None, None], out=images[part], casting="unsafe")  # float64 maths, float32 result
    return images, in_range


def item_image(item: Item) -> FloatImage | None:
    """The item's 28×28 image when it comes from pixels (None for an encoded image, decoded elsewhere)."""
    if item.image is not None:
        return item.image
    if item.pixels is None:
        return None
    image = from_pixels(item.pixels, item.scale)
    return to_mnist(image) if item.normalize else image


def predictions(answer: Answer, images: FloatImage, top_k: int | None, return_image: bool) -> list[dict[str, Any]]:
    """The ``Prediction`` objects (see :mod:`service.schemas`) for each image of ``answer`` (and of the n × 28 × 28
    ``images`` the model saw), as plain dicts."""
    probs = answer.probabilities
    rows: list[list[float]] = np.round(probs.astype(np.float64), DECIMALS).tolist()
    digits: list[int] = answer.digits.tolist()
    out: list[dict[str, Any]] = [
        {"digit": d, "confidence": row[d], "verdict": v, "probabilities": row}
        for d, row, v in zip(digits, rows, answer.verdicts, strict=True)
    ]
    if top_k:
        order: list[list[int]] = np.argsort(-probs, axis=1, kind="stable")[:, :top_k].tolist()
        for prediction, row, best in zip(out, rows, order, strict=True):
            prediction["top_k"] = [{"digit": d, "probability": row[d]} for d in best]
    if return_image:
        for prediction, image in zip(out, images, strict=True):
            prediction["image"] = {
                "width": SIZE,
                "height": SIZE,
                "pixels": to_uint8(image).tolist(),
                "png_base64": to_png_base64(image),
            }
    return out


def encode(document: Mapping[str, Any]) -> bytes:
    """JSON bytes of an answer."""
    return _encode(document)
