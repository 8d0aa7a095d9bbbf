"""JSON in and out of the predict routes, without building pydantic objects for every pixel.

    parsed = parse_batch(body, max_items=1024)   # items (pixels already a checked float32 28×28 when given)
    answer = encode({"predictions": predictions(probs, images, top_k=3, return_image=False), "model": ref})

Requests: orjson turns the body into Python objects and numpy turns every item's ``pixels`` into one array
(one array for a whole batch), validated for shape and range in a few vectorised operations. This fast path
accepts exactly the documents the request models in :mod:`service.schemas` accept, with the same meaning,
provided every field has its documented JSON type. Anything else — malformed JSON, NaN/Infinity tokens,
numbers written as strings, a wrong shape, an unknown field, no image or two — goes to pydantic, which
either accepts it (lax conversions) or produces the error message it always did. The models remain the
contract and what the OpenAPI document shows.

Answers: probabilities are rounded in numpy and orjson writes the body; no response model is built (the
routes still declare their response models, for the documentation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import ValidationError

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
#: numpy kinds a JSON array of numbers can become: bool (true/false count as 1/0, as pydantic's lax floats),
#: signed and unsigned integers, floats.
_NUMERIC_KINDS = frozenset("biuf")


@dataclass(frozen=True, slots=True)
class Item:
    """One digit as the routes need it."""

    image: FloatImage | None = None
    """The pixels, validated and scaled to float32 28×28 in 0..1 (fast path, no normalisation asked)."""
    pixels: Any = None
    """Pixels still to check and scale with :func:`~service.preprocess.from_pixels` (array or nested lists)."""
    image_base64: str | None = None
    scale: Scale = "0-255"
    normalize: bool = False


@dataclass(frozen=True, slots=True)
class Parsed:
    """A predict or batch request body: its items and the answer options it carries (None: not given)."""

    items: list[Item]
    top_k: int | None = None
    return_image: bool | None = None


class _NeedsPydantic(Exception):
    """The document is not in the plain documented form: pydantic decides what it means."""


def parse_predict(body: bytes) -> Parsed:
    """A ``POST /v1/predict`` JSON body (see :class:`~service.schemas.PredictRequest`)."""
    try:
        doc = orjson.loads(body)
        if type(doc) is not dict or not doc.keys() <= _REQUEST_FIELDS:
            raise _NeedsPydantic
        top_k, return_image = _options(doc)
        return Parsed(_fast_items([doc], _REQUEST_FIELDS), top_k, return_image)
    except (orjson.JSONDecodeError, _NeedsPydantic):
        request: PredictRequest = _validate(PredictRequest, body)
        return Parsed([_from_model(request)], request.top_k, request.return_image)


def parse_batch(body: bytes, max_items: int) -> Parsed:
    """A ``POST /v1/predict/batch`` JSON body; more than ``max_items`` items is :class:`PayloadTooLarge`."""
    try:
        doc = orjson.loads(body)
        if type(doc) is not dict or not doc.keys() <= _BATCH_FIELDS:
            raise _NeedsPydantic
        items = doc.get("items")
        if type(items) is not list or not items:
            raise _NeedsPydantic
        if len(items) > max_items:
            raise too_many_items(len(items), max_items)  # before any item is looked at
        top_k, return_image = _options(doc)
        return Parsed(_fast_items(items, _ITEM_FIELDS), top_k, return_image)
    except (orjson.JSONDecodeError, _NeedsPydantic):
        request: BatchRequest = _validate(BatchRequest, body)
        if len(request.items) > max_items:
            raise too_many_items(len(request.items), max_items) from None
        return Parsed([_from_model(item) for item in request.items], request.top_k, request.return_image)


def too_many_items(count: int, max_items: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{count} items is more than the {max_items} one batch may carry", code="too_many_items")


def _validate(model: type[Any], body: bytes) -> Any:
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


def _fast_items(docs: Sequence[Any], allowed: frozenset[str]) -> list[Item]:
    """Items in their documented form; every ``pixels`` of the lot becomes one array, checked at once."""
    fields: list[tuple[Any, str | None, Any, bool]] = []
    pixel_rows: list[int] = []
    for index, doc in enumerate(docs):
        if type(doc) is not dict or not doc.keys() <= allowed:
            raise _NeedsPydantic
        pixels, image = doc.get("pixels"), doc.get("image_base64")
        scale, normalize = doc.get("scale", "0-255"), doc.get("normalize", False)
        if (pixels is None) == (image is None) or type(normalize) is not bool:
            raise _NeedsPydantic
        if type(scale) is not str or scale not in _SCALE_TOP:
            raise _NeedsPydantic
        if image is not None and (type(image) is not str or not image):
            raise _NeedsPydantic
        if pixels is not None:
            if type(pixels) is not list:
                raise _NeedsPydantic
            pixel_rows.append(index)
        fields.append((pixels, image, scale, normalize))
    block = _pixel_block([fields[i][0] for i in pixel_rows]) if pixel_rows else None
    images, in_range = _scale_block(block, [fields[i][2] for i in pixel_rows]) if block is not None else (None, None)
    where = {row: j for j, row in enumerate(pixel_rows)}
    items = []
    for index, (_, image, scale, normalize) in enumerate(fields):
        j = where.get(index)
        if j is None:
            items.append(Item(image_base64=image, scale=scale, normalize=normalize))
        elif images is not None and in_range is not None and in_range[j] and not normalize:
            items.append(Item(image=images[j], scale=scale))
        else:  # out of range (from_pixels will say how) or to be normalised
            assert block is not None
            items.append(Item(pixels=block[j], scale=scale, normalize=normalize))
    return items


def _pixel_block(pixels: list[Any]) -> npt.NDArray[Any]:
    """n × 28 × 28 numbers → one numeric array, or pydantic's judgement (ragged, nested, strings, nulls…)."""
    try:
        block = np.array(pixels)
    except (ValueError, TypeError, OverflowError):
        raise _NeedsPydantic from None
    if block.shape != (len(pixels), SIZE, SIZE) or block.dtype.kind not in _NUMERIC_KINDS:
        raise _NeedsPydantic
    return block


def _scale_block(block: npt.NDArray[Any], scales: Sequence[str]) -> tuple[FloatImage, npt.NDArray[np.bool_]]:
    """The whole block scaled to 0..1 float32 (as :func:`from_pixels` does), and which images were in range."""
    x = block.astype(np.float64, copy=False)
    top = np.fromiter((_SCALE_TOP[s] for s in scales), dtype=np.float64, count=len(scales))
    lo, hi = x.min(axis=(1, 2)), x.max(axis=(1, 2))
    in_range = np.isfinite(lo) & np.isfinite(hi) & (lo >= 0.0) & (hi <= top)
    return (x / top[:, None, None]).astype(np.float32), in_range


def item_image(item: Item) -> FloatImage | None:
    """The item's 28×28 image when it comes from pixels (None for an encoded image, decoded elsewhere)."""
    if item.image is not None:
        return item.image
    if item.pixels is None:
        return None
    image = from_pixels(item.pixels, item.scale)
    return to_mnist(image) if item.normalize else image


def predictions(
    probs: npt.NDArray[np.float32], images: Sequence[FloatImage], top_k: int | None, return_image: bool
) -> list[dict[str, Any]]:
    """The ``Prediction`` objects (see :mod:`service.schemas`) for each row of ``probs``, as plain dicts."""
    rows: list[list[float]] = np.round(probs.astype(np.float64), DECIMALS).tolist()
    digits: list[int] = np.argmax(probs, axis=1).tolist()
    out: list[dict[str, Any]] = [
        {"digit": d, "confidence": row[d], "probabilities": row} for d, row in zip(digits, rows, strict=True)
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
    return orjson.dumps(document)
