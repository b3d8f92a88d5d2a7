"""Damaged stores fail with a StoreError naming the file and the problem; StoreReader's API.

A truncated, corrupted or missing shard or manifest must never surface as a crash deep
in pyarrow, a wrong answer or a hang: every case below opens, reads or verifies a real
store whose files were damaged on disk, and checks the exception's type and message.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import kdserve as kd

MANIFEST = kd.store.MANIFEST
SCHEMA = kd.Schema(
    [
        kd.Field("logits", "float32", (4,)),
        kd.Field("tokens", "float32", (None, 2)),
        kd.Field("label", "int64"),
    ]
)
BATCH_SIZES = (13, 1, 20, 7, 16, 9, 14, 11, 5, 17)


@dataclass
class Written:
    path: Path
    batches: list[pa.RecordBatch]  # as written, in order
    full: pa.RecordBatch  # every row, in order
    ids: np.ndarray
    logits: np.ndarray


def _write(path: Path, sizes=BATCH_SIZES, shard_bytes=3200, seed=0) -> Written:
    rng = np.random.default_rng(seed)
    batches, row = [], 0
    with kd.StoreWriter(path, SCHEMA, shard_bytes=shard_bytes) as writer:
        for n in sizes:
            ids = 1000 + 3 * np.arange(row, row + n)  # sample ids differ from row numbers
            data = {
                "logits": rng.normal(size=(n, 4)).astype(np.float32),
                # Sequence lengths 0..3 depend on the row only: same layout for any seed.
                "tokens": [rng.normal(size=(i % 4, 2)).astype(np.float32) for i in ids],
                "label": rng.integers(0, 10, size=n),
            }
            batch = kd.to_record_batch(data, SCHEMA, ids)
            writer.write(batch)
            batches.append(batch)
            row += n
    full = pa.concat_batches(batches)
    logits = full.column("logits").flatten().to_numpy().reshape(-1, 4)
    return Written(path, batches, full, full.column("sample_id").to_numpy(), logits)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Written:
    return _write(tmp_path_factory.mktemp("pristine") / "store")


@pytest.fixture
def store(pristine, tmp_path) -> Written:
    """A fresh copy of the pristine store, for a test to damage."""
    path = tmp_path / "store"
    shutil.copytree(pristine.path, path)
    return Written(path, pristine.batches, pristine.full, pristine.ids, pristine.logits)


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _shard(path: Path, index: int) -> Path:
    return path / _manifest(path)["shards"][index]["file"]


def _flip(file: Path, position: int, mask: int = 0xFF) -> None:
    data = bytearray(file.read_bytes())
    data[position] ^= mask
    file.write_bytes(bytes(data))


def _footer_start(data: bytes) -> int:
    """Offset of an Arrow IPC file's footer flatbuffer (before its int32 length and magic)."""
    assert data[-6:] == b"ARROW1"
    (length,) = struct.unpack("<i", data[-10:-6])
    return len(data) - 10 - length


# -- the manifest -------------------------------------------------------------------------


def test_the_pristine_store_is_multi_shard_and_verifies(pristine):
    reader = kd.StoreReader(pristine.path)
    assert len(reader.shards) >= 4
    reader.verify()
    assert len(reader) == sum(BATCH_SIZES)


def test_missing_manifest(store):
    (store.path / MANIFEST).unlink()
    with pytest.raises(kd.StoreError) as info:
        kd.StoreReader(store.path)
    assert str(store.path) in str(info.value)
    assert f"{MANIFEST} is missing" in str(info.value)
    assert info.value.path == str(store.path / MANIFEST)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b'{"format": "kdserve.store", "version": 1, ', b"\xff\xfe\x00garbage"],
    ids=["not-json", "empty", "cut-short", "not-utf8"],
)
def test_manifest_that_is_not_json(store, content):
    (store.path / MANIFEST).write_bytes(content)
    with pytest.raises(kd.StoreError, match="unreadable or corrupted") as info:
        kd.StoreReader(store.path)
    assert str(store.path / MANIFEST) in str(info.value)
    assert info.value.path == str(store.path / MANIFEST)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m.update(format="something.else"), "not a kdserve store manifest"),
        (lambda m: m.pop("format"), "not a kdserve store manifest"),
        (lambda m: m.update(version=99), "format version 99"),
        (lambda m: m.pop("version"), "format version None"),
    ],
    ids=["wrong-format", "no-format", "future-version", "no-version"],
)
def test_manifest_with_wrong_format_or_version(store, edit, problem):
    manifest = _manifest(store.path)
    edit(manifest)
    (store.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(kd.StoreError, match=problem) as info:
        kd.StoreReader(store.path)
    assert str(store.path / MANIFEST) in str(info.value)


def test_manifest_that_is_json_but_not_an_object(store):
    (store.path / MANIFEST).write_text("[1, 2, 3]")
    with pytest.raises(kd.StoreError, match="not a kdserve store manifest") as info:
        kd.StoreReader(store.path)
    assert str(store.path / MANIFEST) in str(info.value)


def _drop_schema(m):
    del m["schema"]


def _drop_shards(m):
    del m["shards"]


def _drop_shard_crc(m):
    del m["shards"][1]["crc32"]


def _drop_shard_rows(m):
    del m["shards"][0]["rows"]


def _shards_not_a_list(m):
    m["shards"] = None


def _crc_not_hex(m):
    m["shards"][0]["crc32"] = "zz"


def _bad_field(m):
    m["schema"]["fields"][0]["dtype"] = "complex-ish"


MANIFEST_DAMAGE = {
    "no-schema": (_drop_schema, "'schema'"),
    "no-shards": (_drop_shards, "'shards'"),
    "no-shard-crc32": (_drop_shard_crc, "'crc32'"),
    "no-shard-rows": (_drop_shard_rows, "'rows'"),
    "shards-null": (_shards_not_a_list, "corrupted"),
    "crc32-not-hex": (_crc_not_hex, "corrupted"),
    "bad-field-dtype": (_bad_field, "corrupted"),
}

OPENERS = {
    "StoreReader": kd.StoreReader,
    "StoreWriter": lambda path: kd.StoreWriter(path, SCHEMA),  # resumes the store
    "Teacher": lambda path: kd.Teacher(out_path=path),  # counts the rows to skip
}


@pytest.mark.parametrize("opener", OPENERS.values(), ids=OPENERS.keys())
@pytest.mark.parametrize(("edit", "problem"), MANIFEST_DAMAGE.values(), ids=MANIFEST_DAMAGE.keys())
def test_manifest_with_missing_or_bad_keys(store, opener, edit, problem):
    manifest = _manifest(store.path)
    edit(manifest)
    (store.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(kd.StoreError, match=problem) as info:
        opener(store.path)
    assert str(store.path / MANIFEST) in str(info.value)
    assert "corrupted" in str(info.value)
    assert info.value.path == str(store.path / MANIFEST)


# -- the shards ---------------------------------------------------------------------------


def test_missing_shard(store):
    shard = _shard(store.path, 2)
    shard.unlink()
    with pytest.raises(kd.StoreError, match="missing") as info:
        kd.StoreReader(store.path)
    assert str(shard) in str(info.value)
    assert info.value.path == str(shard)
    with pytest.raises(kd.StoreError, match="missing or truncated") as info:
        kd.StoreWriter(store.path, SCHEMA)
    assert shard.name in str(info.value) and "overwrite=True" in str(info.value)


def test_shard_deleted_after_the_store_was_opened(store):
    reader = kd.StoreReader(store.path)
    shard = _shard(store.path, 1)
    shard.unlink()
    with pytest.raises(kd.StoreError) as info:
        reader.read(0, len(reader))
    assert str(shard) in str(info.value)


@pytest.mark.parametrize(
    "keep",
    [
        lambda size: size - 1,
        lambda size: size - 10,
        lambda size: size // 2,
        lambda size: 8,
        lambda size: 0,
    ],
    ids=["1-byte-short", "footer-cut", "half", "magic-only", "empty"],
)
def test_truncated_shard(store, keep):
    shard = _shard(store.path, 1)
    data = shard.read_bytes()
    kept = keep(len(data))
    shard.write_bytes(data[:kept])
    with pytest.raises(kd.StoreError, match="truncated") as info:
        kd.StoreReader(store.path)
    assert str(shard) in str(info.value)
    assert f"{kept} bytes on disk" in str(info.value)
    assert info.value.path == str(shard)
    with pytest.raises(kd.StoreError, match="missing or truncated") as info:
        kd.StoreWriter(store.path, SCHEMA)
    assert shard.name in str(info.value)


def test_flipped_bytes_in_the_data_fail_verify_on_crc32(store):
    shard = _shard(store.path, 1)
    size = shard.stat().st_size
    _flip(shard, size // 2)
    assert shard.stat().st_size == size
    reader = kd.StoreReader(store.path)  # same size: opening does not notice
    with pytest.raises(kd.StoreError, match="crc32") as info:
        reader.verify()
    assert str(shard) in str(info.value)
    assert info.value.path == str(shard)


def test_flipped_bytes_in_the_footer_field_names(store):
    # A byte of a field name in the footer turned into invalid UTF-8: pyarrow raises a
    # UnicodeDecodeError while reading the schema; the store must report a corrupted shard.
    shard = _shard(store.path, 2)
    data = shard.read_bytes()
    position = data.rindex(b"logits")
    assert position > _footer_start(data)
    _flip(shard, position, 0x80)
    reader = kd.StoreReader(store.path)
    start = int(sum(s["rows"] for s in _manifest(store.path)["shards"][:2]))
    with pytest.raises(kd.StoreError, match="corrupted") as info:
        reader.read(start, start + 1)
    assert str(shard) in str(info.value)
    with pytest.raises(kd.StoreError, match="corrupted") as info:
        kd.StoreReader(store.path).verify()
    assert str(shard) in str(info.value)
    # The shards before it are still readable.
    assert kd.StoreReader(store.path).read(0, start).equals(store.full.slice(0, start))


def test_every_flipped_byte_of_a_footer_is_a_store_error_or_harmless(tmp_path):
    """Flip each byte of one shard's footer in turn: reading it must raise a StoreError
    naming the shard or return exactly what was written, and verify() must always fail."""
    pristine = _write(tmp_path / "one", sizes=(6, 5, 4), shard_bytes=1 << 20)
    shard = _shard(pristine.path, 0)
    data = shard.read_bytes()
    footer = _footer_start(data)
    outcomes = {"error": 0, "same": 0}
    for position in range(footer, len(data)):
        for mask in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[position] ^= mask
            shard.write_bytes(bytes(damaged))
            reader = kd.StoreReader(pristine.path)
            try:
                got = reader.read(0, len(reader))
            except kd.StoreError as exc:
                assert str(shard) in str(exc), (position, mask, exc)
                outcomes["error"] += 1
            else:
                assert got.equals(pristine.full), (position, mask)
                outcomes["same"] += 1
            with pytest.raises(kd.StoreError, match="crc32"):
                reader.verify()
    shard.write_bytes(data)
    kd.StoreReader(pristine.path).verify()
    assert outcomes["error"] > 100  # most of the footer matters
    assert sum(outcomes.values()) == 2 * (len(data) - footer)


def test_flipped_bytes_in_a_record_batch_header_are_caught_on_read(store):
    # A flip in the metadata of a stored batch (its message header, not its values).
    shard = _shard(store.path, 0)
    data = shard.read_bytes()
    assert pa.ipc.open_file(pa.py_buffer(data)).num_record_batches >= 2
    # Break the int32 metadata length that follows the first batch message's continuation
    # marker: that message follows the schema message, which starts after the 8-byte magic.
    schema_len = struct.unpack("<i", data[12:16])[0]
    first_batch = 8 + 8 + schema_len
    assert data[first_batch : first_batch + 4] == b"\xff\xff\xff\xff"
    _flip(shard, first_batch + 5, 0x7F)  # the metadata length becomes absurd
    with pytest.raises(kd.StoreError, match="corrupted") as info:
        kd.StoreReader(store.path).read(0, 3)
    assert str(shard) in str(info.value)
    with pytest.raises(kd.StoreError, match="crc32"):
        kd.StoreReader(store.path).verify()


def test_a_shard_replaced_by_another_stores_shard_of_the_same_size(store, tmp_path):
    other = _write(tmp_path / "other", seed=1)
    mine, theirs = _shard(store.path, 0), _shard(other.path, 0)
    assert mine.stat().st_size == theirs.stat().st_size  # same shapes, other values
    shutil.copyfile(theirs, mine)
    with pytest.raises(kd.StoreError, match="crc32") as info:
        kd.StoreReader(store.path).verify()
    assert str(mine) in str(info.value)


# -- paths that are not stores ----------------------------------------------------------


def test_a_path_that_is_a_file(tmp_path):
    file = tmp_path / "model.bin"
    file.write_bytes(b"\x00" * 64)
    with pytest.raises(kd.StoreError, match="not a directory") as info:
        kd.StoreReader(file)
    assert str(file) in str(info.value)
    with pytest.raises(kd.StoreError, match="not a directory") as info:
        kd.StoreWriter(file, SCHEMA)
    assert str(file) in str(info.value)
    assert file.read_bytes() == b"\x00" * 64


def test_a_path_that_does_not_exist(tmp_path):
    with pytest.raises(kd.StoreError, match="does not exist") as info:
        kd.StoreReader(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_an_empty_directory(tmp_path):
    with pytest.raises(kd.StoreError, match=f"{MANIFEST} is missing") as info:
        kd.StoreReader(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_shards_without_a_manifest_are_not_overwritten_silently(store):
    (store.path / MANIFEST).unlink()
    shards = sorted(p.name for p in store.path.glob("shard-*"))
    with pytest.raises(kd.StoreError, match="overwrite=True") as info:
        kd.StoreWriter(store.path, SCHEMA)
    assert str(store.path) in str(info.value)
    assert sorted(p.name for p in store.path.glob("shard-*")) == shards  # untouched
    assert not (store.path / MANIFEST).exists()
    with kd.StoreWriter(store.path, SCHEMA, overwrite=True):
        pass
    assert not list(store.path.glob("shard-*"))
    reader = kd.StoreReader(store.path)
    assert len(reader) == 0 and reader.complete


# -- StoreReader's API --------------------------------------------------------------------


def test_len_and_every_range(pristine):
    reader = kd.StoreReader(pristine.path)
    n = len(reader)
    assert n == pristine.full.num_rows == sum(BATCH_SIZES)
    edges = sorted({0, n, *np.cumsum(BATCH_SIZES).tolist()})
    rng = np.random.default_rng(1)
    ranges = [(a, b) for a in edges for b in edges if a <= b]
    ranges += [tuple(sorted(rng.integers(0, n + 1, size=2))) for _ in range(200)]
    ranges += [(e - 1, e + 1) for e in edges[1:-1]]  # across every batch boundary
    for start, stop in ranges:
        got = reader.read(start, stop)
        assert got.num_rows == stop - start
        assert got.schema.equals(pristine.full.schema)
        assert got.equals(pristine.full.slice(start, stop - start)), (start, stop)
        pieces = list(reader.iter_range(start, stop))
        assert sum(p.num_rows for p in pieces) == stop - start
        if pieces:
            assert pa.concat_batches(pieces).equals(got)
    decoded = kd.from_record_batch(reader.read(5, 40), reader.schema)
    np.testing.assert_array_equal(decoded["logits"], pristine.logits[5:40])
    np.testing.assert_array_equal(decoded["sample_id"], pristine.ids[5:40])
    for bad in [(-1, 2), (0, n + 1), (5, 4)]:
        with pytest.raises(IndexError):
            reader.read(*bad)


def test_iter_range_yields_slices_of_the_stored_batches(pristine):
    reader = kd.StoreReader(pristine.path)
    # Each stored batch comes back whole when its exact range is asked for.
    starts = np.cumsum([0, *BATCH_SIZES])
    pieces = list(reader.iter_range())
    assert [p.num_rows for p in pieces] == list(BATCH_SIZES)
    for piece, written in zip(pieces, pristine.batches, strict=True):
        assert piece.equals(written)
    # A range inside one stored batch is a slice of it: same buffers, no copy.
    b = 4
    whole = next(reader.iter_range(int(starts[b]), int(starts[b + 1])))
    part = reader.read(int(starts[b]) + 3, int(starts[b]) + 15)
    assert part.num_rows == 12
    for column in (0, 1, 2, 3):
        got = [buf.address for buf in part.column(column).buffers() if buf is not None]
        want = [buf.address for buf in whole.column(column).buffers() if buf is not None]
        assert got == want, column
    values = part.column(1).buffers()[-1]
    logits = kd.from_record_batch(part, reader.schema)["logits"]
    assert logits.ctypes.data == values.address + 3 * 4 * 4  # 3 rows of 4 float32 in
    np.testing.assert_array_equal(logits, pristine.logits[starts[b] + 3 : starts[b] + 15])
    # ... and those buffers are the memory-mapped shard file itself.
    shard_starts = np.cumsum([0] + [s.rows for s in reader.shards])
    holder = int(np.searchsorted(shard_starts, starts[b], side="right")) - 1
    assert holder > 0  # not simply the first shard
    shard = str(reader.path / reader.shards[holder].file)
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == shard:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            mapped.append((lo, hi))
    assert mapped, f"{shard} is not memory-mapped"
    assert any(lo <= values.address < hi for lo, hi in mapped)
    # Reading the same range again returns the same memory.
    again = reader.read(int(starts[b]) + 3, int(starts[b]) + 15)
    assert again.column(1).buffers()[-1].address == values.address


def test_reading_the_end_does_not_read_what_precedes_it(store):
    # Overwrite the first shard with zeros (same size, so opening the store succeeds):
    # rows in later shards must still read, because a range touches only its own shards.
    first = _shard(store.path, 0)
    first.write_bytes(b"\x00" * first.stat().st_size)
    reader = kd.StoreReader(store.path)
    n = len(reader)
    assert reader.read(n - 5, n).equals(store.full.slice(n - 5, 5))
    assert reader.read(n - 1, n).column(0).to_pylist() == [int(store.ids[-1])]
    rows_first = int(_manifest(store.path)["shards"][0]["rows"])
    assert reader.read(rows_first, n).equals(store.full.slice(rows_first))
    with pytest.raises(kd.StoreError, match="corrupted") as info:
        reader.read(0, 1)
    assert str(first) in str(info.value)


def test_take_returns_the_rows_in_the_order_asked(pristine):
    reader = kd.StoreReader(pristine.path)
    n = len(reader)
    rng = np.random.default_rng(2)
    for rows in (
        rng.permutation(n),
        rng.integers(0, n, size=50),  # repeats
        np.array([n - 1, 0, n // 2, 0, n - 1]),
        np.array([7]),
        np.arange(n)[::-3],
    ):
        got = reader.take(rows)
        assert got.equals(pristine.full.take(pa.array(rows))), rows
        np.testing.assert_array_equal(got.column(0).to_numpy(), pristine.ids[rows])
    assert reader.take(np.array([], dtype=np.int64)).num_rows == 0
    for bad in ([n], [-1], [0, n + 5]):
        with pytest.raises(IndexError):
            reader.take(np.array(bad))


def test_sample_ids(pristine):
    reader = kd.StoreReader(pristine.path)
    ids = reader.sample_ids()
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, 1000 + 3 * np.arange(sum(BATCH_SIZES)))
    shards = _manifest(pristine.path)["shards"]
    assert shards[0]["sample_ids"][0] == 1000
    assert shards[-1]["sample_ids"][1] == int(ids[-1])
