"""The batcher: images from many requests, captioned together in shared model calls by one worker thread.

Requests decode their uploads themselves and `submit` the pictures; the worker takes the oldest waiting
image, waits at most `max_wait_ms` for others with the same (model, options) to arrive, and captions up
to `max_batch` of them in one `captioner(...)` call. One thread runs every model call, so the process
holds one instance of each model and torch's CPU threads are never oversubscribed by parallel calls.
The queue is bounded in images: past `queue_size` waiting images `submit` raises QueueFull at once,
and the server answers 503 instead of letting memory pile up.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from imcap.captioner import Captioner, CaptionResult
from imcap.generation import CaptionOptions

if TYPE_CHECKING:
    from imcap.explain import Explanation

_SECONDS_PER_IMAGE_GUESS = 0.2  # Retry-After estimate before the first batch has been timed
_SMOOTHING = 0.2  # weight of the newest batch in the moving average of seconds per image


class QueueFull(Exception):
    """The queue holds `queue_size` images already; try again after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"server busy: the caption queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    """The batcher was closed before this image was captioned."""


@dataclass(frozen=True)
class Captioned:
    """One image's result and how it was produced."""

    result: CaptionResult
    queued_s: float  # from submit to the start of its model call
    model_s: float  # duration of the model call (shared by the whole batch)
    batch_images: int  # images in that model call
    explanation: Explanation | None = None  # where the model looked per word, when the request asked


@dataclass
class _Item:
    key: tuple[str, CaptionOptions]  # images are batched only with others of the same model and options
    image: Image.Image
    future: Future
    submitted: float
    attention: bool = False  # also explain the caption (imcap.explain); not part of the key: batches mix


class Batcher:
    """Bounded queue + one worker thread; `submit` is thread-safe and never blocks on the model."""

    def __init__(
        self,
        captioners: Mapping[str, Captioner],
        queue_size: int = 64,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
    ):
        self.captioners = dict(captioners)
        self.queue_size, self.max_batch, self.max_wait_s = queue_size, max_batch, max_wait_ms / 1000
        self._pending: deque[_Item] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._seconds_per_image = _SECONDS_PER_IMAGE_GUESS
        self._worker = threading.Thread(target=self._run, name="imcap-batcher", daemon=True)
        self._worker.start()

    @property
    def pending(self) -> int:
        """Images waiting for a model call (the one running is not counted)."""
        return len(self._pending)

    def submit(
        self, model: str, images: Sequence[Image.Image], options: CaptionOptions, attention: bool = False
    ) -> list[Future]:
        """Queue `images` for `model`; one Future per image, resolving to a `Captioned` (with the
        caption's `explanation` when `attention`).

        All or nothing: raises QueueFull when they do not all fit, KeyError for an unknown model.
        """
        if model not in self.captioners:
            raise KeyError(model)
        now = time.monotonic()
        items = [_Item((model, options), image, Future(), now, attention) for image in images]
        with self._condition:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) + len(items) > self.queue_size:
                raise QueueFull(self._retry_after_s(len(items)))
            self._pending.extend(items)
            self._condition.notify()
        return [item.future for item in items]

    def check_room(self, count: int) -> None:
        """Raise QueueFull if `count` more images would not fit now (a hint: `submit` decides)."""
        if len(self._pending) + count > self.queue_size:
            raise QueueFull(self._retry_after_s(count))

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the worker after its current batch; images still waiting fail with ShuttingDown."""
        with self._condition:
            self._closed = True
            left, self._pending = list(self._pending), deque()
            self._condition.notify_all()
        for item in left:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(ShuttingDown("the server shut down before this image's turn"))
        self._worker.join(timeout_s)

    def _retry_after_s(self, extra: int) -> int:
        """Seconds until the queue has room for `extra` more images, at the recent captioning speed."""
        excess = len(self._pending) + extra - self.queue_size
        return max(1, math.ceil(max(excess, self.max_batch) * self._seconds_per_image))

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._caption(batch)

    def _next_batch(self) -> list[_Item] | None:
        """The next batch to caption ([] if all its images were cancelled), or None once closed."""
        with self._condition:
            while not self._pending and not self._closed:
                self._condition.wait()
            if self._closed:
                return None
            key = self._pending[0].key
            # Wait for company only while the oldest image is younger than max_wait: under load the
            # backlog fills batches by itself, and nobody waits twice.
            deadline = self._pending[0].submitted + self.max_wait_s
            while self._count(key) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._condition.wait(left)
            return self._take(key)

    def _count(self, key: tuple[str, CaptionOptions]) -> int:
        return sum(item.key == key for item in self._pending)

    def _take(self, key: tuple[str, CaptionOptions]) -> list[_Item]:
        """Remove up to max_batch images with this key, oldest first; drop those whose request gave up."""
        taken, kept = [], deque()
        for item in self._pending:
            (taken if item.key == key and len(taken) < self.max_batch else kept).append(item)
        self._pending = kept
        # a request that timed out or disconnected cancelled its futures: its images cost no model time
        return [item for item in taken if item.future.set_running_or_notify_cancel()]

    def _caption(self, batch: list[_Item]) -> None:
        model, options = batch[0].key
        started = time.monotonic()
        try:
            results = self.captioners[model]([item.image for item in batch], options)
        except Exception as error:  # reported to each waiting request, never kills the worker
            for item in batch:
                item.future.set_exception(error)
            return
        try:
            explanations = _explained(self.captioners[model], batch, results)
        except Exception as error:  # fails the images that asked for it, not the others of the batch
            explanations = [error if item.attention else None for item in batch]
        model_s = time.monotonic() - started
        self._seconds_per_image += _SMOOTHING * (model_s / len(batch) - self._seconds_per_image)
        for item, result, explanation in zip(batch, results, explanations, strict=True):
            if isinstance(explanation, Exception):
                item.future.set_exception(explanation)
                continue
            queued_s = started - item.submitted
            item.future.set_result(Captioned(result, queued_s, model_s, len(batch), explanation))


def _explained(captioner: Captioner, batch: list[_Item], results: list[CaptionResult]) -> list:
    """Per image, the Explanation of its caption if its request asked for one, else None. In the worker,
    like every model call: explaining switches the decoder to eager attention for a moment."""
    wanted = [i for i, item in enumerate(batch) if item.attention]
    explanations: list = [None] * len(batch)
    if wanted:
        from imcap.explain import explain_results

        images, chosen = [batch[i].image for i in wanted], [results[i] for i in wanted]
        for i, explanation in zip(wanted, explain_results(captioner, images, chosen), strict=True):
            explanations[i] = explanation
    return explanations
