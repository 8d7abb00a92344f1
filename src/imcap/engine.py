"""The inference engine: batched greedy and beam-search decoding that gives `generate`'s tokens, faster.

Why not call `model.generate` per batch? On a CPU the decoder of a captioning model is small, and most of
generate's time per step goes to work that captioning doesn't need: re-reordering the cross-attention
cache of every beam (whose rows are identical within an image), and carrying finished images to the end
of the batch. This engine runs the same algorithm as transformers' greedy and vectorised beam search
(same log-softmax, logits processors, top-2k continuations, length penalty and early stopping), so its
captions are token-for-token those of `generate`, but:

- the encoder runs once per image; every beam reads the same cross-attention keys/values, kept once per
  image (imcap.beam_attention), so only the self-attention cache is reordered between steps;
- an image's result is taken as soon as it can no longer change (all beams finished, or no open beam can
  beat the finished ones), and done images leave the batch together once they are half of it, so a long
  caption doesn't make the whole batch pay for it (leaving copies the other rows' caches: one image at a
  time cost more than it saved);
- our EfficientNet-Lite encoder runs with BatchNorm folded into its convolutions and channels-last
  memory. Folding changes float rounding (~1e-5 on the visual tokens); `benchmarks/bench_caption.py`
  measures that captions stay identical to plain `generate`'s.

Sampling is not here: the Captioner sends it to `generate`, where seeded sampling is reproducible.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights
from transformers import DynamicCache, EncoderDecoderCache, GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from imcap.beam_attention import shares_cross_attention, with_shared_cross_attention
from imcap.compat import cache_keyword
from imcap.encoder import EfficientNetLiteEncoder

if TYPE_CHECKING:  # imcap.guided imports this module
    from imcap.guided import Constraint

_MASKED = -1.0e9  # the score transformers' beam search gives to excluded beams; kept for identical ties
_DROP_SHARE = 0.5  # beam search: done images leave the batch once they are this share of it (see run)


@dataclass
class Decoded:
    """One decoded caption: generated token ids (end-of-text included when reached) and their log-prob."""

    tokens: list[int]
    score: float  # sum of the (processed) log-probabilities of `tokens`


@dataclass
class Encoded:
    """A batch after the encoder: what the decoder reads, and what the image classifier saw."""

    hidden: torch.Tensor  # (B, S, D_decoder)
    concept_probs: torch.Tensor | None = None  # (B, 1000) ImageNet probabilities (concept-head models)


@dataclass(frozen=True)
class _Special:
    start: int
    eos: torch.Tensor  # (n,) end-of-text ids
    pad: int


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs the model. The defaults keep `generate`'s captions (see the module docstring);
    `onnx_encoder` and `int8_decoder` are faster and change the numbers a little (imcap.accel)."""

    fold_batchnorm: bool = True
    onnx_encoder: bool = False
    int8_decoder: bool = False
    # A CNN's activations for many images at once spill out of the CPU caches, while the decoder's cost
    # per step barely grows with the batch: so the encoder takes a batch in slices and the decoder takes
    # it whole. None picks the slice by the calling thread's torch threads, as measured for lite2 at 260
    # px on a 2-core machine: one image at a time on one thread (50 ms, vs 67 ms each in fours), four
    # at a time on two (32 ms each, vs ~50 ms one by one).
    encoder_batch: int | None = None

    def __post_init__(self):
        if self.encoder_batch is not None and (
            not isinstance(self.encoder_batch, int) or self.encoder_batch < 1
        ):
            raise ValueError(f"encoder_batch must be a whole number >= 1, got {self.encoder_batch!r}")


class Bans:
    """Token sequences that each image's captions may not contain: `NoBadWordsLogitsProcessor`'s rule (a
    one-token sequence is never emitted; a longer one's last token not after the others), but per image,
    so that images with different bans still decode in one batch (guidance bans different words for
    different photos; grouping them into one call per ban list cost more than the decoding itself)."""

    def __init__(self, per_image: Sequence[Sequence[Sequence[int]]], vocab_size: int):
        self.single = torch.zeros(len(per_image), vocab_size, dtype=torch.bool)  # (B, V)
        self.multi: list[list[tuple[int, ...]]] = [[] for _ in per_image]
        for image, sequences in enumerate(per_image):
            for sequence in sequences:
                if len(sequence) == 1:
                    self.single[image, sequence[0]] = True
                elif sequence:
                    self.multi[image].append(tuple(sequence))

    @classmethod
    def build(cls, per_image: Sequence[Sequence[Sequence[int]]], vocab_size: int) -> Bans | None:
        """None when no image bans anything (decoding then takes the plain path)."""
        return cls(per_image, vocab_size) if any(per_image) else None

    def subset(self, images: Sequence[int]) -> Bans:
        subset = Bans([], self.single.shape[1])
        subset.single, subset.multi = self.single[list(images)], [self.multi[i] for i in images]
        return subset

    def apply(self, sequences: torch.Tensor, scores: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """scores (rows, V) with the banned continuations of each row set to -inf; images[row] is the
        image (index into the bans) the row decodes, sequences (rows, T) the tokens so far."""
        scores = scores.masked_fill(self.single.to(scores.device)[images], float("-inf"))
        rows = [(row, self.multi[image]) for row, image in enumerate(images.tolist()) if self.multi[image]]
        if rows:
            history = sequences.tolist()  # once: per-row tensor slicing costs more than the check
            for row, banned_sequences in rows:
                for banned in banned_sequences:
                    before = list(banned[:-1])
                    if history[row][-len(before) :] == before:
                        scores[row, banned[-1]] = float("-inf")
        return scores


class Engine:
    """Encode pixels once, decode every image of a batch together; see the module docstring."""

    def __init__(self, model: nn.Module, options: EngineOptions | None = None):
        from imcap import accel  # imported here: the options it serves are opt-in

        self.model, self.options = model, options or EngineOptions()
        self.encoder = _fast_encoder(model.encoder) if self.options.fold_batchnorm else model.encoder
        if self.options.onnx_encoder:
            self.encoder = accel.OnnxEncoder(self.encoder, model.encoder.config.image_size)
        decoder = accel.int8_decoder(model.decoder) if self.options.int8_decoder else model.decoder
        self.decoder = with_shared_cross_attention(decoder)
        self.special = _special_tokens(model.generation_config)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, S, D_decoder): the states the decoder cross-attends to."""
        return self.encode_with_concepts(pixel_values).hidden

    @torch.inference_mode()
    def encode_with_concepts(self, pixel_values: torch.Tensor) -> Encoded:
        """The decoder's states and, for encoders with a concept head, the ImageNet probabilities."""
        pixels = pixel_values.to(device=self.model.device, dtype=self.model.dtype)
        if isinstance(self.encoder, EfficientNetLiteEncoder):
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        step = self.options.encoder_batch or (1 if torch.get_num_threads() == 1 else 4)
        outputs = [self.encoder(pixel_values=pixels[i : i + step]) for i in range(0, len(pixels), step)]
        hidden = torch.cat([out.last_hidden_state for out in outputs])
        logits = [getattr(out, "concept_logits", None) for out in outputs]
        probs = None if any(x is None for x in logits) else torch.cat(logits).float().softmax(dim=-1)
        return Encoded(_project_to_decoder(self.model, hidden), probs)

    def bans(self, per_image: Sequence[Sequence[Sequence[int]]]) -> Bans | None:
        """Per-image banned token sequences (see `Bans`) for `decode` and `decode_prefixed`."""
        return Bans.build(per_image, self.model.decoder.config.vocab_size)

    @torch.inference_mode()
    def decode(
        self, hidden: torch.Tensor, config: GenerationConfig, bans: Bans | None = None
    ) -> list[list[Decoded]]:
        """Per image, the `num_return_sequences` best captions (best first) under greedy or beam search;
        `bans`: what each image's captions may not contain, as `config.bad_words_ids` would for all."""
        config = _with_defaults(config)
        processors = _logits_processors(config, self.special)
        if config.num_beams > 1:
            return _BeamSearch(self.decoder, hidden, config, self.special, processors, bans=bans).run()
        return _greedy(self.decoder, hidden, config, self.special, processors, bans)

    @torch.inference_mode()
    def decode_prefixed(
        self,
        hidden: torch.Tensor,
        config: GenerationConfig,
        prefixes: Sequence[Sequence[int]],
        word_continuations: Collection[int] = (),
        bans: Bans | None = None,
    ) -> list[list[Decoded]]:
        """Beam search where every caption of image b starts with the tokens prefixes[b] (returned as part
        of its tokens and score). Images are grouped by prefix length, one search per group; a greedy
        request is a beam search of width 1. `word_continuations` (imcap.guided.word_continuations) may
        not follow the prefix, so its last word stays whole ("a dessert", never "a desserters")."""
        config = _with_defaults(config)
        results: list[list[Decoded]] = [[] for _ in prefixes]
        by_length: dict[int, list[int]] = {}
        for image, prefix in enumerate(prefixes):
            by_length.setdefault(len(prefix), []).append(image)
        for length, images in by_length.items():
            processors = _logits_processors(config, self.special, prompt_length=1 + length)
            if word_continuations and length:
                processors.append(_BanAtPosition(1 + length, sorted(word_continuations)))
            prefix = torch.tensor([list(prefixes[i]) for i in images], device=hidden.device)
            search = _BeamSearch(
                self.decoder, hidden[images], config, self.special, processors, prefix, _subset(bans, images)
            )
            for image, decoded in zip(images, search.run(), strict=True):
                results[image] = decoded
        return results

    @torch.inference_mode()
    def decode_guided(
        self,
        hidden: torch.Tensor,
        config: GenerationConfig,
        constraints: Sequence[Sequence[Constraint]],
        word_continuations: Collection[int] = (),
        bans: Bans | None = None,
    ) -> list[list[Decoded]]:
        """`decode`, where constraints[b] (a sequence of `imcap.guided.Constraint`) must be met by image b's
        captions: images with constraints go through `imcap.guided.constrained_beam_search`, the others
        through `decode` (so their tokens are decode's), and results come back in image order.
        word_continuations: see `imcap.guided.word_continuations` (empty: the rule is off); bans: see
        `decode`."""
        from imcap.guided import constrained_beam_search  # imported here: guided builds on this module

        if len(constraints) != hidden.shape[0]:
            raise ValueError(f"{len(constraints)} constraint lists for {hidden.shape[0]} images")
        guided = [i for i, c in enumerate(constraints) if c]
        if not guided:
            return self.decode(hidden, config, bans)
        results: list[list[Decoded]] = [[] for _ in constraints]
        plain = [i for i, c in enumerate(constraints) if not c]
        if plain:
            decoded_plain = self.decode(hidden[plain], config, _subset(bans, plain))
            for i, decoded in zip(plain, decoded_plain, strict=True):
                results[i] = decoded
        config = _with_defaults(config)
        processors = _logits_processors(config, self.special)
        found = constrained_beam_search(
            self.decoder,
            hidden[guided],
            config,
            self.special,
            processors,
            [constraints[i] for i in guided],
            word_continuations,
            _subset(bans, guided),
        )
        for i, decoded in zip(guided, found, strict=True):
            results[i] = decoded
        return results


def _subset(bans: Bans | None, images: Sequence[int]) -> Bans | None:
    """The bans of these images, for a call that decodes only them (None stays None)."""
    return bans.subset(images) if bans is not None else None


class _BanAtPosition:
    """A logits processor: these tokens may not come at this position (sequences of that length)."""

    def __init__(self, length: int, tokens: Sequence[int]):
        self.length, self.tokens = length, torch.tensor(tokens, dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] == self.length:
            scores = scores.index_fill(1, self.tokens.to(scores.device), float("-inf"))
        return scores


def _with_defaults(config: GenerationConfig) -> GenerationConfig:
    """A copy with the fields left unset filled in as `generate` fills them (sampling is refused)."""
    if config.do_sample:
        raise ValueError("the engine decodes greedily or with beams; sampling goes through generate")
    config = copy.deepcopy(config)
    if config.max_new_tokens is None:
        config.max_new_tokens = (config.max_length or 20) - 1  # the prompt is one start token
    config.num_return_sequences = config.num_return_sequences or 1
    config.length_penalty = 1.0 if config.length_penalty is None else config.length_penalty
    config.early_stopping = config.early_stopping or False  # True, False or "never"
    return config


def _special_tokens(config: GenerationConfig) -> _Special:
    eos = config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, list | tuple) else [eos]
    start = config.decoder_start_token_id
    start = config.bos_token_id if start is None else start
    pad = config.pad_token_id if config.pad_token_id is not None else eos_ids[0]
    return _Special(start=start, eos=torch.tensor(eos_ids), pad=pad)


def _project_to_decoder(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """VisionEncoderDecoderModel projects encoder states when the widths differ (see its forward)."""
    widths_differ = model.encoder.config.hidden_size != model.decoder.config.hidden_size
    if widths_differ and getattr(model.decoder.config, "cross_attention_hidden_size", None) is None:
        return model.enc_to_dec_proj(hidden)
    return hidden


def _logits_processors(
    config: GenerationConfig, special: _Special, prompt_length: int = 1
) -> LogitsProcessorList:
    """The processors `generate` would build for these settings, in its order (prompt = the start token)."""
    processors = LogitsProcessorList()
    if config.repetition_penalty not in (None, 1.0):
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.min_new_tokens:
        processors.append(
            MinNewTokensLengthLogitsProcessor(prompt_length, config.min_new_tokens, special.eos)
        )
    if config.bad_words_ids:  # guidance rules words out (imcap.guidance)
        processors.append(NoBadWordsLogitsProcessor(config.bad_words_ids, special.eos.tolist()))
    return processors


def _new_cache(decoder: nn.Module) -> EncoderDecoderCache:
    return EncoderDecoderCache(DynamicCache(config=decoder.config), DynamicCache(config=decoder.config))


def _run_decoder(decoder, input_ids: torch.Tensor, hidden: torch.Tensor, cache) -> torch.Tensor:
    """(rows, T, V) float32 logits of `input_ids` after what the cache holds (and fills it)."""
    return decoder(
        input_ids=input_ids, encoder_hidden_states=hidden, use_cache=True, **{cache_keyword(decoder): cache}
    ).logits.float()


def _next_logits(decoder, tokens, hidden, cache) -> torch.Tensor:
    """(rows, V) float32 next-token logits, given the last token of each row (the cache holds the rest)."""
    return _run_decoder(decoder, tokens[:, -1:], hidden, cache)[:, -1, :]


def _next_log_probs(decoder, tokens, hidden, cache) -> torch.Tensor:
    return torch.log_softmax(_next_logits(decoder, tokens, hidden, cache), dim=-1)


def _greedy(decoder, hidden, config, special, processors, bans: Bans | None = None) -> list[list[Decoded]]:
    """Greedy decoding as `generate` does it: argmax of the processed logits, until end-of-text."""
    batch, cache = hidden.shape[0], _new_cache(decoder)
    sequences = torch.full((batch, 1), special.start, dtype=torch.long, device=hidden.device)
    scores = torch.zeros(batch, device=hidden.device)
    active = torch.arange(batch, device=hidden.device)  # image index of each row still decoding
    results: list[list[Decoded]] = [[] for _ in range(batch)]
    for _ in range(config.max_new_tokens):
        processed = processors(sequences, _next_logits(decoder, sequences, hidden, cache))
        if bans is not None:
            processed = bans.apply(sequences, processed, active)
        token = processed.argmax(dim=-1)
        # generate scores greedy tokens with the processed logits, normalised (see Captioner._generate)
        scores = scores + torch.log_softmax(processed, dim=-1).gather(1, token[:, None]).squeeze(1)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        finished = torch.isin(token, special.eos.to(token.device))
        if sequences.shape[1] - 1 == config.max_new_tokens:
            finished[:] = True
        for row in finished.nonzero().flatten().tolist():
            results[active[row]].append(Decoded(sequences[row, 1:].tolist(), float(scores[row])))
        if finished.all():
            break
        if finished.any():  # drop finished images from the batch and their rows from the caches
            keep = (~finished).nonzero().flatten()
            sequences, scores, active, hidden = sequences[keep], scores[keep], active[keep], hidden[keep]
            cache.reorder_cache(keep)
    return results


class _BeamSearch:
    """transformers' vectorised beam search (GenerationMixin._beam_search), step for step, with
    finished images leaving the batch. Shapes: B images, K beams, 2K candidates kept per step."""

    def __init__(
        self,
        decoder,
        hidden,
        config: GenerationConfig,
        special: _Special,
        processors,
        prefix: torch.Tensor | None = None,
        bans: Bans | None = None,
    ):
        self.decoder, self.config, self.special, self.processors = decoder, config, special, processors
        self.bans = bans
        self.shared = shares_cross_attention(decoder)  # one cross-attention cache row per image, not beam
        self.beams, self.keep = config.num_beams, max(2, 1 + len(special.eos)) * config.num_beams
        self.penalty, self.early_stopping = config.length_penalty, config.early_stopping
        batch, device = hidden.shape[0], hidden.device
        # prefix (B, L): tokens every caption of image b starts with, fed in one call at step one (guidance
        # uses it to put a concept first); their log-probs count in the captions' scores
        self.prefix_length = 0 if prefix is None else prefix.shape[1]
        self.prefix_scores = torch.zeros(batch, device=device)
        self.max_length = 1 + self.prefix_length + config.max_new_tokens
        self.hidden = hidden  # (B, S, D); after the first step one copy per beam (B*K, S, D) unless shared
        self.cache = _new_cache(decoder)
        shape = (batch, self.beams, self.max_length)
        self.running = torch.full(shape, special.pad, dtype=torch.long, device=device)
        self.running[:, :, 0] = special.start
        if prefix is not None:
            self.running[:, :, 1 : 1 + self.prefix_length] = prefix[:, None, :]
        self.running_scores = torch.zeros(batch, self.beams, device=device)
        self.running_scores[:, 1:] = _MASKED  # only the first beam expands at step one
        self.finished = self.running.clone()
        self.finished_scores = torch.full((batch, self.beams), _MASKED, device=device)  # length-penalised
        self.finished_sums = torch.zeros(batch, self.beams, device=device)  # plain log-prob sums
        self.is_finished = torch.zeros(batch, self.beams, dtype=torch.bool, device=device)
        self.can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)
        self.images = torch.arange(batch, device=device)  # original index of each image still in the batch
        self.results: list[list[Decoded]] = [[] for _ in range(batch)]

    def run(self) -> list[list[Decoded]]:
        length = first = 1 + self.prefix_length
        collected = torch.zeros(self.running.shape[0], dtype=torch.bool, device=self.running.device)
        while True:
            rows = self.running[:, :, :length].flatten(0, 1)
            log_probs = self._first_step(rows) if length == first else self._next_step(rows)
            hits_stop = self._step(log_probs, length)
            length += 1
            self._update_can_improve(length)
            done = ~self.can_improve[:, 0] | (self.is_finished.all(dim=1) & (self.early_stopping is True))
            if hits_stop[~collected].all():
                done[:] = True
            self._collect(done & ~collected)  # an image's result is final once done: taken once
            collected |= done
            if collected.all():
                return self.results
            # Leaving the batch copies every remaining row's caches (the cross-attention one is large), so
            # done images leave together once they are _DROP_SHARE of the batch; until then their rows
            # decode on and their results stay as taken. Beam 3 on 200 val photos in one batch decoded
            # 20% faster than with each image leaving when done; in batches of 64 5%, of 16 the same.
            if collected.float().mean() >= _DROP_SHARE:
                self._drop(~collected)
                collected = collected[~collected]

    def _first_step(self, rows: torch.Tensor) -> torch.Tensor:
        """Step one, once per image instead of once per beam: every beam of an image starts from the same
        start token, so their outputs are equal (generate computes them K times). This also computes each
        image's cross-attention keys/values once; the caches are then copied out to one row per beam."""
        first = rows[:: self.beams]
        if self.prefix_length:
            log_probs = self.processors(first, self._prefix_log_probs(first))
        else:
            log_probs = self.processors(first, _next_log_probs(self.decoder, first, self.hidden, self.cache))
        log_probs = self._banned(first, log_probs, rows_per_image=1)
        per_beam = torch.arange(len(first), device=rows.device).repeat_interleave(self.beams)
        if self.shared:
            self.cache.self_attention_cache.reorder_cache(per_beam)
        else:
            self.cache.reorder_cache(per_beam)
            self.hidden = self.hidden[per_beam]
        return log_probs[per_beam]

    def _prefix_log_probs(self, first: torch.Tensor) -> torch.Tensor:
        """Feed start + prefix at once (filling the cache); keep the prefix's log-prob; return the next
        token's log-probs."""
        logits = _run_decoder(self.decoder, first, self.hidden, self.cache)
        log_probs = torch.log_softmax(logits, dim=-1)
        forced = log_probs[:, :-1].gather(-1, first[:, 1:, None]).squeeze(-1)
        self.prefix_scores = forced.sum(dim=1)
        return log_probs[:, -1]

    def _next_step(self, rows: torch.Tensor) -> torch.Tensor:
        log_probs = self.processors(rows, _next_log_probs(self.decoder, rows, self.hidden, self.cache))
        return self._banned(rows, log_probs, rows_per_image=self.beams)

    def _banned(self, rows: torch.Tensor, log_probs: torch.Tensor, rows_per_image: int) -> torch.Tensor:
        if self.bans is None:  # the common, unguided path: nothing to index
            return log_probs
        return self.bans.apply(rows, log_probs, self.images.repeat_interleave(rows_per_image))

    def _step(self, log_probs: torch.Tensor, length: int) -> torch.Tensor:
        batch, beams = self.running.shape[:2]
        totals = (log_probs.view(batch, beams, -1) + self.running_scores[:, :, None]).view(batch, -1)
        top_scores, top_index = torch.topk(totals, k=self.keep)
        vocab = log_probs.shape[-1]
        source_beam, token = top_index // vocab, top_index % vocab
        candidates = _gather(self.running, source_beam)
        candidates[:, :, length] = token
        hits_stop = torch.isin(token, self.special.eos.to(token.device)) | (length + 1 >= self.max_length)
        # the best K candidates that did not just stop carry on
        open_scores = top_scores + hits_stop.float() * _MASKED
        carry = torch.topk(open_scores, k=beams)[1]
        self.running = _gather(candidates, carry)
        self.running_scores = _gather(open_scores, carry)
        offsets = torch.arange(batch, device=token.device)[:, None] * beams
        self.cache.self_attention_cache.reorder_cache((_gather(source_beam, carry) + offsets).flatten())
        self._update_finished(candidates, top_scores, hits_stop, length)
        return hits_stop

    def _update_finished(self, candidates, top_scores, hits_stop, length: int) -> None:
        """Merge the candidates that just finished (among the top K) into the K best finished ones."""
        in_top_k = torch.zeros(self.keep, dtype=torch.bool, device=hits_stop.device)
        in_top_k[: self.beams] = True
        just_finished = hits_stop & in_top_k[None, :]
        # generate's length penalty counts generated tokens, a prompt (our prefix) left out
        penalised = top_scores / ((length - self.prefix_length) ** self.penalty)
        full = self.is_finished.all(dim=-1, keepdim=True) & (self.early_stopping is True)
        penalised = penalised + full.float() * _MASKED
        penalised = penalised + (~self.can_improve).float() * _MASKED
        penalised = penalised + (~just_finished) * _MASKED
        merged_scores = torch.cat([self.finished_scores, penalised], dim=1)
        best = torch.topk(merged_scores, k=self.beams)[1]
        self.finished = _gather(torch.cat([self.finished, candidates], dim=1), best)
        self.finished_scores = _gather(merged_scores, best)
        self.finished_sums = _gather(torch.cat([self.finished_sums, top_scores], dim=1), best)
        self.is_finished = _gather(torch.cat([self.is_finished, just_finished], dim=1), best)

    def _update_can_improve(self, length: int) -> None:
        """Could the best open beam still beat the worst finished one? (early_stopping=False/True rule)."""
        if self.early_stopping == "never" and self.penalty > 0.0:
            best_length = self.max_length - 1 - self.prefix_length
        else:
            best_length = length - 1 - self.prefix_length
        best_open = self.running_scores[:, :1] / (best_length**self.penalty)
        worst_finished = torch.where(
            self.is_finished, self.finished_scores.min(dim=1, keepdim=True)[0], _MASKED
        )
        self.can_improve &= (best_open > worst_finished).any(dim=-1, keepdim=True)

    def _collect(self, done: torch.Tensor) -> None:
        wanted = self.config.num_return_sequences
        for b in done.nonzero().flatten().tolist():
            image = int(self.images[b])
            for k in range(wanted):
                tokens = _cut_after_eos(self.finished[b, k, 1:].tolist(), self.special)
                score = float(self.finished_sums[b, k] + self.prefix_scores[b])
                self.results[image].append(Decoded(tokens, score))

    def _drop(self, keep: torch.Tensor) -> None:
        """Remove finished images: their beams' rows from every tensor and from both caches."""
        images = keep.nonzero().flatten()
        rows = (images[:, None] * self.beams + torch.arange(self.beams, device=images.device)).flatten()
        for name in (
            "running",
            "running_scores",
            "finished",
            "finished_scores",
            "finished_sums",
            "prefix_scores",
        ):
            setattr(self, name, getattr(self, name)[images])
        self.is_finished, self.can_improve = self.is_finished[images], self.can_improve[images]
        self.images = self.images[images]
        if self.shared:
            self.hidden = self.hidden[images]
            self.cache.self_attention_cache.reorder_cache(rows)
            self.cache.cross_attention_cache.reorder_cache(images)
        else:
            self.hidden = self.hidden[rows]
            self.cache.reorder_cache(rows)


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor[b, index[b, j], ...] for a (B, N, ...) tensor and a (B, M) index."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _cut_after_eos(tokens: list[int], special: _Special) -> list[int]:
    eos = set(special.eos.tolist())
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def _fast_encoder(encoder: nn.Module) -> nn.Module:
    """A copy of our CNN encoder with BatchNorm folded into the convolutions, in channels-last memory.

    Other encoders (ViT, ...) are returned as they are. The model itself is left untouched, so that
    training, saving and plain `generate` keep the original layers.
    """
    if not isinstance(encoder, EfficientNetLiteEncoder) or encoder.training:
        return encoder
    fast = copy.deepcopy(encoder)
    cnn = fast.cnn
    cnn._conv_stem, cnn._bn0 = _fold(cnn._conv_stem, cnn._bn0), nn.Identity()
    cnn._conv_head, cnn._bn1 = _fold(cnn._conv_head, cnn._bn1), nn.Identity()
    _fold_blocks(cnn._blocks)
    concept_tail = getattr(fast, "concept_tail", None)  # the concept head's own frozen tail
    if concept_tail is not None:
        concept_tail.conv_head = _fold(concept_tail.conv_head, concept_tail.norm)
        concept_tail.norm = nn.Identity()
        _fold_blocks(concept_tail.blocks)
    _pad_in_convolutions(fast)
    _activations_in_place(fast)
    return fast.to(memory_format=torch.channels_last)


def _activations_in_place(encoder: nn.Module) -> None:
    """Every ReLU6 of the folded CNN reads a convolution's fresh output (its BatchNorm is folded away),
    so it may overwrite it: no new feature map per activation, the same numbers (~13% of the encoder's
    time on one thread, where the expanded maps are the largest tensors it allocates)."""
    for module in encoder.modules():
        if isinstance(module, nn.ReLU6):
            module.inplace = True


def _pad_in_convolutions(encoder: nn.Module) -> None:
    """TF-"same" convolutions pad with a ZeroPad2d module before the convolution, a copy of every feature
    map. The convolution's own zero padding computes the same numbers without the copy: directly where
    the padding is symmetric (every stride-1 depthwise convolution, ~4% of the encoder's time on one
    thread), and where it is one wider on the far sides (the stride-2 stem and first stride-2 depthwise
    convolution, on even-sized maps) with the kernel one wider too, its new first row and column zero, so
    that every window still starts where TF's does (bit-identical; the 130x130 padded copy was ~5%)."""
    for conv in encoder.modules():
        pad = getattr(conv, "static_padding", None)
        if not (isinstance(conv, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and conv.padding == (0, 0)):
            continue
        left, right, top, bottom = pad.padding
        if right - left not in (0, 1) or bottom - top not in (0, 1):
            continue
        widen = (right - left, 0, bottom - top, 0)  # zero columns on the left, zero rows on top
        conv.weight = nn.Parameter(F.pad(conv.weight, widen), requires_grad=conv.weight.requires_grad)
        conv.kernel_size = tuple(conv.weight.shape[-2:])
        conv.padding, conv.static_padding = (bottom, right), nn.Identity()


def _fold_blocks(blocks: nn.ModuleList) -> None:
    for block in blocks:
        pairs = [("_expand_conv", "_bn0")] if hasattr(block, "_expand_conv") else []
        for conv, norm in [*pairs, ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]:
            setattr(block, conv, _fold(getattr(block, conv), getattr(block, norm)))
            setattr(block, norm, nn.Identity())


def _fold(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """`conv` (already a copy) with `norm` folded into its weights: what fuse_conv_bn_eval computes, without
    its second deep copy of every convolution (half the folding time, paid by every `imcap caption`)."""
    conv.weight, conv.bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
    )
    return conv
