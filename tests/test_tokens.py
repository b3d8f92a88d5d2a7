"""Same-host zero-config auth (kdserve.online.tokens): token files only their user can read.

Each test points ``$XDG_RUNTIME_DIR`` and ``$HOME`` at its own temporary directories, so
nothing outside them is read or written. Clients connect to real TeacherServers on
127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kdserve as kd
from kdserve.online.client import TOKEN_ENV, TeacherClient
from kdserve.online.server import TeacherServer
from kdserve.online.tokens import find_token, publish_token, remove_token, token_dir, token_path

PORT = 8470
HOST = socket.gethostname()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private ``$XDG_RUNTIME_DIR`` (mode 0700), and a home of its own."""
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    folder.chmod(0o700)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(folder))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    return folder


def test_a_published_token_is_a_private_file_in_a_private_directory(runtime):
    path = publish_token(PORT, "secret-1")
    assert path == runtime / "kdserve" / f"{HOST}-{PORT}.token"
    assert path.read_text() == "secret-1\n"
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert os.lstat(path).st_uid == os.getuid()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    # Published again (a teacher restarted on the port): replaced, still private.
    assert publish_token(PORT, "secret-2") == path
    assert path.read_text() == "secret-2\n" and mode(path) == 0o600


def test_a_published_token_stays_private_whatever_the_umask(runtime):
    old = os.umask(0)
    try:
        path = publish_token(PORT, "secret")
    finally:
        os.umask(old)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700


def test_without_a_usable_runtime_directory_the_home_cache_is_used(runtime, monkeypatch):
    home = Path(os.environ["HOME"])
    expected = home / ".cache" / "kdserve" / "run" / f"{HOST}-{PORT}.token"
    runtime.chmod(0o755)  # not private: not used
    assert publish_token(PORT, "from-home") == expected
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")
    assert find_token(f"127.0.0.1:{PORT}") == "from-home"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert find_token(f"127.0.0.1:{PORT}") == "from-home"
    assert mode(expected.parent) == 0o700 and mode(expected) == 0o600


@pytest.mark.parametrize("bad", [0o750, 0o705, 0o777])
def test_a_token_directory_others_can_access_is_refused(runtime, bad):
    folder = runtime / "kdserve"
    folder.mkdir(mode=0o700)
    publish_token(PORT, "secret")
    folder.chmod(bad)
    with pytest.raises(kd.KdserveError, match=r"not a private directory of this user.*0700"):
        publish_token(PORT, "secret")
    with pytest.raises(kd.KdserveError, match="not a private directory"):
        token_dir()
    assert find_token(f"127.0.0.1:{PORT}") is None  # never read from it either
    assert mode(folder) == bad  # and never chmod-ed behind the user's back


def test_a_token_directory_that_is_a_link_is_refused(runtime, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (runtime / "kdserve").symlink_to(target)
    with pytest.raises(kd.KdserveError, match="not a link"):
        publish_token(PORT, "secret")
    assert list(target.iterdir()) == []


def test_a_token_file_others_can_read_or_a_link_is_not_used(runtime, tmp_path):
    path = publish_token(PORT, "secret")
    path.chmod(0o644)
    assert find_token(f"127.0.0.1:{PORT}") is None
    path.chmod(0o600)
    assert find_token(f"127.0.0.1:{PORT}") == "secret"
    planted = tmp_path / "planted"
    planted.write_text("planted\n")
    planted.chmod(0o600)
    path.unlink()
    path.symlink_to(planted)
    assert find_token(f"127.0.0.1:{PORT}") is None


@pytest.mark.parametrize(
    ("address", "found"),
    [
        (f"127.0.0.1:{PORT}", True),
        (f"127.8.9.10:{PORT}", True),
        (f"localhost:{PORT}", True),
        (f"LocalHost:{PORT}", True),
        (f"[::1]:{PORT}", True),
        (f"grpc://127.0.0.1:{PORT}", True),
        (f"grpc+tls://localhost:{PORT}", True),
        (f"127.0.0.1:{PORT + 1}", False),  # another port: another teacher
        (f"10.1.2.3:{PORT}", False),
        (f"0.0.0.0:{PORT}", False),
        (f"{HOST}:{PORT}", False),  # a name that may resolve anywhere
        (f"example.org:{PORT}", False),
        (f"localhost.example.org:{PORT}", False),
        ("127.0.0.1", False),
        ("not an address", False),
    ],
)
def test_only_loopback_addresses_find_the_token(runtime, address, found):
    publish_token(PORT, "secret")
    assert find_token(address) == ("secret" if found else None)


def test_a_token_file_is_named_by_host_and_port(runtime, monkeypatch):
    publish_token(PORT, "this-host")
    monkeypatch.setattr(socket, "gethostname", lambda: "another-host")  # a shared home
    assert find_token(f"127.0.0.1:{PORT}") is None
    assert token_path(PORT).name == f"another-host-{PORT}.token"


def test_removal(runtime):
    path = publish_token(PORT, "secret")
    remove_token(path)
    assert not path.exists()
    assert find_token(f"127.0.0.1:{PORT}") is None
    remove_token(path)  # gone already: nothing happens


@pytest.mark.parametrize("bad", ["", "two\nlines", "x" * 5000])
def test_a_token_must_be_one_line(runtime, bad):
    with pytest.raises(ValueError, match="one line"):
        publish_token(PORT, bad)


@pytest.mark.parametrize("port", [0, -1, 65536, "8470"])
def test_a_port_must_be_a_port(runtime, port):
    with pytest.raises(ValueError, match="a port is an integer"):
        publish_token(port, "secret")


# -- clients --------------------------------------------------------------------------------


@pytest.fixture
def server(runtime: Path) -> Iterator[TeacherServer]:
    """A query-only TeacherServer on 127.0.0.1 whose token is "right"."""
    s = TeacherServer(
        name="t", host="127.0.0.1", port=0, token="right", schema=None, window=None,
        query=lambda batch: batch,
    )  # fmt: skip
    yield s
    stopper = threading.Thread(target=s.shutdown, daemon=True)
    stopper.start()
    stopper.join(20)
    assert not stopper.is_alive(), "shutdown hung"


def client(server: TeacherServer, host: str = "127.0.0.1", **kwargs: Any) -> TeacherClient:
    kwargs = {"connect_timeout": 5.0} | kwargs
    return TeacherClient(f"{host}:{server.port}", name="t", **kwargs)


def test_a_client_without_a_token_uses_the_published_one_on_loopback(server):
    path = publish_token(server.port, "right")
    for host in ("127.0.0.1", "localhost"):
        c = client(server, host)
        assert c.teacher_info().name == "t"
        c.close()
    remove_token(path)
    # None published: the client waits for one (its teacher may be starting), then gives up.
    c = client(server, connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(kd.AuthenticationError, match="no token for teacher") as missing:
        c.teacher_info()
    assert 0.5 <= time.monotonic() - started < 5.0
    assert str(path) in str(missing.value)  # where the token would be
    assert missing.value.teacher == "t"
    c.close()


def test_an_explicit_token_wins_over_the_published_one(server, monkeypatch):
    publish_token(server.port, "stale")
    c = client(server)  # the file's token: refused
    with pytest.raises(kd.AuthenticationError, match="refused the token"):
        c.teacher_info()
    c.close()
    c = client(server, token="right")
    assert c.teacher_info().name == "t"
    c.close()
    monkeypatch.setenv(TOKEN_ENV, "right")
    c = client(server)
    assert c.teacher_info().name == "t"
    c.close()


def test_beyond_loopback_a_token_is_always_needed(server, monkeypatch):
    publish_token(server.port, "right")
    for blank in (None, "", "  "):  # an empty or blank KDSERVE_TOKEN is no token
        if blank is not None:
            monkeypatch.setenv(TOKEN_ENV, blank)
        with pytest.raises(kd.AuthenticationError, match="no token for teacher") as missing:
            TeacherClient(f"10.1.2.3:{server.port}", name="t", token=blank)
        assert "token file" not in str(missing.value) and "publishes" not in str(missing.value)


def test_a_token_with_surrounding_blanks_is_the_token(server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "right\n")  # e.g. KDSERVE_TOKEN=$(cat token-file)
    c = client(server)
    assert c.teacher_info().name == "t"
    c.close()


def test_a_teacher_given_its_token_is_told_apart_from_none_running(server):
    """On loopback without a token: a listening teacher that published none was given
    one (AuthenticationError soon, not after connect_timeout); nothing listening is a
    teacher that is not running (TeacherUnavailableError after connect_timeout)."""
    c = client(server, connect_timeout=30.0)
    started = time.monotonic()
    with pytest.raises(kd.AuthenticationError, match="pass the token the teacher was started"):
        c.teacher_info()
    assert time.monotonic() - started < 10.0
    c.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    c = TeacherClient(f"127.0.0.1:{free}", name="gone", connect_timeout=1.0)
    with pytest.raises(kd.TeacherUnavailableError, match=r"'gone' .* did not answer") as gone:
        c.teacher_info()
    assert gone.value.teacher == "gone"
    c.close()
