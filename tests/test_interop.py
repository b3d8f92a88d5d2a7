"""A kdserve store is plain Arrow IPC: pyarrow, Polars, DuckDB and Hugging Face datasets read it.

The store holds a fixed-shape float field, an fp16-coded field (stored as float16), a
variable-length sequence field (given as a list of arrays) and an int label, over
several shards. Each tool must see every row, the sample ids, and the values written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

import kdserve as kd

SCHEMA = kd.Schema(
    [
        kd.Field("logits", "float32", (5,)),
        kd.Field("probs", "float32", (3,), codec="fp16"),
        kd.Field("tokens", "float32", (None, 2)),
        kd.Field("label", "int64"),
    ]
)


@dataclass
class Written:
    path: Path
    shards: list[str]  # shard files, in row order
    ids: np.ndarray
    logits: np.ndarray  # float32 (n, 5)
    probs: np.ndarray  # float16 (n, 3): what the fp16 codec stores
    tokens: list[np.ndarray]  # float32 (length_i, 2)
    labels: np.ndarray


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Written:
    path = tmp_path_factory.mktemp("interop") / "teacher"
    rng = np.random.default_rng(7)
    ids, logits, probs, tokens, labels = [], [], [], [], []
    with kd.StoreWriter(path, SCHEMA, shard_bytes=1500) as writer:
        row = 0
        for n in (9, 1, 14, 7, 12, 8, 11):
            batch_ids = 7 + 3 * np.arange(row, row + n)  # sample ids are not row numbers
            batch = {
                "logits": rng.normal(size=(n, 5)).astype(np.float32),
                "probs": rng.random((n, 3)).astype(np.float32),
                "tokens": [
                    rng.normal(size=(int(k), 2)).astype(np.float32)
                    for k in rng.integers(0, 5, size=n)
                ],
                "label": rng.integers(0, 100, size=n),
            }
            writer.write(kd.to_record_batch(batch, SCHEMA, batch_ids))
            ids.append(batch_ids)
            logits.append(batch["logits"])
            probs.append(batch["probs"].astype(np.float16))
            tokens += batch["tokens"]
            labels.append(batch["label"])
            row += n
    reader = kd.StoreReader(path)
    assert len(reader.shards) >= 3  # the tools must cope with a multi-shard store
    assert any(len(t) == 0 for t in tokens)  # an empty sequence too
    return Written(
        path=path,
        shards=[str(path / s.file) for s in reader.shards],
        ids=np.concatenate(ids),
        logits=np.concatenate(logits),
        probs=np.concatenate(probs),
        tokens=tokens,
        labels=np.concatenate(labels),
    )


def _check_table(table: pa.Table, w: Written) -> None:
    n = len(w.ids)
    assert table.num_rows == n
    assert table.column_names == ["sample_id", "logits", "probs", "tokens", "label"]
    np.testing.assert_array_equal(table.column("sample_id").to_numpy(), w.ids)
    logits = table.column("logits").combine_chunks()
    assert logits.type == pa.list_(pa.float32(), 5)
    np.testing.assert_array_equal(logits.flatten().to_numpy().reshape(n, 5), w.logits)
    probs = table.column("probs").combine_chunks()
    assert probs.type == pa.list_(pa.float16(), 3)
    np.testing.assert_array_equal(probs.flatten().to_numpy().reshape(n, 3), w.probs)
    tokens = table.column("tokens").to_pylist()
    for i in (0, 1, n // 2, n - 1):
        np.testing.assert_array_equal(np.array(tokens[i], np.float32).reshape(-1, 2), w.tokens[i])
    assert [len(t) for t in tokens] == [len(t) for t in w.tokens]
    np.testing.assert_array_equal(table.column("label").to_numpy(), w.labels)


def test_pyarrow_dataset_over_the_shard_files(store):
    dataset = ds.dataset(store.shards, format="ipc")
    assert dataset.count_rows() == len(store.ids)
    _check_table(dataset.to_table(), store)
    # kdserve's field metadata travels with the Arrow schema: the schema is recoverable.
    assert kd.Schema.from_arrow(dataset.schema).fields == SCHEMA.fields
    # A filtered scan, as a user would run one.
    picked = dataset.to_table(filter=pc.field("sample_id") == int(store.ids[5]))
    assert picked.num_rows == 1
    np.testing.assert_array_equal(
        picked.column("logits").combine_chunks().flatten().to_numpy(), store.logits[5]
    )


def test_pyarrow_dataset_over_the_store_directory(store):
    dataset = ds.dataset(store.path, format="ipc", ignore_prefixes=[kd.store.MANIFEST])
    assert dataset.files == store.shards
    _check_table(dataset.to_table(), store)


def test_polars(store):
    for frame in (
        pl.concat([pl.read_ipc(f) for f in store.shards]),
        pl.scan_ipc(store.shards).collect(),
    ):
        assert frame.height == len(store.ids)
        assert frame.columns == ["sample_id", "logits", "probs", "tokens", "label"]
        np.testing.assert_array_equal(frame["sample_id"].to_numpy(), store.ids)
        np.testing.assert_array_equal(frame["logits"].to_numpy(), store.logits)
        probs = frame["probs"].to_numpy()
        assert probs.dtype == np.float16
        np.testing.assert_array_equal(probs, store.probs)
        np.testing.assert_array_equal(frame["label"].to_numpy(), store.labels)
        np.testing.assert_array_equal(
            frame["tokens"].list.len().to_numpy(), [len(t) for t in store.tokens]
        )
        for i in (0, 3, len(store.ids) - 1):
            got = frame["tokens"][i].to_numpy().reshape(-1, 2)
            np.testing.assert_array_equal(got, store.tokens[i])


def test_duckdb_through_a_pyarrow_dataset(store):
    dataset = ds.dataset(store.shards, format="ipc")
    con = duckdb.connect()
    # DuckDB has no float16 type: scan the other fields as they are ...
    plain = ["sample_id", "logits", "tokens", "label"]
    con.register("plain", dataset.scanner(columns=plain))
    [(count, id_sum, label_sum)] = con.sql(
        "select count(*), sum(sample_id), sum(label) from plain"
    ).fetchall()
    assert count == len(store.ids)
    assert id_sum == int(store.ids.sum())
    assert label_sum == int(store.labels.sum())

    con.register("plain", dataset.scanner(columns=plain))
    rows = con.sql("select sample_id, logits, tokens from plain order by sample_id").fetchall()
    assert [r[0] for r in rows] == store.ids.tolist()
    for i in (0, 1, len(rows) - 1):
        np.testing.assert_array_equal(np.array(rows[i][1], np.float32), store.logits[i])
        np.testing.assert_array_equal(
            np.array(rows[i][2], np.float32).reshape(-1, 2), store.tokens[i]
        )

    # ... and the fp16-coded field cast to float32 on the Arrow side of the scan.
    columns = {
        "sample_id": pc.field("sample_id"),
        "probs": pc.field("probs").cast(pa.list_(pa.float32(), 3)),
    }
    con.register("probs", dataset.scanner(columns=columns))
    rows = con.sql("select probs from probs order by sample_id").fetchall()
    got = np.array([r[0] for r in rows], np.float32)
    np.testing.assert_array_equal(got, store.probs.astype(np.float32))
    con.close()


def test_hugging_face_datasets(store, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    loaded = datasets.load_dataset(
        "arrow", data_files=store.shards, split="train", cache_dir=str(tmp_path / "hf")
    )
    assert len(loaded) == len(store.ids)
    _check_table(loaded.data.table, store)  # the Arrow table behind the dataset
    np.testing.assert_array_equal(np.asarray(loaded["sample_id"]), store.ids)
    rows = loaded.with_format("numpy")
    for i in (0, 2, len(store.ids) - 1):
        row = rows[i]
        assert row["sample_id"] == store.ids[i]
        np.testing.assert_array_equal(row["logits"], store.logits[i])
        np.testing.assert_array_equal(row["probs"], store.probs[i].astype(np.float32))
        np.testing.assert_array_equal(np.reshape(row["tokens"], (-1, 2)), store.tokens[i])
        assert row["label"] == store.labels[i]
