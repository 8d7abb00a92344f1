"""What the serving tests share: small pictures, upload parts, an app on a captioner, and captioners that
wait for the test (Gate) or carry tags (Tagging)."""

from __future__ import annotations

import io
import threading
from dataclasses import replace

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from imcap.captioner import Captioner, Tag
from imcap.generation import CaptionOptions
from imcap.serving.app import create_app
from imcap.serving.settings import ServeSettings

OPTIONS = CaptionOptions(max_new_tokens=6, num_beams=2)  # short captions keep the tiny model fast
FORM = {"max_new_tokens": "6", "num_beams": "2"}


def png(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small picture of two coloured blocks; different seeds give different pictures."""
    rng = np.random.default_rng(seed)
    picture = np.empty((size[1], size[0], 3), np.uint8)
    picture[:] = rng.integers(0, 256, 3)
    picture[: size[1] // 2, : size[0] // 2] = rng.integers(0, 256, 3)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "PNG")
    return buffer.getvalue()


def files(*datas: bytes, names: list[str] | None = None) -> list[tuple]:
    names = names or [f"photo_{i}.png" for i in range(len(datas))]
    return [("images", (name, data, "image/png")) for name, data in zip(names, datas, strict=True)]


def client_for(captioners, **settings) -> TestClient:
    return TestClient(create_app(captioners, ServeSettings(ui=False, api_key=None, **settings)))


class Gate:
    """Wraps a Captioner: each call waits until `release` (set from the test), and is recorded."""

    def __init__(self, captioner: Captioner):
        self.captioner, self.release, self.entered = captioner, threading.Event(), threading.Event()
        self.max_caption_tokens = captioner.max_caption_tokens
        self.batches: list[int] = []

    def __call__(self, images, options):
        self.batches.append(len(images))
        self.entered.set()
        assert self.release.wait(30), "the test never released the gate"
        return self.captioner(images, options)


TAGS = [Tag(f"concept {i}", 0.5**i) for i in range(1, 9)]  # most probable first, like a concept head's


class Tagging:
    """Wraps a Captioner without a concept head (the tiny models): every result carries TAGS."""

    def __init__(self, captioner: Captioner):
        self.captioner, self.max_caption_tokens = captioner, captioner.max_caption_tokens

    def __call__(self, images, options):
        return [replace(result, tags=TAGS) for result in self.captioner(images, options)]


def as_json(tags: list[Tag]) -> list[dict]:
    return [{"label": t.label, "score": round(t.score, 4)} for t in tags]  # rounded as in the CLI's rows


def wait_until(condition, what: str) -> None:
    event = threading.Event()
    for _ in range(3000):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError(f"never happened: {what}")
