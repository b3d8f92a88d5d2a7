"""One store from several: the parts a pool of teachers dumped side by side (each a
complete store of its own samples) become one store with one manifest, their shards
linked in under new numbers -- no knowledge is copied or re-encoded."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdserve.core.idset import IdSet
from kdserve.core.schema import Schema
from kdserve.errors import AlignmentError, StoreError
from kdserve.store.files import fsync
from kdserve.store.lock import StoreLock
from kdserve.store.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ShardInfo,
    parse_manifest,
    read_manifest,
    timestamp,
    write_manifest,
)
from kdserve.store.reader import StoreReader

__all__ = ["combine"]


def combine(parts: Sequence[str | os.PathLike[str]], path: str | os.PathLike[str]) -> int:
    """Write the store at ``path`` from the complete stores ``parts`` (one schema, no
    sample id in two of them); returns its rows. The parts are left as they are.

    Crash-safe and idempotent: shards are hard-linked (copied across file systems) and
    the manifest, written last, is what makes the store exist; a combined store that is
    already complete is returned as is, one that is not is redone.
    """
    out = Path(path)
    if (out / MANIFEST).is_file() and read_manifest(out).get("complete"):
        return len(StoreReader(out))
    sources = [Path(p) for p in parts]
    if not sources:
        raise StoreError("combine needs at least one part", path=str(out))
    manifests = [read_manifest(p) for p in sources]
    for p, m in zip(sources, manifests, strict=True):
        if not m.get("complete"):
            raise StoreError(
                f"part {p} is incomplete: finish (resume) its dump before combining",
                path=str(p),
            )
    schema, _ = parse_manifest(sources[0], manifests[0])
    seen = IdSet()
    for p, m in zip(sources, manifests, strict=True):
        _check_same_dump(p, m, parse_manifest(p, m)[0], sources[0], manifests[0], schema)
        if not seen.add_new(StoreReader(p).sample_ids()):
            raise AlignmentError(
                f"part {p} holds sample ids another part holds too: the parts must split "
                f"the samples, each sample in one part"
            )
    out.mkdir(parents=True, exist_ok=True)
    lock = StoreLock(out)
    try:
        shards = _link_shards(sources, manifests, out)
        write_manifest(
            out,
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "created": timestamp(),
                "updated": timestamp(),
                "complete": True,
                "rows": sum(s.rows for s in shards),
                "teacher": manifests[0].get("teacher", {}),
                "schema": schema.to_json(),
                "shards": [s.to_json() for s in shards],
            },
        )
    finally:
        lock.release()
    return sum(s.rows for s in shards)


def _check_same_dump(
    part: Path,
    manifest: dict[str, Any],
    schema: Schema,
    first: Path,
    first_manifest: dict[str, Any],
    first_schema: Schema,
) -> None:
    """StoreError unless ``part`` holds the fields of the first part, dumped by the same
    teacher (name, model, provenance)."""
    if schema.fields != first_schema.fields:
        raise StoreError(
            f"part {part} holds {schema.describe()}, unlike {first} "
            f"({first_schema.describe()}): only parts of one dump can be combined",
            path=str(part),
        )
    for key in ("name", "model", "provenance"):
        mine = (manifest.get("teacher") or {}).get(key)
        theirs = (first_manifest.get("teacher") or {}).get(key)
        if mine != theirs:
            raise StoreError(
                f"part {part} was dumped by a teacher of {key} {mine!r}, part {first} by one "
                f"of {key} {theirs!r}: only parts of one dump can be combined (a teacher is "
                f"named after its store's directory unless given name=: dump every part "
                f"with one name)",
                path=str(part),
            )


def _link_shards(
    sources: list[Path], manifests: list[dict[str, Any]], out: Path
) -> list[ShardInfo]:
    """Every part's shards under ``out`` as ``shard-NNNNN.arrow``, in part order."""
    shards: list[ShardInfo] = []
    for p, m in zip(sources, manifests, strict=True):
        for shard in parse_manifest(p, m)[1]:
            name = f"shard-{len(shards):05d}.arrow"
            target = out / name
            target.unlink(missing_ok=True)  # left by a combine that was interrupted
            try:
                os.link(p / shard.file, target)
            except OSError:  # another file system, or no hard links: copy
                shutil.copyfile(p / shard.file, target)
            shards.append(
                ShardInfo(
                    name,
                    shard.bytes,
                    shard.crc32,
                    shard.min_sample_id,
                    shard.max_sample_id,
                    shard.batch_rows,
                )
            )
    fsync(out)
    return shards
