"""Where captions go: JSONL or CSV rows, sidecar text files, or `path<TAB>caption` lines on stdout.

With `tags=K` (`imcap caption --tags K`) each output also gets the image's top K ImageNet tags: a `tags`
list in JSONL, a `tags` column in CSV (`tabby:0.8123, tiger cat:0.1021`), `, tabby, tiger cat` after each
sidecar caption (the kohya / taggui convention) and a third column on stdout. K is part of a row file's
settings, so resuming a file made with another K is refused like any other change of settings.

Every output resumes: rerunning the same command after a crash or Ctrl-C captions only the images that
have no result yet. JSONL and CSV files get one row per image, appended a whole batch at a time with
flush + fsync (a kill can only leave a partial last line, which the next run cuts off); sidecar files are
written to a temporary name and renamed, so one is either complete or absent.

One output, one run: a row file is locked (`flock`) while a run writes it, and so is every folder a sidecar
run writes into (a hidden `.imcap-sidecar.lock`, removed at the end), so a second run on the same output
stops at once with one line instead of interleaving or duplicating rows. A write that fails (disk full,
I/O error) cuts the file back to its last whole batch and stops with one line naming the file; the rows
before it stay and a rerun finishes the job.

Output formats are a dict of writer classes (`WRITERS`), as in whisper's `get_writer`.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from imcap.images import IMAGE_SUFFIXES
from imcap.results import Candidate, CaptionResult, Tag

DEFAULT_SIDECAR = ".txt"  # photo.jpg -> photo.txt, as kohya's scripts and taggui expect
# sentence: "A dog runs on the beach." (alt text); plain: "a dog runs on the beach" (training captions,
# where a prefix, suffix or tag list follows and a full stop mid-text is noise)
CAPTION_STYLES = ("sentence", "plain")


class OutputError(ValueError):
    """An output that cannot be written or resumed; the message is one line saying what to do."""


def row_dict(path: str, result: CaptionResult, model: str, settings: dict, tags: int = 0) -> dict:
    """One output row: the image, its best caption with its score (what ranks candidates) and log-prob,
    every candidate, its top `tags` tags (only when tags > 0), the model and settings. The REST API
    answers with the same names (imcap.serving.schemas)."""
    row = {
        "path": path,
        "caption": result.caption,
        "score": _score(result.score),
        "logprob": _score(result.logprob),
        "candidates": [candidate_dict(c) for c in result.candidates],
    }
    if tags:
        row["tags"] = [tag_dict(t) for t in result.tags[:tags]]
    return {**row, "model": model, "settings": settings}


def styled(text: str, style: str) -> str:
    """A caption in one of CAPTION_STYLES (captions come as sentences)."""
    if style == "sentence" or not text:
        return text
    text = text.removesuffix(".")
    keeps_case = len(text) > 1 and text[1].isupper()  # "TV on a table" stays, "A dog" -> "a dog"
    return text if keeps_case else text[0].lower() + text[1:]


def candidate_dict(candidate: Candidate) -> dict:
    return {"text": candidate.text, "score": _score(candidate.score), "logprob": _score(candidate.logprob)}


def tag_dict(tag: Tag) -> dict:
    return {"label": tag.label, "score": _score(tag.score)}


def _score(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None  # JSON has no -inf


def tag_labels(tags: Sequence[Tag], lower: bool = False) -> str:
    """Tags as taggers write them: `tabby, tiger cat`."""
    return ", ".join(t.label.lower() if lower else t.label for t in tags)


class Writer:
    """Where captions go. `is_done` tells which images an earlier run finished; `write` takes one batch.

    `tags` is how many of each result's tags to write (0: none, and the output is as without tags).
    """

    tags: int = 0

    def is_done(self, image: Path) -> bool:
        return False

    def write(self, rows: list[tuple[str, CaptionResult]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RowFileWriter(Writer):
    """Rows in one file, appended a batch per write; reopening it resumes after its last complete row."""

    def __init__(self, path: Path, model: str, settings: dict, overwrite: bool = False, tags: int = 0):
        self.path, self.model, self.tags = Path(path), model, tags
        # K joins the settings each row records, so that resuming with another K counts as a change
        self.settings = {**settings, "tags": tags} if tags else settings
        # locked before it is read, so that no other run can append (or cut a torn line) under us
        self._file = _open_for_rows(self.path)
        try:
            _lock(self._file.fileno(), f"{self.path} is being written")
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
                f"{self.path} exists and is not an imcap output ({_first_line(error)}); "
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


def _lock(fd: int, busy: str) -> None:
    """Hold an exclusive lock on `fd` until it is closed, or raise OutputError: `{busy} by another run`."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        raise OutputError(
            f"{busy} by another imcap run{f' (pid {holder})' if holder else ''}; "
            "wait for it to finish or choose another output"
        ) from None


def _lock_holder(fd: int) -> int | None:
    """The pid holding a flock on `fd`'s file, from Linux's /proc/locks (None where that cannot tell)."""
    inode = os.fstat(fd).st_ino
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF"; "->" lines are waiters
    for fields in (line.split() for line in lines):
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return int(fields[4]) if fields[4].isdigit() and fields[4] != "0" else None
    return None


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


class SidecarWriter(Writer):
    """photo.jpg -> photo.txt next to it, one caption per line; an existing sidecar means done.

    With tags each line is `caption, tag1, tag2, ...`, labels lowercased (kohya / taggui captions).
    """

    LOCK_NAME = ".imcap-sidecar.lock"  # in each folder being written, while a run writes there

    def __init__(self, extension: str = DEFAULT_SIDECAR, overwrite: bool = False, tags: int = 0):
        self.extension, self.overwrite = check_sidecar_extension(extension), overwrite
        self.tags = tags
        self._locks: dict[str, int | None] = {}  # folder -> the fd of its held lock file

    def sidecar(self, image: Path) -> Path:
        return Path(image).with_suffix(self.extension)

    def is_done(self, image: Path) -> bool:
        self._lock_folder(Path(image).parent)  # before anything is read: caption_files asks first
        return not self.overwrite and self.sidecar(image).exists()

    def write(self, rows: list[tuple[str, CaptionResult]]) -> None:
        for path, result in rows:
            self._lock_folder(Path(path).parent)
            labels = tag_labels(result.tags[: self.tags], lower=True) if self.tags else ""
            # "a dog runs., husky" would split a tag list oddly: the caption's full stop goes first
            lines = [f"{c.text.rstrip('.')}, {labels}" if labels else c.text for c in result.candidates]
            write_atomic(self.sidecar(Path(path)), "\n".join(lines))

    def close(self) -> None:
        for folder, fd in self._locks.items():
            if fd is not None:  # removed while still held, so no other run can be let in by a stale file
                Path(folder, self.LOCK_NAME).unlink(missing_ok=True)
                os.close(fd)
        self._locks.clear()

    def _lock_folder(self, folder: Path) -> None:
        key = os.path.realpath(folder)
        if key in self._locks:
            return
        path = Path(key, self.LOCK_NAME)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
                    self._locks[key] = None  # a folder we cannot write to: no sidecar can be written either
                    return
                raise OutputError(f"{path}: cannot write ({error.strerror or error})") from error
            try:
                _lock(fd, f"{folder} is being captioned")
            except OutputError:
                os.close(fd)
                raise
            try:  # the run before us may have removed the file between our open and our lock: retry
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    self._locks[key] = fd
                    return
            except FileNotFoundError:
                pass
            os.close(fd)


class StdoutWriter(Writer):
    """`path<TAB>caption` lines (one per candidate) on a stream, `path<TAB>caption<TAB>tag1, tag2` with
    tags; nothing to resume."""

    def __init__(self, stream: TextIO | None = None, tags: int = 0):
        self.stream, self.tags = stream or sys.stdout, tags

    def write(self, rows: list[tuple[str, CaptionResult]]) -> None:
        for path, result in rows:
            labels = f"\t{tag_labels(result.tags[: self.tags])}" if self.tags else ""
            for candidate in result.candidates:
                self.stream.write(f"{path}\t{candidate.text}{labels}\n")
        self.stream.flush()


WRITERS: dict[str, type[RowFileWriter]] = {".jsonl": JsonlWriter, ".csv": CsvWriter}


def get_writer(
    output: Path | None = None,
    sidecar: str | None = None,
    *,
    model: str = "",
    settings: dict | None = None,
    overwrite: bool = False,
    tags: int = 0,
) -> Writer:
    """The writer for `--output FILE` (by its suffix), `--sidecar EXT`, or stdout when neither is given;
    `tags`: how many of each image's tags to write.

    Opening a JSONL or CSV file that exists resumes it (unless `overwrite`): see RowFileWriter.
    """
    _check_choice(output, sidecar)
    if sidecar is not None:
        return SidecarWriter(sidecar, overwrite, tags)
    if output is None:
        return StdoutWriter(tags=tags)
    return WRITERS[Path(output).suffix.lower()](Path(output), model, settings or {}, overwrite, tags)


def check_outputs(images: Sequence[Path], output: Path | None, sidecar: str | None) -> None:
    """Reject output settings that cannot work, before any model is loaded."""
    _check_choice(output, sidecar)
    if sidecar is not None and (clashes := sidecar_clashes(images, sidecar)):
        first, second = clashes[0]
        raise OutputError(f"{first} and {second} would share one sidecar file; rename one of them")


def _check_choice(output: Path | None, sidecar: str | None) -> None:
    if output is not None and sidecar is not None:
        raise OutputError("choose one of --output and --sidecar")
    if output is not None and Path(output).suffix.lower() not in WRITERS:
        raise OutputError(f"{output}: the output file must end in {' or '.join(WRITERS)}")
    if sidecar is not None:
        check_sidecar_extension(sidecar)


def check_sidecar_extension(extension: str) -> str:
    looks_right = extension.startswith(".") and len(extension) > 1 and not any(c in extension for c in "/\\")
    if not looks_right or extension.lower() in IMAGE_SUFFIXES:
        raise OutputError(f"sidecar extension must look like .txt or .caption, got {extension!r}")
    return extension


def sidecar_clashes(images: Sequence[Path], extension: str) -> list[tuple[Path, Path]]:
    """Pairs of images that would share one sidecar (photo.jpg and photo.png both -> photo.txt)."""
    owner: dict[str, Path] = {}
    clashes = []
    for image in images:
        sidecar = os.path.abspath(Path(image).with_suffix(extension))
        if sidecar in owner:
            clashes.append((owner[sidecar], image))
        owner.setdefault(sidecar, image)
    return clashes


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary file in the same folder, fsync'd, then renamed over."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden: never taken for a result
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise OutputError(f"{path}: cannot write ({error.strerror or error})") from error
    finally:
        temporary.unlink(missing_ok=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
