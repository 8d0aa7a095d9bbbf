"""What the request log costs per request, against uvicorn's access log and against no log (docs/observability.md).

    python -m bench.logging_cost                 # 50,000 requests per variant, best of 5 rounds
    python -m bench.logging_cost --requests 20000 --rounds 3

Each variant serves the same request (``POST /v1/predict``, a JSON answer) through a trivial ASGI app on one event
loop, so only the work around the app differs; log lines go to a real file, one write per line, as they go to the
container's stdout, and the cost is the CPU time the thread spends (wall time would count other work on the
machine). The variants: no middleware; the request-id middleware with the log off
(``MNIST_SERVE_ACCESS_LOG=false``); the request log in json and in text; uvicorn's access log as uvicorn writes it
(its formatter and the call its protocol makes per response); and the request log under a sampled server span
(tracing on, spans handed to a processor that drops them). Prints CPU microseconds per request and the cost over
none.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core import request_info
from service.logs import REQUEST_LOGGER, JsonFormatter, RequestLog, TextFormatter

BODY = b'{"digit":7,"confidence":0.999,"verdict":"digit"}'
ROUTES = {"/v1/predict"}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    info = request_info(scope)
    info.model, info.version, info.images = "mnist-cnn", "1.2.0", 1
    headers = [(b"content-type", b"application/json"), (b"content-length", b"48")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


def scope() -> Scope:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/predict",
        "raw_path": b"/v1/predict",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"), (b"content-length", b"1700")],
        "client": ("10.0.0.7", 50312),
        "server": ("127.0.0.1", 8000),
    }


def uvicorn_access_log(inner: ASGIApp, logger: logging.Logger) -> ASGIApp:
    """What uvicorn's httptools protocol does per response when its access log is on."""
    from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

    async def logged(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                logger.info(
                    '%s - "%s %s HTTP/%s" %d',
                    get_client_addr(scope),  # type: ignore[arg-type]
                    scope["method"],
                    get_path_with_query_string(scope),  # type: ignore[arg-type]
                    scope["http_version"],
                    message["status"],
                )
            await send(message)

        await inner(scope, receive, send_logged)

    return logged


def logger_to(path: Path, name: str, formatter: logging.Formatter) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers.clear()
    handler = logging.StreamHandler(path.open("a"))
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def variants(directory: Path) -> dict[str, ASGIApp]:
    from uvicorn.logging import AccessFormatter

    json_logger = logger_to(directory / "json.log", REQUEST_LOGGER + ".json", JsonFormatter())
    text_logger = logger_to(directory / "text.log", REQUEST_LOGGER + ".text", TextFormatter())
    access = AccessFormatter('%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False)
    uvicorn_logger = logger_to(directory / "uvicorn.log", "bench.uvicorn.access", access)
    found: dict[str, ASGIApp] = {
        "no log, no request id": app,
        "request id only (MNIST_SERVE_ACCESS_LOG=false)": RequestLog(app, known_paths=ROUTES, enabled=False),
        "request log, json": RequestLog(app, known_paths=ROUTES, logger=json_logger),
        "request log, text": RequestLog(app, known_paths=ROUTES, logger=text_logger),
        "uvicorn's access log (before)": uvicorn_access_log(app, uvicorn_logger),
    }
    try:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

        from service.otel import OtelTracing, TraceRequests
    except ImportError:  # no otel extra
        return found

    class Dropped(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracing = OtelTracing.with_processor(SimpleSpanProcessor(Dropped()))
    logged = RequestLog(app, known_paths=ROUTES, logger=json_logger)
    found["request log, json, + server span (tracing on)"] = TraceRequests(logged, tracing, ROUTES)
    return found


async def per_request_us(asgi: ASGIApp, requests: int) -> float:
    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    # CPU time of this thread (the write syscalls included), not wall time: others' load on the machine does not
    # count, and nothing here ever waits.
    start = time.thread_time()
    for _ in range(requests):
        await asgi(scope(), receive, send)
    return (time.thread_time() - start) / requests * 1e6


async def measure(requests: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        apps = variants(Path(tmp))
        best = dict.fromkeys(apps, float("inf"))
        for _ in range(rounds):  # interleaved, so that a busy moment hurts every variant alike
            for name, asgi in apps.items():
                await per_request_us(asgi, requests // 10)  # warm up
                best[name] = min(best[name], await per_request_us(asgi, requests))
        for path in Path(tmp).glob("*.log"):
            assert path.stat().st_size > 0, f"{path.name}: nothing written"
        return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    best = asyncio.run(measure(args.requests, args.rounds))
    base = best["no log, no request id"]
    print(f"{'variant':<50} {'us/request':>10} {'over none':>10}")
    for name, us in best.items():
        print(f"{name:<50} {us:>10.2f} {us - base:>+10.2f}")


if __name__ == "__main__":
    main()
