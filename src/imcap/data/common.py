"""What every caption dataset reader shares: the record, the error, split names, checks, file reading."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALL_SPLIT = "all"  # split of every record of a csv/jsonl file without a split column
_SPLIT_ALIASES = {"dev": "val", "valid": "val", "validation": "val"}
_SPLIT_ORDER = ("train", "restval", "val", "test")


class DataError(ValueError):
    """One-line, user-facing error about a dataset (message names the file/path and the problem)."""

    def __init__(self, message: str) -> None:
        # Callers print this as one line; a stray newline (e.g. in a file name) must not break that.
        super().__init__(" ".join(str(message).splitlines()))


@dataclass(frozen=True, slots=True)
class CaptionRecord:
    """One image with its reference captions."""

    image: Path  # path to the image file, absolute or relative as the source was given
    captions: tuple[str, ...]  # reference captions, verbatim text stripped of surrounding whitespace
    split: str  # "train" | "val" | "test" | other names the source defines


Reader = Callable[[Path, Path | None], list[CaptionRecord]]


def _normalize_split(name: str) -> str:
    name = name.strip().lower()
    return _SPLIT_ALIASES.get(name, name)


def _split_sort_key(name: str) -> tuple[int, str]:
    rank = _SPLIT_ORDER.index(name) if name in _SPLIT_ORDER else len(_SPLIT_ORDER)
    return rank, name


def _split_names(records: Iterable[CaptionRecord]) -> list[str]:
    return sorted({r.split for r in records}, key=_split_sort_key)


def _select_split(path: Path, records: list[CaptionRecord], split: str) -> list[CaptionRecord]:
    wanted = _normalize_split(split)
    names = _split_names(records)
    if wanted not in names:
        if names == [ALL_SPLIT]:
            raise DataError(f"{path} has no split column, so split {split!r} does not exist; use split=None")
        raise DataError(f"{path}: unknown split {split!r}; available splits: {', '.join(names)}")
    return [r for r in records if r.split == wanted]


def _check_images(source: Path, records: list[CaptionRecord]) -> None:
    # One listdir per folder instead of one stat per image: 7000 images stay a few milliseconds.
    # Plain strings rather than Path.parent/Path hashing, which cost more than the listing itself.
    listings: dict[str, frozenset[str]] = {}
    missing: list[Path] = []
    for record in records:
        folder, name = os.path.split(record.image)
        if folder not in listings:
            listings[folder] = (
                frozenset(os.listdir(folder or ".")) if os.path.isdir(folder or ".") else frozenset()
            )
        if name not in listings[folder]:
            missing.append(record.image)
    if missing:
        first = missing[0]
        hint = "" if first.parent.is_dir() else f" (folder {first.parent} does not exist)"
        raise DataError(
            f"{source}: {len(missing)} of {len(records)} captioned images are missing, first: {first}{hint}"
        )


def _caption(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"{where}: caption must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise DataError(f"{where}: empty caption")
    return text


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM written by spreadsheet tools
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start})") from None


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines with 1-based line numbers (split on \\n only: captions may hold odd unicode)."""
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line


def _load_json(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return json.load(f)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON in {path}: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"malformed JSON in {path}: not UTF-8 text (byte {e.start})") from None


def _require(obj: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise DataError(f"{where}: missing required key {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise DataError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _first_existing_dir(root: Path, names: Iterable[str], default: Path) -> Path:
    return next((root / n for n in names if (root / n).is_dir()), default)
