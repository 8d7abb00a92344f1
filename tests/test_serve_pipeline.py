"""The batcher's pipeline (imcap.serving.queue): preprocessing and the encoder in worker threads, the
decoder in the model thread, the next batch encoded while the current one is decoded."""

from __future__ import annotations

import threading
import time

import pytest

from imcap.captioner import Captioner
from imcap.generation import CaptionOptions
from imcap.images import decode_image
from imcap.serving.queue import Batcher, ShuttingDown

from .serving_helpers import OPTIONS, png


class Recorder:
    """Wraps methods of one Captioner instance: who ran them (thread name), when, on how many images."""

    def __init__(self, captioner: Captioner, *names: str):
        self.calls: list[tuple[str, str, float, float, int]] = []  # method, thread, start, end, images
        self.hold = {name: threading.Event() for name in names}
        for event in self.hold.values():
            event.set()
        for name in names:
            setattr(captioner, name, self._wrapped(name, getattr(captioner, name)))

    def _wrapped(self, name: str, method):
        def run(batch, *args, **kwargs):
            started = time.monotonic()
            assert self.hold[name].wait(30), "the test never released the hold"
            result = method(batch, *args, **kwargs)
            size = len(batch) if isinstance(batch, list) else len(getattr(batch, "hidden", batch))
            self.calls.append((name, threading.current_thread().name, started, time.monotonic(), size))
            return result

        return run

    def of(self, name: str) -> list[tuple]:
        return [call for call in self.calls if call[0] == name]


def wait_for(condition) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.01)


@pytest.fixture
def captioner(seeing_model_dir) -> Captioner:
    return Captioner.from_pretrained(seeing_model_dir)  # a fresh instance: tests wrap its methods


def test_encoder_in_workers_decoder_in_the_model_thread_same_captions(captioner):
    pictures = [decode_image(png(seed)) for seed in range(6)]
    expected = [captioner(picture, OPTIONS)[0].caption for picture in pictures]
    recorder = Recorder(captioner, "pixel_values", "encode", "caption_encoded")
    batcher = Batcher({"seeing": captioner}, max_batch=4, max_wait_ms=1000, threads=2)
    try:
        futures = batcher.submit("seeing", pictures[:3], OPTIONS) + batcher.submit(
            "seeing", pictures[3:], OPTIONS
        )
        done = [future.result(60) for future in futures]
    finally:
        batcher.close()
    assert [d.result.caption for d in done] == expected
    assert sorted(d.batch_images for d in done) == [2, 2, 4, 4, 4, 4]  # two requests, shared batches
    assert {thread for _, thread, *_ in recorder.of("encode")} <= {"imcap-prepare_0", "imcap-prepare_1"}
    assert {thread for _, thread, *_ in recorder.of("pixel_values")} <= {"imcap-prepare_0", "imcap-prepare_1"}
    assert {thread for _, thread, *_ in recorder.of("caption_encoded")} == {"imcap-batcher"}
    # each batch is encoded in slices, one per worker, and decoded whole
    assert sorted(size for *_, size in recorder.of("caption_encoded")) == [2, 4]
    assert sum(size for *_, size in recorder.of("encode")) == 6 and len(recorder.of("encode")) == 4


def test_the_next_batch_is_encoded_while_the_current_one_is_decoded(captioner):
    recorder = Recorder(captioner, "encode", "caption_encoded")
    recorder.hold["caption_encoded"].clear()  # the first decode waits until the second batch is encoded
    batcher = Batcher({"seeing": captioner}, max_batch=2, threads=1)
    try:
        first = batcher.submit("seeing", [decode_image(png(1)), decode_image(png(2))], OPTIONS)
        second = batcher.submit("seeing", [decode_image(png(3)), decode_image(png(4))], OPTIONS)
        wait_for(lambda: len(recorder.of("encode")) == 2)  # both batches encoded, no decode finished yet
        assert recorder.of("caption_encoded") == []
        recorder.hold["caption_encoded"].set()
        assert all(f.result(60).batch_images == 2 for f in first + second)
    finally:
        recorder.hold["caption_encoded"].set()
        batcher.close()


def test_an_image_cancelled_after_encoding_is_not_decoded(captioner):
    recorder = Recorder(captioner, "encode", "caption_encoded")
    recorder.hold["caption_encoded"].clear()
    batcher = Batcher({"seeing": captioner}, max_batch=2, threads=1)
    try:
        blocker = batcher.submit("seeing", [decode_image(png(0)), decode_image(png(5))], OPTIONS)
        kept, dropped = batcher.submit("seeing", [decode_image(png(1)), decode_image(png(2))], OPTIONS)
        wait_for(lambda: len(recorder.of("encode")) == 2)  # the next batch is formed and encoded
        assert batcher.pending == 2  # not yet in a model call
        assert dropped.cancel()  # its request gave up
        recorder.hold["caption_encoded"].set()
        assert kept.result(60).batch_images == 1
        assert all(f.result(60).batch_images == 2 for f in blocker)
    finally:
        recorder.hold["caption_encoded"].set()
        batcher.close()
    assert [size for *_, size in recorder.of("caption_encoded")] == [2, 1]


@pytest.mark.parametrize("num_beams", [1, 2], ids=["plain-sampling", "beam-sampling"])
def test_sampling_encodes_in_a_worker_and_decodes_in_the_model_thread(captioner, num_beams):
    """Both kinds of sampling run in the engine: encoding in a worker, decoding in the model thread."""
    sampling = CaptionOptions(max_new_tokens=6, num_beams=num_beams, do_sample=True, seed=3)
    pictures = [decode_image(png(seed)) for seed in (1, 2)]
    expected = [r.caption for r in captioner(pictures, sampling)]
    recorder = Recorder(captioner, "encode", "caption_encoded")
    batcher = Batcher({"seeing": captioner}, max_batch=2, threads=2)
    try:
        done = [f.result(60) for f in batcher.submit("seeing", pictures, sampling)]
    finally:
        batcher.close()
    assert [d.result.caption for d in done] == expected  # seeded: the batch does not change a sample
    assert {thread for _, thread, *_ in recorder.of("encode")} <= {"imcap-prepare_0", "imcap-prepare_1"}
    assert [call[1] for call in recorder.of("caption_encoded")] == ["imcap-batcher"]


def test_closing_fails_batches_formed_but_not_started(captioner):
    recorder = Recorder(captioner, "caption_encoded")
    recorder.hold["caption_encoded"].clear()
    batcher = Batcher({"seeing": captioner}, max_batch=1, threads=1)
    try:
        running, formed, waiting = batcher.submit(
            "seeing", [decode_image(png(seed)) for seed in range(3)], OPTIONS
        )
        wait_for(lambda: batcher.pending == 2)  # the first image is in its model call
        threading.Timer(0.2, recorder.hold["caption_encoded"].set).start()
        batcher.close()
    finally:
        recorder.hold["caption_encoded"].set()
    assert running.result(60).batch_images == 1  # the model call under way finishes
    for future in (formed, waiting):
        with pytest.raises(ShuttingDown):
            future.result(1)
