"""imcap.data.jsonfiles: Karpathy split files and COCO caption annotations."""

from __future__ import annotations

from pathlib import Path

from imcap.data import available_splits, detect_layout, load_records

from .data_helpers import (
    coco_json,
    karpathy_image,
    names,
    raises,
    write_images,
    write_json,
    write_text,
)

# --- Karpathy -----------------------------------------------------------------------------------------------


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


# --- COCO captions ------------------------------------------------------------------------------------------


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
