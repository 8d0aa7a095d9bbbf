"""``POST /v1/predict`` with a JSON body, answered without FastAPI's routing, dependency injection and responses.

At thousands of requests a second on two cores, the framework's per-request work (route matching, solving five
dependencies, query validation, building the response) costs as much CPU as the model itself. This ASGI layer
answers the common case — a JSON ``/v1/predict`` whose query names at most ``model``, ``version``, ``top_k`` and
``return_image`` in their plain forms — directly over the data plane, with the same code the route uses for the
body (:func:`service.routes.predict.json_images`), the same answer (:func:`service.codec.predictions`) and the same
errors (:mod:`service.errors`). Everything else (multipart, other routes, a query FastAPI should judge) goes on to
the app unchanged, so the API, its OpenAPI document and its errors stay exactly what the route defines.

It sits inside the request log, metrics, request-id and body-limit middlewares, so it is measured and limited like
every other request.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.body import check_encoding
from service.codec import encode, predictions
from service.core import DataPlane, request_info
from service.deps import check_api_key
from service.errors import CLIENT_CLOSED_REQUEST, ServiceError, error_body
from service.routes.predict import json_budget, json_images

log = logging.getLogger(__name__)

PATH = "/v1/predict"
JSON = b"application/json"
#: Query parameters the fast path understands, in the forms it accepts; anything else goes to FastAPI.
_BOOLS = {"true": True, "false": False, "1": True, "0": False}
_JSON_HEADERS = [(b"content-type", b"application/json")]


class PredictFastPath:
    """The JSON ``/v1/predict`` fast path (see the module docstring); every other request passes through."""

    def __init__(self, app: ASGIApp, get_plane: Any) -> None:
        self.app = app
        self._get_plane = get_plane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        query = _query(scope.get("query_string", b""))
        if query is None or headers.get(b"content-type", b"").split(b";")[0].strip().lower() != JSON:
            await self.app(scope, receive, send)
            return
        plane: DataPlane = self._get_plane()
        try:
            await self._answer(plane, scope, receive, send, headers, query)
        except ServiceError as error:
            await _send(send, error.status_code, encode(error_body(error, scope)), error.headers)
        except ClientDisconnect:
            await _send(send, CLIENT_CLOSED_REQUEST, b"", {})

    async def _answer(
        self,
        plane: DataPlane,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        query: dict[str, Any],
    ) -> None:
        check_api_key(plane.settings.api_key, _presented_key(headers))
        model, version = query.get("model"), query.get("version")
        plane.resolve(model, version)  # 404 / 503 before the body is read
        check_encoding(headers.get(b"content-encoding", b"").decode("latin-1"))
        with plane.tracing.span("decode"):
            body = await _read(receive, json_budget(plane.settings, batch=False))
            images, body_top_k, body_return_image = await json_images(body, plane, batch=False)
            del body
        top_k = body_top_k if body_top_k is not None else query.get("top_k")
        return_image = body_return_image if body_return_image is not None else query.get("return_image")
        answer = await plane.infer(model, version, images, request_info(scope))
        (prediction,) = predictions(answer, images, top_k, bool(return_image))
        prediction["model"] = {"name": answer.name, "version": answer.version}
        await _send(send, 200, encode(prediction), {})


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers, the first value of a repeated one (what Starlette reads, so the route agrees)."""
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name, value)
    return headers


def _presented_key(headers: dict[bytes, bytes]) -> str | None:
    key = headers.get(b"x-api-key")
    if key:
        return key.decode("latin-1")
    scheme, _, credentials = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


def _query(raw: bytes) -> dict[str, Any] | None:
    """The query in its plain form, or None to let FastAPI validate it (and say what is wrong)."""
    if not raw:
        return {}
    out: dict[str, Any] = {}
    for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if name in out:
            return None
        if name in ("model", "version"):
            out[name] = value or None
        elif name == "top_k" and value.isascii() and value.isdigit() and 1 <= int(value) <= 10:
            out[name] = int(value)
        elif name == "return_image" and value.lower() in _BOOLS:
            out[name] = _BOOLS[value.lower()]
        else:
            return None
    return out


async def _read(receive: Receive, budget: Any) -> bytearray:
    body = bytearray()
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            budget.check(chunk)
            body += chunk
        if not message.get("more_body", False):
            return body


async def _send(send: Send, status: int, body: bytes, extra: dict[str, str]) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
