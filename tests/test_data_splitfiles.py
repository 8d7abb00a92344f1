"""imcap.data.splitfiles: the shared layout (captions.tsv + splits/) and the original Flickr8k text files."""

from __future__ import annotations

from pathlib import Path

import pytest

from imcap.data import available_splits, detect_layout, load_records

from .data_helpers import (
    FLICKR_TOKENS,
    make_flickr_original,
    make_shared,
    names,
    raises,
    write_text,
)

# --- the shared layout --------------------------------------------------------------------------------------


def test_shared_records_in_split_file_order(tmp_path: Path) -> None:
    root = make_shared(tmp_path)
    records = load_records(root)
    assert detect_layout(root) == "shared"
    assert [(r.image.name, r.split) for r in records] == [
        ("c.jpg", "train"),
        ("a.jpg", "train"),
        ("b.jpg", "val"),
    ]
    assert records[0].image == root / "images" / "c.jpg"
    assert records[1].captions == ("A zero .", "A one")
    assert available_splits(root) == ["train", "val"]


@pytest.mark.parametrize("alias", ["val", "dev", "valid", "validation", "VAL"])
def test_split_aliases_are_val(tmp_path: Path, alias: str) -> None:
    records = load_records(make_shared(tmp_path), alias)
    assert [(r.image.name, r.split) for r in records] == [("b.jpg", "val")]


def test_unknown_split_lists_available(tmp_path: Path) -> None:
    raises(lambda: load_records(make_shared(tmp_path), "test"), str(tmp_path), "'test'", "train, val")


def test_shared_missing_images_reports_first_and_count(tmp_path: Path) -> None:
    root = make_shared(tmp_path)
    (root / "images" / "a.jpg").unlink()
    (root / "images" / "b.jpg").unlink()
    raises(lambda: load_records(root), "2 of 3", str(root / "images" / "a.jpg"))
    assert len(load_records(root, check_images=False)) == 3
    assert names(load_records(root, "train", check_images=False)) == ["c.jpg", "a.jpg"]


def test_missing_image_folder_is_named(tmp_path: Path) -> None:
    root = make_shared(tmp_path)
    raises(lambda: load_records(root, image_root=tmp_path / "nowhere"), "3 of 3", "nowhere does not exist")


def test_shared_empty_caption_names_line(tmp_path: Path) -> None:
    root = make_shared(tmp_path, extra_tsv="a.jpg\t2\t   \n")
    raises(lambda: load_records(root), "captions.tsv line 6", "empty caption")


def test_shared_wrong_field_count(tmp_path: Path) -> None:
    root = make_shared(tmp_path, extra_tsv="a.jpg\tjust a caption\n")
    raises(lambda: load_records(root), "captions.tsv line 6", "expected 3 tab-separated fields")


def test_shared_split_image_without_captions(tmp_path: Path) -> None:
    root = make_shared(tmp_path)
    write_text(root / "splits" / "test.txt", "b.jpg\nlonely.jpg\n")
    raises(lambda: load_records(root), "test.txt line 2", "'lonely.jpg' has no captions", "captions.tsv")


def test_shared_duplicate_split_files(tmp_path: Path) -> None:
    root = make_shared(tmp_path)
    write_text(root / "splits" / "val.txt", "b.jpg\n")
    raises(lambda: load_records(root), "dev.txt", "val.txt", "both split 'val'")


def test_split_file_duplicate_line(tmp_path: Path) -> None:
    root = make_shared(tmp_path)
    write_text(root / "splits" / "train.txt", "c.jpg\n\na.jpg\nc.jpg\n")
    raises(lambda: load_records(root), "train.txt line 4", "'c.jpg' already listed on line 1")


# --- the original Flickr8k files ----------------------------------------------------------------------------


def test_flickr_original_skips_quirk_rows(tmp_path: Path) -> None:
    root = make_flickr_original(tmp_path)
    assert detect_layout(root) == "flickr8k-original"
    records = load_records(root)
    assert [(r.image.name, r.split) for r in records] == [
        ("2_b.jpg", "train"),
        ("1_a.jpg", "train"),
        ("3_c.jpg", "val"),
    ]
    assert records[1].captions == ("A dog runs .", "A dog is running .")
    assert records[0].image == root / "Flicker8k_Dataset" / "2_b.jpg"
    assert available_splits(root) == ["train", "val"]  # the test file is empty here


def test_flickr_original_text_subfolder_and_images_folder(tmp_path: Path) -> None:
    root = make_flickr_original(tmp_path, text_dir="Flickr8k_text", image_dir="images")
    assert detect_layout(root) == "flickr8k-original"
    records = load_records(root, "dev")
    assert [r.image for r in records] == [root / "images" / "3_c.jpg"]


def test_flickr_original_split_image_without_captions(tmp_path: Path) -> None:
    root = make_flickr_original(tmp_path)
    write_text(root / "Flickr_8k.testImages.txt", "9_z.jpg\n")
    raises(lambda: load_records(root), "Flickr_8k.testImages.txt line 1", "'9_z.jpg' has no captions")


def test_flickr_original_without_split_files(tmp_path: Path) -> None:
    write_text(tmp_path / "Flickr8k.token.txt", FLICKR_TOKENS)
    raises(lambda: load_records(tmp_path), str(tmp_path), "no split files", "Flickr_8k.trainImages.txt")
