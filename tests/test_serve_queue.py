"""The batcher (imcap.serving.queue) behind `imcap serve`: shared batches, a full queue, timeouts; through
the REST API on the tiny "seeing" model and alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from imcap.captioner import Captioner
from imcap.images import decode_image
from imcap.serving.queue import Batcher, QueueFull

from .serving_helpers import FORM, OPTIONS, Gate, client_for, files, png, wait_until


@pytest.fixture(scope="module")
def captioner(seeing_model_dir) -> Captioner:
    return Captioner.from_pretrained(seeing_model_dir)


def test_a_full_queue_answers_503_with_retry_after_and_recovers(captioner):
    gate = Gate(captioner)
    with client_for({"seeing": gate}, queue_size=1, max_batch=1) as client, ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/v1/captions", files=files(png(1)), data=FORM)
        assert gate.entered.wait(30)  # the worker holds image 1 in its model call
        second = pool.submit(client.post, "/v1/captions", files=files(png(2)), data=FORM)
        wait_until(lambda: client.get("/health").json()["queued_images"] == 1, "image 2 queued")
        third = client.post("/v1/captions", files=files(png(3)), data=FORM)
        too_many_at_once = client.post("/v1/captions", files=files(png(4), png(5)), data=FORM)
        gate.release.set()
        assert first.result().status_code == second.result().status_code == 200
        after = client.post("/v1/captions", files=files(png(3)), data=FORM)
    assert third.status_code == too_many_at_once.status_code == 503
    assert int(third.headers["Retry-After"]) >= 1 and "queue is full" in third.json()["detail"]
    assert after.status_code == 200


def test_requests_that_time_out_get_503_and_cost_no_model_time(captioner):
    gate = Gate(captioner)
    with (
        client_for({"seeing": gate}, request_timeout_s=0.2, max_batch=1) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        first = pool.submit(client.post, "/v1/captions", files=files(png(1)), data=FORM)
        assert gate.entered.wait(30)
        late = client.post("/v1/captions", files=files(png(2), png(3)), data=FORM)  # waits behind image 1
        gate.release.set()
        assert first.result().status_code == 503  # its own model call outlived the timeout too
        # straight to the batcher (no HTTP timeout): it runs after the queue has been worked through
        batcher = client.app.state.batcher
        assert batcher.submit("seeing", [decode_image(png(4))], OPTIONS)[0].result(30).batch_images == 1
    assert late.status_code == 503 and "timed out after 0.2 s" in late.json()["detail"]
    assert late.headers["Retry-After"] == "1"
    assert gate.batches == [1, 1]  # images 2 and 3 were dropped from the queue, never captioned


def test_waiting_requests_with_the_same_settings_share_one_model_call(captioner):
    gate = Gate(captioner)
    with client_for({"seeing": gate}, max_batch=8) as client, ThreadPoolExecutor(5) as pool:
        blocker = pool.submit(client.post, "/v1/captions", files=files(png(0)), data=FORM)
        assert gate.entered.wait(30)
        same = [pool.submit(client.post, "/v1/captions", files=files(png(i)), data=FORM) for i in (1, 2, 3)]
        other = pool.submit(client.post, "/v1/captions", files=files(png(4)), data={**FORM, "num_beams": "1"})
        wait_until(lambda: client.get("/health").json()["queued_images"] == 4, "4 images queued")
        gate.release.set()
        responses = [f.result() for f in [blocker, *same, other]]
    assert [r.status_code for r in responses] == [200] * 5
    assert [r.json()["images"][0]["timing"]["batch_images"] for r in responses] == [1, 3, 3, 3, 1]
    assert sorted(gate.batches) == [1, 1, 3]


def test_batcher_splits_big_requests_by_max_batch_and_fails_fast_when_full():
    calls = []

    def fake(images, options):
        calls.append(len(images))
        return [f"caption of {image}" for image in images]

    batcher = Batcher({"fake": fake}, queue_size=20, max_batch=4, max_wait_ms=0)
    try:
        futures = batcher.submit("fake", list(range(10)), OPTIONS)
        assert [f.result(30).result for f in futures] == [f"caption of {i}" for i in range(10)]
        assert calls == [4, 4, 2]
        with pytest.raises(QueueFull):
            batcher.submit("fake", list(range(21)), OPTIONS)
    finally:
        batcher.close()
