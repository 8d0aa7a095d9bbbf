"""Server-side micro-batching: concurrent requests share one onnxruntime run.

A request's images go into a bounded asyncio queue (created in the running loop, in ``start``). One consumer
takes the first waiting job together with every job already queued behind it (up to ``max_batch_size``
images), runs the concatenation in a worker thread (never on the event loop) and hands each request its rows.

The batching is opportunistic: a request that finds the model idle runs at once, alone, paying no wait; the
requests that arrive while a batch runs queue up and become the next batch. Low load therefore gets the
latency of a single run and high load gets large batches, without a timer to tune. ``max_wait_s`` (default 0)
adds an optional pause before each run for more requests to join: only worth it when the model's cost per
image falls steeply with batch size.

A full queue is refused at once with :class:`~service.errors.Overloaded` (HTTP 503 + Retry-After) rather than
letting latency grow without bound. ``stop`` stops admitting, answers everything already admitted, then exits.

With batching disabled, :class:`UnbatchedRunner` runs each request on its own, still off the event loop and
with the same admission bound, so the two modes can be compared like for like.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.errors import ModelNotReady, Overloaded
from service.metrics import ServiceMetrics
from service.model import FloatArray

log = logging.getLogger(__name__)

PredictFn = Callable[[FloatArray], FloatArray]


class InferenceRunner(Protocol):
    """What the routes need from a batcher: admit images, answer probabilities, report its backlog."""

    async def start(self) -> None: ...

    async def stop(self, timeout_s: float = ...) -> None: ...

    async def predict(self, images: FloatArray) -> FloatArray: ...

    @property
    def queue_depth(self) -> int: ...


class _Timed:
    """Wraps the model's predict: times each run and records batch size and duration."""

    def __init__(self, predict: PredictFn, metrics: ServiceMetrics | None) -> None:
        self._predict = predict
        self._metrics = metrics

    def __call__(self, images: FloatArray) -> FloatArray:
        start = time.perf_counter()
        probs = self._predict(images)
        if self._metrics is not None:
            self._metrics.observe_batch(len(images), time.perf_counter() - start)
        return probs


@dataclass(eq=False)
class _Job:
    images: FloatArray
    future: asyncio.Future[FloatArray]


_STOP = object()


class MicroBatcher:
    """Gathers concurrent requests into one model run (see the module docstring)."""

    def __init__(
        self,
        predict: PredictFn,
        *,
        max_batch_size: int = 64,
        max_wait_s: float = 0.0,
        queue_size: int = 1024,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        if max_batch_size < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and queue_size must be >= 1 and max_wait_s >= 0")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self._infer = _Timed(predict, metrics)
        self._metrics = metrics
        self._queue: asyncio.Queue[_Job | object] | None = None
        self._carry: _Job | None = None
        self._inflight: list[_Job] = []
        self._gathering = 0  # jobs taken off the queue for the batch being formed, not yet running
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._accepting = False

    @property
    def queue_depth(self) -> int:
        """Requests admitted and not yet running: queued, or gathered into a batch that has not started."""
        if self._queue is None:
            return 0
        return self._queue.qsize() + (self._carry is not None) + self._gathering

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("MicroBatcher already started")
        # Created here, not in __init__, so the queue belongs to the loop that serves the requests.
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mnist-batch")
        self._task = asyncio.get_running_loop().create_task(self._consume(), name="mnist-micro-batcher")
        self._accepting = True

    async def predict(self, images: FloatArray) -> FloatArray:
        """Probabilities for ``images`` (float32 [n, 28, 28, 1]), computed in a shared batch."""
        if not self._accepting or self._queue is None:
            raise ModelNotReady("the service is not accepting inference requests (starting or shutting down)")
        job = _Job(images, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            if self._metrics is not None:
                self._metrics.overloaded.inc()
            raise Overloaded(f"the inference queue is full ({self.queue_size} requests waiting), retry later") from None
        self._report_depth()
        return await job.future

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop admitting; answer every admitted request (up to ``timeout_s``); release the worker thread."""
        self._accepting = False
        if self._task is None or self._queue is None:
            return
        try:
            # The marker queues behind every admitted job, so the consumer reaches it only after answering them.
            await asyncio.wait_for(self._queue.put(_STOP), timeout_s)
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            log.warning("micro-batcher did not drain within %.1f s; failing the remaining requests", timeout_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._fail_pending()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            self._report_depth()

    async def _next(self) -> _Job | object:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        assert self._queue is not None
        return await self._queue.get()

    async def _consume(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._next()
            if first is _STOP:
                return
            assert isinstance(first, _Job)
            jobs, rows = [first], len(first.images)
            self._inflight = jobs  # gathered or running: failed by stop() if the drain times out
            self._gathering = 1
            deadline = loop.time() + self.max_wait_s
            while rows < self.max_batch_size:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                if item is _STOP:
                    stopping = True
                    break
                assert isinstance(item, _Job)
                if rows + len(item.images) > self.max_batch_size:
                    self._carry = item  # too big to join: it opens the next batch
                    break
                jobs.append(item)
                rows += len(item.images)
                self._gathering = len(jobs)
            self._gathering = 0
            self._report_depth()
            await self._run(jobs)
            self._inflight = []
            if stopping and self._carry is not None:
                carried, self._carry = self._carry, None
                self._inflight = [carried]
                await self._run(self._inflight)
                self._inflight = []

    async def _run(self, jobs: list[_Job]) -> None:
        live = [job for job in jobs if not job.future.done()]  # clients that gave up are not computed
        if not live:
            return
        loop = asyncio.get_running_loop()
        try:
            # Inside the try: a failure here (e.g. MemoryError) must fail these requests, not end the consumer.
            images = live[0].images if len(live) == 1 else np.concatenate([job.images for job in live])
            probs = await loop.run_in_executor(self._executor, self._infer, images)
        except Exception as exc:
            log.exception("inference failed for a batch of %d requests", len(live))
            for job in live:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        offset = 0
        for job in live:
            n = len(job.images)
            if not job.future.done():
                job.future.set_result(probs[offset : offset + n])
            offset += n

    def _fail_pending(self) -> None:
        pending = [*self._inflight, *([self._carry] if self._carry is not None else [])]
        self._inflight, self._carry = [], None
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, _Job):
                pending.append(item)
        for job in pending:
            if not job.future.done():
                job.future.set_exception(ModelNotReady("the service shut down before this request ran"))

    def _report_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self.queue_depth)


class UnbatchedRunner:
    """One model run per request, in a thread pool, with at most ``queue_size`` requests admitted at once."""

    def __init__(
        self,
        predict: PredictFn,
        *,
        queue_size: int = 1024,
        threads: int | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.queue_size = queue_size
        self.threads = threads or os.cpu_count() or 1
        self._infer = _Timed(predict, metrics)
        self._metrics = metrics
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: set[asyncio.Future[FloatArray]] = set()
        self._accepting = False

    @property
    def queue_depth(self) -> int:
        return len(self._in_flight)

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="mnist-infer")
        self._accepting = True

    async def predict(self, images: FloatArray) -> FloatArray:
        if not self._accepting:
            raise ModelNotReady("the service is not accepting inference requests (starting or shutting down)")
        if len(self._in_flight) >= self.queue_size:
            if self._metrics is not None:
                self._metrics.overloaded.inc()
            raise Overloaded(f"{self.queue_size} requests are already in flight, retry later")
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._infer, images)
        self._in_flight.add(future)
        self._report_depth()
        try:
            return await future
        finally:
            self._in_flight.discard(future)
            self._report_depth()

    async def stop(self, timeout_s: float = 10.0) -> None:
        self._accepting = False
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout_s)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _report_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self.queue_depth)
