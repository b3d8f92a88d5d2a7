"""The teacher's side of a knowledge stream: one rank's batches of a pass as Flight messages.

A batch travels as row slices of at most ``chunk_bytes`` (gRPC slows on large messages),
each with :class:`~kdserve.online.protocol.ChunkMeta` ``(pass, seq, part, parts)``;
consecutive small batches that are ready go as one message of up to ``chunk_bytes``
(gRPC's cost is per message), whose ``rows`` give the rows of batches seq,
seq + world_size, ... The pass ends with an empty batch whose ``shares`` give every
rank's rows, so that data-parallel students can even their shares.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pyarrow as pa

from kdserve.core.batch import concat_batches
from kdserve.online.protocol import ChunkMeta, Ticket
from kdserve.online.replay import ReplayWindow

__all__ = ["Message", "pass_messages", "slice_rows"]

Message = tuple[pa.RecordBatch, pa.Buffer]
"""A Flight stream message: a record batch and its app metadata."""


def pass_messages(
    window: ReplayWindow, schema: pa.Schema, ticket: Ticket, chunk_bytes: int
) -> Iterator[Message]:
    """The messages that serve ``ticket``. The ticket is checked against the window (and
    its first batch waited for) now, so that a refusal reaches the client as an error of
    its call rather than mid-stream."""
    batches = window.stream(ticket.pass_, ticket.seq, ticket.rank, ticket.world_size)
    first = next(batches, None)
    items = batches if first is None else itertools.chain([first], batches)
    return _messages(window, schema, ticket, chunk_bytes, items)


def _messages(
    window: ReplayWindow,
    schema: pa.Schema,
    ticket: Ticket,
    chunk_bytes: int,
    items: Iterator[tuple[int, pa.RecordBatch]],
) -> Iterator[Message]:
    pass_, world = ticket.pass_, ticket.world_size
    group: list[tuple[int, pa.RecordBatch]] = []  # small batches sent as one message
    end = ticket.seq  # the rank's next batch; past its last one when the pass is over
    for s, batch in items:
        end = s + world
        if batch.get_total_buffer_size() >= chunk_bytes:
            yield from _grouped(pass_, group)
            group = []
            parts = slice_rows(batch, chunk_bytes)
            for i, part in enumerate(parts):
                yield part, _buffer(ChunkMeta(pass_, s, i, len(parts)))
            continue
        group.append((s, batch))
        full = sum(b.get_total_buffer_size() for _, b in group) >= chunk_bytes
        if full or not window.ready(pass_, s + world):
            yield from _grouped(pass_, group)  # never wait with batches held
            group = []
    yield from _grouped(pass_, group)
    shares = tuple(window.rank_rows(pass_, world, 0.0) or ())
    # (pa.nulls, not from_pylist: that would import pandas, ~0.2 s, mid-stream)
    empty = pa.RecordBatch.from_arrays([pa.nulls(0, f.type) for f in schema], schema=schema)
    yield empty, _buffer(ChunkMeta(pass_, end, shares=shares))


def _grouped(pass_: int, group: list[tuple[int, pa.RecordBatch]]) -> Iterator[Message]:
    """``group`` (consecutive batches of one rank) as one message, if not empty."""
    if not group:
        return
    rows = tuple(b.num_rows for _, b in group) if len(group) > 1 else None
    meta = ChunkMeta(pass_, group[0][0], rows=rows)
    yield concat_batches([b for _, b in group]), _buffer(meta)


def _buffer(meta: ChunkMeta) -> pa.Buffer:
    return pa.py_buffer(meta.to_bytes())


def slice_rows(batch: pa.RecordBatch, chunk_bytes: int) -> list[pa.RecordBatch]:
    """``batch`` as zero-copy row slices of about ``chunk_bytes`` each (at least one row)."""
    rows = batch.num_rows
    if rows <= 1 or batch.nbytes <= chunk_bytes:
        return [batch]
    step = max(1, rows * chunk_bytes // batch.nbytes)
    return [batch.slice(start, step) for start in range(0, rows, step)]
