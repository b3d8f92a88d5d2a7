"""Re-batching: cut a stream of Arrow batches of any sizes into the student's batch size.

Rows keep their order. Slicing is zero-copy; rows are copied only when one output batch
spans several input batches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import pyarrow as pa

from kdserve.core.batch import concat_batches
from kdserve.errors import SchemaError

__all__ = ["Rebatcher", "rebatch"]


class Rebatcher:
    """Streaming re-batcher: ``push`` batches in, get full ``batch_size`` batches out.

    After the last push, ``finish()`` returns the remainder (fewer rows), or None when
    there is none or ``drop_last`` is set.
    """

    def __init__(self, batch_size: int, drop_last: bool = False) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.drop_last = drop_last
        self._pending: deque[pa.RecordBatch] = deque()
        self._rows = 0
        self._schema: pa.Schema | None = None

    @property
    def pending_rows(self) -> int:
        """Rows received but not yet handed out."""
        return self._rows

    def push(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        """Add a batch; return every full batch now available (possibly none)."""
        if self._schema is None:
            self._schema = batch.schema
        elif not batch.schema.equals(self._schema):
            raise SchemaError(
                f"a batch with columns {batch.schema.names} arrived in a stream of "
                f"{self._schema.names}; one stream must keep one schema"
            )
        if batch.num_rows:
            self._pending.append(batch)
            self._rows += batch.num_rows
        ready = []
        while self._rows >= self.batch_size:
            ready.append(self._take(self.batch_size))
        return ready

    def finish(self) -> pa.RecordBatch | None:
        """The last, short batch (None if empty or ``drop_last``); resets the re-batcher."""
        rest = self._take(self._rows) if self._rows and not self.drop_last else None
        self._pending.clear()
        self._rows = 0
        return rest

    def _take(self, rows: int) -> pa.RecordBatch:
        pieces = []
        needed = rows
        while needed:
            head = self._pending[0]
            if head.num_rows <= needed:
                pieces.append(self._pending.popleft())
                needed -= head.num_rows
            else:
                pieces.append(head.slice(0, needed))
                self._pending[0] = head.slice(needed)
                needed = 0
        self._rows -= rows
        return concat_batches(pieces)


def rebatch(
    batches: Iterable[pa.RecordBatch], batch_size: int, drop_last: bool = False
) -> Iterator[pa.RecordBatch]:
    """Yield ``batches``' rows in order, ``batch_size`` at a time (the last may be short)."""
    rebatcher = Rebatcher(batch_size, drop_last)
    for batch in batches:
        yield from rebatcher.push(batch)
    rest = rebatcher.finish()
    if rest is not None:
        yield rest
