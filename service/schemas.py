"""Request and response bodies, with the examples the OpenAPI docs show (a real MNIST test digit, a 7)."""

from __future__ import annotations

import base64
import io
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: MNIST test image #0 (a 7) as a 28×28 PNG, white ink on black.
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAwUlEQVR42mNgGDaAEUKFpD77sfTFHeyS9xQYGBg+X4UKPuk6w8DAwMDA"
    "AuGm6l/TMnSweCzLwPDntSTDozPIOhkYGBgYBA3PmDIw/Lh1XShnGi5nBP+9KIRLTuzl/2AokwlDMlv0/U1cGq1//rPD6fHWf7tZcclx"
    "nv1hhVNj3b9tOOW8f3+wxCUnfPffMlxyzKf/3VbGJan2758vLjn5B/+KGXF78Z8JLjnbT+iSSGFrw8Nw9wuKJAsy56LzO+ITGABpETyQ"
    "cCy90wAAAABJRU5ErkJggg=="
)


def example_pixels() -> list[list[int]]:
    """The example digit as 28 rows of 28 integers 0..255 (decoded only when the docs are built)."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(EXAMPLE_PNG_BASE64))) as image:
        return [[int(v) for v in row] for row in np.asarray(image.convert("L"))]


def _request_examples(schema: dict[str, Any]) -> None:
    schema["examples"] = [
        {"pixels": example_pixels(), "scale": "0-255"},
        {"image_base64": EXAMPLE_PNG_BASE64, "top_k": 3, "return_image": True},
    ]


def _batch_examples(schema: dict[str, Any]) -> None:
    schema["examples"] = [
        {
            "items": [{"image_base64": EXAMPLE_PNG_BASE64}, {"pixels": example_pixels(), "scale": "0-255"}],
            "top_k": 2,
        }
    ]


FinitePixel = Annotated[float, Field(allow_inf_nan=False)]
PixelRow = Annotated[list[FinitePixel], Field(min_length=28, max_length=28)]
Pixels = Annotated[list[PixelRow], Field(min_length=28, max_length=28)]
TopK = Annotated[int, Field(ge=1, le=10)]


class PredictItem(BaseModel):
    """One digit: either ``pixels`` (28×28 numbers) or ``image_base64`` (a PNG/JPEG/… of any size)."""

    model_config = ConfigDict(extra="forbid")

    pixels: Pixels | None = None
    """28 rows of 28 numbers, white ink on black (MNIST convention), on the scale named by `scale`."""

    scale: Literal["0-255", "0-1"] = "0-255"
    """Range of `pixels`: 0..255 integers-or-floats, or 0..1 floats."""

    normalize: bool = False
    """Also put `pixels` through the MNIST normalisation images get (crop to the ink, fit 20×20, centre)."""

    image_base64: str | None = Field(default=None, min_length=1)
    """A base64 image (a data: URL prefix is fine); any size, any colours, dark-on-light or light-on-dark."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> PredictItem:
        if (self.pixels is None) == (self.image_base64 is None):
            raise ValueError("give exactly one of `pixels` or `image_base64`")
        return self


class PredictRequest(PredictItem):
    """``POST /v1/predict`` JSON body. `top_k` and `return_image` may also be given as query parameters."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_request_examples)

    top_k: TopK | None = None
    """Also answer the k most likely digits with their probabilities."""

    return_image: bool | None = None
    """Also answer the 28×28 image the model saw (after normalisation)."""


class BatchRequest(BaseModel):
    """``POST /v1/predict/batch`` JSON body: up to ``MNIST_SERVE_MAX_BATCH_ITEMS`` items, answered in order."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_batch_examples)

    items: list[PredictItem] = Field(min_length=1)
    """The digits to classify."""

    top_k: TopK | None = None
    """Also answer the k most likely digits of every item."""

    return_image: bool | None = None
    """Also answer the 28×28 image the model saw, for every item."""


class ModelRef(BaseModel):
    name: str = Field(examples=["mnist-cnn"])
    version: str = Field(examples=["1.2.0"])


class Candidate(BaseModel):
    digit: int = Field(ge=0, le=9)
    probability: float


class SeenImage(BaseModel):
    """The image the model saw: 28×28, white ink on black."""

    width: int = 28
    height: int = 28
    pixels: list[list[int]]
    """28 rows of 28 integers 0..255."""
    png_base64: str
    """The same image as a base64 PNG."""


Verdict = Literal["digit", "unsure", "not_a_digit"]


class Prediction(BaseModel):
    digit: int = Field(ge=0, le=9, examples=[7])
    """The most likely digit."""
    confidence: float = Field(examples=[0.9998])
    """Its probability (calibrated when the model card says so)."""
    verdict: Verdict = Field(examples=["digit"])
    """`digit`: trust the answer; `unsure`: a digit the model may misread (ask a person; see `top_k`);
    `not_a_digit`: the image does not look like one handwritten digit. Thresholds: the model card's `trust`."""
    probabilities: list[float] = Field(min_length=10, max_length=10)
    """Probability of each digit 0..9."""
    top_k: list[Candidate] | None = None
    """The k most likely digits, most likely first (only when asked)."""
    image: SeenImage | None = None
    """The 28×28 input the model saw (only when asked)."""


class PredictResponse(Prediction):
    model: ModelRef


class BatchResponse(BaseModel):
    predictions: list[Prediction]
    """One per item, in request order."""
    model: ModelRef


class TensorInfo(BaseModel):
    name: str
    shape: list[int | str | None]
    dtype: str


class ModelInfo(BaseModel):
    name: str
    version: str
    created: str | None = None
    sha256: str
    opset: int | None = None
    input: TensorInfo
    output: TensorInfo
    metrics: dict[str, float | int]
    """Headline figures from the model card (test accuracy and errors)."""
    parameters: int | None = None
    trust: dict[str, Any] | None = None
    """The card's verdict thresholds, calibration and out-of-distribution figures (when the model has them)."""
    ready: bool
    default: bool = False
    """The model a request naming none gets."""


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    problems: list[str] = Field(default_factory=list)
    """Model versions in the repository that could not be served at the last load, and why."""
    last_reload_error: str | None = None
    """Why the last reload failed (the previous models go on serving); null after a successful one."""


class Health(BaseModel):
    status: Literal["ok", "ready"]
    model: ModelRef | None = None


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_input"])
    message: str = Field(examples=["items[3].pixels: List should have at least 28 items after validation, not 27"])
    index: int | None = None
    """For batch requests: the item at fault."""
    details: list[dict[str, Any]] | None = None
    request_id: str | None = Field(default=None, examples=["4bf92f3577b34da6a3ce929d0e0e4736"])
    """The request's id, as in its X-Request-ID response header and its log line."""


class ErrorBody(BaseModel):
    """Every error of /v1, the health routes and the admin API."""

    error: ErrorDetail


# --- the Open Inference Protocol's bodies (/v2), as documented; the routes build them in service.protocol --------


class ProtocolErrorBody(BaseModel):
    """The protocol's error body (the request id is in the X-Request-ID header only)."""

    error: str = Field(examples=["no model named 'mnist-xl' (serving: mnist-cnn, mnist-cnn-int8)"])


class ServerMetadata(BaseModel):
    name: str = Field(examples=["mnist-serve"])
    version: str = Field(examples=["1.2.0"])
    extensions: list[str] = Field(examples=[["binary_tensor_data", "model_configuration"]])


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(examples=[[-1, 28, 28, 1]])
    """-1: any size (the batch)."""


class ModelMetadata(BaseModel):
    name: str = Field(examples=["mnist-cnn"])
    versions: list[str] = Field(examples=[["1.2.0"]])
    platform: str = Field(examples=["onnxruntime_onnx"])
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelConfig(BaseModel):
    """Triton's model configuration (its field names, so that gRPC can answer it in Triton's message)."""

    model_config = ConfigDict(extra="allow")

    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[dict[str, Any]]
    output: list[dict[str, Any]]
    parameters: dict[str, dict[str, str]]
    """The model's version and sha256, as Triton's string parameters."""
    dynamic_batching: dict[str, Any] | None = None
    """Present when micro-batching is on."""


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str


class InferInput(BaseModel):
    name: str = Field(examples=["input"])
    shape: list[int] = Field(examples=[[1, 784]])
    """[N, 28, 28, 1], [N, 28, 28] or [N, 784]."""
    datatype: str = Field(examples=["FP32"])
    """FP32, values in 0..1 (white ink on black: pixels / 255)."""
    parameters: dict[str, Any] | None = None
    """`binary_data_size` when the values follow the JSON as little-endian bytes."""
    data: list[Any] | None = None
    """The values, flattened in row-major order or nested like the shape."""


class InferRequestedOutput(BaseModel):
    name: Literal["probabilities", "digit", "verdict"]
    parameters: dict[str, Any] | None = None
    """`binary_data: true` to get this output as little-endian bytes after the JSON."""


class InferRequest(BaseModel):
    """An inference request: one input tensor of images; the outputs wanted (default: all three)."""

    id: str | None = None
    """Echoed in the response."""
    parameters: dict[str, Any] | None = None
    """`binary_data_output: true` to get every output as bytes."""
    inputs: list[InferInput]
    outputs: list[InferRequestedOutput] | None = None


class InferOutput(BaseModel):
    name: Literal["probabilities", "digit", "verdict"]
    datatype: Literal["FP32", "INT64", "BYTES"]
    shape: list[int] = Field(examples=[[1, 10]])
    data: list[float | str] | None = None
    """Flattened in row-major order (absent when the output is sent as bytes)."""
    parameters: dict[str, int] | None = None
    """`binary_data_size`: the output's bytes after the JSON (then `data` is absent)."""


class InferResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str = Field(examples=["mnist-cnn"])
    model_version: str = Field(examples=["1.2.0"])
    id: str | None = None
    """The request's id, when it gave one."""
    outputs: list[InferOutput]


# --- OpenAPI `responses` entries: what each route can answer, each with its body ---------------------------------

RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "How to authenticate: Bearer.", "schema": {"type": "string"}}}
_HEADERS: dict[int, dict[str, Any]] = {401: WWW_AUTHENTICATE, 503: RETRY_AFTER}

#: What a /v1 (or health, or admin) error status means, unless the route says otherwise.
ERROR_MEANINGS = {
    401: "API key missing or wrong (only when MNIST_SERVE_API_KEY is set)",
    403: "no API key is configured, so the admin API is off",
    404: "no model of that name, or no such version of it (?model=, ?version=)",
    413: "too large: the body (payload_too_large), its JSON structure (json_too_complex), the number of items "
    "(too_many_items) or the pixels to decode (too_many_pixels)",
    415: "not JSON or multipart form data (unsupported_media_type), an upload that is not an image, or a "
    "compressed body (unsupported_encoding)",
    422: "invalid input: shape, NaN/Inf, an undecodable, blank or too large image, an invalid query parameter",
    500: "the new model set could not be loaded; the previous one goes on serving",
    503: "not ready (loading, failed to load, shutting down) or overloaded (overloaded: the queue is full or the "
    "wait would be too long; too_many_bytes: the worker holds too many request bodies); see Retry-After",
}

#: The same for the Open Inference Protocol's routes (/v2), whose bad requests are 400, not 422.
PROTOCOL_MEANINGS = {
    400: "bad request: the JSON, the tensors (name, datatype, shape, values) or the binary data layout",
    401: "API key missing or wrong (only when MNIST_SERVE_API_KEY is set)",
    404: "no model of that name, or no such version of it",
    413: "too large: the body, its JSON structure, or more images than MNIST_SERVE_MAX_BATCH_ITEMS",
    415: "a compressed body (Content-Encoding other than identity)",
    503: "not ready (loading, failed to load, shutting down) or overloaded (the queue is full, the wait would be "
    "too long, or the worker holds too many request bodies); see Retry-After",
}


def _responses(
    body: type[BaseModel], meanings: dict[int, str], statuses: tuple[int, ...], described: dict[int, str] | None
) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": body, "description": (described or {}).get(status, meanings[status])}
        if status in _HEADERS:
            entry["headers"] = _HEADERS[status]
        out[status] = entry
    return out


def error_responses(*statuses: int, described: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these /v1 error statuses: the ``{"error": {"code", "message"}}`` body."""
    return _responses(ErrorBody, ERROR_MEANINGS, statuses, described)


def protocol_responses(*statuses: int, described: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these /v2 error statuses: the protocol's ``{"error": "message"}`` body."""
    return _responses(ProtocolErrorBody, PROTOCOL_MEANINGS, statuses, described)
