"""Typed domain errors and the one place that turns them (and framework errors) into HTTP answers.

Every error the service sends has the body ``{"error": {"code": str, "message": str, ..., "request_id": str}}``;
bad input is never a 500. Handlers are registered once, by :func:`register_error_handlers`. The Open Inference
Protocol endpoints under ``/v2`` answer the same errors in that protocol's shape, ``{"error": str}``, with 400 for
bad input (their request id is in the ``X-Request-ID`` header only).

Every /v1 error body is built by :func:`error_body`, wherever the error is answered (these handlers, the
middlewares' early answers, the /v1 fast path), so that each carries the request's id the same way:

    body = error_body(InvalidInput("items[3]: not 28×28"), scope)   # {"error": {"code", "message", "request_id"}}
    body = error_body(ServiceError("too large", code="payload_too_large"), scope)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.requestid import HEADER as REQUEST_ID_HEADER
from service.requestid import request_id

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of the domain errors: an HTTP status, a stable machine-readable code and a human message."""

    status_code: ClassVar[int] = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        index: int | None = None,
        details: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.index = index
        self.details = list(details) if details else None
        self.headers = dict(headers) if headers else {}

    def at_index(self, index: int) -> ServiceError:
        """The same error, naming the batch item it came from."""
        self.index = index
        self.message = f"items[{index}]: {self.message}"
        return self

    def body(self, scope: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """This error's /v1 body (see :func:`error_body`)."""
        return error_body(self, scope)


class InvalidInput(ServiceError):
    """The request is well-formed HTTP but its content cannot be a digit image (shape, NaN, undecodable, bomb)."""

    status_code = 422
    code = "invalid_input"


class PayloadTooLarge(ServiceError):
    """The body (or the number of batch items) is over the configured limit."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    """The Content-Type is neither JSON nor multipart form data (or the file is not an image)."""

    status_code = 415
    code = "unsupported_media_type"


class Unauthorized(ServiceError):
    """An API key is configured and the request did not present it."""

    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str = "a valid API key is required (X-API-Key or Authorization: Bearer)") -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="mnist-serve"'})


class ModelNotReady(ServiceError):
    """The model is still loading (or failed to load, or the service is shutting down)."""

    status_code = 503
    code = "model_not_ready"

    def __init__(self, message: str = "the model is not loaded yet", *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ModelLoadFailed(ModelNotReady):
    """The model could not be loaded; the process will not become ready by itself (restart it)."""

    code = "model_load_failed"

    def __init__(self, reason: str) -> None:
        super().__init__(f"the model failed to load: {reason}", retry_after_s=30)


class ModelNotFound(ServiceError):
    """The request names a model, or a version of it, that this instance does not serve."""

    status_code = 404
    code = "model_not_found"


class AdminDisabled(ServiceError):
    """The admin API is off because no API key is configured: without one anybody could call it."""

    status_code = 403
    code = "admin_disabled"

    def __init__(self) -> None:
        super().__init__("the admin API is disabled: set MNIST_SERVE_API_KEY to enable it")


class ReloadFailed(ServiceError):
    """A model reload could not load the new model set; the previous set goes on serving."""

    status_code = 500
    code = "reload_failed"


class Overloaded(ServiceError):
    """The inference queue is full: the client should back off and retry."""

    status_code = 503
    code = "overloaded"

    def __init__(
        self,
        message: str = "the inference queue is full, retry later",
        *,
        retry_after_s: int = 1,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


#: Validation errors listed in an answer; a wholly wrong 28×28 array would otherwise list hundreds.
MAX_DETAILS = 5


def format_location(loc: Sequence[int | str]) -> str:
    """``("body", "items", 3, "pixels", 0)`` → ``items[3].pixels[0]``."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def validation_error(errors: Sequence[Mapping[str, Any]]) -> InvalidInput:
    """One InvalidInput from pydantic/FastAPI validation errors; names the batch index of the first bad item."""
    details = [{"loc": format_location(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in errors]
    first = details[0] if details else {"loc": "body", "msg": "invalid request"}
    index = None
    for error in errors:
        loc = [p for p in error.get("loc", ()) if p != "body"]
        if len(loc) >= 2 and loc[0] == "items" and isinstance(loc[1], int):
            index = loc[1]
            break
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return InvalidInput(f"{first['loc']}: {first['msg']}{more}", index=index, details=details[:MAX_DETAILS])


def error_body(error: ServiceError, scope: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"error": {"code", "message", ["index", "details",] "request_id"}}``: the one /v1 error body.

    ``scope`` is the request's ASGI scope; without one, the id of the request this task serves (none outside a
    request: the key is left out).
    """
    fields: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.index is not None:
        fields["index"] = error.index
    if error.details:
        fields["details"] = error.details
    rid = request_id(scope)
    if rid is not None:
        fields["request_id"] = rid
    return {"error": fields}


def error_response(error: ServiceError, scope: Mapping[str, Any] | None = None) -> JSONResponse:
    return JSONResponse(error_body(error, scope), status_code=error.status_code, headers=error.headers or None)


def is_protocol_path(path: str) -> bool:
    """Whether ``path`` belongs to the Open Inference Protocol (``/v2``), whose errors are ``{"error": str}``."""
    return path == "/v2" or path.startswith("/v2/")


def protocol_status(status: int) -> int:
    # The protocol answers bad requests with 400 where /v1 says 422.
    return 400 if status == 422 else status


def protocol_error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=protocol_status(status), headers=dict(headers or {}) or None)


def _answer(request: Request, error: ServiceError) -> JSONResponse:
    if is_protocol_path(request.url.path):
        return protocol_error_response(error.status_code, error.message, error.headers)
    return error_response(error, request.scope)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "too_many_requests",
    503: "unavailable",
}


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return _answer(request, exc)


async def _request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _answer(request, validation_error(exc.errors()))


async def _pydantic_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    return _answer(request, validation_error(exc.errors()))


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if is_protocol_path(request.url.path):
        return protocol_error_response(exc.status_code, str(exc.detail), exc.headers)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    body = error_body(ServiceError(str(exc.detail), code=code), request.scope)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


#: nginx's "client closed request": what the metrics record for a request whose client left before sending it all.
CLIENT_CLOSED_REQUEST = 499


async def _client_gone(_: Request, exc: Exception) -> Response:
    # A client that hangs up mid-body (a load generator stopping, a closed tab) is no fault of ours: no traceback,
    # and nobody is left to read an answer.
    log.debug("the client disconnected before its request body arrived")
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette answers these outside every middleware (the request log's included): the id comes from the scope,
    # and the header is set here.
    rid = request_id(request.scope)
    log.exception("unhandled error", exc_info=exc, extra={"request_id": rid})
    headers = {REQUEST_ID_HEADER: rid} if rid is not None else None
    if is_protocol_path(request.url.path):
        return protocol_error_response(500, "internal server error", headers)
    body = error_body(ServiceError("internal server error"), request.scope)
    return JSONResponse(body, status_code=500, headers=headers)


def register_error_handlers(app: FastAPI) -> None:
    """Install the handlers that give every error the ``{"error": {"code", "message"}}`` shape."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(ValidationError, _pydantic_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
