"""The app factory and the ``mnist-serve`` entry point.

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

import argparse
import asyncio
import contextlib
import glob
import importlib.metadata
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from types import FrameType
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from service.admission import QueueBudget, usable_cpus
from service.batching import LARGE_REQUEST_IMAGES, InferenceRunner, MicroBatcher, UnbatchedRunner
from service.core import DataPlane, ServiceState
from service.deps import StateDep
from service.docs import install_docs
from service.errors import register_error_handlers
from service.grpc_server import GrpcServer
from service.logs import RequestLog, RpcLog, log_config
from service.memory import tune_malloc
from service.metrics import ModelMetrics, ServiceMetrics
from service.middleware import BodySizeLimit, RequestMetrics
from service.model import (
    MAX_RUN_BATCH,
    FloatArray,
    LoadedModels,
    OnnxClassifier,
    load_repository,
    model_paths,
)
from service.repository import ModelLoader, ModelRepository
from service.routes import admin, health, predict, v2
from service.schemas import BatchRequest, PredictRequest
from service.settings import Settings, describe_settings
from service.tracing import NO_TRACING, Tracing
from service.tracing import from_settings as tracing_from_settings

log = logging.getLogger("service")


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
    try:
        yield
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGHUP)


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
        try:
            with _reload_on_sighup(state.repository):
                yield
        finally:
            if grpc_server is not None:  # refuse new RPCs; those running finish while the batchers still run
                await grpc_server.stop(state.settings.shutdown_timeout_s)
            state.stopping = True
            if loading is not None and not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            await state.repository.stop(state.settings.shutdown_timeout_s)
            await asyncio.to_thread(app.state.tracing.shutdown)  # sends the spans still buffered
            if state.models is not None:
                log.info("drained the inference queue")

    return lifespan


def _install_openapi(app: FastAPI, body_models: Sequence[type[BaseModel]]) -> None:
    """The predict routes read their bodies by hand (JSON or multipart); register those bodies' schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema(
            [(m, "validation") for m in body_models], ref_template="#/components/schemas/{model}"
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
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
    app.state.plane = DataPlane(state, tracing=tracing)
    app.state.tracing = tracing
    register_error_handlers(app)
    app.include_router(health.router)
    app.include_router(predict.router)
    app.include_router(admin.router)
    app.include_router(v2.router)
    install_docs(app)

    @app.get("/metrics", tags=["health"], response_class=Response, summary="Prometheus metrics")
    async def prometheus_metrics(state: StateDep) -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    _install_openapi(app, [PredictRequest, BatchRequest])
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
        app.mount("/", StaticFiles(directory=web_dir, html=True), name="web")
    # Last added runs first: the metrics see every answer, including the body limit's early 413s.
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
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


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def _exit_zero_on_stop_signals() -> None:
    """Make SIGTERM/SIGINT end the process with status 0 once uvicorn has shut down gracefully.

    uvicorn installs its own handlers while it serves (stop accepting, finish in-flight requests, run the lifespan
    shutdown that drains the batcher), then restores the previous handlers and re-raises the signal so the
    default action happens. The default for SIGTERM is death by signal (status -15), which process managers
    report as a crash; the shutdown was orderly, so the handler found then exits with 0.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)


def main(argv: Sequence[str] | None = None) -> int:
    """``mnist-serve``: serve the model over HTTP with uvicorn (settings from MNIST_SERVE_* variables)."""
    parser = argparse.ArgumentParser(
        prog="mnist-serve",
        description="Serve the MNIST digit classifier over HTTP. Configure it with environment variables:",
        epilog=describe_settings(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"mnist-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    model_dir = settings.resolved_model_dir()
    flat = model_paths(model_dir, settings.model_name)
    versioned = list(model_dir.glob(f"{glob.escape(settings.model_name)}/*/*.onnx"))
    if not versioned and not all(p.is_file() for p in flat):
        wanted = f"{flat[0]} + {flat[1].name}, or {model_dir / settings.model_name}/<version>/"
        print(f"mnist-serve: model files not found: {wanted} (see MNIST_SERVE_MODEL_DIR)", file=sys.stderr)
        return 2

    import uvicorn

    _exit_zero_on_stop_signals()
    level = "debug" if settings.log_level == "trace" else settings.log_level
    uvicorn.run(
        "service.main:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        log_config=log_config(level, settings.log_format),
        access_log=False,  # the request log (service.logs) replaces uvicorn's
        timeout_graceful_shutdown=int(max(1, round(settings.shutdown_timeout_s))),
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
