"""The local engine against Ray with 1 and 2 Captioner actors, on the same WebDataset shards, one run.

The first `--limit` images of a Flickr8k split are packed into shards of `--shard-size` (as img2dataset
writes them: KEY.jpg), then captioned into OUT.parquet three ways: `imcap.shards.caption_units` in this
process, and `imcap.ray_engine.caption_units_ray` with 1 and 2 workers on a local Ray started with this
machine's cores. Ray's start-up (`ray.init`) and the time until the first caption comes back (the actors
loading the model) are reported apart from the captioning rate. The captions of each Ray run are
compared with the local engine's.

    python benchmarks/bench_scale.py --images ../shared/datasets/flickr8k/images \\
        --list ../shared/datasets/flickr8k/splits/val.txt --limit 1000 --json bench_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray

from imcap.captioner import Captioner
from imcap.datasets_out import ParquetSink
from imcap.generation import CaptionOptions
from imcap.ray_engine import caption_units_ray
from imcap.shards import caption_units
from imcap.sources import find_units


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, type=Path, help="folder of images")
    parser.add_argument("--list", type=Path, help="file of image names to take, in order (a split file)")
    parser.add_argument("--limit", type=int, default=1000, help="first N images")
    parser.add_argument("--shard-size", type=int, default=100, help="images per .tar shard")
    parser.add_argument("--model", default=None, help="folder or hub id (default: shipped)")
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray actor pool sizes")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def make_shards(images: list[Path], folder: Path, shard_size: int) -> list[Path]:
    shards = []
    for number, start in enumerate(range(0, len(images), shard_size)):
        shards.append(folder / f"{number:05d}.tar")
        with tarfile.open(shards[-1], "w") as tar:
            for image in images[start : start + shard_size]:
                tar.add(image, arcname=f"{image.stem}.jpg")
    return shards


def captions(out: Path) -> dict[str, str]:
    table = pq.read_table(out, columns=["key", "caption"])
    return dict(zip(table.column("key").to_pylist(), table.column("caption").to_pylist(), strict=True))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    names = args.list.read_text().split() if args.list else sorted(p.name for p in args.images.iterdir())
    images = [args.images / name for name in names[: args.limit]]
    options = CaptionOptions(num_beams=args.beams)
    work = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    units = find_units(make_shards(images, work, args.shard_size))
    report = {
        "images": len(images),
        "shards": len(units),
        "beams": args.beams,
        "batch_size": args.batch_size,
        "cores": os.cpu_count(),
        "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
        "runs": [],
    }

    started = time.monotonic()
    captioner = Captioner.from_pretrained(args.model)
    load = time.monotonic() - started
    with ParquetSink(work / "local.parquet", captioner.name, options.to_dict()) as sink:
        summary = caption_units(captioner, units, sink, options, args.batch_size, progress=False)
    local = captions(work / "local.parquet")
    report["runs"].append(
        {"engine": "local", "model_load_s": round(load, 2), "caption_s": round(summary.seconds, 2),
         "images_per_s": round(summary.captioned / summary.seconds, 2)}
    )  # fmt: skip
    print(report["runs"][-1], flush=True)
    del captioner

    for workers in args.workers:
        started = time.monotonic()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_start = time.monotonic() - started
        out = work / f"ray{workers}.parquet"
        with ParquetSink(out, "default" if args.model is None else args.model, options.to_dict()) as sink:
            summary = caption_units_ray(
                {"name_or_path": args.model}, units, sink, options, workers=workers,
                batch_size=args.batch_size, progress=False,
            )  # fmt: skip
        ray.shutdown()
        got = captions(out)
        report["runs"].append(
            {"engine": "ray", "workers": workers, "ray_init_s": round(ray_start, 2),
             "first_caption_s": round(summary.first_result_seconds, 2),
             "caption_s": round(summary.seconds, 2),
             "images_per_s": round(summary.captioned / summary.seconds, 2),
             "same_caption_as_local": round(sum(got[k] == local.get(k) for k in got) / max(len(got), 1), 4)}
        )  # fmt: skip
        print(report["runs"][-1], flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
