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

Output formats are a dict of writer classes (`WRITERS`), as in whisper's `get_writer`. The package: `base`
(the row every output shares, the Writer interface), `rowfiles` (JSONL, CSV), `sidecars`, `locks`; here
the stdout writer and the choice between them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from imcap.results import CaptionResult
from imcap.writers.base import (
    CAPTION_STYLES,
    OutputError,
    Writer,
    candidate_dict,
    row_dict,
    styled,
    tag_dict,
    tag_labels,
)
from imcap.writers.rowfiles import WRITERS, CsvWriter, JsonlWriter, RowFileWriter
from imcap.writers.sidecars import (
    DEFAULT_SIDECAR,
    SidecarWriter,
    check_sidecar_extension,
    sidecar_clashes,
    write_atomic,
)

__all__ = [
    "CAPTION_STYLES",
    "DEFAULT_SIDECAR",
    "WRITERS",
    "CsvWriter",
    "JsonlWriter",
    "OutputError",
    "RowFileWriter",
    "SidecarWriter",
    "StdoutWriter",
    "Writer",
    "candidate_dict",
    "check_outputs",
    "check_sidecar_extension",
    "get_writer",
    "row_dict",
    "sidecar_clashes",
    "styled",
    "tag_dict",
    "tag_labels",
    "write_atomic",
]


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
