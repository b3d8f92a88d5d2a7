"""Pantheon's toy demo, ported (tests/pantheon_toy/), runs unchanged on kdserve.

Two teachers predict 2x-1 and 2x+1 for x = 0..max_n-1; the student merges them (the
shared field ``result`` summed: 4x) and prints every sample. As in the toy's README, the
offline, online and hybrid modes must all print the same samples in the same order. The
teachers and the student are separate processes, use Pantheon's calls only (no close(),
no ``with``, no token), and online they may start before or after the student.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import free_port

TOY = Path(__file__).parent / "pantheon_toy"
MAX_N = 300
WAIT = 120  # seconds any toy process may take


def start(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-u", str(TOY / script), *args],
        cwd=TOY,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> str:
    try:
        out, err = process.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{process.args} did not finish in {WAIT} s:\n{out}\n{err}")
    assert process.returncode == 0, f"{process.args} failed:\n{out}\n{err}"
    return out


def teacher(number: int, generator: str, *where: str) -> subprocess.Popen[str]:
    return start(
        f"run_teacher{number}.py",
        *where,
        "--generator_type",
        generator,
        "--max_n",
        str(MAX_N),
        "--batch_size",
        "32" if number == 1 else "50",
    )


def check_student_output(out: str) -> None:
    """Every sample once, in order, with the toy's values; the merged ``result`` is 4x."""
    lines = out.splitlines()
    desc = json.loads(next(line for line in lines if line.startswith("desc "))[5:])
    assert sorted(desc) == ["2x+1", "2x-1", "result", "x"]
    assert desc["result"]["dtype"] == "int64"
    samples = [json.loads(line[7:]) for line in lines if line.startswith("sample ")]
    assert [s["sample_id"] for s in samples] == list(range(MAX_N))
    for i, s in enumerate(samples):
        assert s["x"] in (i, [i])
        assert s["2x-1"] == [2 * i - 1] and s["2x+1"] == [2 * i + 1]
        assert s["result"] == [4 * i]


def test_offline(tmp_path):
    stores = [str(tmp_path / "teacher1_offline"), str(tmp_path / "teacher2_offline")]
    teachers = [
        teacher(1, "sample_generator", "--out_path", stores[0]),
        teacher(2, "batch_generator", "--out_path", stores[1]),
    ]
    for t in teachers:  # both exit without close(): their stores must be complete
        finish(t)
    student = start("run_student.py", "--in_path0", stores[0], "--in_path1", stores[1])
    check_student_output(finish(student))


@pytest.mark.parametrize("student_first", [False, True])
def test_online(student_first):
    ports = [free_port(), free_port()]
    args = [f"--in_address{i}=127.0.0.1:{p}" for i, p in enumerate(ports)]
    processes = []
    if student_first:
        processes.append(start("run_student.py", *args, "--test_send_recv", "true"))
    teachers = [
        teacher(1, "batch_generator", "--out_port", str(ports[0]), "--test_send_recv", "true"),
        teacher(2, "sample_list_generator", "--out_port", str(ports[1]), "--test_send_recv", "1"),
    ]
    if not student_first:
        processes.append(start("run_student.py", *args, "--test_send_recv", "true"))
    out = finish(processes[0])
    check_student_output(out)
    messages = [json.loads(line[8:]) for line in out.splitlines() if line.startswith("message ")]
    assert messages == [
        "greetings from teacher1",
        {"x": 1, "y": 2},
        [3, 5],
        "greetings from teacher2",
        [1],
        [1, 2, 3],
    ]
    for t in teachers:
        assert "recved message from student!" in finish(t)


def test_hybrid(tmp_path):
    store = str(tmp_path / "teacher1_offline")
    finish(teacher(1, "sample_list_generator", "--out_path", store))
    port = free_port()
    online = teacher(2, "batch_generator", "--out_port", str(port))
    student = start("run_student.py", "--in_path0", store, f"--in_address1=127.0.0.1:{port}")
    check_student_output(finish(student))
    finish(online)
