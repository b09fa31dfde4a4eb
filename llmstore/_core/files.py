"""File helpers shared by exports and backups."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make a new file's name in ``directory`` survive a crash, as well as its contents.

    Directories cannot be opened for fsync everywhere (Windows): there it does nothing.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
