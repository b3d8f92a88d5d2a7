"""Same-host zero-config auth: a teacher's generated token, in a file only its user can read.

A teacher started without a token makes one up; it publishes it with
:func:`publish_token` as ``<dir>/<hostname>-<port>.token`` (mode 0600) in a per-user
directory (mode 0700): ``$XDG_RUNTIME_DIR/kdserve`` when that runtime directory is set and
usable, else ``~/.cache/kdserve/run``. A student of the same user on the same host that
connects to a loopback address without a token finds it with :func:`find_token`. Other
users cannot read it; other hosts never look (an address beyond loopback needs an explicit
token). A directory or file that another user owns, or that is group/world-accessible, is
refused: trusting it would let that user read, or plant, the token.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
from pathlib import Path

from kdserve.errors import KdserveError
from kdserve.online.address import is_loopback, split_address

# is_loopback and split_address are re-exported: callers imported them from here.
__all__ = [
    "TOKEN_ENV",
    "find_token",
    "given_token",
    "is_loopback",
    "publish_token",
    "remove_token",
    "split_address",
    "token_dir",
    "token_path",
]

TOKEN_ENV = "KDSERVE_TOKEN"
_RUNTIME_ENV = "XDG_RUNTIME_DIR"
_MAX_TOKEN_CHARS = 4096


def given_token(token: str | None) -> str | None:
    """The explicit token: ``token``, else ``KDSERVE_TOKEN``, without surrounding blanks;
    an empty or blank one is no token (never a token anyone could send)."""
    for value in (token, os.environ.get(TOKEN_ENV)):
        if value is not None and value.strip():
            return value.strip()
    return None


def _private(path: Path, kind: int) -> bool:
    """Whether ``path`` is a ``kind`` (not a link) of this user that nobody else can access."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_IFMT(info.st_mode) == kind
        and info.st_uid == os.getuid()
        and info.st_mode & 0o077 == 0
    )


def _runtime_base() -> Path:
    """``$XDG_RUNTIME_DIR`` when set to this user's private directory, else ~/.cache."""
    runtime = os.environ.get(_RUNTIME_ENV)
    if runtime and Path(runtime).is_absolute() and _private(Path(runtime), stat.S_IFDIR):
        return Path(runtime) / "kdserve"
    return Path.home() / ".cache" / "kdserve" / "run"


def token_dir(create: bool = False) -> Path:
    """The per-user directory of token files; ``create`` makes it (mode 0700) if missing.

    KdserveError when it exists but is not a directory of this user that only this user
    can access (it is never chmod-ed or used then).
    """
    path = _runtime_base()
    if create and not os.path.lexists(path):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
    if os.path.lexists(path) and not _private(path, stat.S_IFDIR):
        raise KdserveError(
            f"the token directory {path} is not a private directory of this user (it must "
            f"be owned by uid {os.getuid()}, mode 0700, not a link): fix or remove it"
        )
    return path


def token_path(port: int) -> Path:
    """Where the token of this host's teacher on ``port`` is published."""
    if type(port) is not int or not 0 < port < 1 << 16:
        raise ValueError(f"a port is an integer in 1..65535, got {port!r}")
    return _runtime_base() / f"{socket.gethostname()}-{port}.token"


def publish_token(port: int, token: str) -> Path:
    """Write ``token`` for the teacher on ``port`` (mode 0600, replaced atomically).

    Returns the file's path, for :func:`remove_token` at shutdown. KdserveError when the
    token directory is unsafe (see :func:`token_dir`).
    """
    if not token or "\n" in token or len(token) > _MAX_TOKEN_CHARS:
        raise ValueError("a token is one line of 1 to 4096 characters")
    final = token_path(port)
    folder = token_dir(create=True)
    temporary = folder / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(token + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # the rename itself, durable
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return final


def remove_token(path: Path) -> None:
    """Remove a published token file (nothing if it is gone already)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def find_token(address: str) -> str | None:
    """The published token of the teacher at ``address``, if that address is loopback and
    this host's teacher on its port published one in a private file; else None."""
    parts = split_address(address)
    if parts is None or not is_loopback(parts[0]):
        return None
    path = token_path(parts[1])
    if not _private(path.parent, stat.S_IFDIR) or not _private(path, stat.S_IFREG):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, encoding="utf-8") as source:
            token = source.read(_MAX_TOKEN_CHARS + 2).strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None
