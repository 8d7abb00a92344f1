"""Datasets (issue 13): WebDataset shards and tables in; Parquet, WebDataset and imagefolder out; the Ray
engine against the local one, and a SIGKILL'ed Ray run finished by a rerun with every image once."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imcap.cli import app
from imcap.shards import load_item
from imcap.sources import SourceError, find_units, read_unit

pq = pytest.importorskip("pyarrow.parquet")

IMCAP = Path(sys.executable).parent / "imcap"
CORRUPT = "0010002"  # the bad member of make_shards' second shard


def jpeg(rng, size=(48, 64)) -> bytes:
    picture = np.empty((*size, 3), np.uint8)
    picture[:] = rng.integers(0, 256, 3)
    picture[: size[0] // 2, : size[1] // 2] = rng.integers(0, 256, 3)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "JPEG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(folder: Path, shards: int = 3, per_shard: int = 5) -> list[Path]:
    """img2dataset-style shards: KEY.jpg, KEY.txt (alt text), KEY.json; one member of shard 1 corrupt."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, paths = np.random.default_rng(13), []
    for s in range(shards):
        paths.append(folder / f"{s:05d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for k in range(per_shard):
                key = f"{s:03d}{k:04d}"
                add(tar, f"{key}.jpg", b"not a jpeg" if key == CORRUPT else jpeg(rng))
                add(tar, f"{key}.txt", f"alt text {key}".encode())
                add(tar, f"{key}.json", json.dumps({"key": key}).encode())
    return paths


def good_keys(shards: int = 3, per_shard: int = 5) -> list[str]:
    return [
        f"{s:03d}{k:04d}" for s in range(shards) for k in range(per_shard) if f"{s:03d}{k:04d}" != CORRUPT
    ]


def caption(*args, model: Path):
    return CliRunner().invoke(app, ["caption", *map(str, args), "--model", str(model), "--max-length", "6"])


def test_tar_reader_keys_bad_member_and_truncation(tmp_path):
    shard = make_shards(tmp_path, shards=2)[1]
    (unit,) = find_units([shard])
    items = list(read_unit(unit))
    assert [i.key for i in items] == [
        f"001{k:04d}" for k in range(5)
    ]  # only images, key = name less extension
    bad = next(i for i in items if i.key == CORRUPT)
    with pytest.raises(ValueError, match=rf"00001.tar: {CORRUPT}: not a readable image"):
        load_item(unit, bad, None)
    assert load_item(unit, items[0], None).size == (64, 48)
    assert [i.key for i in read_unit(unit, skip={"0010000"})][0] == "0010001"

    cut = tmp_path / "cut.tar"
    with tarfile.open(shard) as tar:
        second = tar.getmember("0010001.jpg")
    cut.write_bytes(shard.read_bytes()[: second.offset_data + 100])  # ends inside the second image
    items = list(read_unit(find_units([cut])[0]))
    assert items[0].data and items[1].key == "0010001" and "cannot read the member" in items[1].error


def test_table_readers_paths_and_bytes(tmp_path):
    import pyarrow as pa

    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for n in range(3):
        (images / f"p{n}.jpg").write_bytes(jpeg(rng))
    (tmp_path / "t.csv").write_text("image,key\n" + "".join(f"images/p{n}.jpg,k{n}\n" for n in range(3)))
    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps({"image": f"images/p{n}.jpg"}) + "\n" for n in range(3))
    )
    blobs = [jpeg(rng) for _ in range(5)]
    pq.write_table(pa.table({"key": [f"b{n}" for n in range(5)], "img": blobs}), tmp_path / "t.parquet")

    (csv_unit,) = find_units([tmp_path / "t.csv"], image_column="image")
    (jsonl_unit,) = find_units([tmp_path / "t.jsonl"], image_column="image")
    assert [i.key for i in read_unit(csv_unit)] == ["k0", "k1", "k2"]  # the table's key column
    jsonl_items = list(read_unit(jsonl_unit))
    assert [i.key for i in jsonl_items] == [f"images/p{n}.jpg" for n in range(3)]  # else the path
    assert jsonl_items[1].data == (images / "p1.jpg").read_bytes()  # relative to the table's folder

    units = find_units([tmp_path / "t.parquet"], image_column="img", chunk_rows=2)  # chunks of 2 rows
    assert [u.name for u in units] == ["t-00000", "t-00001", "t-00002"]
    items = [i for u in units for i in read_unit(u)]
    assert [i.key for i in items] == [f"b{n}" for n in range(5)] and [i.data for i in items] == blobs
    # row groups of 2 under chunks of 3: each chunk reads only its own groups, across their boundaries
    grouped = pa.table({"key": [f"b{n}" for n in range(5)], "img": blobs, "other": list(range(5))})
    pq.write_table(grouped, tmp_path / "g.parquet", row_group_size=2)
    units = find_units([tmp_path / "g.parquet"], image_column="img", chunk_rows=3)
    assert [[i.key for i in read_unit(u)] for u in units] == [["b0", "b1", "b2"], ["b3", "b4"]]
    assert [i.data for u in units for i in read_unit(u)] == blobs

    with pytest.raises(SourceError, match="has no column 'picture'"):
        find_units([tmp_path / "t.parquet"], image_column="picture")
    with pytest.raises(SourceError, match="would both write t-00000"):  # one output file each
        find_units([tmp_path / "t.csv", tmp_path / "t.jsonl"], image_column="image")
    with pytest.raises(SourceError, match="--image-column"):
        find_units([tmp_path / "t.csv"])


def test_folders_among_dataset_inputs_follow_recursive(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    (tmp_path / "photos" / "top.jpg").write_bytes(jpeg(rng))
    (tmp_path / "photos" / "sub" / "deep.jpg").write_bytes(jpeg(rng))

    def names(recursive: bool) -> list[str]:
        units = find_units([tmp_path / "photos"], recursive=recursive)
        return sorted(Path(i.key).name for u in units for i in read_unit(u))

    assert names(recursive=False) == ["top.jpg"]
    assert names(recursive=True) == ["deep.jpg", "top.jpg"]


def test_parquet_output_resumes_by_shard_and_matches_files(tmp_path, seeing_model_dir):
    shards = make_shards(tmp_path / "in")
    out = tmp_path / "out.parquet"
    result = caption(*shards, "--output", out, model=seeing_model_dir)
    assert result.exit_code == 1  # the corrupt member, without --allow-failures
    assert f"00001.tar: {CORRUPT}: not a readable image" in result.output
    table = pq.read_table(out)  # the folder reads as one table
    assert sorted(table.column("key").to_pylist()) == good_keys()
    row = table.slice(0, 1).to_pylist()[0]
    assert set(row) == {"key", "caption", "score", "logprob", "candidates", "model", "settings"}
    assert set(row["candidates"][0]) == {"text", "score", "logprob"}
    assert json.loads(row["settings"])["max_new_tokens"] == 6

    (out / "00002.parquet").unlink()  # as if killed before the last shard was written
    before = (out / "00000.parquet").stat().st_mtime_ns
    result = caption(*shards, "--output", out, "--allow-failures", model=seeing_model_dir)
    assert result.exit_code == 0 and "captioned 5, skipped 2 units" in result.output
    assert (out / "00000.parquet").stat().st_mtime_ns == before  # finished parts are never rewritten
    assert pq.read_table(out).to_pylist() == table.to_pylist()

    # the same images as plain files give the same captions
    files = tmp_path / "files"
    files.mkdir()
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".jpg") and CORRUPT not in member.name:
                    (files / member.name).write_bytes(tar.extractfile(member).read())
    caption(files, "--output", tmp_path / "files.jsonl", model=seeing_model_dir)
    rows = map(json.loads, (tmp_path / "files.jsonl").read_text().splitlines())
    plain = {Path(r["path"]).stem: r["caption"] for r in rows}
    assert (
        dict(zip(table.column("key").to_pylist(), table.column("caption").to_pylist(), strict=True)) == plain
    )

    changed = caption(*shards, "--output", out, "--beams", "2", model=seeing_model_dir)
    assert changed.exit_code == 2 and "holds captions made with other settings" in changed.output


def test_webdataset_output_adds_captions_to_the_shards(tmp_path, tiny_model_dir):
    shards = make_shards(tmp_path / "in", shards=2)
    out = tmp_path / "out.wds"
    result = caption(*shards, "--output", out, "--allow-failures", "--tags", "2", model=tiny_model_dir)
    assert result.exit_code == 0, result.output
    with tarfile.open(out / "00001.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
        names = tar.getnames()
    good = "0010001"
    assert members[f"{good}.original.txt"] == f"alt text {good}".encode()  # img2dataset's text kept
    row = json.loads(members[f"{good}.imcap.json"])
    assert members[f"{good}.txt"].decode() == row["caption"] and row["key"] == good and "tags" in row
    assert f"{CORRUPT}.jpg" in members and f"{CORRUPT}.txt" in members  # a bad image: left as it was
    keys = [name.split(".")[0] for name in names]
    assert keys == sorted(keys)  # each key's members stay together, as WebDataset readers group them


def test_imagefolder_metadata_loads_with_datasets(tmp_path, tiny_model_dir):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "photos"
    rng = np.random.default_rng(1)
    (folder / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        (folder / name).write_bytes(jpeg(rng))
    metadata = folder / "metadata.jsonl"
    args = [folder / "a.jpg", folder / "b.jpg", folder / "sub", "--output", metadata]
    assert caption(*args, model=tiny_model_dir).exit_code == 0
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["a.jpg", "b.jpg", "sub/c.jpg"]
    rerun = caption(*args, model=tiny_model_dir)
    assert "captioned 0" in rerun.output and len(metadata.read_text().splitlines()) == 3  # resumed

    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert sorted(loaded["text"]) == sorted(r["text"] for r in rows)
    assert loaded[0]["image"].size == (64, 48)

    outside = caption(
        tmp_path / "photos" / "a.jpg", "--output", tmp_path / "x" / "metadata.jsonl", model=tiny_model_dir
    )
    assert outside.exit_code == 2 and "imagefolder looks" in outside.output


def test_dataset_flag_errors(tmp_path, tiny_model_dir):
    shards = make_shards(tmp_path / "in", shards=1)
    assert "need --output" in caption(*shards, model=tiny_model_dir).output
    assert (
        "--workers must be >= 1"
        in caption(*shards, "--engine", "ray", "--workers", "0", model=tiny_model_dir).output
    )
    assert (
        "are for --engine ray"
        in caption(*shards, "-o", tmp_path / "o.parquet", "--workers", "2", model=tiny_model_dir).output
    )
    assert "--engine must be one of" in caption(*shards, "--engine", "spark", model=tiny_model_dir).output


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_engine_matches_local_engine_across_batch_sizes(tmp_path, seeing_model_dir, local_ray):
    from imcap.datasets_out import ParquetSink
    from imcap.generation import CaptionOptions
    from imcap.ray_engine import caption_units_ray

    units = find_units(make_shards(tmp_path / "in"))
    local = tmp_path / "local.parquet"
    assert (
        caption(*[u.path for u in units], "-o", local, "--allow-failures", model=seeing_model_dir).exit_code
        == 0
    )
    expected = {r["key"]: r["caption"] for r in pq.read_table(local).to_pylist()}
    loader = {"name_or_path": str(seeing_model_dir)}
    options = CaptionOptions(max_new_tokens=6)
    for batch_size in (2, 5):
        out, failed = tmp_path / f"ray{batch_size}.parquet", []
        with ParquetSink(out, str(seeing_model_dir), options.to_dict()) as sink:
            summary = caption_units_ray(
                loader, units, sink, options, workers=2, batch_size=batch_size, progress=False,
                on_failure=failed.append,
            )  # fmt: skip
        assert summary.captioned == len(good_keys()) and [f.path for f in failed] == [
            f"{units[1].path}: {CORRUPT}"
        ]
        got = {r["key"]: r["caption"] for r in pq.read_table(out).to_pylist()}
        assert sorted(got) == sorted(expected)
        assert sum(got[k] == expected[k] for k in got) / len(got) >= 0.99


def run_in_own_group(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run, but a timeout also kills what the command started (the local Ray it brings up
    would otherwise outlive the test and slow every test after it)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_ray_run_killed_then_rerun_writes_every_image_once(tmp_path, seeing_model_dir):
    pytest.importorskip("ray")
    shards = make_shards(tmp_path / "in", shards=6, per_shard=6)
    out = tmp_path / "out.parquet"
    command = [
        str(IMCAP), "caption", *map(str, shards), "--engine", "ray", "--workers", "2", "--output", str(out),
        "--allow-failures", "--model", str(seeing_model_dir), "--max-length", "6", "--batch-size", "2",
    ]  # fmt: skip
    env = {**os.environ, "IMCAP_TEST_UNIT_DELAY": "1.5"}  # time to kill it with some shards written
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 90
    while not list(out.glob("*.parquet")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and the local Ray it started
    _, killed_stderr = process.communicate()
    written = list(out.glob("*.parquet"))
    assert 1 <= len(written) < len(shards), "killed too late to test a resume"

    rerun = run_in_own_group(command, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipped {len(written)} units" in rerun.stderr
    keys = pq.read_table(out).column("key").to_pylist()
    assert sorted(keys) == good_keys(6, 6)  # every good image exactly once
    assert f"00001.tar: {CORRUPT}: not a readable image" in killed_stderr + rerun.stderr
    assert not list(out.glob(".*.tmp"))
