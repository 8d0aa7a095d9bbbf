"""MicroBatcher and UnbatchedRunner on their own, with a recording model: merging, bounds, overload, drain."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from service.admission import QueueBudget
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
    metrics = ServiceMetrics().for_model("m", "1")

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
    assert metrics.run_size._sum.get() == 40  # type: ignore[attr-defined]
    assert metrics.queue_seconds._sum.get() > 0  # type: ignore[attr-defined]


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
    service_metrics = ServiceMetrics()
    metrics = service_metrics.for_model("m", "1")

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
    assert service_metrics.overloaded._value.get() == 1  # type: ignore[attr-defined]
    assert metrics.refused._value.get() == 1  # type: ignore[attr-defined]


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


# --- admission by cost, runs, shutdown -----------------------------------------------------------------------


def test_admission_counts_images_and_refuses_a_wait_past_the_budget_fast() -> None:
    """A queue of large requests makes a small one wait: past the wait budget it is refused at once, not queued."""
    model = RecordingModel()
    model.gate.clear()

    async def scenario() -> None:
        budget = QueueBudget(max_images=10_000, max_wait_s=0.5, seconds_per_image=0.001)
        batcher = MicroBatcher(model, max_batch_size=64, max_wait_s=0, queue_size=1000, budget=budget)
        await batcher.start()
        running = asyncio.ensure_future(batcher.predict(image(0.1, n=1000)))
        await asyncio.to_thread(model.entered.wait, 5)  # 1,000 images hold the model
        behind = asyncio.ensure_future(batcher.predict(image(0.2, n=300)))  # nothing waits yet: admitted
        small = asyncio.ensure_future(batcher.predict(image(0.3)))  # 300 ms of work ahead: within 500 ms
        also = asyncio.ensure_future(batcher.predict(image(0.3, n=300)))  # 301 ms ahead: admitted
        await asyncio.sleep(0.01)
        assert budget.queued_images == 601 and batcher.queue_depth == 3
        started = time.perf_counter()
        with pytest.raises(Overloaded) as refused:
            await batcher.predict(image(0.4))  # 601 ms of work ahead: past the budget
        assert time.perf_counter() - started < 0.1
        assert refused.value.headers["Retry-After"] == "1" and "601 images" in refused.value.message
        model.gate.set()
        await asyncio.gather(running, behind, small, also)
        assert budget.queued_images == 0
        assert budget.seconds_per_image < 0.001  # learnt from the runs (the recording model is fast)
        await batcher.stop()

    run(scenario)


def test_the_image_bound_holds_even_when_the_model_is_fast() -> None:
    budget = QueueBudget(max_images=100, max_wait_s=60, seconds_per_image=1e-6)
    budget.admit(80)
    with pytest.raises(Overloaded):
        budget.admit(30)
    budget.admit(20)
    budget.started(100)
    budget.admit(500)  # an idle queue always admits: one large request can run on an idle model


def test_runs_are_split_timed_and_large_requests_go_wide() -> None:
    narrow, wide = RecordingModel(), RecordingModel()
    metrics = ServiceMetrics().for_model("m", "1")

    async def scenario() -> None:
        batcher = MicroBatcher(
            narrow, predict_wide=wide, wide_from=64, max_run_images=32, max_batch_size=64, metrics=metrics
        )
        await batcher.start()
        await batcher.predict(image(0.1, n=100))  # a large request: on the wide session, in runs of 32
        await batcher.predict(image(0.1, n=5))
        await batcher.stop()

    run(scenario)
    assert wide.batches == [32, 32, 32, 4] and narrow.batches == [5]
    assert metrics.run_size._sum.get() == 105  # type: ignore[attr-defined]
    assert metrics.compute_seconds._sum.get() > 0  # type: ignore[attr-defined]


def test_stop_takes_at_most_its_timeout_and_fails_what_is_left_with_503() -> None:
    model = RecordingModel()
    model.gate.clear()

    async def scenario() -> None:
        batcher = MicroBatcher(model, max_batch_size=1, max_wait_s=0, queue_size=10)
        await batcher.start()
        stuck = asyncio.ensure_future(batcher.predict(image(0.1)))
        await asyncio.to_thread(model.entered.wait, 5)
        waiting = asyncio.ensure_future(batcher.predict(image(0.2)))
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        await batcher.stop(timeout_s=0.3)
        assert time.perf_counter() - started < 0.45  # one deadline for the whole drain, not one per step
        for request in (stuck, waiting):
            with pytest.raises(ModelNotReady):
                await request
        model.gate.set()

    run(scenario)


def test_unbatched_stop_answers_503_to_requests_it_could_not_run() -> None:
    """After a drain that timed out, requests still queued get 503 (ModelNotReady), never a cancellation."""
    model = RecordingModel()
    model.gate.clear()

    async def scenario() -> None:
        runner = UnbatchedRunner(model, queue_size=10, threads=1)
        await runner.start()
        stuck = asyncio.ensure_future(runner.predict(image(0.1)))
        await asyncio.to_thread(model.entered.wait, 5)
        queued = asyncio.ensure_future(runner.predict(image(0.2)))
        await asyncio.sleep(0.01)
        await runner.stop(timeout_s=0.2)
        model.gate.set()
        assert (await stuck).shape == (1, 10)  # the run in progress still answers
        with pytest.raises(ModelNotReady):
            await queued
        assert not queued.cancelled()

    run(scenario)


def test_a_request_cancelled_while_it_waits_gives_its_images_back() -> None:
    """UnbatchedRunner counted a request cancelled in the pool's queue (a gRPC deadline) as waiting for ever."""
    model = RecordingModel(delay_s=0.3)

    async def scenario() -> int:
        budget = QueueBudget(max_images=4096, max_wait_s=0.5)
        runner = UnbatchedRunner(model, threads=1, budget=budget)
        await runner.start()
        first = asyncio.ensure_future(runner.predict(image(0.1)))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(runner.predict(image(0.2)))
        await asyncio.sleep(0.05)
        queued.cancel()
        await first
        await asyncio.sleep(0.4)
        await runner.stop(1)
        return budget.queued_images

    assert run(scenario) == 0
