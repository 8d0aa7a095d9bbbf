"""The app factory and the ``mnist-serve`` entry point.

    mnist-serve                                   # serve models/mnist-cnn.onnx on 127.0.0.1:8000
    MNIST_SERVE_PORT=9000 MNIST_SERVE_BATCHING=false mnist-serve
    mnist-serve --help                            # every MNIST_SERVE_* setting
    python -m service                             # the same without the console script

``create_app`` receives its collaborators (settings, optionally an already-loaded classifier, a loader, a
metrics object) and keeps them on ``app.state.service``; nothing is global and nothing happens at import.
Startup loads and warms the model in the background (``/healthz`` answers at once, ``/readyz`` turns 200 when
the model can serve); shutdown stops admitting requests and drains the batcher so every admitted request is
answered before the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import importlib.metadata
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from types import FrameType
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from service.batching import InferenceRunner, MicroBatcher, UnbatchedRunner
from service.deps import ServiceState, StateDep
from service.errors import register_error_handlers
from service.metrics import ServiceMetrics
from service.middleware import BodySizeLimit, RequestMetrics
from service.model import ModelLoadError, OnnxClassifier, load_model, model_paths
from service.routes import health, predict
from service.schemas import BatchRequest, PredictRequest
from service.settings import Settings, describe_settings

log = logging.getLogger("service")

ModelLoader = Callable[[Settings], OnnxClassifier]


def default_loader(settings: Settings) -> OnnxClassifier:
    """Load, verify and warm up the model named by the settings."""
    return load_model(
        settings.resolved_model_dir(),
        settings.model_name,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
    )


def make_runner(settings: Settings, classifier: OnnxClassifier, metrics: ServiceMetrics) -> InferenceRunner:
    """The micro-batcher, or the one-request-per-run runner when batching is off."""
    if settings.batching:
        return MicroBatcher(
            classifier.predict,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            queue_size=settings.queue_size,
            metrics=metrics,
        )
    return UnbatchedRunner(classifier.predict, queue_size=settings.queue_size, metrics=metrics)


def _version() -> str:
    try:
        return importlib.metadata.version("mnist-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


async def _bring_up(state: ServiceState, classifier: OnnxClassifier | None, loader: ModelLoader) -> None:
    settings = state.settings
    try:
        if classifier is None:
            classifier = await asyncio.to_thread(loader, settings)
        if not classifier.warmed_up:
            await asyncio.to_thread(classifier.warm_up)
        runner = make_runner(settings, classifier, state.metrics)
        await runner.start()
    except ModelLoadError as exc:
        state.load_error = str(exc)
        log.error("cannot serve: %s", exc)
        return
    except Exception as exc:
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.exception("cannot serve: model start-up failed")
        return
    state.runner = runner
    state.classifier = classifier
    state.metrics.set_model({"name": classifier.name, "version": classifier.version, "sha256": classifier.sha256})
    mode = (
        f"micro-batching (max {settings.max_batch_size} images, {settings.max_wait_ms:g} ms)"
        if settings.batching
        else "no batching"
    )
    log.info("serving %s %s with %s", classifier.name, classifier.version, mode)


def _lifespan(
    classifier: OnnxClassifier | None, loader: ModelLoader
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: ServiceState = app.state.service
        # An injected, already-warm classifier is ready before the first request; loading from disk happens in
        # the background so that liveness answers while the model loads.
        if classifier is not None and classifier.warmed_up:
            await _bring_up(state, classifier, loader)
            loading: asyncio.Task[None] | None = None
        else:
            loading = asyncio.create_task(_bring_up(state, classifier, loader), name="mnist-model-load")
        try:
            yield
        finally:
            state.stopping = True
            if loading is not None and not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            if state.runner is not None:
                await state.runner.stop(state.settings.shutdown_timeout_s)
                log.info("drained the inference queue")
            state.metrics.model_ready.set(0)

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
) -> FastAPI:
    """The service as an ASGI app.

    ``classifier``: serve this (already loaded) model instead of loading one with ``loader`` at startup.
    """
    settings = settings if settings is not None else Settings()
    metrics = metrics if metrics is not None else ServiceMetrics()
    app = FastAPI(
        title="mnist-serve",
        version=_version(),
        description=(
            "Handwritten-digit recognition: a CNN trained on MNIST, served with onnxruntime. "
            "Send 28×28 pixels or an image of any size; get the digit and all ten probabilities."
        ),
        lifespan=_lifespan(classifier, loader),
    )
    app.state.service = ServiceState(settings=settings, metrics=metrics)
    register_error_handlers(app)
    app.include_router(health.router)
    app.include_router(predict.router)

    @app.get("/metrics", tags=["health"], response_class=Response, summary="Prometheus metrics")
    async def prometheus_metrics(state: StateDep) -> Response:
        if state.runner is not None:
            state.metrics.queue_depth.set(state.runner.queue_depth)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    _install_openapi(app, [PredictRequest, BatchRequest])
    known_paths = {
        path
        for route in (*app.routes, *health.router.routes, *predict.router.routes)
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
    return app


def app_from_env() -> FastAPI:
    """``uvicorn --factory service.main:app_from_env``: the app configured from the environment."""
    return create_app(Settings())


def _log_config(level: str) -> dict[str, Any]:
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["service"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


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
    onnx_path, card_path = model_paths(settings.resolved_model_dir(), settings.model_name)
    missing = [str(p) for p in (onnx_path, card_path) if not p.is_file()]
    if missing:
        print(f"mnist-serve: model files not found: {', '.join(missing)} (see MNIST_SERVE_MODEL_DIR)", file=sys.stderr)
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
        log_config=_log_config(level),
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(max(1, round(settings.shutdown_timeout_s))),
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
