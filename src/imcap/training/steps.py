"""The pieces of one training step on cached features: teacher-forced logits, the cross-entropy, SCST.

Every architecture is trained the same way: `TeacherForcing` (cached features + caption ids -> next-token
logits) is the one module a step differentiates, so DistributedDataParallel can wrap it; the losses are
sums over tokens (or samples) that the loop divides by the global count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, VisionEncoderDecoderModel
from transformers.modeling_outputs import BaseModelOutput

from imcap.beam_attention import read_once
from imcap.search import new_cache, next_logits
from imcap.training.fronts import FrozenFront, LiteFront


def caption_logits(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    captions_per_image: int = 1,
) -> torch.Tensor:
    """Teacher-forced logits (B * K, T, V) for decoder inputs (B * K, T), start token first, K captions
    per image in a row, given the encoder tokens (B, S, D) of the B images.

    A VisionEncoderDecoder cross-attends to the tokens (its forward also applies `enc_to_dec_proj` when a
    hub encoder is wider than the decoder), each image's keys and values computed once for its K captions
    where the decoder can (imcap.beam_attention.read_once); the prefix and LSTM models have their own
    `caption_logits`.
    """
    if isinstance(model, VisionEncoderDecoderModel):
        with read_once(model.decoder, captions_per_image) as once:
            states = tokens if once else tokens.repeat_interleave(captions_per_image, dim=0)
            return model(
                encoder_outputs=BaseModelOutput(last_hidden_state=states),
                decoder_input_ids=input_ids,
                decoder_attention_mask=attention_mask,
                use_cache=False,
            ).logits
    return model.caption_logits(tokens, input_ids, attention_mask, captions_per_image)


class TeacherForcing(nn.Module):
    """Cached image features + caption ids -> next-token logits: all that a training step differentiates."""

    def __init__(self, model: PreTrainedModel, front: LiteFront | FrozenFront):
        super().__init__()
        self.model = model
        self.front = front  # not a module: its encoder is `model.encoder`, already registered above

    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        captions_per_image: int,
        from_trunk: bool,
    ) -> torch.Tensor:
        """features (B, ...) of B images; input_ids and attention_mask (B * K, T), K captions per image.

        Returns logits (B * K, T - 1, V): position t predicts token t + 1.
        """
        tokens = self.front.tokens(features, from_trunk)
        return caption_logits(
            self.model, tokens, input_ids[:, :-1], attention_mask[:, :-1], captions_per_image
        )


def caption_mask(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(N, T) 1 for the start token and every token up to and including the first end-of-text after it.

    Built from eos, not from pad: a GPT-2 tokenizer uses one token for bos, eos and pad, and a mask of
    `ids != pad` would hide every eos target, so the model would never learn to stop (transformers #7135).
    """
    is_eos = (ids[:, 1:] == eos_id).long()
    keep = (is_eos.cumsum(1) - is_eos) == 0  # no eos strictly before this position
    return torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), keep], dim=1).long()


def token_cross_entropy(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, int]:
    """(summed token cross-entropy, number of target tokens) for logits from `TeacherForcing`."""
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return loss, int((targets != -100).sum())


@torch.no_grad()
def generate_from_tokens(model: PreTrainedModel, tokens: torch.Tensor, **generate_kwargs) -> torch.Tensor:
    """`generate` on precomputed encoder tokens (no pixels): the same decoding as inference.

    Every architecture returns sequences that start with the start token.
    """
    return model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=tokens), **generate_kwargs)


# generation settings that add logits processors: sample_captions leaves those models to generate
_PROCESSED = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "min_new_tokens",
    "min_length",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
)


@torch.no_grad()
def sample_captions(
    model: PreTrainedModel, tokens: torch.Tensor, samples: int, max_new_tokens: int
) -> torch.Tensor:
    """`samples` captions per image of the encoder tokens (B, S, D), drawn as `generate(do_sample=True,
    top_k=0, num_return_sequences=samples)` draws them: one multinomial over all rows per step, pad after a
    row's end, the start token first, rows image by image. Each image's cross-attention keys and values
    are computed once for all its samples (imcap.beam_attention.read_once) instead of once per sample,
    which was about a third of an SCST step's sampling. Models that cannot, or whose generation config
    adds logits processors, get `generate` itself."""
    config = model.generation_config
    plain = (
        isinstance(model, VisionEncoderDecoderModel) and tokens.shape[-1] == model.decoder.config.hidden_size
    )
    plain = plain and not any(
        getattr(config, name, None) not in (None, 1.0, 0, [], ()) for name in _PROCESSED
    )
    with read_once(model.decoder, samples if plain else 1) as once:
        if not once:
            return generate_from_tokens(
                model,
                tokens,
                do_sample=True,
                top_k=0,
                num_beams=1,
                num_return_sequences=samples,
                max_new_tokens=max_new_tokens,
            )
        eos = torch.tensor(config.eos_token_id, device=tokens.device).flatten()
        rows = tokens.shape[0] * samples
        sequences = torch.full((rows, 1), config.decoder_start_token_id, device=tokens.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=tokens.device)
        cache = new_cache(model.decoder)
        for _ in range(max_new_tokens):
            logits = next_logits(model.decoder, sequences, tokens, cache)
            token = torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(1)
            token = token.masked_fill(finished, config.pad_token_id)
            sequences = torch.cat([sequences, token[:, None]], dim=1)
            finished |= torch.isin(token, eos)
            if finished.all():
                break
        return sequences


def scst_loss(
    logits: torch.Tensor,
    samples: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    samples_per_image: int,
) -> torch.Tensor:
    """Per-sample self-critical loss (N,), with the mean of the other samples as baseline (Luo 2020).

    logits (N, T - 1, V) from `TeacherForcing` on the samples (N, T), which start with the start token;
    mask (N, T) from `caption_mask`; rewards (N,), samples of one image next to each other.
    """
    grouped = rewards.view(-1, samples_per_image)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (samples_per_image - 1)
    advantage = (grouped - baseline).reshape(-1)
    log_probs = logits.log_softmax(-1).gather(-1, samples[:, 1:, None]).squeeze(-1)
    target_mask = mask[:, 1:]
    # mean over each sequence's tokens, so long and short samples weigh the same
    sequence_log_prob = (log_probs * target_mask).sum(1) / target_mask.sum(1).clamp(min=1)
    return -(advantage * sequence_log_prob)


def sample_mask_after_eos(sequences: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Replace everything after the first eos (after the start token) with pad; generate pads finished
    rows already, be sure of it. The start token may be the eos token itself (GPT-2)."""
    return sequences.masked_fill(caption_mask(sequences, eos_id) == 0, pad_id)
