"""JSON layouts: Karpathy's dataset_*.json files and COCO's captions_*.json annotations."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from imcap.data.common import (
    CaptionRecord,
    DataError,
    _caption,
    _first_existing_dir,
    _load_json,
    _normalize_split,
    _require,
    _split_sort_key,
)

_KARPATHY_IMAGE_DIRS = ("images", "Flicker8k_Dataset", "flickr30k-images")
_COCO_FILE_RE = re.compile(r"captions_(?P<folder>(?P<split>[A-Za-z]+)\w*)\.json")


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
