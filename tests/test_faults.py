"""Faults that must lose nothing (issue 16): two runs on one output, write errors such as a full disk.

Two runs are real processes (the lock is the kernel's); a full disk is an injected OSError(ENOSPC) in the
middle of a batch, after which the file must hold only whole rows and a rerun must finish every image once.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imcap.cli import app
from imcap.writers import rowfiles

from .test_batch import make_photos

HOLD = """
import sys
from pathlib import Path
from imcap.writers import get_writer
kind, target = sys.argv[1], Path(sys.argv[2])
if kind == "rows":
    writer = get_writer(target, model="someone else")
else:
    writer = get_writer(sidecar=".txt")
    writer.is_done(target / "photo_00.png")
print("holding", flush=True)
sys.stdin.read()  # until the test closes our stdin
writer.close()
"""


def caption_command(*args) -> list[str]:
    return [sys.executable, "-m", "imcap", "caption", *map(str, args), "--max-length", "6"]


def run(*args, model: Path):
    return CliRunner().invoke(app, ["caption", *map(str, args), "--model", str(model), "--max-length", "6"])


class Holder:
    """Another process holding an output's lock, as a running `imcap caption` does."""

    def __init__(self, kind: str, target: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLD, kind, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.process.stdout.readline() == b"holding\n"

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_second_run_on_a_locked_output_stops_at_once_with_one_line(tmp_path, tiny_model_dir, suffix):
    photos = tmp_path / "photos"
    make_photos(photos, 3)
    out = tmp_path / f"out{suffix}"
    command = caption_command(photos, "--model", tiny_model_dir, "--output", out)
    with Holder("rows", out) as holder:
        before = out.read_bytes()
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert second.stderr.splitlines() == [
            f"error: {out} is being written by another imcap run (pid {holder.process.pid}); "
            "wait for it to finish or choose another output"
        ]
        assert out.read_bytes() == before  # not a byte changed under the other run
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)  # the lock went with it
    assert again.returncode == 0, again.stderr


def test_two_runs_started_together_write_each_image_once(tmp_path, tiny_model_dir):
    photos = tmp_path / "photos"
    make_photos(photos, 24)
    out = tmp_path / "out.jsonl"
    command = caption_command(photos, "--model", tiny_model_dir, "--output", out, "--batch-size", "2")
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    for process in runs:
        process.stderr.close()
    for code, stderr in results:  # each either did the job, found it done, or was turned away
        assert code == 0 or (code == 2 and "is being written by another imcap run (pid " in stderr), stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["path"] for row in rows) == [str(p) for p in sorted(photos.iterdir())]


def test_a_second_sidecar_run_on_a_folder_stops_and_the_lock_file_goes(tmp_path, tiny_model_dir):
    photos = tmp_path / "photos"
    make_photos(photos, 3)
    command = caption_command(photos, "--model", tiny_model_dir, "--sidecar")
    with Holder("sidecar", photos) as holder:
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert second.stderr.splitlines() == [
            f"error: {photos} is being captioned by another imcap run (pid {holder.process.pid}); "
            "wait for it to finish or choose another output"
        ]
        assert not list(photos.glob("*.txt"))
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in photos.iterdir()) == sorted(
        f"photo_{i:02d}{ext}" for i in range(3) for ext in (".png", ".txt")
    )  # sidecars, and no lock file left behind


class FillsUp:
    """An output file on a disk that fills up during the `fail_at`-th write: half of it lands, then ENOSPC."""

    def __init__(self, file, fail_at: int):
        self.file, self.writes, self.fail_at, self.failed = file, 0, fail_at, False

    def write(self, data) -> int:
        self.writes += 1
        if self.writes == self.fail_at:
            return self.file.write(data[: max(1, len(data) // 2)])
        if self.writes > self.fail_at:
            self.failed = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def fill_up_after(monkeypatch, fail_at: int) -> list[FillsUp]:
    opened = []

    def open_rows(path):
        opened.append(FillsUp(real_open(path), fail_at))
        return opened[-1]

    real_open = rowfiles._open_for_rows
    monkeypatch.setattr(rowfiles, "_open_for_rows", open_rows)
    return opened


def read_rows(out: Path) -> list[dict]:
    text = out.read_text()
    assert text.endswith("\n")  # no half row
    if out.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_full_disk_keeps_whole_batches_and_a_rerun_finishes(tmp_path, tiny_model_dir, monkeypatch, suffix):
    photos = tmp_path / "photos"
    make_photos(photos, 10)
    out = tmp_path / f"out{suffix}"
    # writes: the CSV header (CSV only), batch 1, then batch 2 half written when the disk fills up
    opened = fill_up_after(monkeypatch, fail_at=3 if suffix == ".csv" else 2)
    full = run(photos, "--output", out, "--batch-size", "4", model=tiny_model_dir)
    assert opened[0].failed
    assert full.exit_code == 2, full.output
    assert full.stderr.splitlines() == [
        f"error: {out}: cannot write (No space left on device); the rows written before are kept, "
        "rerun the same command when there is room"
    ]
    kept = read_rows(out)
    assert [row["path"] for row in kept] == [str(p) for p in sorted(photos.iterdir())[:4]]

    monkeypatch.undo()  # space freed
    rerun = run(photos, "--output", out, "--batch-size", "4", model=tiny_model_dir)
    assert rerun.exit_code == 0, rerun.output
    assert "captioned 6, skipped 4 (already done)" in rerun.stderr
    rows = read_rows(out)
    assert [row["path"] for row in rows] == [str(p) for p in sorted(photos.iterdir())]
    assert rows[:4] == kept


def test_a_full_disk_while_writing_sidecars_leaves_whole_files_and_a_rerun_finishes(
    tmp_path, tiny_model_dir, monkeypatch
):
    photos = tmp_path / "photos"
    images = make_photos(photos, 6)
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # each sidecar is fsync'd once before its rename; the 4th finds the disk full
        calls.append(fd)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    full = run(photos, "--sidecar", "--batch-size", "2", model=tiny_model_dir)
    assert full.exit_code == 2, full.output
    assert full.stderr.splitlines() == [
        f"error: {photos / 'photo_03.txt'}: cannot write (No space left on device)"
    ]
    done = sorted(p.name for p in photos.glob("*.txt"))
    assert done == ["photo_00.txt", "photo_01.txt", "photo_02.txt"]
    assert not list(photos.glob(".*"))  # no temporary file, no lock file
    first = {name: (photos / name).read_text() for name in done}
    assert all(first.values())

    monkeypatch.undo()
    rerun = run(photos, "--sidecar", "--batch-size", "2", model=tiny_model_dir)
    assert rerun.exit_code == 0, rerun.output
    assert "captioned 3, skipped 3 (already done)" in rerun.stderr
    assert all(image.with_suffix(".txt").read_text() for image in images)
    assert {name: (photos / name).read_text() for name in done} == first


def test_a_csv_record_torn_after_a_newline_in_a_cell_is_cut_off(tmp_path, tiny_model_dir):
    """--prefix may hold a newline, which CSV keeps inside a quoted cell; a kill just after it must not
    leave a record that the next run reads as whole (or as a file that is not ours)."""
    photos = tmp_path / "photos"
    make_photos(photos, 3)
    out = tmp_path / "out.csv"
    flags = ["--output", out, "--prefix", "first line\nsecond line: "]
    assert run(photos, *flags, model=tiny_model_dir).exit_code == 0
    data = out.read_bytes()
    last = data.rindex(b"\n", 0, len(data) - 1) + 1  # where the last record starts
    while b"first line\n" not in data[last : len(data) - 1]:  # records span lines: find its start
        last = data.rindex(b"\n", 0, last - 1) + 1
    torn = data[: data.index(b"first line\n", last) + len(b"first line\n")]
    assert torn.count(b'"') % 2 == 1  # cut inside the quoted caption, right after its newline
    out.write_bytes(torn)
    resumed = run(photos, *flags, model=tiny_model_dir)
    assert resumed.exit_code == 0, resumed.output
    assert "captioned 1, skipped 2 (already done)" in resumed.stderr
    assert out.read_bytes() == data
