"""The Open Inference Protocol (KServe v2) over HTTP/REST, beside /v1, on the same models and batchers.

    GET  /v2                                               server metadata (name, version, extensions)
    GET  /v2/health/live, /v2/health/ready                 200, or 400 when not ready (empty bodies)
    GET  /v2/models/{name}[/versions/{version}]            model metadata: versions, platform, tensors
    GET  /v2/models/{name}[/versions/{version}]/ready      200, or 400 when not ready
    GET  /v2/models/{name}[/versions/{version}]/config     Triton's model configuration extension
    POST /v2/models/{name}[/versions/{version}]/infer      inference (JSON tensors or binary tensor data)
    POST /v2/repository/index                              every model version served (Triton's repository index)

Errors are the protocol's ``{"error": "message"}``: 400 bad request, 401 missing API key (inference only, when
one is configured), 404 unknown model or version, 413 too large, 503 not ready or overloaded (see
``service.errors``). The tensors are described in ``service.protocol``; tritonclient works with its defaults. The same
protocol over gRPC is :mod:`service.grpc_server`; both call the checks of ``service.protocol`` and the data plane.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from pydantic import BaseModel

from service import protocol
from service.admission import JsonBudget
from service.body import read_body
from service.core import DataPlane, request_info
from service.deps import PlaneDep, StateDep, require_api_key
from service.protocol import HEADER_LENGTH, OFF_LOOP_BYTES, encode_infer_response, parse_infer_request


class ProtocolError(BaseModel):
    """The protocol's error body."""

    error: str


def _protocol_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    meaning = {
        400: "Bad request, or not ready (health and readiness answer 400 with an empty body)",
        401: "Missing or wrong API key",
        404: "Model or version not served",
        413: "Body or batch too large",
        415: "Unsupported content type",
        503: "Overloaded or not ready",
    }
    return {code: {"model": ProtocolError, "description": meaning[code]} for code in codes}


router = APIRouter(
    prefix="/v2", tags=["open inference protocol (v2)"], responses=_protocol_errors(400, 401, 404, 413, 415, 503)
)

NamePath = Annotated[str, Path(description="Model name, as its card says (GET /v1/models lists them).")]
VersionPath = Annotated[str, Path(description="Model version, as its card says.")]


def _empty(status: int) -> Response:
    return Response(status_code=status)


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return protocol.server_metadata(request.app.version)


@router.get("/health/live", summary="Server live", response_class=Response)
async def server_live() -> Response:
    """200 while the process answers (the model may still be loading)."""
    return _empty(200)


@router.get("/health/ready", summary="Server ready", response_class=Response)
async def server_ready(state: StateDep) -> Response:
    """200 when every model is loaded, warmed up and its batcher runs; else 400, as the protocol says."""
    return _empty(200 if state.ready and not state.draining else 400)


def _model_ready(state: StateDep, name: str, version: str | None) -> Response:
    models = state.models
    if models is None or not state.ready:
        return _empty(400)
    models.resolve(name, version)  # 404 for a model or version not served
    return _empty(200)


@router.get("/models/{name}/ready", summary="Model ready", response_class=Response)
async def model_ready(state: StateDep, name: NamePath) -> Response:
    return _model_ready(state, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model version ready", response_class=Response)
async def model_version_ready(state: StateDep, name: NamePath, version: VersionPath) -> Response:
    return _model_ready(state, name, version)


@router.get("/models/{name}", summary="Model metadata")
async def model_metadata(state: StateDep, name: NamePath) -> dict[str, Any]:
    models = state.ready_models()
    return protocol.model_metadata(models, models.resolve(name, None))


@router.get("/models/{name}/versions/{version}", summary="Model version metadata")
async def model_version_metadata(state: StateDep, name: NamePath, version: VersionPath) -> dict[str, Any]:
    models = state.ready_models()
    return protocol.model_metadata(models, models.resolve(name, version))


@router.get("/models/{name}/config", summary="Model configuration (Triton extension)")
async def model_config(state: StateDep, name: NamePath) -> dict[str, Any]:
    return protocol.model_config(state, state.ready_models().resolve(name, None))


@router.get("/models/{name}/versions/{version}/config", summary="Model version configuration (Triton extension)")
async def model_version_config(state: StateDep, name: NamePath, version: VersionPath) -> dict[str, Any]:
    return protocol.model_config(state, state.ready_models().resolve(name, version))


@router.post("/repository/index", summary="Repository index (Triton extension)")
async def repository_index(state: StateDep) -> list[dict[str, str]]:
    """Every model version served, each READY (the repository is loaded whole or not at all)."""
    return protocol.repository_index(state)


async def _infer(request: Request, plane: DataPlane, name: str, version: str | None) -> Response:
    served = plane.resolve(name, version)  # 404 / 503 before the body is read
    max_images = plane.settings.max_batch_items
    with plane.tracing.span("decode"):
        body = await read_body(request, _json_budget(request, max_images))
        parse = functools.partial(
            parse_infer_request,
            body,
            request.headers.get(HEADER_LENGTH),
            input_name=served.classifier.input.name,
            max_images=max_images,
        )
        parsed = await asyncio.to_thread(parse) if len(body) >= OFF_LOOP_BYTES else parse()
        del body
    answer = await plane.infer(name, version, parsed.images, request_info(request.scope))
    content, headers = encode_infer_response(answer, parsed.id, parsed.outputs)
    media_type = headers.pop("content-type")
    return Response(content, media_type=media_type, headers=headers)


def _json_budget(request: Request, max_images: int) -> JsonBudget:
    """The structure budget, counted as the body arrives: on the whole body, or on the JSON header before the
    binary tensors when Inference-Header-Content-Length says where it ends."""
    budget = JsonBudget.for_tensor(max_images)
    header_length = request.headers.get(HEADER_LENGTH)
    if header_length is not None and header_length.isdigit():
        budget.only_first = int(header_length)
    return budget


_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object"},
                "example": {
                    "id": "42",
                    "inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784}],
                    "outputs": [{"name": "probabilities"}, {"name": "digit"}],
                },
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"JSON header then binary tensors; {HEADER_LENGTH} gives the JSON's length.",
            },
        },
    }
}


@router.post(
    "/models/{name}/infer",
    summary="Inference",
    response_class=Response,
    dependencies=[Depends(require_api_key)],
    openapi_extra=_INFER_DOC,
)
async def infer(request: Request, plane: PlaneDep, name: NamePath) -> Response:
    return await _infer(request, plane, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference with a model version",
    response_class=Response,
    dependencies=[Depends(require_api_key)],
    openapi_extra=_INFER_DOC,
)
async def infer_version(request: Request, plane: PlaneDep, name: NamePath, version: VersionPath) -> Response:
    return await _infer(request, plane, name, version)
