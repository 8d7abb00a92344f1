"""Table layouts: CSV and JSONL files with an image column, a caption column and an optional split."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imcap.data.common import (
    ALL_SPLIT,
    CaptionRecord,
    DataError,
    _caption,
    _normalize_split,
    _numbered_lines,
    _read_text,
)

_IMAGE_KEYS = ("image", "image_path", "file_name", "filename")
_CAPTION_KEYS = ("caption", "text")
_JSONL_CAPTION_KEYS = ("caption", "captions", "text")


@dataclass(frozen=True, slots=True)
class _Row:
    line: int
    image: str
    captions: list[str]
    split: str | None  # None: this row names no split


def _pick_key(keys: Iterable[str], candidates: tuple[str, ...]) -> str | None:
    by_lower = {k.strip().lower(): k for k in keys}
    return next((by_lower[c] for c in candidates if c in by_lower), None)


def _merge_rows(path: Path, rows: list[_Row], base: Path) -> list[CaptionRecord]:
    """Merge rows naming the same image into one record (first-appearance order)."""
    with_split = [r for r in rows if r.split]
    if with_split and len(with_split) != len(rows):
        line = next(r.line for r in rows if not r.split)
        raise DataError(f"{path} line {line}: missing split value (other rows have one)")
    merged: dict[str, tuple[str, list[str], int]] = {}
    for row in rows:
        split = _normalize_split(row.split) if row.split else ALL_SPLIT
        first_split, captions, first_line = merged.setdefault(row.image, (split, [], row.line))
        if split != first_split:
            raise DataError(
                f"{path} line {row.line}: image {row.image!r} is in split {split!r} but in "
                f"{first_split!r} on line {first_line}"
            )
        captions.extend(row.captions)
    return [CaptionRecord(base / image, tuple(c), s) for image, (s, c, _) in merged.items()]


def _read_csv(path: Path, image_root: Path | None) -> list[CaptionRecord]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    header = reader.fieldnames or []
    image_key = _pick_key(header, _IMAGE_KEYS)
    caption_key = _pick_key(header, _CAPTION_KEYS)
    for key, candidates in ((image_key, _IMAGE_KEYS), (caption_key, _CAPTION_KEYS)):
        if key is None:
            raise DataError(
                f"{path}: header has no {candidates[0]} column (expected one of {', '.join(candidates)}; "
                f"found {', '.join(header) or 'nothing'})"
            )
    split_key = _pick_key(header, ("split",))
    rows = []
    for row in reader:
        where = f"{path} line {reader.line_num}"
        image = (row[image_key] or "").strip()
        if not image:
            raise DataError(f"{where}: empty {image_key}")
        split = (row[split_key] or "").strip() if split_key else None
        if split == "":
            raise DataError(f"{where}: empty {split_key}")
        rows.append(_Row(reader.line_num, image, [_caption(row[caption_key] or "", where)], split))
    # Path joining keeps absolute image paths as they are and resolves relative ones against the file.
    return _merge_rows(path, rows, image_root or path.parent)


def _jsonl_row(obj: Any, number: int, path: Path) -> _Row:
    where = f"{path} line {number}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    image_key, caption_key = _pick_key(obj, _IMAGE_KEYS), _pick_key(obj, _JSONL_CAPTION_KEYS)
    if image_key is None or caption_key is None:
        wanted = ", ".join(_IMAGE_KEYS) if image_key is None else ", ".join(_JSONL_CAPTION_KEYS)
        raise DataError(f"{where}: missing key (expected one of {wanted})")
    image = obj[image_key]
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: {image_key!r} must be a non-empty string")
    value = obj[caption_key]
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise DataError(f"{where}: {caption_key!r} must be a string or a non-empty list of strings")
    split = obj.get("split")
    return _Row(number, image.strip(), [_caption(t, where) for t in texts], str(split) if split else None)


def _read_jsonl(path: Path, image_root: Path | None) -> list[CaptionRecord]:
    rows = []
    for number, line in _numbered_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON in {path} line {number}: {e.msg} at column {e.colno}") from None
        rows.append(_jsonl_row(obj, number, path))
    return _merge_rows(path, rows, image_root or path.parent)
