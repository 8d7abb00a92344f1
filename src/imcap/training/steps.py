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
    hub encoder is wider than the decoder); the prefix and LSTM models have their own `caption_logits`.
    """
    if isinstance(model, VisionEncoderDecoderModel):
        return model(
            encoder_outputs=BaseModelOutput(
                last_hidden_state=tokens.repeat_interleave(captions_per_image, dim=0)
            ),
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
