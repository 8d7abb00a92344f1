"""imcap.rewrites and its use by imcap.batch: guidance's second pass, pooled over several batches."""

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imcap import batch
from imcap.batch import caption_batches
from imcap.captioner import Captioner
from imcap.concepts import load_concept_table, mentions
from imcap.generation import CaptionOptions
from imcap.guidance import GuidanceSettings, Guide
from imcap.rewrites import GuidedDecoder


@pytest.fixture
def captioner(cat_model_dir) -> Captioner:
    """Sure of a tabby in every photo, which the tiny decoder never says: guidance rewrites them all."""
    captioner = Captioner.from_pretrained(cat_model_dir)
    captioner.guide = Guide(load_concept_table(), GuidanceSettings(0.5), captioner.loaded.tokenizer)
    return captioner


@pytest.fixture
def rewrite_calls(monkeypatch) -> list[int]:
    """The number of rows of each second-pass call (`.threads`: the thread that made each)."""
    calls, rewrite = _Calls(), GuidedDecoder._rewrite

    def counted(self, hidden, *args, **kwargs):
        calls.append(hidden.shape[0])
        calls.threads.append(threading.current_thread().name)
        return rewrite(self, hidden, *args, **kwargs)

    monkeypatch.setattr(GuidedDecoder, "_rewrite", counted)
    return calls


class _Calls(list):
    threads: list[str]

    def __init__(self):
        super().__init__()
        self.threads = []

    def clear(self):
        super().clear()
        self.threads.clear()


def photos(folder, count: int) -> list:
    rng = np.random.default_rng(5)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


OPTIONS = CaptionOptions(max_new_tokens=8)


def test_batches_rewrite_together_and_caption_each_image_as_alone(captioner, rewrite_calls, tmp_path):
    paths = photos(tmp_path, 7)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    alone = [captioner(path, OPTIONS)[0].caption for path in paths]
    assert all(mentions(caption, ("cat",)) for caption in alone)  # every one was rewritten
    rewrite_calls.clear()
    batches = list(caption_batches(captioner, [*paths[:3], broken, *paths[3:]], OPTIONS, batch_size=2))
    # one second pass for the first three batches' five images, on the rewriting thread, started before the
    # last batch's first pass; the last batch's two images rewritten on this thread meanwhile
    assert sorted(zip(rewrite_calls, rewrite_calls.threads, strict=True)) == [
        (2, threading.current_thread().name),
        (5, "imcap-rewrite_0"),
    ]
    names = [[p.name for p in b.paths] for b in batches]
    assert names == [["0.png", "1.png"], ["2.png"], ["3.png", "4.png"], ["5.png", "6.png"]]
    assert [[Path(e.path).name for e in b.failed] for b in batches] == [[], ["broken.jpg"], [], []]
    assert [r.caption for b in batches for r in b.results] == alone


def test_held_batches_are_rewritten_when_max_held_wait(captioner, rewrite_calls, tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "MAX_HELD_BATCHES", 2)
    paths = photos(tmp_path, 5)
    results = [r.caption for b in caption_batches(captioner, paths, OPTIONS, batch_size=1) for r in b.results]
    # the second pool (rewriting thread) and the last batch (this thread) may run in either order
    assert sorted(rewrite_calls) == [1, 2, 2]
    assert results == [captioner(path, OPTIONS)[0].caption for path in paths]


def test_unguided_batches_are_not_held(captioner, tmp_path):
    """Nothing to rewrite: each batch comes out as soon as it is decoded (caption_files writes it)."""
    paths = photos(tmp_path, 3)
    drafted = []
    finish = captioner.finish
    captioner.finish = lambda batches: drafted.append(len(batches)) or finish(batches)
    list(caption_batches(captioner, paths, CaptionOptions(guide=False, max_new_tokens=8), batch_size=1))
    assert drafted == [1, 1, 1, 0]  # the last: nothing left held at the end


@pytest.mark.parametrize(
    "options",
    [
        CaptionOptions(num_beams=2, max_new_tokens=8),
        CaptionOptions(do_sample=True, seed=7, num_return_sequences=2, max_new_tokens=8),
    ],
)
def test_drafts_of_other_settings_finish_as_each_alone(captioner, rewrite_calls, tmp_path, options):
    paths = photos(tmp_path, 4)
    pixels = captioner.pixel_values(paths[:2]), captioner.pixel_values(paths[2:])
    first, second = (captioner.encode(p) for p in pixels)
    expected = [captioner.caption_encoded(first, OPTIONS), captioner.caption_encoded(second, options)]
    rewrite_calls.clear()
    finished = captioner.finish([captioner.draft(first, OPTIONS), captioner.draft(second, options)])
    assert len(rewrite_calls) == 2  # settings differ: a search each
    for got, want in zip(finished, expected, strict=True):
        assert [[c.text for c in r.candidates] for r in got] == [[c.text for c in r.candidates] for r in want]
        assert [r.tags for r in got] == [r.tags for r in want]


@pytest.mark.parametrize("beams", [1, 2])
def test_seeded_samples_pooled_over_batches_equal_each_image_alone(captioner, rewrite_calls, tmp_path, beams):
    """A seeded sample depends on its image alone: rewritten (drawn again with the word as subject) in
    one pool with other batches' samples, it is the sample drawn for the image on its own."""
    options = CaptionOptions(
        do_sample=True, seed=11, num_beams=beams, num_return_sequences=2, max_new_tokens=8
    )
    paths = photos(tmp_path, 4)
    alone = [[c.text for c in captioner(path, options)[0].candidates] for path in paths]
    rewrite_calls.clear()
    batches = caption_batches(captioner, paths, options, batch_size=1)
    pooled = [[c.text for c in r.candidates] for b in batches for r in b.results]
    assert len(rewrite_calls) == 2 and pooled == alone  # the first three batches pooled, the last beside them


def test_a_run_stopped_early_leaves_no_rewriting_thread(captioner, tmp_path, monkeypatch):
    """The caller stops after the first batch (Ctrl-C in caption_files closes the generator): the pool being
    rewritten ends, the queued ones are dropped, and the rewriting thread goes."""
    monkeypatch.setattr(batch, "MAX_HELD_BATCHES", 1)  # every batch a pool of its own, queued on the thread
    batches = caption_batches(captioner, photos(tmp_path, 6), OPTIONS, batch_size=1)
    first = next(batches)
    assert mentions(first.results[0].caption, ("cat",))
    batches.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("imcap-rewrite")]


def test_a_failing_rewrite_is_raised_by_caption_batches(captioner, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("rewrite failed")

    monkeypatch.setattr(GuidedDecoder, "_rewrite", broken)
    with pytest.raises(RuntimeError, match="rewrite failed"):
        list(caption_batches(captioner, photos(tmp_path, 6), OPTIONS, batch_size=1))
    assert not [t for t in threading.enumerate() if t.name.startswith("imcap-rewrite")]
