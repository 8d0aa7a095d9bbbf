"""``POST /v1/admin/reload``: load the model repository again and swap it in without dropping a request.

    curl -X POST -H "X-API-Key: $MNIST_SERVE_API_KEY" http://127.0.0.1:8000/v1/admin/reload

The admin API needs the API key, and is refused (403) when no key is configured: an open reload endpoint would
let anyone make the service re-read its disk. ``kill -HUP <pid>`` does the same from the host.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from service.deps import StateDep, require_api_key
from service.errors import AdminDisabled, ReloadFailed
from service.model import ModelLoadError
from service.schemas import ModelRef, error_responses
from service.settings import SUPERVISOR_ENV


async def require_admin_key(state: StateDep) -> None:
    if state.settings.api_key is None:
        raise AdminDisabled()


router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin_key), Depends(require_api_key)],
)


class ReloadResponse(BaseModel):
    """The model set now serving."""

    models: list[ModelRef]
    """Every model version loaded, by name then version."""
    default: ModelRef
    """The model a request naming none gets."""
    seconds: Annotated[float, Field(ge=0)]
    """How long loading, swapping and draining took."""


@router.post(
    "/reload",
    response_model=ReloadResponse,
    summary="Reload the model repository",
    operation_id="reloadModels",
    responses=error_responses(401, 403, 500, 503, described={503: "shutting down, or no models are ready"}),
)
async def reload(state: StateDep) -> ReloadResponse:
    """Load every model in the model directory, verify and warm them up, swap the new set in, then drain the old
    set's batchers once the requests already using them are answered. On failure nothing changes and the answer
    says why (500 `reload_failed`)."""
    repository = state.repository
    supervisor = os.environ.get(SUPERVISOR_ENV)
    started = time.perf_counter()
    if supervisor:
        # Several workers: the supervisor passes SIGHUP to every one of them (this one included), and each reloads
        # its own models; this worker answers with the outcome of its own reload, the one after this call.
        before = repository.reloads_done
        os.kill(int(supervisor), signal.SIGHUP)
        try:
            await repository.wait_for_reload(before, state.settings.shutdown_timeout_s + 60)
        except TimeoutError:
            raise ReloadFailed("the reload did not finish in time; the previous models go on serving") from None
        if repository.last_reload_error is not None:
            raise ReloadFailed(f"reload failed, the previous models go on serving: {repository.last_reload_error}")
        models = state.ready_models()
    else:
        try:
            models = (await repository.reload()).models
        except ModelLoadError as exc:
            raise ReloadFailed(f"reload failed, the previous models go on serving: {exc}") from None
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            raise ReloadFailed(f"reload failed, the previous models go on serving: {message}") from None
    return ReloadResponse(
        models=[ModelRef(name=m.name, version=m.version) for m in models],
        default=ModelRef(name=models.default.name, version=models.default.version),
        seconds=round(time.perf_counter() - started, 4),
    )
