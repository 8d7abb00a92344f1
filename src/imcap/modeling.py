"""Build, save and load captioning models.

The default architecture is a `transformers.VisionEncoderDecoderModel`: our EfficientNet-Lite encoder
(`imcap.encoder`) with a GPT-2 decoder trained from scratch, and hub checkpoints such as
`nlpconnect/vit-gpt2-image-captioning` load through the same `load_model`. The other architectures
(`imcap.archs`: the prefix captioner and the LSTM baseline) are `PreTrainedModel`s with the same
`generate(pixel_values=...)`. A folder holds everything needed to run it: weights (safetensors), config
(whose `model_type` names the architecture, see `CAPTIONERS`), tokenizer and image-processor config, so
nothing is guessed at load time. Finding a folder or hub id, and saying in one line what is wrong with a
broken one, is imcap.model_sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    VisionEncoderDecoderModel,
    ViTImageProcessorPil,
)

from imcap.archs import lstm, prefix
from imcap.encoder import (
    LITE_MEAN,
    LITE_STD,
    EfficientNetLiteEncoder,
    EfficientNetLiteEncoderConfig,
)
from imcap.encoder import register as register_encoder
from imcap.families import Family, is_image_to_text, load_processor_model
from imcap.guidance_settings import GuidanceSettings
from imcap.model_sources import ModelLoadError, from_folder_or_hub

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
DEFAULT_MODEL_NAME = "default"  # how rows, reports and the REST API name the shipped model

# config.json's model_type -> the class that loads the folder: the architectures `imcap train` makes
CAPTIONERS: dict[str, type[PreTrainedModel]] = {
    "vision-encoder-decoder": VisionEncoderDecoderModel,
    prefix.MODEL_TYPE: prefix.PrefixCaptioner,
    lstm.MODEL_TYPE: lstm.LstmCaptioner,
}


@dataclass(frozen=True)
class DecoderSpec:
    """Shape of the GPT-2 decoder trained from scratch."""

    num_layers: int = 3
    hidden_size: int = 256
    num_heads: int = 4
    max_positions: int = 64
    dropout: float = 0.1


@dataclass
class LoadedModel:
    """A captioning model with the tokenizer and image processor it was trained with."""

    model: PreTrainedModel  # one of CAPTIONERS' classes; all have generate(pixel_values=...)
    tokenizer: PreTrainedTokenizerBase
    image_processor: object
    name: str
    # thresholds of guided decoding (imcap.guidance), for models with a concept head that have them saved
    guidance: GuidanceSettings | None = None
    # checkpoints loaded with their transformers processor (BLIP, GIT, chat VLMs...: imcap.families); the
    # processor builds generate's inputs, tokenizer and image_processor are its parts
    processor: object | None = None
    family: Family | None = None


def image_processor_for(encoder_config: EfficientNetLiteEncoderConfig) -> ViTImageProcessorPil:
    """ViTImageProcessor with EfficientNet-Lite's input scaling: resize to a square, (x - 127) / 128.

    The PIL backend, so that no torchvision is needed.
    """
    size = encoder_config.image_size
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": size, "width": size},
        resample=2,  # bilinear, as ViT's default (how the shared Flickr8k copy was resized too)
        do_rescale=True,
        do_normalize=True,
        image_mean=[LITE_MEAN] * 3,
        image_std=[LITE_STD] * 3,
    )


def new_model(
    encoder_config: EfficientNetLiteEncoderConfig,
    decoder: DecoderSpec,
    tokenizer: PreTrainedTokenizerBase,
    imagenet_weights: bool = True,
) -> VisionEncoderDecoderModel:
    """A fresh EfficientNet-Lite + GPT-2 captioner: ImageNet CNN, everything else randomly initialised."""
    encoder = EfficientNetLiteEncoder(encoder_config)
    if imagenet_weights:
        encoder.load_imagenet_weights()
    decoder_config = gpt2_config(decoder, tokenizer, cross_attention=True)
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=GPT2LMHeadModel(decoder_config))
    set_special_tokens(model, tokenizer)
    return model


def gpt2_config(
    decoder: DecoderSpec, tokenizer: PreTrainedTokenizerBase, cross_attention: bool
) -> GPT2Config:
    """The config of a GPT-2 trained from scratch on `tokenizer`'s vocabulary."""
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=decoder.max_positions,
        n_embd=decoder.hidden_size,
        n_layer=decoder.num_layers,
        n_head=decoder.num_heads,
        resid_pdrop=decoder.dropout,
        embd_pdrop=decoder.dropout,
        attn_pdrop=decoder.dropout,
        add_cross_attention=cross_attention,
        is_decoder=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def set_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Put the tokenizer's bos/eos/pad on the model and its generation config (generate reads both)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = bos
        config.bos_token_id = bos
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = pad


def save_model(model: PreTrainedModel, tokenizer, image_processor, folder: str | Path, fp16=False) -> None:
    """Write a self-describing model folder; `fp16=True` halves the size of the weights file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fp16:
        model = _half_copy(model)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)


def _half_copy(model: PreTrainedModel) -> PreTrainedModel:
    half = type(model)(config=model.config)
    half.load_state_dict(model.state_dict())
    half.generation_config = model.generation_config
    return half.half()


def register() -> None:
    """Make AutoConfig/AutoModel know our encoder and architectures (VisionEncoderDecoderModel needs the
    encoder's; the others are for anyone using the Auto classes on our folders)."""
    register_encoder()
    for config_class, model_class in (
        (prefix.PrefixCaptionerConfig, prefix.PrefixCaptioner),
        (lstm.LstmCaptionerConfig, lstm.LstmCaptioner),
    ):
        try:
            AutoConfig.register(config_class.model_type, config_class)
            AutoModel.register(config_class, model_class)
        except ValueError:  # already registered
            pass


def load_model(name_or_path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a captioning model: None (the shipped default), a local folder or a hub id.

    Any architecture of CAPTIONERS: VisionEncoderDecoder checkpoints (ours or the hub's), prefix, LSTM;
    and any image-to-text checkpoint transformers' AutoModelForImageTextToText and AutoProcessor load
    (BLIP, GIT, Florence-2, LLaVA, Idefics3/SmolVLM, Qwen2-VL, ...: imcap.families).
    """
    register()
    source = str(DEFAULT_MODEL_DIR if name_or_path is None else name_or_path)
    name = DEFAULT_MODEL_NAME if name_or_path is None else str(name_or_path)
    return from_folder_or_hub(source, lambda where, **kw: _from_pretrained(where, dtype, name=name, **kw))


def _from_pretrained(
    source: str, dtype: torch.dtype, name: str, local_files_only: bool = False
) -> LoadedModel:
    kwargs = {"local_files_only": local_files_only}
    model_type = PretrainedConfig.get_config_dict(source, **kwargs)[0].get("model_type")
    if model_type not in CAPTIONERS and is_image_to_text(model_type):
        model, processor, family = load_processor_model(source, dtype, **kwargs)
        tokenizer, image_processor = processor.tokenizer, processor.image_processor
        return LoadedModel(model, tokenizer, image_processor, name, processor=processor, family=family)
    model_class = captioner_class(model_type)
    model = model_class.from_pretrained(source, dtype=dtype, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(source, **kwargs)
    if (
        getattr(model.config, "decoder_start_token_id", None) is None
        or model.generation_config.pad_token_id is None
    ):
        set_special_tokens(model, tokenizer)  # hub checkpoints (e.g. vit-gpt2) often leave these unset
    guidance = GuidanceSettings.load(source) if Path(source).is_dir() else None
    return LoadedModel(model, tokenizer, image_processor, name, guidance)


def captioner_class(model_type: str | None) -> type[PreTrainedModel]:
    if model_type not in CAPTIONERS:
        raise ValueError(
            f"model_type {model_type!r} is not an image-to-text model (imcap takes {', '.join(CAPTIONERS)} "
            "and the image-text-to-text models of transformers; see imcap models)"
        )
    return CAPTIONERS[model_type]


def max_caption_tokens(model: PreTrainedModel) -> int | None:
    """The longest caption (in tokens) a model can generate, if its decoder has position embeddings."""
    config = model.config
    if isinstance(config, prefix.PrefixCaptionerConfig):  # the prefix takes positions before the caption
        return config.decoder.n_positions - config.prefix_length
    positions = getattr(config.decoder, "max_position_embeddings", None)
    return positions - 1 if positions else None  # one position holds the start token


def load_pretrained_decoder(
    source: str, cross_attention: bool = False
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """A pretrained GPT-2 (e.g. distilgpt2, or a local folder) and its tokenizer, which gets a pad token.

    `cross_attention` adds (new, random) cross-attention layers, as `from_encoder_decoder_pretrained` does.
    """
    extra = {"add_cross_attention": True, "is_decoder": True} if cross_attention else {}

    def load(where: str, **kwargs):
        decoder = GPT2LMHeadModel.from_pretrained(where, **extra, **kwargs)
        return decoder, AutoTokenizer.from_pretrained(where, **kwargs)

    decoder, tokenizer = from_folder_or_hub(source, load)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has none; training masks by length, not by pad
    return decoder, tokenizer


def load_pretrained_encoder(source: str):
    """A pretrained vision encoder (e.g. google/vit-base-patch16-224-in21k, or a folder) and its processor."""

    def load(where: str, **kwargs):
        return AutoModel.from_pretrained(where, **kwargs), AutoImageProcessor.from_pretrained(where, **kwargs)

    return from_folder_or_hub(source, load)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "DEFAULT_MODEL_DIR",
    "CAPTIONERS",
    "DecoderSpec",
    "EfficientNetLiteEncoderConfig",
    "LoadedModel",
    "ModelLoadError",
    "count_parameters",
    "gpt2_config",
    "image_processor_for",
    "load_model",
    "load_pretrained_decoder",
    "load_pretrained_encoder",
    "max_caption_tokens",
    "new_model",
    "save_model",
]
