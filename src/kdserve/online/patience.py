"""Patience: how a student waits for a teacher that answers but sends nothing (its program
or reader stuck). It is warned about each minute, and given up on after ``stall_timeout``
seconds, so no wait for knowledge is unbounded."""

from __future__ import annotations

import logging
from collections.abc import Callable

from kdserve.errors import TeacherUnavailableError

__all__ = ["patience"]

_WARN_EVERY = 60.0  # seconds between two warnings about a teacher that sends nothing
_log = logging.getLogger(__name__)


def patience(teacher: str, what: str, timeout: float | None) -> Callable[[float], None]:
    """``waited(seconds)`` for a wait for ``teacher``'s knowledge for ``what`` (e.g.
    "pass 2", "a query"): a warning each minute, and TeacherUnavailableError after
    ``timeout`` s (None: never)."""
    warned = 0  # minutes warned about

    def waited(seconds: float) -> None:
        nonlocal warned
        if timeout is not None and seconds > timeout:
            raise TeacherUnavailableError(
                f"teacher {teacher!r} sent no knowledge for {timeout:g} s of {what} while "
                f"the student waited for it: it answers, but its program or reader seems "
                f"stuck. Check the teacher's process, or raise the student's "
                f"stall_timeout= (None waits forever)",
                teacher=teacher,
            )
        if seconds >= (warned + 1) * _WARN_EVERY:
            warned = int(seconds // _WARN_EVERY)
            _log.warning(
                "student: waiting for teacher %s: no knowledge for %.0f s of %s (it gives up "
                "after stall_timeout=%s s)",
                teacher,
                seconds,
                what,
                "None" if timeout is None else f"{timeout:g}",
            )

    return waited
