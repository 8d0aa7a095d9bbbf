"""Helpers for the service tests (and the web-page, benchmark and protocol tests): images, payloads, metrics.

Importable from any test module in tests/service as ``from service_helpers import ...``.
"""

from __future__ import annotations

import base64
import io
import socket
import struct
import zlib
from collections.abc import Iterable

import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 array (H×W gray or H×W×3/4 colour) → PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def dark_on_light(digit: np.ndarray, size: int = 280) -> np.ndarray:
    """A 28×28 MNIST digit (white on black) drawn as black ink on white paper at size×size, like a scan."""
    big = Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC)
    return 255 - np.asarray(big, dtype=np.uint8)


def pixels_payload(digit: np.ndarray, scale: str = "0-255") -> dict[str, object]:
    """The JSON item for a 28×28 uint8 digit on the given scale."""
    if scale == "0-1":
        return {"pixels": (digit.astype(np.float64) / 255.0).tolist(), "scale": "0-1"}
    return {"pixels": digit.astype(int).tolist(), "scale": "0-255"}


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims width×height pixels: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    # A few rows of compressed zeros: a real bomb would carry gigabytes of them.
    idat = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text → {(sample name, labels): value}."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0.0 when there are none).

    ``metric(text, "mnist_serve_batch_size_count")`` counts the runs of every model; add ``model=`` to pick one."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in metric_samples(text).items() if n == name and wanted <= got)


def batches_larger_than_one(text: str) -> float:
    """How many model runs in the batch-size histogram held more than one image."""
    return metric(text, "mnist_serve_batch_size_count") - metric(text, "mnist_serve_batch_size_bucket", le="1.0")


def accuracy(predicted: Iterable[int], labels: np.ndarray) -> float:
    return float(np.mean(np.fromiter(predicted, dtype=np.int64) == labels.astype(np.int64)))


def connect(port: int) -> socket.socket:
    """A raw TCP connection to a live server on loopback (for requests no HTTP client would send)."""
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_all(sock: socket.socket, limit_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``limit_s`` passes, or it resets)."""
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data
