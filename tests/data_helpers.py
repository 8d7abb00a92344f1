"""What the dataset-reader tests share: tiny image files, text and JSON files, and one fixture per layout,
built in a test's tmp_path."""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imcap.data import CaptionRecord, DataError


@functools.cache
def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_images(folder: Path, *names: str) -> None:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg_bytes())


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data))


def raises(func: Callable[[], Any], *parts: str) -> str:
    """Run func, expect a one-line DataError containing every part; return the message."""
    with pytest.raises(DataError) as info:
        func()
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def names(records: list[CaptionRecord]) -> list[str]:
    return [r.image.name for r in records]


def make_shared(root: Path, *, extra_tsv: str = "") -> Path:
    write_images(root / "images", "a.jpg", "b.jpg", "c.jpg")
    rows = ["c.jpg\t0\tC zero .", "a.jpg\t0\t  A zero . ", "a.jpg\t1\tA one", "b.jpg\t0\tB zero"]
    rows += ["orphan.jpg\t0\tnot in any split"]
    write_text(root / "captions.tsv", "\n".join(rows) + "\n" + extra_tsv)
    write_text(root / "splits" / "train.txt", "c.jpg\na.jpg\n")
    write_text(root / "splits" / "dev.txt", "b.jpg\n")
    return root


FLICKR_TOKENS = (
    "1_a.jpg#0\tA dog runs .\n"
    "1_a.jpg#1\tA dog is running .\n"
    "2_b.jpg#0\tA cat sits .\n"
    "3_c.jpg#0\tA bird flies .\n"
    "2258277193_586949ec62.jpg.1#0\tQuirk row matching no image .\n"
)


def make_flickr_original(root: Path, text_dir: str = "", image_dir: str = "Flicker8k_Dataset") -> Path:
    text = root / text_dir
    write_text(text / "Flickr8k.token.txt", FLICKR_TOKENS)
    write_text(text / "Flickr_8k.trainImages.txt", "2_b.jpg\n1_a.jpg\n")
    write_text(text / "Flickr_8k.devImages.txt", "3_c.jpg\n")
    write_text(text / "Flickr_8k.testImages.txt", "")
    write_images(root / image_dir, "1_a.jpg", "2_b.jpg", "3_c.jpg")
    return root


def karpathy_image(filename: str, split: str, *raws: str, filepath: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"filename": filename, "split": split}
    entry["sentences"] = [{"raw": raw, "tokens": raw.lower().split()} for raw in raws]
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


def coco_json(*images: tuple[int, str, list[str]]) -> dict[str, Any]:
    annotations = [
        {"image_id": i, "id": 100 * i + k, "caption": c} for i, _, cs in images for k, c in enumerate(cs)
    ]
    return {"images": [{"id": i, "file_name": f} for i, f, _ in images], "annotations": annotations}
