"""Do captions depend on the batch size? Caption the same images one at a time and in batches, compare.

Greedy and beam search are deterministic, but a batched forward pass may take other floating-point paths
than a single image does, and a near-tie between two tokens can then flip. This prints the share of
images whose caption is the same at every batch size, lists the ones that differ, and says where it ran.

    python benchmarks/batch_agreement.py --model src/imcap/default_model --images DIR --limit 200
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from PIL import Image

from imcap.batch import find_images
from imcap.captioner import Captioner
from imcap.generation import CaptionOptions
from imcap.images import ImageLoadError, load_image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the shipped model)")
    parser.add_argument("--images", required=True, type=Path, help="folder of images")
    parser.add_argument("--limit", type=int, default=200, help="first N images (sorted by path)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated; the first is the reference")
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=24)
    parser.add_argument("--recursive", action="store_true")
    return parser.parse_args(argv)


def decode(paths: list[Path], max_pixels: int | None) -> dict[Path, Image.Image]:
    pictures = {}
    for path in paths:
        try:
            pictures[path] = load_image(path, max_pixels)
        except ImageLoadError as error:
            print(f"skipped: {error}")
    return pictures


def caption_all(captioner: Captioner, pictures: list[Image.Image], options: CaptionOptions, batch_size: int):
    """Captions of `pictures` in order, `batch_size` at a time, and the seconds it took."""
    started, captions = time.perf_counter(), []
    for start in range(0, len(pictures), batch_size):
        captions += [r.caption for r in captioner(pictures[start : start + batch_size], options)]
    return captions, time.perf_counter() - started


def where_it_ran(captioner: Captioner) -> str:
    return (
        f"model {captioner.name} | torch {torch.__version__} on {captioner.model.device} "
        f"({torch.get_num_threads()} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}) | "
        f"{platform.processor() or platform.machine()} | python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    options = CaptionOptions(num_beams=args.beams, max_new_tokens=args.max_length).validate()
    captioner = Captioner.from_pretrained(args.model)
    pictures = decode(find_images([args.images], args.recursive)[: args.limit], captioner.max_pixels)
    paths, images = list(pictures), list(pictures.values())
    if not images:
        print(f"no readable images in {args.images}")
        return 2
    caption_all(captioner, images[: sizes[0]], options, sizes[0])  # warm-up, not compared
    results = {size: caption_all(captioner, images, options, size) for size in sizes}
    reference, _ = results[sizes[0]]
    print(where_it_ran(captioner))
    print(f"{len(images)} images, num_beams={args.beams}, max_new_tokens={args.max_length}")
    for size, (_, seconds) in results.items():
        print(f"batch size {size:3d}: {len(images) / seconds:6.1f} images/s")
    differing = [i for i in range(len(images)) if any(results[s][0][i] != reference[i] for s in sizes[1:])]
    agreeing, total = len(images) - len(differing), len(images)
    print(f"agreement across batch sizes {args.batch_sizes}: {agreeing / total:.1%} ({agreeing}/{total})")
    for i in differing:
        print(f"  {paths[i]}: " + " | ".join(f"{s}: {results[s][0][i]!r}" for s in sizes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
