"""Latency and throughput of the service against the in-process onnxruntime limit, measured in one run.

    make bench                       # = python -m bench.run
    python -m bench.run --duration 5 --model-name mnist-cnn-int8

(a) in-process: the service's own OnnxClassifier (same session options) over 1,000 real test images at batch 1
    and batch 256 — the limit the HTTP rows are compared with;
(b) POST /v1/predict/batch with the same 1,000 images per request;
(c) POST /v1/predict single requests at concurrency 1 (p50, p99) and 64 (throughput, p99), micro-batching on
    and off;
(d) when models/<name>-int8.onnx exists: the int8 model in-process, and served (batch endpoint, concurrency 1).
Load comes from a separate process (wrk when installed, else an async httpx client in a subprocess), only to
127.0.0.1, bounded in time; on a small machine it shares the cores with the server. The server runs as shipped
(every model in the model directory loaded) except for its access log, which is off. The server's
start-to-ready time and peak RSS (VmHWM) are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


@dataclass
class Row:
    name: str
    throughput: float  # images per second
    p50_ms: float | None = None
    p99_ms: float | None = None
    baseline: str = "batch256"  # which in-process figure the ratio is taken against


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Server:
    url: str
    pid: int
    ready_s: float


@contextmanager
def serve(model_dir: Path, model_name: str, **env: str) -> Iterator[Server]:
    """Start ``mnist-serve`` in its own process; yield once /readyz answers 200; SIGTERM it afterwards."""
    port = free_port()
    environ = {
        **os.environ,
        "MNIST_SERVE_HOST": HOST,
        "MNIST_SERVE_PORT": str(port),
        "MNIST_SERVE_MODEL_DIR": str(model_dir),
        "MNIST_SERVE_MODEL_NAME": model_name,
        "MNIST_SERVE_LOG_LEVEL": "warning",
        "MNIST_SERVE_ACCESS_LOG": "false",
        **{f"MNIST_SERVE_{k.upper()}": v for k, v in env.items()},
    }
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "service.main"], env=environ, cwd=ROOT)
    url = f"http://{HOST}:{port}"
    try:
        deadline = start + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError("server not ready within 60 s")
            time.sleep(0.02)
        yield Server(url, proc.pid, time.perf_counter() - start)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _fmt(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "—"


def in_process(model_dir: Path, model_name: str, x: np.ndarray, threads: int) -> dict[str, float]:
    from service.model import load_model

    clf = load_model(model_dir, model_name, intra_op_threads=threads)
    out: dict[str, float] = {}
    for batch in (1, 256):
        clf.predict(x[:batch])
        best = float("inf")
        for _ in range(3):  # best of three passes over the 1,000 images
            t = time.perf_counter()
            for i in range(0, len(x), batch):
                clf.predict(x[i : i + batch])
            best = min(best, time.perf_counter() - t)
        out[f"batch{batch}"] = len(x) / best
    return out


def bench_batch_endpoint(
    url: str, images: np.ndarray, seconds: float, label: str = "", baseline: str = "batch256"
) -> Row:
    body = json.dumps({"items": [{"pixels": img.tolist(), "scale": "0-255"} for img in images]}).encode()
    times: list[float] = []
    with httpx.Client(timeout=60) as client:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 3:
            t = time.perf_counter()
            r = client.post(f"{url}/v1/predict/batch", content=body, headers={"content-type": "application/json"})
            times.append(time.perf_counter() - t)
            r.raise_for_status()
    best = min(times)
    return Row(
        f"/v1/predict/batch, {len(images)} images{label}",
        len(images) / best,
        float(np.median(times)) * 1e3,
        None,
        baseline=baseline,
    )


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("BENCH_BODY"), "r")
wrk.body = f:read("*a")
f:close()
"""


def _wrk_ms(text: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


def load_single(url: str, body: bytes, connections: int, seconds: float) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) for POST /v1/predict at a fixed concurrency, from a separate process."""
    with tempfile.TemporaryDirectory() as tmp:
        body_path, script = Path(tmp, "body.json"), Path(tmp, "post.lua")
        body_path.write_bytes(body)
        script.write_text(WRK_SCRIPT)
        if shutil.which("wrk"):
            out = subprocess.run(
                [
                    "wrk",
                    f"-t{min(connections, 2)}",
                    f"-c{connections}",
                    f"-d{seconds:.0f}s",
                    "--latency",
                    "-s",
                    str(script),
                    f"{url}/v1/predict",
                ],
                env={**os.environ, "BENCH_BODY": str(body_path)},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
            if re.search(r"Non-2xx", out):
                raise RuntimeError(f"non-2xx answers under load:\n{out}")
            return rps, _wrk_ms(out, "50"), _wrk_ms(out, "99")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.loadgen",
                f"{url}/v1/predict",
                str(body_path),
                str(connections),
                str(seconds),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        stats = json.loads(proc.stdout)
        return stats["rps"], stats["p50_ms"], stats["p99_ms"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model-name", default="mnist-cnn")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per HTTP load row")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from training.data import load_test_set

    x_u8, _ = load_test_set()
    x_u8 = x_u8[:1000]
    x = (x_u8.astype(np.float32) / 255.0)[..., None]
    single_body = json.dumps({"pixels": x_u8[0].tolist(), "scale": "0-255"}).encode()

    limit = in_process(args.model_dir, args.model_name, x, threads=1)
    rows = [
        Row("in-process ORT, batch 1 (1 thread)", limit["batch1"], 1e3 / limit["batch1"], baseline="batch1"),
        Row("in-process ORT, batch 256 (1 thread)", limit["batch256"]),
    ]
    two = in_process(args.model_dir, args.model_name, x, threads=2)
    rows.append(Row("in-process ORT, batch 256 (2 threads)", two["batch256"]))

    extra: dict[str, float] = {}
    for batching in ("true", "false"):
        with serve(args.model_dir, args.model_name, batching=batching) as server:
            extra[f"ready_s_batching_{batching}"] = server.ready_s
            if batching == "true":
                rows.append(bench_batch_endpoint(server.url, x_u8, args.duration))
            rps, p50, p99 = load_single(server.url, single_body, 1, args.duration)
            rows.append(
                Row(
                    f"/v1/predict, concurrency 1, batching {'on' if batching == 'true' else 'off'}",
                    rps,
                    p50,
                    p99,
                    baseline="batch1",
                )
            )
            rps, p50, p99 = load_single(server.url, single_body, 64, args.duration)
            rows.append(
                Row(f"/v1/predict, concurrency 64, batching {'on' if batching == 'true' else 'off'}", rps, p50, p99)
            )
            extra[f"peak_rss_mb_batching_{batching}"] = peak_rss_mb(server.pid)

    int8 = f"{args.model_name}-int8"
    if (args.model_dir / f"{int8}.onnx").exists():
        q = in_process(args.model_dir, int8, x, threads=1)
        limit.update(int8_batch1=q["batch1"], int8_batch256=q["batch256"])
        rows += [
            Row("int8 in-process ORT, batch 1 (1 thread)", q["batch1"], 1e3 / q["batch1"], baseline="batch1"),
            Row("int8 in-process ORT, batch 256 (1 thread)", q["batch256"]),
        ]
        with serve(args.model_dir, int8) as server:
            rows.append(bench_batch_endpoint(server.url, x_u8, args.duration, ", int8", baseline="int8_batch256"))
            rps, p50, p99 = load_single(server.url, single_body, 1, args.duration)
            rows.append(Row("/v1/predict, concurrency 1, int8", rps, p50, p99, baseline="int8_batch1"))
            rps, p50, p99 = load_single(server.url, single_body, 64, args.duration)
            rows.append(Row("/v1/predict, concurrency 64, int8", rps, p50, p99, baseline="int8_batch256"))
            extra["peak_rss_mb_int8"] = peak_rss_mb(server.pid)

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"\nmnist-serve benchmark — {args.model_name}, {os.cpu_count()} CPU cores ({cpu}), "
        f"Python {platform.python_version()}, load from {'wrk' if shutil.which('wrk') else 'httpx'}\n"
    )
    refs = {"batch1": "batch 1", "batch256": "batch 256", "int8_batch1": "int8 b1", "int8_batch256": "int8 b256"}
    print(f"| {'what':<46} | {'images/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} | {'ratio to in-process':>22} |")
    print(f"|{'-' * 48}|{'-' * 10}:|{'-' * 8}:|{'-' * 8}:|{'-' * 23}:|")
    for row in rows:
        ratio = row.throughput / limit[row.baseline]
        print(
            f"| {row.name:<46} | {row.throughput:>9.0f} | {_fmt(row.p50_ms):>7} | {_fmt(row.p99_ms):>7} | "
            f"{ratio:>8.2f} × ({refs[row.baseline]:>9}) |"
        )
    on = next(r for r in rows if r.name.endswith("concurrency 64, batching on")).throughput
    off = next(r for r in rows if r.name.endswith("concurrency 64, batching off")).throughput
    print(
        f"\nmicro-batching speed-up at concurrency 64: {on / off:.2f}× "
        f"(the model's own gain from batching, in-process batch 256 over batch 1: "
        f"{limit['batch256'] / limit['batch1']:.2f}×)"
    )
    print(
        f"start to ready: {extra['ready_s_batching_true']:.2f} s; "
        f"server peak RSS: {max(v for k, v in extra.items() if k.startswith('peak')):.0f} MB"
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": [r.__dict__ for r in rows], "limit": limit, **extra}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
