"""A byte-level BPE caption tokenizer with real bos, eos and pad tokens.

GPT-2's tokenizer has one special token doing every job (pad = eos = bos). With padding masked out of the
loss, a model trained that way never sees an end-of-text target and never learns to stop
(transformers issue #7135). Our tokenizer has three distinct tokens, and every training caption ends in eos.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
_SPACES = re.compile(r"\s+")
_TRAILING_PUNCT = re.compile(r"[\s.]+$")


def normalize_caption(text: str) -> str:
    """The training form of a caption: lowercase, single spaces, no trailing full stop.

    COCO evaluation lowercases and drops punctuation anyway, so the model spends no capacity on them.
    """
    return _TRAILING_PUNCT.sub("", _SPACES.sub(" ", text.strip().lower()))


def format_caption(text: str) -> str:
    """The display form of a generated caption: capitalised, ending in a full stop (as alt text reads)."""
    text = normalize_caption(text)
    return f"{text[0].upper()}{text[1:]}." if text else ""


def train_tokenizer(
    captions: Iterable[str], vocab_size: int = 4000, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on (normalised) captions and wrap it as a transformers tokenizer."""
    bpe = ByteLevelBPETokenizer(add_prefix_space=True)
    bpe.train_from_iterator(
        (normalize_caption(c) for c in captions),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=512
    )


def encode_for_training(tokenizer: PreTrainedTokenizerFast, caption: str, max_tokens: int) -> list[int]:
    """Token ids of `bos caption eos`, the caption cut so that eos always fits within `max_tokens`."""
    ids = tokenizer(normalize_caption(caption), add_special_tokens=False)["input_ids"][: max_tokens - 2]
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
