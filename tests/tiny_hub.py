"""Tiny stand-ins for hub checkpoints, saved as local folders: tests never download anything.

They keep the hub's conventions that matter: a GPT-2 tokenizer has one token, <|endoftext|>, for bos, eos and
unknown, and no pad token; a ViT encoder comes with a ViTImageProcessor; nlpconnect/vit-gpt2 pairs a ViT with
a GPT-2 of another width, so VisionEncoderDecoder projects between them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from imcap.tokenizer import train_tokenizer

from .conftest import TINY_CAPTIONS

END = "<|endoftext|>"


def gpt2_style_tokenizer() -> PreTrainedTokenizerFast:
    bpe = train_tokenizer(TINY_CAPTIONS * 4, vocab_size=300, min_frequency=1).backend_tokenizer
    bpe.add_special_tokens([END])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=END, eos_token=END, unk_token=END)


def tiny_gpt2(tokenizer, width: int = 24, cross_attention: bool = False) -> GPT2LMHeadModel:
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=width,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
        add_cross_attention=cross_attention,
        is_decoder=cross_attention,
    )
    return GPT2LMHeadModel(config)


def tiny_vit() -> ViTModel:
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return ViTModel(config)


def vit_processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": 32, "width": 32})


def tiny_gpt2_folder(folder: Path) -> Path:
    torch.manual_seed(1)
    tokenizer = gpt2_style_tokenizer()
    tiny_gpt2(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_vit_folder(folder: Path) -> Path:
    torch.manual_seed(2)
    tiny_vit().save_pretrained(folder)
    vit_processor().save_pretrained(folder)
    return folder


def tiny_vit_gpt2_folder(folder: Path) -> Path:
    """A VisionEncoderDecoder shaped like nlpconnect/vit-gpt2-image-captioning, 32-wide ViT, 24-wide GPT-2."""
    torch.manual_seed(3)
    tokenizer = gpt2_style_tokenizer()
    model = VisionEncoderDecoderModel(encoder=tiny_vit(), decoder=tiny_gpt2(tokenizer, cross_attention=True))
    model.config.decoder_start_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    vit_processor().save_pretrained(folder)
    return folder
