"""Liveness, readiness and the model listing. None of these need the API key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import StateDep
from service.errors import ModelLoadFailed, ModelNotReady, error_response
from service.schemas import Health, ModelInfo, ModelRef, ModelsResponse, error_responses

router = APIRouter(tags=["health"])


@router.get(
    "/healthz", response_model=Health, response_model_exclude_none=True, operation_id="healthz", summary="Liveness"
)
async def healthz() -> Health:
    """Alive: the process answers. Whether the models serve is /readyz's question: a model that failed to load is
    not cured by restarting the process (fix the files and reload), so liveness never fails for it."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    response_model_exclude_none=True,
    operation_id="readyz",
    summary="Readiness",
    responses=error_responses(503, described={503: "not ready: loading, failed to load, or shutting down"}),
)
async def readyz(state: StateDep) -> Health | JSONResponse:
    """Ready: the model is loaded and warmed up and the batcher runs; else 503 with Retry-After."""
    if state.load_error is not None:
        return error_response(ModelLoadFailed(state.load_error))
    if not state.ready or state.classifier is None or state.draining:
        message = "shutting down" if state.stopping or state.draining else "the model is not loaded yet"
        return error_response(ModelNotReady(message))
    return Health(status="ready", model=ModelRef(name=state.classifier.name, version=state.classifier.version))


@router.get(
    "/v1/models", response_model=ModelsResponse, tags=["models"], operation_id="listModels", summary="List the models"
)
async def list_models(state: StateDep) -> ModelsResponse:
    """Every model version this instance serves: name, version, tensors, the test accuracy from the model card.

    The default model (the one a request naming no model gets) comes first, with `"default": true`; the others
    follow by name and version. Name one of them with `?model=&version=` on /v1/predict.
    """
    models = state.models
    last_error = state.repository.last_reload_error
    if models is None:
        return ModelsResponse(models=[], last_reload_error=last_error)
    ordered = [models.default, *(m for m in models if m is not models.default)]
    return ModelsResponse(
        models=[
            ModelInfo.model_validate({**m.classifier.describe(), "ready": state.ready, "default": m is models.default})
            for m in ordered
        ],
        problems=[str(p) for p in models.problems],
        last_reload_error=last_error,
    )
