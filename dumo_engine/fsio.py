"""Durable small-file writes (no torch: the config module uses them too)."""
from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """fsync a directory, so that renames into it survive a crash (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write a small text file so that a reader sees the old or the new content, whole, even after a crash."""
    write_bytes_atomic(path, lambda f: f.write(text.encode()))


def write_bytes_atomic(path: str, write) -> None:
    """write(f) fills a binary file object; a reader of path sees the old or the new content, whole, even after a
    crash: a temporary file, fsynced, renamed over path, then the directory fsynced (so the rename is durable)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
