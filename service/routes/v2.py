"""The Open Inference Protocol (KServe v2) over HTTP/REST, beside /v1, on the same models and batchers.

    GET  /v2                                               server metadata (name, version, extensions)
    GET  /v2/health/live, /v2/health/ready                 200, or 400 when not ready (empty bodies)
    GET  /v2/models/{name}[/versions/{version}]            model metadata: versions, platform, tensors
    GET  /v2/models/{name}[/versions/{version}]/ready      200, or 400 when not ready
    GET  /v2/models/{name}[/versions/{version}]/config     Triton's model configuration extension
    POST /v2/models/{name}[/versions/{version}]/infer      inference (JSON tensors or binary tensor data)
    POST /v2/repository/index                              every model version served (Triton's repository index)

Errors are the protocol's ``{"error": "message"}``: 400 bad request, 401 missing API key (inference only, when
one is configured), 404 unknown model or version, 413 too large, 415 a compressed body, 503 not ready or overloaded
(see ``service.errors``); each route documents exactly the ones it answers, with the bodies of ``service.schemas``.
The tensors are described in ``service.protocol``; tritonclient works with its defaults. The same protocol over
gRPC is :mod:`service.grpc_server`; both call the checks of ``service.protocol`` and the data plane.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from service import protocol
from service.admission import JsonBudget
from service.body import read_body
from service.core import DataPlane, request_info
from service.deps import PlaneDep, StateDep, require_api_key
from service.protocol import HEADER_LENGTH, OFF_LOOP_BYTES, encode_infer_response, parse_infer_request
from service.schemas import (
    InferResponse,
    ModelConfig,
    ModelMetadata,
    RepositoryModel,
    ServerMetadata,
    protocol_responses,
)

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])

NamePath = Annotated[
    str, Path(description="Model name, as its card says (GET /v1/models lists them).", examples=["mnist-cnn"])
]
VersionPath = Annotated[str, Path(description="Model version, as its card says.", examples=["1.2.0"])]


def _empty(status: int) -> Response:
    return Response(status_code=status)


#: The health and readiness answers: empty bodies, as the protocol says.
_EMPTY_OK: dict[int | str, dict[str, Any]] = {200: {"description": "Yes (an empty body)"}}
_NOT_READY: dict[int | str, dict[str, Any]] = {400: {"description": "Not ready (an empty body)"}}


def _ok(body: Any) -> dict[int | str, dict[str, Any]]:
    """``body`` documented as the 200 answer. The routes set ``response_model=None``: service.protocol builds the
    answer (the same one gRPC sends), and it goes out as built, not re-validated."""
    return {200: {"model": body, "description": "Successful Response"}}


#: Metadata and configuration answer only once the models are loaded.
_MODEL_ERRORS = protocol_responses(404, 503, described={503: "not ready: loading, failed to load, or shutting down"})


@router.get(
    "",
    summary="Server metadata",
    operation_id="v2ServerMetadata",
    response_model=None,
    responses=_ok(ServerMetadata),
)
async def server_metadata(request: Request) -> dict[str, Any]:
    return protocol.server_metadata(request.app.version)


@router.get(
    "/health/live", summary="Server live", operation_id="v2ServerLive", response_class=Response, responses=_EMPTY_OK
)
async def server_live() -> Response:
    """200 while the process answers (the model may still be loading)."""
    return _empty(200)


@router.get(
    "/health/ready",
    summary="Server ready",
    operation_id="v2ServerReady",
    response_class=Response,
    responses={**_EMPTY_OK, **_NOT_READY},
)
async def server_ready(state: StateDep) -> Response:
    """200 when every model is loaded, warmed up and its batcher runs; else 400, as the protocol says."""
    return _empty(200 if state.ready and not state.draining else 400)


def _model_ready(state: StateDep, name: str, version: str | None) -> Response:
    models = state.models
    if models is None or not state.ready:
        return _empty(400)
    models.resolve(name, version)  # 404 for a model or version not served
    return _empty(200)


_MODEL_READY = {**_EMPTY_OK, **_NOT_READY, **protocol_responses(404)}


@router.get(
    "/models/{name}/ready",
    summary="Model ready",
    operation_id="v2ModelReady",
    response_class=Response,
    responses=_MODEL_READY,
)
async def model_ready(state: StateDep, name: NamePath) -> Response:
    return _model_ready(state, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Model version ready",
    operation_id="v2ModelVersionReady",
    response_class=Response,
    responses=_MODEL_READY,
)
async def model_version_ready(state: StateDep, name: NamePath, version: VersionPath) -> Response:
    return _model_ready(state, name, version)


@router.get(
    "/models/{name}",
    summary="Model metadata",
    operation_id="v2ModelMetadata",
    response_model=None,
    responses={**_ok(ModelMetadata), **_MODEL_ERRORS},
)
async def model_metadata(state: StateDep, name: NamePath) -> dict[str, Any]:
    models = state.ready_models()
    return protocol.model_metadata(models, models.resolve(name, None))


@router.get(
    "/models/{name}/versions/{version}",
    summary="Model version metadata",
    operation_id="v2ModelVersionMetadata",
    response_model=None,
    responses={**_ok(ModelMetadata), **_MODEL_ERRORS},
)
async def model_version_metadata(state: StateDep, name: NamePath, version: VersionPath) -> dict[str, Any]:
    models = state.ready_models()
    return protocol.model_metadata(models, models.resolve(name, version))


@router.get(
    "/models/{name}/config",
    summary="Model configuration (Triton extension)",
    operation_id="v2ModelConfig",
    response_model=None,
    responses={**_ok(ModelConfig), **_MODEL_ERRORS},
)
async def model_config(state: StateDep, name: NamePath) -> dict[str, Any]:
    return protocol.model_config(state, state.ready_models().resolve(name, None))


@router.get(
    "/models/{name}/versions/{version}/config",
    summary="Model version configuration (Triton extension)",
    operation_id="v2ModelVersionConfig",
    response_model=None,
    responses={**_ok(ModelConfig), **_MODEL_ERRORS},
)
async def model_version_config(state: StateDep, name: NamePath, version: VersionPath) -> dict[str, Any]:
    return protocol.model_config(state, state.ready_models().resolve(name, version))


@router.post(
    "/repository/index",
    summary="Repository index (Triton extension)",
    operation_id="v2RepositoryIndex",
    response_model=None,
    responses=_ok(list[RepositoryModel]),
)
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
        parsed = await plane.decode(parse) if len(body) >= OFF_LOOP_BYTES else parse()
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
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "description": "With binary tensors after the JSON (application/octet-stream): the JSON's length in bytes.",
            "schema": {"type": "integer", "minimum": 0},
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/InferRequest"},
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
    },
}


_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferResponse,
        "description": "The outputs asked for (default: all three); binary outputs follow the JSON",
        "content": {
            "application/json": {},  # InferResponse, filled in by FastAPI
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"When an output is asked for as binary data: the JSON, then the bytes of each output "
                f"in order; {HEADER_LENGTH} gives the JSON's length.",
            },
        },
        "headers": {
            HEADER_LENGTH: {
                "description": "Only with binary outputs: the length of the JSON before them.",
                "schema": {"type": "integer"},
            }
        },
    },
    **protocol_responses(400, 401, 404, 413, 415, 503),
}


@router.post(
    "/models/{name}/infer",
    summary="Inference",
    operation_id="v2ModelInfer",
    response_class=Response,
    dependencies=[Depends(require_api_key)],
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_DOC,
)
async def infer(request: Request, plane: PlaneDep, name: NamePath) -> Response:
    return await _infer(request, plane, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference with a model version",
    operation_id="v2ModelVersionInfer",
    response_class=Response,
    dependencies=[Depends(require_api_key)],
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_DOC,
)
async def infer_version(request: Request, plane: PlaneDep, name: NamePath, version: VersionPath) -> Response:
    return await _infer(request, plane, name, version)
