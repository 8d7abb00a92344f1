"""benchmarks/bench_archs.py: the recipes it compares share one feature cache and run on the same clock."""

from __future__ import annotations

import pytest

from imcap.features import cache_key
from imcap.training.build import build

from .conftest import TINY_CAPTIONS, script_module


@pytest.fixture(scope="module")
def bench():
    with script_module("benchmarks/bench_archs.py") as module:
        yield module


def test_the_three_recipes_read_the_same_cached_features(tmp_path, bench):
    """Same CNN, same trunk cut, same preprocessing: the key of the cache `imcap train configs/flickr8k.yaml`
    filled, so no architecture extracts features again."""
    args = bench.parse_args(["--budget-minutes", "5", "--out-dir", str(tmp_path)])
    keys = set()
    for arch in bench.RECIPES:
        config = bench.recipe(arch, args)
        assert config.model.type == arch and not config.model.frozen_encoder
        built = build(config, TINY_CAPTIONS, None)
        keys.add(cache_key(built.front.encoder, built.image_processor, [], flip=False))
    assert len(keys) == 1


@pytest.mark.parametrize("arch", ["encoder-decoder", "prefix", "lstm"])
def test_each_recipe_trains_on_the_clock_with_cross_entropy_only(arch, tmp_path, bench):
    args = bench.parse_args(["--budget-minutes", "7.5", "--out-dir", str(tmp_path), "--train-limit", "9"])
    config = bench.recipe(arch, args)
    assert config.time_budget_minutes == 7.5
    assert config.scst.epochs == 0 and config.optim.epochs == bench.MAX_EPOCHS  # the budget ends training
    assert config.data.train_limit == 9 and config.output_dir == str(tmp_path / arch)
