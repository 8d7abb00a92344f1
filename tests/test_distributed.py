"""Data-parallel training: two torchrun processes log the losses of one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from imcap.training.batches import CaptionBatch
from imcap.training.config import TrainConfig
from imcap.training.loop import train

from .conftest import make_shared_subset

RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def data(flickr8k, tmp_path_factory):
    return make_shared_subset(flickr8k, tmp_path_factory.mktemp("flickr8k16"), n_train=16, n_val=4)


def recipe(data, out, cache) -> dict:
    """A tiny deterministic recipe: no dropout, no flips; the CNN tail joins training in epoch 2."""
    return {
        "data": {"path": str(data), "max_tokens": 20},
        "model": {
            "variant": "efficientnet-lite0",
            "image_size": 64,
            "hidden_size": 32,
            "decoder_layers": 1,
            "num_heads": 2,
            "vocab_size": 300,
            "dropout": 0.0,
            "imagenet_weights": False,
        },
        "optim": {
            "epochs": 2,
            "batch_images": 4,  # the global batch: two images per process under torchrun
            "lr": 3e-3,
            "warmup_steps": 1,
            "flip": False,
            "finetune_tail_from_epoch": 2,
        },
        "output_dir": str(out),
        "cache_dir": str(cache),
        "seed": 3,
        "threads": 1,
    }


def steps(out) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def test_two_torchrun_processes_train_like_one_with_the_same_global_batch(data, tmp_path):
    two = recipe(data, tmp_path / "two", tmp_path / "cache")
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*command, "-m", "imcap", "train", str(tmp_path / "two.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("best model") == 1  # rank 0 reports

    train(TrainConfig.from_dict(recipe(data, tmp_path / "one", tmp_path / "cache")))

    parallel, single = steps(tmp_path / "two"), steps(tmp_path / "one")
    assert len(parallel) == len(single) == 2 * 16 // 4  # rank 0 alone wrote the step log
    for a, b in zip(parallel, single, strict=True):
        assert (a["epoch"], a["step"], a["images"]) == (b["epoch"], b["step"], b["images"])
        assert abs(a["loss"] - b["loss"]) <= RELATIVE_TOLERANCE * abs(b["loss"]), (a, b)
    assert single[-1]["loss"] < single[0]["loss"]  # it trained
    metrics = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [1, 2]
    assert (tmp_path / "two" / "checkpoint.pt").exists() and (
        tmp_path / "two" / "best" / "config.json"
    ).exists()


def test_a_global_batch_is_shared_out_image_by_image():
    import torch

    ids = torch.arange(4 * 2 * 5).view(8, 5)  # 4 images x 2 captions, 5 tokens
    mask = torch.ones_like(ids)
    mask[2:4, 3:] = 0  # image 1's captions are shorter
    batch = CaptionBatch(torch.tensor([10, 11, 12, 13]), ids, mask, captions_per_image=2)
    first, second = batch.shard(0, 2), batch.shard(1, 2)
    assert first.image_index.tolist() == [10, 12] and second.image_index.tolist() == [11, 13]
    assert torch.equal(first.input_ids, ids[[0, 1, 4, 5]]) and torch.equal(
        second.input_ids, ids[[2, 3, 6, 7]]
    )
    assert batch.shard(0, 1) is batch
