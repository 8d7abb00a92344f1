"""Sidecar text files: photo.jpg -> photo.txt next to it (kohya / taggui), each written whole or not at
all; an existing sidecar means the photo is done."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

from imcap.images import IMAGE_SUFFIXES
from imcap.results import CaptionResult
from imcap.writers.base import OutputError, Writer, tag_labels
from imcap.writers.locks import lock

DEFAULT_SIDECAR = ".txt"  # photo.jpg -> photo.txt, as kohya's scripts and taggui expect


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
                lock(fd, f"{folder} is being captioned")
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
