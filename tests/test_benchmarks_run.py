"""Every benchmark script runs its smoke test (``--quick``, seconds): they are not run
otherwise in CI, so a moved or renamed name would break them silently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*_bench.py"))


def test_benchmarks_found() -> None:
    assert BENCHMARKS


@pytest.mark.parametrize("script", BENCHMARKS, ids=[b.name for b in BENCHMARKS])
def test_benchmark_smoke_test_runs(script: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--quick"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "kdserve" in done.stdout  # its table names what it measured
