"""Durable file helpers shared by the spool, the model registry and the training commands."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

__all__ = ["disk_low", "file_sha256", "fsync_dir"]


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, as 64 lowercase hex digits.

    Parameters
    ----------
    path
        The file to hash; read in chunks by :func:`hashlib.file_digest`.

    Raises
    ------
    OSError
        The file cannot be read.
    """
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a rename into it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_low(path: Path, min_free_mb: float) -> float | None:
    """The free space (MB) on ``path``'s filesystem when it is below ``min_free_mb``, else None
    (also None when the check is off, ``min_free_mb`` 0, or the path cannot be read)."""
    if min_free_mb <= 0:
        return None
    try:
        free_mb = shutil.disk_usage(path).free / 1e6
    except OSError:
        return None
    return free_mb if free_mb < min_free_mb else None
