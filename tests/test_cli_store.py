"""kdserve dump / inspect / verify, run as real subprocesses on real stores."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import kdserve as kd

KDSERVE = str(Path(sys.executable).with_name("kdserve"))

TEACHER_MODULE = """
import numpy as np

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10

def program(feed):
    return {"logits": feed["x"] @ W}

def samples():
    for i in range(100):
        yield np.full(4, i, dtype=np.float32), i % 3
"""


def _run(*args, cwd=None, env=None):
    return subprocess.run(
        [KDSERVE, *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd,
        env=env,
    )  # fmt: skip


def test_dump_inspect_verify(tmp_path):
    (tmp_path / "myteacher.py").write_text(TEACHER_MODULE)
    store = tmp_path / "store"
    args = ["dump", "--program", "myteacher:program", "--reader", "myteacher:samples"]
    args += ["--feed", "x", "--feed", "y", "--keep", "logits", "--keep", "y"]
    out = _run(*args, "--batch-size", "16", "--out", str(store), "--fp16", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "wrote 100 samples" in out.stdout
    reader = kd.StoreReader(store)
    assert len(reader) == 100 and reader.schema["logits"].codec == kd.Fp16()
    back = kd.from_record_batch(reader.read(0, 100))
    expected = np.repeat(np.arange(100, dtype=np.float32)[:, None], 4, 1) @ (
        np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    )
    np.testing.assert_allclose(back["logits"], expected, rtol=1e-3)

    again = _run(*args, "--batch-size", "16", "--out", str(store), "--fp16", cwd=tmp_path)
    assert again.returncode == 0 and "wrote 0 samples" in again.stdout  # resumed: nothing left

    out = _run("inspect", str(store))
    assert out.returncode == 0, out.stderr
    assert "rows      100" in out.stdout and "complete" in out.stdout
    assert "logits" in out.stdout and '"fp16"' in out.stdout
    manifest = json.loads(_run("inspect", "--json", str(store)).stdout)
    assert manifest["rows"] == 100

    out = _run("verify", str(store))
    assert out.returncode == 0 and "crc32 verified" in out.stdout

    shard = store / reader.shards[0].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = _run("verify", str(store))
    assert out.returncode == 1
    assert "crc32" in out.stderr and shard.name in out.stderr


def test_bad_input_gets_clear_messages(tmp_path):
    out = _run("inspect", str(tmp_path / "missing"))
    assert out.returncode == 1 and "does not exist" in out.stderr
    out = _run("verify", str(tmp_path))
    assert out.returncode == 1 and "manifest.json is missing" in out.stderr
    base = ["dump", "--reader", "x:y", "--feed", "x", "--keep", "y", "--out", str(tmp_path / "s")]
    out = _run(*base, "--program", "nomodule:fn", cwd=tmp_path)
    assert out.returncode == 2 and "cannot import 'nomodule'" in out.stderr
    out = _run(*base, "--program", "justaname", cwd=tmp_path)
    assert out.returncode == 2 and "is not MODULE:NAME" in out.stderr


def test_serve_streams_to_a_student(tmp_path):
    (tmp_path / "myteacher.py").write_text(TEACHER_MODULE)
    env = {**os.environ, "KDSERVE_TOKEN": "cli-secret"}
    args = ["serve", "--program", "myteacher:program", "--reader", "myteacher:samples"]
    args += ["--feed", "x", "--feed", "y", "--keep", "logits", "--batch-size", "10"]
    proc = subprocess.Popen(
        [KDSERVE, *args, "--port", "0", "--times", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()  # "[kdserve] teacher NAME serving on HOST:PORT"
        assert "serving on" in line and "token" not in line  # a given token is never echoed
        address = line.split("serving on ")[1].split()[0]
        student = kd.Student(token="cli-secret", connect_timeout=20)
        student.register_teacher(in_address=address)
        student.start()
        reader = student.get_knowledge_generator(batch_size=25)
        for _ in range(2):
            ids = np.concatenate([b["sample_id"] for b in reader()])
            np.testing.assert_array_equal(ids, np.arange(100))
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "served 200 samples over 2 pass(es)" in out
    finally:
        proc.kill()
        proc.wait(timeout=10)


SINGLE_SAMPLES = """
import numpy as np

def program(feed):
    return {"doubled": feed["x"] * 2}

def samples():  # one sample a time: (4,) each
    for i in range(20):
        yield np.full(4, i, dtype=np.float32)

def batches():
    for i in range(5):
        yield np.full((4, 4), i, dtype=np.float32)
"""


def test_dump_of_single_samples_without_batch_size_warns(tmp_path):
    (tmp_path / "single.py").write_text(SINGLE_SAMPLES)
    args = ["dump", "--program", "single:program", "--feed", "x", "--keep", "doubled"]
    out = _run(*args, "--reader", "single:samples", "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "read as 4 samples of scalars" in out.stderr and "--batch-size" in out.stderr
    out = _run(*args, "--reader", "single:batches", "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr
    out = _run(
        *args, "--reader", "single:samples", "--batch-size", "5", "--out", str(tmp_path / "c"),
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr
    assert kd.StoreReader(tmp_path / "c").schema["doubled"].shape == (4,)


HANGING = """
import os
import threading
import numpy as np

def program(feed):
    if feed["x"][0, 0] >= int(os.environ.get("HANG_AT", 3)):
        open("hung", "w").close()
        threading.Event().wait()  # a program that hangs (a stuck device, a deadlock)
    return {"doubled": feed["x"] * 2}

def batches():
    for i in range(10):
        yield np.full((4, 4), i, dtype=np.float32)
"""


def _interrupted(tmp_path, *args, sig=signal.SIGINT, env=None, ready=None):
    """``kdserve *args`` run until ``ready()`` (or for 2 s), then sent ``sig`` (Ctrl-C's
    SIGINT): how long it took to exit, its exit status and its output."""
    (tmp_path / "hanging.py").write_text(HANGING)
    env = env or {**os.environ, "PYTHONUNBUFFERED": "1", "KDSERVE_TOKEN": "cli-secret"}
    proc = subprocess.Popen(
        [KDSERVE, *args, *("--program", "hanging:program", "--reader", "hanging:batches"),
         *("--feed", "x", "--keep", "doubled")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(2.0)  # serving (no student yet) or dumping (the program hangs)
        deadline = time.monotonic() + 60
        while ready is not None and not ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(sig)
        started = time.monotonic()
        _, err = proc.communicate(timeout=60)
        return time.monotonic() - started, proc.returncode, err
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_ctrl_c_stops_a_serving_teacher_without_students_promptly(tmp_path):
    took, code, err = _interrupted(tmp_path, "serve", "--port", "0")
    assert code != 0 and took < 10, (took, err)
    assert "did not stop within" not in err, err


def test_ctrl_c_stops_a_dump_whose_program_hangs_promptly(tmp_path):
    took, code, err = _interrupted(tmp_path, "dump", "--out", str(tmp_path / "s"))
    assert code != 0 and took < 10, (took, err)
    assert not kd.StoreReader(tmp_path / "s").complete  # valid, incomplete, resumable


def test_sigterm_stops_a_serving_teacher_and_removes_its_token_file(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "KDSERVE_TOKEN"}
    env.update(PYTHONUNBUFFERED="1", XDG_RUNTIME_DIR=str(runtime))  # a token of its own
    tokens = runtime / "kdserve"
    took, code, err = _interrupted(
        tmp_path, "serve", "--port", "0", sig=signal.SIGTERM, env=env,
        ready=lambda: any(tokens.glob("*.token")),
    )  # fmt: skip
    assert code == 128 + signal.SIGTERM and took < 10, (code, took, err)
    assert "terminated" in err and "Traceback" not in err, err
    assert tokens.is_dir() and not list(tokens.iterdir())  # published, then removed


def test_sigterm_stops_a_dump_and_leaves_its_store_resumable(tmp_path):
    store = tmp_path / "s"
    args = ["dump", "--out", str(store)]
    took, code, err = _interrupted(
        tmp_path, *args, sig=signal.SIGTERM, ready=(tmp_path / "hung").exists
    )
    assert code == 128 + signal.SIGTERM and took < 10, (code, took, err)
    assert "terminated" in err and "Traceback" not in err, err
    assert not kd.StoreReader(store).complete
    out = _run(
        *args, "--program", "hanging:program", "--reader", "hanging:batches",
        "--feed", "x", "--keep", "doubled", cwd=tmp_path, env={**os.environ, "HANG_AT": "99"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    stored = kd.from_record_batch(kd.StoreReader(store).read(0, 40))
    np.testing.assert_array_equal(stored["doubled"][:, 0], np.repeat(np.arange(10), 4) * 2)


def test_bad_cli_arguments_get_messages_not_tracebacks(tmp_path):
    base = ["dump", "--reader", "x:y", "--feed", "x", "--keep", "y", "--out", str(tmp_path / "s")]
    out = _run(*base, "--program", "../../etc:passwd", cwd=tmp_path)
    assert out.returncode == 2 and "cannot import '../../etc'" in out.stderr, out.stderr
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [KDSERVE, "pool", "status", "somepool"],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "no Ray cluster" in out.stderr or "needs Ray" in out.stderr, out.stderr
