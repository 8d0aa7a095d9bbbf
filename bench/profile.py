"""A py-spy flame graph of the service under the benchmark's concurrency-64 load.

    python -m bench.profile docs/flame-after.svg                               # this checkout, as shipped
    python -m bench.profile docs/flame-before.svg --server-cwd /path/to/older  # another checkout, the same way

Starts the service like ``make bench`` does, runs wrk with 64 connections posting one digit to /v1/predict, and
samples every server process (``py-spy record --subprocesses``, native frames off, idle frames off) for
``--seconds``. Needs py-spy (in the dev extra) and permission to trace (root, or ptrace allowed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench.run import ROOT, WRK_SCRIPT, mnist_serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="the SVG to write")
    parser.add_argument("--server-cwd", type=Path, default=ROOT)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--format", default="flamegraph", choices=["flamegraph", "raw", "speedscope"])
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not shutil.which("wrk") or not Path(py_spy).exists():
        print("needs wrk and py-spy", file=sys.stderr)
        return 2

    from training.data import load_test_set

    x, _ = load_test_set()
    body = json.dumps({"pixels": x[0].tolist(), "scale": "0-255"}).encode()
    with tempfile.TemporaryDirectory() as tmp, mnist_serve(args.model_dir, args.server_cwd) as server:
        body_path, script = Path(tmp, "body.json"), Path(tmp, "post.lua")
        body_path.write_bytes(body)
        script.write_text(WRK_SCRIPT)
        wrk = ["wrk", "-t2", "-c64", f"-d{args.seconds + 4}s", "-s", str(script), f"{server.url}/v1/predict"]
        load = threading.Thread(
            target=subprocess.run,
            args=(wrk,),
            kwargs={"env": {"BENCH_BODY": str(body_path), "PATH": "/usr/bin:/bin"}, "capture_output": True},
        )
        load.start()
        subprocess.run(
            [
                py_spy,
                "record",
                "--subprocesses",
                "--rate",
                str(args.rate),
                "--duration",
                str(args.seconds),
                "--format",
                args.format,
                "--output",
                str(args.output),
                "--pid",
                str(server.process.pid),
            ],
            check=True,
        )
        load.join()
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
