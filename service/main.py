"""The app factory; ``mnist-serve`` (:mod:`service.server`) runs it in one or several worker processes.

    mnist-serve                                   # serve every model in models/ on 127.0.0.1:8000
    MNIST_SERVE_PORT=9000 MNIST_SERVE_BATCHING=false mnist-serve
    mnist-serve --help                            # every MNIST_SERVE_* setting
    python -m service                             # the same without the console script
    kill -HUP <pid>                               # reload the model repository without dropping requests

``create_app`` receives its collaborators (settings, optionally an already-loaded classifier, a loader, a
metrics object) and keeps them on ``app.state.service``; nothing is global and nothing happens at import.
Startup loads and warms every model in the repository in the background (``/healthz`` answers at once,
``/readyz`` turns 200 when the models can serve); SIGHUP (and ``POST /v1/admin/reload``) loads the repository
again and swaps it in (see ``service.repository``); shutdown stops admitting requests and drains the batchers so
every admitted request is answered before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import Scope

from service.admission import QueueBudget, usable_cpus
from service.batching import LARGE_REQUEST_IMAGES, InferenceRunner, MicroBatcher, UnbatchedRunner
from service.core import DataPlane, ServiceState
from service.deps import StateDep
from service.docs import install_docs
from service.errors import register_error_handlers
from service.fastpath import PredictFastPath
from service.grpc_server import GrpcServer
from service.logs import RequestLog, RpcLog
from service.memory import tune_malloc
from service.metrics import ModelMetrics, ServiceMetrics
from service.middleware import BodySizeLimit, RequestMetrics
from service.model import (
    MAX_RUN_BATCH,
    FloatArray,
    LoadedModels,
    OnnxClassifier,
    load_repository,
)
from service.repository import ModelLoader, ModelRepository
from service.routes import admin, health, predict, v2
from service.schemas import BatchRequest, InferRequest, PredictRequest
from service.server import CLOSE_REASONS, CONNECTION_CLOSED, EARLY_RELOAD, SHUTDOWN_STARTED
from service.settings import SUPERVISOR_ENV, Settings
from service.tracing import NO_TRACING, Tracing
from service.tracing import from_settings as tracing_from_settings

log = logging.getLogger("service")


def decode_threads(settings: Settings) -> int:
    """Threads decoding images in this worker: the setting, else the usable CPUs shared among the workers."""
    if settings.decode_threads:
        return settings.decode_threads
    return max(1, usable_cpus() // (settings.workers or usable_cpus()))


def default_loader(settings: Settings) -> LoadedModels:
    """Load, verify and warm up every model version in the settings' model directory."""
    return load_repository(
        settings.resolved_model_dir(),
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        wide_threads=settings.large_request_threads or usable_cpus(),
    )


def make_runner(
    settings: Settings, classifier: OnnxClassifier, metrics: ModelMetrics, tracing: Tracing = NO_TRACING
) -> InferenceRunner:
    """The micro-batcher, or the one-request-per-run runner when batching is off, admitting by cost."""
    budget = QueueBudget(max_images=settings.max_queue_images, max_wait_s=settings.max_queue_wait_ms / 1000.0)

    def wide(images: FloatArray) -> FloatArray:
        return classifier.run(images, wide=True)

    common: dict[str, Any] = {
        "predict_wide": wide,
        "wide_from": LARGE_REQUEST_IMAGES,
        "max_run_images": MAX_RUN_BATCH,
        "queue_size": settings.queue_size,
        "budget": budget,
        "metrics": metrics,
        "tracing": tracing,
    }
    if settings.batching:
        return MicroBatcher(
            classifier.run,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            **common,
        )
    return UnbatchedRunner(classifier.run, **common)


class WebPage(Mount):
    """The web page's files at ``/``, for every path that is not one of the API's.

    A plain mount at ``/`` matches every path, so it used to catch an API path asked with the wrong method (GET on
    /v1/predict answered 404 from the file server, PUT a 405 claiming ``Allow: GET, HEAD``). This one steps aside
    for any path an API route matches, whatever the method, and the router then answers 405 with the route's own
    ``Allow``.
    """

    def __init__(self, files: StaticFiles, api: list[BaseRoute]) -> None:
        super().__init__("/", app=files, name="web")
        self._api = api

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if any(route.matches(scope)[0] is not Match.NONE for route in self._api):
            return Match.NONE, {}
        return super().matches(scope)


def _version() -> str:
    try:
        return importlib.metadata.version("mnist-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


async def _bring_up(state: ServiceState, classifier: OnnxClassifier | None) -> None:
    settings = state.settings
    await state.repository.start([classifier] if classifier is not None else None)
    models = state.models
    if models is None:
        return
    mode = (
        f"micro-batching (max {settings.max_batch_size} images, {settings.max_wait_ms:g} ms)"
        if settings.batching
        else "no batching"
    )
    log.info("serving %s with %s; default %s %s", models.describe(), mode, models.default.name, models.default.version)


@contextlib.contextmanager
def _reload_on_sighup(repository: ModelRepository) -> Iterator[None]:
    """SIGHUP reloads the repository. Only the main thread's loop can own a signal (not so under a test client)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, repository.reload_in_background)
        installed = True
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):  # no SIGHUP here, or not the main thread
        installed = False
    if installed and EARLY_RELOAD.is_set():  # one came while the worker started: reload after the first load
        EARLY_RELOAD.clear()
        repository.reload_in_background()
    try:
        yield
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # shutting down: a late SIGHUP must not end the process


async def _start_grpc(app: FastAPI) -> GrpcServer | None:
    """The Open Inference Protocol over gRPC on MNIST_SERVE_GRPC_PORT (0: off), in this event loop."""
    settings: Settings = app.state.service.settings
    if not settings.grpc_port:
        app.state.grpc = None
        return None
    log_rpc = RpcLog(enabled=settings.access_log, probes=settings.log_probes)  # the request log's line per RPC
    server = await GrpcServer.start(app.state.plane, version=app.version, on_rpc=log_rpc)
    app.state.grpc = server
    return server


def _out_of_time(state: ServiceState) -> None:
    models = state.models
    if models is not None and models.queue_depth:
        log.warning("the drain ran out of time: answering 503 to the %d requests still waiting", models.queue_depth)
    for served in models or ():
        served.runner.fail_pending()


def _lifespan(classifier: OnnxClassifier | None) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: ServiceState = app.state.service
        # gRPC first: it answers liveness while the models load, and nothing else has started if it cannot listen.
        grpc_server = await _start_grpc(app)
        # An injected, already-warm classifier is ready before the first request; loading from disk happens in
        # the background so that liveness answers while the models load.
        if classifier is not None and classifier.warmed_up:
            await _bring_up(state, classifier)
            loading: asyncio.Task[None] | None = None
        else:
            loading = asyncio.create_task(_bring_up(state, classifier), name="mnist-model-load")
            if os.environ.get(SUPERVISOR_ENV):
                # One of several workers on a shared socket: it starts accepting connections only once its models
                # serve, so that no request reaches a worker still loading while its siblings could answer.
                await asyncio.shield(loading)

        def shutdown_started() -> None:
            # SIGTERM: readiness turns 503 at once and gRPC starts its drain while uvicorn drains HTTP. What is still
            # waiting for a model when the drain time is up gets 503, before uvicorn would cancel it (a 500).
            state.draining = True
            timeout = state.settings.shutdown_timeout_s
            if grpc_server is not None:  # awaited again below: stop() is idempotent
                app.state.grpc_draining = asyncio.ensure_future(grpc_server.stop(timeout))
            asyncio.get_running_loop().call_later(timeout, _out_of_time, state)

        SHUTDOWN_STARTED.append(shutdown_started)
        connection_closed = state.metrics.observe_connection_closed
        CONNECTION_CLOSED.append(connection_closed)
        try:
            with _reload_on_sighup(state.repository):
                yield
        finally:
            SHUTDOWN_STARTED.remove(shutdown_started)
            CONNECTION_CLOSED.remove(connection_closed)
            if grpc_server is not None:  # refuse new RPCs; those running finish while the batchers still run
                await grpc_server.stop(state.settings.shutdown_timeout_s)
            state.stopping = True
            if loading is not None and not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            await state.repository.stop(state.settings.shutdown_timeout_s)
            app.state.plane.close()
            await asyncio.to_thread(app.state.tracing.shutdown)  # sends the spans still buffered
            if state.models is not None:
                log.info("drained the inference queue")

    return lifespan


#: What the API description adds: the error bodies, and the answers that come before any route.
API_ERRORS_DESCRIPTION = """
**Errors.** `/v1`, the health routes and the admin API answer `{"error": {"code", "message", "request_id", ...}}`;
`/v2` answers the Open Inference Protocol's `{"error": "message"}` (400 where `/v1` says 422). Every answer carries
`X-Request-ID`. Each operation lists exactly the statuses it answers, with these bodies.

**Before any route**, on any path, the server itself may answer:

- **431** `request_header_fields_too_large`: the request line and headers are larger than
  `MNIST_SERVE_MAX_HEADER_BYTES`; the connection is closed.
- **408** `request_timeout`: the headers (`MNIST_SERVE_HEADER_TIMEOUT_S`) or the body
  (`MNIST_SERVE_BODY_TIMEOUT_S`) took too long; the connection is closed.
- **413** `payload_too_large`: a body larger than `MNIST_SERVE_MAX_BODY_BYTES`, before it is read;
  **400** `bad_request`: a Content-Length that is not a number.
- **503** `too_many_bytes` with Retry-After: the worker already holds `MNIST_SERVE_MAX_INFLIGHT_BODY_BYTES` of
  request bodies.
- **404**, **405**: no such path, or not with that method.

431 and 408 carry the `/v1` error body (they are sent before the path is read); the others carry the body of the
path's API. Every limit, its setting and its answer: docs/limits.md. The same protocol as `/v2` is served over gRPC
on `MNIST_SERVE_GRPC_PORT` (docs/protocol.md).
"""


def _install_openapi(app: FastAPI, body_models: Sequence[type[BaseModel]]) -> None:
    """The OpenAPI document as the routes answer, built once:

    - the bodies the predict and /v2 inference routes read by hand (JSON or multipart) are registered;
    - FastAPI's 422 ``HTTPValidationError`` is dropped: it adds one to every route with parameters, but no route
      answers it (service.errors turns validation errors into the documented 422 or, on /v2, 400 bodies);
    - the description says what the server answers before any route (431, 408, the body limits).
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        description = f"{app.description}\n{API_ERRORS_DESCRIPTION}"
        schema = get_openapi(title=app.title, version=app.version, description=description, routes=app.routes)
        _, defs = models_json_schema(
            [(m, "validation") for m in body_models], ref_template="#/components/schemas/{model}"
        )
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(defs.get("$defs", {}))
        fastapi_422 = {"$ref": "#/components/schemas/HTTPValidationError"}
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                unprocessable = operation.get("responses", {}).get("422", {})
                if unprocessable.get("content", {}).get("application/json", {}).get("schema") == fastapi_422:
                    del operation["responses"]["422"]
        schemas.pop("HTTPValidationError", None)  # referenced by those 422s only
        schemas.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    settings: Settings | None = None,
    classifier: OnnxClassifier | None = None,
    *,
    loader: ModelLoader = default_loader,
    metrics: ServiceMetrics | None = None,
    tracing: Tracing | None = None,
) -> FastAPI:
    """The service as an ASGI app.

    ``classifier``: serve this (already loaded) model instead of loading the repository with ``loader`` at
    startup; reloads always use ``loader`` (by default: every model in ``settings.model_dir``). ``tracing``: spans
    go there (default: from the settings, off unless ``otlp_endpoint`` is set; see ``service.tracing``).
    """
    settings = settings if settings is not None else Settings()
    metrics = metrics if metrics is not None else ServiceMetrics()
    for reason in CLOSE_REASONS:  # every reason's series exists from the start, at 0
        metrics.connections_closed.labels(reason=reason)
    tracing = tracing if tracing is not None else tracing_from_settings(settings)
    app = FastAPI(
        title="mnist-serve",
        version=_version(),
        description=(
            "Handwritten-digit recognition: a CNN trained on MNIST, served with onnxruntime. "
            "Send 28×28 pixels or an image of any size; get the digit and all ten probabilities."
        ),
        lifespan=_lifespan(classifier),
        # Swagger UI and ReDoc from local files, not a CDN: install_docs below.
        docs_url=None,
        redoc_url=None,
        # FastAPI's own OpenTelemetry (0.165 on) stays off: the service traces through service.tracing (so a global
        # provider set by an agent never doubles the server spans), and its per-request check for a configured
        # provider costs about 7 µs.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )

    def runner_for(model: OnnxClassifier, model_metrics: ModelMetrics) -> InferenceRunner:
        return make_runner(settings, model, model_metrics, tracing)

    repository = ModelRepository(settings, metrics, loader, runner_for)
    state = ServiceState(settings=settings, metrics=metrics, repository=repository)
    app.state.service = state
    app.state.plane = DataPlane(state, decode_threads=decode_threads(settings), tracing=tracing)
    app.state.tracing = tracing
    register_error_handlers(app)
    app.include_router(health.router)
    app.include_router(predict.router)
    app.include_router(admin.router)
    app.include_router(v2.router)
    install_docs(app)

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=Response,
        summary="Prometheus metrics",
        operation_id="metrics",
        responses={
            200: {"description": "Prometheus' text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
        },
    )
    async def prometheus_metrics(state: StateDep) -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    _install_openapi(app, [PredictRequest, BatchRequest, InferRequest])
    routers = (health.router, predict.router, admin.router, v2.router)
    known_paths = {
        path
        for route in (*app.routes, *(r for router in routers for r in router.routes))
        if isinstance(path := getattr(route, "path", None), str)
    }
    # Hook for the web page: static files in service/web (or MNIST_SERVE_WEB_DIR), registered after the API
    # routes so that those always win.
    web_dir = settings.resolved_web_dir()
    if web_dir is not None:
        api = [route for route in app.router.routes if isinstance(route, BaseRoute)]
        app.router.routes.append(WebPage(StaticFiles(directory=web_dir, html=True), api))
    # Last added runs first: the metrics see every answer, including the body limit's early 413s.
    # Innermost: the JSON /v1/predict fast path, inside every limit, metric and log below.
    app.add_middleware(PredictFastPath, get_plane=lambda: app.state.plane)
    app.add_middleware(
        BodySizeLimit, max_body_bytes=settings.max_body_bytes, max_inflight_bytes=settings.max_inflight_body_bytes
    )
    app.add_middleware(RequestMetrics, metrics=metrics, known_paths=known_paths)
    # Outside every middleware that answers: each answer carries the request id and is logged (service.logs).
    app.add_middleware(RequestLog, known_paths=known_paths, enabled=settings.access_log, probes=settings.log_probes)
    tracing.install(app, known_paths)  # outermost: the server span covers everything, the log line gets its id
    return app


def app_from_env() -> FastAPI:
    """``uvicorn --factory service.main:app_from_env``: the app configured from the environment.

    Runs once in each server process (every uvicorn worker), before the model loads: the place for process-wide
    tuning that tests creating apps in-process should not get.
    """
    tune_malloc()
    return create_app(Settings())


def main(argv: Sequence[str] | None = None) -> int:
    """``mnist-serve``: see :func:`service.server.main` (kept here for ``python -m service.main``)."""
    from service.server import main as serve

    return serve(argv)


if __name__ == "__main__":
    raise SystemExit(main())
