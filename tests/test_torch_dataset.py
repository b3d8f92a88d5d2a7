"""kdserve.torch.KnowledgeDataset: real stores and a real online teacher, read through
torch DataLoaders (with real worker processes) and torchdata's StatefulDataLoader."""

from __future__ import annotations

import json
import shutil
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

import kdserve as kd
from kdserve.store import repair
from kdserve.torch import KnowledgeDataset
from kdserve.torch.dataset import to_tensors

N = 90
TB = 16  # the teachers' reader batch size
RNG = np.random.default_rng(11)
X = RNG.normal(size=(N, 4)).astype(np.float32)
WA = RNG.normal(size=(4, 5)).astype(np.float32)
WB = RNG.normal(size=(4, 5)).astype(np.float32)
TOKEN = "dataset-test-token"
JOIN = 20.0


def _gen() -> Iterable[tuple[Any, ...]]:
    for i in range(N):
        yield X[i], i


def _seq(i: int) -> np.ndarray:
    """Sample i's sequence: i % 4 steps (0 included) of 2 floats."""
    return np.arange(2 * (i % 4), dtype=np.float32).reshape(-1, 2) + i


def _program(w: np.ndarray) -> Any:
    def program(feed: dict[str, Any]) -> dict[str, Any]:
        ids = feed["sample_id"]
        return {"logits": feed["x"] @ w, "seq": [_seq(int(i)) for i in ids]}

    return program


def _service_kwargs(w: np.ndarray, schema: list[str]) -> dict[str, Any]:
    return {
        "feed_list": ["x", "sample_id"],
        "schema": schema,
        "program": _program(w),
        "reader_config": {"sample_generator": _gen, "batch_size": TB},
    }


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("torch-dataset-stores")
    for name, w, schema in (("a", WA, ["logits", "seq"]), ("b", WB, ["logits"])):
        with kd.Teacher(root / name, progress=False) as teacher:
            teacher.start_knowledge_service(**_service_kwargs(w, schema))
    return root


def _read(dataset: KnowledgeDataset, num_workers: int = 0) -> list[dict[str, torch.Tensor]]:
    return list(DataLoader(dataset, batch_size=None, num_workers=num_workers))


def _ids(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return [int(i) for b in batches for i in b["sample_id"]]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_ranks_and_workers_read_every_sample_once(
    stores: Path, num_workers: int, world_size: int
) -> None:
    batches: list[dict[str, torch.Tensor]] = []
    for rank in range(world_size):
        dataset = KnowledgeDataset(
            [stores / "a", stores / "b"],
            batch_size=8,
            merge_strategy={"logits": "mean"},
            rank=rank,
            world_size=world_size,
            even_ranks="none",  # exactly once; the default pads ranks to equal length
        )
        mine = _read(dataset, num_workers)
        assert mine and all(len(b["sample_id"]) <= 8 for b in mine)
        batches += mine
    ids = _ids(batches)
    assert sorted(ids) == list(range(N))  # every sample, exactly once
    logits = torch.cat([b["logits"] for b in batches]).numpy()
    expected = np.mean(np.stack([X @ WA, X @ WB]), axis=0)[ids]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    assert all(b["sample_id"].dtype == torch.int64 for b in batches)
    assert all(b["logits"].dtype == torch.float32 for b in batches)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("even", ["pad", "drop"])
def test_ranks_get_the_same_number_of_batches(stores: Path, num_workers: int, even: str) -> None:
    # 90 samples over 2 ranks (x 2 workers) in batches of 20: uneven shares would give the
    # ranks different batch counts and deadlock a DDP job in its next collective.
    counts, ids = [], []
    for rank in (0, 1):
        dataset = KnowledgeDataset(
            [stores / "b"], batch_size=20, rank=rank, world_size=2, even_ranks=even
        )
        mine = _read(dataset, num_workers)
        counts.append(len(mine))
        ids += _ids(mine)
    assert counts[0] == counts[1]
    parts = 2 * max(num_workers, 1)
    if even == "pad":
        assert set(ids) == set(range(N)) and len(ids) == parts * -(-N // parts)
    else:
        assert len(set(ids)) == len(ids) == parts * (N // parts)


def test_values_equal_the_stored_knowledge(stores: Path) -> None:
    batches = _read(KnowledgeDataset([stores / "b"], batch_size=32), num_workers=2)
    ids = _ids(batches)
    assert sorted(ids) == list(range(N))
    reader = kd.StoreReader(stores / "b")
    stored = kd.from_record_batch(reader.take(np.arange(len(reader))))
    order = np.argsort(stored["sample_id"])
    got = torch.cat([b["logits"] for b in batches]).numpy()[np.argsort(ids)]
    np.testing.assert_array_equal(got, stored["logits"][order])


def _mapped_ranges(directory: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of files under ``directory``."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(str(directory.resolve())):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def test_fixed_shape_fields_share_the_arrow_memory(stores: Path) -> None:
    # The conversion itself wraps the arrays that kdserve reads from Arrow.
    reader = kd.StoreReader(stores / "a")
    knowledge = kd.from_record_batch(reader.take(np.arange(10)))
    tensors = to_tensors(knowledge)
    for name in ("sample_id", "logits"):
        assert tensors[name].data_ptr() == knowledge[name].ctypes.data, name
    # End to end: the loader's tensors point into the store's memory-mapped shard files.
    dataset = KnowledgeDataset([stores / "a"], batch_size=16)
    seen = 0
    for batch in DataLoader(dataset, batch_size=None, num_workers=0):
        ranges = _mapped_ranges(stores / "a")
        assert ranges, "the store is not memory-mapped"
        for name in ("sample_id", "logits"):
            ptr = batch[name].data_ptr()
            assert any(lo <= ptr < hi for lo, hi in ranges), f"{name} was copied"
        seen += 1
    assert seen == -(-N // 16)


def test_ragged_field_becomes_padded_tensor_and_lengths(stores: Path) -> None:
    batches = _read(KnowledgeDataset([stores / "a"], batch_size=12), num_workers=2)
    assert sorted(_ids(batches)) == list(range(N))
    for b in batches:
        padded, lengths = b["seq"], b["seq_lengths"]
        assert lengths.dtype == torch.int64
        assert padded.shape == (len(b["sample_id"]), int(lengths.max()), 2)
        for row, i in enumerate(b["sample_id"].tolist()):
            want = _seq(i)
            assert int(lengths[row]) == len(want)
            np.testing.assert_array_equal(padded[row, : len(want)].numpy(), want)
            assert not padded[row, len(want) :].any()  # zero padding


def _order(stores: Path, epoch: int, seed: int = 5, **kwargs: Any) -> list[int]:
    dataset = KnowledgeDataset(
        [stores / "a", stores / "b"],
        batch_size=10,
        merge_strategy={"logits": "mean"},
        shuffle=True,
        seed=seed,
        block_rows=8,
        **kwargs,
    )
    dataset.set_epoch(epoch)
    return _ids(_read(dataset))


def test_shuffle_follows_seed_and_epoch(stores: Path) -> None:
    e0, e1 = _order(stores, 0), _order(stores, 1)
    assert sorted(e0) == sorted(e1) == list(range(N))
    assert e0 != e1 and e0 != list(range(N))
    assert _order(stores, 1) == e1  # another instance, same seed and epoch
    assert _order(stores, 1, seed=6) != e1
    # The ranks of one epoch agree on the order: together they read it once.
    halves = [_order(stores, 1, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(halves[0] + halves[1]) == list(range(N))


def _resumable(stores: Path, **change: Any) -> KnowledgeDataset:
    options: dict[str, Any] = {"batch_size": 4, "shuffle": True, "seed": 1, "block_rows": 16}
    return KnowledgeDataset(
        [stores / "a", stores / "b"], merge_strategy={"logits": "mean"}, **(options | change)
    )


# torchdata 0.11's StatefulDataLoader.__init__ calls torch.set_vital, deprecated in torch 2.13.
@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_resumes_mid_epoch(stores: Path, num_workers: int) -> None:
    full = _resumable(stores)
    full.set_epoch(2)
    whole = _ids(_read(full, num_workers))
    dataset = _resumable(stores)
    dataset.set_epoch(2)
    loader = StatefulDataLoader(dataset, batch_size=None, num_workers=num_workers)
    first: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        first.append(batch)
        if len(first) == 7:
            break
    state = loader.state_dict()
    del loader
    fresh = _resumable(stores)  # at epoch 0: the state brings epoch 2 back
    resumed = StatefulDataLoader(fresh, batch_size=None, num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = list(resumed)
    ids = _ids(first) + _ids(rest)
    assert len(first) == 7 and rest
    assert sorted(ids) == list(range(N))  # every sample of the epoch exactly once
    assert ids == whole  # and in the order of an uninterrupted epoch
    if num_workers == 0:
        assert fresh.state_dict()["batches"] == len(first) + len(rest)


def _mid_pass_state(stores: Path) -> dict[str, Any]:
    dataset = _resumable(stores)
    it = iter(dataset)
    for _ in range(3):
        next(it)
    del it
    return dataset.state_dict()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"batch_size": 5}, "batch_size"),
        ({"shuffle": False}, "shuffle"),
        ({"seed": 8}, "seed"),
        ({"rank": 1, "world_size": 2}, "part"),
    ],
)
def test_a_mid_pass_state_is_refused_by_a_dataset_that_would_skip_other_samples(
    stores: Path, change: dict[str, Any], key: str
) -> None:
    state = _mid_pass_state(stores)
    other = _resumable(stores, **change)
    with pytest.raises(ValueError, match=rf"saved with {key}=.*samples would be lost"):
        other.load_state_dict(state)
    assert other.state_dict()["batches"] == 0  # nothing changed
    other.load_state_dict(state | {"batches": 0})  # the start of the epoch is always fine


def test_a_mid_pass_state_is_refused_once_a_store_was_rewritten(stores: Path, tmp_path) -> None:
    copy = tmp_path / "stores"
    shutil.copytree(stores, copy)
    state = _mid_pass_state(copy)
    manifest = copy / "a" / "manifest.json"
    spec = json.loads(manifest.read_text())
    spec["created"] = "2030-01-01T00:00:00Z"  # what a dump started over records
    manifest.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="saved with teachers="):
        _resumable(copy).load_state_dict(state)
    with pytest.warns(UserWarning, match="cannot be checked"):  # a state of kdserve <= 0.x
        _resumable(copy).load_state_dict({"epoch": 0, "batches": 3})
    older = _mid_pass_state(copy)  # stores named without their shards' order, as before
    older["plan"]["teachers"] = [t[:2] for t in older["plan"]["teachers"]]
    with pytest.warns(UserWarning, match="without their shards' order"):
        _resumable(copy).load_state_dict(older)


def test_a_mid_pass_state_is_refused_once_a_store_was_repaired_and_re_run(tmp_path) -> None:
    # Repair sets a damaged middle shard aside and the re-run appends its samples at the
    # end: same creation time, same rows, another order -- the skipped batches would be
    # other samples (5 lost, 5 read twice here before the shards' checksums counted).
    x = np.arange(30, dtype=np.float32)[:, None].repeat(4, 1)
    data = [{"x": x[i : i + 5]} for i in range(0, 30, 5)]
    store = tmp_path / "s"

    def dump() -> None:
        kd.dump(lambda f: {"logits": f["x"] * 2}, data, store, shard_bytes=1, progress=False)

    dump()  # a shard per batch
    dataset = KnowledgeDataset([store], batch_size=5)
    it = iter(dataset)
    first = [next(it) for _ in range(3)]
    state = dataset.state_dict()
    del it
    shard = store / kd.StoreReader(store).shards[1].file
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    assert [n for n, _ in repair(store)] == [shard.name]
    dump()
    again = KnowledgeDataset([store], batch_size=5)
    with pytest.raises(ValueError, match="saved with teachers="):
        again.load_state_dict(state)
    rest = list(again)  # from the start of the pass, every sample once
    assert sorted(_ids(rest)) == list(range(30)) and _ids(first) == list(range(15))


def test_state_dict_round_trip_and_bad_states(stores: Path) -> None:
    dataset = _resumable(stores)
    dataset.set_epoch(1)
    it = iter(dataset)
    skipped = [next(it) for _ in range(3)]
    assert dataset.state_dict()["epoch"] == 1 and dataset.state_dict()["batches"] == 3
    del it
    other = _resumable(stores)
    other.load_state_dict(dataset.state_dict())
    assert other.epoch == 1
    rest = list(other)
    full = _resumable(stores)
    full.set_epoch(1)
    assert _ids(skipped) + _ids(rest) == _ids(list(full))

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['extra'\]"):
        dataset.load_state_dict({"epoch": 0, "batches": 0, "extra": 1})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['batches'\]"):
        dataset.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match=r"state\['epoch'\] must be an int >= 0, got '1'"):
        dataset.load_state_dict({"epoch": "1", "batches": 0})
    with pytest.raises(ValueError, match=r"state\['batches'\] must be an int >= 0, got -1"):
        dataset.load_state_dict({"epoch": 0, "batches": -1})
    with pytest.raises(TypeError, match="state must be a mapping"):
        dataset.load_state_dict([("epoch", 0)])  # type: ignore[arg-type]
    assert dataset.state_dict()["batches"] == 3  # refused states change nothing

    online = KnowledgeDataset(["127.0.0.1:1"], batch_size=4)  # connects only when read
    online.load_state_dict({"epoch": 3, "batches": 0})  # the start of an epoch is fine
    assert online.state_dict()["epoch"] == 3 and online.state_dict()["batches"] == 0
    with pytest.raises(ValueError, match="online teachers have already served them"):
        online.load_state_dict({"epoch": 3, "batches": 2})


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="neither an existing store directory"):
        KnowledgeDataset(["/no/such/store"], batch_size=4)
    with pytest.raises(ValueError, match="at least one teacher"):
        KnowledgeDataset([], batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        KnowledgeDataset(["127.0.0.1:1"], batch_size=0)
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        KnowledgeDataset(["127.0.0.1:1"], batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        KnowledgeDataset(["127.0.0.1:1"], batch_size=4).set_epoch(-1)
    for name in ("connect_timeout", "stall_timeout"):  # refused here, not in a worker
        with pytest.raises(ValueError, match=f"{name} must be > 0 seconds"):
            KnowledgeDataset(["127.0.0.1:1"], batch_size=4, **{name: 0})
    bad = {"seed": (-1, "seed"), "block_rows": (0, "block_rows"), "even_ranks": ("x", "even")}
    for name, (value, said) in bad.items():  # here too, not at first use
        with pytest.raises(ValueError, match=f"{said} must be"):
            KnowledgeDataset(["127.0.0.1:1"], batch_size=4, **{name: value})
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        kd.Student(seed=-1, shuffle=True)


def test_allow_incomplete_reads_a_store_whose_dump_has_not_finished(tmp_path) -> None:
    x = np.arange(12, dtype=np.float32)[:, None]

    def failing(feed: dict[str, Any]) -> dict[str, Any]:
        if feed["x"][0, 0] >= 8:
            raise RuntimeError("the teacher died")
        return {"y": feed["x"] * 2}

    with pytest.raises(RuntimeError, match="died"):
        kd.dump(failing, [{"x": x[i : i + 4]} for i in range(0, 12, 4)], tmp_path / "s",
                shard_bytes=1, progress=False)  # fmt: skip
    with pytest.raises(kd.StoreError, match="allow_incomplete=True"):
        list(KnowledgeDataset([tmp_path / "s"], batch_size=4))
    batches = list(KnowledgeDataset([tmp_path / "s"], batch_size=4, allow_incomplete=True))
    assert _ids(batches) == list(range(8))
    assert all(torch.equal(b["y"][:, 0], b["sample_id"].float() * 2) for b in batches)


def test_workers_forked_from_a_serving_process_say_so_and_spawned_ones_read() -> None:
    # gRPC does not survive fork: a DataLoader worker forked from a process running a
    # teacher's server hung in its first call (connect_timeout and stall_timeout unheard).
    x = np.arange(23, dtype=np.float32)[:, None]
    data = [{"x": x[i : i + 4]} for i in range(0, 23, 4)]
    with kd.serve(lambda f: {"y": f["x"] * 2}, data, progress=False) as service:
        dataset = KnowledgeDataset([service.address], batch_size=5, connect_timeout=10)
        forked = DataLoader(dataset, batch_size=None, num_workers=2, timeout=60)
        with pytest.raises(kd.KdserveError, match="multiprocessing_context='spawn'"):
            list(forked)
        spawned = DataLoader(
            dataset, batch_size=None, num_workers=2, multiprocessing_context="spawn", timeout=60
        )
        batches = list(spawned)
    assert sorted(_ids(batches)) == list(range(23))
    assert all(torch.equal(b["y"][:, 0], b["sample_id"].float() * 2) for b in batches)


def test_online_teacher_two_epochs() -> None:
    teacher = kd.Teacher(out_port=0, token=TOKEN, progress=False)
    teacher.start()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            teacher.start_knowledge_service(**_service_kwargs(WA, ["logits", "seq"]), times=2)
        except BaseException as exc:  # reported below
            errors.append(exc)

    service = threading.Thread(target=serve, daemon=True)
    service.start()
    try:
        dataset = KnowledgeDataset(
            [teacher.address], batch_size=7, token=TOKEN, connect_timeout=10.0
        )
        for epoch in (0, 1):
            dataset.set_epoch(epoch)
            batches = _read(dataset, num_workers=0)
            ids = _ids(batches)
            assert sorted(ids) == list(range(N)), epoch
            logits = torch.cat([b["logits"] for b in batches]).numpy()
            np.testing.assert_allclose(logits, (X @ WA)[ids], rtol=1e-5, atol=1e-6)
            assert dataset.state_dict()["batches"] == len(batches)
        service.join(JOIN)
        assert not service.is_alive(), "the service did not return after its 2 passes"
        assert not errors, errors
    finally:
        closing = threading.Thread(target=teacher.close, daemon=True)
        closing.start()
        closing.join(JOIN)
        service.join(JOIN)
    assert not closing.is_alive() and not service.is_alive()


def test_pin_memory_pins_with_an_accelerator_and_warns_without(stores: Path) -> None:
    if torch.accelerator.is_available():
        dataset = KnowledgeDataset([stores / "a"], batch_size=50, pin_memory=True)
        assert next(iter(dataset))["logits"].is_pinned()
    else:
        with pytest.warns(UserWarning, match="no accelerator is available"):
            dataset = KnowledgeDataset([stores / "a"], batch_size=50, pin_memory=True)
        assert not next(iter(dataset))["logits"].is_pinned()


def test_pinning_with_worker_processes_is_left_to_the_dataloader(stores: Path) -> None:
    # pin_memory=True on the dataset and on a DataLoader with worker processes: the workers
    # do not pin (that fails on CUDA), the DataLoader pins in the main process.
    accelerator = torch.accelerator.is_available()
    with warnings.catch_warnings():
        if accelerator:
            warnings.simplefilter("error")
        else:  # both warn that nothing can be pinned without an accelerator
            warnings.simplefilter("ignore")
        dataset = KnowledgeDataset([stores / "a"], batch_size=20, pin_memory=True)
        batches = list(DataLoader(dataset, batch_size=None, num_workers=4, pin_memory=True))
    assert sorted(_ids(batches)) == list(range(N))
    assert all(b["logits"].is_pinned() == accelerator for b in batches)
    for b in batches:
        np.testing.assert_allclose(b["logits"].numpy(), X[b["sample_id"].numpy()] @ WA, rtol=1e-6)


def test_a_mid_pass_state_resumes_with_the_stores_moved(stores: Path, tmp_path: Path) -> None:
    """A job resumed on another machine finds its stores elsewhere: same stores, same plan."""
    state = _mid_pass_state(stores)
    moved = tmp_path / "elsewhere"
    shutil.copytree(stores, moved)
    resumed = _resumable(moved)
    resumed.load_state_dict(state)
    full = _resumable(stores)
    skipped = _ids(list(full))[: 3 * 4]
    assert sorted(skipped + _ids(list(resumed))) == list(range(N))
