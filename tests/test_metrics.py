"""Tests for imcap.metrics.

METEOR's JVM takes ~10 s to start on a 2-core machine (it loads a 59 MB paraphrase table), so
the whole file starts it exactly once: the module fixture shares one pycocoevalcap Meteor
between the direct reference computation and score_captions, and the last score_captions call
shuts it down through imcap's real close path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from imcap import metrics
from imcap.metrics import (
    JAVA_HINT,
    METRIC_NAMES,
    CiderD,
    MetricsError,
    SentenceBleu4,
    corpus_stats,
    score_captions,
    simple_tokenize,
)

requires_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java (not installed)"
)

REFS = {
    "img1": ["a dog runs across the green grass", "a brown dog running on a lawn", "a dog playing in a park"],
    "img2": ["a cat sits on a red couch", "a cat is sleeping on the sofa", "a small cat resting on a couch"],
    "img3": [
        "a man rides a bike down the street",
        "a person riding a bicycle on a road",
        "a cyclist in a city",
    ],
    "img4": ["two people walk along the beach", "a couple walking on the sandy beach", "people by the ocean"],
}
# Each prediction is one of its references, with capitals and punctuation for PTB to remove.
PERFECT = {
    "img1": "A brown dog running on a lawn.",
    "img2": "A cat is sleeping on the sofa!",
    "img3": "A man rides a bike down the street .",
    "img4": "Two people walk along the beach.",
}
_ids = list(PERFECT)
SHUFFLED = {image_id: PERFECT[_ids[(k + 1) % len(_ids)]] for k, image_id in enumerate(_ids)}
DATASETS = {"perfect": PERFECT, "shuffled": SHUFFLED}


# --------------------------------------------------------------------------- helpers


def _direct_scores(predictions: dict[str, str], meteor: Meteor) -> dict[str, float]:
    """The COCO evaluation (pycocoevalcap's COCOEvalCap.evaluate) written out by hand."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in REFS[i]] for i in REFS})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in REFS})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        **{f"BLEU-{n}": b for n, b in enumerate(bleu, start=1)},
        "METEOR": meteor.compute_score(gts, res)[0],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr": Cider().compute_score(gts, res)[0],
    }


def _java_children() -> list[str]:
    """Command lines of live java processes started by this test process (a /proc scan)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # the process exited while we looked
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and "java" in cmdline:
            found.append(cmdline)
    return found


def _fake_meteor(command: list[str]) -> Meteor:
    """A pycocoevalcap Meteor object whose subprocess is `command` instead of the JVM."""
    scorer = Meteor.__new__(Meteor)
    pipe = subprocess.PIPE
    scorer.meteor_p = subprocess.Popen(command, stdin=pipe, stdout=pipe, stderr=pipe)
    scorer.lock = threading.Lock()
    return scorer


@pytest.fixture(scope="module")
def coco_runs() -> dict[str, Any]:
    """score_captions and the direct pycocoevalcap computation on PERFECT and SHUFFLED."""
    if shutil.which("java") is None:
        pytest.skip("METEOR and the PTB tokenizer need Java (not installed)")
    shared = Meteor()
    try:
        expected = {name: _direct_scores(preds, shared) for name, preds in DATASETS.items()}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(metrics, "_start_meteor", lambda: shared)
            mp.setattr(metrics, "_close_meteor", lambda scorer: None)
            perfect = score_captions(PERFECT, REFS)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(metrics, "_start_meteor", lambda: shared)
            shuffled = score_captions(SHUFFLED, REFS)  # the real _close_meteor stops the JVM
        java_left = _java_children()
    finally:
        metrics._close_meteor(shared)
    return {"expected": expected, "ours": {"perfect": perfect, "shuffled": shuffled}, "java_left": java_left}


# --------------------------------------------------------------------------- score_captions


@requires_java
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_score_captions_equals_pycocoevalcap(coco_runs: dict[str, Any], dataset: str) -> None:
    ours, expected = coco_runs["ours"][dataset], coco_runs["expected"][dataset]
    assert tuple(ours) == METRIC_NAMES
    for name in METRIC_NAMES:
        assert isinstance(ours[name], float)
        if name == "METEOR":
            assert ours[name] == pytest.approx(expected[name], abs=1e-6)
        else:
            assert ours[name] == expected[name], name


@requires_java
def test_perfect_beats_shuffled_on_every_metric(coco_runs: dict[str, Any]) -> None:
    perfect, shuffled = coco_runs["ours"]["perfect"], coco_runs["ours"]["shuffled"]
    for name in METRIC_NAMES:
        assert perfect[name] > shuffled[name], name
    assert perfect["ROUGE-L"] == pytest.approx(1.0)  # PTB made each prediction equal a reference


@requires_java
def test_no_java_process_left_after_score_captions(coco_runs: dict[str, Any]) -> None:
    assert coco_runs["java_left"] == []


@requires_java
def test_meteor_false_skips_meteor(coco_runs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_meteor() -> None:
        raise AssertionError("METEOR must not start with meteor=False")

    monkeypatch.setattr(metrics, "_start_meteor", no_meteor)
    scores = score_captions(PERFECT, REFS, meteor=False)
    expected = dict(coco_runs["ours"]["perfect"])
    del expected["METEOR"]
    assert scores == expected


def test_key_mismatch_raises() -> None:
    predictions = {k: v for k, v in PERFECT.items() if k != "img4"}
    with pytest.raises(MetricsError, match="1 missing from predictions, 0 missing from references"):
        score_captions(predictions, REFS)


@pytest.mark.parametrize("bad_refs", [[], "a dog on the grass"])
def test_image_without_references_raises(bad_refs: Any) -> None:
    with pytest.raises(MetricsError, match="at least one reference"):
        score_captions(PERFECT, {**REFS, "img2": bad_refs})


def test_missing_java_raises_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(MetricsError) as info:
        score_captions(PERFECT, REFS)
    assert str(info.value) == JAVA_HINT


def test_close_meteor_frees_a_lock_left_held() -> None:
    # After an error inside compute_score, pycocoevalcap leaves its lock held; its __del__
    # would then block forever at garbage collection.
    scorer = _fake_meteor(["sleep", "60"])
    scorer.lock.acquire()
    metrics._close_meteor(scorer)
    assert scorer.meteor_p.returncode is not None
    finalizer = threading.Thread(target=scorer.__del__, daemon=True)
    finalizer.start()
    finalizer.join(timeout=5)
    assert not finalizer.is_alive()


def test_dead_meteor_process_becomes_metrics_error(monkeypatch: pytest.MonkeyPatch) -> None:
    scorer = _fake_meteor(["true"])  # exits at once, like a JVM that failed to start
    monkeypatch.setattr(metrics, "_start_meteor", lambda: scorer)
    with pytest.raises(MetricsError, match="METEOR subprocess failed"):
        metrics._meteor_score({"img1": ["a dog"]}, {"img1": ["a dog"]})
    assert scorer.meteor_p.returncode is not None
    assert not scorer.lock.locked()


# --------------------------------------------------------------------------- corpus_stats


def test_corpus_stats_normalises_case_spaces_and_final_period() -> None:
    predictions = {
        "a": "A dog .",
        "b": "a  dog.",
        "c": "a dog",
        "d": "A cat on a mat.",
        "e": "a cat on a mat",
    }
    assert corpus_stats(predictions) == {"n_images": 5, "distinct_captions": 2}
    assert corpus_stats({}) == {"n_images": 0, "distinct_captions": 0}


# --------------------------------------------------------------------------- CiderD


def test_simple_tokenize() -> None:
    assert simple_tokenize("  A Dog's ball,\tyes!  ") == "a dogs ball yes"


def test_ciderd_matches_pycocoevalcap_cider_when_corpus_is_the_test_set() -> None:
    candidates = {
        "img1": "a dog running on the grass",
        "img2": "a cat on a couch",
        "img3": "a man riding a bike down a city street in the rain",
        "img4": "people",
    }
    gts = {i: list(REFS[i]) for i in REFS}
    res = {i: [candidates[i]] for i in REFS}
    expected_mean, expected_per_image = Cider().compute_score(gts, res)

    ours = CiderD(REFS).scores([candidates[i] for i in REFS], list(REFS))
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, expected_per_image, rtol=0, atol=1e-6)
    assert ours.mean() == pytest.approx(expected_mean, abs=1e-6)


def test_ciderd_reference_beats_random_and_handles_empty() -> None:
    cider = CiderD(REFS)
    reference = REFS["img1"][0]
    scores = cider.scores([reference, "purple elephants juggling teacups", ""], ["img1"] * 3)
    assert scores[0] > scores[1] >= 0.0
    assert scores[2] == 0.0
    # Same caption, punctuation and capitals: simple_tokenize makes it identical.
    again = cider.scores(["A dog runs across the green grass."], ["img1"])
    assert again[0] == pytest.approx(scores[0])


def test_sentence_bleu4_is_pycocoevalcaps_per_image_bleu4() -> None:
    candidates = ["a dog running on the grass", "a cat on a couch", "a man riding a bike", "people"]
    gts = {i: [simple_tokenize(r) for r in REFS[i]] for i in REFS}
    res = {i: [c] for i, c in zip(REFS, candidates, strict=True)}
    _, per_order = Bleu(4).compute_score(gts, res, verbose=0)
    ours = SentenceBleu4(REFS).scores(candidates, list(REFS))
    np.testing.assert_allclose(ours, per_order[3], rtol=0, atol=1e-9)


def test_sentence_bleu4_ranks_a_reference_first_and_scores_empty_zero() -> None:
    bleu = SentenceBleu4(REFS)
    scores = bleu.scores([REFS["img1"][0], "purple elephants juggling teacups", ""], ["img1"] * 3)
    assert scores[0] == pytest.approx(1.0) and scores[1] < 1e-3 and scores[2] == 0.0
    with pytest.raises(MetricsError, match="not in the reference corpus"):
        bleu.scores(["a dog"], ["nope"])


def test_ciderd_rejects_unknown_image_and_empty_corpus() -> None:
    with pytest.raises(MetricsError, match="not in the reference corpus"):
        CiderD(REFS).scores(["a dog"], ["nope"])
    with pytest.raises(MetricsError):
        CiderD({})
