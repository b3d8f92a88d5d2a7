"""File utilities of the store: atomic replacement, fsync of files and directories, crc32."""

from __future__ import annotations

import os
import threading
import zlib
from pathlib import Path

__all__ = ["TMP", "crc32_file", "fsync", "fsync_and_crc32", "write_atomic"]

TMP = ".tmp"  # suffix of a file being written; renamed to its name once durable


def fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` durably: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + TMP)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def crc32_file(path: Path) -> int:
    """crc32 of a file, read in 8 MB chunks (zlib releases the GIL while it hashes)."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 1024 * 1024):
            crc = zlib.crc32(chunk, crc)
    return crc


def fsync_and_crc32(path: Path) -> int:
    """Flush a file to disk and return its crc32, hashed from the page cache meanwhile.

    The crc costs no time of its own (both calls release the GIL). A plain thread, not
    an executor: a teacher completes its store at interpreter exit, when executors
    refuse work.
    """
    failed: list[BaseException] = []

    def sync() -> None:
        try:
            fsync(path)
        except BaseException as exc:  # raised on the caller's thread below
            failed.append(exc)

    syncer = threading.Thread(target=sync, name="kdserve-fsync")
    syncer.start()
    crc = crc32_file(path)
    syncer.join()
    if failed:
        raise failed[0]
    return crc
