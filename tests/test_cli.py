"""The console script, run as a real subprocess."""

import os
import socket
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


def test_demo_distils_a_student_that_beats_the_label_only_student(tmp_path):
    out = _run("demo", "--out", str(tmp_path / "d"))
    assert out.returncode == 0, out.stderr
    accuracy = {}
    for line in out.stdout.splitlines():
        if line.strip().endswith("%") and "  " in line.strip():
            name, value = line.strip().rsplit(None, 1)
            accuracy[name.strip()] = float(value.rstrip("%"))
    assert accuracy["MLP teacher (online)"] > 90 and accuracy["SVM teacher (store)"] > 90
    distilled, alone = accuracy["student, distilled"], accuracy["student, 30 labels only"]
    assert distilled > alone + 10, accuracy  # clearly beats the same student on labels alone
    assert "800 merged batches of 64" in out.stdout  # 40 passes x 13 batches, none lost
    png = (tmp_path / "d" / "kdserve-demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    store = kd.StoreReader(tmp_path / "d" / "svm-teacher")
    assert len(store) == 1257 and store.complete


def test_demo_on_a_busy_port_says_so(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _run("demo", "--out", str(tmp_path / "d"), "--port", str(port))
    assert out.returncode == 1
    assert f"127.0.0.1:{port}" in out.stderr and "is the port taken" in out.stderr


def test_demo_without_its_extra_names_the_install_command(tmp_path):
    shadow = tmp_path / "shadow" / "sklearn"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('scikit-learn is not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    out = subprocess.run(
        [KDSERVE, "demo", "--out", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert out.returncode == 1
    assert "kdserve demo needs sklearn" in out.stderr and "kdserve[demo]" in out.stderr
