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
    version: str = Field(examples=["1.0.0"])


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
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses."""
    meaning = {
        401: "API key missing or wrong",
        413: "body or batch too large",
        404: "no model of that name, or no such version of it (?model=, ?version=)",
        415: "not JSON / multipart, or the file is not an image",
        422: "invalid input: shape, NaN/Inf, undecodable image, image too large, blank image",
        503: "model not ready, or overloaded (see Retry-After)",
    }
    return {s: {"model": ErrorBody, "description": meaning.get(s, "error")} for s in statuses}
