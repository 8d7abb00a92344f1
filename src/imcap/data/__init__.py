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
The readers live one module per kind of layout (``splitfiles``, ``jsonfiles``, ``tables``), on what
``common`` shares; this module detects the layout and selects splits.
"""

from __future__ import annotations

from pathlib import Path

from imcap.data.common import (
    ALL_SPLIT,
    CaptionRecord,
    DataError,
    Reader,
    _check_images,
    _select_split,
    _split_names,
)
from imcap.data.jsonfiles import _COCO_FILE_RE, _coco_files_in, _read_coco, _read_karpathy
from imcap.data.splitfiles import _FLICKR_TOKEN_FILE, _flickr_text_dir, _read_flickr8k_original, _read_shared
from imcap.data.tables import _read_csv, _read_jsonl

__all__ = [
    "ALL_SPLIT",
    "LAYOUTS",
    "CaptionRecord",
    "DataError",
    "available_splits",
    "detect_layout",
    "load_records",
]


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


_READERS: dict[str, Reader] = {
    "shared": _read_shared,
    "flickr8k-original": _read_flickr8k_original,
    "karpathy": _read_karpathy,
    "coco": _read_coco,
    "csv": _read_csv,
    "jsonl": _read_jsonl,
}
LAYOUTS: tuple[str, ...] = tuple(_READERS)
