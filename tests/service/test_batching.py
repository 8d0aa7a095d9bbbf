"""MicroBatcher and UnbatchedRunner on their own, with a recording model: merging, bounds, overload, drain."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from service.batching import MicroBatcher, UnbatchedRunner
from service.errors import ModelNotReady, Overloaded
from service.metrics import ServiceMetrics


class RecordingModel:
    """Answers each image's first pixel as its 'probabilities', and records every batch it was given."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        self.gate.wait(10)
        time.sleep(self.delay_s)
        self.batches.append(len(images))
        return np.repeat(images[:, :1, 0, 0], 10, axis=1).astype(np.float32)


def image(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 28, 28, 1), value, dtype=np.float32)


def run(coro_fn: Callable[[], object]) -> object:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def test_concurrent_requests_share_a_run_and_get_their_own_rows() -> None:
    model = RecordingModel()
    metrics = ServiceMetrics()

    async def scenario() -> list[np.ndarray]:
        batcher = MicroBatcher(model, max_batch_size=64, max_wait_s=0.05, queue_size=100, metrics=metrics)
        await batcher.start()
        try:
            return list(await asyncio.gather(*(batcher.predict(image(i / 100)) for i in range(40))))
        finally:
            await batcher.stop()

    results = run(scenario)
    assert isinstance(results, list)
    for i, probs in enumerate(results):
        assert probs.shape == (1, 10)
        assert probs[0, 0] == pytest.approx(i / 100)  # each caller gets its own row back
    assert sum(model.batches) == 40
    assert max(model.batches) > 1 and len(model.batches) < 40
    assert all(name.startswith("mnist-batch") for name in model.threads)  # never on the event loop's thread
    assert metrics.batch_size._sum.get() == 40  # type: ignore[attr-defined]


def test_batches_never_exceed_the_maximum_and_big_jobs_run_whole() -> None:
    model = RecordingModel()

    async def scenario() -> None:
        batcher = MicroBatcher(model, max_batch_size=16, max_wait_s=0.02, queue_size=1000)
        await batcher.start()
        singles = [batcher.predict(image(0.5)) for _ in range(100)]
        big = batcher.predict(image(0.25, n=50))  # larger than max_batch_size: one run of its own, not split
        results = await asyncio.gather(*singles, big)
        assert results[-1].shape == (50, 10)
        await batcher.stop()

    run(scenario)
    assert sum(model.batches) == 150
    assert 50 in model.batches
    assert all(size <= 16 for size in model.batches if size != 50)


def test_a_lone_request_waits_at_most_max_wait() -> None:
    model = RecordingModel()

    async def scenario() -> float:
        batcher = MicroBatcher(model, max_batch_size=64, max_wait_s=0.01, queue_size=10)
        await batcher.start()
        start = time.perf_counter()
        await batcher.predict(image(0.1))
        elapsed = time.perf_counter() - start
        await batcher.stop()
        return elapsed

    elapsed = run(scenario)
    assert isinstance(elapsed, float) and elapsed < 0.5
    assert model.batches == [1]


def test_without_a_wait_requests_that_arrive_during_a_run_form_the_next_batch() -> None:
    model = RecordingModel()
    model.gate.clear()

    async def scenario() -> float:
        batcher = MicroBatcher(model, max_batch_size=64, max_wait_s=0, queue_size=100)
        await batcher.start()
        start = time.perf_counter()
        first = asyncio.ensure_future(batcher.predict(image(0.1)))
        await asyncio.to_thread(model.entered.wait, 5)  # the idle model took the lone request at once
        started_after = time.perf_counter() - start
        during = [asyncio.ensure_future(batcher.predict(image(i / 10))) for i in range(10)]
        await asyncio.sleep(0.01)
        model.gate.set()
        results = await asyncio.gather(first, *during)
        assert [r[0, 0] for r in results[1:]] == pytest.approx([i / 10 for i in range(10)])
        await batcher.stop()
        return started_after

    started_after = run(scenario)
    assert isinstance(started_after, float) and started_after < 0.5
    assert model.batches == [1, 10]


def test_a_full_queue_is_refused_with_overloaded() -> None:
    model = RecordingModel()
    model.gate.clear()
    metrics = ServiceMetrics()

    async def scenario() -> None:
        batcher = MicroBatcher(model, max_batch_size=1, max_wait_s=0, queue_size=2, metrics=metrics)
        await batcher.start()
        running = asyncio.ensure_future(batcher.predict(image(0.1)))
        await asyncio.to_thread(model.entered.wait, 5)  # the first request holds the model
        queued = [asyncio.ensure_future(batcher.predict(image(0.2))) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 2
        with pytest.raises(Overloaded) as error:
            await batcher.predict(image(0.3))
        assert error.value.status_code == 503 and error.value.headers["Retry-After"]
        model.gate.set()
        assert len(await asyncio.gather(running, *queued)) == 3
        await batcher.stop()

    run(scenario)
    assert metrics.overloaded._value.get() == 1  # type: ignore[attr-defined]


def test_stop_answers_every_admitted_request_then_refuses_new_ones() -> None:
    model = RecordingModel(delay_s=0.01)

    async def scenario() -> None:
        # A long wait window: without a drain these requests would sit in the queue for a second.
        batcher = MicroBatcher(model, max_batch_size=8, max_wait_s=1.0, queue_size=100)
        await batcher.start()
        pending = [asyncio.ensure_future(batcher.predict(image(i / 30))) for i in range(30)]
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        await batcher.stop(timeout_s=5)
        assert time.perf_counter() - start < 0.9
        results = await asyncio.gather(*pending)
        assert [r[0, 0] for r in results] == pytest.approx([i / 30 for i in range(30)])
        with pytest.raises(ModelNotReady):
            await batcher.predict(image(0.5))

    run(scenario)
    assert sum(model.batches) == 30


def test_stop_gives_up_after_its_timeout() -> None:
    model = RecordingModel()
    model.gate.clear()

    async def scenario() -> None:
        batcher = MicroBatcher(model, max_batch_size=1, max_wait_s=0, queue_size=10)
        await batcher.start()
        stuck = asyncio.ensure_future(batcher.predict(image(0.1)))
        waiting = asyncio.ensure_future(batcher.predict(image(0.2)))
        await asyncio.to_thread(model.entered.wait, 5)
        await batcher.stop(timeout_s=0.1)
        with pytest.raises(ModelNotReady):
            await waiting
        # The request whose run never finished is answered too, not left hanging.
        with pytest.raises(ModelNotReady):
            await asyncio.wait_for(stuck, 1)
        model.gate.set()

    run(scenario)


def test_a_failing_run_fails_its_requests_only() -> None:
    calls = {"n": 0}

    def flaky(images: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return np.zeros((len(images), 10), np.float32)

    async def scenario() -> None:
        batcher = MicroBatcher(flaky, max_batch_size=4, max_wait_s=0, queue_size=10)
        await batcher.start()
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.predict(image(0.1))
        assert (await batcher.predict(image(0.1))).shape == (1, 10)
        await batcher.stop()

    run(scenario)


def test_cancelled_requests_do_not_disturb_the_others() -> None:
    model = RecordingModel()

    async def scenario() -> None:
        batcher = MicroBatcher(model, max_batch_size=64, max_wait_s=0.05, queue_size=100)
        await batcher.start()
        requests = [asyncio.ensure_future(batcher.predict(image(i / 10))) for i in range(10)]
        await asyncio.sleep(0)
        requests[3].cancel()
        done = await asyncio.gather(*requests, return_exceptions=True)
        assert isinstance(done[3], asyncio.CancelledError)
        assert [r[0, 0] for i, r in enumerate(done) if i != 3] == pytest.approx([i / 10 for i in range(10) if i != 3])
        await batcher.stop()

    run(scenario)
    assert sum(model.batches) == 9  # the abandoned request was not computed


def test_unbatched_runner_runs_each_request_alone_off_the_loop() -> None:
    model = RecordingModel(delay_s=0.005)

    async def scenario() -> None:
        runner = UnbatchedRunner(model, queue_size=100, threads=2)
        await runner.start()
        results = await asyncio.gather(*(runner.predict(image(i / 20)) for i in range(20)))
        assert [r[0, 0] for r in results] == pytest.approx([i / 20 for i in range(20)])
        await runner.stop()

    run(scenario)
    assert model.batches == [1] * 20
    assert all(name.startswith("mnist-infer") for name in model.threads)


def test_unbatched_runner_bounds_requests_in_flight() -> None:
    model = RecordingModel()
    model.gate.clear()

    async def scenario() -> None:
        runner = UnbatchedRunner(model, queue_size=2, threads=1)
        await runner.start()
        first = [asyncio.ensure_future(runner.predict(image(0.1))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await runner.predict(image(0.1))
        model.gate.set()
        await asyncio.gather(*first)
        await runner.stop()
        with pytest.raises(ModelNotReady):
            await runner.predict(image(0.1))

    run(scenario)
