"""Probe: what would an ensemble of imcap models score on val? (issue 11's "ensembles" step, measured
before building it into the engine.)

    .venv/bin/python benchmarks/probe_ensemble.py --models runs/a,runs/b --json ensemble.json [--guide]

Each model encodes the photo with its own encoder; beam search runs on the mean of the members'
next-token probabilities (log of the mean of their softmaxes), with each member keeping its own KV cache.
The members must share a tokenizer. The engine is patched from outside (its decoder swapped for one that
runs every member, its encoder for one that concatenates the members' states), so this is a measurement,
not a feature: `imcap eval` scores the result like any model, guided with the first member's head and
guidance when `--guide` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import types
from pathlib import Path

import torch
from torch import nn

import imcap.guided as guided
import imcap.search as search
from imcap.captioner import Captioner
from imcap.compat import cache_keyword
from imcap.engine import Encoded
from imcap.evaluate import evaluate
from imcap.generation import CaptionOptions


class _SelfAttention:
    def __init__(self, caches):
        self.caches = caches

    def reorder_cache(self, rows):
        for cache in self.caches:
            cache.self_attention_cache.reorder_cache(rows)


class EnsembleCache:
    """One engine cache per member, reordered together."""

    def __init__(self, decoders):
        self.members = [search.new_cache(d) for d in decoders]

    def reorder_cache(self, rows):
        for cache in self.members:
            cache.reorder_cache(rows)

    @property
    def self_attention_cache(self):
        return _SelfAttention(self.members)


class EnsembleDecoder(nn.Module):
    """Logits whose log-softmax is the log of the members' mean probabilities."""

    def __init__(self, decoders):
        super().__init__()
        self.members = nn.ModuleList(decoders)
        self.config = decoders[0].config

    def forward(self, input_ids=None, encoder_hidden_states=None, use_cache=True, cache=None):
        states = encoder_hidden_states.chunk(len(self.members), dim=-1)
        log_probs = [
            torch.log_softmax(
                member(
                    input_ids=input_ids,
                    encoder_hidden_states=hidden,
                    use_cache=True,
                    **{cache_keyword(member): member_cache},
                ).logits.float(),
                dim=-1,
            )
            for member, hidden, member_cache in zip(self.members, states, cache.members, strict=True)
        ]
        mean = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))
        return types.SimpleNamespace(logits=mean)


def ensemble_captioner(folders: list[str]) -> Captioner:
    members = [Captioner.from_pretrained(folder) for folder in folders]
    first = members[0]
    encoders = [m.engine.encode_with_concepts for m in members]

    def encode(pixels: torch.Tensor) -> Encoded:
        outs = [encode_member(pixels) for encode_member in encoders]
        return Encoded(torch.cat([o.hidden for o in outs], dim=-1), outs[0].concept_probs)

    plain_new_cache = search.new_cache

    def new_cache(decoder):
        if isinstance(decoder, EnsembleDecoder):
            return EnsembleCache(decoder.members)
        return plain_new_cache(decoder)

    search.new_cache = guided.new_cache = new_cache
    first.engine.encode_with_concepts = encode
    first.engine.decoder = EnsembleDecoder([m.engine.decoder for m in members])
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="comma-separated model folders")
    parser.add_argument("--data", default="../shared/datasets/flickr8k")
    parser.add_argument("--split", default="val")
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--guide", action="store_true")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    captioner = ensemble_captioner(args.models.split(","))
    options = CaptionOptions(num_beams=args.beams, guide=args.guide)
    report = evaluate(captioner, args.data, args.split, options, limit=args.limit)
    result = {**report.to_json(), "members": args.models.split(",")}
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
