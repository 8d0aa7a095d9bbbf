"""A bounded soak: about 60 s of mixed valid and invalid traffic against a live server (``make test-slow``).

    pytest tests/reliability/test_soak.py -m slow

16 clients loop over a fixed mix of requests (single digits as pixels or PNG, small batches, uploads, and the
usual mistakes: malformed JSON, NaN, wrong shapes and types, bodies over the limit, unsupported media types,
unknown models). Every request must get an answer of the status its kind calls for; the server's resident
memory is sampled every half second and must stay bounded and stop growing once warm.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from reliability_helpers import LiveServer, rss_mb, running_server
from service_helpers import b64, dark_on_light, metric_samples, pixels_payload, png_bytes

SOAK_S = 60.0
CLIENTS = 16
MAX_BODY = 256 * 1024
#: Bounds on the server's resident memory: a ceiling, and the growth allowed after the first quarter of the soak.
RSS_CEILING_MB = 200.0
RSS_GROWTH_MB = 12.0

pytestmark = pytest.mark.slow


def request_mix(x: np.ndarray, labels: np.ndarray) -> list[tuple[str, dict[str, Any], set[int], int | None]]:
    """(name, httpx keyword arguments, the statuses it may get, the digit it must be read as or None)."""
    zeros = [[0] * 28 for _ in range(28)]
    y = [int(v) for v in labels[:8]]
    nan = json.dumps({"pixels": zeros}).replace("0", "NaN", 1).encode()
    valid = [
        ("pixels", {"url": "/v1/predict", "json": pixels_payload(x[0])}, {200}, y[0]),
        ("pixels 0-1", {"url": "/v1/predict", "json": pixels_payload(x[1], "0-1")}, {200}, y[1]),
        ("png", {"url": "/v1/predict", "json": {"image_base64": b64(png_bytes(dark_on_light(x[2])))}}, {200}, y[2]),
        ("batch", {"url": "/v1/predict/batch", "json": {"items": [pixels_payload(d) for d in x[:32]]}}, {200}, None),
        ("upload", {"url": "/v1/predict", "files": {"file": ("d.png", png_bytes(x[3]), "image/png")}}, {200}, y[3]),
        ("int8", {"url": "/v1/predict?model=mnist-cnn-int8", "json": pixels_payload(x[4])}, {200, 404}, None),
        ("top_k", {"url": "/v1/predict?top_k=3&return_image=true", "json": pixels_payload(x[5])}, {200}, y[5]),
    ]
    json_headers = {"content-type": "application/json"}
    invalid = [
        ("malformed", {"url": "/v1/predict", "content": b'{"pixels": [', "headers": json_headers}, {422}, None),
        ("nan", {"url": "/v1/predict", "content": nan, "headers": json_headers}, {422}, None),
        ("27 rows", {"url": "/v1/predict", "json": {"pixels": zeros[:27]}}, {422}, None),
        ("out of range", {"url": "/v1/predict", "json": {"pixels": [[300] * 28] * 28}}, {422}, None),
        ("strings", {"url": "/v1/predict", "json": {"pixels": [["a"] * 28] * 28}}, {422}, None),
        ("not an image", {"url": "/v1/predict", "json": {"image_base64": b64(b"no image here")}}, {422}, None),
        ("too big", {"url": "/v1/predict", "content": b" " * (MAX_BODY + 1), "headers": json_headers}, {413}, None),
        ("text", {"url": "/v1/predict", "content": b"7", "headers": {"content-type": "text/plain"}}, {415}, None),
        ("no model", {"url": "/v1/predict?model=nope", "json": pixels_payload(x[0])}, {404}, None),
        ("empty batch", {"url": "/v1/predict/batch", "json": {"items": []}}, {422}, None),
        ("not found", {"url": "/v1/nothing", "json": {}}, {404, 405}, None),  # 405: the web page's mount at /
    ]
    return valid * 3 + invalid  # about two valid requests for each invalid one


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_server(tmp_path_factory.mktemp("soak"), {"MNIST_SERVE_MAX_BODY_BYTES": str(MAX_BODY)}) as live:
        yield live


def test_a_minute_of_mixed_traffic(server: LiveServer, mnist_test: tuple) -> None:
    mix = request_mix(*mnist_test)
    outcomes: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    rss: list[tuple[float, float]] = []

    async def client(http: httpx.AsyncClient, offset: int, deadline: float) -> None:
        for name, kwargs, allowed, digit in itertools.islice(itertools.cycle(mix), offset, None):
            if time.monotonic() >= deadline:
                return
            try:
                response = await http.post(**kwargs)
            except httpx.HTTPError as exc:  # no answer at all
                failures.append(f"{name}: {type(exc).__name__} {exc}")
                continue
            outcomes[(name, response.status_code)] += 1
            if response.status_code not in allowed:
                failures.append(f"{name}: {response.status_code} {response.text[:200]}")
            elif digit is not None and response.json()["digit"] != digit:
                failures.append(f"{name}: read as {response.json()['digit']}, not {digit}")

    async def sample_memory(deadline: float) -> None:
        start = time.monotonic()
        while time.monotonic() < deadline:
            rss.append((time.monotonic() - start, rss_mb(server.process.pid)))
            await asyncio.sleep(0.5)

    async def soak() -> None:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as http:
            deadline = time.monotonic() + SOAK_S
            await asyncio.gather(sample_memory(deadline), *(client(http, i * 3, deadline) for i in range(CLIENTS)))

    asyncio.run(soak())
    answered = sum(outcomes.values())
    assert not failures, f"{len(failures)} of {answered + len(failures)} requests went wrong: {failures[:10]}"
    assert answered > 1000, outcomes  # it was a soak, not a trickle
    samples = metric_samples(httpx.get(f"{server.url}/metrics", timeout=10).text)
    answers = {labels: v for (name, labels), v in samples.items() if name == "mnist_serve_requests_total"}
    counted = sum(v for labels, v in answers.items() if ("method", "POST") in labels)
    assert counted == answered, "every answer is counted in the metrics"
    peak = max(mb for _, mb in rss)
    warm = max(mb for t, mb in rss if t <= SOAK_S / 4)
    assert peak <= RSS_CEILING_MB, rss
    assert peak - warm <= RSS_GROWTH_MB, f"memory kept growing: {warm:.0f} MB after warm-up, {peak:.0f} MB at the end"
    assert "Traceback" not in Path(server.log_path).read_text(errors="replace")
