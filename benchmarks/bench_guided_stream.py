"""What guided decoding costs over a stream of images, as `imcap caption FOLDER` runs it (one
`imcap.batch.caption_batches` pass over every image), three ways alternated in one run:

- unguided (`guide=False`);
- guided, the second pass pooled over batches (imcap.rewrites, `imcap.batch.REWRITE_POOL`): the default;
- guided, the second pass run per batch (MAX_HELD_BATCHES = 1), as imcap did before pooling (with
  today's read-ahead, `imcap.batch.READ_AHEAD_BATCHES`, and on the rewriting thread as pools are).

Each repetition runs the three sides in turn on the same images, so that a change in machine load hits
them alike; the report gives each side's images/s over all repetitions, each guided side's speed over
unguided's (overall and per repetition), and whether both guided sides wrote the same captions.
`benchmarks/bench_caption.py` measures the same ratio in blocks of 40 images (so pooling spans at most
three batches of 16 there) against plain `generate`.

    python benchmarks/bench_guided_stream.py --images ../shared/datasets/flickr8k/images \\
        --list ../shared/datasets/flickr8k/splits/val.txt --limit 400 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from bench_caption import image_paths, machine  # the script beside this one

from imcap import batch
from imcap.captioner import Captioner
from imcap.generation import CaptionOptions

SIDES = ("unguided", "guided_pooled", "guided_per_batch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, type=Path, help="folder of images")
    parser.add_argument("--list", type=Path, help="file of image names to take, in order (a split file)")
    parser.add_argument("--limit", type=int, default=400, help="first N images")
    parser.add_argument("--model", default=None, help="folder or hub id (default: shipped)")
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternated")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    paths = image_paths(args.images, args.list, args.limit)
    captioner = Captioner.from_pretrained(args.model)
    if captioner.guide is None:
        raise SystemExit(f"{captioner.name} has no guidance: nothing to compare")
    options = CaptionOptions(num_beams=args.beams).validate()
    list(batch.caption_batches(captioner, paths[:2], options, args.batch_size))  # lazy start-up, once
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    captions: dict[str, list[str]] = {}
    for repeat in range(args.repeats):
        for side in SIDES:
            took, said = run_side(captioner, paths, options, args.batch_size, side)
            seconds[side].append(took)
            captions.setdefault(side, said)
        timings = ", ".join(f"{side} {seconds[side][-1]:.1f} s" for side in SIDES)
        print(f"repeat {repeat + 1}/{args.repeats}: {timings}")
    report = build_report(args, paths, seconds, captions)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_side(captioner: Captioner, paths, options: CaptionOptions, batch_size: int, side: str):
    """Seconds to caption every path one way, and the captions."""
    held_before = batch.MAX_HELD_BATCHES
    batch.MAX_HELD_BATCHES = 1 if side == "guided_per_batch" else held_before
    side_options = replace(options, guide=False) if side == "unguided" else options
    try:
        started = time.perf_counter()
        said = []
        for done in batch.caption_batches(captioner, paths, side_options, batch_size):
            if done.failed:
                raise RuntimeError(f"could not read {done.failed[0]}")
            said += [result.caption for result in done.results]
        return time.perf_counter() - started, said
    finally:
        batch.MAX_HELD_BATCHES = held_before


def build_report(args, paths, seconds: dict[str, list[float]], captions: dict[str, list[str]]) -> dict:
    total = {side: sum(times) for side, times in seconds.items()}
    unguided = seconds["unguided"]
    return {
        "model": args.model or "imcap default (shipped)",
        "settings": {
            "images": len(paths),
            "beams": args.beams,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "rewrite_pool": batch.REWRITE_POOL,
            "max_held_batches": batch.MAX_HELD_BATCHES,
        },
        "images_per_s": {side: len(paths) * args.repeats / total[side] for side in SIDES},
        "guided_speed_ratio": {side: total["unguided"] / total[side] for side in SIDES[1:]},
        "guided_speed_ratio_per_repeat": {
            side: [u / g for u, g in zip(unguided, seconds[side], strict=True)] for side in SIDES[1:]
        },
        "seconds": seconds,
        "guided_sides_same_captions": captions["guided_pooled"] == captions["guided_per_batch"],
        "guided_changed_share": sum(
            a != b for a, b in zip(captions["guided_pooled"], captions["unguided"], strict=True)
        )
        / len(paths),
        "machine": machine(),
    }


if __name__ == "__main__":
    main()
