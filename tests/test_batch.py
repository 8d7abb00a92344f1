"""Batch captioning: file discovery, JSONL/CSV/sidecar outputs, resume (also after SIGKILL), exit codes."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imcap.batch import find_images
from imcap.cli import app
from imcap.writers import OutputError, get_writer, sidecar_clashes

from .corpus import build_corpus

IMCAP = Path(sys.executable).parent / "imcap"


def make_photos(folder: Path, count: int, suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    paths = []
    for i in range(count):
        picture = np.empty((48, 64, 3), np.uint8)
        picture[:] = rng.integers(0, 256, 3)
        picture[:24, :32] = rng.integers(0, 256, 3)
        paths.append(folder / f"photo_{i:02d}{suffix}")
        Image.fromarray(picture).save(paths[-1])
    return paths


@pytest.fixture
def photos(tmp_path) -> Path:
    make_photos(tmp_path / "photos", 10)
    return tmp_path / "photos"


def run(*args, model: Path):
    return CliRunner().invoke(app, ["caption", *map(str, args), "--model", str(model), "--max-length", "6"])


def jsonl_rows(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_find_images_sorts_skips_hidden_and_other_files_and_recurses(tmp_path):
    make_photos(tmp_path / "a", 3, ".jpg")
    make_photos(tmp_path / "a" / "sub", 2)
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / "._photo_00.jpg").write_bytes(b"macOS resource fork")
    flat = find_images([tmp_path / "a"])
    assert [p.name for p in flat] == ["photo_00.jpg", "photo_01.jpg", "photo_02.jpg"]
    deep = find_images([tmp_path / "a"], recursive=True)
    assert [p.relative_to(tmp_path / "a").as_posix() for p in deep][3:] == [
        "sub/photo_00.png",
        "sub/photo_01.png",
    ]
    again = find_images([tmp_path / "a", str(tmp_path / "a" / "*.jpg"), tmp_path / "a" / "photo_01.jpg"])
    assert again == flat  # each file once
    assert find_images([str(tmp_path / "**" / "*.png")], recursive=True) == deep[3:]
    for missing in (tmp_path / "nope.jpg", str(tmp_path / "*.gif")):
        with pytest.raises(FileNotFoundError):
            find_images([missing])


def test_jsonl_rows_carry_path_captions_scores_model_and_settings(tiny_model_dir, photos, tmp_path):
    out = tmp_path / "out.jsonl"
    result = run(photos, "--output", out, "--beams", "2", "--num-captions", "2", model=tiny_model_dir)
    assert result.exit_code == 0, result.output
    rows = jsonl_rows(out)
    assert [row["path"] for row in rows] == [str(p) for p in sorted(photos.iterdir())]
    row = rows[0]
    assert row["model"] == str(tiny_model_dir)
    assert row["settings"]["num_beams"] == 2 and row["settings"]["max_new_tokens"] == 6
    assert list(row) == ["path", "caption", "score", "logprob", "candidates", "model", "settings"]
    assert len(row["candidates"]) == 2 and row["candidates"][0] == {
        "text": row["caption"],
        "score": row["score"],
        "logprob": row["logprob"],
    }
    assert row["logprob"] < row["score"] < 0  # the score is per token (max-length 6: several tokens)
    assert row["candidates"][0]["score"] >= row["candidates"][1]["score"]
    assert "captioned 10, skipped 0 (already done), failed 0" in result.stderr
    assert "images/s" in result.stderr  # the summary's rate
    assert "\r" not in result.stderr  # stderr is not a terminal: no progress bar, only whole lines
    assert result.stdout == ""


def test_csv_rows(tiny_model_dir, photos, tmp_path):
    out = tmp_path / "out.csv"
    assert run(photos, "-o", out, "--prefix", "sks, ", model=tiny_model_dir).exit_code == 0
    with open(out, newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 10 and list(rows[0]) == [
        "path",
        "caption",
        "score",
        "logprob",
        "candidates",
        "model",
        "settings",
    ]
    assert all(row["caption"].startswith("sks, ") for row in rows)
    assert json.loads(rows[0]["candidates"])[0]["text"] == rows[0]["caption"]
    assert json.loads(rows[0]["settings"])["prefix"] == "sks, "


def test_stdout_keeps_path_tab_caption_lines(tiny_model_dir, photos):
    result = run(photos, model=tiny_model_dir)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in sorted(photos.iterdir())]


def test_sidecars_with_prefix_and_suffix_then_resume_and_overwrite(tiny_model_dir, photos, tmp_path):
    out = tmp_path / "check.jsonl"
    run(photos, "-o", out, model=tiny_model_dir)
    captions = {Path(row["path"]).stem: row["caption"] for row in jsonl_rows(out)}
    result = run(photos, "--sidecar", "--prefix", "photo of ", "--suffix", ", 4k", model=tiny_model_dir)
    assert result.exit_code == 0 and result.stdout == ""
    for image in photos.glob("*.png"):
        assert image.with_suffix(".txt").read_text() == f"photo of {captions[image.stem]}, 4k"
    assert not list(photos.glob(".*"))  # no temporary files left behind
    (photos / "photo_03.txt").unlink()
    resumed = run(photos, "--sidecar", model=tiny_model_dir)
    assert "captioned 1, skipped 9 (already done)" in resumed.stderr
    assert (photos / "photo_03.txt").read_text() == captions["photo_03"]  # no prefix this time
    redone = run(
        photos,
        "--sidecar",
        "--sidecar-ext",
        ".caption",
        "--overwrite",
        "--num-captions",
        "2",
        model=tiny_model_dir,
    )
    assert "captioned 10, skipped 0" in redone.stderr
    assert len((photos / "photo_00.caption").read_text().splitlines()) == 2


def test_sidecar_clashes_are_refused(tmp_path):
    make_photos(tmp_path, 1, ".jpg")
    make_photos(tmp_path, 1, ".png")
    assert sidecar_clashes(find_images([tmp_path]), ".txt") == [
        (tmp_path / "photo_00.jpg", tmp_path / "photo_00.png")
    ]
    result = CliRunner().invoke(app, ["caption", str(tmp_path), "--sidecar", "--model", "./no/model"])
    assert result.exit_code == 2 and "would share one sidecar file" in result.stderr


def test_resume_cuts_a_half_written_line_and_adds_only_missing_rows(tiny_model_dir, photos, tmp_path):
    out = tmp_path / "out.jsonl"
    run(photos, "-o", out, model=tiny_model_dir)
    complete = out.read_text().splitlines(keepends=True)
    out.write_text("".join(complete[:6]) + complete[6][:25])  # as if killed while writing row 7
    result = run(photos, "-o", out, model=tiny_model_dir)
    assert result.exit_code == 0
    assert "captioned 4, skipped 6 (already done)" in result.stderr
    assert out.read_text() == "".join(complete)  # same rows, same order, nothing twice


def test_csv_resume_after_a_partial_row(tiny_model_dir, photos, tmp_path):
    out = tmp_path / "out.csv"
    run(photos, "-o", out, model=tiny_model_dir)
    complete = out.read_text()
    lines = complete.splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:30])  # header + 3 rows + a partial one
    result = run(photos, "-o", out, model=tiny_model_dir)
    assert "captioned 7, skipped 3" in result.stderr
    assert out.read_text() == complete


def test_other_settings_or_foreign_files_are_not_mixed_in(tiny_model_dir, photos, tmp_path):
    out = tmp_path / "out.jsonl"
    run(photos, "-o", out, model=tiny_model_dir)
    before = out.read_text()
    changed = run(photos, "-o", out, "--beams", "1", model=tiny_model_dir)
    assert changed.exit_code == 2 and "other settings (num_beams 3 -> 1)" in changed.stderr
    assert len(changed.stderr.splitlines()) == 1 and out.read_text() == before
    redone = run(photos, "-o", out, "--beams", "1", "--overwrite", model=tiny_model_dir)
    assert redone.exit_code == 0
    assert {row["settings"]["num_beams"] for row in jsonl_rows(out)} == {1} and len(jsonl_rows(out)) == 10
    foreign = tmp_path / "notes.csv"
    foreign.write_text("name,age\nann,3\n")
    refused = run(photos, "-o", foreign, model=tiny_model_dir)
    assert refused.exit_code == 2 and "is not an imcap output" in refused.stderr
    assert foreign.read_text() == "name,age\nann,3\n"


def test_writers_resume_in_process(tmp_path):
    with pytest.raises(OutputError, match="must end in .jsonl or .csv"):
        get_writer(tmp_path / "out.txt")
    with pytest.raises(OutputError, match="choose one of"):
        get_writer(tmp_path / "out.jsonl", ".txt")
    with pytest.raises(OutputError, match="sidecar extension"):
        get_writer(sidecar=".jpg")
    (tmp_path / "empty.csv").write_text("path,cap")  # only a partial header: a fresh file
    with get_writer(tmp_path / "empty.csv", model="m") as writer:
        assert not writer.is_done(tmp_path / "a.jpg")
    assert (tmp_path / "empty.csv").read_text() == "path,caption,score,logprob,candidates,model,settings\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}"], "no such file or folder"),
        (["{empty}"], "no images found"),
        (["{photos}", "-o", "{out}.jsonl", "--sidecar"], "choose one of --output and --sidecar"),
        (["{photos}", "-o", "{out}.txt"], "must end in .jsonl or .csv"),
        (["{photos}", "--sidecar", "--sidecar-ext", "txt"], "sidecar extension must look like .txt"),
        (["{photos}", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["{photos}", "--model", "./no/such/model"], "model folder not found"),
    ],
)
def test_usage_errors_exit_2_with_one_line(photos, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    values = {
        "missing": tmp_path / "gone.jpg",
        "empty": tmp_path / "empty",
        "photos": photos,
        "out": tmp_path / "o",
    }
    result = CliRunner().invoke(app, ["caption", *(a.format(**values) for a in args)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert message in result.stderr


def test_a_batch_of_the_whole_malformed_corpus_finishes(tiny_model_dir, tmp_path):
    cases = build_corpus(tmp_path / "corpus")
    # folder.jpg is a folder: not an image file, so a folder scan does not list it
    bad = [c for c in cases if c.error and c.name != "folder.jpg"]
    good = [c for c in cases if c.error is None]
    out = tmp_path / "out.jsonl"
    result = run(tmp_path / "corpus", "-o", out, model=tiny_model_dir)
    assert result.exit_code == 1
    assert sorted(Path(row["path"]).name for row in jsonl_rows(out)) == sorted(c.name for c in good)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert sorted(line.split(": ")[1].rsplit("/", 1)[-1] for line in errors) == sorted(c.name for c in bad)
    assert f"captioned {len(good)}, skipped 0 (already done), failed {len(bad)}" in result.stderr
    assert "Traceback" not in result.output
    allowed = run(tmp_path / "corpus", "-o", out, "--allow-failures", model=tiny_model_dir)
    assert allowed.exit_code == 0
    assert f"captioned 0, skipped {len(good)} (already done), failed {len(bad)}" in allowed.stderr


def test_sigkill_halfway_then_rerun_leaves_one_valid_row_per_image(tiny_model_dir, tmp_path):
    images = make_photos(tmp_path / "photos", 40)
    out = tmp_path / "out.jsonl"
    command = [
        str(IMCAP),
        "caption",
        str(tmp_path / "photos"),
        "--output",
        str(out),
        "--model",
        str(tiny_model_dir),
    ]
    command += ["--batch-size", "2", "--beams", "4", "--max-length", "40"]  # slow enough to be caught halfway
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
            assert process.poll() is None and time.monotonic() < deadline, (
                tmp_path / "stderr.txt"
            ).read_text()
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed = out.read_bytes()
    done = killed.count(b"\n")
    assert 2 <= done < 40

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"captioned {40 - done}, skipped {done} (already done), failed 0" in rerun.stderr
    rows = jsonl_rows(out)
    assert sorted(row["path"] for row in rows) == sorted(map(str, images))  # each image exactly once
    assert out.read_bytes().startswith(killed[: killed.rfind(b"\n") + 1])  # earlier rows kept as written
