"""File utilities of the store: atomic replacement, fsync of files and directories, crc32."""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

__all__ = ["TMP", "ShardFile", "crc32_file", "fsync", "write_atomic"]

TMP = ".tmp"  # suffix of a file being written; renamed to its name once durable
SYNC_BYTES = 8 << 20  # a shard being written is flushed to disk in the background this often


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


class ShardFile:
    """A shard being written (a file object for ``pa.PythonFile``): its crc32 is computed
    as its bytes are written, and its pages are flushed to disk in the background every
    ``sync_bytes``, so that completing it -- the fsync that makes it durable -- waits
    for little: the host work of durability overlaps the dump instead of following it."""

    def __init__(self, path: Path, sync_bytes: int = SYNC_BYTES) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.sync_bytes = sync_bytes
        self.crc32 = 0
        self.size = 0
        self._unsynced = 0
        self._syncer: threading.Thread | None = None
        self._failed: list[BaseException] = []

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def write(self, data: bytes | memoryview) -> int:
        """Append ``data``; start a background flush once ``sync_bytes`` are unflushed."""
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        self.crc32 = zlib.crc32(view, self.crc32)
        self.size += len(view)
        self._unsynced += len(view)
        if self._unsynced >= self.sync_bytes and not self._syncing():
            self._unsynced = 0
            self._syncer = threading.Thread(
                target=self._sync, args=(os.fdatasync,), name="kdserve-fsync", daemon=True
            )
            self._syncer.start()
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        """Nothing to do: every write goes straight to the file."""

    def close(self) -> None:
        """Arrow closes its sink when the IPC writer closes; the file stays open for
        :meth:`finish`, which makes it durable."""

    def _syncing(self) -> bool:
        if self._failed:
            raise self._failed[0]
        return self._syncer is not None and self._syncer.is_alive()

    def _sync(self, how: Callable[[int], None]) -> None:
        try:
            how(self._fd)
        except BaseException as exc:  # raised on the writer's thread by _syncing/finish
            self._failed.append(exc)

    def finish(self) -> int:
        """Make the file durable (fsync) and close it; return its crc32."""
        try:
            if self._syncer is not None:
                self._syncer.join()
            self._sync(os.fsync)
            if self._failed:
                raise self._failed[0]
        finally:
            self._close_fd()
        return self.crc32

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __del__(self) -> None:  # a writer dropped without close(): its shard is discarded
        syncer = self._syncer
        if syncer is not None and syncer is not threading.current_thread():
            syncer.join()
        self._close_fd()
