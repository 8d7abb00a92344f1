"""benchmarks/bench_caption.py runs end to end on a tiny model and reports every promised key."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from .conftest import script_module

KEYS = {
    "baseline_images_per_s",
    "imcap_images_per_s",
    "speedup",
    "identical_share",
    "p50_ms_single",
    "peak_rss_mb",
    "model",
    "settings",
    "machine",
    "compute",
}


@pytest.fixture(scope="module")
def bench():
    with script_module("benchmarks/bench_caption.py") as module:
        yield module


def test_bench_caption_reports_all_keys(tiny_model_dir, tmp_path, bench):
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "names.txt").write_text("0.png\n2.png\n4.png\n")
    out = tmp_path / "bench.json"
    argv = ["--images", str(tmp_path), "--list", str(tmp_path / "names.txt"), "--limit", "3"]
    argv += ["--model", str(tiny_model_dir), "--beams", "2", "--max-new-tokens", "6", "--block", "2"]
    report = bench.main([*argv, "--batch-size", "2", "--single", "2", "--json", str(out)])
    assert set(report) >= KEYS and json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["settings"]["images"] == 3 and report["settings"]["num_beams"] == 2
    assert report["speedup"] > 0 and report["p50_ms_single"] > 0
    assert report["identical_share"] == 1.0  # the tiny model's captions do not hang on float rounding
    assert report["compute"]["encoder_gflop_per_image"] > 0 and report["compute"]["matmul_peak_gflops"] > 0
