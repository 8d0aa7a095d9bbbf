"""``POST /v1/predict`` and ``POST /v1/predict/batch``.

Both take JSON (``pixels`` or ``image_base64`` items) or multipart form data (a ``file`` field; several for the
batch). The body is read by hand rather than declared as a parameter so that one path can accept both media
types; the OpenAPI description of both bodies is added in ``openapi_extra``. JSON goes in and out through
:mod:`service.codec` (msgspec and numpy); the declared response models document the answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.admission import JsonBudget
from service.body import check_encoding, read_body
from service.codec import Item, encode, item_image, parse_batch, parse_predict, predictions, too_many_items
from service.core import DataPlane, request_info
from service.deps import ModelChoice, ModelChoiceDep, require_api_key
from service.errors import InvalidInput, ServiceError, UnsupportedMediaType, validation_error
from service.model import FloatArray
from service.preprocess import PixelBudget, check_media_type, decode_base64, decode_image
from service.schemas import BatchResponse, PredictResponse, error_responses
from service.settings import Settings

router = APIRouter(prefix="/v1", tags=["predict"], dependencies=[Depends(require_api_key)])

JSON = "application/json"
MULTIPART = "multipart/form-data"
#: Form fields besides the files: top_k, return_image, and room for what clients add on their own.
MAX_FORM_FIELDS = 16

TopKQuery = Annotated[int | None, Query(ge=1, le=10, description="Also answer the k most likely digits.")]
ReturnImageQuery = Annotated[bool | None, Query(description="Also answer the 28×28 image the model saw.")]


def _body_doc(json_schema: str, multipart_doc: str, many: bool) -> dict[str, Any]:
    file_schema: dict[str, Any] = {"type": "string", "format": "binary"}
    return {
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": {"$ref": f"#/components/schemas/{json_schema}"}},
                MULTIPART: {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "array", "items": file_schema} if many else file_schema,
                            "top_k": {"type": "integer", "minimum": 1, "maximum": 10},
                            "return_image": {"type": "boolean"},
                        },
                        "description": multipart_doc,
                    }
                },
            },
        }
    }


class _FormOptions(BaseModel):
    top_k: Annotated[int, Field(ge=1, le=10)] | None = None
    return_image: bool | None = None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


#: A body's images as one float32 n × 28 × 28, and the top_k and return_image it names.
Images = tuple[FloatArray, int | None, bool | None]


def _item_image(item: Item, settings: Settings, budget: PixelBudget) -> FloatArray:
    image = item_image(item)
    if image is not None:
        return image
    assert item.image_base64 is not None
    return decode_image(decode_base64(item.image_base64), settings.max_image_pixels, budget)


def _items_images(items: Sequence[Item], settings: Settings, indexed: bool) -> list[FloatArray]:
    images = []
    budget = PixelBudget(settings.max_request_pixels)
    for index, item in enumerate(items):
        try:
            images.append(_item_image(item, settings, budget))
        except ServiceError as exc:
            raise (exc.at_index(index) if indexed else exc) from None
    return images


#: JSON bodies at least this large are parsed in the decode pool, not on the event loop (a digit's body is ~2.6 KB).
OFF_LOOP_BYTES = 64 * 1024


def _json_images_now(body: bytes | bytearray, settings: Settings, batch: bool) -> Images:
    parsed = parse_batch(body, settings.max_batch_items) if batch else parse_predict(body)
    if parsed.images is not None:  # plain pixels, already one array
        return parsed.images, parsed.top_k, parsed.return_image
    return np.stack(_items_images(parsed.items, settings, batch)), parsed.top_k, parsed.return_image


async def json_images(body: bytes | bytearray, plane: DataPlane, batch: bool) -> Images:
    """A JSON predict or batch body → the images (float32 n × 28 × 28), top_k and return_image it names.

    A small body of plain pixel arrays is converted on the spot (cheaper than a thread hop); a large body, and any
    item that needs more than that (an image to decode, pixels to normalise, a document pydantic has to judge), goes
    to the bounded decode pool, so that the event loop keeps answering other requests meanwhile.
    """
    settings = plane.settings
    if len(body) >= OFF_LOOP_BYTES:
        return await plane.decode(_json_images_now, body, settings, batch)
    parsed = parse_batch(body, settings.max_batch_items) if batch else parse_predict(body)
    if parsed.images is not None:
        return parsed.images, parsed.top_k, parsed.return_image
    images = await plane.decode(_items_images, parsed.items, settings, batch)
    return np.stack(images), parsed.top_k, parsed.return_image


async def _form_files(request: Request, settings: Settings, batch: bool) -> tuple[list[bytes], _FormOptions]:
    max_files = settings.max_batch_items if batch else 1
    try:
        form = await request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS)
    except StarletteHTTPException as exc:
        if exc.status_code != 400:  # e.g. the body size limit's 413
            raise
        # Starlette's parser refuses a malformed body or one over its limits with a bare 400; say it like /v1 does.
        if "Too many files" in str(exc.detail):
            if batch:
                raise too_many_items(max_files + 1, max_files, at_least=True) from None
            raise InvalidInput("send one image, in the field 'file' (several go to /v1/predict/batch)") from None
        raise InvalidInput(f"the multipart body could not be read: {exc.detail}") from None
    try:
        uploads = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
        if not uploads:
            raise InvalidInput("the multipart body needs an image in a field named 'file'")
        for upload in uploads:
            check_media_type(upload.content_type)
        payloads = [await upload.read() for upload in uploads]
        try:
            options = _FormOptions.model_validate(
                {k: v for k, v in form.items() if k in ("top_k", "return_image") and isinstance(v, str)}
            )
        except ValidationError as exc:
            raise validation_error(exc.errors(include_url=False)) from None
    finally:
        await form.close()
    return payloads, options


def _decode_uploads(payloads: Sequence[bytes], settings: Settings) -> list[FloatArray]:
    images = []
    budget = PixelBudget(settings.max_request_pixels)
    for index, data in enumerate(payloads):
        try:
            images.append(decode_image(data, settings.max_image_pixels, budget))
        except ServiceError as exc:
            raise (exc.at_index(index) if len(payloads) > 1 else exc) from None
    return images


async def _answer(
    request: Request, choice: ModelChoice, top_k: int | None, return_image: bool | None, batch: bool
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Read and preprocess the body, then run the model (leased only now: a slow upload holds up no reload).

    Returns the predictions in request order and the name and version of the model that made them.
    """
    with choice.plane.tracing.span("decode"):
        images, body_top_k, body_return_image = await _read_items(request, choice.plane, batch=batch)
    top_k, return_image = _pick(body_top_k, top_k), _pick(body_return_image, return_image)
    answer = await choice.plane.infer(choice.model, choice.version, images, request_info(request.scope))
    ref = {"name": answer.name, "version": answer.version}
    return predictions(answer, images, top_k, bool(return_image)), ref


def _pick(body_value: Any, query_value: Any) -> Any:
    return body_value if body_value is not None else query_value


def json_budget(settings: Settings, batch: bool) -> JsonBudget:
    return JsonBudget.for_batch(settings.max_batch_items) if batch else JsonBudget.for_predict()


async def _read_items(request: Request, plane: DataPlane, batch: bool) -> tuple[FloatArray, int | None, bool | None]:
    """The images of a JSON or multipart body (float32 n × 28 × 28), with the top_k / return_image it names."""
    settings = plane.settings
    kind = _media_type(request)
    if kind == JSON:
        body = await read_body(request, json_budget(settings, batch))
        return await json_images(body, plane, batch)
    if kind == MULTIPART:
        check_encoding(request.headers.get("content-encoding"))
        payloads, options = await _form_files(request, settings, batch)
        images = await plane.decode(_decode_uploads, payloads, settings)
        return np.stack(images), options.top_k, options.return_image
    raise UnsupportedMediaType(f"send {JSON} or {MULTIPART}, not {kind or 'no content type'!r}")


@router.post(
    "/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    summary="Classify one digit",
    operation_id="predict",
    responses=error_responses(401, 404, 413, 415, 422, 503),
    openapi_extra=_body_doc("PredictRequest", "One image file in the field `file`.", many=False),
)
async def predict(
    request: Request, choice: ModelChoiceDep, top_k: TopKQuery = None, return_image: ReturnImageQuery = None
) -> Response:
    """One digit as JSON `pixels` (28×28, scale 0-255 or 0-1), JSON `image_base64`, or a multipart `file` upload.

    Images of any size or colour are normalised like MNIST (grayscale, inverted when dark-on-light, cropped to
    the ink, fitted into 20×20, centred by centre of mass). Body fields override query parameters.
    """
    (prediction,), model = await _answer(request, choice, top_k, return_image, batch=False)
    return Response(encode({**prediction, "model": model}), media_type=JSON)


@router.post(
    "/predict/batch",
    response_model=BatchResponse,
    response_model_exclude_none=True,
    summary="Classify many digits in one request",
    operation_id="predictBatch",
    responses=error_responses(401, 404, 413, 415, 422, 503),
    openapi_extra=_body_doc("BatchRequest", "Image files, each in a field named `file`, answered in order.", many=True),
)
async def predict_batch(
    request: Request, choice: ModelChoiceDep, top_k: TopKQuery = None, return_image: ReturnImageQuery = None
) -> Response:
    """Up to `MNIST_SERVE_MAX_BATCH_ITEMS` digits, answered in request order, in as few model runs as possible.

    A bad item fails the whole request with 422; the error's `index` (and message) names the item.
    """
    answers, model = await _answer(request, choice, top_k, return_image, batch=True)
    return Response(encode({"predictions": answers, "model": model}), media_type=JSON)
