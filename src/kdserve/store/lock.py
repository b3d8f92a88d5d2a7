"""The writer lock: one writer (or repair) at a time holds an ``flock`` on ``STORE/.lock``."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from kdserve.errors import StoreError, StoreLockedError
from kdserve.store.manifest import LOCK

__all__ = ["StoreLock"]


class StoreLock:
    """An exclusive ``flock`` on ``STORE/.lock``, recording its holder's pid and host.

    The OS releases it when the holding process dies, so a crashed writer never blocks
    the next. Taken without waiting: a second writer fails at once with StoreLockedError.
    """

    def __init__(self, store: Path) -> None:
        self.store = store
        self.path = store / LOCK
        self._fd: int | None = None
        # A holder removes the file as it releases; a locker that opened the old file
        # then finds it is no longer the file at the path and tries again (bounded).
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, host = _lock_holder(fd)
                os.close(fd)
                raise _locked_error(store, pid, host) from None
            except OSError as exc:
                os.close(fd)
                raise StoreError(f"cannot lock {self.path}: {exc}", path=str(store)) from None
            if _is_file_at(fd, self.path):
                break
            os.close(fd)
        else:
            raise _locked_error(store, None, None)
        self._fd = fd
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)

    def release(self) -> None:
        """Remove the lock file and release the lock. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _is_file_at(fd, self.path):
                self.path.unlink()
        except OSError:
            pass  # removing the file is tidiness; closing the fd is what releases the lock
        finally:
            os.close(fd)

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_file_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is the file now at ``path``."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


def _lock_holder(fd: int) -> tuple[int | None, str | None]:
    """The pid and host a lock holder recorded (None, None if it has not yet)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return int(record["pid"]), str(record["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _locked_error(store: Path, pid: int | None, host: str | None) -> StoreLockedError:
    """The StoreLockedError naming the writer that holds ``store`` and what to do."""
    who = f"pid {pid} on host {host}" if pid is not None else "pid not yet recorded"
    return StoreLockedError(
        f"the store at {store} is being written by another writer ({who}); wait for that "
        f"writer to finish, or stop it, then retry. A writer that died released its lock "
        f"automatically: there is no lock file to delete",
        path=str(store),
        pid=pid,
        host=host,
    )
