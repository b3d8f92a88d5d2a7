"""Fixtures several test files share; the plain helpers behind them are in _helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from _helpers import Scripts


@pytest.fixture
def scripts(tmp_path: Path) -> Iterator[Scripts]:
    """Start Python scripts as processes in ``tmp_path``; at teardown every one of them is
    SIGKILLed and reaped, whatever the test did."""
    started = Scripts(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()
