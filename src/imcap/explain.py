"""Where the model looked: for each word of a caption, the decoder's attention over the image tokens.

    explanation = explain(Captioner.from_pretrained(), "photo.jpg")
    explanation.words[2].word, explanation.words[2].grid    # "dog", (9, 9) shares of the word's attention

The caption comes from the normal path (`Captioner`: the engine, guidance, beams or sampling), untouched,
so it is the very caption `imcap caption` gives with the same settings. Then one teacher-forced pass of the
decoder over that caption's tokens, with eager attention (SDPA does not return its weights), reads what
each token attended to. The decoder is causal: at every position this pass computes exactly what the search
computed when it chose that token, so the maps belong to the caption's own beam. The fast engine is not
touched; attention costs this one extra pass, and only when asked for.

What the decoder attends to, per architecture (`_ATTENTION`) and encoder (`_LAYOUTS`):

    EfficientNet-Lite encoder (ours)   [global, G*G patches row-major, K concept tokens]    G = 9 at 260 px
    ViT / DeiT / BEiT / DINOv2         [CLS (+ distillation / register tokens), rows*cols patches]
                                       rows = height / patch: 14x14 for ViT-B/16 at 224 px
    prefix model (imcap.archs.prefix)  self-attention of caption tokens over [image tokens, SEP, caption];
                                       its share over the image tokens is renormalised to 1 (`image_share`
                                       keeps how much went to the image at all)
    LSTM baseline                      one pooled image vector, no attention: ExplainError

Per word: the attention of its tokens averaged over heads and layers (or one `layer` / `head`), then over
its BPE pieces (punctuation pieces left out). `grid` holds the patches' shares, `other_share` the rest
(global, concept and CLS tokens), so grid.sum() + other_share == 1.
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import VisionEncoderDecoderModel

from imcap.archs.prefix import PrefixCaptioner, prefix_lm_mask
from imcap.encoder import MODEL_TYPE as LITE_ENCODER_TYPE
from imcap.generation import CaptionOptions

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from imcap.captioner import Captioner, CaptionResult
    from imcap.images import ImageInput

_PUNCTUATION = string.punctuation + "“”‘’…"
_DECIMALS = 6  # JSON precision of the shares


class ExplainError(ValueError):
    """A model or setting explain cannot work with; the message is one line saying why."""


@dataclass(frozen=True)
class TokenLayout:
    """Where the image patches sit among an encoder's `num_tokens` output tokens (which come first among
    the keys the decoder attends to; a prefix model's keys go on with SEP and the caption)."""

    rows: int
    cols: int
    first_patch: int  # patches are tokens first_patch .. first_patch + rows * cols - 1, row-major
    num_tokens: int

    @property
    def patches(self) -> slice:
        return slice(self.first_patch, self.first_patch + self.rows * self.cols)


@dataclass
class WordAttention:
    word: str
    grid: np.ndarray  # (rows, cols): the share of the word's attention on each image patch
    other_share: float  # the share on the encoder's other tokens (global, concepts, CLS); grid + this = 1
    image_share: float = 1.0  # prefix model: the share of all attention that went to image tokens at all
    pieces: list[str] = field(default_factory=list)  # the word's tokens as text (BPE pieces)


@dataclass
class Explanation:
    """One image's caption and, per word, where the model looked when it wrote it."""

    caption: str
    grid_size: tuple[int, int]  # (rows, cols)
    words: list[WordAttention]
    result: CaptionResult = field(repr=False)  # what the Captioner returned for the image
    layer: int | None = None  # None: the mean over the decoder's layers
    head: int | None = None  # None: the mean over heads

    def to_json(self) -> dict:
        """`caption`, `grid_size` [rows, cols], `layer` and `head` (null: the mean of all), and `words`:
        [{"word", "grid" (rows lists of cols shares), "other_share", "image_share"}], in caption order."""
        return {
            "caption": self.caption,
            "grid_size": list(self.grid_size),
            "layer": self.layer,
            "head": self.head,
            "words": [
                {
                    "word": w.word,
                    "grid": _floored(w.grid).tolist(),
                    "other_share": round(w.other_share, _DECIMALS),
                    "image_share": round(w.image_share, _DECIMALS),
                }
                for w in self.words
            ],
        }


def explain(
    captioner: Captioner,
    image: ImageInput,
    options: CaptionOptions | None = None,
    *,
    layer: int | None = None,
    head: int | None = None,
) -> Explanation:
    """Caption one image as `captioner(image, options)` does and explain its best caption.

    layer / head: one decoder layer / attention head (0-based) instead of the mean over all.
    Raises ExplainError (models without attention to image tokens, a layer or head that does not exist),
    OptionsError and ImageLoadError as captioning does; all before any model work.
    """
    check_explainable(captioner.model, layer, head)
    options = options or CaptionOptions()
    result = captioner(image, options)[0]
    return explain_results(captioner, [image], [result], layer=layer, head=head)[0]


def explain_results(
    captioner: Captioner,
    images: Sequence[ImageInput],
    results: Sequence[CaptionResult],
    *,
    layer: int | None = None,
    head: int | None = None,
) -> list[Explanation]:
    """Explain captions already made for these images (their best candidates), one Explanation each.

    Runs the model with eager attention for a moment: call it where the captioner's other calls run (the
    server's batcher thread), never beside one.
    """
    check_explainable(captioner.model, layer, head)
    if not images:
        return []
    pixels = captioner.pixel_values(images).to(captioner.model.dtype)
    tokens = [result.candidates[0].tokens for result in results]
    attend = _ATTENTION[type(captioner.model)]
    explanations = []
    with torch.inference_mode(), _eager_attention(captioner.model.decoder):
        for (attention, layout), result in zip(attend(captioner, pixels, tokens), results, strict=True):
            per_token = _select(attention, layer, head)  # (T, keys): the image tokens come first
            image_share = per_token[:, : layout.num_tokens].sum(axis=-1)  # 1 unless a prefix model
            per_token = per_token[:, : layout.num_tokens] / image_share[:, None]
            words = _words(captioner, result, per_token, image_share, layout)
            grid = (layout.rows, layout.cols)
            explanations.append(Explanation(result.caption, grid, words, result, layer, head))
    return explanations


def check_explainable(model: PreTrainedModel, layer: int | None = None, head: int | None = None) -> None:
    """Raise ExplainError unless the model attends to image tokens and has this layer and head."""
    if type(model) not in _ATTENTION:
        kind = getattr(model.config, "model_type", type(model).__name__)
        reason = _NO_ATTENTION.get(kind, f"{kind} models have no attention to image tokens")
        raise ExplainError(
            f"cannot explain this model: {reason}; explain needs an encoder-decoder or prefix model"
        )
    config = model.config.decoder
    for name, value, count in (
        ("layer", layer, config.num_hidden_layers),
        ("head", head, config.num_attention_heads),
    ):
        if value is not None and not 0 <= value < count:
            raise ExplainError(
                f"{name} {value} does not exist: the decoder has {count} {name}s (0..{count - 1})"
            )


_NO_ATTENTION = {  # model_type -> why it has no attention to show
    "imcap-lstm": "the LSTM baseline reads the photo as one pooled vector, not as image tokens",
}


# --- attention per token, for each architecture --------------------------------------------------------


def _cross_attention(captioner: Captioner, pixels: torch.Tensor, tokens: list[list[int]]) -> Iterator:
    """VisionEncoderDecoder: (L, H, T, S) cross-attentions of each caption's T tokens over S image tokens."""
    model = captioner.model
    hidden = _encoder_states(captioner, pixels)  # (B, S, D_decoder)
    layout = token_layout(model.config.encoder, hidden.shape[1], pixels.shape[-2:])
    config = model.generation_config
    start = config.decoder_start_token_id
    start = config.bos_token_id if start is None else start
    for row, ids in enumerate(tokens):
        # position t reads token t and predicts token t + 1: the attention it computed chose that token
        inputs = torch.tensor([[start, *ids[:-1]]], device=hidden.device)
        out = model.decoder(
            input_ids=inputs, encoder_hidden_states=hidden[row : row + 1], output_attentions=True
        )
        yield _stacked(out.cross_attentions, "cross-attention"), layout


def _prefix_attention(captioner: Captioner, pixels: torch.Tensor, tokens: list[list[int]]) -> Iterator:
    """Prefix model: (L, H, T, P + 1 + T) self-attentions of each caption's T tokens over the whole
    sequence, whose first P positions are the image tokens (then SEP and the caption)."""
    model: PrefixCaptioner = captioner.model
    visual = model.encoder(pixel_values=pixels).last_hidden_state  # (B, P, D)
    image_tokens = visual.shape[1]
    layout = token_layout(model.config.encoder, image_tokens, pixels.shape[-2:])
    for row, ids in enumerate(tokens):
        prefix = model.prefix_embeds(visual[row : row + 1])  # (1, P + 1, E): image tokens, then SEP
        words = model.get_input_embeddings()(torch.tensor([ids[:-1]], device=prefix.device, dtype=torch.long))
        embeds = torch.cat([prefix, words], dim=1)
        ones = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        mask = prefix_lm_mask(ones, prefix.shape[1], embeds.dtype)
        out = model.decoder(inputs_embeds=embeds, attention_mask=mask, output_attentions=True)
        # SEP (position P) predicts the first caption token, position P + t the token after it
        rows = slice(image_tokens, image_tokens + len(ids))
        yield _stacked(out.attentions, "self-attention")[:, :, rows], layout


_ATTENTION = {  # the model class -> its attention over image tokens
    VisionEncoderDecoderModel: _cross_attention,
    PrefixCaptioner: _prefix_attention,
}


def _encoder_states(captioner: Captioner, pixels: torch.Tensor) -> torch.Tensor:
    """The states the decoder cross-attended to: the engine's when it captioned (folded BatchNorm)."""
    if captioner.engine is not None:
        return captioner.engine.encode(pixels)
    from imcap.engine import _project_to_decoder

    return _project_to_decoder(
        captioner.model, captioner.model.encoder(pixel_values=pixels).last_hidden_state
    )


def _stacked(per_layer: tuple | None, kind: str) -> np.ndarray:
    """The decoder's per-layer (1, H, T, S) weights as one float64 (L, H, T, S) array."""
    if not per_layer or any(a is None for a in per_layer):
        raise ExplainError(f"this decoder does not return its {kind} weights")
    return torch.cat(per_layer).double().cpu().numpy()


@contextmanager
def _eager_attention(decoder) -> Iterator[None]:
    """Run the decoder with eager attention, whose weights come back (then its own implementation again)."""
    before = decoder.config._attn_implementation
    if before == "eager":
        yield
        return
    decoder.set_attn_implementation("eager")
    try:
        yield
    finally:
        decoder.set_attn_implementation(before)


def _select(attention: np.ndarray, layer: int | None, head: int | None) -> np.ndarray:
    """(L, H, T, S) -> (T, S): one layer or the mean of all, one head or the mean of all; rows sum to 1."""
    per_layer = attention[layer] if layer is not None else attention.mean(axis=0)
    per_token = per_layer[head] if head is not None else per_layer.mean(axis=0)
    return per_token / per_token.sum(axis=-1, keepdims=True)


# --- token layouts ---------------------------------------------------------------------------------------


def token_layout(encoder_config, num_tokens: int, pixel_size: Sequence[int]) -> TokenLayout:
    """Where the patches are among an encoder's `num_tokens` output tokens, for (height, width) pixels."""
    kind = getattr(encoder_config, "model_type", None)
    if kind not in _LAYOUTS:
        raise ExplainError(
            f"explain does not know where the image patches are among a {kind} encoder's tokens "
            f"(it knows {', '.join(_LAYOUTS)})"
        )
    layout = _LAYOUTS[kind](encoder_config, num_tokens, int(pixel_size[0]), int(pixel_size[1]))
    if layout.first_patch < 0 or layout.patches.stop > num_tokens:
        raise ExplainError(
            f"a {layout.rows}x{layout.cols} grid does not fit the {num_tokens} tokens of this {kind} encoder"
        )
    return layout


def _lite_layout(config, num_tokens: int, height: int, width: int) -> TokenLayout:
    # the global token first, then the final feature map row by row, then the concept tokens
    return TokenLayout(config.grid_size, config.grid_size, 1, num_tokens)


def _patch_layout(config, num_tokens: int, height: int, width: int) -> TokenLayout:
    # CLS (and distillation / register tokens) first, then the patches row by row
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    rows, cols = height // patch, width // patch
    return TokenLayout(rows, cols, num_tokens - rows * cols, num_tokens)


_LAYOUTS = {  # the encoder config's model_type -> its token layout
    LITE_ENCODER_TYPE: _lite_layout,
    "vit": _patch_layout,
    "deit": _patch_layout,
    "beit": _patch_layout,
    "dinov2": _patch_layout,
}


# --- tokens to words -------------------------------------------------------------------------------------


def words_of(tokenizer, tokens: Sequence[int]) -> list[tuple[str, list[int], list[str]]]:
    """Group a caption's tokens into words: (word, positions of its tokens, the tokens' text) per word.

    A token starts a new word when its text begins with a space (byte-level BPE's "Ġ", or the space a
    WordPiece decoder puts before a token without "##"). Special tokens (end-of-text) and punctuation
    pieces belong to no word; punctuation is stripped from the words' ends, and words of punctuation only
    are dropped. Works from the decoded text, so any tokenizer's way of marking pieces is respected.
    """
    special = set(tokenizer.all_special_ids)
    groups: list[tuple[str, list[int], list[str]]] = []
    kept: list[int] = []
    text = ""
    for position, token in enumerate(tokens):
        if token in special:
            continue
        kept.append(token)
        decoded = tokenizer.decode(kept, skip_special_tokens=True)
        piece = decoded[_common_prefix(text, decoded) :]
        text = decoded
        if not groups or piece[:1].isspace():
            groups.append(("", [], []))
        word, positions, pieces = groups[-1]
        if not _is_punctuation(piece):  # punctuation pieces give the word no attention
            positions.append(position)
        pieces.append(piece.strip())
        groups[-1] = (word + piece, positions, pieces)
    words = [(word.strip().strip(_PUNCTUATION), positions, pieces) for word, positions, pieces in groups]
    return [(word, positions, pieces) for word, positions, pieces in words if word and positions]


def _is_punctuation(piece: str) -> bool:
    text = piece.strip()
    return bool(text) and not text.strip(_PUNCTUATION)


def _common_prefix(a: str, b: str) -> int:
    """Length of the common start (a byte-level token can end mid-character: decode shows U+FFFD)."""
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def _words(
    captioner: Captioner, result: CaptionResult, per_token: np.ndarray, image_share: np.ndarray, layout
) -> list[WordAttention]:
    grouped = words_of(captioner.loaded.tokenizer, result.candidates[0].tokens)
    # the caption is the tokens' text formatted for display (capitalised, a full stop): show its words
    shown = [w.strip(_PUNCTUATION) for w in result.caption.split()]
    shown = [w for w in shown if w]
    if len(shown) != len(grouped):
        shown = [word for word, _, _ in grouped]
    words = []
    for text, (_, positions, pieces) in zip(shown, grouped, strict=True):
        attention = per_token[positions].mean(axis=0)  # (S,)
        grid = attention[layout.patches].reshape(layout.rows, layout.cols)
        share = float(image_share[positions].mean())
        words.append(WordAttention(text, grid, float(max(0.0, 1.0 - grid.sum())), share, pieces))
    return words


def _floored(grid: np.ndarray) -> np.ndarray:
    """Shares cut (not rounded) to _DECIMALS: a grid's written values never sum to more than it does."""
    scale = 10**_DECIMALS
    return np.floor(grid * scale) / scale
