"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``, beside the REST routes.

    MNIST_SERVE_GRPC_PORT=8081 mnist-serve        # the default port; 0 turns gRPC off (host: MNIST_SERVE_HOST)
    python examples/triton_client.py --protocol grpc --url 127.0.0.1:8081

A thin adapter over the data plane (:class:`~service.core.DataPlane`): the same models, batchers, admission,
verdicts and per-model metrics as /v1 and /v2 over REST, and the same tensor checks (:mod:`service.protocol`).
It serves KServe's RPCs (service/proto/grpc_predict_v2.proto: ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata, ModelInfer) and two of Triton's (ModelConfig, RepositoryIndex; service/proto/triton_extensions.proto),
so that ``tritonclient.grpc`` works unchanged. Inputs come as ``raw_input_contents`` (little-endian, what
tritonclient sends) or typed ``fp32_contents``; outputs go out as Triton answers them, in ``raw_output_contents``
(BYTES as a 4-byte little-endian length, then the bytes, per element).

Errors are gRPC status codes, from the domain errors of :mod:`service.errors` in one table (:data:`STATUS_CODES`):
INVALID_ARGUMENT for bad input, UNAUTHENTICATED without the API key (ModelInfer only, as in REST), NOT_FOUND for a
model or version not served, UNAVAILABLE while loading or stopping and when the queue is full (Triton's choice too;
a ``retry-after`` trailer says when to retry), RESOURCE_EXHAUSTED for too many images (grpc itself answers it for a
message over the size limit, and for an RPC over the concurrency cap), INTERNAL for a fault of ours.

Costs are bounded at the door: a message may be at most what ``MNIST_SERVE_MAX_BATCH_ITEMS`` images take (and never
more than ``MNIST_SERVE_MAX_BODY_BYTES``), refused by grpc before it is buffered whole; at most
``MNIST_SERVE_GRPC_MAX_CONCURRENT_RPCS`` RPCs run at once per worker; idle connections are closed and live ones
pinged. Every worker of a multi-process server binds the same port (SO_REUSEPORT, which grpc sets on Linux); the
kernel spreads connections across them.

:class:`RpcObserver` is the one place every RPC passes: it turns errors into status codes, counts the RPC in
``mnist_serve_requests_total{route="/inference.GRPCInferenceService/ModelInfer", method="GRPC", status="OK"}`` and
its duration, and hands an :class:`RpcRecord` (what the request log needs) to ``on_rpc`` when one is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from service import protocol
from service.core import Answer, DataPlane, RequestInfo, ServiceState
from service.deps import check_api_key
from service.errors import ServiceError
from service.grpc_gen import grpc_predict_v2_pb2 as pb
from service.grpc_gen import grpc_predict_v2_pb2_grpc as pb_grpc
from service.grpc_gen import triton_extensions_pb2 as triton
from service.metrics import ServiceMetrics
from service.protocol import InferRequest, ProtocolError
from service.settings import Settings

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
#: The ``method`` label of the request metrics for an RPC (the ``route`` is the RPC's full name).
METRICS_METHOD = "GRPC"
#: What a message may carry besides the pixels of the most images a request may hold (names, shape, id, framing).
MESSAGE_SLACK_BYTES = 64 * 1024

#: A domain error's HTTP status → the gRPC status code it is answered with (anything else: INTERNAL).
STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}


def status_code(error: ServiceError) -> grpc.StatusCode:
    return STATUS_CODES.get(error.status_code, grpc.StatusCode.INTERNAL)


# --- the seam for metrics and the request log -------------------------------------------------------------------


@dataclass
class RpcRecord:
    """One RPC as the request log sees it, complete once the RPC is answered."""

    method: str
    """The RPC's full name, e.g. ``/inference.GRPCInferenceService/ModelInfer``."""
    peer: str
    """The client's address as grpc gives it, e.g. ``ipv4:127.0.0.1:50312``."""
    metadata: Mapping[str, str]
    """The call's metadata (keys lower case; binary ``-bin`` entries and the API key left out)."""
    request_id: str | None = None
    """The ``x-request-id`` metadata as the client sent it (unchecked), else None: as HTTP's X-Request-ID."""
    inference_id: str | None = None
    """ModelInfer's own ``id`` (the protocol's, echoed in its answer) when the client set one."""
    info: RequestInfo = field(default_factory=RequestInfo)
    """Model, version and images, filled by the data plane for ModelInfer once the model is resolved."""
    code: str = "OK"
    """The gRPC status code's name."""
    message: str = ""
    """The error details sent to the client (empty when OK)."""
    seconds: float = 0.0
    """From the start of the handler (the request message received) to its answer."""


RpcHook = Callable[[RpcRecord], None]
_current: ContextVar[RpcRecord | None] = ContextVar("mnist_serve_rpc", default=None)
#: Metadata not copied into an RpcRecord: secrets.
_SECRET_METADATA = frozenset({"authorization", "x-api-key"})


def current_rpc() -> RpcRecord | None:
    """The record of the RPC being handled in this task (None outside one)."""
    return _current.get()


@dataclass(frozen=True)
class _Undecodable:
    """A request message that is not valid protobuf: answered INVALID_ARGUMENT by the handler, not by grpc."""

    reason: str


class RpcObserver(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every RPC through one place: errors → status codes, metrics, and the record handed to ``on_rpc``."""

    def __init__(self, metrics: ServiceMetrics, on_rpc: RpcHook | None = None) -> None:
        self.metrics = metrics
        self.on_rpc = on_rpc

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # an unknown method: grpc answers UNIMPLEMENTED
        return grpc.unary_unary_rpc_method_handler(
            self._observed(str(details.method), handler.unary_unary),
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _observed(
        self, method: str, behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            metadata = _metadata(context.invocation_metadata())
            record = RpcRecord(method=method, peer=str(context.peer()), metadata=metadata)
            record.request_id = metadata.get("x-request-id")
            token = _current.set(record)
            try:
                if isinstance(request, _Undecodable):
                    raise ProtocolError(f"the request is not a valid protobuf message: {request.reason}")
                return await behavior(request, context)
            except ServiceError as error:
                code = status_code(error)
                record.code, record.message = code.name, error.message
                retry = error.headers.get("Retry-After")
                await context.abort(code, error.message, trailing_metadata=(("retry-after", retry),) if retry else ())
            except asyncio.CancelledError:
                record.code, record.message = grpc.StatusCode.CANCELLED.name, "cancelled"
                raise
            except grpc.aio.AbortError:
                raise  # aborted by a handler itself: already answered
            except Exception:
                log.exception("unhandled error in %s", method)
                record.code, record.message = grpc.StatusCode.INTERNAL.name, "internal server error"
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
            finally:
                _current.reset(token)
                record.seconds = time.perf_counter() - start
                self.metrics.observe_request(method, METRICS_METHOD, record.code, record.seconds)
                if self.on_rpc is not None:
                    try:
                        self.on_rpc(record)
                    except Exception:
                        log.exception("the RPC hook failed")

        return observed


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def lenient(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:
            return _Undecodable(str(exc) or type(exc).__name__)

    return lenient


def _metadata(pairs: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in pairs or ():
        if isinstance(value, str) and key not in _SECRET_METADATA:
            out.setdefault(key, value)
    return out


def presented_key(pairs: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The API key a call presents: ``x-api-key`` metadata, else ``authorization: Bearer <key>``."""
    bearer = None
    for key, value in pairs or ():
        if not isinstance(value, str):
            continue
        if key == "x-api-key":
            return value
        if key == "authorization" and bearer is None:
            scheme, _, credentials = value.partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                bearer = credentials.strip()
    return bearer


# --- tensors ------------------------------------------------------------------------------------------------


def _parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in parameters.items():
        choice = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, choice) if choice else None
    return out


def tensor_bytes(request: pb.ModelInferRequest) -> int:
    """Bytes of input values a request carries (raw or typed), to decide where to decode it."""
    raw = sum(len(b) for b in request.raw_input_contents)
    return raw + 4 * sum(len(t.contents.fp32_contents) for t in request.inputs)


def parse_infer_request(request: pb.ModelInferRequest, *, input_name: str, max_images: int) -> InferRequest:
    """The images and requested outputs of a ModelInferRequest, through the checks REST uses too."""
    protocol.check_input_count(len(request.inputs), input_name)
    tensor = request.inputs[0]
    shape = protocol.check_input(
        tensor.name,
        tensor.datatype,
        list(tensor.shape),
        _parameters(tensor.parameters),
        input_name=input_name,
        max_images=max_images,
    )
    count = math.prod(shape)
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1:
            raise ProtocolError(f"raw_input_contents has {len(raw)} entries but the request has one input")
        if tensor.HasField("contents"):
            raise ProtocolError(f"input {input_name!r} has both contents and raw_input_contents")
        values = protocol.fp32_from_bytes(raw[0], count, "raw_input_contents[0]")
        what = "raw_input_contents[0]"
    else:
        typed = [f.name for f, _ in tensor.contents.ListFields() if f.name != "fp32_contents"]
        if typed:
            raise ProtocolError(f"an FP32 input's values go in fp32_contents (or raw_input_contents), not {typed[0]}")
        contents = tensor.contents.fp32_contents
        if len(contents) != count:
            raise ProtocolError(
                f"input {input_name!r} has {len(contents)} values in fp32_contents, its shape needs {count}"
            )
        values = np.array(contents, dtype=np.float32)
        what = "fp32_contents"
    images = protocol.to_images(values, shape, what)
    outputs = tuple(
        protocol.requested_output(o.name, _parameters(o.parameters), binary=True) for o in request.outputs
    ) or protocol.every_output(binary=True)
    return InferRequest(id=request.id or None, images=images, outputs=outputs)


def encode_infer_response(
    answer: Answer, request_id: str | None, outputs: Iterable[protocol.RequestedOutput]
) -> pb.ModelInferResponse:
    """A ModelInferResponse as Triton answers: each output's values in ``raw_output_contents``."""
    response = pb.ModelInferResponse(model_name=answer.name, model_version=answer.version, id=request_id or "")
    for output in outputs:
        response.outputs.add(
            name=output.name,
            datatype=protocol.OUTPUTS[output.name][0],
            shape=protocol.output_shape(answer, output.name),
        )
        response.raw_output_contents.append(protocol.output_tensor(answer, output.name))
    return response


# --- the service ------------------------------------------------------------------------------------------------


def _model_name(name: str) -> str:
    if not name:
        raise ProtocolError("the request names no model")
    return name


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the data plane. Errors are raised as domain errors (RpcObserver)."""

    def __init__(self, plane: DataPlane, server_version: str) -> None:
        self.plane = plane
        self.server_version = server_version

    @property
    def state(self) -> ServiceState:
        return self.plane.state

    @property
    def settings(self) -> Settings:
        return self.plane.settings

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.state.ready and not self.state.draining)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Ready or not, never an error: a model or version not served is not ready (as Triton answers)."""
        models = self.state.models
        ready = False
        if models is not None and self.state.ready and request.name:
            with contextlib.suppress(ServiceError):
                models.resolve(request.name, request.version or None)
                ready = True
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return json_format.ParseDict(protocol.server_metadata(self.server_version), pb.ServerMetadataResponse())

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        models = self.state.ready_models()
        served = models.resolve(_model_name(request.name), request.version or None)
        return json_format.ParseDict(protocol.model_metadata(models, served), pb.ModelMetadataResponse())

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        served = self.state.ready_models().resolve(_model_name(request.name), request.version or None)
        config = json_format.ParseDict(protocol.model_config(self.state, served), triton.ModelConfig())
        return triton.ModelConfigResponse(config=config)

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        models = protocol.repository_index(self.state, ready_only=request.ready)
        return json_format.ParseDict({"models": models}, triton.RepositoryIndexResponse())

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        record = current_rpc()
        check_api_key(self.settings.api_key, presented_key(context.invocation_metadata()))
        if record is not None and request.id:
            record.inference_id = request.id
        name, version = _model_name(request.model_name), request.model_version or None
        served = self.plane.resolve(name, version)  # NOT_FOUND / UNAVAILABLE before the tensor is decoded
        parse = functools.partial(
            parse_infer_request,
            request,
            input_name=served.classifier.input.name,
            max_images=self.settings.max_batch_items,
        )
        parsed = await asyncio.to_thread(parse) if tensor_bytes(request) >= protocol.OFF_LOOP_BYTES else parse()
        answer = await self.plane.infer(name, version, parsed.images, record.info if record is not None else None)
        return encode_infer_response(answer, parsed.id, parsed.outputs)


def _triton_handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """Triton's ModelConfig and RepositoryIndex, served under Triton's method names beside KServe's RPCs."""
    handlers = {
        "ModelConfig": grpc.unary_unary_rpc_method_handler(
            servicer.ModelConfig,
            request_deserializer=triton.ModelConfigRequest.FromString,
            response_serializer=triton.ModelConfigResponse.SerializeToString,
        ),
        "RepositoryIndex": grpc.unary_unary_rpc_method_handler(
            servicer.RepositoryIndex,
            request_deserializer=triton.RepositoryIndexRequest.FromString,
            response_serializer=triton.RepositoryIndexResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


# --- the server ---------------------------------------------------------------------------------------------


def max_message_bytes(settings: Settings) -> int:
    """The largest request message: what the most images one request may carry take, within the body limit."""
    tensor = settings.max_batch_items * protocol.PIXELS * 4
    return min(settings.max_body_bytes, tensor + MESSAGE_SLACK_BYTES)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        # Every worker process binds the same port; the kernel spreads new connections across them.
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", max_message_bytes(settings)),
        ("grpc.max_metadata_size", settings.max_header_bytes),
        # Ping a connection silent for a minute and drop it if the ping goes unanswered for 20 s: a vanished client
        # (a pod gone, a NAT forgetting the flow) does not hold its connection forever.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Accept clients' keepalive pings down to every 10 s (grpc's default, 5 min, makes it GOAWAY such clients).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Close connections idle (no RPC) for 5 minutes, and ask long-lived ones to reconnect after 10 (with the
        # drain time to finish their RPCs), so that clients spread again over replicas added since they connected.
        ("grpc.max_connection_idle_ms", 300_000),
        ("grpc.max_connection_age_ms", 600_000),
        ("grpc.max_connection_age_grace_ms", max(1000, round(settings.shutdown_timeout_s * 1000))),
    ]


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcServer:
    """One worker's gRPC server, started and stopped by the app's lifespan (``app.state.grpc``)."""

    def __init__(self, server: grpc.aio.Server, address: str) -> None:
        self.server = server
        self.address = address
        self._stopping: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, plane: DataPlane, *, version: str, on_rpc: RpcHook | None = None) -> GrpcServer:
        """Listen on ``MNIST_SERVE_HOST:MNIST_SERVE_GRPC_PORT`` in the running event loop; log where."""
        settings = plane.settings
        server = grpc.aio.server(
            interceptors=[RpcObserver(plane.state.metrics, on_rpc)],
            options=server_options(settings),
            maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
        )
        servicer = InferenceServicer(plane, version)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        server.add_generic_rpc_handlers((_triton_handlers(servicer),))
        address = listen_address(settings.host, settings.grpc_port)
        try:
            server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(f"gRPC cannot listen on {address} (MNIST_SERVE_GRPC_PORT, 0 turns gRPC off)") from exc
        await server.start()
        log.info(
            "gRPC (Open Inference Protocol) listening on %s, at most %d RPCs at once, messages up to %d bytes",
            address,
            settings.grpc_max_concurrent_rpcs,
            max_message_bytes(settings),
        )
        return cls(server, address)

    async def stop(self, grace_s: float) -> None:
        """Refuse new RPCs at once, give those running ``grace_s`` to finish, then cancel them. Idempotent."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self.server.stop(grace_s))
        await asyncio.shield(self._stopping)
