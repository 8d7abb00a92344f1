"""Cross-attention that reads each image's keys and values once for all of its beams.

Beam search decodes `beams` rows per image, and every row of an image cross-attends to the same encoder
states. `generate` (and this engine before) copies the cross-attention cache out to one row per beam, so
each decoder step reads every image's keys and values `beams` times: for the default model at beam 3 and a
batch of 16 that is ~26 MB per step, the largest memory traffic of a step on a CPU whose caches hold a
few MB. Here the cache keeps one row per image, and the attention function folds an image's beams into
the query length of one SDPA call over its keys: each query row is still attended on its own, so the
captions are the same (tests check them against `generate`), and beam 3 decodes 8-27% faster (two
alternations on 320 val photos).

Only decoders whose cross-attention goes through transformers' attention interface with keys from an
`EncoderDecoderCache` take it (GPT-2: our models, vit-gpt2); the others keep one copy per beam.

Training reads it too (`read_once`): a step teacher-forces several captions per image (five in
cross-entropy, eight samples in SCST), and copying the image's tokens to every caption made each caption
project the image's 88 tokens to keys and values again, about a third of the decoder's forward and
backward work in an SCST step.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "imcap_beam_sdpa"
_SUPPORTED = frozenset({"gpt2"})  # model types whose cross-attention reads the cache as described above


def beam_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; where the keys hold one row per image and the queries `beams` rows per
    image (beam search's cross-attention), each image's beams are one longer query over its keys.

    query (rows, heads, length, dim), key and value (images, heads, keys, dim); returns (rows, length,
    heads, dim) as sdpa_attention_forward does."""
    rows, images = query.shape[0], key.shape[0]
    if rows == images:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if rows % images or attention_mask is not None:
        raise ValueError(f"{rows} query rows for {images} key rows, mask {attention_mask is not None}")
    beams = rows // images
    _, heads, length, dim = query.shape
    folded = query.view(images, beams, heads, length, dim).transpose(1, 2)
    folded = folded.reshape(images, heads, beams * length, dim)
    kwargs["is_causal"] = False  # cross-attention: the folded beams must not mask one another
    output, weights = sdpa_attention_forward(module, folded, key, value, None, **kwargs)
    return output.reshape(rows, length, heads, dim), weights  # (images, beams * length, ...) -> rows


AttentionInterface.register(NAME, beam_sdpa)


def with_shared_cross_attention(decoder: nn.Module) -> nn.Module:
    """A copy of `decoder` that runs `beam_sdpa`, if it can (see the module docstring); else `decoder`.
    A copy, so that the model itself (plain `generate`, training, saving) keeps its settings."""
    config = decoder.config
    if config.model_type not in _SUPPORTED or config._attn_implementation != "sdpa":
        return decoder
    shared = copy.deepcopy(decoder)
    shared.set_attn_implementation(NAME)  # every submodule's config, not only the top one
    return shared


def shares_cross_attention(decoder: nn.Module) -> bool:
    """Whether `decoder` reads one cross-attention row per image (the engine then keeps its cache so)."""
    return getattr(decoder.config, "_attn_implementation", None) == NAME


@contextmanager
def read_once(decoder: nn.Module, rows_per_image: int) -> Iterator[bool]:
    """Within the block, `decoder` (the model's own, so training updates it) cross-attends `rows_per_image`
    query rows per image to one row of keys and values per image, if it can: yields whether it does, i.e.
    whether the encoder states should be passed once per image rather than once per row."""
    config = decoder.config
    able = config.model_type in _SUPPORTED and config._attn_implementation == "sdpa"
    if rows_per_image == 1 or not able:
        yield False
        return
    decoder.set_attn_implementation(NAME)
    try:
        yield True
    finally:
        decoder.set_attn_implementation("sdpa")
