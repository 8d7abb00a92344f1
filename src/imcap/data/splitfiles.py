"""Split-file layouts: the shared copy (captions.tsv, splits/, images/) and the official Flickr8k download."""

from __future__ import annotations

from pathlib import Path

from imcap.data.common import (
    CaptionRecord,
    DataError,
    _caption,
    _first_existing_dir,
    _normalize_split,
    _numbered_lines,
    _split_sort_key,
)

_FLICKR_TOKEN_FILE = "Flickr8k.token.txt"
_FLICKR_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# "Flicker" is the (misspelled) folder name inside the official Flickr8k_Dataset.zip.
_FLICKR_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "images")


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
