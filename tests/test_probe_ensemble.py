"""benchmarks/probe_ensemble.py: an ensemble of a model with itself captions as the model does."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import imcap.guided
import imcap.search
from imcap.captioner import Captioner
from imcap.generation import CaptionOptions

from .conftest import script_module


@pytest.fixture
def probe(monkeypatch):
    # the probe patches the engine's cache factory: undo it after the test
    monkeypatch.setattr(imcap.search, "new_cache", imcap.search.new_cache)
    monkeypatch.setattr(imcap.guided, "new_cache", imcap.guided.new_cache)
    with script_module("benchmarks/probe_ensemble.py") as module:
        yield module


def test_an_ensemble_of_one_model_twice_gives_its_captions(probe, seeing_model_dir):
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    options = CaptionOptions(num_beams=3, max_new_tokens=8)
    alone = Captioner.from_pretrained(seeing_model_dir)(pictures, options)
    twice = probe.ensemble_captioner([seeing_model_dir, seeing_model_dir])(pictures, options)
    assert [r.caption for r in twice] == [r.caption for r in alone]
    for one, two in zip(alone, twice, strict=True):
        assert two.candidates[0].logprob == pytest.approx(one.candidates[0].logprob, abs=1e-4)
