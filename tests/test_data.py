"""Tests for imcap.data: one tiny fixture per dataset layout, built in tmp_path."""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imcap.data import (
    LAYOUTS,
    CaptionRecord,
    DataError,
    available_splits,
    detect_layout,
    load_records,
)

REAL_FLICKR8K = Path("/work/shared/datasets/flickr8k")


# --------------------------------------------------------------------------- fixture helpers


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


# --------------------------------------------------------------------------- shared layout


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


# --------------------------------------------------------------------------- flickr8k original


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


# --------------------------------------------------------------------------- karpathy


def make_karpathy_flickr(root: Path) -> Path:
    images = [
        karpathy_image("1_a.jpg", "train", "A dog runs .", " A dog is running . "),
        karpathy_image("2_b.jpg", "val", "A cat ."),
        karpathy_image("3_c.jpg", "test", "A bird ."),
    ]
    write_images(root / "Flicker8k_Dataset", "1_a.jpg", "2_b.jpg", "3_c.jpg")
    return write_json(root / "dataset_flickr8k.json", {"images": images, "dataset": "flickr8k"})


def test_karpathy_flickr_file_and_folder(tmp_path: Path) -> None:
    path = make_karpathy_flickr(tmp_path)
    for source in (path, tmp_path):
        assert detect_layout(source) == "karpathy"
        records = load_records(source)
        assert [(r.image.name, r.split) for r in records] == [
            ("1_a.jpg", "train"),
            ("2_b.jpg", "val"),
            ("3_c.jpg", "test"),
        ]
        assert records[0].captions == ("A dog runs .", "A dog is running .")
        assert records[0].image == tmp_path / "Flicker8k_Dataset" / "1_a.jpg"
    assert available_splits(path) == ["train", "val", "test"]


def test_karpathy_coco_filepath_and_restval(tmp_path: Path) -> None:
    images = [
        karpathy_image("COCO_val2014_1.jpg", "restval", "One .", filepath="val2014"),
        karpathy_image("COCO_train2014_2.jpg", "train", "Two .", filepath="train2014"),
    ]
    path = write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
    write_images(tmp_path, "val2014/COCO_val2014_1.jpg", "train2014/COCO_train2014_2.jpg")
    records = load_records(path)
    assert [r.image for r in records] == [
        tmp_path / "val2014/COCO_val2014_1.jpg",
        tmp_path / "train2014/COCO_train2014_2.jpg",
    ]
    assert available_splits(path) == ["train", "restval"]
    assert names(load_records(path, "restval")) == ["COCO_val2014_1.jpg"]


def test_karpathy_image_root_override(tmp_path: Path) -> None:
    path = make_karpathy_flickr(tmp_path / "meta")
    write_images(tmp_path / "elsewhere", "1_a.jpg", "2_b.jpg", "3_c.jpg")
    records = load_records(path, "train", image_root=tmp_path / "elsewhere")
    assert [r.image for r in records] == [tmp_path / "elsewhere" / "1_a.jpg"]


def test_karpathy_malformed_json(tmp_path: Path) -> None:
    path = write_text(tmp_path / "dataset_flickr8k.json", '{"images": [\n  {"filename": }\n]}')
    raises(lambda: load_records(path), "malformed JSON", str(path), "line 2 column")


def test_karpathy_missing_key_and_empty_caption(tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "dataset_flickr8k.json", {"images": [{"filename": "a.jpg", "split": "train"}]}
    )
    raises(lambda: load_records(path), str(path), "images[0]", "'sentences'")
    write_json(path, {"images": [karpathy_image("a.jpg", "train", "ok", "  ")]})
    raises(lambda: load_records(path), str(path), "images[0].sentences[1]", "empty caption")
    write_json(path, {"images": [karpathy_image("a.jpg", "train")]})
    raises(lambda: load_records(path), "'a.jpg' has no captions")


# --------------------------------------------------------------------------- coco captions


def make_coco(root: Path) -> Path:
    write_json(
        root / "annotations" / "captions_val2014.json",
        coco_json((7, "v7.jpg", ["Seven ."]), (3, "v3.jpg", ["Three .", "Tres ."])),
    )
    write_json(root / "annotations" / "captions_train2014.json", coco_json((1, "t1.jpg", ["One ."])))
    write_images(root / "val2014", "v7.jpg", "v3.jpg")
    write_images(root / "train2014", "t1.jpg")
    return root


def test_coco_file(tmp_path: Path) -> None:
    path = make_coco(tmp_path) / "annotations" / "captions_val2014.json"
    assert detect_layout(path) == "coco"
    records = load_records(path)
    assert [(r.image, r.split) for r in records] == [
        (tmp_path / "val2014/v7.jpg", "val"),
        (tmp_path / "val2014/v3.jpg", "val"),
    ]
    assert records[1].captions == ("Three .", "Tres .")
    raises(lambda: load_records(path, "train"), "unknown split 'train'", "available splits: val")


def test_coco_folder(tmp_path: Path) -> None:
    root = make_coco(tmp_path)
    assert detect_layout(root) == "coco"
    assert available_splits(root) == ["train", "val"]
    assert names(load_records(root)) == ["t1.jpg", "v7.jpg", "v3.jpg"]
    assert names(load_records(root, "validation")) == ["v7.jpg", "v3.jpg"]


def test_coco_2017_file_next_to_images(tmp_path: Path) -> None:
    path = write_json(tmp_path / "captions_train2017.json", coco_json((5, "x.jpg", ["Five ."])))
    write_images(tmp_path / "train2017", "x.jpg")
    assert [(r.image, r.split) for r in load_records(path)] == [(tmp_path / "train2017/x.jpg", "train")]


def test_coco_image_without_captions_and_missing_caption_key(tmp_path: Path) -> None:
    data = coco_json((1, "a.jpg", ["A ."]), (2, "b.jpg", []))
    path = write_json(tmp_path / "captions_val2014.json", data)
    raises(lambda: load_records(path, check_images=False), str(path), "'b.jpg' (id 2) has no captions")
    data["annotations"].append({"image_id": 1})
    write_json(path, data)
    raises(lambda: load_records(path, check_images=False), str(path), "annotations[1]", "'caption'")


# --------------------------------------------------------------------------- csv / jsonl


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


# --------------------------------------------------------------------------- detection errors


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


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not REAL_FLICKR8K.is_dir(), reason="shared Flickr8k folder not present")
def test_real_flickr8k() -> None:
    train = load_records(REAL_FLICKR8K, "train")
    val = load_records(REAL_FLICKR8K, "val")
    assert (len(train), len(val)) == (6000, 1000)
    assert all(len(r.captions) == 5 for r in train + val)
    assert names(val) == (REAL_FLICKR8K / "splits" / "val.txt").read_text().split()
