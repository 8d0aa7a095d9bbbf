"""Closed-loop HTTP load from its own process (used by bench.run when wrk is not installed).

python -m bench.loadgen URL BODY_FILE CONNECTIONS SECONDS   # prints {"rps", "p50_ms", "p99_ms", "errors"}
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np


async def run(url: str, body: bytes, connections: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                r = await client.post(url, content=body, headers={"content-type": "application/json"})
                latencies.append(time.perf_counter() - t)
                errors += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1e3
    return {
        "rps": len(lat) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": errors,
    }


def main() -> int:
    url, body_file, connections, seconds = sys.argv[1:5]
    stats = asyncio.run(run(url, Path(body_file).read_bytes(), int(connections), float(seconds)))
    print(json.dumps(stats))
    return 0 if stats["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
