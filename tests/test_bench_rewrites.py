"""benchmarks/bench_rewrites.py: the rule on, off and for any subject; rewrites scored on references."""

from __future__ import annotations

import json

import pytest

from imcap.concepts import load_concept_table
from imcap.guidance import GuidanceSettings, Guide
from imcap.modeling import DEFAULT_MODEL_DIR, load_model

from .conftest import script_module


@pytest.fixture(scope="module")
def bench():
    with script_module("benchmarks/bench_rewrites.py") as module:
        yield module


@pytest.fixture(scope="module")
def guide() -> Guide:
    settings = GuidanceSettings(fallback_threshold=0.1, ruled_out_subjects=("bird", "car"))
    return Guide(load_concept_table(), settings, load_model().tokenizer)


def test_the_rule_is_off_as_saved_or_for_any_subject(bench, guide):
    settings = bench.variants(guide)
    assert settings["off"].fallback_threshold == 0 and settings["saved"] == guide.settings
    assert {"bird", "car", "horse", "dog", "tabby"} <= set(settings["any subject"].ruled_out_subjects)


def test_a_rewrite_is_scored_on_the_subjects_the_references_say(bench, guide):
    references = ["A horse jumps over a fence .", "A rider on a brown horse ."]
    replaced = bench.rewrite_row(guide, "A horse is jumping over a hurdle.", "A dog is jumping.", references)
    assert replaced["old_subject"] == ["horse"] and replaced["new_subject"] == ["dog"]
    assert replaced["old_subject_said"] and not replaced["new_subject_said"]
    fixed = bench.rewrite_row(guide, "A bird is flying.", "A horse is running.", references)
    assert not fixed["old_subject_said"] and fixed["new_subject_said"]


def test_a_short_run_counts_what_it_lists(bench, flickr8k, tmp_path):
    out = tmp_path / "rewrites.json"
    assert bench.main(["--data", str(flickr8k), "--split", "val", "--limit", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["photos"] == 4
    for name in ("saved", "any subject"):
        assert result[name]["rewritten"] == len(result[name]["rewrites"])
    assert result["ruled_out_subjects"] == list(GuidanceSettings.load(DEFAULT_MODEL_DIR).ruled_out_subjects)
