"""The naive baseline the benchmark compares with: how one would serve the model in a few lines of FastAPI.

    python -m uvicorn bench.naive:app --port 8100 --no-access-log     # what `make bench` runs

A plain ``def`` route (FastAPI runs it in its thread pool), the body validated by pydantic as 28×28 integers in
0..255, one onnxruntime run per request on the shipped model (one intra-op thread, no spinning: the service's own
session options), no batching, one process. It answers the digit and the ten probabilities.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel, Field

MODEL = Path(os.environ.get("BENCH_MODEL", Path(__file__).resolve().parents[1] / "models" / "mnist-cnn.onnx"))

Pixel = Annotated[int, Field(ge=0, le=255)]
Row = Annotated[list[Pixel], Field(min_length=28, max_length=28)]


class Digit(BaseModel):
    pixels: Annotated[list[Row], Field(min_length=28, max_length=28)]
    scale: str = "0-255"


class Answer(BaseModel):
    digit: int
    probabilities: list[float]


options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
app = FastAPI()


@app.post("/v1/predict")
def predict(digit: Digit) -> Answer:
    x = np.asarray(digit.pixels, dtype=np.float32).reshape(1, 28, 28, 1) / 255.0
    probabilities = session.run(None, {"input": x})[0][0]
    return Answer(digit=int(probabilities.argmax()), probabilities=probabilities.tolist())


@app.get("/readyz")
def ready() -> dict[str, str]:
    return {"status": "ready"}
