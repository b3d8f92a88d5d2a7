"""The store's format: its file names, and the manifest that lists its complete shards,
read with every check a damaged or foreign manifest needs and written atomically."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdserve.core.schema import Schema
from kdserve.errors import StoreError
from kdserve.store.files import write_atomic

__all__ = [
    "DAMAGED",
    "FORMAT",
    "FORMAT_VERSION",
    "LOCK",
    "MANIFEST",
    "SHARD_FILE",
    "SHARD_INDEX",
    "ShardInfo",
    "parse_manifest",
    "read_manifest",
    "timestamp",
    "write_manifest",
]

FORMAT_VERSION = 1
FORMAT = "kdserve.store"  # the manifest's "format": what marks a directory as a store
MANIFEST = "manifest.json"
LOCK = ".lock"
DAMAGED = ".damaged"
SHARD_FILE = re.compile(r"shard-\d+\.arrow(\.tmp)?")  # a shard, listed or left over
SHARD_INDEX = re.compile(r"shard-(\d+)\.arrow")  # the number of any shard-like file


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard as the manifest records it."""

    file: str
    bytes: int
    crc32: int
    min_sample_id: int | None
    max_sample_id: int | None
    batch_rows: tuple[int, ...]
    """Rows of each record batch, so a reader locates rows from the manifest alone."""

    @property
    def rows(self) -> int:
        """Rows the shard holds."""
        return sum(self.batch_rows)

    def to_json(self) -> dict[str, Any]:
        """The shard's manifest entry; batch sizes run-length coded to keep it short."""
        runs: list[list[int]] = []  # [[rows, how many batches], ...]
        for n in self.batch_rows:
            if runs and runs[-1][0] == n:
                runs[-1][1] += 1
            else:
                runs.append([n, 1])
        return {
            "file": self.file,
            "rows": self.rows,
            "bytes": self.bytes,
            "crc32": f"{self.crc32:08x}",
            "sample_ids": [self.min_sample_id, self.max_sample_id],
            "batches": runs,
        }

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> ShardInfo:
        """A shard from its manifest entry; ValueError if its counts disagree."""
        lo, hi = spec["sample_ids"]
        batch_rows = tuple(int(n) for n, count in spec["batches"] for _ in range(int(count)))
        info = cls(spec["file"], int(spec["bytes"]), int(spec["crc32"], 16), lo, hi, batch_rows)
        if info.rows != int(spec["rows"]):
            raise ValueError(f"'rows' of shard {info.file} ({spec['rows']} != {info.rows})")
        return info


def read_manifest(path: Path) -> dict[str, Any]:
    """The parsed manifest of the store at ``path``, checked for format and version."""
    file = path / MANIFEST
    if not path.is_dir():
        why = "is not a directory" if path.exists() else "does not exist"
        raise StoreError(f"no knowledge store at {path}: the path {why}", path=str(path))
    if not file.is_file():
        raise StoreError(
            f"{path} is not a knowledge store: {MANIFEST} is missing (was the dump run with "
            f"out_path={path}?)",
            path=str(file),
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise StoreError(f"{file} is unreadable or corrupted: {exc}", path=str(file)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file} is not a kdserve store manifest", path=str(file))
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{file} has store format version {version}; this kdserve reads version "
            f"{FORMAT_VERSION}. Upgrade kdserve or re-dump the store",
            path=str(file),
        )
    return manifest


def parse_manifest(path: Path, manifest: Mapping[str, Any]) -> tuple[Schema, list[ShardInfo]]:
    """The schema and shards a manifest records; StoreError naming it if they are damaged."""
    file = path / MANIFEST
    entries = manifest.get("shards")
    if not isinstance(entries, list):
        raise StoreError(f"{file} is corrupted: 'shards' is not a list", path=str(file))
    try:
        schema = Schema.from_json(manifest["schema"])
        shards = [ShardInfo.from_json(s) for s in entries]
    except (KeyError, TypeError, ValueError) as exc:  # SchemaError is a ValueError
        raise StoreError(f"{file} is corrupted: bad or missing {exc}", path=str(file)) from None
    seen: set[str] = set()
    for shard in shards:
        # a listed file is a plain shard name inside the store: a path such as
        # "../x" or "/etc/x" would make readers map, and repair rename, files elsewhere
        if not isinstance(shard.file, str) or not SHARD_INDEX.fullmatch(shard.file):
            raise StoreError(
                f"{file} is corrupted: shard file {shard.file!r} is not a shard name "
                "(shard-NNNNN.arrow) inside the store",
                path=str(file),
            )
        if shard.file in seen:
            raise StoreError(
                f"{file} is corrupted: it lists shard {shard.file} twice", path=str(file)
            )
        seen.add(shard.file)
    return schema, shards


def timestamp() -> str:
    """Now, as the manifest records its ``created`` and ``updated`` times (UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Replace the manifest of the store at ``path`` atomically."""
    write_atomic(path / MANIFEST, json.dumps(manifest, indent=1) + "\n")
