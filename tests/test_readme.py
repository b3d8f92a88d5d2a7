"""Every Python snippet in README.md runs, as written, in a fresh directory: the offline
quickstart, the store's interoperability snippet, the online teacher.py/student.py pair
as two processes (no token: same-host discovery), the knowledge core and PyTorch."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
TIMEOUT = 180  # seconds per snippet

# What a snippet takes from the prose around it (names the README leaves to the reader).
CORE = "import numpy as np\nimport kdserve as kd\n"
TORCH = """\
import torch
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
big_model, student = torch.nn.Linear(16, 10), torch.nn.Linear(16, 10)
train_loader = DataLoader(
    TensorDataset(torch.randn(256, 16), torch.randint(0, 10, (256,))), batch_size=64)
"""


def block(marker: str) -> str:
    """The one README snippet that contains ``marker``."""
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"{len(found)} README snippets contain {marker!r}"
    return found[0]


def run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KDSERVE_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**env, "PYTHONWARNINGS": "error"},
        check=False,
    )
    assert done.returncode == 0, f"snippet failed:\n{code}\n--\n{done.stdout}\n{done.stderr}"
    return done


def test_every_snippet_is_covered_here() -> None:
    markers = ["kd.dump(make_teacher", "pyarrow.dataset", "# teacher.py", "# student.py"]
    markers += ["schema = kd.Schema([", "teacher_program(big_model", "topk_kd_loss(student("]
    assert len(BLOCKS) == len(markers)
    for m in markers:
        block(m)


def test_offline_quickstart_then_the_store_with_arrow_tools(tmp_path: Path) -> None:
    out = run(block("kd.dump(make_teacher"), tmp_path).stdout
    assert "{'logits': {'shape': [-1, 10], 'dtype': 'float32', 'lod_level': 0}}" in out
    assert (tmp_path / "knowledge" / "teacher_b" / "manifest.json").exists()
    run(block("pyarrow.dataset"), tmp_path)


def test_online_quickstart_in_two_processes_without_a_token(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    teacher = block("# teacher.py").replace("8470", port)
    student = block("# student.py").replace("8470", port)
    env = {k: v for k, v in os.environ.items() if k != "KDSERVE_TOKEN"}
    proc = subprocess.Popen(
        [sys.executable, "-c", teacher],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert run(student, tmp_path).stdout.strip() == "done"
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == "served 3000 samples", out
    assert f"serving on 127.0.0.1:{port}" in err  # kd.show_status()


def test_knowledge_core(tmp_path: Path) -> None:
    run(CORE + block("schema = kd.Schema(["), tmp_path)


def test_language_models(tmp_path: Path) -> None:
    run(block("topk_kd_loss(student("), tmp_path)


def test_pytorch(tmp_path: Path) -> None:
    run(TORCH + block("teacher_program(big_model"), tmp_path)
