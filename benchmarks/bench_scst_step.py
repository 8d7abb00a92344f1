"""One self-critical (SCST) training step, as `imcap train` runs it now against how it ran before, on
the same weights, images and seed, alternated in one run.

    .venv/bin/python benchmarks/bench_scst_step.py --json docs/bench_scst_step.json

A step samples `--samples` captions for each of `--images` training images, rewards them with CIDEr-D,
teacher-forces the samples and takes an optimizer step. Before, it
  - ran the CNN's fine-tuned tail and the concept head's own copy of it on the cached trunk features,
    once to sample and once more to teacher-force (now `LiteFront.precompute` keeps both outputs);
  - sampled with `generate(num_return_sequences=K)` and teacher-forced one copy of the image's tokens per
    sample, so each sample projected the image's tokens to cross-attention keys and values again (now
    `sample_captions` and `caption_logits` read them once per image: `imcap.beam_attention.read_once`).
The weights are the shipped model's (its decoder as trained; its tail frozen, as in the recipe's SCST
stage), the images Flickr8k training photos, their trunk features computed here (not the feature cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_caption import machine  # the script beside this one: the same machine record

from imcap.data import load_records
from imcap.modeling import load_model
from imcap.tokenizer import format_caption
from imcap.training.fronts import LiteFront
from imcap.training.steps import (
    caption_logits,
    caption_mask,
    generate_from_tokens,
    sample_captions,
    sample_mask_after_eos,
    scst_loss,
)

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "flickr8k")
    parser.add_argument("--model", type=Path, default=REPO / "src" / "imcap" / "default_model")
    parser.add_argument("--images", type=int, default=32, help="images per step (the recipe's 32)")
    parser.add_argument("--samples", type=int, default=8, help="sampled captions per image (the recipe's 8)")
    parser.add_argument("--steps", type=int, default=4, help="steps timed per way (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model.float(), loaded.tokenizer
    model.generation_config.no_repeat_ngram_size = 0  # training samples without the export's default
    front = LiteFront(model.encoder)
    front.set_tail_trainable(False)
    records = load_records(args.data, "train")[: args.images * (args.steps + 1)]
    pixels = loaded.image_processor([_rgb(r.image) for r in records], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        model.eval()
        trunk = torch.cat([model.encoder.trunk(pixels[i : i + 16]) for i in range(0, len(pixels), 16)]).half()
    kept = front.precompute(trunk, torch.device("cpu"))
    references = {r.image.name: list(r.captions) for r in records}
    from imcap.metrics import CiderD  # the training extra

    cider = CiderD(references)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=0.0
    )  # lr 0: same weights

    def step(index: int, now: bool) -> float:
        rows = slice(index * args.images, (index + 1) * args.images)
        names = [r.image.name for r in records[rows] for _ in range(args.samples)]
        torch.manual_seed(index)
        started = time.perf_counter()
        features = kept[rows] if now else trunk[rows]
        with torch.no_grad():
            tokens = front.tokens(features, from_trunk=not now)
        if now:
            samples = sample_captions(model, tokens, args.samples, 16)
        else:
            samples = generate_from_tokens(
                model,
                tokens,
                do_sample=True,
                top_k=0,
                num_beams=1,
                num_return_sequences=args.samples,
                max_new_tokens=16,
            )
        samples = sample_mask_after_eos(samples, tokenizer.eos_token_id, tokenizer.pad_token_id)
        texts = [format_caption(t) for t in tokenizer.batch_decode(samples, skip_special_tokens=True)]
        rewards = torch.tensor(cider.scores(texts, names), dtype=torch.float32)
        mask = caption_mask(samples, tokenizer.eos_token_id)
        tokens = front.tokens(features, from_trunk=not now)
        if now:
            logits = caption_logits(model, tokens, samples[:, :-1], mask[:, :-1], args.samples)
        else:
            copies = tokens.repeat_interleave(args.samples, dim=0)
            logits = caption_logits(model, copies, samples[:, :-1], mask[:, :-1], 1)
        loss = scst_loss(logits, samples, mask, rewards, args.samples).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"before": [], "now": []}
    for index in range(args.steps + 1):  # step 0 warms both up and is not counted
        for way in ("before", "now") if index % 2 else ("now", "before"):
            seconds = step(index, way == "now")
            if index:
                times[way].append(seconds)
    before, now = statistics.median(times["before"]), statistics.median(times["now"])
    result = {
        "images_per_step": args.images,
        "samples_per_image": args.samples,
        "steps_per_way": args.steps,
        "before_s_per_step": round(before, 3),
        "now_s_per_step": round(now, 3),
        "speedup": round(before / now, 2),
        "times": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "machine": machine(),
    }
    print(
        f"SCST step, {args.images} images x {args.samples} samples: before {before:.2f} s, now {now:.2f} s "
        f"({result['speedup']}x)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _rgb(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


if __name__ == "__main__":
    main()
