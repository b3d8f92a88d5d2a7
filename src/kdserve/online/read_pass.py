"""The student's side of a knowledge stream: one rank's batches of a pass, reassembled from
Flight messages (:mod:`kdserve.online.serve_pass` sends them) and resumed across broken
connections from the first batch not fully received, so no batch is lost or repeated."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pyarrow as pa
from pyarrow import flight

from kdserve.errors import ProtocolError
from kdserve.online.client_errors import TRANSIENT
from kdserve.online.protocol import Ack, ChunkMeta, Ticket

if TYPE_CHECKING:
    from kdserve.online.client import TeacherClient

__all__ = ["read_pass"]


def read_pass(
    client: TeacherClient,
    pass_: int,
    rank: int,
    world_size: int,
    ack_every: int,
    shares: list[int] | None = None,
    resumed: Callable[[], None] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Rank ``rank``'s batches of pass ``pass_``, acknowledged every ``ack_every``. At the
    end of the pass, ``shares`` (if given) is set to every rank's rows. ``resumed()`` is
    called before a broken stream is asked for again (to check who answers now)."""
    seq = rank  # the next batch this rank needs
    since_ack = 0
    what = f"batch metadata from teacher {client.name!r}"
    cancels = client.cancels
    broken = False
    while True:
        parts: list[pa.RecordBatch] = []
        reader = None
        try:
            if broken and resumed is not None:
                client.check_cancelled(cancels)
                resumed()
            reader = client.get(Ticket(pass_, seq, rank, world_size))
            client.check_cancelled(cancels)  # after get() registered it: none is missed
            for chunk in reader:
                raw = chunk.app_metadata.to_pybytes() if chunk.app_metadata is not None else b""
                meta = ChunkMeta.from_bytes(raw, what)
                if (meta.pass_, meta.seq, meta.part) != (pass_, seq, len(parts)):
                    raise ProtocolError(
                        f"teacher {client.name!r} sent batch {meta} while pass {pass_}, "
                        f"batch {seq}, part {len(parts)} was expected"
                    )
                if meta.shares is not None:  # the end of this rank's pass
                    if shares is not None:
                        shares[:] = meta.shares
                    continue
                parts.append(chunk.data)
                if len(parts) < meta.parts:
                    continue
                # A batch goes on only once all its parts are here.
                for pieces in _batches(parts, meta, client.name):
                    yield from pieces
                    seq += world_size
                    since_ack += 1
                    if since_ack >= ack_every:
                        client.ack(Ack(pass_, seq, rank, world_size))
                        since_ack = 0
                parts = []
        except TRANSIENT:
            client.check_cancelled(cancels)
            broken = True
            continue  # reconnect: the client waits for the teacher, up to connect_timeout
        except flight.FlightError as exc:
            raise client.error(exc) from None
        finally:
            if reader is not None:
                client.release(reader)
        client.ack(Ack(pass_ + 1, rank, rank, world_size))  # the pass is over for this rank
        return


def _batches(
    parts: list[pa.RecordBatch], meta: ChunkMeta, teacher: str
) -> list[list[pa.RecordBatch]]:
    """The batches (each as its parts) of a complete message: a message of several small
    batches (``rows``) is cut back into them, without copying."""
    if meta.rows is None:
        return [parts]
    (data,) = parts
    if sum(meta.rows) != data.num_rows:
        raise ProtocolError(
            f"teacher {teacher!r} sent {data.num_rows} rows as batches of "
            f"{list(meta.rows[:10])} rows"
        )
    starts = list(itertools.accumulate(meta.rows, initial=0))[:-1]
    return [[data.slice(o, r)] for o, r in zip(starts, meta.rows, strict=True)]
