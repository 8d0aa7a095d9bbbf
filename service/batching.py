"""Server-side micro-batching: concurrent requests share one onnxruntime run.

A request's images go into a bounded asyncio queue (created in the running loop, in ``start``). One consumer
takes the first waiting job together with every job already queued behind it (up to ``max_batch_size``
images), runs the concatenation in a worker thread (never on the event loop) and hands each request its rows.

The batching is opportunistic: a request that finds the model idle runs at once, alone, paying no wait; the
requests that arrive while a batch runs queue up and become the next batch. Low load therefore gets the
latency of a single run and high load gets large batches, without a timer to tune. ``max_wait_s`` (default 0)
adds an optional pause before each run for more requests to join: only worth it when the model's cost per
image falls steeply with batch size.

Admission is by cost (:class:`~service.admission.QueueBudget`): a request is refused at once with
:class:`~service.errors.Overloaded` (HTTP 503 + Retry-After) when the images already waiting would make it wait
longer than the budget, or would pass the image bound, or when ``queue_size`` requests wait — never by letting
latency grow without bound. ``stop`` stops admitting, answers everything already admitted, then exits.

Runs are split into at most ``max_run_images`` images (onnxruntime keeps the activations of the largest run it
has seen); a batch holding a request of at least ``wide_from`` images runs on ``predict_wide`` (the session with
more threads), so one large request uses every core while micro-batches of single images leave them to HTTP.

With batching disabled, :class:`UnbatchedRunner` runs each request on its own, still off the event loop and
with the same admission, so the two modes can be compared like for like.

Tracing (:mod:`service.tracing`, off unless configured): each request traced gets a ``queue`` span (admitted to
its run starting) and a ``run`` span (its batch's onnxruntime run, with the batch's images and requests) under
the span that was current when it was admitted (the data plane's ``infer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.admission import QueueBudget, usable_cpus
from service.errors import ModelNotReady, Overloaded
from service.metrics import ModelMetrics
from service.model import FloatArray
from service.tracing import NO_TRACING, Tracing

log = logging.getLogger(__name__)

PredictFn = Callable[[FloatArray], FloatArray]

#: A request of at least this many images runs on the wide session (``MNIST_SERVE_LARGE_REQUEST_THREADS``).
LARGE_REQUEST_IMAGES = 64

#: Without a budget given: wait and image bounds that never refuse a request a plain queue would admit.
UNBOUNDED = QueueBudget(max_images=1 << 40, max_wait_s=float("inf"))


class InferenceRunner(Protocol):
    """What the data plane needs from a batcher: admit images, answer their rows, report its backlog."""

    async def start(self) -> None: ...

    async def stop(self, timeout_s: float = ...) -> None: ...

    async def predict(self, images: FloatArray) -> FloatArray: ...

    @property
    def queue_depth(self) -> int: ...

    def fail_pending(self) -> None: ...


class _Timed:
    """The model's predict functions, split into runs of at most ``max_run_images``, each one timed and recorded."""

    def __init__(
        self,
        predict: PredictFn,
        predict_wide: PredictFn | None,
        max_run_images: int | None,
        budget: QueueBudget,
        metrics: ModelMetrics | None,
    ) -> None:
        self._predict = predict
        self._predict_wide = predict_wide or predict
        self._max = max_run_images
        self._budget = budget
        self._metrics = metrics

    def __call__(self, images: FloatArray, wide: bool = False) -> FloatArray:
        predict = self._predict_wide if wide else self._predict
        step = self._max or len(images)
        outputs = []
        for i in range(0, len(images), step):
            chunk = images[i : i + step]
            start = time.perf_counter()
            outputs.append(predict(chunk))
            seconds = time.perf_counter() - start
            self._budget.observe_run(len(chunk), seconds)
            if self._metrics is not None:
                self._metrics.observe_run(len(chunk), seconds)
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)


@dataclass(eq=False)
class _Job:
    images: FloatArray
    future: asyncio.Future[FloatArray]
    admitted: float = field(default_factory=time.perf_counter)
    started: bool = False
    trace: object | None = None  # the trace context to record its queue and run spans under


_STOP = object()


class _Admission:
    """Shared by both runners: the queue budget, the request bound, and the metrics of refusals."""

    def __init__(self, queue_size: int, budget: QueueBudget | None, metrics: ModelMetrics | None) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.queue_size = queue_size
        self.budget = budget if budget is not None else QueueBudget(UNBOUNDED.max_images, UNBOUNDED.max_wait_s)
        self.metrics = metrics

    def admit(self, images: int, waiting_requests: int) -> None:
        try:
            if waiting_requests >= self.queue_size:
                raise Overloaded(f"the inference queue is full ({self.queue_size} requests waiting), retry later")
            self.budget.admit(images)
        except Overloaded:
            if self.metrics is not None:
                self.metrics.observe_overloaded()
            raise

    def report(self, requests: int) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(requests)
            self.metrics.queue_images.set(self.budget.queued_images)


class MicroBatcher:
    """Gathers concurrent requests into one model run (see the module docstring)."""

    def __init__(
        self,
        predict: PredictFn,
        *,
        predict_wide: PredictFn | None = None,
        wide_from: int = LARGE_REQUEST_IMAGES,
        max_run_images: int | None = None,
        max_batch_size: int = 64,
        max_wait_s: float = 0.0,
        queue_size: int = 1024,
        budget: QueueBudget | None = None,
        metrics: ModelMetrics | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_s >= 0")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.wide_from = wide_from
        self._admission = _Admission(queue_size, budget, metrics)
        self._infer = _Timed(predict, predict_wide, max_run_images, self._admission.budget, metrics)
        self._metrics = metrics
        self._tracing = tracing
        self._queue: asyncio.Queue[_Job | object] | None = None
        self._carry: _Job | None = None
        self._inflight: list[_Job] = []
        self._gathering = 0  # jobs taken off the queue for the batch being formed, not yet running
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._accepting = False

    @property
    def queue_size(self) -> int:
        return self._admission.queue_size

    @property
    def budget(self) -> QueueBudget:
        return self._admission.budget

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
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mnist-batch")
        self._task = asyncio.get_running_loop().create_task(self._consume(), name="mnist-micro-batcher")
        self._accepting = True

    async def predict(self, images: FloatArray) -> FloatArray:
        """Model rows for ``images`` (float32 [n, 28, 28, 1]), computed in a shared batch."""
        if not self._accepting or self._queue is None:
            raise ModelNotReady("the service is not accepting inference requests (starting or shutting down)")
        self._admission.admit(len(images), self.queue_depth)
        job = _Job(images, asyncio.get_running_loop().create_future(), trace=self._tracing.capture())
        self._queue.put_nowait(job)
        self._admission.report(self.queue_depth)
        try:
            return await job.future
        finally:
            if not job.started:  # the client left (or the drain failed it) before its run: free its place
                job.started = True
                self.budget.started(len(images))

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop admitting; answer every admitted request (within ``timeout_s`` in all); release the worker thread."""
        self._accepting = False
        if self._task is None or self._queue is None:
            return
        try:
            # The marker queues behind every admitted job, so the consumer reaches it only after answering them.
            self._queue.put_nowait(_STOP)
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
            self._admission.report(self.queue_depth)

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
            await self._run(jobs)
            self._inflight = []
            if stopping and self._carry is not None:
                carried, self._carry = self._carry, None
                self._inflight = [carried]
                await self._run(self._inflight)
                self._inflight = []

    async def _run(self, jobs: list[_Job]) -> None:
        now = time.perf_counter()
        for job in jobs:
            if not job.started:
                job.started = True
                self.budget.started(len(job.images))
                if self._metrics is not None and not job.future.done():
                    self._metrics.queue_seconds.observe(now - job.admitted)
        self._admission.report(self.queue_depth)
        live = [job for job in jobs if not job.future.done()]  # clients that gave up are not computed
        if not live:
            return
        loop = asyncio.get_running_loop()
        try:
            # Inside the try: a failure here (e.g. MemoryError) must fail these requests, not end the consumer.
            images = live[0].images if len(live) == 1 else np.concatenate([job.images for job in live])
            wide = any(len(job.images) >= self.wide_from for job in live)
            probs = await loop.run_in_executor(self._executor, self._infer, images, wide)
        except Exception as exc:
            log.exception("inference failed for a batch of %d requests", len(live))
            if self._tracing.enabled:
                self._trace(live, now, time.perf_counter(), exc)
            for job in live:
                if not job.future.done():
                    if self._metrics is not None:
                        self._metrics.failed.inc()
                    job.future.set_exception(exc)
            return
        if self._tracing.enabled:
            self._trace(live, now, time.perf_counter())
        offset = 0
        for job in live:
            n = len(job.images)
            if not job.future.done():
                job.future.set_result(probs[offset : offset + n])
            offset += n

    def _trace(self, jobs: list[_Job], start: float, end: float, error: BaseException | None = None) -> None:
        batch = {"mnist.batch.images": sum(len(job.images) for job in jobs), "mnist.batch.requests": len(jobs)}
        for job in jobs:
            if job.trace is not None:
                self._tracing.record("queue", job.trace, job.admitted, start)
                self._tracing.record("run", job.trace, start, end, batch, error)

    def fail_pending(self) -> None:
        """The drain ran out of time: every request admitted and not answered gets 503 now (never a cancellation)."""
        self._accepting = False
        self._fail_pending()

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


class UnbatchedRunner:
    """One model run per request, in a thread pool, with the same admission as the micro-batcher."""

    def __init__(
        self,
        predict: PredictFn,
        *,
        predict_wide: PredictFn | None = None,
        wide_from: int = LARGE_REQUEST_IMAGES,
        max_run_images: int | None = None,
        queue_size: int = 1024,
        threads: int | None = None,
        budget: QueueBudget | None = None,
        metrics: ModelMetrics | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.threads = threads or usable_cpus()
        self.wide_from = wide_from
        self._admission = _Admission(queue_size, budget, metrics)
        self._infer = _Timed(predict, predict_wide, max_run_images, self._admission.budget, metrics)
        self._metrics = metrics
        self._tracing = tracing
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: set[asyncio.Future[FloatArray]] = set()
        self._accepting = False
        self._abandoned = False

    @property
    def queue_size(self) -> int:
        return self._admission.queue_size

    @property
    def queue_depth(self) -> int:
        return len(self._in_flight)

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="mnist-infer")
        self._accepting = True

    def _leave_queue(self, ticket: list[bool], images: int) -> None:
        """On the event loop: the request's images stop counting as queued, once (its run starts, or it is gone)."""
        if not ticket[0]:
            ticket[0] = True
            self._admission.budget.started(images)

    def _job(
        self,
        images: FloatArray,
        admitted: float,
        loop: asyncio.AbstractEventLoop,
        ticket: list[bool],
        trace: object | None = None,
    ) -> FloatArray:
        # Runs in the pool. After a drain that timed out, queued jobs answer 503 instead of being cancelled (a
        # cancelled future would end the request without an answer).
        loop.call_soon_threadsafe(self._leave_queue, ticket, len(images))
        if self._abandoned:
            raise ModelNotReady("the service shut down before this request ran")
        start = time.perf_counter()
        if self._metrics is not None:
            self._metrics.queue_seconds.observe(start - admitted)
        if trace is None:
            return self._infer(images, len(images) >= self.wide_from)
        self._tracing.record("queue", trace, admitted, start)
        batch = {"mnist.batch.images": len(images), "mnist.batch.requests": 1}
        try:
            rows = self._infer(images, len(images) >= self.wide_from)
        except Exception as exc:
            self._tracing.record("run", trace, start, time.perf_counter(), batch, exc)
            raise
        self._tracing.record("run", trace, start, time.perf_counter(), batch)
        return rows

    async def predict(self, images: FloatArray) -> FloatArray:
        if not self._accepting:
            raise ModelNotReady("the service is not accepting inference requests (starting or shutting down)")
        self._admission.admit(len(images), len(self._in_flight))
        loop = asyncio.get_running_loop()
        ticket = [False]  # whether its images have left the queue's count (on the event loop only)
        future = loop.run_in_executor(
            self._executor, self._job, images, time.perf_counter(), loop, ticket, self._tracing.capture()
        )
        self._in_flight.add(future)
        self._admission.report(len(self._in_flight))
        try:
            return await future
        except Exception:
            if self._metrics is not None and not isinstance(future.exception(), ModelNotReady):
                self._metrics.failed.inc()
            raise
        finally:
            # A request cancelled while it waited for the pool never runs _job: its images must not stay counted
            # (a leak that, once it passed the wait budget, would refuse every request to the model).
            self._leave_queue(ticket, len(images))
            self._in_flight.discard(future)
            self._admission.report(len(self._in_flight))

    def fail_pending(self) -> None:
        """The drain ran out of time: requests not yet running get 503 when their turn comes."""
        self._accepting = False
        self._abandoned = True

    async def stop(self, timeout_s: float = 10.0) -> None:
        self._accepting = False
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=timeout_s)
            if pending:
                log.warning(
                    "%d unbatched requests did not finish within %.1f s; answering 503", len(pending), timeout_s
                )
                self._abandoned = True
        if self._executor is not None:
            self._executor.shutdown(wait=False)
