"""The inference engine: batched greedy and beam-search decoding that gives `generate`'s tokens, faster.

Why not call `model.generate` per batch? On a CPU the decoder of a captioning model is small, and most of
generate's time per step goes to work that captioning doesn't need: re-reordering the cross-attention
cache of every beam (whose rows are identical within an image), and carrying finished images to the end
of the batch. This engine runs the same algorithm as transformers' greedy and vectorised beam search
(same log-softmax, logits processors, top-2k continuations, length penalty and early stopping; the
searches are in imcap.search and imcap.stepwise), so its captions are token-for-token those of
`generate`, but:

- the encoder runs once per image; every beam reads the same cross-attention keys/values, kept once per
  image (imcap.beam_attention), so only the self-attention cache is reordered between steps;
- an image's result is taken as soon as it can no longer change (all beams finished, or no open beam can
  beat the finished ones), and done images leave the batch together once they are half of it, so a long
  caption doesn't make the whole batch pay for it (leaving copies the other rows' caches: one image at a
  time cost more than it saved);
- our EfficientNet-Lite encoder runs with BatchNorm folded into its convolutions and channels-last
  memory, its pointwise convolutions always run by oneDNN (imcap.fast_encoder). Folding and oneDNN
  change float rounding (~1e-5 on the visual tokens);
  `benchmarks/bench_caption.py` measures that captions stay identical to plain `generate`'s.

Sampling runs here too, so guidance applies to sampled captions as to searched ones: plain sampling (one
beam, imcap.stepwise) and beam-search sampling (imcap.search.BeamSearch); each row or image may have its
own seed.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import GenerationConfig

from imcap.beam_attention import with_shared_cross_attention
from imcap.encoder import EfficientNetLiteEncoder
from imcap.fast_encoder import fast_encoder
from imcap.search import (
    BanAtPosition,
    Bans,
    BeamSearch,
    Decoded,
    Special,
    logits_processors,
)
from imcap.stepwise import greedy, sample

__all__ = ["Bans", "Decoded", "Encoded", "Engine", "EngineOptions"]

if TYPE_CHECKING:  # imcap.guided imports this module
    from imcap.guided import Constraint


@dataclass
class Encoded:
    """A batch after the encoder: what the decoder reads, and what the image classifier saw."""

    hidden: torch.Tensor  # (B, S, D_decoder)
    concept_probs: torch.Tensor | None = None  # (B, 1000) ImageNet probabilities (concept-head models)

    @staticmethod
    def joined(parts: Sequence[Encoded]) -> Encoded:
        """Slices of one batch, encoded apart (by different threads), as one batch in order."""
        if len(parts) == 1:
            return parts[0]
        probs = [part.concept_probs for part in parts]
        joined_probs = None if any(p is None for p in probs) else torch.cat(probs)
        return Encoded(torch.cat([part.hidden for part in parts]), joined_probs)


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs the model. The defaults keep `generate`'s captions (see the module docstring);
    `onnx_encoder` and `int8_decoder` are faster and change the numbers a little (imcap.accel)."""

    fold_batchnorm: bool = True
    onnx_encoder: bool = False
    int8_decoder: bool = False
    # A CNN's activations for many images at once spill out of the CPU caches, while the decoder's cost
    # per step barely grows with the batch: so the encoder takes a batch in slices and the decoder takes
    # it whole. None means four images a slice, as measured for lite2 at 260 px on a 2-core machine:
    # on one thread 18 ms an image (23 one by one, 20 in eights, 27 in sixteens), on two 10 ms (16 one
    # by one). Before the pointwise convolutions went through oneDNN (imcap.fast_encoder), one thread
    # did best one image at a time.
    encoder_batch: int | None = None

    def __post_init__(self):
        if self.encoder_batch is not None and (
            not isinstance(self.encoder_batch, int) or self.encoder_batch < 1
        ):
            raise ValueError(f"encoder_batch must be a whole number >= 1, got {self.encoder_batch!r}")


class Engine:
    """Encode pixels once, decode every image of a batch together; see the module docstring."""

    def __init__(self, model: nn.Module, options: EngineOptions | None = None):
        from imcap import accel  # imported here: the options it serves are opt-in

        self.model, self.options = model, options or EngineOptions()
        self.encoder = model.encoder
        if self.options.fold_batchnorm:  # an ONNX graph keeps to standard operators (its runtime picks)
            self.encoder = fast_encoder(model.encoder, onednn=not self.options.onnx_encoder)
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
        step = self.options.encoder_batch or 4
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
        self,
        hidden: torch.Tensor,
        config: GenerationConfig,
        bans: Bans | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Decoded]]:
        """Per image, the `num_return_sequences` best captions (best first) under greedy or beam search
        (beam-search sampling with `config.do_sample`), or with one beam one sampled caption per image;
        seeds[b], if given, seeds image b's draws. `bans`: what each image's captions may not contain, as
        `config.bad_words_ids` would for all."""
        config = _with_defaults(config)
        processors = logits_processors(config, self.special)
        if config.num_beams > 1:
            beams = BeamSearch(self.decoder, hidden, config, self.special, processors, bans=bans, seeds=seeds)
            return beams.run()
        if config.do_sample:
            return sample(self.decoder, hidden, config, self.special, processors, bans, seeds=seeds)
        return greedy(self.decoder, hidden, config, self.special, processors, bans)

    @torch.inference_mode()
    def decode_prefixed(
        self,
        hidden: torch.Tensor,
        config: GenerationConfig,
        prefixes: Sequence[Sequence[int]],
        word_continuations: Collection[int] = (),
        bans: Bans | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Decoded]]:
        """Beam search where every caption of image b starts with the tokens prefixes[b] (returned as part
        of its tokens and score), or with `config.do_sample` beam-search sampling, or with one beam one
        sampled caption that does (seeds as in `decode`). Prefixes of any lengths share one beam search
        (`_decode_prefixes`); with sampling or `min_new_tokens` (counted from each prompt), images are
        grouped by prefix length, one search per group. A greedy request is a beam search of width 1.
        `word_continuations`
        (imcap.guided.word_continuations) may not follow the prefix, so its last word stays whole ("a
        dessert", never "a desserters")."""
        config = _with_defaults(config)
        if prefixes and not config.do_sample and not config.min_new_tokens:
            return self._decode_prefixes(hidden, config, prefixes, word_continuations, bans)
        results: list[list[Decoded]] = [[] for _ in prefixes]
        by_length: dict[int, list[int]] = {}
        for image, prefix in enumerate(prefixes):
            by_length.setdefault(len(prefix), []).append(image)
        for length, images in by_length.items():
            processors = logits_processors(config, self.special, prompt_length=1 + length)
            if word_continuations and length:
                processors.append(BanAtPosition(1 + length, sorted(word_continuations)))
            prefix = torch.tensor([list(prefixes[i]) for i in images], device=hidden.device)
            group = (self.decoder, hidden[images], config, self.special, processors)
            group_seeds = None if seeds is None else [seeds[i] for i in images]
            if config.do_sample and config.num_beams == 1:
                found = sample(*group, _subset(bans, images), prefix, group_seeds)
            else:
                found = BeamSearch(*group, prefix, _subset(bans, images), group_seeds).run()
            for image, decoded in zip(images, found, strict=True):
                results[image] = decoded
        return results

    def _decode_prefixes(
        self, hidden, config: GenerationConfig, prefixes, word_continuations, bans
    ) -> list[list[Decoded]]:
        """Prefixes of any lengths in one beam search: each image's tokens past the shortest prefix are
        forced a step at a time (search.BeamSearch), which costs their images a decoder step each instead
        of a search per length (pooled guidance rewrites had two to four lengths per pool). Forcing leaves
        a step one candidate, which beam-search sampling cannot draw 2K from: sampling keeps the groups."""
        longest = max(len(p) for p in prefixes)
        padded = torch.tensor(
            [[*p, *[self.special.pad] * (longest - len(p))] for p in prefixes], device=hidden.device
        )
        processors = logits_processors(config, self.special)  # min_new_tokens (per prompt) is not set
        search = BeamSearch(
            self.decoder,
            hidden,
            config,
            self.special,
            processors,
            padded,
            bans,
            prefix_lengths=[len(p) for p in prefixes],
            after_prefix=sorted(word_continuations),
        )
        return search.run()

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

        if config.do_sample:
            raise ValueError("constrained decoding is a beam search; it does not sample")
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
        processors = logits_processors(config, self.special)
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


def _with_defaults(config: GenerationConfig) -> GenerationConfig:
    """A copy with the fields left unset filled in as `generate` fills them."""
    one_beam_sampling = config.do_sample and config.num_beams == 1
    if one_beam_sampling and config.num_return_sequences not in (None, 1):
        raise ValueError("the engine samples one caption per row: repeat the rows for several")
    config = copy.deepcopy(config)
    if config.max_new_tokens is None:
        config.max_new_tokens = (config.max_length or 20) - 1  # the prompt is one start token
    config.num_return_sequences = config.num_return_sequences or 1
    config.length_penalty = 1.0 if config.length_penalty is None else config.length_penalty
    config.early_stopping = config.early_stopping or False  # True, False or "never"
    return config


def _special_tokens(config: GenerationConfig) -> Special:
    eos = config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, list | tuple) else [eos]
    start = config.decoder_start_token_id
    start = config.bos_token_id if start is None else start
    pad = config.pad_token_id if config.pad_token_id is not None else eos_ids[0]
    return Special(start=start, eos=torch.tensor(eos_ids), pad=pad)


def _project_to_decoder(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """VisionEncoderDecoderModel projects encoder states when the widths differ (see its forward)."""
    widths_differ = model.encoder.config.hidden_size != model.decoder.config.hidden_size
    if widths_differ and getattr(model.decoder.config, "cross_attention_hidden_size", None) is None:
        return model.enc_to_dec_proj(hidden)
    return hidden
