"""kdserve's status messages go to the ``kdserve`` logger, silent unless configured (as for
any library); the CLI and the demo show them on stderr with :func:`show_status`."""

from __future__ import annotations

import logging
import sys

__all__ = ["show_status"]


class _StatusHandler(logging.Handler):
    """``[kdserve] message`` lines on whatever ``sys.stderr`` is when a line is logged."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"[kdserve] {self.format(record)}\n")
            sys.stderr.flush()
        except Exception:  # a closed stream must not break the caller
            self.handleError(record)


def show_status(level: int = logging.INFO) -> None:
    """Show kdserve's status lines on stderr from now on; idempotent."""
    logger = logging.getLogger("kdserve")
    logger.setLevel(level)
    if not any(isinstance(h, _StatusHandler) for h in logger.handlers):
        logger.addHandler(_StatusHandler())
