"""What the routes receive: the per-app state (settings, model repository, metrics) and the API-key check.

Nothing here is global: every object hangs off ``app.state.service``, put there by ``create_app``.
The dependencies are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency in its
thread pool, and three thread hops per request cost more than the model run itself.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.batching import InferenceRunner
from service.errors import ModelLoadFailed, ModelNotReady, Unauthorized
from service.metrics import ServiceMetrics
from service.model import OnnxClassifier
from service.repository import ModelRepository, ModelSet
from service.settings import Settings


@dataclass
class ServiceState:
    """The app's collaborators and its readiness, in one place."""

    settings: Settings
    metrics: ServiceMetrics
    repository: ModelRepository
    stopping: bool = False

    @property
    def models(self) -> ModelSet | None:
        """The model set serving now (None until the first load succeeds)."""
        return self.repository.current

    @property
    def load_error(self) -> str | None:
        return self.repository.load_error

    @property
    def classifier(self) -> OnnxClassifier | None:
        """The default model."""
        return self.models.default.classifier if self.models is not None else None

    @property
    def runner(self) -> InferenceRunner | None:
        """The default model's runner."""
        return self.models.default.runner if self.models is not None else None

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, batchers running, not shutting down."""
        return self.models is not None and self.models.default.classifier.warmed_up and not self.stopping

    def ready_models(self) -> ModelSet:
        """The serving model set, or the 503 that says why there is none."""
        if self.load_error is not None:
            raise ModelLoadFailed(self.load_error)
        models = self.models
        if models is None or not self.ready:
            raise ModelNotReady("shutting down" if self.stopping else "the model is not loaded yet")
        return models


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


ModelQuery = Annotated[
    str | None, Query(alias="model", description="Serve with this model (default: the default model).")
]
VersionQuery = Annotated[str | None, Query(description="Serve with this version of it (default: its highest).")]


@dataclass
class ModelChoice:
    """The model a request names (``?model=&version=``, default: the default model), checked to be served."""

    state: ServiceState
    model: str | None
    version: str | None

    @property
    def settings(self) -> Settings:
        return self.state.settings

    @contextmanager
    def lease(self) -> Iterator[ReadyModel]:
        """The model, leased until the block ends: a reload drains its batcher only after the request is answered.

        Resolving and leasing happen without an ``await`` between them, so a reload's swap cannot slip in. Take the
        lease after the body is read: a slow upload must not hold up a reload.
        """
        models = self.state.ready_models()
        served = models.resolve(self.model, self.version)
        with models.lease():
            yield ReadyModel(served.classifier, served.runner, self.state.settings)


async def get_model_choice(state: StateDep, model: ModelQuery = None, version: VersionQuery = None) -> ModelChoice:
    """404 for a model or version not served, 503 before the models are ready: both before the body is read."""
    state.ready_models().resolve(model, version)
    return ModelChoice(state, model, version)


ModelChoiceDep = Annotated[ModelChoice, Depends(get_model_choice)]

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
