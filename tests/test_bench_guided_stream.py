"""benchmarks/bench_guided_stream.py runs end to end on a tiny guided model and reports every side."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

from imcap import batch
from imcap.guidance import GuidanceSettings

from .conftest import REPO, script_module


def test_bench_guided_stream_times_each_side_and_compares_captions(cat_model_dir, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(cat_model_dir, model)
    GuidanceSettings(0.5).save(model)  # sure of a tabby the decoder never names: every image is rewritten
    rng = np.random.default_rng(2)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    out = tmp_path / "stream.json"
    argv = ["--images", str(tmp_path), "--limit", "5", "--model", str(model), "--beams", "2"]
    argv += ["--batch-size", "2", "--repeats", "2", "--json", str(out)]
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # it imports bench_caption beside it
    with script_module("benchmarks/bench_guided_stream.py") as bench:
        report = bench.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["images_per_s"]) == {"unguided", "guided_pooled", "guided_per_batch"}
    assert all(len(times) == 2 and min(times) > 0 for times in report["seconds"].values())
    assert report["guided_sides_same_captions"] is True
    assert report["guided_changed_share"] == 1.0
    assert batch.MAX_HELD_BATCHES == report["settings"]["max_held_batches"] == 8  # restored after each side
