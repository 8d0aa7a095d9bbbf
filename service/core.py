"""The data plane: one protocol-neutral path from a named model and images to answers with a verdict.

    plane = DataPlane(state)
    plane.resolve("mnist-cnn", None)                     # 404 / 503 before a body is read
    answer = await plane.infer("mnist-cnn", None, images) # float32 n × 28 × 28 in 0..1 → Answer
    answer.verdicts                                       # ["digit", "unsure", "not_a_digit", ...]

/v1 (:mod:`service.routes.predict` and :mod:`service.fastpath`), the Open Inference Protocol over REST
(:mod:`service.routes.v2`) and over gRPC (:mod:`service.grpc_server`) are thin adapters over this module: each
reads its own wire format into images, calls :meth:`DataPlane.infer`, and writes the :class:`Answer` back in its
own format. Resolving the model, admission by cost (in the model's runner), the lease that keeps a reload from
draining a model in use, the verdict and the per-model metrics happen here once. Nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt

from service.errors import ModelLoadFailed, ModelNotReady
from service.metrics import VERDICTS, ServiceMetrics
from service.model import NUM_CLASSES, FloatArray, OnnxClassifier, VerdictRule
from service.repository import ModelRepository, ModelSet, ServedModel
from service.settings import Settings
from service.tracing import NO_TRACING, Attributes, Tracing

IntArray = npt.NDArray[np.int64]

P = ParamSpec("P")
T = TypeVar("T")

#: Where a request's scope carries its :class:`RequestInfo` (read by the request log once it is answered).
REQUEST_INFO = "mnist_serve.request"


@dataclass
class RequestInfo:
    """What the data plane learnt about one request, for its log line and trace."""

    model: str | None = None
    version: str | None = None
    images: int = 0


def request_info(scope: MutableMapping[str, Any]) -> RequestInfo:
    """The request's :class:`RequestInfo`, created on first use."""
    info = scope.get(REQUEST_INFO)
    if not isinstance(info, RequestInfo):
        info = scope[REQUEST_INFO] = RequestInfo()
    return info


@dataclass
class ServiceState:
    """The app's collaborators and its readiness, in one place (``app.state.service``)."""

    settings: Settings
    metrics: ServiceMetrics
    repository: ModelRepository
    stopping: bool = False
    """Shutting down: no new inference is admitted."""
    draining: bool = False
    """SIGTERM arrived: readiness says 503 (so load balancers stop sending), while admitted requests finish."""

    @property
    def models(self) -> ModelSet | None:
        """The model set serving now (None until the first load succeeds)."""
        return self.repository.current

    @property
    def load_error(self) -> str | None:
        return self.repository.load_error

    @property
    def classifier(self) -> OnnxClassifier | None:
        """The default model."""
        return self.models.default.classifier if self.models is not None else None

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, batchers running, not shutting down."""
        return self.models is not None and self.models.default.classifier.warmed_up and not self.stopping

    def ready_models(self) -> ModelSet:
        """The serving model set, or the 503 that says why there is none."""
        if self.load_error is not None and self.models is None:
            raise ModelLoadFailed(self.load_error)
        models = self.models
        if models is None or not self.ready:
            raise ModelNotReady("shutting down" if self.stopping else "the model is not loaded yet")
        return models


@dataclass(frozen=True)
class Answer:
    """One model run's answer for n images: what every protocol returns, in its own format."""

    name: str
    version: str
    probabilities: FloatArray
    """float32 [n, 10], calibrated when the model is."""
    digits: IntArray
    confidence: FloatArray
    """The probability of each answered digit."""
    verdicts: list[str]
    """``digit``, ``unsure`` or ``not_a_digit`` per image (see :class:`~service.model.VerdictRule`)."""
    ood_scores: FloatArray | None = None

    def __len__(self) -> int:
        return len(self.digits)


def judge(rows: FloatArray, rule: VerdictRule) -> tuple[IntArray, FloatArray, list[str]]:
    """Digits, their confidence and the verdicts for model rows (ten probabilities, then the OOD score if any)."""
    probs = rows[:, :NUM_CLASSES]
    digits = probs.argmax(axis=1)  # the array methods: numpy's module functions add a wrapper per call
    confidence = probs.max(axis=1)
    codes = rule.codes(confidence, rows[:, NUM_CLASSES] if rows.shape[1] > NUM_CLASSES else None)
    return digits.astype(np.int64), confidence, [VERDICTS[c] for c in codes.tolist()]


class DataPlane:
    """Resolve a model, run images through its runner under a lease, answer with verdicts and metrics.

    Image decoding runs in a pool of its own, sized from the CPUs this worker may use (``decode_threads``): a burst
    of large uploads queues for it instead of decoding all at once, so decode memory is bounded by the pool size
    times one raster.

    ``tracing`` (:mod:`service.tracing`) gets an ``infer`` span per call with ``answer`` under it (the batcher adds
    ``queue`` and ``run``); front doors open their ``decode`` span with ``plane.tracing.span("decode")``.
    """

    def __init__(self, state: ServiceState, decode_threads: int = 1, *, tracing: Tracing = NO_TRACING) -> None:
        self.state = state
        self.decode_threads = decode_threads
        self.tracing = tracing
        self._decoder: ThreadPoolExecutor | None = None

    async def decode(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a decoding function in the decode pool (created on first use, in the serving process)."""
        if self._decoder is None:
            self._decoder = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="mnist-decode")
        return await asyncio.get_running_loop().run_in_executor(self._decoder, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)
            self._decoder = None

    @property
    def settings(self) -> Settings:
        return self.state.settings

    def resolve(self, model: str | None, version: str | None) -> ServedModel:
        """The model a request names, checked to be served and ready (404 / 503 otherwise), before its body."""
        return self.state.ready_models().resolve(model, version)

    async def infer(
        self, model: str | None, version: str | None, images: FloatArray, info: RequestInfo | None = None
    ) -> Answer:
        """Answers for ``images`` (float32 n × 28 × 28 in 0..1, white ink on black) from the model named.

        The model is resolved again here, without an ``await`` before its lease: a reload that happened while the
        body was read serves this request from the new set, and cannot drain the set this request uses.
        """
        models = self.state.ready_models()
        served = models.resolve(model, version)
        if info is not None:
            info.model, info.version, info.images = served.name, served.version, len(images)
        traced: Attributes = {
            "mnist.model": served.name,
            "mnist.version": served.version,
            "mnist.images": len(images),
        }
        with self.tracing.span("infer", traced):
            with models.lease():
                rows = await served.runner.predict(images[..., np.newaxis])
            with self.tracing.span("answer"):
                return self._answer(served, rows)

    @staticmethod
    def _answer(served: ServedModel, rows: FloatArray) -> Answer:
        digits, confidence, verdicts = judge(rows, served.classifier.verdict)
        served.metrics.observe_answers(digits, confidence, verdicts)
        return Answer(
            name=served.name,
            version=served.version,
            probabilities=np.ascontiguousarray(rows[:, :NUM_CLASSES]),
            digits=digits,
            confidence=confidence,
            verdicts=verdicts,
            ood_scores=rows[:, NUM_CLASSES] if rows.shape[1] > NUM_CLASSES else None,
        )
