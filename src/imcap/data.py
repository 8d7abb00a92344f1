"""Caption dataset readers.

Every supported dataset is turned into a list of :class:`CaptionRecord` (one per image) by
:func:`load_records`, which detects the layout of the path it is given (:func:`detect_layout`):

``shared``
    Folder with ``captions.tsv`` (``image<TAB>caption_index<TAB>caption``, no header),
    ``splits/NAME.txt`` (one image file name per line) and ``images/``.
``flickr8k-original``
    The official Flickr8k download: ``Flickr8k.token.txt`` plus ``Flickr_8k.{train,dev,test}Images.txt``
    (possibly inside ``Flickr8k_text/``) and an image folder ``Flicker8k_Dataset/``,
    ``Flickr8k_Dataset/`` or ``images/``.
``karpathy``
    Karpathy's ``dataset_flickr8k.json`` / ``dataset_flickr30k.json`` / ``dataset_coco.json`` (the file,
    or a folder holding one). Its ``restval`` split is reported as ``"restval"``; the usual "Karpathy
    train" set is ``train`` plus ``restval``, so load both if you want it.
``coco``
    COCO ``captions_<split><year>.json`` files (one file, or a folder with ``annotations/captions_*.json``)
    with images in ``<split><year>/`` folders next to ``annotations/``.
``csv`` / ``jsonl``
    A table with an image column and a caption column and an optional split column. Without a split
    column every record gets the split ``"all"``.

Split names are lower-cased and ``dev``/``valid``/``validation`` are reported as ``val``.
Every problem with a dataset raises :class:`DataError` with a one-line message naming the path.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ALL_SPLIT",
    "LAYOUTS",
    "CaptionRecord",
    "DataError",
    "available_splits",
    "detect_layout",
    "load_records",
]

ALL_SPLIT = "all"  # split of every record of a csv/jsonl file without a split column
_SPLIT_ALIASES = {"dev": "val", "valid": "val", "validation": "val"}
_SPLIT_ORDER = ("train", "restval", "val", "test")

_FLICKR_TOKEN_FILE = "Flickr8k.token.txt"
_FLICKR_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# "Flicker" is the (misspelled) folder name inside the official Flickr8k_Dataset.zip.
_FLICKR_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "images")
_KARPATHY_IMAGE_DIRS = ("images", "Flicker8k_Dataset", "flickr30k-images")
_COCO_FILE_RE = re.compile(r"captions_(?P<folder>(?P<split>[A-Za-z]+)\w*)\.json")

_IMAGE_KEYS = ("image", "image_path", "file_name", "filename")
_CAPTION_KEYS = ("caption", "text")
_JSONL_CAPTION_KEYS = ("caption", "captions", "text")


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


# --------------------------------------------------------------------------- public entry points


def load_records(
    source: str | Path,
    split: str | None = None,
    *,
    check_images: bool = True,
    image_root: str | Path | None = None,
) -> list[CaptionRecord]:
    """Read the caption records of a dataset folder or file.

    ``split=None`` returns every record; otherwise only that split (aliases such as ``dev`` accepted).
    Records keep the order of the source (split file, JSON or table). ``image_root`` overrides the
    folder images are looked up in (for coco: the folder holding ``train2014/``, ``val2014/``...).
    With ``check_images`` every image file must exist. Raises :class:`DataError` on any problem.
    """
    layout, path = _resolve(source)
    root = Path(image_root).expanduser() if image_root is not None else None
    records = _READERS[layout](path, root)
    if not records:
        raise DataError(f"{path}: no captioned images found")
    if split is not None:
        records = _select_split(path, records, split)
    if check_images:
        _check_images(path, records)
    return records


def available_splits(source: str | Path) -> list[str]:
    """Split names of a dataset, in the order train, restval, val, test, then others alphabetically."""
    layout, path = _resolve(source)
    return _split_names(_READERS[layout](path, None))


def detect_layout(source: str | Path) -> str:
    """Name of the layout of ``source`` (one of :data:`LAYOUTS`); raises :class:`DataError` if unknown."""
    return _resolve(source)[0]


# --------------------------------------------------------------------------- layout detection


def _resolve(source: str | Path) -> tuple[str, Path]:
    """Layout name and the path its reader takes (a folder, or the JSON file inside a folder)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"dataset path {path} does not exist")
    found = _detect_folder(path) if path.is_dir() else _detect_file(path)
    if found is None:
        raise DataError(
            f"cannot detect the dataset layout of {path}: expected a folder with captions.tsv and splits/ "
            f"(shared), {_FLICKR_TOKEN_FILE} (flickr8k-original), dataset_*.json (karpathy) or "
            "annotations/captions_*.json (coco), or a .csv, .jsonl, dataset_*.json or captions_*.json file"
        )
    return found


def _detect_folder(folder: Path) -> tuple[str, Path] | None:
    # Checked in this order, so a folder holding several layouts reads as the first one that matches.
    if (folder / "captions.tsv").is_file() and (folder / "splits").is_dir():
        return "shared", folder
    if _flickr_text_dir(folder) is not None:
        return "flickr8k-original", folder
    karpathy = sorted(folder.glob("dataset_*.json"))
    if len(karpathy) > 1:
        names = ", ".join(p.name for p in karpathy)
        raise DataError(f"{folder} holds several Karpathy files ({names}); pass one of them")
    if karpathy:
        return "karpathy", karpathy[0]
    if _coco_files_in(folder):
        return "coco", folder
    return None


def _detect_file(path: Path) -> tuple[str, Path] | None:
    name = path.name.lower()
    if name.endswith(".csv"):
        return "csv", path
    if name.endswith(".jsonl"):
        return "jsonl", path
    if name.startswith("dataset_") and name.endswith(".json"):
        return "karpathy", path
    if _COCO_FILE_RE.fullmatch(path.name):
        return "coco", path
    return None


# --------------------------------------------------------------------------- shared helpers


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


# --------------------------------------------------------------------------- split-file layouts


def _read_split_file(path: Path) -> list[tuple[int, str]]:
    seen: dict[str, int] = {}
    for number, line in _numbered_lines(path):
        name = line.strip()
        if name in seen:
            raise DataError(f"{path} line {number}: {name!r} already listed on line {seen[name]}")
        seen[name] = number
    return [(number, name) for name, number in seen.items()]


def _records_from_split_files(
    caption_file: Path, captions: dict[str, list[str]], split_files: dict[str, Path], image_dir: Path
) -> list[CaptionRecord]:
    """One record per line of each split file; captions of images in no split file are ignored."""
    records = []
    for split in sorted(split_files, key=_split_sort_key):
        split_file = split_files[split]
        for number, name in _read_split_file(split_file):
            texts = captions.get(name)
            if not texts:
                raise DataError(
                    f"{split_file} line {number}: image {name!r} has no captions in {caption_file}"
                )
            records.append(CaptionRecord(image_dir / name, tuple(texts), split))
    return records


def _read_shared_captions(path: Path) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    for number, line in _numbered_lines(path):
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise DataError(
                f"{path} line {number}: expected 3 tab-separated fields (image, caption_index, caption), "
                f"found {len(fields)}"
            )
        image, _index, text = fields  # file order is kept; the index only numbers the captions
        captions.setdefault(image.strip(), []).append(_caption(text, f"{path} line {number}"))
    return captions


def _read_shared(folder: Path, image_root: Path | None) -> list[CaptionRecord]:
    split_files: dict[str, Path] = {}
    for split_file in sorted((folder / "splits").glob("*.txt")):
        split = _normalize_split(split_file.stem)
        if split in split_files:
            raise DataError(f"{split_file} and {split_files[split]} are both split {split!r}")
        split_files[split] = split_file
    if not split_files:
        raise DataError(f"{folder / 'splits'} holds no split files (expected NAME.txt, e.g. train.txt)")
    caption_file = folder / "captions.tsv"
    captions = _read_shared_captions(caption_file)
    return _records_from_split_files(caption_file, captions, split_files, image_root or folder / "images")


def _flickr_text_dir(folder: Path) -> Path | None:
    for candidate in (folder, folder / "Flickr8k_text"):
        if (candidate / _FLICKR_TOKEN_FILE).is_file():
            return candidate
    return None


def _read_flickr_tokens(path: Path) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    for number, line in _numbered_lines(path):
        fields = line.split("\t", 1)
        if len(fields) != 2:
            raise DataError(f"{path} line {number}: expected 'image#index<TAB>caption'")
        # Keys look like "x.jpg#0". The real file also has "x.jpg.1#0" rows matching no image: they
        # are kept here under their own name and dropped later because no split file lists them.
        image = fields[0].strip().rsplit("#", 1)[0]
        captions.setdefault(image, []).append(_caption(fields[1], f"{path} line {number}"))
    return captions


def _read_flickr8k_original(folder: Path, image_root: Path | None) -> list[CaptionRecord]:
    text_dir = _flickr_text_dir(folder) or folder
    split_files = {s: text_dir / n for s, n in _FLICKR_SPLIT_FILES.items() if (text_dir / n).is_file()}
    if not split_files:
        expected = ", ".join(_FLICKR_SPLIT_FILES.values())
        raise DataError(f"{text_dir} has {_FLICKR_TOKEN_FILE} but no split files (expected {expected})")
    token_file = text_dir / _FLICKR_TOKEN_FILE
    captions = _read_flickr_tokens(token_file)
    image_dir = image_root or _first_existing_dir(folder, _FLICKR_IMAGE_DIRS, folder / _FLICKR_IMAGE_DIRS[0])
    return _records_from_split_files(token_file, captions, split_files, image_dir)


# --------------------------------------------------------------------------- JSON layouts


def _json_list(data: Any, key: str, path: Path) -> list[Any]:
    return _require(data, key, str(path), list)


def _karpathy_record(entry: Any, index: int, path: Path, root: Path) -> CaptionRecord:
    where = f"{path} images[{index}]"
    filename = _require(entry, "filename", where, str)
    split = _require(entry, "split", where, str)
    sentences = _require(entry, "sentences", where, list)
    if not sentences:
        raise DataError(f"{where}: image {filename!r} has no captions")
    texts = tuple(
        _caption(_require(s, "raw", f"{where}.sentences[{j}]", str), f"{where}.sentences[{j}]")
        for j, s in enumerate(sentences)
    )
    # Only the coco file has "filepath" (train2014/val2014); Path("x") / "" == Path("x").
    filepath = entry.get("filepath") or ""
    return CaptionRecord(root / filepath / filename, texts, _normalize_split(split))


def _read_karpathy(path: Path, image_root: Path | None) -> list[CaptionRecord]:
    images = _json_list(_load_json(path), "images", path)
    root = image_root or _first_existing_dir(path.parent, _KARPATHY_IMAGE_DIRS, path.parent)
    return [_karpathy_record(entry, i, path, root) for i, entry in enumerate(images)]


def _coco_files_in(folder: Path) -> list[Path]:
    files = sorted((folder / "annotations").glob("captions_*.json")) or sorted(folder.glob("captions_*.json"))
    return [f for f in files if _COCO_FILE_RE.fullmatch(f.name)]


def _coco_split_and_folder(path: Path) -> tuple[str, str]:
    """captions_val2014.json -> ("val", "val2014")."""
    match = _COCO_FILE_RE.fullmatch(path.name)
    if match is None:
        raise DataError(f"{path}: COCO caption files must be named like captions_val2014.json")
    return _normalize_split(match["split"]), match["folder"]


def _coco_file_names(path: Path, images: list[Any]) -> dict[Any, str]:
    names: dict[Any, str] = {}
    for i, image in enumerate(images):
        where = f"{path} images[{i}]"
        names[_require(image, "id", where, (int, str))] = _require(image, "file_name", where, str)
    return names


def _coco_captions(path: Path, annotations: list[Any]) -> dict[Any, list[str]]:
    captions: dict[Any, list[str]] = {}
    for i, annotation in enumerate(annotations):
        where = f"{path} annotations[{i}]"
        image_id = _require(annotation, "image_id", where, (int, str))
        captions.setdefault(image_id, []).append(_caption(_require(annotation, "caption", where, str), where))
    return captions


def _read_coco_file(path: Path, image_root: Path | None) -> list[CaptionRecord]:
    split, folder = _coco_split_and_folder(path)
    # Images of captions_val2014.json live in val2014/ next to the annotations/ folder.
    root = image_root or (path.parent.parent if path.parent.name == "annotations" else path.parent)
    image_dir = root / folder
    data = _load_json(path)
    names = _coco_file_names(path, _json_list(data, "images", path))
    captions = _coco_captions(path, _json_list(data, "annotations", path))
    records = []
    for image_id, name in names.items():  # captions of unlisted image ids are ignored
        if not captions.get(image_id):
            raise DataError(f"{path}: image {name!r} (id {image_id}) has no captions")
        records.append(CaptionRecord(image_dir / name, tuple(captions[image_id]), split))
    return records


def _read_coco(path: Path, image_root: Path | None) -> list[CaptionRecord]:
    if path.is_file():
        return _read_coco_file(path, image_root)
    files: dict[str, Path] = {}
    for file in _coco_files_in(path):
        split = _coco_split_and_folder(file)[0]
        if split in files:
            raise DataError(
                f"{path}: {files[split].name} and {file.name} are both split {split!r}; pass one file"
            )
        files[split] = file
    return [r for s in sorted(files, key=_split_sort_key) for r in _read_coco_file(files[s], image_root)]


# --------------------------------------------------------------------------- table layouts


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


_READERS: dict[str, Reader] = {
    "shared": _read_shared,
    "flickr8k-original": _read_flickr8k_original,
    "karpathy": _read_karpathy,
    "coco": _read_coco,
    "csv": _read_csv,
    "jsonl": _read_jsonl,
}
LAYOUTS: tuple[str, ...] = tuple(_READERS)
