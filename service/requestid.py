"""Request ids: the client's ``X-Request-ID`` when it is safe to repeat, else a fresh one.

    rid = bind(scope)            # the request-log middleware, once per request: reads the header, stores the id
    request_id(scope)            # anywhere that has the scope: a route, a middleware, an error handler, the fast path
    request_id()                 # anywhere below the middleware in the request's task (log records, handlers)

The id is echoed in the ``X-Request-ID`` response header, written in the request's log line and in every /v1
error body (:func:`service.errors.error_body`). A client's id is kept when it is 1–128 characters of
``A-Z a-z 0-9 . _ : - + / = @`` (enough for UUIDs, ULIDs, base64 and most proxies' ids) and nothing else, so that it
can go into a header, a JSON log and a text log unquoted; anything else is replaced by a generated one, 32 hex
digits (128 random bits, as a uuid4 has), never refused: a bad id is no reason to fail a request.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, MutableMapping
from contextvars import ContextVar, Token
from typing import Any

HEADER = "X-Request-ID"
#: The header as ASGI carries it (lower case bytes).
HEADER_KEY = b"x-request-id"
#: Where a request's scope keeps its id.
SCOPE_KEY = "mnist_serve.request_id"
MAX_LENGTH = 128

_SAFE = re.compile(rb"[A-Za-z0-9._:+/=@-]{1,%d}" % MAX_LENGTH)
_current: ContextVar[str | None] = ContextVar("mnist_serve_request_id", default=None)


def new_request_id() -> str:
    """A fresh id: 32 lowercase hex digits."""
    return os.urandom(16).hex()


def accepted(value: bytes) -> str | None:
    """``value`` as an id when it is safe to repeat (see the module docstring), else None."""
    return value.decode("ascii") if _SAFE.fullmatch(value) else None


def from_headers(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The request's id: its first ``X-Request-ID`` header when that is acceptable, else a new one."""
    for name, value in headers:
        if name == HEADER_KEY:
            return accepted(value) or new_request_id()
    return new_request_id()


def bind(scope: MutableMapping[str, Any]) -> tuple[str, Token[str | None]]:
    """Give the request of ``scope`` its id (in the scope and the task's context); reset the token when it is done."""
    rid = scope[SCOPE_KEY] = from_headers(scope.get("headers", ()))
    return rid, _current.set(rid)


def unbind(token: Token[str | None]) -> None:
    _current.reset(token)


def request_id(scope: Mapping[str, Any] | None = None) -> str | None:
    """The id of the request of ``scope`` (else of the request this task serves); None outside any request."""
    if scope is not None:
        rid = scope.get(SCOPE_KEY)
        if isinstance(rid, str):
            return rid
    return _current.get()
