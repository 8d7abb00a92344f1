"""A recipe's `model` section -> model, tokenizer, image processor and how its image side is trained.

One builder per `model.type`, chosen from BUILDERS:

encoder-decoder  VisionEncoderDecoderModel: our EfficientNet-Lite encoder (or `pretrained_encoder`, frozen)
                 and a GPT-2 with cross-attention (from scratch, or `pretrained_decoder`); or a whole
                 `pretrained` checkpoint such as nlpconnect/vit-gpt2-image-captioning (encoder frozen)
prefix           imcap.archs.prefix: our encoder, a mapper, and a 6-layer-style GPT-2 (scratch or pretrained)
lstm             imcap.archs.lstm: our CNN pooled, and a word-level LSTM with the seed's vocabulary

Tokenizers: trained on the training captions (byte-level BPE; words for the LSTM), or the pretrained
decoder's own. A tokenizer saved by an earlier run (resume, or rank 0 in data-parallel training) is reused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase, VisionEncoderDecoderModel

from imcap.archs.lstm import new_lstm_model, train_word_tokenizer
from imcap.archs.prefix import CAPTION_POSITIONS, new_prefix_model
from imcap.encoder import EfficientNetLiteEncoder, EfficientNetLiteEncoderConfig
from imcap.modeling import (
    DecoderSpec,
    gpt2_config,
    image_processor_for,
    load_model,
    load_pretrained_decoder,
    load_pretrained_encoder,
    set_special_tokens,
)
from imcap.tokenizer import train_tokenizer
from imcap.training.config import ModelConfig, TrainConfig
from imcap.training.fronts import FrozenFront, LiteFront


@dataclass
class Built:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: object
    front: LiteFront | FrozenFront


def build(config: TrainConfig, captions: Sequence[str], tokenizer: PreTrainedTokenizerBase | None) -> Built:
    """The model of `config.model`, untrained but for its pretrained parts; `tokenizer`: one to reuse."""
    return BUILDERS[config.model.type](config, captions, tokenizer)


def _encoder_decoder(config: TrainConfig, captions: Sequence[str], tokenizer) -> Built:
    m = config.model
    if m.pretrained:  # a whole checkpoint: its tokenizer and processor come with it
        loaded = load_model(m.pretrained)
        tokenizer = tokenizer or _with_pad(loaded.tokenizer)
        model = loaded.model.train()
        set_special_tokens(model, tokenizer)
        return Built(model, tokenizer, loaded.image_processor, FrozenFront(model.encoder))
    if m.pretrained_encoder:
        encoder, processor = load_pretrained_encoder(m.pretrained_encoder)
    else:
        encoder = _lite_encoder(m)
        processor = image_processor_for(encoder.config)
    if m.pretrained_decoder:  # what `from_encoder_decoder_pretrained` builds: new cross-attention layers
        decoder, own_tokenizer = load_pretrained_decoder(m.pretrained_decoder, cross_attention=True)
        tokenizer = tokenizer or own_tokenizer
    else:
        tokenizer = tokenizer or train_tokenizer(captions, vocab_size=m.vocab_size)
        spec = DecoderSpec(
            m.decoder_layers, m.hidden_size, m.num_heads, _caption_positions(config), m.dropout
        )
        decoder = GPT2LMHeadModel(gpt2_config(spec, tokenizer, cross_attention=True))
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    set_special_tokens(model, tokenizer)
    front = FrozenFront(encoder) if m.pretrained_encoder else LiteFront(encoder)
    return Built(model, tokenizer, processor, front)


def _prefix(config: TrainConfig, captions: Sequence[str], tokenizer) -> Built:
    m = config.model
    pretrained = None
    if m.pretrained_decoder:
        pretrained, own_tokenizer = load_pretrained_decoder(m.pretrained_decoder)
        tokenizer = tokenizer or own_tokenizer
    else:
        tokenizer = tokenizer or train_tokenizer(captions, vocab_size=m.vocab_size)
    encoder_config = _lite_config(m)
    prefix_length = 1 + encoder_config.grid_size**2 + 1  # image tokens and SEP
    positions = prefix_length + max(CAPTION_POSITIONS, config.data.max_tokens)
    spec = DecoderSpec(m.decoder_layers, m.hidden_size, m.num_heads, positions, m.dropout)
    model = new_prefix_model(
        encoder_config,
        gpt2_config(spec, tokenizer, cross_attention=False),
        mapper_hidden=m.prefix.mapper_hidden,
        mapper_dropout=m.dropout,
        pretrained_decoder=pretrained,
        imagenet_weights=m.imagenet_weights,
    )
    set_special_tokens(model, tokenizer)
    return Built(model, tokenizer, image_processor_for(encoder_config), LiteFront(model.encoder))


def _lstm(config: TrainConfig, captions: Sequence[str], tokenizer) -> Built:
    m = config.model
    tokenizer = tokenizer or train_word_tokenizer(captions, min_count=m.lstm.min_word_count)
    encoder_config = _lite_config(m)
    model = new_lstm_model(
        encoder_config, len(tokenizer), m.lstm.embedding_size, m.dropout, imagenet_weights=m.imagenet_weights
    )
    set_special_tokens(model, tokenizer)
    # rare words were mapped to <unk> in training; a caption should never say "<unk>"
    model.generation_config.suppress_tokens = [tokenizer.unk_token_id]
    return Built(model, tokenizer, image_processor_for(encoder_config), LiteFront(model.encoder))


BUILDERS: dict[str, Callable[[TrainConfig, Sequence[str], PreTrainedTokenizerBase | None], Built]] = {
    "encoder-decoder": _encoder_decoder,
    "prefix": _prefix,
    "lstm": _lstm,
}


def _lite_config(m: ModelConfig) -> EfficientNetLiteEncoderConfig:
    return EfficientNetLiteEncoderConfig(
        variant=m.variant,
        image_size=m.image_size,
        hidden_size=m.hidden_size,
        num_layers=m.encoder_layers,
        num_heads=m.num_heads,
        dropout=m.dropout,
        tail_blocks=m.tail_blocks,
        concept_head=m.concept_head or m.concept_tokens > 0,
        concept_tokens=m.concept_tokens,
        concept_dropout=m.concept_dropout,
        concept_table=m.concept_table if m.concept_head or m.concept_tokens else None,
        concept_tail=m.concept_tail,
    )


def _lite_encoder(m: ModelConfig) -> EfficientNetLiteEncoder:
    encoder = EfficientNetLiteEncoder(_lite_config(m))
    if m.imagenet_weights:
        encoder.load_imagenet_weights()
    return encoder


def _caption_positions(config: TrainConfig) -> int:
    return max(64, config.data.max_tokens)  # as the shipped model: room for captions longer than training's


def _with_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has none; training masks by length, not by pad
    return tokenizer
