"""The seed architectures side by side: each trained for the same wall-clock budget, evaluated alike.

    python benchmarks/bench_archs.py --budget-minutes 30

For each architecture (recipes: configs/flickr8k.yaml's encoder-decoder without its SCST epochs,
configs/prefix.yaml, configs/lstm.yaml) this trains on Flickr8k train with `time_budget_minutes` = the
budget; the learning rate warms up, then decays over the budget (a cosine on the clock), and training stops
when the budget is spent. Only time inside training steps counts: the image-feature cache is built once
and shared by all three (EfficientNet-Lite2 at 260 px, the same trunk), and per-epoch validation and
checkpoints are outside the clock. The model kept is the epoch with the best val CIDEr (greedy).

Each kept model is then evaluated on val with `imcap.evaluate` (beam 3: BLEU-1..4, METEOR, ROUGE-L,
CIDEr-D), its captions/s measured on the same run after a warm-up batch (image files in, captions out,
batches of 16), and docs/results.md and docs/<arch>_learning_curve.png are written. Per-architecture
numbers are kept in <out-dir>/<arch>/bench.json, so `--skip-train` redoes evaluation and report only.

The feature cache is keyed on the images' mtimes too: if it is stale (the shared Flickr8k copy was
rewritten), the first architecture rebuilds it, about 12 minutes on 2 cores, before any clock starts.

Run it on an otherwise idle machine: with other jobs on the cores, torch's threads oversubscribe them and
steps get up to 10x slower, unevenly, which would make the budgets unequal in work. (`--threads N` sets
torch's threads, e.g. to the number of free cores.)

A smoke run (minutes, its own folders): --budget-minutes 1 --train-limit 200 --val-limit 40
    --out-dir /tmp/bench-smoke --docs /tmp/bench-smoke/docs --cache-dir /tmp/bench-smoke/cache
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = {  # architecture -> its training recipe
    "encoder-decoder": REPO / "configs" / "flickr8k.yaml",
    "prefix": REPO / "configs" / "prefix.yaml",
    "lstm": REPO / "configs" / "lstm.yaml",
}
MAX_EPOCHS = 100  # the budget ends training long before this
EVAL_BATCH = 16
BEAMS = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget-minutes", type=float, required=True, help="training minutes per architecture"
    )
    parser.add_argument(
        "--archs", default=",".join(RECIPES), help="comma-separated, from: " + ", ".join(RECIPES)
    )
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "flickr8k"))
    parser.add_argument("--train-limit", type=int, default=None, help="first N training images (smoke runs)")
    parser.add_argument("--val-limit", type=int, default=None, help="first N val images (smoke runs)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "runs" / "bench-archs")
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: the recipes', shared)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument(
        "--skip-train", action="store_true", help="evaluate and report the runs already there"
    )
    return parser.parse_args(argv)


def recipe(arch: str, args: argparse.Namespace):
    """The architecture's recipe, on the clock: cross-entropy only, budgeted, in its own run folder."""
    from imcap.training.config import TrainConfig

    config = TrainConfig.from_yaml(RECIPES[arch])
    config.data.path = args.data
    config.data.train_limit, config.data.val_limit = args.train_limit, args.val_limit
    config.optim.epochs, config.scst.epochs = MAX_EPOCHS, 0
    config.time_budget_minutes = args.budget_minutes
    config.output_dir = str(args.out_dir / arch)
    config.cache_dir = args.cache_dir or config.cache_dir
    config.threads = args.threads
    return config.validate(str(RECIPES[arch]))


def train_one(arch: str, args: argparse.Namespace) -> dict:
    from imcap.training.loop import train

    config = recipe(arch, args)
    run_dir = Path(config.output_dir)
    for log in ("metrics.jsonl", "steps.jsonl"):  # a fresh run, not appended to an old one
        (run_dir / log).unlink(missing_ok=True)
    started = time.time()
    train(config)
    steps = _rows(run_dir / "steps.jsonl")
    epochs = _rows(run_dir / "metrics.jsonl")
    best = max(epochs, key=lambda r: r["CIDEr"])
    return {
        "budget_minutes": args.budget_minutes,
        "train_seconds": steps[-1]["seconds"],
        "wall_seconds": round(time.time() - started, 1),  # with feature loading, validation, checkpoints
        "steps": len(steps),
        "train_images": sum(r["images"] for r in steps),
        "epochs": len(epochs),
        "best_epoch": best["epoch"],
        "final_loss": sum(r["loss"] for r in steps[-50:]) / len(steps[-50:]),
    }


def evaluate_one(arch: str, args: argparse.Namespace) -> dict:
    """Beam-3 val metrics, captions/s after a warm-up batch, and parameter counts of the kept model."""
    from imcap.captioner import Captioner
    from imcap.data import load_records
    from imcap.evaluate import evaluate
    from imcap.generation import CaptionOptions
    from imcap.modeling import count_parameters

    captioner = Captioner.from_pretrained(args.out_dir / arch / "best")
    options = CaptionOptions(num_beams=BEAMS)
    warm_up = [r.image for r in load_records(args.data, "val")[:EVAL_BATCH]]
    captioner(warm_up, options)
    report = evaluate(captioner, args.data, "val", options, limit=args.val_limit, batch_size=EVAL_BATCH)
    model = captioner.model
    cnn = getattr(model.encoder, "cnn", None)
    return {
        **report.metrics,
        "val_images": report.n_images,
        "distinct_captions": report.distinct_captions,
        "captions_per_second": report.n_images / max(report.settings["captioning_seconds"], 0.1),
        "parameters": count_parameters(model),
        "cnn_parameters": count_parameters(cnn) if cnn is not None else 0,
        "examples": dict(list(report.predictions.items())[:3]),
    }


def plot_one(arch: str, args: argparse.Namespace) -> Path:
    from imcap.training.plots import plot_learning_curve

    run_dir = args.out_dir / arch
    png = args.docs / f"{arch}_learning_curve.png"
    title = f"{arch}: {args.budget_minutes:g} training minutes on Flickr8k train"
    plot_learning_curve(run_dir / "metrics.jsonl", png, run_dir / "steps.jsonl", title=title)
    return png


def where_it_ran(args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    model_name = Path("/proc/cpuinfo")
    if model_name.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in model_name.read_text().splitlines()
            if "model name" in line
        ]
        cpu = names[0] if names else cpu
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU: {cpu}"
    return (
        f"{device}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )


def write_report(results: dict[str, dict], args: argparse.Namespace) -> Path:
    header = (
        "| architecture | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr-D | parameters (CNN) "
        "| training time | steps / images seen | captions/s |"
    )
    rows = [header, "| " + " | ".join(["---"] * 12) + " |"]
    for arch, r in results.items():
        metrics = " | ".join(f"{r.get(k, float('nan')):.3f}" for k in _METRICS)
        rows.append(
            f"| {arch} | {metrics} | {r['parameters'] / 1e6:.1f} M ({r['cnn_parameters'] / 1e6:.1f} M) "
            f"| {r['train_seconds'] / 60:.1f} min | {r['steps']} / {r['train_images']} "
            f"| {r['captions_per_second']:.1f} |"
        )
    limits = ""
    if args.train_limit or args.val_limit:
        limits = (
            f" (smoke run: first {args.train_limit or 'all'} train / {args.val_limit or 'all'} val images)"
        )
    curves = "\n\n".join(f"![{arch}]({arch}_learning_curve.png)" for arch in results)
    examples = "\n".join(
        f"| {arch} | {Path(image).name} | {caption} |"
        for arch, r in results.items()
        for image, caption in r["examples"].items()
    )
    val_images = next(iter(results.values()))["val_images"]
    text = f"""# The seed architectures side by side

Each architecture trained on Flickr8k train for the same wall-clock budget, **{args.budget_minutes:g}
minutes of training steps**{limits}, then evaluated on Flickr8k val ({val_images} images) with beam
search, 3 beams. Reproduce with:

```bash
.venv/bin/python benchmarks/bench_archs.py --budget-minutes {args.budget_minutes:g}
```

{chr(10).join(rows)}

- **encoder-decoder**: the default model's recipe (`configs/flickr8k.yaml`: EfficientNet-Lite2 tokens, a
  3-layer 256-wide GPT-2 with cross-attention), cross-entropy only (no SCST epochs, unlike the shipped model).
- **prefix**: `configs/prefix.yaml`, the same encoder tokens mapped into a 6-layer 256-wide GPT-2 as a prefix.
- **lstm**: `configs/lstm.yaml`, the seed's merge model on the 1280-d pooled CNN features, word vocabulary.

How it was measured. All three share the cached EfficientNet-Lite2 trunk features (260 px, built once before
the clock starts; not counted). The clock counts training steps only: per-epoch greedy validation and
checkpoints are outside it. Each run warms its learning rate up over the first 5% of the budget, then
decays it on a cosine over the rest, and stops when the budget is spent (so each finishes its schedule,
however many steps it managed); the model kept is the epoch with the best greedy val CIDEr. Metrics are
pycocoevalcap's (CIDEr is CIDEr-D) against the original references, so the LSTM, which was trained on
the seed's cleaned captions (no "a", no punctuation), is scored on its real output. Captions/s: image
files to captions, batches of {EVAL_BATCH}, beam {BEAMS}, after a warm-up batch; the encoder-decoder
decodes with imcap's engine where the Captioner uses it, the others with transformers' `generate` (the
LSTM reruns its LSTM over the caption at every step: it keeps no cache). Parameters include the CNN (in
brackets), which stays frozen with its ImageNet weights in all three recipes.

Ran on: {where_it_ran(args)}.

Example captions (first val images):

| architecture | image | caption |
| --- | --- | --- |
{examples}

{curves}
"""
    path = args.docs / "results.md"
    path.write_text(text)
    return path


_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = sorted(set(archs) - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown architecture(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    args.docs.mkdir(parents=True, exist_ok=True)
    results = {}
    for arch in archs:
        saved = args.out_dir / arch / "bench.json"
        trained = (
            json.loads(saved.read_text()) if args.skip_train and saved.exists() else train_one(arch, args)
        )
        gc.collect()  # the previous run's features and maps (GBs on the full data) go before the next loads
        result = {**trained, **evaluate_one(arch, args)}
        saved.write_text(json.dumps(result, indent=2) + "\n")
        plot_one(arch, args)
        results[arch] = result
        print(json.dumps({"arch": arch, **{k: v for k, v in result.items() if k != "examples"}}))
    print(f"wrote {write_report(results, args)}")


if __name__ == "__main__":
    main()
