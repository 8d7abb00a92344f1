"""Where the captions of a dataset go, one unit (tar shard, table chunk) at a time.

- `OUT.parquet`: a Parquet dataset folder, one `UNIT.parquet` per input unit, each written to a hidden
  temporary name and renamed, so a part is whole or absent; `pyarrow.parquet.read_table(OUT)` and
  `pandas.read_parquet(OUT)` read them as one table (they skip hidden files).
- `OUT.wds`: a folder of WebDataset shards, each input shard again with `KEY.txt` (the caption) and
  `KEY.imcap.json` (the whole row) after each image; an input `KEY.txt` (img2dataset's alt text) is kept
  as `KEY.original.txt`.
- `DIR/metadata.jsonl`: Hugging Face `imagefolder` metadata (`file_name`, `text`, and the row's other
  fields), so `datasets.load_dataset("imagefolder", data_dir=DIR)` reads images and captions together.
- `FILE.jsonl` / `FILE.csv`: the row files of imcap.writers, keyed by `key` in the `path` column.

Rows carry the names of imcap.writers.row_dict (`key` for `path`): `caption`, `score`, `logprob`,
`candidates` (`text`, `score`, `logprob`), `tags` when asked, `model` and `settings` (a JSON string in
Parquet, as in CSV, since a struct's fields would have to agree across all parts).

Resume: a sink says which units are finished (`pending`) and which keys are done (`done_keys`), and the
engines skip both; a finished part is never rewritten, so each image ends with exactly one row.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

from imcap.results import CaptionResult
from imcap.sources import Unit, tar_key
from imcap.writers import JsonlWriter, OutputError, Writer, get_writer, row_dict
from imcap.writers.locks import lock

PARQUET, WEBDATASET, METADATA = ".parquet", ".wds", "metadata.jsonl"
LOCK_NAME = ".imcap.lock"  # inside an output folder, held while a run writes there


def is_dataset_output(output: Path | None) -> bool:
    return output is not None and (
        Path(output).suffix.lower() in (PARQUET, WEBDATASET) or is_metadata(output)
    )


def is_metadata(output: Path | None) -> bool:
    return output is not None and Path(output).name == METADATA


class UnitSink:
    """Where finished units go: `write_unit` takes one unit's (key, result) rows, in input order."""

    done_keys: frozenset[str] | object = frozenset()  # anything with `in`: keys an earlier run finished

    def pending(self, units: Sequence[Unit]) -> list[Unit]:
        return list(units)

    def write_unit(self, unit: Unit, rows: list[tuple[str, CaptionResult]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> UnitSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def dataset_row(key: str, result: CaptionResult, model: str, settings: dict, tags: int) -> dict:
    """row_dict with `key` in place of `path`."""
    row = row_dict(key, result, model, settings, tags)
    return {"key": row.pop("path"), **row}


class _FolderSink(UnitSink):
    """An output folder of one file per unit, locked while a run writes it."""

    extension = ""

    def __init__(self, folder: Path, model: str, settings: dict, overwrite: bool = False, tags: int = 0):
        self.folder, self.model, self.tags = Path(folder), model, tags
        self.settings = {**settings, "tags": tags} if tags else settings
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputError(f"{self.folder}: cannot write ({error.strerror or error})") from error
        try:
            lock(self._fd, f"{self.folder} is being written")
            for stale in self.folder.glob(".*.tmp"):  # a killed run's half-written part: never a result
                stale.unlink()
            if overwrite:
                for part in self.parts():
                    part.unlink()
            self._check_same_run()
        except BaseException:
            os.close(self._fd)
            raise

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob(f"[!._]*{self.extension}"))

    def part(self, unit: Unit) -> Path:
        return self.folder / f"{unit.name}{self.extension}"

    def pending(self, units: Sequence[Unit]) -> list[Unit]:
        return [unit for unit in units if not self.part(unit).exists()]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _check_same_run(self) -> None:
        found = self._first_row()
        if found is None:
            return
        ours, theirs = {"model": self.model, **self.settings}, {"model": found[0], **found[1]}
        changed = sorted(
            f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}" for k in ours | theirs if theirs.get(k) != ours.get(k)
        )
        if changed:
            raise OutputError(
                f"{self.folder} holds captions made with other settings ({', '.join(changed)}); "
                "pass --overwrite to redo them or choose another output"
            )

    def _first_row(self) -> tuple[str, dict] | None:
        return None

    def _write_atomic(self, path: Path, write) -> None:
        """`write(file)` into a hidden temporary file, fsync'd, renamed to `path`: whole or absent."""
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a power cut
            finally:
                os.close(directory)
        except OSError as error:
            full = "when there is room" if error.errno in (28, 122) else "to continue"
            raise OutputError(
                f"{path}: cannot write ({error.strerror or error}); the parts written before are kept, "
                f"rerun the same command {full}"
            ) from error
        finally:
            temporary.unlink(missing_ok=True)


def parquet_schema(tags: bool):
    import pyarrow as pa

    candidate = pa.struct([("text", pa.string()), ("score", pa.float64()), ("logprob", pa.float64())])
    fields = [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("score", pa.float64()),
        ("logprob", pa.float64()),
        ("candidates", pa.list_(candidate)),
    ]
    if tags:
        fields.append(("tags", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))))
    return pa.schema([*fields, ("model", pa.string()), ("settings", pa.string())])


class ParquetSink(_FolderSink):
    """OUT.parquet/UNIT.parquet, one per unit; the keys of every finished part are done."""

    extension = PARQUET

    def __init__(self, folder: Path, model: str, settings: dict, overwrite: bool = False, tags: int = 0):
        import pyarrow.parquet as pq

        self._pq = pq
        super().__init__(folder, model, settings, overwrite, tags)
        keys = set()
        for part in self.parts():
            keys.update(pq.read_table(part, columns=["key"]).column("key").to_pylist())
        self.done_keys = frozenset(keys)

    def write_unit(self, unit: Unit, rows: list[tuple[str, CaptionResult]]) -> None:
        import pyarrow as pa

        records = [dataset_row(key, result, self.model, self.settings, self.tags) for key, result in rows]
        for record in records:
            record["settings"] = json.dumps(record["settings"], ensure_ascii=False)
        table = pa.Table.from_pylist(records, schema=parquet_schema(bool(self.tags)))
        self._write_atomic(self.part(unit), lambda file: self._pq.write_table(table, file))

    def _first_row(self) -> tuple[str, dict] | None:
        for part in self.parts():
            try:
                table = self._pq.read_table(part, columns=["model", "settings"])
            except (OSError, ValueError) as error:
                raise OutputError(f"{part} is not an imcap part ({error}); pass --overwrite") from error
            if table.num_rows:
                row = table.slice(0, 1).to_pylist()[0]
                return row["model"], json.loads(row["settings"])
        return None


class WebDatasetSink(_FolderSink):
    """OUT.wds/SHARD.tar: the input shard with each image's caption (`KEY.txt`) and row
    (`KEY.imcap.json`) added after it."""

    extension = ".tar"

    def write_unit(self, unit: Unit, rows: list[tuple[str, CaptionResult]]) -> None:
        captions = dict(rows)
        self._write_atomic(self.part(unit), lambda file: self._copy_with_captions(unit, captions, file))

    def _copy_with_captions(self, unit: Unit, captions: dict[str, CaptionResult], file) -> None:
        captioned = set(captions)
        with tarfile.open(unit.file(unit.path), "r:*") as source, tarfile.open(fileobj=file, mode="w") as out:
            try:
                for member in source:
                    key, extension = tar_key(member.name)
                    data = source.extractfile(member).read() if member.isfile() else None
                    if extension == "txt" and key in captioned:
                        member = _renamed(member, f"{key}.original.txt")
                    out.addfile(member, io.BytesIO(data) if data is not None else None)
                    result = captions.pop(key, None) if member.isfile() else None
                    if result is not None:
                        row = dataset_row(key, result, self.model, self.settings, self.tags)
                        _add(out, f"{key}.txt", result.caption.encode("utf-8"), member)
                        _add(out, f"{key}.imcap.json", json.dumps(row, ensure_ascii=False).encode(), member)
            except (OSError, tarfile.TarError, EOFError):
                pass  # a shard that breaks off: what could be read is copied (the reader reported it)

    def _first_row(self) -> tuple[str, dict] | None:
        for part in self.parts():
            try:
                with tarfile.open(part) as tar:
                    for member in tar:
                        if member.name.endswith(".imcap.json"):
                            row = json.loads(tar.extractfile(member).read())
                            return row["model"], row["settings"]
            except (OSError, tarfile.TarError, ValueError) as error:
                raise OutputError(f"{part} is not a shard imcap wrote ({error}); pass --overwrite") from error
        return None


def _renamed(member: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    copy = tarfile.TarInfo(name)
    copy.size, copy.mtime, copy.mode = member.size, member.mtime, member.mode
    return copy


def _add(tar: tarfile.TarFile, name: str, data: bytes, like: tarfile.TarInfo) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), like.mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


class MetadataWriter(JsonlWriter):
    """Hugging Face `imagefolder` metadata: `file_name` (relative to the metadata file's folder) and
    `text` (the caption) first, then the row's other fields; resumes like any JSONL file."""

    def encode(self, row: dict) -> str:
        file_name = os.path.relpath(os.path.abspath(row.pop("path")), os.path.abspath(self.path.parent))
        record = {"file_name": file_name, "text": row.pop("caption"), **row}
        return json.dumps(record, ensure_ascii=False) + "\n"

    def decode(self, text: str) -> list[dict]:
        rows = []
        for line in text.splitlines():
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or "file_name" not in record:
                    raise ValueError("it has rows without file_name")
                record["path"] = os.path.join(self.path.parent, record.pop("file_name"))
                rows.append(record)
        return super().decode("".join(json.dumps(r) + "\n" for r in rows))


def check_imagefolder(units: Sequence[Unit], output: Path) -> None:
    """imagefolder metadata names image files inside its folder: only plain files under it will do."""
    folder = os.path.abspath(Path(output).parent)
    for unit in units:
        if unit.kind != "files":
            raise OutputError(f"{output} (imagefolder metadata) needs image files, not {unit.path}")
        for path in unit.files:
            if not os.path.abspath(unit.file(path)).startswith(folder + os.sep):
                raise OutputError(f"{output}: {path} is not inside {folder}, where imagefolder looks")


class RowSink(UnitSink):
    """A JSONL / CSV / metadata.jsonl row file (imcap.writers), written a unit at a time."""

    def __init__(self, writer: Writer):
        self.writer = writer
        self.done_keys = _DoneKeys(writer)

    def write_unit(self, unit: Unit, rows: list[tuple[str, CaptionResult]]) -> None:
        if rows:
            self.writer.write(rows)

    def close(self) -> None:
        self.writer.close()


class _DoneKeys:
    def __init__(self, writer: Writer):
        self.writer = writer

    def __contains__(self, key: str) -> bool:
        return self.writer.is_done(Path(key))


def get_sink(
    output: Path, units: Sequence[Unit], *, model: str, settings: dict, overwrite: bool = False, tags: int = 0
) -> UnitSink:
    """The sink for `--output` by its name: OUT.parquet, OUT.wds, DIR/metadata.jsonl, FILE.jsonl/.csv."""
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix == PARQUET:
        return ParquetSink(output, model, settings, overwrite, tags)
    if suffix == WEBDATASET:
        if not_tar := [unit.path or unit.files[0] for unit in units if unit.kind != "tar"]:
            raise OutputError(f"{output}: WebDataset output copies .tar shards, and {not_tar[0]} is not one")
        return WebDatasetSink(output, model, settings, overwrite, tags)
    if is_metadata(output):
        check_imagefolder(units, output)
        return RowSink(MetadataWriter(output, model, settings, overwrite, tags))
    return RowSink(get_writer(output, model=model, settings=settings, overwrite=overwrite, tags=tags))


def check_dataset_output(output: Path | None, sidecar: str | None) -> None:
    """Reject output settings the dataset engines cannot write, before any model is loaded."""
    if sidecar is not None:
        raise OutputError("--sidecar writes next to image files; for shards and tables use --output")
    if output is None:
        raise OutputError("shards and tables need --output OUT.parquet, OUT.wds, FILE.jsonl or FILE.csv")
    name, suffix = Path(output).name, Path(output).suffix.lower()
    if suffix not in (PARQUET, WEBDATASET, ".jsonl", ".csv") and name != METADATA:
        raise OutputError(f"{output}: the output must end in .parquet, .wds, .jsonl or .csv")
