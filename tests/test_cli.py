"""The console script, run as a real subprocess."""

import subprocess
import sys
from pathlib import Path

import kdserve

KDSERVE = str(Path(sys.executable).with_name("kdserve"))


def _run(*args):
    return subprocess.run(
        [KDSERVE, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_version_and_help():
    out = _run("--version")
    assert out.returncode == 0 and kdserve.__version__ in out.stdout
    out = _run("--help")
    assert out.returncode == 0 and "decoupled knowledge distillation" in out.stdout
    assert "demo" in out.stdout


def test_unknown_command_fails_with_usage():
    out = _run("frobnicate")
    assert out.returncode == 2 and "No such command 'frobnicate'" in out.stderr


def test_demo_runs_and_delivers_every_sample():
    out = _run("demo", "--samples", "500", "--batch-size", "32")
    assert out.returncode == 0, out.stderr
    assert "500 samples" in out.stdout
