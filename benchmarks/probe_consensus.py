"""Probe: would consensus reranking lift val? (issue 11, measured before building it into the engine.)

    .venv/bin/python benchmarks/probe_consensus.py --json consensus.json

Consensus reranking (Devlin et al. 2015, "Exploring Nearest Neighbor Approaches for Image Captioning";
Mao et al. 2015): beam search returns its `--beams` finished captions, and the one kept is the one that
agrees best with what people wrote for the most similar training photos: CIDEr-D (training-corpus document
frequencies, imcap.metrics.CiderD) against the references of the `k` nearest training photos, plus
`weight` x the caption's own length-normalised score. Photos are compared by the cosine of the mean of
their patch tokens in the decoder's space (the encoder's output, which the decoder reads). Every (k,
weight) pair of the grid is scored on val with pycocoevalcap (no METEOR), beside the plain first caption.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from imcap.captioner import Captioner
from imcap.data import load_records
from imcap.generation import CaptionOptions
from imcap.metrics import CiderD, score_captions

NEIGHBOURS = (5, 10, 20)
WEIGHTS = (0.0, 0.5, 1.0, 2.0)


def encode(captioner: Captioner, images: list, options: CaptionOptions | None, batch: int = 32):
    """Unit-length photo descriptors and, with options, each photo's candidates (text, score)."""
    keys, candidates = [], []
    concept_tokens = getattr(captioner.model.encoder.config, "concept_tokens", 0)
    for start in tqdm(range(0, len(images), batch), desc="encoding", leave=False):
        encoded = captioner.encode(captioner.pixel_values(images[start : start + batch]))
        # the encoder's tokens: a global one, the patches, then the concept tokens
        patches = encoded.hidden.float()[:, 1 : encoded.hidden.shape[1] - concept_tokens].mean(dim=1)
        keys.append(torch.nn.functional.normalize(patches, dim=-1))
        if options is not None:
            results = captioner.caption_encoded(encoded, options)
            candidates += [[(c.text, c.score) for c in r.candidates] for r in results]
    return torch.cat(keys), candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/datasets/flickr8k")
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--no-guide", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    captioner = Captioner.from_pretrained(args.model)
    train, val = load_records(args.data, "train"), load_records(args.data, "val")
    options = CaptionOptions(num_beams=args.beams, num_return_sequences=args.beams, guide=not args.no_guide)
    with torch.inference_mode():
        train_keys, _ = encode(captioner, [r.image for r in train], None)
        val_keys, candidates = encode(captioner, [r.image for r in val], options)
    cider = CiderD({str(i): list(r.captions) for i, r in enumerate(train)})
    references = {str(r.image): list(r.captions) for r in val}

    def scored(choice: list[str]) -> dict:
        metrics = score_captions(dict(zip(references, choice, strict=True)), references, meteor=False)
        return {"BLEU-4": round(metrics["BLEU-4"], 4), "CIDEr": round(metrics["CIDEr"], 4)}

    rows = [{"rerank": "none (first caption)", **scored([c[0][0] for c in candidates])}]
    nearest = (val_keys @ train_keys.T).topk(max(NEIGHBOURS), dim=-1).indices
    for k in NEIGHBOURS:
        consensus = []
        for image, options_here in enumerate(candidates):
            ids = [str(j) for j in nearest[image, :k].tolist()]
            texts = [text for text, _ in options_here]
            pairs = cider.scores([t for t in texts for _ in ids], ids * len(texts))
            consensus.append(pairs.reshape(len(texts), k).mean(axis=1))
        for weight in WEIGHTS:
            choice = [
                cands[int(np.argmax(agree + weight * np.array([s for _, s in cands])))][0]
                for cands, agree in zip(candidates, consensus, strict=True)
            ]
            rows.append({"rerank": f"k {k}, weight {weight}", **scored(choice)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"model": captioner.name, "beams": args.beams, "guide": not args.no_guide, "rows": rows}
    print(json.dumps(rows[0]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
