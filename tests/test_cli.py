"""The console script, run as a real subprocess."""

import subprocess
import sys
from pathlib import Path

import kdserve
import kdserve as kd

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


def test_demo_runs_and_delivers_every_sample(tmp_path):
    out = _run("demo", "--samples", "3000", "--batch-size", "64", "--out", str(tmp_path / "d"))
    assert out.returncode == 0, out.stderr
    assert "student pass 1" in out.stdout and "47 batches of 64" in out.stdout
    line = next(x for x in out.stdout.splitlines() if "top-1 agreement" in x)
    agreement = float(line.split()[-2])
    assert agreement > 95  # fp16 + top-10 knowledge keeps the ensemble's decisions
    assert len(kd.StoreReader(tmp_path / "d" / "teacher_a")) == 3000
