"""imcap.data: finding a dataset's layout, its errors, and the real Flickr8k copy (each layout's reader:
test_data_splitfiles.py, test_data_jsonfiles.py, test_data_tables.py)."""

from __future__ import annotations

from pathlib import Path

from imcap.data import LAYOUTS, DataError, detect_layout, load_records

from .data_helpers import (
    names,
    raises,
    write_text,
)

# --- detection errors ---------------------------------------------------------------------------------------


def test_missing_source(tmp_path: Path) -> None:
    raises(lambda: load_records(tmp_path / "nope"), str(tmp_path / "nope"), "does not exist")


def test_undetectable_layout(tmp_path: Path) -> None:
    write_text(tmp_path / "notes.txt", "hello")
    raises(
        lambda: detect_layout(tmp_path), str(tmp_path), "captions.tsv", "Flickr8k.token.txt", "dataset_*.json"
    )
    raises(lambda: load_records(tmp_path / "notes.txt"), "notes.txt", "cannot detect")


def test_layout_names_and_error_type() -> None:
    assert LAYOUTS == ("shared", "flickr8k-original", "karpathy", "coco", "csv", "jsonl")
    assert issubclass(DataError, ValueError)
    assert str(DataError("a\nb")) == "a b"


# --- the real Flickr8k copy ---------------------------------------------------------------------------------


def test_real_flickr8k(flickr8k: Path) -> None:
    train = load_records(flickr8k, "train")
    val = load_records(flickr8k, "val")
    assert (len(train), len(val)) == (6000, 1000)
    assert all(len(r.captions) == 5 for r in train + val)
    assert names(val) == (flickr8k / "splits" / "val.txt").read_text().split()
