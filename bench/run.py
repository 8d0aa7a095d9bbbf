"""Latency and throughput of the service against onnxruntime itself and a naive endpoint, measured in one run.

    make bench                                  # = python -m bench.run: about 5 minutes on 2 cores
    python -m bench.run --duration 5 --rounds 1 --json /tmp/bench.json
    python -m bench.run --server-cwd /path/to/another/checkout   # the same measurements of another version
    python -m bench.run --setting workers=1                      # with a service setting (MNIST_SERVE_WORKERS=1)

What it measures, every row on the same machine in the same run:

- **in-process onnxruntime** (the limit): the service's own ``OnnxClassifier`` over 1,000 real MNIST test images
  at batch 1 and 256 (each a single onnxruntime run of that many images), with 1 and 2 intra-op threads — best
  of three passes;
- **the naive endpoint** (``bench/naive.py``): a plain FastAPI route, pydantic-validated pixels, one onnxruntime
  run per request, one process — what the service must beat;
- **the service as shipped** (``mnist-serve``, every model in the model directory, its default worker count):
  ``POST /v1/predict`` with one digit at concurrency 1 (p50, p99) and 64 (throughput), ``POST /v1/predict/batch``
  with the 1,000 images in one request, and the same single digit over gRPC (``bench/grpc_load.py``); then
  concurrency 64 once more with the request log on (the default: one JSON line per request, written to a pipe);
- the int8 model, in-process and served, when ``models/<name>-int8.onnx`` exists.

Load comes from ``wrk`` (not Python: ``make bench`` installs it from Debian where it can), in a process of its own,
only to 127.0.0.1, for ``--duration`` seconds per round; each row is the median of ``--rounds`` rounds. The CPU
the load generator and the server's processes used during the concurrency-64 row is reported (on a small machine
they share the cores). The server's request log is off but in the row that says so, everything else as shipped.
The three ratios the service is held to are printed at the end.
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
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    name: str
    throughput: float  # images per second
    p50_ms: float | None = None
    p99_ms: float | None = None
    baseline: str = "b256_2t"  # which in-process figure the ratio is taken against
    extra: dict[str, float] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _pss_mb(pid: int) -> float:
    """The process's proportional share of memory (pages shared by n processes count 1/n in each): what the
    processes of a server use together is the sum of their PSS, where their RSS would count shared pages twice."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    ready_s: float
    grpc: str | None = None

    @property
    def pids(self) -> list[int]:
        return [self.process.pid, *_children(self.process.pid)]

    def peak_rss_mb(self) -> dict[int, float]:
        return {pid: _status(pid, "VmHWM") for pid in self.pids}

    def pss_mb(self) -> float:
        return sum(_pss_mb(pid) for pid in self.pids)


@contextmanager
def serve(command: list[str], env: dict[str, str], cwd: Path, grpc_port: int | None = None) -> Iterator[Server]:
    """Start a server process; yield once /readyz answers 200; SIGTERM it afterwards."""
    port = int(env["PORT"])
    start = time.perf_counter()
    environ = {**os.environ, **env}
    log = tempfile.TemporaryFile()  # the server's log is written for real (a file, as a container runtime's pipe)
    process = subprocess.Popen(command, env=environ, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    try:
        deadline = start + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command} exited with {process.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError("server not ready within 120 s")
            time.sleep(0.01)
        yield Server(url, process, time.perf_counter() - start, f"{HOST}:{grpc_port}" if grpc_port else None)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def mnist_serve(model_dir: Path, cwd: Path, **settings: str) -> AbstractContextManager[Server]:
    port, grpc_port = free_port(), free_port()
    env = {
        "PORT": str(port),
        "PYTHONPATH": str(cwd),
        "MNIST_SERVE_HOST": HOST,
        "MNIST_SERVE_PORT": str(port),
        "MNIST_SERVE_GRPC_PORT": str(grpc_port),
        "MNIST_SERVE_MODEL_DIR": str(model_dir),
        "MNIST_SERVE_LOG_LEVEL": "warning",
        "MNIST_SERVE_ACCESS_LOG": "false",
        **{f"MNIST_SERVE_{k.upper()}": v for k, v in settings.items()},
    }
    return serve([sys.executable, "-m", "service"], env, cwd, grpc_port)


def naive(model_dir: Path) -> AbstractContextManager[Server]:
    port = free_port()
    env = {"PORT": str(port), "BENCH_MODEL": str(model_dir / "mnist-cnn.onnx")}
    command = [sys.executable, "-m", "uvicorn", "bench.naive:app", "--host", HOST, "--port", str(port)]
    return serve([*command, "--no-access-log", "--log-level", "warning"], env, ROOT)


# --- in-process ----------------------------------------------------------------------------------------------


def in_process(model_dir: Path, model_name: str, x: np.ndarray, threads: int) -> dict[str, float]:
    from service.model import load_model

    clf = load_model(model_dir, model_name, intra_op_threads=threads)
    out: dict[str, float] = {}
    for batch in (1, 256):
        clf.run(x[:batch])  # one onnxruntime run of exactly ``batch`` images (predict would split it)
        best = float("inf")
        for _ in range(3):  # best of three passes over the 1,000 images
            t = time.perf_counter()
            for i in range(0, len(x), batch):
                clf.run(x[i : i + batch])
            best = min(best, time.perf_counter() - t)
        out[f"batch{batch}"] = len(x) / best
    return out


# --- load ----------------------------------------------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("BENCH_BODY"), "r")
wrk.body = f:read("*a")
f:close()
"""


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    client_cores: float = float("nan")
    server_cores: float = float("nan")


def _wrk_ms(text: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


def _measured(command: list[str], env: dict[str, str], server: Server) -> tuple[str, Load]:
    """Run a load generator to completion; also how many cores it and the server used meanwhile."""
    server_pids = server.pids
    server_before = cpu_seconds(server_pids)
    started = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    client_cpu = 0.0
    while process.poll() is None:  # sample the generator's CPU until it exits (its /proc entry goes with it)
        client_cpu = max(client_cpu, cpu_seconds([process.pid]))
        time.sleep(0.05)
    wall = time.perf_counter() - started
    output = process.stdout.read() if process.stdout else ""
    if process.returncode:
        raise RuntimeError(f"{command[0]} failed: {output}")
    load = Load(0, 0, 0, client_cpu / wall, (cpu_seconds(server_pids) - server_before) / wall)
    return output, load


def wrk(server: Server, path: str, body: bytes, connections: int, seconds: float) -> Load:
    with tempfile.TemporaryDirectory() as tmp:
        body_path, script = Path(tmp, "body.json"), Path(tmp, "post.lua")
        body_path.write_bytes(body)
        script.write_text(WRK_SCRIPT)
        threads = 1 if connections == 1 else 2
        command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:.0f}s", "--latency", "-s", str(script)]
        out, load = _measured([*command, f"{server.url}{path}"], {"BENCH_BODY": str(body_path)}, server)
    if re.search(r"Non-2xx|Socket errors", out):
        raise RuntimeError(f"errors under load:\n{out}")
    load.rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    load.p50_ms, load.p99_ms = _wrk_ms(out, "50"), _wrk_ms(out, "99")
    return load


def grpc(server: Server, streams: int, seconds: float) -> Load:
    assert server.grpc is not None
    command = [sys.executable, "-m", "bench.grpc_load", server.grpc, str(streams), str(seconds)]
    out, load = _measured(command, {}, server)
    stats = json.loads(out)
    if stats["errors"]:
        raise RuntimeError(f"gRPC errors under load: {stats}")
    load.rps, load.p50_ms, load.p99_ms = stats["rps"], stats["p50_ms"], stats["p99_ms"]
    return load


def batch_endpoint(server: Server, body: bytes, images: int, seconds: float) -> Load:
    times: list[float] = []
    with httpx.Client(timeout=120) as client:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 3:
            t = time.perf_counter()
            response = client.post(f"{server.url}/v1/predict/batch", content=body, headers={"content-type": JSON})
            times.append(time.perf_counter() - t)
            response.raise_for_status()
    return Load(images / min(times), float(np.median(times)) * 1e3, float("nan"))


JSON = "application/json"


def rounds(measure: Callable[[], Load], n: int) -> Load:
    """The median round by throughput (its latencies and CPU figures with it)."""
    results = sorted((measure() for _ in range(n)), key=lambda load: load.rps)
    return results[len(results) // 2]


# --- the run -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model-name", default="mnist-cnn")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per round of each load row")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per load row (the median is kept)")
    parser.add_argument("--server-cwd", type=Path, default=ROOT, help="the checkout whose service is measured")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a service setting for every served row, e.g. workers=1 (= MNIST_SERVE_WORKERS=1); repeatable",
    )
    args = parser.parse_args(argv)
    settings = dict(setting.split("=", 1) for setting in args.setting)
    if not shutil.which("wrk"):
        print("wrk is not installed (make bench installs it from Debian where it can)", file=sys.stderr)
        return 2

    from training.data import load_test_set

    x_u8, _ = load_test_set()
    x_u8 = x_u8[:1000]
    x = (x_u8.astype(np.float32) / 255.0)[..., None]
    single = json.dumps({"pixels": x_u8[0].tolist(), "scale": "0-255"}).encode()
    batch = json.dumps({"items": [{"pixels": img.tolist(), "scale": "0-255"} for img in x_u8]}).encode()
    d, n = args.duration, args.rounds

    one, two = (in_process(args.model_dir, args.model_name, x, threads) for threads in (1, 2))
    limit = {"b1_1t": one["batch1"], "b256_1t": one["batch256"], "b1_2t": two["batch1"], "b256_2t": two["batch256"]}
    rows = [
        Row("in-process ORT, batch 1 (1 thread)", one["batch1"], 1e3 / one["batch1"], baseline="b1_1t"),
        Row("in-process ORT, batch 256 (1 thread)", one["batch256"], baseline="b256_1t"),
        Row("in-process ORT, batch 256 (2 threads)", two["batch256"], baseline="b256_2t"),
    ]
    extra: dict[str, object] = {}

    with naive(args.model_dir) as server:
        c1 = rounds(lambda: wrk(server, "/v1/predict", single, 1, d), n)
        c64 = rounds(lambda: wrk(server, "/v1/predict", single, 64, d), n)
        rows += [
            Row("naive FastAPI endpoint, concurrency 1", c1.rps, c1.p50_ms, c1.p99_ms, "b1_1t"),
            Row("naive FastAPI endpoint, concurrency 64", c64.rps, c64.p50_ms, c64.p99_ms, "b256_2t", _cpu(c64)),
        ]
        extra["naive_peak_rss_mb"] = server.peak_rss_mb()

    with mnist_serve(args.model_dir, args.server_cwd, **settings) as server:
        extra["ready_s"] = server.ready_s
        b = rounds(lambda: batch_endpoint(server, batch, len(x_u8), d), 1)
        c1 = rounds(lambda: wrk(server, "/v1/predict", single, 1, d), n)
        c64 = rounds(lambda: wrk(server, "/v1/predict", single, 64, d), n)
        rows += [
            Row("/v1/predict/batch, 1,000 images", b.rps, b.p50_ms, None, "b256_2t"),
            Row("/v1/predict, concurrency 1", c1.rps, c1.p50_ms, c1.p99_ms, "b1_1t"),
            Row("/v1/predict, concurrency 64", c64.rps, c64.p50_ms, c64.p99_ms, "b256_2t", _cpu(c64)),
        ]
        if _has_grpc(args.server_cwd):
            g1 = rounds(lambda: grpc(server, 1, d), n)
            g64 = rounds(lambda: grpc(server, 64, d), n)
            rows += [
                Row("gRPC ModelInfer, 1 stream", g1.rps, g1.p50_ms, g1.p99_ms, "b1_1t"),
                Row("gRPC ModelInfer, 64 streams", g64.rps, g64.p50_ms, g64.p99_ms, "b256_2t", _cpu(g64)),
            ]
        extra["peak_rss_mb"] = server.peak_rss_mb()
        extra["pss_mb"] = server.pss_mb()

    with mnist_serve(args.model_dir, args.server_cwd, **{**settings, "access_log": "true"}) as server:
        logged = rounds(lambda: wrk(server, "/v1/predict", single, 64, d), n)
        rows.append(
            Row("/v1/predict, concurrency 64, request log on", logged.rps, logged.p50_ms, logged.p99_ms, "b256_2t")
        )

    int8 = f"{args.model_name}-int8"
    if (args.model_dir / f"{int8}.onnx").exists():
        q1, q2 = (in_process(args.model_dir, int8, x, threads) for threads in (1, 2))
        limit.update(int8_b1=q1["batch1"], int8_b256=q2["batch256"])
        rows += [
            Row("int8 in-process ORT, batch 1 (1 thread)", q1["batch1"], 1e3 / q1["batch1"], baseline="int8_b1"),
            Row("int8 in-process ORT, batch 256 (2 threads)", q2["batch256"], baseline="int8_b256"),
        ]
        with mnist_serve(args.model_dir, args.server_cwd, **{**settings, "model_name": int8}) as server:
            b = rounds(lambda: batch_endpoint(server, batch, len(x_u8), d), 1)
            c1 = rounds(lambda: wrk(server, "/v1/predict", single, 1, d), n)
            c64 = rounds(lambda: wrk(server, "/v1/predict", single, 64, d), n)
            rows += [
                Row("int8 /v1/predict/batch, 1,000 images", b.rps, b.p50_ms, None, "int8_b256"),
                Row("int8 /v1/predict, concurrency 1", c1.rps, c1.p50_ms, c1.p99_ms, "int8_b1"),
                Row("int8 /v1/predict, concurrency 64", c64.rps, c64.p50_ms, c64.p99_ms, "int8_b256", _cpu(c64)),
            ]

    report(rows, limit, extra, args)
    if args.json:
        doc = {"rows": [r.__dict__ for r in rows], "limit": limit, **extra}
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0


def _cpu(load: Load) -> dict[str, float]:
    return {"client_cores": load.client_cores, "server_cores": load.server_cores}


def _has_grpc(cwd: Path) -> bool:
    return (cwd / "service" / "grpc_server.py").exists()


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or value != value else f"{value:.{digits}f}"


REFS = {
    "b1_1t": "b1, 1 thr",
    "b256_1t": "b256, 1 thr",
    "b1_2t": "b1, 2 thr",
    "b256_2t": "b256, 2 thr",
    "int8_b1": "int8 b1",
    "int8_b256": "int8 b256",
}


def report(rows: list[Row], limit: dict[str, float], extra: dict[str, object], args: argparse.Namespace) -> None:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor(),
    )
    print(
        f"\nmnist-serve benchmark — {args.model_name}, {os.cpu_count()} CPU cores ({cpu}), Python "
        f"{platform.python_version()}, load from wrk, {args.rounds} rounds × {args.duration:g} s (median)\n"
    )
    print(
        f"| {'what':<44} | {'images/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} | {'÷ in-process':>22} "
        "| CPU: load / server |"
    )
    print(f"|{'-' * 46}|{'-' * 10}:|{'-' * 8}:|{'-' * 8}:|{'-' * 23}:|{'-' * 20}:|")
    for row in rows:
        ratio = row.throughput / limit[row.baseline]
        cores = (
            f"{row.extra['client_cores']:.2f} / {row.extra['server_cores']:.2f}" if "client_cores" in row.extra else ""
        )
        print(
            f"| {row.name:<44} | {row.throughput:>9.0f} | {_fmt(row.p50_ms):>7} | {_fmt(row.p99_ms):>7} | "
            f"{ratio:>6.2f} × ({REFS[row.baseline]:>11}) | {cores:>18} |"
        )
    by = {row.name: row for row in rows}
    served64, naive64 = by["/v1/predict, concurrency 64"], by["naive FastAPI endpoint, concurrency 64"]
    served1, naive1 = by["/v1/predict, concurrency 1"], by["naive FastAPI endpoint, concurrency 1"]
    batch = by["/v1/predict/batch, 1,000 images"]
    print("\nThe targets, as ratios measured in this run:")
    print(
        f"- /v1/predict at 64 clients ÷ in-process ORT (batch 256, 2 threads): "
        f"{served64.throughput / limit['b256_2t']:.2f} (target ≥ 0.60); ÷ the naive endpoint: "
        f"{served64.throughput / naive64.throughput:.2f}× (target ≥ 2.5×)"
    )
    print(
        f"- /v1/predict at 1 client, p50: {_fmt(served1.p50_ms)} ms against the naive endpoint's "
        f"{_fmt(naive1.p50_ms)} ms (target: no worse)"
    )
    print(
        f"- /v1/predict/batch with 1,000 images ÷ in-process ORT with 2 threads: "
        f"{batch.throughput / limit['b256_2t']:.2f} (target ≥ 0.80)"
    )
    rss = extra.get("peak_rss_mb", {})
    assert isinstance(rss, dict)
    per_process = ", ".join(f"{v:.0f}" for v in rss.values())
    print(
        f"- start to ready: {extra['ready_s']:.2f} s; peak RSS per server process (supervisor first): "
        f"{per_process} MB; memory of the whole server after the load (sum of PSS, shared pages counted once): "
        f"{extra['pss_mb']:.0f} MB"
    )
    print(
        f"- CPU at 64 clients: the load generator used {served64.extra['client_cores']:.2f} cores, the server's "
        f"processes {served64.extra['server_cores']:.2f}"
    )
    print(
        f"- the model's own gain from batching (in-process, 1 thread, batch 256 ÷ batch 1): "
        f"{limit['b256_1t'] / limit['b1_1t']:.2f}×"
    )


if __name__ == "__main__":
    raise SystemExit(main())
