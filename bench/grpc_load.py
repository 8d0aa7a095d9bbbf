"""Closed-loop gRPC load from its own process: single-image ModelInfer calls (the Open Inference Protocol).

    python -m bench.grpc_load HOST:PORT STREAMS SECONDS [--model mnist-cnn] [--image first-test-digit]
    # prints {"rps", "p50_ms", "p99_ms", "errors"}; MNIST_SERVE_API_KEY is sent when set

Each of the STREAMS runs on a connection of its own (as many worker processes as share the port can take them)
and sends one request after the other for SECONDS: one 28×28 image as raw little-endian FP32, as tritonclient sends
it, asking for ``digit``. The image is the first MNIST test digit (training.data's cached copy), or a .npy/.raw file
of 784 float32 values in 0..1 given with --image. Needs grpcio and this checkout (service.grpc_gen), not tritonclient.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.grpc_gen import grpc_predict_v2_pb2 as pb

INFER = "/inference.GRPCInferenceService/ModelInfer"


def first_test_digit() -> np.ndarray:
    from training.data import load_test_set

    x, _ = load_test_set()
    image: np.ndarray = x[0].astype(np.float32) / 255.0
    return image


def load_image(path: str | None) -> np.ndarray:
    if path is None:
        image = first_test_digit()
    elif path.endswith(".npy"):
        image = np.load(path)
    else:
        image = np.fromfile(path, dtype="<f4")
    return np.asarray(image, dtype="<f4").reshape(1, 784)


def infer_request(model: str, image: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 784])
    request.outputs.add(name="digit")
    request.raw_input_contents.append(image.tobytes())
    return request


async def run(url: str, streams: int, seconds: float, model: str, image: np.ndarray) -> dict[str, float]:
    key = os.environ.get("MNIST_SERVE_API_KEY")
    metadata = (("x-api-key", key),) if key else None
    request = infer_request(model, image)
    latencies: list[float] = []
    errors = 0
    # A subchannel pool per channel: one TCP connection per stream, not one shared by all.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(url, options=options) for _ in range(streams)]
    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10) for c in channels))
        deadline = time.perf_counter() + seconds

        async def stream(channel: grpc.aio.Channel) -> None:
            nonlocal errors
            call = channel.unary_unary(
                INFER,
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                try:
                    await call(request, metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(stream(c) for c in channels))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    lat = np.array(latencies) * 1e3
    return {
        "rps": (len(lat) - errors) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else 0.0,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else 0.0,
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="host:port of the gRPC service")
    parser.add_argument("streams", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--image", help="784 float32 values in 0..1 (.npy, or raw little-endian)")
    args = parser.parse_args(argv)
    coroutine = run(args.url, args.streams, args.seconds, args.model, load_image(args.image))
    try:
        import uvloop  # the client's own overhead, lower: the load generator should not be what is measured
    except ImportError:
        figures = asyncio.run(coroutine)
    else:
        figures = uvloop.run(coroutine)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
