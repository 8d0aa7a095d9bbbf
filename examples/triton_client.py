"""Classify real MNIST test digits through the Open Inference Protocol with NVIDIA's own client, tritonclient.

    make run                                              # a server, in another shell (or docker compose, k8s)
    make example                                          # this script with the project's .venv, 100 digits

    .venv/bin/python examples/triton_client.py            # the same by hand; needs tritonclient, which .venv has
    .venv/bin/python examples/triton_client.py --protocol grpc      # the same over gRPC, 127.0.0.1:8081
    pip install 'tritonclient[http,grpc]' numpy           # elsewhere (plus this checkout, for training.data)
    python examples/triton_client.py                      # 100 digits against 127.0.0.1:8000
    python examples/triton_client.py --url 10.0.0.5:8000 --count 1000 --model mnist-cnn --version 1.0.0
    MNIST_SERVE_API_KEY=... python examples/triton_client.py   # sends the key when the service wants one

It checks the server and model are ready, prints the model's metadata, sends the digits in batched requests (binary
tensors, the client's default; as many digits per request as the model configuration's max_batch_size allows) and
once more one by one (over HTTP with JSON tensors), and prints the accuracy of each.
Exit status 0 when both reach --min-accuracy. Needs the MNIST test set (fetched and verified by training.data).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

try:
    import numpy as np
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException
except ImportError as missing:  # typically the system Python: the client is installed in the project's .venv
    sys.exit(
        f"{missing.name} is not installed for {sys.executable}. Run this example with the project's environment: "
        "`make example` (after `make run` in another shell), or `.venv/bin/python examples/triton_client.py`; "
        "elsewhere, pip install 'tritonclient[http,grpc]' numpy first."
    )

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from training.data import load_test_set

DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8081"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http", help="REST (default) or gRPC")
    parser.add_argument("--url", help="host:port of the service, no scheme (default: 127.0.0.1:8000, gRPC :8081)")
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--version", default="", help="a model version (default: the server's choice)")
    parser.add_argument("--count", type=int, default=100, help="how many test digits, from the first")
    parser.add_argument("--min-accuracy", type=float, default=0.97)
    args = parser.parse_args(argv)
    grpc = args.protocol == "grpc"
    triton: Any = triton_grpc if grpc else triton_http
    url = args.url or DEFAULT_URLS[args.protocol]

    key = os.environ.get("MNIST_SERVE_API_KEY")

    def headers() -> dict[str, str] | None:
        # A fresh dict per call: tritonclient writes Inference-Header-Content-Length into the one it is given,
        # and a stale value would mislabel the next (JSON-only) request. gRPC metadata keys are lower case.
        return {"x-api-key" if grpc else "X-API-Key": key} if key else None

    # tritonclient.grpc answers protobuf messages unless asked for JSON (where int64s are strings).
    json_kwargs = {"as_json": True} if grpc else {}
    client = triton.InferenceServerClient(url=url)
    try:
        ready = client.is_server_live() and client.is_server_ready()
    except (OSError, InferenceServerException) as error:
        print(f"no mnist-serve answers at {url} ({error}): start one (`make run` in another shell) or pass "
              "--url host:port", file=sys.stderr)  # fmt: skip
        return 1
    if not ready:
        print(f"the server at {url} is not ready", file=sys.stderr)
        return 1
    if not client.is_model_ready(args.model, args.version):
        print(f"model {args.model} {args.version} is not ready", file=sys.stderr)
        return 1
    server = client.get_server_metadata(**json_kwargs)
    metadata = client.get_model_metadata(args.model, args.version, **json_kwargs)
    print(f"server: {server['name']} {server['version']} (extensions: {', '.join(server['extensions'])})")
    tensors = ", ".join(
        f"{t['name']} {t['datatype']} {[int(d) for d in t['shape']]}" for t in metadata["inputs"] + metadata["outputs"]
    )
    print(f"model: {metadata['name']} versions {metadata['versions']} on {metadata['platform']}: {tensors}")

    x, y = load_test_set()
    images = (x[: args.count].astype(np.float32) / 255.0)[..., None]  # N×28×28×1 in 0..1, white ink on black
    labels = y[: args.count]

    # Batched requests, binary tensors both ways (tritonclient's defaults; gRPC sends raw tensors anyway).
    config = client.get_model_config(args.model, args.version, **json_kwargs)
    per_request = int((config["config"] if grpc else config)["max_batch_size"])
    start = time.perf_counter()
    batches = []
    for first in range(0, len(images), per_request):
        chunk = images[first : first + per_request]
        batch = triton.InferInput("input", list(chunk.shape), "FP32")
        batch.set_data_from_numpy(chunk)
        result = client.infer(args.model, [batch], model_version=args.version, request_id=f"from-{first}",
                              headers=headers())  # fmt: skip
        batches.append(result.as_numpy("digit"))
    batch_ms = (time.perf_counter() - start) * 1e3
    digits = np.concatenate(batches)
    batch_accuracy = float(np.mean(digits == labels))
    answered = result.get_response(**json_kwargs)
    how = "over gRPC" if grpc else "binary tensors"
    print(
        f"{len(batches)} request(s) of up to {per_request} digits{',' if not grpc else ''} {how}: accuracy "
        f"{batch_accuracy:.2%} ({int(np.sum(digits != labels))} wrong of {args.count}) in {batch_ms:.0f} ms, "
        f"answered by {answered['model_name']} {answered['model_version']}"
    )

    # One request per digit (over HTTP: JSON tensors both ways).
    wanted = [triton.InferRequestedOutput("digit") if grpc else triton.InferRequestedOutput("digit", binary_data=False)]
    start = time.perf_counter()
    single = []
    for image in images:
        one = triton.InferInput("input", [1, 28, 28, 1], "FP32")
        if grpc:
            one.set_data_from_numpy(image[None])
        else:
            one.set_data_from_numpy(image[None], binary_data=False)
        reply = client.infer(args.model, [one], model_version=args.version, outputs=wanted, headers=headers())
        single.append(int(reply.as_numpy("digit")[0]))
    per_request_ms = (time.perf_counter() - start) * 1e3 / len(images)
    single_accuracy = float(np.mean(np.array(single) == labels))
    print(
        f"{args.count} requests, one digit each, {'over gRPC' if grpc else 'JSON tensors'}: accuracy "
        f"{single_accuracy:.2%} ({per_request_ms:.1f} ms per request)"
    )
    agree = bool(np.array_equal(np.array(single), digits))
    print(f"both ways agree on every digit: {agree}; first ten: {digits[:10].tolist()} (labels {labels[:10].tolist()})")
    client.close()
    return 0 if min(batch_accuracy, single_accuracy) >= args.min_accuracy and agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
