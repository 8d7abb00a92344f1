"""`imcap caption --tags K`: each image's top ImageNet tags in JSONL, CSV, sidecars and stdout, and resume.

The tiny models have no concept head (their results carry no tags), so the writers are tested on
hand-made CaptionResults and the command on the tiny model with tags added to its results; the shipped
model's own tags are checked end to end in test_cli.py.
"""

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

import imcap.batch
from imcap.captioner import Candidate, CaptionResult, Tag
from imcap.cli import app
from imcap.writers import CsvWriter, OutputError, StdoutWriter, get_writer

from .test_batch import jsonl_rows, make_photos, run

TAGS = [Tag("tabby", 0.81234), Tag("tiger cat", 0.10211), Tag("Egyptian cat", 0.05)]


def result(*texts: str, tags: list[Tag] = TAGS) -> CaptionResult:
    candidates = [
        Candidate(text, -1.0 - i, -8.0 - i) for i, text in enumerate(texts or ["A cat sits on a car."])
    ]
    return CaptionResult(candidates[0].text, candidates, tags=list(tags))


# --- the writers, on hand-made results -------------------------------------------------------------------


def test_jsonl_rows_list_the_top_k_tags_and_record_k(tmp_path):
    out = tmp_path / "out.jsonl"
    with get_writer(out, model="m", settings={"num_beams": 3}, tags=2) as writer:
        writer.write([("a.jpg", result()), ("b.jpg", result(tags=[]))])
    first, second = jsonl_rows(out)
    assert list(first) == ["path", "caption", "score", "logprob", "candidates", "tags", "model", "settings"]
    assert first["tags"] == [{"label": "tabby", "score": 0.8123}, {"label": "tiger cat", "score": 0.1021}]
    assert first["settings"] == {"num_beams": 3, "tags": 2}
    assert second["tags"] == []  # a model without a concept head


def test_csv_rows_get_one_tags_cell_as_taggers_write_it(tmp_path):
    out = tmp_path / "out.csv"
    with get_writer(out, model="m", settings={}, tags=5) as writer:
        writer.write([("a.jpg", result())])
    with open(out, newline="") as file:
        [row] = list(csv.DictReader(file))
    assert list(row) == CsvWriter.TAGGED_COLUMNS
    assert row["tags"] == "tabby:0.8123, tiger cat:0.1021, Egyptian cat:0.05"
    assert json.loads(row["settings"]) == {"tags": 5}


def test_without_tags_every_output_is_as_before(tmp_path):
    stream = io.StringIO()
    with get_writer(tmp_path / "out.jsonl", model="m", settings={}) as writer:
        writer.write([("a.jpg", result())])
    with get_writer(tmp_path / "out.csv", model="m", settings={}) as writer:
        writer.write([("a.jpg", result())])
    get_writer(sidecar=".txt").write([(str(tmp_path / "a.jpg"), result())])
    StdoutWriter(stream).write([("a.jpg", result())])
    [row] = jsonl_rows(tmp_path / "out.jsonl")
    assert "tags" not in row and row["settings"] == {}
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == ",".join(CsvWriter.COLUMNS)
    assert (tmp_path / "a.txt").read_text() == "A cat sits on a car."
    assert stream.getvalue() == "a.jpg\tA cat sits on a car.\n"


def test_sidecar_lines_end_with_lowercased_labels(tmp_path):
    with get_writer(sidecar=".txt", tags=5) as writer:  # more than the result has: all of them
        writer.write([(str(tmp_path / "a.jpg"), result("photo of a cat, 4k", "photo of a dog, 4k"))])
        writer.write([(str(tmp_path / "b.jpg"), result(tags=[]))])
    assert (tmp_path / "a.txt").read_text().splitlines() == [
        "photo of a cat, 4k, tabby, tiger cat, egyptian cat",
        "photo of a dog, 4k, tabby, tiger cat, egyptian cat",
    ]
    assert (tmp_path / "b.txt").read_text() == "A cat sits on a car."  # no head: no dangling comma


def test_stdout_lines_get_a_third_column():
    stream = io.StringIO()
    StdoutWriter(stream, tags=2).write([("a.jpg", result("A cat.", "A dog.")), ("b.jpg", result(tags=[]))])
    assert stream.getvalue() == (
        "a.jpg\tA cat.\ttabby, tiger cat\na.jpg\tA dog.\ttabby, tiger cat\nb.jpg\tA cat sits on a car.\t\n"
    )


def test_a_csv_header_of_another_tags_setting_is_not_appended_to(tmp_path):
    out = tmp_path / "out.csv"
    get_writer(out, model="m").close()  # a run whose images all failed: a header, no rows
    with pytest.raises(OutputError, match="columns of a run without --tags; pass --overwrite"):
        get_writer(out, model="m", tags=2)
    with get_writer(out, model="m", tags=2, overwrite=True):
        pass
    assert out.read_text().splitlines() == [",".join(CsvWriter.TAGGED_COLUMNS)]


# --- the command, on the tiny model with tags added ------------------------------------------------------


@pytest.fixture
def tagged(monkeypatch):
    """Every result `imcap caption` writes carries TAGS (the tiny model has no concept head)."""
    real = imcap.batch.caption_batches

    def with_tags(*args, **kwargs):
        for batch in real(*args, **kwargs):
            yield replace(batch, results=[replace(r, tags=TAGS) for r in batch.results])

    monkeypatch.setattr(imcap.batch, "caption_batches", with_tags)


@pytest.fixture
def photos(tmp_path) -> Path:
    make_photos(tmp_path / "photos", 6)
    return tmp_path / "photos"


def test_jsonl_with_tags_resumes_and_refuses_another_k(tagged, tiny_model_dir, photos, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run(photos, "-o", out, "--tags", "2", model=tiny_model_dir).exit_code == 0
    complete = out.read_text()
    two = [{"label": "tabby", "score": 0.8123}, {"label": "tiger cat", "score": 0.1021}]
    assert [row["tags"] for row in jsonl_rows(out)] == [two] * 6
    out.write_text("".join(complete.splitlines(keepends=True)[:4]))
    resumed = run(photos, "-o", out, "--tags", "2", model=tiny_model_dir)
    assert resumed.exit_code == 0 and "captioned 2, skipped 4 (already done)" in resumed.stderr
    assert out.read_text() == complete
    for args, change in ((["--tags", "3"], "tags 2 -> 3"), ([], "tags 2 -> None")):
        refused = run(photos, "-o", out, *args, model=tiny_model_dir)
        assert refused.exit_code == 2 and f"other settings ({change})" in refused.stderr
        assert len(refused.stderr.splitlines()) == 1 and out.read_text() == complete


def test_csv_with_tags_resumes_and_a_plain_csv_is_not_mixed_in(tagged, tiny_model_dir, photos, tmp_path):
    out = tmp_path / "out.csv"
    assert run(photos, "-o", out, "--tags", "1", model=tiny_model_dir).exit_code == 0
    with open(out, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["tags"] for row in rows] == ["tabby:0.8123"] * 6
    assert "captioned 0, skipped 6" in run(photos, "-o", out, "--tags", "1", model=tiny_model_dir).stderr
    plain = tmp_path / "plain.csv"
    assert run(photos, "-o", plain, model=tiny_model_dir).exit_code == 0
    refused = run(photos, "-o", plain, "--tags", "1", model=tiny_model_dir)
    assert refused.exit_code == 2 and "other settings (tags None -> 1)" in refused.stderr


def test_sidecars_and_stdout_with_tags(tagged, tiny_model_dir, photos):
    shown = run(photos, "--tags", "2", model=tiny_model_dir)
    assert shown.exit_code == 0
    lines = [line.split("\t") for line in shown.stdout.splitlines()]
    assert [path for path, _, _ in lines] == [str(p) for p in sorted(photos.iterdir())]
    assert {labels for _, _, labels in lines} == {"tabby, tiger cat"}
    captions = {path: caption for path, caption, _ in lines}
    result = run(photos, "--sidecar", "--prefix", "photo of ", "--tags", "3", model=tiny_model_dir)
    assert result.exit_code == 0 and result.stdout == ""
    for image in sorted(photos.glob("*.png")):
        # the caption's full stop would sit oddly before the tags: it goes
        expected = f"photo of {captions[str(image)].rstrip('.')}, tabby, tiger cat, egyptian cat"
        assert image.with_suffix(".txt").read_text() == expected


@pytest.mark.parametrize("value", ["-1", "21"])
def test_tags_out_of_range_fail_in_one_line(photos, value):
    result = CliRunner().invoke(app, ["caption", str(photos), "--tags", value, "--model", "./no/model"])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr == f"error: --tags must be in 0..20 (0: no tags), got {value}\n"


def test_no_guide_is_a_decoding_setting(tiny_model_dir, photos, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run(photos, "-o", out, model=tiny_model_dir).exit_code == 0
    assert {row["settings"]["guide"] for row in jsonl_rows(out)} == {True}
    unguided = tmp_path / "unguided.jsonl"
    assert run(photos, "-o", unguided, "--no-guide", model=tiny_model_dir).exit_code == 0
    assert {row["settings"]["guide"] for row in jsonl_rows(unguided)} == {False}
    refused = run(photos, "-o", out, "--no-guide", model=tiny_model_dir)
    assert refused.exit_code == 2 and "other settings (guide True -> False)" in refused.stderr
