"""The batcher: images from many requests, captioned together in shared model calls, as a pipeline.

Requests decode their uploads themselves and `submit` the pictures. A feeder thread forms batches: the
oldest waiting image, with up to `max_batch - 1` others of the same (model, options), waiting at most
`max_wait_ms` for company. For a Captioner, worker threads (one torch thread each) then preprocess the
batch and, for a model on imcap's engine (`Captioner.uses_engine`), run the encoder, while one model
thread decodes the batch before it: the pipeline of `imcap.batch.caption_batches`, with batches formed
across requests. The feeder reads ahead at most `_READ_AHEAD` full batches, and forms a
batch short of `max_batch` only when the model thread is idle, so that under load batches fill up while
one is decoded.
Other callables (stand-ins in tests) are called whole in the model thread, one batch at a time.

One model thread and a fixed pool, so the process holds one instance of each model and torch's threads
stay bounded. The queue is bounded in images: past `queue_size` images waiting for the model (formed
into a batch or not), `submit` raises QueueFull at once, and the server answers 503 instead of letting
memory pile up. A request that gives up cancels its images; any not yet in a model call cost no decoding.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from imcap.batch import slices_of
from imcap.captioner import Captioner, CaptionResult
from imcap.engine import Encoded
from imcap.generation import CaptionOptions

if TYPE_CHECKING:
    from imcap.explain import Explanation

_SECONDS_PER_IMAGE_GUESS = 0.2  # Retry-After estimate before the first batch has been timed
_SMOOTHING = 0.2  # weight of the newest batch in the moving average of seconds per image
_READ_AHEAD = 2  # batches formed (and being prepared) beyond the one the model thread decodes


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


@dataclass
class _Batch:
    items: list[_Item]
    parts: list[Future] | None  # the workers' preprocessed (and encoded) slices; None: call the model whole


class Batcher:
    """Bounded queue, a feeder, `threads` preprocessing workers and one model thread; `submit` is
    thread-safe and never blocks on the model."""

    def __init__(
        self,
        captioners: Mapping[str, Captioner],
        queue_size: int = 64,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        threads: int | None = None,
    ):
        self.captioners = dict(captioners)
        self.queue_size, self.max_batch, self.max_wait_s = queue_size, max_batch, max_wait_ms / 1000
        self.threads = threads or torch.get_num_threads()  # torch threads of a whole (unsplit) model call
        self._pending: deque[_Item] = deque()
        self._ready: deque[_Batch] = deque()  # formed, waiting for the model thread
        self._busy = False  # the model thread is in a model call
        self._condition = threading.Condition()
        self._closed = False
        self._seconds_per_image = _SECONDS_PER_IMAGE_GUESS
        self._pool = ThreadPoolExecutor(
            self.threads, "imcap-prepare", initializer=torch.set_num_threads, initargs=(1,)
        )
        self._loops = [
            threading.Thread(target=self._feed, name="imcap-feeder", daemon=True),
            threading.Thread(target=self._run, name="imcap-batcher", daemon=True),
        ]
        for thread in self._loops:
            thread.start()

    @property
    def pending(self) -> int:
        """Images waiting for a model call (those in the running one are not counted)."""
        with self._condition:  # a reentrant lock: submit holds it already
            return len(self._pending) + sum(len(batch.items) for batch in self._ready)

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
            if self.pending + len(items) > self.queue_size:
                raise QueueFull(self._retry_after_s(len(items)))
            self._pending.extend(items)
            self._condition.notify_all()
        return [item.future for item in items]

    def check_room(self, count: int) -> None:
        """Raise QueueFull if `count` more images would not fit now (a hint: `submit` decides)."""
        if self.pending + count > self.queue_size:
            raise QueueFull(self._retry_after_s(count))

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop after the current model call; images still waiting fail with ShuttingDown."""
        with self._condition:
            self._closed = True
            left = list(self._pending) + [item for batch in self._ready for item in batch.items]
            self._pending, self._ready = deque(), deque()
            self._condition.notify_all()
        _fail(left, ShuttingDown("the server shut down before this image's turn"))
        for thread in self._loops:
            thread.join(timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _retry_after_s(self, extra: int) -> int:
        """Seconds until the queue has room for `extra` more images, at the recent captioning speed."""
        excess = self.pending + extra - self.queue_size
        return max(1, math.ceil(max(excess, self.max_batch) * self._seconds_per_image))

    # --- the feeder: forms batches and hands them to the workers ---------------------------------------

    def _feed(self) -> None:
        with self._condition:
            while not self._closed:
                items, wait_s = self._due_batch()
                if items is None:
                    self._condition.wait(wait_s)
                elif items:  # [] when every image of the batch was cancelled
                    self._ready.append(_Batch(items, self._prepare(items)))
                    self._condition.notify_all()

    def _due_batch(self) -> tuple[list[_Item] | None, float | None]:
        """(the next batch, None) if it is time to form it, else (None, seconds to wait or None: until
        woken). Called holding the condition.

        A full batch is formed as long as fewer than _READ_AHEAD wait for the model thread, so it is
        encoded while the batch before it is decoded; one short of max_batch only when the model thread
        is idle with nothing ready, once the oldest image has waited max_wait for company. Under load
        batches so stay full (a short one formed while the decoder is busy would cost it more per image,
        as measured with 16 HTTP clients), and at worst the pipeline runs one batch at a time, as a plain
        callable (a stand-in in tests) always does.
        """
        if not self._pending:
            return None, None
        key = self._pending[0].key
        pipelined = isinstance(self.captioners[key[0]], Captioner)
        if len(self._ready) >= (_READ_AHEAD if pipelined else 1):
            return None, None
        if self._count(key) >= self.max_batch and (pipelined or not self._busy):
            return self._take(key), None
        if self._ready or self._busy:
            return None, None
        left = self._pending[0].submitted + self.max_wait_s - time.monotonic()
        return (self._take(key), None) if left <= 0 else (None, left)

    def _count(self, key: tuple[str, CaptionOptions]) -> int:
        return sum(item.key == key for item in self._pending)

    def _take(self, key: tuple[str, CaptionOptions]) -> list[_Item]:
        """Remove up to max_batch images with this key, oldest first; drop those whose request gave up."""
        taken, kept = [], deque()
        for item in self._pending:
            (taken if item.key == key and len(taken) < self.max_batch else kept).append(item)
        self._pending = kept
        # a request that timed out or disconnected cancelled its futures: its images cost no model time
        return [item for item in taken if not item.future.cancelled()]

    def _prepare(self, items: list[_Item]) -> list[Future] | None:
        """Preprocess (and encode) a Captioner's batch in the workers, in up to `threads` slices."""
        model, options = items[0].key
        captioner = self.captioners[model]
        if not isinstance(captioner, Captioner):
            return None
        images = [item.image for item in items]
        # a processor's output (imcap.families) is not cut and joined again: one slice
        slices = slices_of(images, self.threads if captioner.family is None else 1)
        return [self._pool.submit(_prepared, captioner, part, options) for part in slices]

    # --- the model thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while (batch := self._next_ready()) is not None:
            try:
                self._caption(batch)
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()

    def _next_ready(self) -> _Batch | None:
        with self._condition:
            while not self._ready and not self._closed:
                self._condition.wait()
            if self._closed:
                return None
            batch = self._ready.popleft()
            self._busy = True
            self._condition.notify_all()  # the feeder may form the next batch
            return batch

    def _caption(self, batch: _Batch) -> None:
        # from here on an image cannot be cancelled; those cancelled while their batch was prepared drop out
        live = [i for i, item in enumerate(batch.items) if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        items = [batch.items[i] for i in live]
        model, options = items[0].key
        captioner = self.captioners[model]
        started = time.monotonic()
        try:
            results = self._call_model(captioner, batch, live, options)
        except Exception as error:  # reported to each waiting request, never kills the thread
            _fail(items, error)
            return
        try:
            with _torch_threads(self.threads):
                explanations = _explained(captioner, items, results)
        except Exception as error:  # fails the images that asked for it, not the others of the batch
            explanations = [error if item.attention else None for item in items]
        model_s = time.monotonic() - started
        self._seconds_per_image += _SMOOTHING * (model_s / len(items) - self._seconds_per_image)
        for item, result, explanation in zip(items, results, explanations, strict=True):
            if isinstance(explanation, Exception):
                item.future.set_exception(explanation)
                continue
            queued_s = started - item.submitted
            item.future.set_result(Captioned(result, queued_s, model_s, len(items), explanation))

    def _call_model(self, captioner, batch: _Batch, live: list[int], options) -> list[CaptionResult]:
        """Captions of the live images: decoded from the workers' output, or the whole call here."""
        if batch.parts is None:
            with _torch_threads(self.threads):
                return captioner([batch.items[i].image for i in live], options)
        prepared = _joined([part.result() for part in batch.parts])
        rows = _rows(prepared, live) if len(live) < len(batch.items) else prepared
        if isinstance(prepared, Encoded):  # the encoder ran in the workers: decode on one thread
            with _torch_threads(1):
                results = captioner.caption_encoded(rows, options)
        else:
            with _torch_threads(self.threads):
                results = captioner.caption_pixels(rows, options)
        if rows is prepared and len(live) < len(batch.items):  # could not be cut: captioned all
            results = [results[i] for i in live]
        return results


def _prepared(captioner: Captioner, images: list[Image.Image], options: CaptionOptions):
    """In a worker: model input for these images, already encoded when the engine decodes them."""
    pixels = captioner.pixel_values(images, options)
    return captioner.encode(pixels) if captioner.uses_engine(options) else pixels


def _joined(parts: list):
    """The workers' slices as one batch: Encoded or pixel tensors concatenated in order."""
    if isinstance(parts[0], Encoded):
        return Encoded.joined(parts)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _rows(prepared, rows: list[int]):
    """Only these rows of a prepared batch (Encoded or pixels); a processor's output is returned whole."""
    if isinstance(prepared, Encoded):
        probs = prepared.concept_probs
        return Encoded(prepared.hidden[rows], None if probs is None else probs[rows])
    if isinstance(prepared, torch.Tensor):
        return prepared[rows]
    return prepared


def _fail(items: list[_Item], error: Exception) -> None:
    """Fail these images' futures (those a request cancelled stay cancelled)."""
    for item in items:
        if item.future.running() or item.future.set_running_or_notify_cancel():
            item.future.set_exception(error)


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run torch with `count` threads in this thread (for this call), then restore the count it had."""
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != before:
            torch.set_num_threads(before)


def _explained(captioner: Captioner, batch: list[_Item], results: list[CaptionResult]) -> list:
    """Per image, the Explanation of its caption if its request asked for one, else None. In the model
    thread, like every model call: explaining switches the decoder to eager attention for a moment."""
    wanted = [i for i, item in enumerate(batch) if item.attention]
    explanations: list = [None] * len(batch)
    if wanted:
        from imcap.explain import explain_results

        images, chosen = [batch[i].image for i in wanted], [results[i] for i in wanted]
        for i, explanation in zip(wanted, explain_results(captioner, images, chosen), strict=True):
            explanations[i] = explanation
    return explanations
