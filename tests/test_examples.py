"""Every ``examples/*.py`` runs as a real subprocess and prints its result line.

A new example is picked up automatically; give it a line in ``EXPECTED`` (the test fails
until it has one, so that each example states what success looks like).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))
TIMEOUT = 120  # seconds per example
# The LM example trains three models (about 80 s on 2 idle cores): room for a busy machine.
SLOW = {"lm_distillation.py": 300}

# The result line each example prints last when it succeeds (a regular expression).
EXPECTED = {
    "two_teachers_offline.py": r"offline: merged 500 samples from 2 teachers in one pass",
    "two_teachers_online.py": r"online: merged 2 teachers for 2 passes",
    "hybrid.py": r"hybrid: merged 300 samples from 1 online \+ 1 offline teacher",
    "torch_training.py": r"torch: kd loss [\d.]+ -> [\d.]+, accuracy",
    "query_mode.py": r"query: 1 query \+ 20 streamed queries answered \(640 rows\)",
    "pantheon_style.py": r"pantheon: merged 500 samples from 1 offline \+ 1 online teacher",
    "lm_distillation.py": r"lm: distilled student perplexity [\d.]+ \(.+\) < label-only [\d.]+",
}


def test_examples_found() -> None:
    assert SCRIPTS, f"no examples in {EXAMPLES}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    assert script.name in EXPECTED, f"add the result line of {script.name} to EXPECTED"
    env = {**os.environ, "PYTHONWARNINGS": "error"}  # the examples are warning-free
    env.pop("KDSERVE_TOKEN", None)  # on 127.0.0.1 the student finds the generated token
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=SLOW.get(script.name, TIMEOUT),
        env=env,
        check=False,
    )
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout}\n{done.stderr}"
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert re.search(EXPECTED[script.name], last), f"unexpected output:\n{done.stdout}"
