"""The CNN + LSTM merge baseline (seed 004): pooled CNN features added to an LSTM's reading of the caption.

    pixel_values (B, 3, S, S)
      -> EfficientNet-Lite trunk + tail, global average pool                   (B, 1280)
      -> Dropout, Dense + ReLU                                                 (B, H)      the "image" input
    caption words (B, T)
      -> Embedding, Dropout, LSTM                                              (B, T, H)
      -> + image (the merge), Dense + ReLU, Dense to the vocabulary            (B, T, V)   softmax in the loss

Captions go through the seed's preprocessing (`seed_preprocess`: lowercase, letters only, no one-letter
words, single spaces) and a word vocabulary of the words seen at least `min_count` times in training, with
the start/end tags `startseq`/`endseq`. Both live in the saved tokenizer, so a model folder is complete.

The model is an encoder-decoder to transformers' `generate` (greedy, beams, sampling, all its controls).
It keeps no cache: each step reruns the LSTM over the caption so far. Captions are short (< 25 words)
and the LSTM is small, so this costs little and needs no recurrent-state cache class.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from torch import nn
from transformers import (
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from imcap.encoder import CNN_CHANNELS, EfficientNetLiteEncoderConfig, LiteCNN

MODEL_TYPE = "imcap-lstm"
DECODER_TYPE = "imcap-lstm-decoder"
BOS, EOS, PAD, UNK = "startseq", "endseq", "<pad>", "<unk>"  # the seed's start/end tags
_NOT_LETTER = r"[^a-z\s]"  # after lowercasing: punctuation and digits are deleted
_ONE_LETTER_WORD = r"\b[a-z]\b"


def seed_preprocess(caption: str) -> str:
    """The seed's cleaning: "A dog's 2 toys." -> "dogs toys" (the tokenizer's normalizer does the same)."""
    words = re.sub(_NOT_LETTER, "", caption.lower()).split()
    return " ".join(w for w in words if len(w) > 1)


def train_word_tokenizer(captions: Iterable[str], min_count: int = 10) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: the words seen at least `min_count` times (after `seed_preprocess`), most
    frequent first, plus pad, unknown and the start/end tags."""
    counts = Counter(word for caption in captions for word in seed_preprocess(caption).split())
    words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    vocab = {token: i for i, token in enumerate([PAD, UNK, BOS, EOS, *words])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Lowercase(),
            normalizers.Replace(Regex(_NOT_LETTER), ""),
            normalizers.Replace(Regex(_ONE_LETTER_WORD), " "),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=512,
    )


class LstmDecoderConfig(PreTrainedConfig):
    model_type = DECODER_TYPE

    vocab_size: int = 2000
    embedding_size: int = 256
    hidden_size: int = 256
    dropout: float = 0.5


class LstmCaptionerConfig(PreTrainedConfig):
    """The pooled encoder's config (an EfficientNet-Lite config; `hidden_size` is its Dense width) and the
    LSTM decoder's."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {"encoder": EfficientNetLiteEncoderConfig, "decoder": LstmDecoderConfig}

    encoder: PreTrainedConfig | dict | None = None
    decoder: PreTrainedConfig | dict | None = None
    is_encoder_decoder: bool = True


class PooledLiteEncoder(LiteCNN, PreTrainedModel):
    """EfficientNet-Lite, average-pooled over the grid (1280-d), then Dropout and Dense + ReLU: one vector."""

    config_class = EfficientNetLiteEncoderConfig
    main_input_name = "pixel_values"
    base_model_prefix = "pooled_lite"

    def __init__(self, config: EfficientNetLiteEncoderConfig):
        super().__init__(config)
        self._build_cnn()
        self.dropout = nn.Dropout(config.dropout)
        self.dense = nn.Linear(CNN_CHANNELS, config.hidden_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and not self._is_cnn(module):
            nn.init.xavier_uniform_(module.weight)  # Keras' default, as in the seed
            nn.init.zeros_(module.bias)

    def tokens(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, 1280, G, G) tail output -> (B, 1, H): one "token", so it travels like the other encoders'."""
        pooled = feature_map.float().mean(dim=(2, 3)).to(self.dense.weight.dtype)
        return torch.relu(self.dense(self.dropout(pooled)))[:, None, :]

    def forward(
        self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs
    ) -> BaseModelOutput:
        hidden = self.tokens(self.tail(self.trunk(pixel_values)))
        return (hidden,) if return_dict is False else BaseModelOutput(last_hidden_state=hidden)


class LstmDecoder(nn.Module):
    """Embedding -> Dropout -> LSTM; + image; Dense + ReLU; Dense to the vocabulary (the seed's merge)."""

    def __init__(self, config: LstmDecoderConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.embedding_size)
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(config.embedding_size, config.hidden_size, batch_first=True)
        self.head = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.ReLU(),
            nn.Linear(config.hidden_size, config.vocab_size),
        )

    def forward(self, input_ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T), image (B, H) -> logits (B, T, V); position t predicts token t + 1.

        The LSTM runs left to right, so padding after a caption never changes the outputs before it.
        """
        words, _ = self.lstm(self.dropout(self.embed(input_ids)))
        return self.head(words + image[:, None, :])


class LstmCaptioner(PreTrainedModel, GenerationMixin):
    """PooledLiteEncoder + LstmDecoder; see the module docstring."""

    config_class = LstmCaptionerConfig
    main_input_name = "pixel_values"
    base_model_prefix = "lstm_captioner"

    def __init__(self, config: LstmCaptionerConfig):
        super().__init__(config)
        self.encoder = PooledLiteEncoder(config.encoder)
        self.decoder = LstmDecoder(config.decoder)
        self.post_init()
        self.generation_config.use_cache = False  # no KV cache: each step reruns the (small) LSTM

    def _init_weights(self, module: nn.Module) -> None:
        # Keras' defaults, as in the seed: Glorot-uniform Dense layers, uniform(+-0.05) embeddings
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.uniform_(module.weight, -0.05, 0.05)

    def get_encoder(self, modality: str | None = None) -> PooledLiteEncoder:
        return self.encoder

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.embed

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        """Next-word logits (B, T, V) for `decoder_input_ids` (start tag first); `labels` (B, T): the loss."""
        if encoder_outputs is None:
            encoder_outputs = self.encoder(pixel_values=pixel_values)
        image = encoder_outputs[0][:, 0]
        logits = self.decoder(decoder_input_ids, image)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=encoder_outputs[0])

    def caption_logits(
        self,
        visual_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        captions_per_image: int = 1,
    ) -> torch.Tensor:
        """Teacher forcing like the other models: tokens (B, 1, H), ids (B * K, T) -> logits (B * K, T, V)."""
        return self.decoder(input_ids, visual_tokens[:, 0].repeat_interleave(captions_per_image, dim=0))


def new_lstm_model(
    encoder_config: EfficientNetLiteEncoderConfig,
    vocab_size: int,
    embedding_size: int,
    dropout: float,
    imagenet_weights: bool = True,
) -> LstmCaptioner:
    """A fresh merge model; the LSTM is as wide as the encoder's Dense layer (their outputs are added)."""
    decoder = LstmDecoderConfig(
        vocab_size=vocab_size,
        embedding_size=embedding_size,
        hidden_size=encoder_config.hidden_size,
        dropout=dropout,
    )
    model = LstmCaptioner(LstmCaptionerConfig(encoder=encoder_config, decoder=decoder))
    if imagenet_weights:
        model.encoder.load_imagenet_weights()
    return model
