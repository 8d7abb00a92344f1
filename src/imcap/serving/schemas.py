"""The JSON the REST API answers with, as pydantic models (they also document it in /docs)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from imcap.generation import CaptionOptions
from imcap.results import MAX_TAGS
from imcap.serving.uploads import (
    DEFAULT_NUM_TAGS,
    IMAGES_FIELD,
    MODEL_FIELD,
    NUM_TAGS_FIELD,
    OPTION_TYPES,
    OPTIONS_FIELD,
    RETURN_ATTENTION_FIELD,
)

_SCORE = (
    "what ranks candidates: logprob / tokens ** length_penalty (the mean per token unless a length "
    "penalty is set); null if not finite"
)
_LOGPROB = "log-probability of the caption's tokens, end-of-text included; null if not finite"


class CandidateOut(BaseModel):
    text: str
    score: float | None = Field(description=_SCORE)
    logprob: float | None = Field(description=_LOGPROB)


class TagOut(BaseModel):
    label: str = Field(description="an ImageNet class, e.g. 'tabby'")
    score: float = Field(description="its probability under the model's concept head, 0..1")


class ImageTiming(BaseModel):
    queue_ms: float = Field(description="waiting for the model")
    model_ms: float = Field(description="the model call this image shared with others")
    batch_images: int = Field(description="images captioned in that call")


class WordAttentionOut(BaseModel):
    word: str
    grid: list[list[float]] = Field(
        description="rows x cols: the share of the word's attention on each image patch, row by row"
    )
    other_share: float = Field(
        description="the share on the encoder's other tokens (global, concept, CLS); grid + this = 1"
    )
    image_share: float = Field(
        description="the share of all attention that went to the image (1 for cross-attention decoders)"
    )


class AttentionOut(BaseModel):
    grid_size: list[int] = Field(description="[rows, cols] of every grid")
    layer: int | None = Field(description="the decoder layer shown; null: the mean of all")
    head: int | None = Field(description="the attention head shown; null: the mean of all")
    words: list[WordAttentionOut] = Field(description="the caption's words in order, punctuation dropped")


class ImageOut(BaseModel):
    filename: str
    width: int
    height: int
    caption: str = Field(description="the best candidate's text")
    score: float | None = Field(description="the best candidate's score")
    logprob: float | None = Field(description="the best candidate's log-probability")
    candidates: list[CandidateOut] = Field(description="highest score first; num_return_sequences of them")
    tags: list[TagOut] = Field(
        description="the top ImageNet concepts, most probable first; up to num_tags of them "
        "(none for models without a concept head)"
    )
    timing: ImageTiming
    attention: AttentionOut | None = Field(
        None, description="with return_attention: where the model looked for each word of the caption"
    )


class RequestTiming(BaseModel):
    decode_ms: float
    total_ms: float


class CaptionsOut(BaseModel):
    model: str
    settings: dict = Field(description="the CaptionOptions used, every field")
    images: list[ImageOut] = Field(description="one per uploaded image, in upload order")
    timing: RequestTiming


class ModelOut(BaseModel):
    id: str
    default: bool
    max_caption_tokens: int | None


class ModelsOut(BaseModel):
    models: list[ModelOut]


class ErrorOut(BaseModel):
    detail: str = Field(description="one line saying what was wrong")


_JSON_TYPES = {
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "int | None": "integer",
    "str | None": "string",  # prompt: models that take one (imcap.families)
}


def caption_form_schema() -> dict:
    """OpenAPI description of the multipart body of POST /v1/captions (parsed by hand, see uploads.py)."""
    defaults = CaptionOptions()
    options = {
        name: {"type": _JSON_TYPES[kind], "default": getattr(defaults, name)}
        for name, kind in OPTION_TYPES.items()
    }
    properties = {
        IMAGES_FIELD: {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "one or more image files (JPEG, PNG, WebP, BMP, TIFF, GIF)",
        },
        MODEL_FIELD: {"type": "string", "description": "a model id from GET /v1/models (default: the first)"},
        OPTIONS_FIELD: {
            "type": "string",
            "description": 'the settings below as one JSON object instead, e.g. {"num_beams": 5}',
        },
        **options,
        NUM_TAGS_FIELD: {
            "type": "integer",
            "default": DEFAULT_NUM_TAGS,
            "minimum": 0,
            "maximum": MAX_TAGS,
            "description": "how many ImageNet tags to list per image (models with a concept head)",
        },
        RETURN_ATTENTION_FIELD: {
            "type": "boolean",
            "default": False,
            "description": "add each caption's per-word attention over the image (imcap explain's grids)",
        },
    }
    schema = {"type": "object", "required": [IMAGES_FIELD], "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
