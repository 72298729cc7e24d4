"""Files the tool makes are private: they hold addresses, the unsubscribe secret, whole issues.

The CLI also sets ``umask 077``; these helpers make a library user with a looser umask just
as safe. They never change the mode of something that already exists (the user's folders,
schedules.yaml, subscribers/): a file or folder gets its mode when this module creates it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """``path`` as a folder; every level that is missing is created 0700, the rest left alone."""
    missing = []
    level = path
    while not level.exists() and level != level.parent:
        missing.append(level)
        level = level.parent
    for folder in reversed(missing):
        # Another process may create it first (two runs, one outbox): that one's mode stands.
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=DIR_MODE)
    return path


def create_private(path: str | os.PathLike[str]) -> None:
    """Create ``path`` as an empty 0600 file unless it exists (the state database, before
    SQLite opens it: SQLite gives its -wal, -shm and -journal files the database's mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as a 0600 file, all or nothing.

    Written then renamed, so a killed process never leaves half a file behind and a rewrite
    replaces the file (and its mode) instead of keeping an old, looser one.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        # A .tmp left behind by a killed run keeps the mode it was created with.
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(data)
    finally:
        if fd != -1:
            os.close(fd)
    os.replace(tmp, path)
