"""``kd.dump``: the offline teacher in one call -- run a program over data into a store."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from kdserve.store import DEFAULT_SHARD_BYTES, Compression
from kdserve.teacher.encoder import Keep, Program
from kdserve.teacher.feeds import named_feeds
from kdserve.teacher.teacher import Teacher

__all__ = ["dump"]


def dump(
    program: Program,
    data: Any,
    path: str | os.PathLike[str],
    *,
    feeds: Sequence[str] | None = None,
    keep: Keep | None = None,
    use_fp16: bool = False,
    name: str | None = None,
    model: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    compression: Compression = None,
    buf_size: int = 10,
    threads: int = 2,
    inference_threads: int | None = None,
    provenance: Mapping[str, str | int | float | bool] | None = None,
) -> int:
    """Run ``program`` over ``data`` and write its knowledge to the store at ``path``;
    returns the samples written. The store is complete and durable when this returns;
    if it raises, the store stays incomplete and calling it again resumes it.

    ``data`` is any iterable of batches (dicts of arrays name their feeds; tuples need
    ``feeds=[names]``) or a Pantheon reader config (with ``feeds=``); a function of the
    pass without ``feeds=`` is called once more for pass 0, to read the feed names from
    its first batch (pass ``feeds=`` if calling it costs). ``keep`` names the
    knowledge fields -- program outputs or feeds passed through, ``{name: output}``, or a
    :class:`~kdserve.Schema` with codecs; None keeps every output. ``threads`` encode in
    parallel; ``inference_threads`` runs that many program calls at once (default: the
    program's ``concurrency``, e.g. a ``teacher_program``'s lanes; else 1), each on a thread
    of its own with the next call queued behind it (a program with ``submit``, such as a
    ``teacher_program``, gets them submitted to its own threads).
    The other options (``compression`` and ``provenance`` among them) are
    :class:`~kdserve.Teacher`'s.
    """
    feed_list, reader = named_feeds(data, feeds)
    teacher = Teacher(
        path,
        name=name,
        model=model,
        overwrite=overwrite,
        progress=progress,
        shard_bytes=shard_bytes,
        compression=compression,
        provenance=provenance,
    )
    with teacher:
        return teacher.start_knowledge_service(
            feed_list,
            keep,
            program,
            reader,
            buf_size=buf_size,
            use_fp16=use_fp16,
            num_postprocess_threads=threads,
            num_inference_threads=inference_threads,
        )
