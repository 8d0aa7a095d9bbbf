"""What the routes receive: the per-app state (settings, model, runner, metrics) and the API-key check.

Nothing here is global: every object hangs off ``app.state.service``, put there by ``create_app``.
The dependencies are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency in its
thread pool, and three thread hops per request cost more than the model run itself.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.batching import InferenceRunner
from service.errors import ModelLoadFailed, ModelNotReady, Unauthorized
from service.metrics import ServiceMetrics
from service.model import OnnxClassifier
from service.settings import Settings


@dataclass
class ServiceState:
    """The app's collaborators and its readiness, in one place."""

    settings: Settings
    metrics: ServiceMetrics
    classifier: OnnxClassifier | None = None
    runner: InferenceRunner | None = None
    load_error: str | None = None
    stopping: bool = False

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, batcher running, not shutting down."""
        return (
            self.classifier is not None and self.classifier.warmed_up and self.runner is not None and not self.stopping
        )


@dataclass(frozen=True)
class ReadyModel:
    """A loaded classifier together with the runner that feeds it."""

    classifier: OnnxClassifier
    runner: InferenceRunner
    settings: Settings


async def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_ready_model(state: StateDep) -> ReadyModel:
    if state.load_error is not None:
        raise ModelLoadFailed(state.load_error)
    if not state.ready or state.classifier is None or state.runner is None:
        raise ModelNotReady()
    return ReadyModel(state.classifier, state.runner, state.settings)


ReadyModelDep = Annotated[ReadyModel, Depends(get_ready_model)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key, when one is set.")
_bearer = HTTPBearer(auto_error=False, description="The API key as a bearer token, when one is set.")


async def require_api_key(
    state: StateDep,
    api_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """When ``MNIST_SERVE_API_KEY`` is set, the request must present it (constant-time comparison)."""
    expected = state.settings.api_key
    if expected is None:
        return
    presented = api_key if api_key else (bearer.credentials if bearer is not None else None)
    if not presented or not hmac.compare_digest(presented.encode(), expected.get_secret_value().encode()):
        raise Unauthorized()
