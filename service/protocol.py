"""Open Inference Protocol (KServe v2) tensors for the digit models: decode an inference request, encode the answer.

No web framework here: bytes and a header in, arrays out; arrays in, bytes and headers out.

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
from service.core import Answer
from service.errors import InvalidInput, PayloadTooLarge
from service.model import IMAGE_SHAPE, NUM_CLASSES, FloatArray

#: Header giving the length of the JSON part of a body that carries binary tensors after it.
HEADER_LENGTH = "Inference-Header-Content-Length"

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


def _shape(value: Any, max_images: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise ProtocolError("input 'shape' must be a list of integers")
    shape = tuple(value)
    if not shape or shape[1:] not in INPUT_SHAPES:
        accepted = ", ".join(str(["N", *s]) for s in INPUT_SHAPES).replace("'", "")
        raise ProtocolError(f"input shape {list(shape)} is not one of {accepted}")
    if shape[0] < 1:
        raise ProtocolError(f"input shape {list(shape)} holds no image")
    if shape[0] > max_images:
        raise PayloadTooLarge(f"{shape[0]} images is more than the {max_images} one request may carry")
    return shape


def _json_values(data: Any, count: int) -> npt.NDArray[np.float32]:
    if not isinstance(data, list):
        raise ProtocolError("input 'data' must be a JSON array (flattened or nested), or send it as binary data")
    try:
        values = np.asarray(data)
    except ValueError:
        raise ProtocolError("input 'data' is a ragged nested array") from None
    if values.dtype.kind not in "iuf":
        raise ProtocolError("input 'data' must hold only numbers (FP32 pixels in 0..1)")
    if values.size != count:
        raise ProtocolError(f"input 'data' holds {values.size} values but its shape needs {count}")
    return values.astype(np.float32).reshape(-1)


def _binary_values(binary: Buffer, offset: int, size: Any, count: int) -> tuple[npt.NDArray[np.float32], int]:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError("parameter 'binary_data_size' must be a non-negative integer")
    if size != count * 4:
        raise ProtocolError(f"binary_data_size is {size} bytes but {count} FP32 values take {count * 4}")
    if offset + size > len(binary):
        raise ProtocolError(f"the body ends before the {size} bytes of binary input data")
    values = np.frombuffer(binary, dtype="<f4", count=count, offset=offset).astype(np.float32)
    return values, offset + size


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
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise ProtocolError(f"'inputs' must list exactly one tensor, named {input_name!r}")
    tensor = _object(inputs[0], "an input")
    if tensor.get("name") != input_name:
        raise ProtocolError(f"unknown input {tensor.get('name')!r}: this model takes one input named {input_name!r}")
    if tensor.get("datatype") != INPUT_DATATYPE:
        raise ProtocolError(f"input {input_name!r} must be {INPUT_DATATYPE}, not {tensor.get('datatype')!r}")
    shape = _shape(tensor.get("shape"), max_images)
    count = math.prod(shape)
    input_parameters = _object(tensor.get("parameters"), "input 'parameters'")
    if "shared_memory_region" in input_parameters:
        raise ProtocolError("shared memory is not supported: send the data in the request")
    if "binary_data_size" in input_parameters:
        if "data" in tensor:
            raise ProtocolError("input has both 'data' and binary_data_size")
        values, used = _binary_values(binary, 0, input_parameters["binary_data_size"], count)
    else:
        values, used = _json_values(tensor.get("data"), count), 0
    if used != len(binary):
        raise ProtocolError(f"{len(binary) - used} bytes of binary data after the JSON belong to no input")
    if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
        raise ProtocolError("input values must be finite and within 0..1 (white ink on black: pixels / 255)")

    outputs = request.get("outputs")
    if outputs is None:
        requested = tuple(RequestedOutput(name, binary_default) for name in OUTPUTS)
    elif isinstance(outputs, list) and outputs:
        requested = tuple(_requested_output(o, binary_default) for o in outputs)
    else:
        raise ProtocolError("'outputs' must be a non-empty list when given")
    images = values.reshape(shape[0], *IMAGE_SHAPE[:2])
    return InferRequest(id=request_id, images=images, outputs=requested)


def _requested_output(value: Any, binary_default: bool) -> RequestedOutput:
    output = _object(value, "an output")
    name = output.get("name")
    if not isinstance(name, str) or name not in OUTPUTS:
        raise ProtocolError(f"unknown output {name!r}: this model answers {', '.join(map(repr, OUTPUTS))}")
    parameters = _object(output.get("parameters"), "output 'parameters'")
    if parameters.get("classification"):
        raise ProtocolError("the classification extension is not supported: ask for 'digit' or 'probabilities'")
    if "shared_memory_region" in parameters:
        raise ProtocolError("shared memory is not supported")
    return RequestedOutput(str(name), _flag(parameters, "binary_data", binary_default))


def _bytes_tensor(values: Sequence[str]) -> bytes:
    """Triton's binary form of a BYTES tensor: each element as a little-endian uint32 length, then its bytes."""
    out = bytearray()
    for value in values:
        data = value.encode()
        out += len(data).to_bytes(4, "little") + data
    return bytes(out)


def encode_infer_response(
    answer: Answer, request_id: str | None, outputs: Sequence[RequestedOutput]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (content type, and the JSON length when binary tensors follow)."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    n = len(answer)
    for output in outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": OUTPUTS[output.name][0]}
        blob: bytes
        if output.name == PROBABILITIES:
            probs = np.ascontiguousarray(answer.probabilities, dtype="<f4")
            entry["shape"] = list(probs.shape)
            blob, data = (probs.tobytes(), None) if output.binary else (b"", probs.reshape(-1).tolist())
        elif output.name == DIGIT:
            digits = answer.digits.astype("<i8")
            entry["shape"] = [n]
            blob, data = (digits.tobytes(), None) if output.binary else (b"", digits.tolist())
        else:
            entry["shape"] = [n]
            blob, data = (_bytes_tensor(answer.verdicts), None) if output.binary else (b"", list(answer.verdicts))
        if output.binary:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = data
        described.append(entry)
    response: dict[str, Any] = {"model_name": answer.name, "model_version": answer.version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = described
    header = msgspec.json.encode(response)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
