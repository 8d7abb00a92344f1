"""Shared fixtures: a tiny random EfficientNet-Lite + GPT-2 model and a tiny real-photo dataset.

The tiny model builds in about a second (lite0 at 64 px, a 1-layer 32-wide decoder) so every test that
needs "a model" can have one without the shipped weights; a few tests use the shipped model for content.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flickr8k"
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

TINY_SEED = 1


@contextlib.contextmanager
def script_module(relative: str) -> Iterator[ModuleType]:
    """A benchmark or script of the repo (they are no package) loaded as a module, in `sys.modules` while
    in use: dataclasses look their module up there."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


TINY_CAPTIONS = [
    "a dog runs across the green grass",
    "a brown dog is running on a lawn",
    "a cat sits on a red couch",
    "two people walk along the beach",
    "a man rides a bike down the street",
    "a child in a pink dress climbs the stairs",
    "a black dog and a white dog play in the snow",
    "a girl jumps into a swimming pool",
]


def build_tiny_model(folder: Path, captions: list[str] | None = None):
    """Save a tiny random EfficientNet-Lite0 + GPT-2 VisionEncoderDecoder to `folder`; return it."""
    import torch

    from imcap.modeling import (
        DecoderSpec,
        EfficientNetLiteEncoderConfig,
        image_processor_for,
        new_model,
        save_model,
    )
    from imcap.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(captions or TINY_CAPTIONS * 4, vocab_size=300, min_frequency=1)
    encoder = EfficientNetLiteEncoderConfig(
        variant="efficientnet-lite0", image_size=64, hidden_size=32, num_heads=2
    )
    decoder = DecoderSpec(num_layers=1, hidden_size=32, num_heads=2)
    # the same tiny model in every run, so a test's outcome never depends on luck; forked so that the
    # caller's random state is left as it was
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = new_model(encoder, decoder, tokenizer, imagenet_weights=False).eval()
    save_model(model, tokenizer, image_processor_for(encoder), folder)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_model")
    build_tiny_model(folder)
    return folder


def build_seeing_model(folder: Path) -> None:
    """The tiny model, changed so that its captions depend on the image (still random, still tiny).

    A randomly initialised EfficientNet's activations shrink to ~1e-9 through its BatchNorm layers (their
    running statistics are still the init values), so every image gets the same caption. Calibrating
    BatchNorm on noise and strengthening cross-attention makes captions differ from image to image, which
    the batch-size agreement and scoring tests need to mean anything.
    """
    import torch

    from imcap.modeling import load_model, save_model

    build_tiny_model(folder)
    loaded = load_model(folder)
    model = loaded.model
    torch.manual_seed(0)
    for layer in model.encoder.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None  # a plain average over the calibration batch
    model.encoder.train()
    with torch.no_grad():
        model.encoder(pixel_values=torch.randn(16, 3, 64, 64))
        for block in model.decoder.transformer.h:
            block.crossattention.c_proj.weight.mul_(10)
    save_model(model.eval(), loaded.tokenizer, loaded.image_processor, folder)


@pytest.fixture(scope="session")
def seeing_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seeing_model")
    build_seeing_model(folder)
    return folder


@pytest.fixture(scope="session")
def cat_model_dir(tmp_path_factory) -> Path:
    """The tiny model with a concept head that is sure every photo shows a tabby (and never a dog)."""
    import torch

    from imcap.concepts import load_concept_table
    from imcap.modeling import load_model, save_model

    table = load_concept_table()
    folder = tmp_path_factory.mktemp("cat_model")
    build_tiny_model(folder)
    loaded = load_model(folder)
    config = loaded.model.encoder.config
    config.concept_head, config.concept_table = True, table.name
    model = type(loaded.model)(config=loaded.model.config)
    model.load_state_dict(loaded.model.state_dict(), strict=False)
    with torch.no_grad():
        model.encoder.classifier.weight.zero_()
        model.encoder.classifier.bias.zero_()
        model.encoder.classifier.bias[table.wnids.index("n02123045")] = 20.0  # tabby
    save_model(model.eval(), loaded.tokenizer, loaded.image_processor, folder)
    return folder


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    if not (SHARED_FLICKR8K / "captions.tsv").exists():
        pytest.skip(f"the shared Flickr8k copy is not at {SHARED_FLICKR8K}")
    return SHARED_FLICKR8K


def make_shared_subset(flickr8k: Path, folder: Path, n_train: int, n_val: int) -> Path:
    """A folder in the shared layout holding the first images of Flickr8k train and val (copied)."""
    splits = {
        name: (flickr8k / "splits" / f"{name}.txt").read_text().split()[:count]
        for name, count in (("train", n_train), ("val", n_val))
    }
    (folder / "images").mkdir(parents=True)
    (folder / "splits").mkdir()
    wanted = {name for names in splits.values() for name in names}
    for name in wanted:
        shutil.copy(flickr8k / "images" / name, folder / "images" / name)
    for split, names in splits.items():
        (folder / "splits" / f"{split}.txt").write_text("".join(n + "\n" for n in names))
    rows = [
        row for row in (flickr8k / "captions.tsv").read_text().splitlines() if row.split("\t")[0] in wanted
    ]
    (folder / "captions.tsv").write_text("\n".join(rows) + "\n")
    return folder
