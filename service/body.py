"""Reading a request body within its budgets: one copy, counted as it arrives, refused as early as possible.

    body = await read_body(request, JsonBudget.for_predict())

The total size is capped before this (``Content-Length``, then the stream, in :mod:`service.middleware`), and so
are the bytes all requests hold at once and the time a body may take. Here: the encoding (compressed bodies are
refused, not inflated: an inflated body has no size cap) and, for JSON, the structure budget of
:class:`~service.admission.JsonBudget`, checked chunk by chunk so that an amplification body is refused before the
rest of it is even received.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request

from service.admission import JsonBudget
from service.errors import UnsupportedMediaType

#: Content-Encoding values that mean "not encoded".
IDENTITY = frozenset({"", "identity"})


def check_encoding(content_encoding: str | None) -> None:
    """415 for a compressed (or otherwise encoded) body: the service reads bodies as they are sent."""
    encoding = (content_encoding or "").strip().lower()
    if encoding not in IDENTITY:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed", code="unsupported_encoding"
        )


async def collect(chunks: AsyncIterator[bytes], budget: JsonBudget | None) -> bytearray:
    """The chunks as one bytearray (Starlette's ``body()`` keeps the chunks and their join: twice the size)."""
    body = bytearray()
    async for chunk in chunks:
        if budget is not None:
            budget.check(chunk)
        body += chunk
    return body


async def read_body(request: Request, budget: JsonBudget | None) -> bytearray:
    check_encoding(request.headers.get("content-encoding"))
    return await collect(request.stream(), budget)
