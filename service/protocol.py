"""Open Inference Protocol (KServe v2) tensors for the digit models: decode an inference request, encode the answer.

No web framework here: bytes and a header in, arrays out; arrays in, bytes and headers out.

The checks every transport shares live here once, and both front doors call them: REST (:func:`parse_infer_request`
below, for :mod:`service.routes.v2`) and gRPC (:mod:`service.grpc_server`). :func:`check_input` (one input, its name,
datatype ``FP32``, an accepted shape, at most ``max_images`` images, no shared memory), :func:`fp32_from_bytes`
(little-endian values, as many as the shape needs), :func:`to_images` (the value count, finite values in 0..1),
:func:`requested_output` (``probabilities``, ``digit`` or ``verdict``; no classification, no shared memory) and
:func:`output_tensor` (each output's little-endian bytes). So are the model's metadata and
configuration (:func:`model_metadata`, :func:`model_config`, :func:`repository_index`), which gRPC answers with the
same content as REST.

Input: one tensor ``input``, datatype ``FP32``, values in 0..1 (white ink on black, pixels / 255), shape
``[N, 28, 28, 1]`` (what the ONNX graph takes) or, for convenience, ``[N, 28, 28]`` or ``[N, 784]``; its ``data``
flattened in row-major order or nested, or sent as binary (Triton's binary tensor data extension).

Outputs: ``probabilities`` FP32 ``[N, 10]``, ``digit`` INT64 ``[N]`` (the most likely digit) and ``verdict`` BYTES
``[N]`` (``digit``, ``unsure`` or ``not_a_digit``), each in JSON ``data`` or, when asked with ``"binary_data": true``
(or the request's ``"binary_data_output": true``), as raw little-endian bytes after the JSON header, whose length
the ``Inference-Header-Content-Length`` header gives (BYTES elements as a 4-byte length, then the bytes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from service.admission import JsonBudget
from service.core import Answer, ServiceState
from service.errors import InvalidInput, PayloadTooLarge
from service.model import IMAGE_SHAPE, NUM_CLASSES, FloatArray
from service.repository import ModelSet, ServedModel

#: Header giving the length of the JSON part of a body that carries binary tensors after it.
HEADER_LENGTH = "Inference-Header-Content-Length"

SERVER_NAME = "mnist-serve"
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
PLATFORM = "onnxruntime_onnx"
#: Requests whose tensors take at least this many bytes are decoded in a worker thread, not on the event loop.
OFF_LOOP_BYTES = 64 * 1024

PIXELS = math.prod(IMAGE_SHAPE)
PROBABILITIES = "probabilities"
DIGIT = "digit"
VERDICT = "verdict"
#: Output name → (datatype, shape with -1 for the batch).
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    PROBABILITIES: ("FP32", [-1, NUM_CLASSES]),
    DIGIT: ("INT64", [-1]),
    VERDICT: ("BYTES", [-1]),
}
INPUT_DATATYPE = "FP32"
#: The input shapes accepted, after the batch dimension.
INPUT_SHAPES = (IMAGE_SHAPE, IMAGE_SHAPE[:2], (PIXELS,))
#: Parameters that ask for shared memory (Triton's extension), which this service does not offer.
SHARED_MEMORY = "shared_memory_region"


_decode = msgspec.json.Decoder().decode
Buffer = bytes | bytearray | memoryview


class ProtocolError(InvalidInput):
    """The request does not follow the protocol, or its tensor is not a batch of 28×28 images (HTTP 400)."""

    status_code = 400
    code = "bad_request"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request: the images as the model takes them and the outputs to answer."""

    id: str | None
    images: FloatArray
    """float32 [N, 28, 28] in 0..1."""
    outputs: tuple[RequestedOutput, ...]


# --- the checks every transport shares ----------------------------------------------------------------------


def check_input_count(count: int, input_name: str) -> None:
    if count != 1:
        raise ProtocolError(f"'inputs' must list exactly one tensor, named {input_name!r}")


def check_input(
    name: object,
    datatype: object,
    shape: object,
    parameters: Mapping[str, object],
    *,
    input_name: str,
    max_images: int,
) -> tuple[int, ...]:
    """The input tensor's name, datatype and shape checked (before its values are read); its shape as a tuple."""
    if name != input_name:
        raise ProtocolError(f"unknown input {name!r}: this model takes one input named {input_name!r}")
    if datatype != INPUT_DATATYPE:
        raise ProtocolError(f"input {input_name!r} must be {INPUT_DATATYPE}, not {datatype!r}")
    if not isinstance(shape, Sequence) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError("input 'shape' must be a list of integers")
    dims = tuple(int(d) for d in shape)
    if not dims or dims[1:] not in INPUT_SHAPES:
        accepted = ", ".join(str(["N", *s]) for s in INPUT_SHAPES).replace("'", "")
        raise ProtocolError(f"input shape {list(dims)} is not one of {accepted}")
    if dims[0] < 1:
        raise ProtocolError(f"input shape {list(dims)} holds no image")
    if dims[0] > max_images:
        raise PayloadTooLarge(f"{dims[0]} images is more than the {max_images} one request may carry")
    if SHARED_MEMORY in parameters:
        raise ProtocolError("shared memory is not supported: send the data in the request")
    return dims


def fp32_from_bytes(data: Buffer, count: int, what: str) -> npt.NDArray[np.float32]:
    """``count`` little-endian FP32 values from ``data``, which must hold exactly that many."""
    if len(data) != count * 4:
        raise ProtocolError(f"{what} holds {len(data)} bytes but {count} FP32 values take {count * 4}")
    return np.frombuffer(data, dtype="<f4", count=count).astype(np.float32)


def to_images(values: npt.NDArray[np.float32], shape: tuple[int, ...], what: str) -> FloatArray:
    """The input's values as images, float32 [N, 28, 28], once their count and range are checked."""
    count = math.prod(shape)
    if values.size != count:
        raise ProtocolError(f"{what} holds {values.size} values but its shape needs {count}")
    if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
        raise ProtocolError("input values must be finite and within 0..1 (white ink on black: pixels / 255)")
    return values.reshape(shape[0], *IMAGE_SHAPE[:2])


def requested_output(name: object, parameters: Mapping[str, object], *, binary: bool) -> RequestedOutput:
    """An output a request asks for, checked to be one this model answers, in a form the service offers."""
    if not isinstance(name, str) or name not in OUTPUTS:
        raise ProtocolError(f"unknown output {name!r}: this model answers {', '.join(map(repr, OUTPUTS))}")
    if parameters.get("classification"):
        raise ProtocolError("the classification extension is not supported: ask for 'digit' or 'probabilities'")
    if SHARED_MEMORY in parameters:
        raise ProtocolError("shared memory is not supported")
    return RequestedOutput(name, binary)


def every_output(binary: bool) -> tuple[RequestedOutput, ...]:
    """What a request that names no outputs gets: all of them."""
    return tuple(RequestedOutput(name, binary) for name in OUTPUTS)


def _bytes_tensor(values: Sequence[str]) -> bytes:
    """Triton's binary form of a BYTES tensor: each element as a little-endian uint32 length, then its bytes."""
    out = bytearray()
    for value in values:
        data = value.encode()
        out += len(data).to_bytes(4, "little") + data
    return bytes(out)


def output_shape(answer: Answer, name: str) -> list[int]:
    return [len(answer), NUM_CLASSES] if name == PROBABILITIES else [len(answer)]


def output_tensor(answer: Answer, name: str) -> bytes:
    """An output's raw little-endian bytes (BYTES: each element length-prefixed), as binary REST and gRPC send it."""
    if name == PROBABILITIES:
        return np.ascontiguousarray(answer.probabilities, dtype="<f4").tobytes()
    if name == DIGIT:
        return answer.digits.astype("<i8").tobytes()
    return _bytes_tensor(answer.verdicts)


def _output_values(answer: Answer, name: str) -> list[Any]:
    values: list[Any]
    if name == PROBABILITIES:
        values = np.asarray(answer.probabilities, dtype=np.float32).reshape(-1).tolist()
    elif name == DIGIT:
        values = answer.digits.astype(np.int64).tolist()
    else:
        values = list(answer.verdicts)
    return values


# --- metadata, configuration, repository index (the same content over every transport) ----------------------


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(models: ModelSet, served: ServedModel) -> dict[str, Any]:
    classifier = served.classifier
    return {
        "name": served.name,
        "versions": models.versions(served.name),
        "platform": PLATFORM,
        "inputs": [{"name": classifier.input.name, "datatype": INPUT_DATATYPE, "shape": [-1, *IMAGE_SHAPE]}],
        "outputs": [{"name": name, "datatype": dtype, "shape": shape} for name, (dtype, shape) in OUTPUTS.items()],
    }


def model_config(state: ServiceState, served: ServedModel) -> dict[str, Any]:
    """Triton's model configuration (its field names, so that gRPC can answer it in Triton's message)."""
    settings = state.settings
    classifier = served.classifier
    config: dict[str, Any] = {
        "name": served.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": settings.max_batch_items,
        "input": [
            {"name": classifier.input.name, "data_type": "TYPE_FP32", "format": "FORMAT_NHWC", "dims": [28, 28, 1]}
        ],
        "output": [
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]},
            {"name": "digit", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}},
            {"name": "verdict", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}},
        ],
        "parameters": {
            "version": {"string_value": served.version},
            "sha256": {"string_value": classifier.sha256},
        },
    }
    if settings.batching:
        config["dynamic_batching"] = {
            "preferred_batch_size": [settings.max_batch_size],
            "max_queue_delay_microseconds": round(settings.max_wait_ms * 1000),
        }
    return config


def repository_index(state: ServiceState, *, ready_only: bool = False) -> list[dict[str, str]]:
    """Every model version served, each READY (the repository is loaded whole or not at all)."""
    models = state.models
    if models is None or (ready_only and not state.ready):
        return []
    state_name = "READY" if state.ready else "UNAVAILABLE"
    return [{"name": m.name, "version": m.version, "state": state_name, "reason": ""} for m in models]


# --- REST: JSON, optionally followed by binary tensors ------------------------------------------------------


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _flag(parameters: Mapping[str, Any], name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"parameter {name!r} must be true or false")
    return value


def _split_body(body: Buffer, header_length: str | None) -> tuple[Buffer, Buffer]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer, not {header_length!r}") from None
    if not 0 < length <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
    view = memoryview(body)  # no copies of a large body
    return view[:length], view[length:]


def _json_values(data: Any) -> npt.NDArray[np.float32]:
    if not isinstance(data, list):
        raise ProtocolError("input 'data' must be a JSON array (flattened or nested), or send it as binary data")
    try:
        values = np.asarray(data)
    except ValueError:
        raise ProtocolError("input 'data' is a ragged nested array") from None
    if values.dtype.kind not in "iuf":
        raise ProtocolError("input 'data' must hold only numbers (FP32 pixels in 0..1)")
    return values.astype(np.float32).reshape(-1)


def _binary_values(binary: Buffer, size: Any, count: int) -> npt.NDArray[np.float32]:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError("parameter 'binary_data_size' must be a non-negative integer")
    if size != count * 4:
        raise ProtocolError(f"binary_data_size is {size} bytes but {count} FP32 values take {count * 4}")
    if size > len(binary):
        raise ProtocolError(f"the body ends before the {size} bytes of binary input data")
    if size != len(binary):
        raise ProtocolError(f"{len(binary) - size} bytes of binary data after the JSON belong to no input")
    return fp32_from_bytes(binary, count, "the binary input data")


def parse_infer_request(body: Buffer, header_length: str | None, *, input_name: str, max_images: int) -> InferRequest:
    """Decode and validate an inference request body (JSON, optionally followed by binary tensor data)."""
    header, binary = _split_body(body, header_length)
    JsonBudget.for_tensor(max_images).check(header)  # before a single Python object is built
    try:
        request = _decode(header)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"the inference request is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("the inference request nests JSON arrays too deeply") from None
    request = _object(request, "the inference request")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    parameters = _object(request.get("parameters"), "'parameters'")
    binary_default = _flag(parameters, "binary_data_output", False)

    inputs = request.get("inputs")
    inputs = inputs if isinstance(inputs, list) else []
    check_input_count(len(inputs), input_name)
    tensor = _object(inputs[0], "an input")
    input_parameters = _object(tensor.get("parameters"), "input 'parameters'")
    shape = check_input(
        tensor.get("name"),
        tensor.get("datatype"),
        tensor.get("shape"),
        input_parameters,
        input_name=input_name,
        max_images=max_images,
    )
    count = math.prod(shape)
    if "binary_data_size" in input_parameters:
        if "data" in tensor:
            raise ProtocolError("input has both 'data' and binary_data_size")
        values = _binary_values(binary, input_parameters["binary_data_size"], count)
    else:
        if len(binary):
            raise ProtocolError(f"{len(binary)} bytes of binary data after the JSON belong to no input")
        values = _json_values(tensor.get("data"))
    images = to_images(values, shape, "input 'data'")

    outputs = request.get("outputs")
    if outputs is None:
        requested = every_output(binary_default)
    elif isinstance(outputs, list) and outputs:
        requested = tuple(_requested_output(o, binary_default) for o in outputs)
    else:
        raise ProtocolError("'outputs' must be a non-empty list when given")
    return InferRequest(id=request_id, images=images, outputs=requested)


def _requested_output(value: Any, binary_default: bool) -> RequestedOutput:
    output = _object(value, "an output")
    parameters = _object(output.get("parameters"), "output 'parameters'")
    wanted = requested_output(output.get("name"), parameters, binary=binary_default)
    return RequestedOutput(wanted.name, _flag(parameters, "binary_data", binary_default))


def encode_infer_response(
    answer: Answer, request_id: str | None, outputs: Sequence[RequestedOutput]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (content type, and the JSON length when binary tensors follow)."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": OUTPUTS[output.name][0],
            "shape": output_shape(answer, output.name),
        }
        if output.binary:
            blob = output_tensor(answer, output.name)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _output_values(answer, output.name)
        described.append(entry)
    response: dict[str, Any] = {"model_name": answer.name, "model_version": answer.version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = described
    header = msgspec.json.encode(response)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
