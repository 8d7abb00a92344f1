"""JSONL and CSV row files: one row per image, appended a batch at a time (flush + fsync), so that a
kill leaves at most a torn last record, which the next run cuts off before it resumes."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from pathlib import Path

from imcap.results import CaptionResult
from imcap.writers.base import OutputError, Writer, first_line, row_dict
from imcap.writers.locks import lock


class RowFileWriter(Writer):
    """Rows in one file, appended a batch per write; reopening it resumes after its last complete row."""

    def __init__(self, path: Path, model: str, settings: dict, overwrite: bool = False, tags: int = 0):
        self.path, self.model, self.tags = Path(path), model, tags
        # K joins the settings each row records, so that resuming with another K counts as a change
        self.settings = {**settings, "tags": tags} if tags else settings
        # locked before it is read, so that no other run can append (or cut a torn line) under us
        self._file = _open_for_rows(self.path)
        try:
            lock(self._file.fileno(), f"{self.path} is being written")
            rows = [] if overwrite else self._recover()
            self._check_same_run(rows)
            if overwrite:
                os.ftruncate(self._file.fileno(), 0)
        except BaseException:
            self._file.close()
            raise
        self._done = {os.path.abspath(row["path"]) for row in rows}
        if os.fstat(self._file.fileno()).st_size == 0:
            self._append(self.header())

    def header(self) -> str:
        return ""

    def encode(self, row: dict) -> str:
        raise NotImplementedError

    def decode(self, text: str) -> list[dict]:
        """Rows of complete records; raise ValueError, naming the record, on anything that is not ours."""
        raise NotImplementedError

    def complete_records(self, data: bytes) -> bytes:
        """`data` up to the end of its last whole record: here, its last newline."""
        return data[: data.rfind(b"\n") + 1]

    def is_done(self, image: Path) -> bool:
        return os.path.abspath(image) in self._done

    def write(self, rows: list[tuple[str, CaptionResult]]) -> None:
        self._append(
            "".join(self.encode(row_dict(path, r, self.model, self.settings, self.tags)) for path, r in rows)
        )

    def close(self) -> None:
        self._file.close()

    def _append(self, text: str) -> None:
        """Write `text` whole, or cut the file back to where it was (a batch is all there or absent)."""
        fd = self._file.fileno()
        start, data = os.fstat(fd).st_size, memoryview(text.encode("utf-8"))
        try:
            while data:  # an unbuffered write may take only part of it
                data = data[self._file.write(data) :]
            os.fsync(fd)  # the batch is on disk before we caption the next one
        except OSError as error:
            try:
                os.ftruncate(fd, start)  # no half row, which a later run could take for a whole one
                os.fsync(fd)
            except OSError:
                pass  # a torn last line is still cut off by the next run
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            raise OutputError(
                f"{self.path}: cannot write ({error.strerror or error}); the rows written before are kept, "
                f"rerun the same command {'when there is room' if full else 'to continue'}"
            ) from error

    def _recover(self) -> list[dict]:
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise OutputError(f"{self.path}: cannot read ({error.strerror or error})") from error
        complete = self.complete_records(data)  # a kill mid-write leaves at most a partial last record
        try:
            rows = self.decode(complete.decode("utf-8"))
        except ValueError as error:  # includes UnicodeDecodeError and json errors
            raise OutputError(
                f"{self.path} exists and is not an imcap output ({first_line(error)}); "
                "pass --overwrite to replace it or choose another output file"
            ) from error
        if len(complete) < len(data):
            os.truncate(self.path, len(complete))
        return rows

    def _check_same_run(self, rows: list[dict]) -> None:
        """Resuming must not mix captions from two models or two sets of settings in one file."""
        ours = {"model": self.model, **self.settings}
        for row in rows:
            theirs = {"model": row["model"], **row["settings"]}
            changed = sorted(
                f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}"
                for k in ours | theirs
                if theirs.get(k) != ours.get(k)
            )
            if changed:
                raise OutputError(
                    f"{self.path} holds captions made with other settings ({', '.join(changed)}); "
                    "pass --overwrite to redo them or choose another output file"
                )


def _open_for_rows(path: Path):
    """The row file, opened to append bytes unbuffered: a failed write leaves nothing to flush later."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "ab", buffering=0)  # noqa: SIM115  (closed by the writer)
    except OSError as error:
        raise OutputError(f"{path}: cannot write ({error.strerror or error})") from error


class JsonlWriter(RowFileWriter):
    def encode(self, row: dict) -> str:
        return json.dumps(row, ensure_ascii=False) + "\n"

    def decode(self, text: str) -> list[dict]:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append(_check_row(json.loads(line), f"line {number}"))
        return rows


class CsvWriter(RowFileWriter):
    COLUMNS = ["path", "caption", "score", "logprob", "candidates", "model", "settings"]
    TAGGED_COLUMNS = [*COLUMNS[:-2], "tags", *COLUMNS[-2:]]  # --tags K
    JSON_COLUMNS = {"candidates", "settings"}  # nested values, JSON-encoded in their cell
    _found_columns: list[str] | None = None  # the header of the file being resumed, if any

    @property
    def columns(self) -> list[str]:
        return self.TAGGED_COLUMNS if self.tags else self.COLUMNS

    def header(self) -> str:
        return self._line(self.columns)

    def encode(self, row: dict) -> str:
        if self.tags:  # one cell, as taggers write it: `tabby:0.8123, tiger cat:0.1021`
            row = {**row, "tags": ", ".join(f"{t['label']}:{t['score']}" for t in row["tags"])}
        return self._line(
            [
                json.dumps(row[c], ensure_ascii=False) if c in self.JSON_COLUMNS else row[c]
                for c in self.columns
            ]
        )

    def complete_records(self, data: bytes) -> bytes:
        """Up to the last newline outside quotes: a cell may hold a newline (from --prefix or --suffix),
        and a record torn just after one must not be taken for a whole one (a quote toggles quoting; a
        doubled quote toggles it twice)."""
        end = position = 0
        quoted = False
        for line in data.split(b"\n")[:-1]:
            position += len(line) + 1
            quoted ^= line.count(b'"') % 2 == 1
            if not quoted:
                end = position
        return data[:end]

    def decode(self, text: str) -> list[dict]:
        if not text:
            return []
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header not in (self.COLUMNS, self.TAGGED_COLUMNS):
            raise ValueError(f"its columns are {header}, not {self.columns}")
        self._found_columns, rows = header, []
        for number, cells in enumerate(reader, 2):
            if len(cells) != len(header):
                raise ValueError(f"row {number} has {len(cells)} columns")
            row = dict(zip(header, cells, strict=True))
            row.update((c, json.loads(row[c])) for c in self.JSON_COLUMNS)
            rows.append(_check_row(row, f"row {number}"))
        return rows

    def _check_same_run(self, rows: list[dict]) -> None:
        super()._check_same_run(rows)  # a file of rows made with another --tags stops here
        if self._found_columns not in (None, self.columns):  # a header without rows under it
            raise OutputError(
                f"{self.path} has the columns of a run {'without' if self.tags else 'with'} --tags; "
                "pass --overwrite to replace it or choose another output file"
            )

    @staticmethod
    def _line(cells: list) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(["" if c is None else c for c in cells])
        return buffer.getvalue()


def _check_row(row: object, where: str) -> dict:
    expected = {"path": str, "model": str, "settings": dict}
    if not (isinstance(row, dict) and all(isinstance(row.get(k), t) for k, t in expected.items())):
        raise ValueError(f"{where} is not an imcap row")
    return row


WRITERS: dict[str, type[RowFileWriter]] = {".jsonl": JsonlWriter, ".csv": CsvWriter}
