"""One output, one run: an exclusive `flock` held while a run writes a file or folder, and who holds it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from imcap.writers.base import OutputError


def lock(fd: int, busy: str) -> None:
    """Hold an exclusive lock on `fd` until it is closed, or raise OutputError: `{busy} by another run`."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(fd)
        raise OutputError(
            f"{busy} by another imcap run{f' (pid {holder})' if holder else ''}; "
            "wait for it to finish or choose another output"
        ) from None


def lock_holder(fd: int) -> int | None:
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
