"""Beam width, length penalty and n-gram blocking on Flickr8k val: which decoding settings should be the
defaults?

    .venv/bin/python benchmarks/sweep_decoding.py --data ../shared/datasets/flickr8k --json sweep.json
    .venv/bin/python benchmarks/sweep_decoding.py --beams 3 --length-penalties 1.0 \
        --no-repeat-ngram-sizes 0 2 4 --json ngrams.json     # n-gram blocking at beam 3

Every setting captions the whole split through `imcap.evaluate` (the same captions `imcap eval` makes,
guidance as the model ships it unless `--no-guide`) and is scored with CIDEr-D and BLEU-4 (METEOR is left
out: it runs Java, ~30 s per setting; `imcap eval` gives it for the chosen one). Select on val only; the
held-out test split stays unseen.
Also prints each setting's captioning images/s, measured in this run (compare them with each other, not
with other runs: this machine's speed varies).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from imcap.captioner import Captioner
from imcap.evaluate import evaluate
from imcap.generation import CaptionOptions

BEAMS = (1, 2, 3, 4, 5)
LENGTH_PENALTIES = (0.5, 1.0, 1.5, 2.0)  # tried at --penalty-beams; beam search only (greedy ignores it)


def settings_grid(
    beams: tuple[int, ...],
    penalties: tuple[float, ...],
    penalty_beams: tuple[int, ...],
    ngram_sizes: tuple[int, ...] = (),
):
    """(beams, length penalty, no_repeat_ngram_size) triples: every width at 1.0, every penalty at the
    chosen widths, and every n-gram size at those widths and 1.0 (None: the model's own setting)."""
    grid = [(b, 1.0, None) for b in beams]
    grid += [(b, p, None) for b in penalty_beams for p in penalties if p != 1.0 and b > 1]
    grid += [(b, 1.0, n) for b in penalty_beams for n in ngram_sizes]
    return list(dict.fromkeys(grid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/datasets/flickr8k")
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the shipped model)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--beams", type=int, nargs="+", default=list(BEAMS))
    parser.add_argument("--length-penalties", type=float, nargs="+", default=list(LENGTH_PENALTIES))
    parser.add_argument("--penalty-beams", type=int, nargs="+", default=[3, 5])
    parser.add_argument(
        "--no-repeat-ngram-sizes",
        type=int,
        nargs="*",
        default=[],
        help="n-gram blocking sizes to try at --penalty-beams (0: none); default: only the model's own",
    )
    parser.add_argument("--no-guide", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    captioner = Captioner.from_pretrained(args.model)
    rows = []
    grid = settings_grid(
        tuple(args.beams),
        tuple(args.length_penalties),
        tuple(args.penalty_beams),
        tuple(args.no_repeat_ngram_sizes),
    )
    for beams, penalty, ngrams in grid:
        options = CaptionOptions(
            num_beams=beams, length_penalty=penalty, no_repeat_ngram_size=ngrams, guide=not args.no_guide
        )
        report = evaluate(captioner, args.data, args.split, options, limit=args.limit, meteor=False)
        seconds = report.settings["captioning_seconds"]
        row = {
            "beams": beams,
            "length_penalty": penalty,
            "no_repeat_ngram_size": report.settings["no_repeat_ngram_size"],
            "CIDEr-D": round(report.metrics["CIDEr"], 4),
            "BLEU-4": round(report.metrics["BLEU-4"], 4),
            "distinct": report.distinct_captions,
            "mean_words": round(_mean_words(report.predictions), 2),
            "images_per_s": round(report.n_images / seconds, 1) if seconds else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    best = max(rows, key=lambda r: r["CIDEr-D"])
    print(
        f"best val CIDEr-D: beams {best['beams']}, length penalty {best['length_penalty']},"
        f" no-repeat n-gram size {best['no_repeat_ngram_size']}"
    )
    if args.json:
        settings = {"model": captioner.name, "data": args.data, "split": args.split, "limit": args.limit}
        payload = {"settings": {**settings, "guide": not args.no_guide}, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _mean_words(predictions: dict[str, str]) -> float:
    return sum(len(caption.split()) for caption in predictions.values()) / max(len(predictions), 1)


if __name__ == "__main__":
    raise SystemExit(main())
