"""Every limit in one place: what one request may cost, decided before any large allocation, and what refuses it.

    budget = JsonBudget.for_predict()           # the most arrays and values a /v1/predict body can hold
    budget.check(chunk)                         # per chunk, as the body arrives: 413 as soon as it is over
    queue = QueueBudget(max_images=4096, max_wait_s=0.5)
    queue.admit(n_images, queued_images)        # 503 + Retry-After when the wait would pass the budget
    async with bodies.hold(content_length): ... # 503 when the process already holds too many body bytes

The limits, their settings and what a client gets are tabulated in docs/limits.md. The connection-level limits
(header size and time, idle and body-read time, connections) live in :mod:`service.server`; the image-decode
limits (pixels per image and per request, raster bytes, the decode pool) in :mod:`service.preprocess`, sized from
:func:`usable_cpus` here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from service.cpus import usable_cpus
from service.errors import Overloaded, PayloadTooLarge

log = logging.getLogger(__name__)

#: Arrays in one 28×28 ``pixels`` value (the outer one and its 28 rows), and numbers in it.
PIXEL_ARRAYS, PIXEL_VALUES = 29, 784
#: Slack for the arrays, values and objects that surround the pixels (options, ``items``, a few unknown fields).
SLACK = 16
#: A body may hold this many times the structure of the largest valid request before it is refused unread:
#: a bounded overshoot keeps the precise error (e.g. ``too_many_items`` with the count) for near misses.
OVERSHOOT = 2


@dataclass
class JsonBudget:
    """The most ``[`` (arrays) and ``,`` (roughly, values) a JSON body may hold, counted as it arrives.

    Counting bytes is what keeps an amplification body — ``{"pixels": [[],[],...]}`` in 16 MB builds millions of
    Python lists — from being parsed at all: no valid request holds more than :data:`OVERSHOOT` times the
    structure of the largest one. Strings in valid requests (base64, the scale) hold neither character.
    """

    what: str
    max_arrays: int
    max_commas: int
    arrays: int = 0
    commas: int = 0
    only_first: int | None = None
    """Count only the first this many bytes of the body (the JSON header of a body with binary tensors after it)."""
    seen: int = 0

    @classmethod
    def for_predict(cls) -> JsonBudget:
        return cls("a /v1/predict body", OVERSHOOT * (PIXEL_ARRAYS + SLACK), OVERSHOOT * (PIXEL_VALUES + SLACK))

    @classmethod
    def for_batch(cls, max_items: int) -> JsonBudget:
        return cls(
            f"a /v1/predict/batch body of at most {max_items} items",
            OVERSHOOT * (max_items * PIXEL_ARRAYS + SLACK),
            OVERSHOOT * (max_items * (PIXEL_VALUES + SLACK) + SLACK),
        )

    @classmethod
    def for_tensor(cls, max_images: int) -> JsonBudget:
        # Nested [N, 28, 28, 1] is the most arrays a valid tensor can take: 1 + 28 + 28 × 28 per image.
        return cls(
            f"an inference request of at most {max_images} images",
            OVERSHOOT * (max_images * (1 + 28 + PIXEL_VALUES) + SLACK),
            OVERSHOOT * (max_images * PIXEL_VALUES + SLACK * 4),
        )

    def check(self, chunk: bytes | bytearray | memoryview) -> None:
        """Count ``chunk``; :class:`PayloadTooLarge` (``json_too_complex``) once the body is over the budget."""
        data = bytes(chunk) if isinstance(chunk, memoryview) else chunk
        if self.only_first is not None:
            data = data[: max(0, self.only_first - self.seen)]
            self.seen += len(chunk)
        self.arrays += data.count(b"[")
        self.commas += data.count(b",")
        if self.arrays > self.max_arrays or self.commas > self.max_commas:
            raise PayloadTooLarge(
                f"the JSON holds more arrays or values than {self.what} can (at most {self.max_arrays} arrays "
                f"and {self.max_commas} values)",
                code="json_too_complex",
            )


@dataclass
class BodyBudget:
    """Request-body bytes this process holds at once, across all requests (one per process, shared).

    A request takes its declared Content-Length up front (or its chunks as they arrive) and gives it back when it
    is answered. Past the budget the request is refused at once with 503, so that many large uploads at the same
    time cannot exhaust memory however the connection limits are set.
    """

    max_bytes: int
    held: int = 0

    def take(self, n: int) -> None:
        if n > 0 and self.held + n > self.max_bytes and self.held > 0:
            raise Overloaded(
                f"the service is already receiving {self.held} bytes of request bodies (at most {self.max_bytes}), "
                "retry later",
                code="too_many_bytes",
            )
        self.held += n

    def give_back(self, n: int) -> None:
        if n > self.held:
            log.warning("body budget: %d bytes given back but %d held (an accounting bug)", n, self.held)
        self.held = max(0, self.held - n)

    @asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        self.take(n)
        try:
            yield
        finally:
            self.give_back(n)


@dataclass
class QueueBudget:
    """Admission by cost for one model's queue: images waiting, and how long the newest would wait.

    The wait is estimated from the images already admitted and the model's measured seconds per image (a moving
    average over its runs). A request is refused with 503 and a Retry-After of that wait when it would pass
    ``max_wait_s`` or ``max_images`` — unless nothing is waiting, so that one large request can always run on an
    idle model. Refusing at the door keeps the latency of what is admitted bounded (Triton's queue policy).
    """

    max_images: int
    max_wait_s: float
    seconds_per_image: float = 0.001
    queued_images: int = 0
    _samples: int = field(default=0, repr=False)

    def estimated_wait_s(self, extra_images: int = 0) -> float:
        return (self.queued_images + extra_images) * self.seconds_per_image

    def admit(self, n: int) -> None:
        """Count ``n`` more images waiting, or raise :class:`Overloaded` without counting them."""
        if self.queued_images > 0:
            wait = self.estimated_wait_s()
            if self.queued_images + n > self.max_images or wait > self.max_wait_s:
                raise Overloaded(
                    f"{self.queued_images} images are already waiting for this model (about {wait * 1000:.0f} ms "
                    f"of work; the limits are {self.max_images} images and {self.max_wait_s * 1000:.0f} ms), "
                    "retry later",
                    retry_after_s=max(1, math.ceil(wait)),
                )
        self.queued_images += n

    def started(self, n: int) -> None:
        """``n`` admitted images left the queue for a model run."""
        if n > self.queued_images:
            log.warning(
                "queue budget: %d images left the queue but %d were queued (an accounting bug)", n, self.queued_images
            )
        self.queued_images = max(0, self.queued_images - n)

    def observe_run(self, images: int, seconds: float) -> None:
        """Fold one run's cost per image into the moving average (the first runs count fully)."""
        if images <= 0 or seconds <= 0:
            return
        per_image = seconds / images
        self._samples += 1
        weight = max(0.05, 1.0 / self._samples)
        self.seconds_per_image += weight * (per_image - self.seconds_per_image)


__all__ = ["BodyBudget", "JsonBudget", "QueueBudget", "usable_cpus"]
