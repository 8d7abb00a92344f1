"""The prefix captioner (seed 003): image tokens become the first inputs of a GPT-2, which writes the caption.

    pixel_values (B, 3, S, S)
      -> EfficientNet-Lite encoder, the default model's (imcap.encoder)       (B, P, D)     P = 1 + G*G
      -> mapper: Linear up to `mapper_hidden`, GELU, Dropout, Linear down      (B, P, E)     E = GPT-2 width
      -> a learned [SEP] embedding appended                                   (B, P + 1, E)
      -> GPT-2 over [image tokens, SEP, caption tokens]                       (B, P + 1 + T, V) logits

Attention (`prefix_lm_mask`): every position sees the whole prefix (the image tokens and SEP, so image
tokens also see each other both ways); caption positions see the caption causally. The loss counts caption
tokens only: SEP predicts the first caption token, and nothing is asked to predict an image token or SEP.

Generation is transformers' `generate` with `inputs_embeds` = the prefix. Its first forward (the prefill)
runs the prefix under the same mask and fills the KV cache; every later token attends to all of the cache
and to itself, which is that mask again. So greedy, beams and sampling work as for the default model.
Training uses the same split (`caption_logits`): the prefix once per image, its captions against its cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    Cache,
    GenerationMixin,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from imcap.compat import cache_keyword
from imcap.encoder import EfficientNetLiteEncoder, EfficientNetLiteEncoderConfig
from imcap.generation import OptionsError

MODEL_TYPE = "imcap-prefix"
CAPTION_POSITIONS = 64  # GPT-2 positions left for the caption after the prefix, as the default decoder has


class PrefixCaptionerConfig(PreTrainedConfig):
    """An EfficientNet-Lite encoder config, a GPT-2 config and the mapper between them."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {"encoder": EfficientNetLiteEncoderConfig, "decoder": GPT2Config}

    encoder: PreTrainedConfig | dict | None = None
    decoder: PreTrainedConfig | dict | None = None
    mapper_hidden: int = 1024
    mapper_dropout: float = 0.1

    @property
    def prefix_length(self) -> int:
        """Image tokens plus SEP: the positions before the first caption token."""
        return 1 + self.encoder.grid_size**2 + 1


def prefix_lm_mask(attention_mask: torch.Tensor, prefix_length: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 key mask -> (B, 1, L, L) additive mask: query i may see key j when j is in the prefix
    (the first `prefix_length` positions: image tokens and SEP) or when j <= i; padded keys are never seen.

    Every row sees at least the prefix, so no row is fully masked (which would give NaNs).
    """
    length = attention_mask.shape[1]
    position = torch.arange(length, device=attention_mask.device)
    visible = (position[None, :] < prefix_length) | (position[None, :] <= position[:, None])  # (L, L)
    visible = visible[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
        ~visible, torch.finfo(dtype).min
    )


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """Mean next-token cross-entropy over caption tokens only.

    logits and labels (-100: ignore) are aligned with the whole input sequence [image tokens, SEP, caption];
    the labels of the image and SEP positions are never read, whatever they hold.
    """
    predicted = logits[
        :, prefix_length - 1 : -1
    ]  # from SEP on: each position predicts the next caption token
    targets = labels[:, prefix_length:]
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), ignore_index=-100)


class PrefixCaptioner(PreTrainedModel, GenerationMixin):
    """EfficientNet-Lite tokens -> mapper -> [SEP] -> GPT-2; see the module docstring."""

    config_class = PrefixCaptionerConfig
    main_input_name = "input_ids"  # to `generate` this is a decoder-only model fed `inputs_embeds`
    base_model_prefix = "prefix_captioner"
    _supports_sdpa = True

    def __init__(self, config: PrefixCaptionerConfig):
        super().__init__(config)
        width = config.decoder.n_embd
        self.encoder = EfficientNetLiteEncoder(config.encoder)
        self.mapper = nn.Sequential(
            nn.Linear(config.encoder.hidden_size, config.mapper_hidden),
            nn.GELU(),
            nn.Dropout(config.mapper_dropout),
            nn.Linear(config.mapper_hidden, width),
        )
        self.sep = nn.Parameter(torch.zeros(width))
        self.decoder = GPT2LMHeadModel(config.decoder)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # the encoder and the GPT-2 initialise themselves (transformers dispatches to sub-models)
        if module is self:
            nn.init.normal_(self.sep, std=0.02)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def get_encoder(self, modality: str | None = None) -> EfficientNetLiteEncoder:
        return self.encoder

    def prefix_embeds(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        """(B, P, D) encoder tokens -> (B, P + 1, E): mapped image tokens, then SEP."""
        mapped = self.mapper(visual_tokens)
        return torch.cat([mapped, self.sep.to(mapped.dtype).expand(mapped.shape[0], 1, -1)], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        prefix_length: int | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """GPT-2 over embeddings whose first `prefix_length` positions are the prefix.

        With an empty cache (training, or generate's prefill) the prefix mask is built from the (B, L)
        `attention_mask`; with a filled cache the new tokens see all of it, causally. `labels` (B, L) are
        aligned with the input; only caption positions count (`caption_loss`).
        """
        past_key_values = cache if cache is not None else past_key_values  # generate passes either name
        if inputs_embeds is None:  # (generate's later steps pass token ids)
            inputs_embeds = self.get_input_embeddings()(input_ids)
        prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        if prefix_length is not None and prefill:
            if attention_mask is None:
                attention_mask = torch.ones(
                    inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device
                )
            attention_mask = prefix_lm_mask(attention_mask, prefix_length, inputs_embeds.dtype)
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            use_cache=use_cache,
            **{cache_keyword(self.decoder): past_key_values},
            **kwargs,
        )
        loss = caption_loss(out.logits, labels, prefix_length) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, past_key_values=out.past_key_values)

    def caption_logits(
        self,
        visual_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        captions_per_image: int = 1,
    ) -> torch.Tensor:
        """Teacher forcing, as a VisionEncoderDecoder's decoder is called in training.

        visual_tokens (B, P, D) of B images; input_ids (B * K, T) start token first, K captions per image
        in a row, attention_mask (B * K, T). SEP takes the start token's place. Returns (B * K, T, V):
        position t predicts input token t + 1 (and the last, the token after the input).

        The prefix never sees the captions (`prefix_lm_mask`), so its keys and values are the same for every
        caption of an image: it runs once per image, and the K captions attend to it through the KV cache.
        The result is that of one pass over [prefix, caption] under the prefix mask, at a third of the cost.
        """
        prefix = self.prefix_embeds(visual_tokens)
        length = prefix.shape[1]
        ones = attention_mask.new_ones(prefix.shape[:2])
        first = self(inputs_embeds=prefix, attention_mask=ones, prefix_length=length, use_cache=True)
        sep_logits = first.logits[:, -1:].repeat_interleave(captions_per_image, dim=0)
        if input_ids.shape[1] == 1:
            return sep_logits
        cache = first.past_key_values
        cache.batch_repeat_interleave(captions_per_image)
        mask = torch.cat([ones.repeat_interleave(captions_per_image, dim=0), attention_mask[:, 1:]], dim=1)
        text = self.get_input_embeddings()(input_ids[:, 1:])
        rest = self(inputs_embeds=text, attention_mask=mask, past_key_values=cache, use_cache=True)
        return torch.cat([sep_logits, rest.logits], dim=1)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | None = None,
        generation_config=None,
        **kwargs,
    ):
        """Caption images (pixel_values) or precomputed encoder tokens, with any `generate` settings.

        The returned sequences start with the start (bos) token, as an encoder-decoder's do, so callers can
        treat every captioning model alike.
        """
        if encoder_outputs is None:
            encoder_outputs = self.encoder(pixel_values=pixel_values.to(self.dtype))
        prefix = self.prefix_embeds(encoder_outputs.last_hidden_state)
        config = generation_config if generation_config is not None else self.generation_config
        self._check_fits(kwargs.get("max_new_tokens", config.max_new_tokens))
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        out = super().generate(
            inputs_embeds=prefix,
            attention_mask=mask,
            prefix_length=prefix.shape[1],
            generation_config=generation_config,
            **kwargs,
        )
        return _with_start_token(out, config.bos_token_id)

    def _check_fits(self, max_new_tokens: int | None) -> None:
        room = self.config.decoder.n_positions - self.config.prefix_length
        if max_new_tokens is not None and max_new_tokens > room:
            raise OptionsError(
                f"max_new_tokens ({max_new_tokens}) exceeds what this model can generate ({room})"
            )


def _with_start_token(out, start_id: int):
    """Prepend the start token to generate's sequences (a tensor, or the `sequences` of its output)."""
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    start = torch.full((sequences.shape[0], 1), start_id, dtype=sequences.dtype, device=sequences.device)
    sequences = torch.cat([start, sequences], dim=1)
    if isinstance(out, torch.Tensor):
        return sequences
    out.sequences = sequences
    return out


def new_prefix_model(
    encoder_config: EfficientNetLiteEncoderConfig,
    decoder_config: GPT2Config,
    mapper_hidden: int,
    mapper_dropout: float,
    pretrained_decoder: GPT2LMHeadModel | None = None,
    imagenet_weights: bool = True,
) -> PrefixCaptioner:
    """A fresh prefix captioner: ImageNet CNN, a GPT-2 from scratch or with `pretrained_decoder`'s weights."""
    config = PrefixCaptionerConfig(
        encoder=encoder_config,
        decoder=pretrained_decoder.config if pretrained_decoder is not None else decoder_config,
        mapper_hidden=mapper_hidden,
        mapper_dropout=mapper_dropout,
    )
    model = PrefixCaptioner(config)
    if pretrained_decoder is not None:
        model.decoder.load_state_dict(pretrained_decoder.state_dict())
    if imagenet_weights:
        model.encoder.load_imagenet_weights()
    return model
