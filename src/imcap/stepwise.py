"""Decoding one token per row and step: greedy search and plain (ancestral) sampling.

Both run transformers' rules (`GenerationMixin._sample`): the logits processors first, then for sampling
generate's warpers in its order (temperature, top-k, top-p), softmax, one multinomial draw. A caption's
score sums the log-softmax of those final logits at its tokens, the numbers generate returns as `scores`.
What imcap adds: finished rows leave the batch, every image may ban its own words (imcap.search.Bans),
rows may start from given prefix tokens (guidance's forced subject, "a cat ..."), and seeded sampling
draws each row from its own generator, so a row's tokens depend on its seed and image alone, never on the
batch it decodes in (a resumed job batches differently).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from transformers import GenerationConfig

from imcap.search import (
    Bans,
    Decoded,
    Special,
    new_cache,
    next_logits,
    run_decoder,
    sampling_warpers,
    seeded_generators,
)

# (sequences, processed logits, rows' indices into the batch) -> (next tokens, the logits they come from)
Chooser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def greedy(
    decoder,
    hidden: torch.Tensor,
    config: GenerationConfig,
    special: Special,
    processors,
    bans: Bans | None = None,
    prefix: torch.Tensor | None = None,
) -> list[list[Decoded]]:
    """Greedy decoding as `generate` does it: argmax of the processed logits, until end-of-text."""

    def argmax(sequences, processed, rows):
        return processed.argmax(dim=-1), processed

    return _decode(decoder, hidden, config, special, processors, argmax, bans, prefix)


def sample(
    decoder,
    hidden: torch.Tensor,
    config: GenerationConfig,
    special: Special,
    processors,
    bans: Bans | None = None,
    prefix: torch.Tensor | None = None,
    seeds: Sequence[int] | None = None,
) -> list[list[Decoded]]:
    """One sampled caption per row of `hidden`. seeds[row] seeds that row's own generator; None draws
    every row from torch's global generator (one batched draw per step)."""
    warpers = sampling_warpers(config)
    generators = seeded_generators(seeds, hidden.device)
    if generators is not None and len(generators) != hidden.shape[0]:
        raise ValueError(f"{len(generators)} seeds for {hidden.shape[0]} rows")

    def draw(sequences, processed, rows):
        warped = warpers(sequences, processed)
        probs = torch.softmax(warped, dim=-1)
        if generators is None:
            return torch.multinomial(probs, num_samples=1).squeeze(1), warped
        drawn = [
            torch.multinomial(probs[i], num_samples=1, generator=generators[row])
            for i, row in enumerate(rows.tolist())
        ]
        return torch.cat(drawn), warped

    return _decode(decoder, hidden, config, special, processors, draw, bans, prefix)


def sample_seeds(seed: int, count: int) -> list[int]:
    """A seed for each of an image's `count` samples, derived from the user's seed: sample j's draws are
    the same whatever the batch and however many samples are asked for."""
    digests = (hashlib.sha256(f"{seed}:{j}".encode()).digest() for j in range(count))
    return [int.from_bytes(digest[:8], "little") for digest in digests]


def _decode(
    decoder,
    hidden: torch.Tensor,
    config: GenerationConfig,
    special: Special,
    processors,
    choose: Chooser,
    bans: Bans | None,
    prefix: torch.Tensor | None,
) -> list[list[Decoded]]:
    """The loop both share: feed the start token (and the prefix), choose a token per row, stop rows at
    end-of-text or after max_new_tokens, and return each row's tokens (prefix included) and score."""
    batch, cache, device = hidden.shape[0], new_cache(decoder), hidden.device
    sequences = torch.full((batch, 1), special.start, dtype=torch.long, device=device)
    scores = torch.zeros(batch, device=device)
    if prefix is not None and prefix.shape[1]:
        # start + prefix in one call, which fills the cache; the prefix's log-prob counts in the score
        sequences = torch.cat([sequences, prefix.to(device)], dim=1)
        all_logits = run_decoder(decoder, sequences, hidden, cache)
        log_probs = torch.log_softmax(all_logits[:, :-1], dim=-1)
        scores = log_probs.gather(-1, sequences[:, 1:, None]).squeeze(-1).sum(dim=1)
        logits = all_logits[:, -1]  # raw logits: processors such as the repetition penalty expect them
    else:
        logits = next_logits(decoder, sequences, hidden, cache)
    stop_at = sequences.shape[1] + config.max_new_tokens
    rows = torch.arange(batch, device=device)  # the batch row each remaining row started as
    results: list[list[Decoded]] = [[] for _ in range(batch)]
    while True:
        processed = processors(sequences, logits)
        if bans is not None:
            processed = bans.apply(sequences, processed, rows)
        token, final = choose(sequences, processed, rows)
        scores = scores + torch.log_softmax(final, dim=-1).gather(1, token[:, None]).squeeze(1)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        finished = torch.isin(token, special.eos.to(token.device))
        if sequences.shape[1] == stop_at:
            finished[:] = True
        for row in finished.nonzero().flatten().tolist():
            results[rows[row]].append(Decoded(sequences[row, 1:].tolist(), float(scores[row])))
        if finished.all():
            return results
        if finished.any():  # drop finished rows from the batch and from the caches
            keep = (~finished).nonzero().flatten()
            sequences, scores, rows, hidden = sequences[keep], scores[keep], rows[keep], hidden[keep]
            cache.reorder_cache(keep)
        logits = next_logits(decoder, sequences, hidden, cache)
