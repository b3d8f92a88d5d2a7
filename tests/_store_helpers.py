"""Helpers the store tests share: writer scripts run as real processes (so that they can
be killed with SIGKILL), their output, and waiting for a line they print."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def spawn_script(source: str, tmp_path: Path, cfg: dict[str, object]) -> subprocess.Popen[str]:
    """Start the Python script ``source`` (saved once in ``tmp_path``) with ``cfg`` as JSON."""
    script = tmp_path / "writer.py"
    if not script.exists():
        script.write_text(source, encoding="utf-8")
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_script(source: str, tmp_path: Path, cfg: dict[str, object]) -> tuple[int, str]:
    """Run the script to its end: its exit code and its output (stdout, then stderr)."""
    proc = spawn_script(source, tmp_path, cfg)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out + err


def wait_for_line(proc: subprocess.Popen[str], word: str, timeout: float = 30) -> bool:
    """Wait (bounded) until the process prints a line ``word``; False if it ended first."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if line == "":
            return False
        if line.strip() == word:
            return True
    raise AssertionError(f"the writer did not print {word!r} within {timeout} s")


def stop(proc: subprocess.Popen[str]) -> None:
    """Kill a writer the test no longer needs and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


@contextmanager
def spawned_until(
    source: str, tmp_path: Path, cfg: dict[str, object], word: str
) -> Iterator[subprocess.Popen[str]]:
    """The script, running, once it printed the line ``word``; killed and reaped on exit."""
    proc = spawn_script(source, tmp_path, cfg)
    try:
        if not wait_for_line(proc, word):
            raise AssertionError(f"the writer ended before {word!r}: {proc.communicate()}")
        yield proc
    finally:
        stop(proc)
