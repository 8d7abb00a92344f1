"""imcap.data.tables: CSV and JSONL tables of image paths and captions."""

from __future__ import annotations

import json
from pathlib import Path

from imcap.data import CaptionRecord, available_splits, detect_layout, load_records

from .data_helpers import (
    names,
    raises,
    write_images,
    write_text,
)

# --- CSV / JSONL --------------------------------------------------------------------------------------------


def test_csv_with_split_merges_rows(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", "a.jpg", "b.jpg")
    text = 'file_name,Caption,split\nimgs/b.jpg,B one,dev\nimgs/a.jpg,A one,train\nimgs/b.jpg," B two ",dev\n'
    path = write_text(tmp_path / "data.csv", text)
    assert detect_layout(path) == "csv"
    records = load_records(path)
    assert records == [
        CaptionRecord(tmp_path / "imgs/b.jpg", ("B one", "B two"), "val"),
        CaptionRecord(tmp_path / "imgs/a.jpg", ("A one",), "train"),
    ]
    assert available_splits(path) == ["train", "val"]


def test_csv_without_split_column(tmp_path: Path) -> None:
    absolute = tmp_path / "abs" / "z.jpg"
    write_images(tmp_path, "a.jpg", "abs/z.jpg")
    path = write_text(tmp_path / "data.csv", f"image,text\na.jpg,one\n{absolute},zed\na.jpg,two\n")
    records = load_records(path)
    assert [(r.image, r.captions, r.split) for r in records] == [
        (tmp_path / "a.jpg", ("one", "two"), "all"),
        (absolute, ("zed",), "all"),
    ]
    raises(lambda: load_records(path, "train"), str(path), "has no split column")


def test_csv_errors(tmp_path: Path) -> None:
    path = write_text(tmp_path / "data.csv", "image,label\na.jpg,x\n")
    raises(lambda: load_records(path), str(path), "no caption column", "label")
    write_text(path, "path,caption\na.jpg,x\n")
    raises(lambda: load_records(path), "no image column")
    write_text(path, "image,caption\na.jpg,x\nb.jpg,  \n")
    raises(lambda: load_records(path), f"{path} line 3", "empty caption")
    write_text(path, "image,caption\n")
    raises(lambda: load_records(path), str(path), "no captioned images")


def test_csv_image_in_two_splits(tmp_path: Path) -> None:
    path = write_text(tmp_path / "data.csv", "image,caption,split\na.jpg,x,train\na.jpg,y,test\n")
    raises(lambda: load_records(path, check_images=False), f"{path} line 3", "'test'", "'train' on line 2")


def test_jsonl_string_and_list_captions(tmp_path: Path) -> None:
    write_images(tmp_path, "a.jpg", "b.jpg")
    lines = [
        {"image": "a.jpg", "caption": "A one", "split": "train"},
        {"image_path": "b.jpg", "captions": ["B one", "B two"], "split": "valid"},
        {"image": "a.jpg", "caption": ["A two"], "split": "train"},
    ]
    path = write_text(tmp_path / "data.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert detect_layout(path) == "jsonl"
    assert load_records(path) == [
        CaptionRecord(tmp_path / "a.jpg", ("A one", "A two"), "train"),
        CaptionRecord(tmp_path / "b.jpg", ("B one", "B two"), "val"),
    ]
    assert names(load_records(path, "val")) == ["b.jpg"]


def test_jsonl_errors(tmp_path: Path) -> None:
    path = write_text(tmp_path / "data.jsonl", '{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", \n')
    raises(lambda: load_records(path), "malformed JSON", f"{path} line 2", "column")
    write_text(path, '{"image": "a.jpg", "caption": []}\n')
    raises(lambda: load_records(path), f"{path} line 1", "non-empty list")
    write_text(
        path, '{"image": "a.jpg", "caption": "x", "split": "train"}\n{"image": "b.jpg", "caption": "y"}\n'
    )
    raises(lambda: load_records(path), f"{path} line 2", "missing split")
    write_text(path, '{"image": "a.jpg", "caption": "x"}\n')
    assert available_splits(path) == ["all"]
    raises(lambda: load_records(path), "1 of 1", str(tmp_path / "a.jpg"))
