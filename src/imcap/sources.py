"""Inputs as units of work: WebDataset `.tar` shards, Parquet / CSV / JSONL tables, and plain image files.

A dataset of millions of images comes as shards (img2dataset writes `00000.tar` holding `KEY.jpg`,
`KEY.txt`, `KEY.json`) or as tables with an image column. Both engines (`imcap.shards` on one machine,
`imcap.ray_engine` on a Ray cluster) work unit by unit: a unit is one tar shard, one chunk of a table
(`CHUNK_ROWS` rows) or one chunk of plain files, and every output writes one unit at a time, whole or not
at all, so a rerun skips the finished units.

Each image of a unit is an `Item`: its key (the WebDataset key, a table's `key` column, the file's path),
its bytes, or an error saying why it could not be read (a truncated tar member, a missing file). Decoding
the bytes is left to the captioning side (`imcap.images.decode_image`), where a bad image fails alone.
"""

from __future__ import annotations

import csv
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imcap.images import IMAGE_SUFFIXES

CHUNK_ROWS = 1000  # table rows (or plain files) per unit: one output file each
SHARD_SUFFIXES = {".tar"}
TABLE_SUFFIXES = {".parquet", ".csv", ".jsonl"}
KEY_COLUMN = "key"  # a table column that names each row, where there is one (img2dataset writes it)


class SourceError(ValueError):
    """An input that cannot be read as a whole (no such column, not a table); the message is one line."""


@dataclass(frozen=True)
class Unit:
    """One unit of work. `name` names its output file (`00000` -> `00000.parquet`), so it is unique."""

    name: str
    kind: str  # "tar", "table" or "files"
    path: str  # the tar or table file; "" for plain files
    start: int = 0  # tables and files: the first row of this chunk
    stop: int = 0  # ... and one past the last
    files: tuple[str, ...] = ()  # kind "files": the image files of this chunk
    image_column: str | None = None  # kind "table"
    root: str = ""  # the folder relative paths start from (the caller's working folder), for Ray workers

    def file(self, path: str) -> str:
        return os.path.join(self.root, path)


@dataclass
class Item:
    """One image of a unit: `data` is the image file's bytes, or None with `error` saying why not."""

    key: str
    data: bytes | None
    error: str | None = None
    member: str = ""  # a tar member's name, or a file's path: where it came from, for messages

    def where(self, unit: Unit) -> str:
        """`shard.tar: key` for messages about this item."""
        return f"{unit.path}: {self.key}" if unit.kind != "files" else self.key


def is_dataset_input(item: str | Path) -> bool:
    """A tar shard or a table (by suffix), rather than an image file, a folder or a glob of images."""
    return Path(item).suffix.lower() in SHARD_SUFFIXES | TABLE_SUFFIXES


def find_units(
    items: Sequence[str | Path],
    image_column: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
    recursive: bool = False,
) -> list[Unit]:
    """The units of these inputs: a unit per tar shard, a unit per `chunk_rows` rows of each table, and
    the plain image files (files, folders, globs; see imcap.batch.find_images, sub-folders too when
    `recursive`) in chunks of `chunk_rows`.

    Raises SourceError when a table lacks `image_column` (or it is not given) and when two inputs would
    name the same output file, FileNotFoundError for missing inputs.
    """
    from imcap.batch import find_images

    units: list[Unit] = []
    plain: list[str] = []
    for item in map(str, items):
        suffix = Path(item).suffix.lower()
        if suffix in SHARD_SUFFIXES:
            if not Path(item).is_file():
                raise FileNotFoundError(f"{item}: no such file")
            units.append(Unit(Path(item).stem, "tar", item, root=os.getcwd()))
        elif suffix in TABLE_SUFFIXES:
            units += _table_units(Path(item), image_column, chunk_rows)
        else:
            plain.append(item)
    if plain:
        files = [str(path) for path in find_images(plain, recursive)]
        for number, start in enumerate(range(0, len(files), chunk_rows)):
            chunk = tuple(files[start : start + chunk_rows])
            name = f"files-{number:05d}"
            units.append(Unit(name, "files", "", start, start + len(chunk), chunk, root=os.getcwd()))
    _check_unique(units)
    return units


def _table_units(path: Path, image_column: str | None, chunk_rows: int) -> list[Unit]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    columns, rows = _table_shape(path)
    root = os.getcwd()
    if image_column is None:
        raise SourceError(f"{path}: say which column holds the images with --image-column (it has {columns})")
    if image_column not in columns:
        raise SourceError(f"{path} has no column {image_column!r} (it has {', '.join(columns)})")
    return [
        Unit(
            f"{path.stem}-{n:05d}",
            "table",
            str(path),
            start,
            min(start + chunk_rows, rows),
            (),
            image_column,
            root,
        )
        for n, start in enumerate(range(0, rows, chunk_rows))
    ]


def _table_shape(path: Path) -> tuple[list[str], int]:
    """A table's column names and row count."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            metadata = pq.ParquetFile(path).metadata
            return metadata.schema.to_arrow_schema().names, metadata.num_rows
        rows = _text_rows(path)
        columns = list(rows[0]) if rows else []
        return columns, len(rows)
    except (OSError, ValueError) as error:
        raise SourceError(f"{path}: cannot read it as a table ({_first_line(error)})") from error


def _check_unique(units: list[Unit]) -> None:
    seen: dict[str, Unit] = {}
    for unit in units:
        if unit.name in seen:
            raise SourceError(
                f"{seen[unit.name].path} and {unit.path} would both write {unit.name}: rename one of them"
            )
        seen[unit.name] = unit


def read_unit(unit: Unit, skip: frozenset[str] | set[str] = frozenset()) -> Iterator[Item]:
    """The images of a unit, in order, but those whose key is in `skip` (done by an earlier run).

    A member or row that cannot be read comes as an Item with an error; a tar that breaks off midway
    (truncated, corrupt header) ends with one such Item, after the images before the break.
    """
    readers = {"tar": _read_tar, "table": _read_table, "files": _read_files}
    for item in readers[unit.kind](unit):
        if item.key not in skip:
            yield item


def tar_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: `dir/0001.jpg` -> (`dir/0001`, `jpg`); the extension is all
    after the first dot of the file name (`0001.seg.png` -> `seg.png`)."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _read_tar(unit: Unit) -> Iterator[Item]:
    seen: set[str] = set()
    try:
        with tarfile.open(unit.file(unit.path), "r:*") as tar:
            for member in tar:
                key, extension = tar_key(member.name)
                if not member.isfile() or f".{extension}" not in IMAGE_SUFFIXES:
                    continue
                if key in seen:
                    yield Item(key, None, f"a second image for this key ({member.name})", member.name)
                    continue
                seen.add(key)
                try:
                    data = tar.extractfile(member).read()
                except (OSError, tarfile.TarError) as error:
                    yield Item(key, None, f"cannot read the member ({_first_line(error)})", member.name)
                    continue
                yield Item(key, data, None, member.name)
    except (OSError, tarfile.TarError, EOFError) as error:
        yield Item(f"<after {len(seen)} images>", None, f"the tar breaks off ({_first_line(error)})")


def _read_table(unit: Unit) -> Iterator[Item]:
    path = Path(unit.file(unit.path))
    column = unit.image_column
    if path.suffix.lower() == ".parquet":
        rows = _parquet_rows(path, column, unit.start, unit.stop)
    else:
        rows = _text_rows(path)[unit.start : unit.stop]
    for number, row in enumerate(rows, unit.start):
        yield _table_item(path, row, column, number)


def _parquet_rows(path: Path, column: str, start: int, stop: int) -> list[dict]:
    """Rows start..stop of a Parquet file, only the image and key columns, read from the row groups that
    hold them and streamed in record batches: a chunk costs its own rows, not the whole table's."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as file:
        names = file.schema_arrow.names
        wanted = [column, *([KEY_COLUMN] if KEY_COLUMN in names and column != KEY_COLUMN else [])]
        groups, offset, first = [], 0, None
        for group in range(file.num_row_groups):
            size = file.metadata.row_group(group).num_rows
            if offset < stop and offset + size > start:
                groups.append(group)
                first = offset if first is None else first
            offset += size
        rows: list[dict] = []
        position = first or 0
        for batch in file.iter_batches(batch_size=1024, row_groups=groups, columns=wanted):
            begin, end = max(start - position, 0), min(stop - position, batch.num_rows)
            if begin < end:
                rows += batch.slice(begin, end - begin).to_pylist()
            position += batch.num_rows
            if position >= stop:
                break
        return rows


def _table_item(table: Path, row: dict, column: str, number: int) -> Item:
    """A table cell as an image: a path (relative ones from the table's folder) or the file's bytes
    (also Hugging Face's `{"bytes": ..., "path": ...}` image struct)."""
    value = row.get(column)
    if isinstance(value, dict):  # datasets' Image feature
        value = value.get("bytes") or value.get("path")
    key = row.get(KEY_COLUMN)
    if isinstance(value, bytes | bytearray):
        return Item(str(key if key is not None else number), bytes(value), None, f"row {number}")
    if not isinstance(value, str) or not value:
        return Item(str(key if key is not None else number), None, f"row {number}: no image in {column!r}")
    file = os.path.join(table.parent, value)  # an absolute value stays as it is
    return _file_item(str(key) if key is not None else value, file)


def _read_files(unit: Unit) -> Iterator[Item]:
    for path in unit.files:
        yield _file_item(path, unit.file(path))


def _file_item(key: str, path: str) -> Item:
    try:
        return Item(key, Path(path).read_bytes(), None, path)
    except FileNotFoundError:
        return Item(key, None, "no such file", path)
    except OSError as error:
        return Item(key, None, f"cannot read the file ({error.strerror or error})", path)


def _text_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as file:
        if path.suffix.lower() == ".csv":
            return list(csv.DictReader(file))
        return [json.loads(line) for line in file if line.strip()]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
