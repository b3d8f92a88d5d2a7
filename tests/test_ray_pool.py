"""Teacher pools on a local Ray instance (issue #12), with real actors: pooled dumps into
one store (also with a replica killed mid-dump, and resumed), queries spread over the
replicas with failover, scaling. Ray starts once for the module, with 2 CPUs."""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import kdserve as kd  # noqa: E402
from kdserve.ray import PoolClient, PoolLoader, TeacherPool  # noqa: E402

N, D, BATCH = 240, 8, 16
X = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
KEEP = kd.Schema([kd.Field("y", "float32", (D,))])
KDSERVE = str(Path(sys.executable).with_name("kdserve"))


def make_program(delay: float = 0.01) -> Any:
    """Each replica's teacher: ``delay`` seconds a batch, as a model takes."""

    def program(feed: dict[str, Any]) -> dict[str, Any]:
        time.sleep(delay)
        return {"y": feed["x"] * 2 + 1}

    return program


def batches(part: int, parts: int) -> list[dict[str, Any]]:
    """Part ``part`` of ``parts``: every parts-th batch, with global sample ids."""
    starts = range(part * BATCH, N, parts * BATCH)
    return [{"x": X[s : s + BATCH], "sample_id": np.arange(s, min(s + BATCH, N))} for s in starts]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="kdserve-tests")
    # The factories above live in this test module, which Ray's workers cannot import:
    # ship them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def pool(name: str, replicas: int, delay: float = 0.01) -> TeacherPool:
    factory = functools.partial(make_program, delay)
    return TeacherPool(name, factory, feeds=["x"], keep=KEEP, replicas=replicas, num_cpus=0)


def read_all(path: Path) -> dict[str, np.ndarray]:
    with kd.Student() as student:
        student.add_store(path)
        got = list(student.loader(batch_size=50))
    return {k: np.concatenate([b[k] for b in got]) for k in ("sample_id", "y")}


def test_a_pool_dumps_one_store_every_sample_once(tmp_path: Path) -> None:
    with pool("dump3", 3) as teachers:
        rows = teachers.dump(batches, tmp_path / "store")
        status = teachers.status()
    assert rows == N
    got = read_all(tmp_path / "store")
    np.testing.assert_array_equal(np.sort(got["sample_id"]), np.arange(N))
    np.testing.assert_array_equal(got["y"], X[got["sample_id"]] * 2 + 1)  # exact values
    replicas = status["replicas"]
    assert len(replicas) == 3 and all(s["samples"] > 0 for s in replicas.values())  # all worked
    assert sum(s["samples"] for s in replicas.values()) == N
    assert len(list((tmp_path / "store").glob("shard-*.arrow"))) >= 3  # one store of them


def test_a_replica_killed_mid_dump_is_restarted_and_its_part_resumed(tmp_path: Path) -> None:
    with pool("dumpkill", 2, delay=0.05) as teachers:  # ~0.4 s a part
        victim = teachers.replicas["dumpkill-1"]
        killed: list[float] = []

        def kill_soon() -> None:
            time.sleep(0.15)
            ray.kill(victim, no_restart=False)  # Ray restarts it; its task is retried
            killed.append(time.monotonic())

        killer = threading.Thread(target=kill_soon)
        killer.start()
        rows = teachers.dump(batches, tmp_path / "store", shard_bytes=2048)
        done = time.monotonic()
        killer.join()
    assert killed and killed[0] < done  # the replica died while the dump ran
    assert rows == N
    got = read_all(tmp_path / "store")
    np.testing.assert_array_equal(np.sort(got["sample_id"]), np.arange(N))
    np.testing.assert_array_equal(got["y"], X[got["sample_id"]] * 2 + 1)


def test_an_interrupted_pooled_dump_resumes_with_its_parts(tmp_path: Path) -> None:
    with pool("resume", 2) as teachers:
        # The first run stops after part 0 (part 1's data fails): no store yet.
        def failing(part: int, parts: int) -> list[dict[str, Any]]:
            if part == 1:
                raise RuntimeError("disk full")
            return batches(part, parts)

        with pytest.raises(ray.exceptions.RayTaskError, match="disk full"):
            teachers.dump(failing, tmp_path / "store")
        assert not (tmp_path / "store" / "manifest.json").exists()
        assert (tmp_path / "store" / "parts" / "part-0000" / "manifest.json").exists()
        teachers.scale(3)  # more replicas now: the dump keeps its 2 parts
        assert teachers.dump(batches, tmp_path / "store") == N
    got = read_all(tmp_path / "store")
    np.testing.assert_array_equal(np.sort(got["sample_id"]), np.arange(N))
    assert len(list((tmp_path / "store" / "parts").glob("part-*"))) == 2  # not 3


def test_queries_spread_over_replicas_and_fail_over(tmp_path: Path) -> None:
    with pool("ask", 3) as teachers:
        client = PoolClient("ask", timeout=30.0, connect_timeout=5.0)
        inputs = [{"x": X[i : i + 8]} for i in range(0, 96, 8)]
        got = list(client.query_stream(inputs, max_in_flight=3))
        for batch, out in zip(inputs, got, strict=True):
            np.testing.assert_array_equal(out["y"], batch["x"] * 2 + 1)
        assert len(client.answered) == 3  # every replica answered some
        time.sleep(0.5)  # the figures are reported without waiting
        status = teachers.status()
        assert sum(r["answered"] for r in status["replicas"].values()) == 96
        figures = status["students"][client.id]
        assert figures["batches"] == 12 and figures["stall_s"] > 0
        assert 1 <= figures["in_flight"] <= 3
        ray.kill(teachers.replicas["ask-0"], no_restart=True)  # dies for good
        got = list(client.query_stream(inputs, max_in_flight=3))
        for batch, out in zip(inputs, got, strict=True):
            np.testing.assert_array_equal(out["y"], batch["x"] * 2 + 1)


def test_a_pool_scales_up_and_down_while_queried() -> None:
    with pool("scale", 1) as teachers:
        client = PoolClient("scale", timeout=30.0, connect_timeout=5.0)
        assert client.query({"x": X[:4]})["y"].shape == (4, D)
        teachers.scale(3)
        list(client.query_stream([{"x": X[:4]}] * 12, max_in_flight=3))
        assert {"scale-1", "scale-2"} <= set(client.answered)
        teachers.scale(1)
        assert set(teachers.replicas) == {"scale-0"}
        out = list(client.query_stream([{"x": X[:4]}] * 6, max_in_flight=3))
        assert len(out) == 6


def test_unknown_pools_and_duplicate_names_are_refused() -> None:
    with pytest.raises(kd.KdserveError, match="no teacher pool named 'nope'"):
        PoolClient("nope")
    with pool("twice", 1), pytest.raises(kd.KdserveError, match="exists already"):
        pool("twice", 1)


def pool_status_cli(name: str) -> subprocess.CompletedProcess[str]:
    """``kdserve pool status NAME``, attached to this test's Ray cluster."""
    address = ray.get_runtime_context().gcs_address
    return subprocess.run(
        [KDSERVE, "pool", "status", name, "--address", address],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_cli_shows_a_pools_replicas(tmp_path: Path) -> None:
    with pool("cli", 2) as teachers:
        teachers.dump(batches, tmp_path / "store")
        done = pool_status_cli("cli")
    assert done.returncode == 0, done.stderr
    assert "pool cli: 2 replica(s)" in done.stdout
    dumped = [line.split("dumped")[1].split()[0] for line in done.stdout.splitlines()[1:3]]
    assert sum(map(int, dumped)) == N
    missing = pool_status_cli("gone")
    assert missing.returncode == 1 and "no teacher pool named 'gone'" in missing.stderr


def all_batches(epoch: int) -> list[dict[str, Any]]:
    """The students' data: every sample, in a shuffled batch order per pass."""
    order = np.random.default_rng(epoch).permutation(N // BATCH)
    return [
        {"x": X[b * BATCH : (b + 1) * BATCH], "sample_id": np.arange(b * BATCH, (b + 1) * BATCH)}
        for b in order
    ]


def test_two_ranks_read_disjoint_halves_each_sample_once_despite_a_dying_replica() -> None:
    with pool("ranks", 3, delay=0.03) as teachers:
        loaders = [PoolLoader("ranks", all_batches, rank=r, world_size=2) for r in range(2)]
        for epoch in range(2):
            seen = []
            for rank, loader in enumerate(loaders):
                for i, batch in enumerate(loader):
                    if epoch == 1 and rank == 0 and i == 2:
                        ray.kill(teachers.replicas["ranks-1"], no_restart=True)  # mid-pass
                    np.testing.assert_array_equal(batch["y"], X[batch["sample_id"]] * 2 + 1)
                    np.testing.assert_array_equal(batch["x"], X[batch["sample_id"]])
                    seen.append(batch["sample_id"])
                if rank == 0:
                    half = np.concatenate(seen)
            ids = np.concatenate(seen)
            np.testing.assert_array_equal(np.sort(ids), np.arange(N))  # once each, all of them
            assert 0 < len(half) < N  # the ranks split the pass


def test_a_pool_scales_during_a_pass_and_loses_nothing() -> None:
    with pool("grow", 1, delay=0.03) as teachers:
        loader = PoolLoader("grow", all_batches, max_in_flight=3)
        ids = []
        for i, batch in enumerate(loader):
            if i == 2:
                teachers.scale(3)
            if i == 8:
                teachers.scale(1)
            ids.append(batch["sample_id"])
        np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(N))
        assert {"grow-1", "grow-2"} & set(loader.client.answered)  # the new ones helped


def pass_part(epoch: int, part: int, parts: int) -> list[dict[str, Any]]:
    """The pool's own data: part ``part`` of ``parts``, its batches shuffled per pass."""
    rows = np.arange(part, N, parts)
    rows = np.random.default_rng(epoch).permutation(rows)
    return [{"x": X[rows[i : i + 8]], "sample_id": rows[i : i + 8]} for i in range(0, len(rows), 8)]


def test_passes_over_the_pools_own_data_reach_two_ranks_once_despite_deaths() -> None:
    with pool("own", 3, delay=0.03) as teachers:
        teachers.serve(pass_part, parts=12)
        students = [kd.Student(rank=r, world_size=2) for r in range(2)]
        for student in students:
            student.add_pool("own")
        readers = [student.loader(batch_size=20) for student in students]
        for epoch in range(2):
            ids = []
            for rank, reader in enumerate(readers):
                for i, batch in enumerate(reader):
                    if epoch == 0 and rank == 0 and i == 1:
                        ray.kill(teachers.replicas["own-1"], no_restart=False)  # restarted
                    if epoch == 1 and rank == 1 and i == 1:
                        ray.kill(teachers.replicas["own-2"], no_restart=True)  # gone
                    np.testing.assert_array_equal(batch["y"], X[batch["sample_id"]] * 2 + 1)
                    assert len(batch["sample_id"]) <= 20
                    ids.append(batch["sample_id"])
            np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(N))
        for student in students:
            student.close()


def test_passes_need_a_pool_that_serves_them() -> None:
    with pool("idle", 1), kd.Student() as student:
        student.add_pool("idle")
        with pytest.raises(kd.KdserveError, match=r"pool.serve\(data_factory\)"):
            student.start()


def test_a_student_merges_a_pool_with_a_store(tmp_path: Path) -> None:
    """register_teacher(in_pool=...): the pool's passes drive the student, a store of
    another teacher over the same samples follows them, sample by sample."""
    store_data = [{"x": X[i : i + 16], "sample_id": np.arange(i, i + 16)} for i in range(0, N, 16)]
    kd.dump(lambda f: {"z": f["x"].sum(1)}, store_data, tmp_path / "other", progress=False)
    with pool("merged", 2) as teachers:
        teachers.serve(pass_part, parts=6)
        with kd.Student() as student:
            student.register_teacher(in_pool="merged")
            student.add_store(tmp_path / "other")
            assert student.get_teacher_desc()["0:pool:merged"]["pool"] == "merged"
            loader = student.loader(batch_size=24)
            for _ in range(2):
                ids = []
                for batch in loader:
                    np.testing.assert_array_equal(batch["y"], X[batch["sample_id"]] * 2 + 1)
                    np.testing.assert_allclose(batch["z"], X[batch["sample_id"]].sum(1), rtol=1e-6)
                    ids.append(batch["sample_id"])
                np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(N))
            with pytest.raises(kd.KdserveError, match="no messages"):
                student.send({"hello": 1}, [0])


def test_passes_spread_over_replicas_added_and_removed_mid_pass() -> None:
    with pool("grown", 1, delay=0.1) as teachers:  # a pass of ~3 s: scaling lands in it
        teachers.serve(pass_part, parts=15)
        ids = []
        student = kd.Student(buf_size=1)  # read (nearly) as it is consumed
        student.add_pool("grown")
        for i, batch in enumerate(student.loader(batch_size=16)):
            if i == 2:
                teachers.scale(3)
            if i == 9:
                teachers.scale(1)
            ids.append(batch["sample_id"])
        student.close()
        np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(N))
        status = teachers.status()
        assert status["replicas"]["grown-0"]["samples"] < N  # the others took parts
        assert any(s["batches"] == 15 for s in status["students"].values())  # stall reported


def test_ranks_even_out_parts_they_cannot_share_evenly() -> None:
    """5 parts of 48 rows for 2 ranks: rank 0 reads 3 parts, rank 1 two. Padded, both get
    144 rows (rank 1 repeats its first 48); unevened, each sample once; a pool with fewer
    parts than ranks is refused. Rank 0 reads its whole pass first, so its shares come
    from parts rank 1 has not asked for yet."""
    with pool("uneven", 2) as teachers:
        teachers.serve(pass_part, parts=5)
        students = [kd.Student(rank=r, world_size=2, even_ranks="pad") for r in range(2)]
        for student in students:
            student.add_pool("uneven")
        loaders = [student.loader(batch_size=8) for student in students]
        for _ in range(2):  # two passes: the registry keeps each pass's part rows
            got = [np.concatenate([b["sample_id"] for b in loader]) for loader in loaders]
            assert [len(ids) for ids in got] == [144, 144]
            assert set(np.concatenate(got)) == set(range(N))
            assert len(set(got[1])) == 96  # 48 repeated rows of its own
        for student in students:
            student.close()
        got = []
        for rank in range(2):
            with kd.Student(rank=rank, world_size=2, even_ranks="none") as student:
                student.add_pool("uneven")
                got.append(np.concatenate([b["sample_id"] for b in student.loader(batch_size=8)]))
        assert [len(ids) for ids in got] == [144, 96]
        np.testing.assert_array_equal(np.sort(np.concatenate(got)), np.arange(N))
        with kd.Student(rank=0, world_size=2, even_ranks="drop") as student:
            student.add_pool("uneven")
            with pytest.raises(kd.KdserveError, match="differ too much in size"):
                list(student.loader(batch_size=8))
        teachers.serve(pass_part, parts=1)
        with kd.Student(rank=0, world_size=2) as student:
            student.add_pool("uneven")
            with pytest.raises(kd.KdserveError, match="fewer than the 2 ranks"):
                list(student.loader(batch_size=8))


def overlapping(epoch: int, part: int, parts: int) -> list[dict[str, Any]]:
    """A faulty data factory: every part holds sample 0."""
    rows = np.concatenate([[0], np.arange(1 + part, N, parts)])
    return [{"x": X[rows], "sample_id": rows}]


def test_a_student_queries_a_pool_and_refuses_overlapping_parts() -> None:
    with pool("faulty", 2) as teachers:
        teachers.serve(overlapping, parts=4)
        with kd.Student() as student:
            student.add_pool("faulty")
            np.testing.assert_array_equal(student.query(0, {"x": X[:3]})["y"], X[:3] * 2 + 1)
            with pytest.raises(kd.AlignmentError, match=r"\[0\] twice in pass 0"):
                list(student.loader(batch_size=16))


def test_a_pools_provenance_is_what_students_expect() -> None:
    record = {"tokenizer": "bpe-4k", "vocab_size": 4096}
    factory = functools.partial(make_program, 0.0)
    with TeacherPool(
        "recorded", factory, feeds=["x"], keep=KEEP, num_cpus=0, provenance=record
    ) as teachers:
        teachers.serve(pass_part, parts=2)
        with kd.Student(expect=record) as student:
            student.add_pool("recorded")
            assert sum(len(b["sample_id"]) for b in student.loader(batch_size=64)) == N
            assert student.get_teacher_desc()["0:pool:recorded"]["provenance"] == record
        with kd.Student(expect={"tokenizer": "bpe-32k"}) as student:
            student.add_pool("recorded")
            with pytest.raises(kd.KdserveError, match="'tokenizer': 'bpe-4k'"):
                student.start()
        with pytest.raises(kd.KdserveError, match="provenance"):
            TeacherPool("bad", factory, feeds=["x"], provenance={"x": [1, 2]})


def test_a_pools_queries_go_through_its_vocab_map() -> None:
    """A pool of another vocabulary: its top-k indices reach the student in the student's
    token ids, compact and decoded."""
    keep = kd.Schema([kd.Field("y", "float32", (D,), codec=kd.TopK(3))])
    ids = np.array([9, 0, 7, 2, 6, 1, 3, 4])  # the pool's token t is the student's ids[t]
    factory = functools.partial(make_program, 0.0)
    with TeacherPool("mapped", factory, feeds=["x"], keep=keep, replicas=2, num_cpus=0) as teachers:
        teachers.serve(pass_part, parts=2)
        with kd.Student() as student:
            student.add_pool("mapped", vocab_map=kd.VocabMap(ids, 10))
            out = student.query(0, {"x": X[:4]}, decode=False)["y"]
            dense = student.query(0, {"x": X[:4]})["y"]
    top = np.argsort(-(X[:4] * 2 + 1), axis=1)[:, :3]
    np.testing.assert_array_equal(np.sort(out["indices"], 1), np.sort(ids[top], 1))
    assert dense.shape == (4, 10)
    np.testing.assert_array_equal(
        np.take_along_axis(dense, out["indices"].astype(np.intp), 1), out["values"]
    )


def gappy_part(epoch: int, part: int, parts: int) -> list[dict[str, Any]]:
    """Like ``pass_part``, but the first and the last part hold no batch at all."""
    return [] if part in (0, parts - 1) else pass_part(epoch, part - 1, parts - 2)


def no_part(epoch: int, part: int, parts: int) -> list[dict[str, Any]]:
    return []


def test_a_part_with_no_batch_is_an_empty_part_of_the_pass() -> None:
    with pool("gappy", 1, delay=0.0) as teachers, kd.Student() as student:
        teachers.serve(gappy_part, parts=4)
        student.add_pool("gappy")
        got = [b for b in student.loader(batch_size=24)]
        ids = np.concatenate([b["sample_id"] for b in got])
        np.testing.assert_array_equal(np.sort(ids), np.arange(N))
        np.testing.assert_array_equal(np.concatenate([b["y"] for b in got]), X[ids] * 2 + 1)
    with pool("void", 1, delay=0.0) as teachers, kd.Student() as student:
        teachers.serve(no_part, parts=2)
        student.add_pool("void")
        with pytest.raises(kd.KdserveError, match=r"none of the 2 parts .* holds a batch"):
            list(student.loader(batch_size=24))
