"""Helpers several test files share: a free port, a call on a thread waited for with a
bound, Python scripts run as real processes (teachers serving on 127.0.0.1, store writers
that a test kills with SIGKILL), and the teacher script that serves exact values.

Fixtures built on these are in conftest.py. Every wait here is bounded: a hang fails the
test instead of blocking the run.
"""

from __future__ import annotations

import json
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

STARTUP = 30.0  # seconds a teacher process may take to start serving (slow CI)
SERVING = re.compile(r"serving on 127\.0\.0\.1:(\d+)")

# A teacher process serving exact values; argv[1] is its JSON config (name, token, n,
# width, batch; optional: port, times, buf, sleep, log). Sample i is
# ``x = i * width + arange(width)`` (exact in float32), its knowledge
# ``logits = x * 0.5 - 3`` (exact too). With "log", it appends the sample id of the first
# sample of every batch its program runs on (one line per call); "sleep" slows every call.
# It prints "serving on HOST:PORT" on stderr and, when done, {"delivered": n} on stdout.
EXACT_TEACHER = """
import json
import sys
import time

import numpy as np

import kdserve
from kdserve.log import show_status

show_status()  # status lines, such as 'serving on HOST:PORT', on stderr
cfg = json.loads(sys.argv[1])
WIDTH = cfg["width"]
log = open(cfg["log"], "a", buffering=1) if "log" in cfg else None


def samples():
    for i in range(cfg["n"]):
        yield np.arange(WIDTH, dtype=np.float32) + np.float32(i * WIDTH)


def program(feed):
    if log is not None:
        print(int(feed["x"][0, 0]) // WIDTH, file=log)
    if cfg.get("sleep"):
        time.sleep(cfg["sleep"])
    return {"logits": feed["x"] * np.float32(0.5) - np.float32(3)}


options = {"times": cfg.get("times", 1)}
if "buf" in cfg:
    options["buf_size"] = cfg["buf"]
teacher = kdserve.Teacher(
    out_port=cfg.get("port", 0), token=cfg["token"], name=cfg["name"], progress=False
)
teacher.start()
delivered = teacher.start_knowledge_service(
    feed_list=["x"],
    schema=["logits"],
    program=program,
    reader_config={"sample_generator": samples, "batch_size": cfg["batch"]},
    **options,
)
teacher.close()
if log is not None:
    log.close()
print(json.dumps({"delivered": delivered}), flush=True)
"""


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(ready: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``ready()`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


# -- threads ----------------------------------------------------------------------------


class Background:
    """``fn()`` on a daemon thread; :meth:`result` waits for it with a bound (a hang fails
    the test) and raises its error here."""

    def __init__(self, fn: Callable[[], Any], name: str | None = None) -> None:
        self.done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # handed to result()
            self._error = exc
        finally:
            self.done.set()

    def blocked(self, seconds: float = 0.2) -> bool:
        """Whether it is still running after ``seconds`` (taken to be blocked)."""
        return not self.done.wait(seconds)

    def result(self, timeout: float = 20.0) -> Any:
        if not self.done.wait(timeout):
            pytest.fail(f"still running after {timeout} s: a hang")
        if self._error is not None:
            raise self._error
        return self._value


# -- processes that write to files ------------------------------------------------------


class ScriptProc:
    """A Python script run as a process, its JSON config in argv[1]; its stdout and stderr
    go to files beside the script."""

    def __init__(self, script: Path, cfg: dict[str, Any], tag: str) -> None:
        folder = script.parent
        self.cfg = cfg
        self.out_path = folder / f"{tag}.out"
        self.err_path = folder / f"{tag}.err"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), json.dumps(cfg)], stdout=out, stderr=err
            )

    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_serving(self, pattern: re.Pattern[str] = SERVING) -> int:
        """Block (bounded) until the process prints ``pattern`` (it listens); its port."""
        deadline = time.monotonic() + STARTUP
        while time.monotonic() < deadline:
            found = pattern.search(self.stderr())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                pytest.fail(f"teacher exited with {self.proc.returncode}:\n{self.stderr()}")
            time.sleep(0.02)
        pytest.fail(f"teacher not serving after {STARTUP} s:\n{self.stderr()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL
        self.proc.wait(timeout=10)

    def finish(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait for the process to exit on its own; it must succeed. Returns the JSON report
        it printed last on stdout."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"teacher still running {timeout} s after its students finished")
        assert code == 0, f"teacher exited with {code}:\n{self.stderr()}"
        report: dict[str, Any] = json.loads(self.out_path.read_text().splitlines()[-1])
        return report


P = TypeVar("P", bound=ScriptProc)


class Scripts:
    """Starts scripts as processes in ``folder``; :meth:`kill_all` SIGKILLs and reaps every
    one (the ``scripts`` fixture does at teardown)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[ScriptProc] = []

    def start(self, kind: type[P], source: str, cfg: dict[str, Any]) -> P:
        """Save ``source`` as a script and run it as a ``kind`` with ``cfg``."""
        tag = f"p{len(self.procs)}"
        script = self.folder / f"{tag}.py"
        script.write_text(source)
        proc = kind(script, cfg, tag)
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.proc.poll() is None:
                proc.proc.kill()  # SIGKILL every one first, then reap them
        for proc in self.procs:
            proc.proc.wait(timeout=10)


# -- processes with pipes (store writers) -----------------------------------------------


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


def torch_devices() -> list[str]:
    """Devices the torch tests run on: the CPU, and CUDA where this machine has it (so the
    device paths -- streams, pinned memory, top-k on the device -- are tested on a GPU)."""
    import torch

    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
