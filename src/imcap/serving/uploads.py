"""What a caption request carries, read and checked: the model, the CaptionOptions, how many tags to
list, the image files.

Pure functions over an already parsed form, raising RequestError(status, one-line message): 400 for a
body that is not a proper upload, 413 for one over a limit, 422 for settings or images that cannot be used.
The options go through the same `CaptionOptions.validate` and `check_fits` as `imcap caption`.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields

from PIL import Image
from starlette.datastructures import FormData, UploadFile

from imcap.generation import CaptionOptions, OptionsError, check_fits
from imcap.images import ImageLoadError, decode_image
from imcap.results import MAX_TAGS
from imcap.serving.settings import ServeSettings

IMAGES_FIELD = "images"
OPTIONS_FIELD = "options"  # a JSON object of CaptionOptions fields, as one form part
MODEL_FIELD = "model"
OPTION_TYPES = {field.name: field.type for field in fields(CaptionOptions)}  # name -> "int", "float", ...
# how many of each image's tags the answer lists: a setting of the answer, not of decoding, so not a
# CaptionOptions field; sent like one (a form field or a key of the options JSON)
NUM_TAGS_FIELD = "num_tags"
DEFAULT_NUM_TAGS = 5
# another setting of the answer: each image's answer carries its caption's per-word attention grids
RETURN_ATTENTION_FIELD = "return_attention"
SETTING_TYPES = {**OPTION_TYPES, NUM_TAGS_FIELD: "int", RETURN_ATTENTION_FIELD: "bool"}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
_MAX_OPTIONS_JSON_BYTES = 64 * 1024
# The model sees 260 px; a decoded photo waits in the queue at most this size on its longer side, so a
# full queue of 64 images holds ~200 MB rather than up to 64 x 190 MB of 64-megapixel decodes.
WORKING_SIDE = 1024


class RequestError(Exception):
    """A request the server will not caption; `status` is its HTTP code, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    filename: str
    data: bytes


@dataclass
class CaptionRequest:
    model: str
    options: CaptionOptions
    uploads: list[Upload]
    num_tags: int = DEFAULT_NUM_TAGS  # each image's answer lists its top num_tags tags
    return_attention: bool = False  # each image's answer carries where the model looked (imcap.explain)


async def read_caption_request(
    form: FormData, settings: ServeSettings, max_tokens: Mapping[str, int | None], default_model: str
) -> CaptionRequest:
    """Check a parsed multipart form; `max_tokens` maps each loaded model to its longest caption."""
    unknown = sorted(set(form.keys()) - {IMAGES_FIELD, OPTIONS_FIELD, MODEL_FIELD} - set(SETTING_TYPES))
    if unknown:
        raise RequestError(422, _unknown_field_message(unknown[0]))
    model = _single_text(form, MODEL_FIELD) or default_model
    if model not in max_tokens:
        raise RequestError(422, f"unknown model {model!r}; loaded: {', '.join(max_tokens)}")
    options, num_tags, attention = await _settings(form)
    _check_options(options, settings, max_tokens[model])
    return CaptionRequest(model, options, await _uploads(form, settings), num_tags, attention)


def _unknown_field_message(name: str) -> str:
    known = [IMAGES_FIELD, OPTIONS_FIELD, MODEL_FIELD, *SETTING_TYPES]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; fields: {', '.join(known)}"
    return f"unknown field {name!r}{hint}"


def _single_text(form: FormData, name: str) -> str | None:
    values = form.getlist(name)
    if len(values) > 1:
        raise RequestError(422, f"{name} given {len(values)} times; send it once")
    if values and not isinstance(values[0], str):
        raise RequestError(422, f"{name} must be a text field, not a file")
    return values[0] if values else None


async def _settings(form: FormData) -> tuple[CaptionOptions, int, bool]:
    """Options, num_tags and return_attention from form fields (text, converted by type) and/or one
    JSON part; each given once."""
    values = {name: _from_text(name, text) for name in SETTING_TYPES if (text := _single_text(form, name))}
    from_json = await _options_json(form)
    twice = sorted(set(values) & set(from_json))
    if twice:
        raise RequestError(422, f"{twice[0]} given twice: as a form field and in the options JSON")
    values |= from_json
    num_tags = values.pop(NUM_TAGS_FIELD, DEFAULT_NUM_TAGS)
    attention = values.pop(RETURN_ATTENTION_FIELD, False)
    if not isinstance(attention, bool):
        raise RequestError(422, f"{RETURN_ATTENTION_FIELD} must be true or false, got {attention!r}")
    try:
        options = CaptionOptions(**values).validate()  # JSON values are type-checked here
    except OptionsError as error:
        raise RequestError(422, str(error)) from error
    return options, _checked_num_tags(num_tags), attention


def _checked_num_tags(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(422, f"{NUM_TAGS_FIELD} must be a whole number, got {value!r}")
    if not 0 <= value <= MAX_TAGS:
        raise RequestError(422, f"{NUM_TAGS_FIELD} must be in 0..{MAX_TAGS}, got {value}")
    return value


async def _options_json(form: FormData) -> dict:
    parts = form.getlist(OPTIONS_FIELD)
    if len(parts) > 1:
        raise RequestError(422, f"{OPTIONS_FIELD} given {len(parts)} times; send one JSON object")
    if not parts:
        return {}
    part = parts[0]
    raw = part.encode() if isinstance(part, str) else await part.read(_MAX_OPTIONS_JSON_BYTES + 1)
    if len(raw) > _MAX_OPTIONS_JSON_BYTES:
        raise RequestError(413, f"{OPTIONS_FIELD} JSON is over {_MAX_OPTIONS_JSON_BYTES // 1024} kB")
    try:
        values = json.loads(raw)
    except ValueError as error:  # bad JSON or bad UTF-8
        raise RequestError(400, f"{OPTIONS_FIELD} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise RequestError(422, f'{OPTIONS_FIELD} must be a JSON object, e.g. {{"num_beams": 5}}')
    unknown = sorted(set(values) - set(SETTING_TYPES))
    if unknown:
        raise RequestError(422, f"in {OPTIONS_FIELD}: {_unknown_field_message(unknown[0])}")
    return values


def _from_text(name: str, text: str) -> int | float | bool | str | None:
    """A form field's text as the setting's type; the messages match CaptionOptions.validate's."""
    if SETTING_TYPES[name] == "str | None":  # prompt: the text as sent, empty meaning "the default"
        return text if text.strip() else None
    kind, text = SETTING_TYPES[name], text.strip()
    try:
        if kind == "int | None":  # seed, num_beams: empty or null means "the default"
            return None if text.lower() in ("", "none", "null") else int(text)
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        noun = "whole number" if kind.startswith("int") else "finite number"
        raise RequestError(422, f"{name} must be a {noun}, got {text!r}") from None
    if text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    raise RequestError(422, f"{name} must be true or false, got {text!r}")


def _check_options(options: CaptionOptions, settings: ServeSettings, max_tokens: int | None) -> None:
    try:
        check_fits(options, max_tokens)
    except OptionsError as error:
        raise RequestError(422, str(error)) from error
    for name in ("num_beams", "num_return_sequences"):
        value = getattr(options, name)
        if value > settings.max_beams:
            raise RequestError(422, f"{name} must be <= {settings.max_beams} on this server, got {value}")


async def _uploads(form: FormData, settings: ServeSettings) -> list[Upload]:
    files = form.getlist(IMAGES_FIELD)
    if not files:
        raise RequestError(422, f"no images: send one or more files in the {IMAGES_FIELD!r} field")
    if len(files) > settings.max_images_per_request:
        raise RequestError(
            413, f"too many images: {len(files)}, at most {settings.max_images_per_request} per request"
        )
    uploads = []
    for index, file in enumerate(files):
        if not isinstance(file, UploadFile):
            raise RequestError(422, f"{IMAGES_FIELD}[{index}] is a text field; send image files")
        data = await file.read(settings.max_upload_bytes + 1)  # never more than the limit into memory
        if len(data) > settings.max_upload_bytes:
            raise RequestError(
                413,
                f"{IMAGES_FIELD}[{index}] {file.filename or 'unnamed'!r} is over the limit of "
                f"{settings.max_upload_mb:g} MB per file",
            )
        uploads.append(Upload(file.filename or f"image-{index}", data))
    return uploads


def decode_upload(upload: Upload, index: int, max_pixels: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """An upload as an upright RGB image of at most WORKING_SIDE px, and its size as uploaded.

    Raises RequestError 422 for anything that is not a readable image within `max_pixels`.
    """
    try:
        image = decode_image(upload.data, f"{IMAGES_FIELD}[{index}] {upload.filename!r}", max_pixels)
    except ImageLoadError as error:
        raise RequestError(422, str(error)) from error
    size = image.size
    if max(size) > WORKING_SIDE:
        image.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BILINEAR)  # the processor's filter
    return image, size
