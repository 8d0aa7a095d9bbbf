"""The examples: the sample digit image is what examples/make_digit.py draws and the service reads it as a 7; the
Open Inference Protocol client says how to run it when it cannot.

    .venv/bin/python -m pytest tests/examples
"""

from __future__ import annotations

import runpy
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DIGIT = EXAMPLES / "digit-7.png"


def test_sample_digit_is_the_first_test_digit_drawn_dark_on_white() -> None:
    from training.data import load_test_set

    make_digit = runpy.run_path(str(EXAMPLES / "make_digit.py"))
    x, y = load_test_set()
    assert int(y[make_digit["INDEX"]]) == 7
    committed = np.asarray(Image.open(DIGIT).convert("L"))
    assert committed.shape == (140, 140)
    assert committed[0, 0] == 255 and committed.min() < 40  # white paper, dark ink
    # Regenerable: the committed file is what the script draws (within a grey level, across Pillow versions).
    drawn = np.asarray(make_digit["render"](x[make_digit["INDEX"]]))
    assert np.abs(drawn.astype(int) - committed.astype(int)).max() <= 1


def test_service_reads_the_sample_digit_as_a_seven() -> None:
    from service.main import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings())) as client:
        for _ in range(200):  # the models load in the background; /readyz turns 200 when they serve
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        answer = client.post("/v1/predict", files={"file": ("digit-7.png", DIGIT.read_bytes(), "image/png")})
    assert answer.status_code == 200, answer.text
    assert answer.json()["digit"] == 7
    assert answer.json()["confidence"] > 0.8


def run_client(*args: str, prelude: str = "pass") -> subprocess.CompletedProcess[str]:
    script = str(EXAMPLES / "triton_client.py")
    code = f"import runpy, sys; {prelude}; sys.argv = [{script!r}, *{list(args)!r}]; " + (
        f"runpy.run_path({script!r}, run_name='__main__')"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def test_client_without_tritonclient_says_how_to_run_it() -> None:
    result = run_client(prelude="sys.modules['tritonclient'] = None")  # as under a Python without it
    assert result.returncode != 0
    assert "is not installed" in result.stderr and "make example" in result.stderr, result.stderr


def test_client_without_a_server_says_how_to_start_one() -> None:
    pytest.importorskip("tritonclient.http")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket closes
    result = run_client("--url", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert "no mnist-serve answers" in result.stderr and "make run" in result.stderr, result.stderr
