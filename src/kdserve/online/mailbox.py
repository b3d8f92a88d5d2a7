"""The teacher's side of messaging: an inbox of students' messages, bounded in bytes, and an
outbox of the teacher's messages that every student reads, numbered from 0."""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Any

from kdserve.core.wait import slices
from kdserve.online.messages import encode_message

__all__ = ["RECV_BATCH_BYTES", "Inbox", "Outbox"]

RECV_BATCH_BYTES = 16 << 20  # messages one "recv" answer carries at most (at least one)


class Inbox(queue.Queue[tuple[str, Any]]):
    """Students' ``(sender, message)`` not yet received by the teacher, at most
    ``max_bytes`` of them (as they were sent)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.bytes = 0
        self._sizes: deque[int] = deque()

    def offer(self, item: tuple[str, Any], nbytes: int) -> bool:
        """Queue ``item`` unless that would pass ``max_bytes`` (one message always fits)."""
        with self.mutex:
            if self._sizes and self.bytes + nbytes > self.max_bytes:
                return False
            self.queue.append(item)
            self._sizes.append(nbytes)
            self.bytes += nbytes
            self.unfinished_tasks += 1
            self.not_empty.notify()
        return True

    def _put(self, item: tuple[str, Any]) -> None:
        super()._put(item)
        self._sizes.append(0)

    def _get(self) -> tuple[str, Any]:
        self.bytes -= self._sizes.popleft()
        return super()._get()


class Outbox:
    """The teacher's messages, encoded once, kept for every student to read in order."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._messages: list[bytes] = []
        self._changed = threading.Condition()

    def broadcast(self, message: Any) -> None:
        """Queue ``message``; TypeError/ValueError, and nothing queued, for one that cannot
        be sent."""
        data = encode_message(message, max_bytes=self.max_message_bytes)
        with self._changed:
            self._messages.append(data)
            self._changed.notify_all()

    def after(self, index: int, wait: float) -> list[bytes]:
        """The messages from ``index`` on (at most RECV_BATCH_BYTES of them, and at least
        one), waiting up to ``wait`` seconds for one (a long poll)."""
        with self._changed:
            for step in slices(wait):
                if len(self._messages) > index:
                    break
                self._changed.wait(step)
            fresh: list[bytes] = []
            total = 0
            for message in self._messages[index:]:
                if fresh and total + len(message) > RECV_BATCH_BYTES:
                    break  # the rest comes with the next recv
                fresh.append(message)
                total += len(message)
        return fresh
