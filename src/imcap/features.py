"""Frozen-encoder features computed once and cached on disk.

Training never runs the frozen part of the CNN twice: the trunk output of every image (and of its mirror
image, for flip augmentation) is stored in one file whose name is a hash of everything that determines it:
encoder variant and weights, the trunk cut, the image processor, the flip, and each image's path, size and
modification time. Change any of them and the key changes, so a stale cache is rebuilt, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import ImageOps
from tqdm import tqdm

from imcap.encoder import EfficientNetLiteEncoder
from imcap.images import load_image

CACHE_FORMAT = 1  # bump when the file layout changes


def cache_key(encoder: EfficientNetLiteEncoder, image_processor, images: Sequence[Path], flip: bool) -> str:
    """Hash of everything that determines the cached trunk features."""
    cut = len(encoder.cnn._blocks) - encoder.config.tail_blocks
    trunk_state = [(k, v) for k, v in encoder.cnn.state_dict().items() if _in_trunk(k, cut)]
    digest = hashlib.sha256()
    header = {
        "format": CACHE_FORMAT,
        "variant": encoder.config.variant,
        "image_size": encoder.config.image_size,
        "cut": cut,
        "processor": image_processor.to_dict(),
        "flip": flip,
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in trunk_state:  # weights, so a retrained or different checkpoint never matches
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    for path in images:
        stat = os.stat(path)
        digest.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def _in_trunk(state_key: str, cut: int) -> bool:
    if state_key.startswith("_blocks."):
        return int(state_key.split(".")[1]) < cut
    return state_key.startswith(("_conv_stem", "_bn0"))


@torch.inference_mode()
def compute_trunk_features(
    encoder: EfficientNetLiteEncoder,
    image_processor,
    images: Sequence[Path],
    flip: bool = False,
    batch_size: int = 4,
    desc: str = "features",
) -> torch.Tensor:
    """Trunk features of every image, (N, C, G, G) in fp16 (half the memory, no measurable loss).

    Small batches are faster here: on a 2-core CPU, lite2 at 260 px takes ~35 ms/image at batch 4 and
    ~70 at 16
    (the activations of larger batches fall out of cache).
    """
    encoder.eval()
    # channels_last roughly halves the CNN's time on CPU (depthwise convolutions in particular)
    encoder = encoder.to(memory_format=torch.channels_last)
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        pictures = [load_image(p) for p in images[start : start + batch_size]]
        if flip:
            pictures = [ImageOps.mirror(p) for p in pictures]
        pixels = image_processor(pictures, return_tensors="pt")["pixel_values"]
        chunks.append(encoder.trunk(pixels.contiguous(memory_format=torch.channels_last)).half().contiguous())
    return torch.cat(chunks)


def cached_trunk_features(
    encoder: EfficientNetLiteEncoder,
    image_processor,
    images: Sequence[Path],
    cache_dir: Path,
    flip: bool = False,
    batch_size: int = 4,
    desc: str = "features",
) -> torch.Tensor:
    """Trunk features from the cache, computing and storing them first when no valid file exists."""
    path = Path(cache_dir) / f"trunk-{cache_key(encoder, image_processor, images, flip)}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except (OSError, RuntimeError):
            path.unlink()  # a torn write from an interrupted run: recompute
    features = compute_trunk_features(encoder, image_processor, images, flip, batch_size, desc)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(features, temporary)
    temporary.replace(path)  # atomic: a crash never leaves a half-written cache behind
    return features
