"""The pieces of one training step on cached features: visual tokens, the cross-entropy loss, SCST."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import VisionEncoderDecoderModel
from transformers.modeling_outputs import BaseModelOutput


def visual_tokens(model: VisionEncoderDecoderModel, features: torch.Tensor, from_trunk: bool) -> torch.Tensor:
    """(B, C, G, G) cached features -> (B, 1 + G*G, D) encoder output.

    `from_trunk=True` runs the CNN tail too (features are trunk output, the tail is being fine-tuned);
    otherwise the features are already the tail's output.
    """
    encoder = model.encoder
    feature_map = encoder.tail(features.float()) if from_trunk else features
    return encoder.tokens(feature_map)


def caption_log_probs(
    model: VisionEncoderDecoderModel, tokens: torch.Tensor, input_ids: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits over `input_ids` (bos first) with per-row encoder outputs.

    Returns (logits (N, T-1, V), target mask (N, T-1)): position t predicts token t+1; padding is masked.
    """
    attention_mask = (input_ids != pad_id).long()
    attention_mask[:, 0] = 1  # bos may equal pad in hub tokenizers; it is always a real input
    out = model.decoder(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        encoder_hidden_states=tokens,
        use_cache=False,
    )
    return out.logits, attention_mask[:, 1:].bool()


def cross_entropy_loss(
    model: VisionEncoderDecoderModel,
    tokens: torch.Tensor,
    input_ids: torch.Tensor,
    captions_per_image: int,
    pad_id: int,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """Mean token cross-entropy of the captions of each image; returns (loss, number of target tokens)."""
    tokens = tokens.repeat_interleave(captions_per_image, dim=0)
    logits, mask = caption_log_probs(model, tokens, input_ids, pad_id)
    targets = input_ids[:, 1:].masked_fill(~mask, -100)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )
    return loss, int(mask.sum())


@torch.no_grad()
def generate_from_tokens(
    model: VisionEncoderDecoderModel, tokens: torch.Tensor, **generate_kwargs
) -> torch.Tensor:
    """`generate` on precomputed encoder outputs (no pixels): the same decoding as inference."""
    outputs = BaseModelOutput(last_hidden_state=tokens)
    return model.generate(encoder_outputs=outputs, **generate_kwargs)


def scst_loss(
    model: VisionEncoderDecoderModel,
    tokens: torch.Tensor,
    samples: torch.Tensor,
    rewards: torch.Tensor,
    samples_per_image: int,
    pad_id: int,
) -> torch.Tensor:
    """Self-critical policy gradient with the mean of the other samples as baseline (Luo 2020).

    samples (B*K, T) start with the decoder start token and end in eos then padding; rewards (B*K,).
    """
    grouped = rewards.view(-1, samples_per_image)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (samples_per_image - 1)
    advantage = (grouped - baseline).reshape(-1)
    tokens = tokens.repeat_interleave(samples_per_image, dim=0)
    logits, mask = caption_log_probs(model, tokens, samples, pad_id)
    log_probs = logits.log_softmax(-1).gather(-1, samples[:, 1:, None]).squeeze(-1)
    # mean over each sequence's tokens, so long and short samples weigh the same
    sequence_log_prob = (log_probs * mask).sum(1) / mask.sum(1).clamp(min=1)
    return -(advantage * sequence_log_prob).mean()


def sample_mask_after_eos(sequences: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Replace everything after the first eos with pad (generate pads finished rows; be sure of it)."""
    is_eos = sequences == eos_id
    after = (is_eos.cumsum(1) - is_eos.long()) > 0
    return sequences.masked_fill(after, pad_id)
