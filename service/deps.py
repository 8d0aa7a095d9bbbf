"""What the routes receive: the per-app state (settings, model repository, metrics), the data plane, the API-key check.

Nothing here is global: every object hangs off ``app.state.service`` and ``app.state.plane``, put there by
``create_app``.
The dependencies are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency in its
thread pool, and three thread hops per request cost more than the model run itself.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.core import DataPlane, ServiceState
from service.errors import Unauthorized
from service.settings import Settings


async def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_plane(request: Request) -> DataPlane:
    plane: DataPlane = request.app.state.plane
    return plane


PlaneDep = Annotated[DataPlane, Depends(get_plane)]

ModelQuery = Annotated[
    str | None, Query(alias="model", description="Serve with this model (default: the default model).")
]
VersionQuery = Annotated[str | None, Query(description="Serve with this version of it (default: its highest).")]


@dataclass(frozen=True)
class ModelChoice:
    """The model a request names (``?model=&version=``, default: the default model), checked to be served."""

    plane: DataPlane
    model: str | None
    version: str | None

    @property
    def settings(self) -> Settings:
        return self.plane.settings


async def get_model_choice(plane: PlaneDep, model: ModelQuery = None, version: VersionQuery = None) -> ModelChoice:
    """404 for a model or version not served, 503 before the models are ready: both before the body is read."""
    plane.resolve(model, version)
    return ModelChoice(plane, model, version)


ModelChoiceDep = Annotated[ModelChoice, Depends(get_model_choice)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key, when one is set.")
_bearer = HTTPBearer(auto_error=False, description="The API key as a bearer token, when one is set.")


async def require_api_key(
    state: StateDep,
    api_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """When ``MNIST_SERVE_API_KEY`` is set, the request must present it (constant-time comparison)."""
    check_api_key(state.settings.api_key, api_key or (bearer.credentials if bearer is not None else None))


def check_api_key(expected: SecretStr | None, presented: str | None) -> None:
    """:class:`Unauthorized` unless no key is configured or ``presented`` is it (constant-time comparison)."""
    if expected is None:
        return
    if not presented or not hmac.compare_digest(presented.encode(), expected.get_secret_value().encode()):
        raise Unauthorized()
