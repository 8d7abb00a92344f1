"""benchmarks/sweep_decoding.py: its grid, and a short sweep on the shipped model that matches imcap eval."""

from __future__ import annotations

import json

import pytest

from .conftest import SHARED_FLICKR8K, script_module


@pytest.fixture(scope="module")
def sweep():
    with script_module("benchmarks/sweep_decoding.py") as module:
        yield module


def test_grid_has_every_width_at_1_and_penalties_only_for_beam_search(sweep):
    grid = sweep.settings_grid((1, 2, 3), (0.5, 1.0, 2.0), (1, 3))
    assert grid == [(1, 1.0, None), (2, 1.0, None), (3, 1.0, None), (3, 0.5, None), (3, 2.0, None)]
    with_ngrams = sweep.settings_grid((3,), (1.0,), (3,), (0, 2))
    assert with_ngrams == [(3, 1.0, None), (3, 1.0, 0), (3, 1.0, 2)]


@pytest.mark.skipif(not (SHARED_FLICKR8K / "splits").is_dir(), reason="needs the shared Flickr8k copy")
def test_a_short_sweep_scores_what_imcap_eval_scores(sweep, tmp_path, capsys):
    from imcap.captioner import Captioner
    from imcap.evaluate import evaluate
    from imcap.generation import CaptionOptions

    out = tmp_path / "sweep.json"
    argv = ["--data", str(SHARED_FLICKR8K), "--limit", "8", "--beams", "1", "2", "--penalty-beams", "2"]
    argv += ["--no-repeat-ngram-sizes", "0"]
    assert sweep.main([*argv, "--length-penalties", "1.0", "2.0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    settings = [(r["beams"], r["length_penalty"], r["no_repeat_ngram_size"]) for r in rows]
    assert settings == [(1, 1.0, 3), (2, 1.0, 3), (2, 2.0, 3), (2, 1.0, 0)]  # the shipped model blocks 3
    assert "best val CIDEr-D: beams" in capsys.readouterr().out
    report = evaluate(
        Captioner.from_pretrained(),
        SHARED_FLICKR8K,
        "val",
        CaptionOptions(num_beams=2),
        limit=8,
        meteor=False,
    )
    assert rows[1]["CIDEr-D"] == pytest.approx(report.metrics["CIDEr"], abs=1e-4)
    assert rows[1]["distinct"] == report.distinct_captions
