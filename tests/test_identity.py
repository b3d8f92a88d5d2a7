"""Knowledge received online, offline and in-process is bit-identical."""

import threading

import numpy as np

import kdserve as kd

N, BATCH = 300, 32
X = np.random.default_rng(0).normal(size=(N, 12)).astype(np.float32)
W = np.random.default_rng(1).normal(size=(12, 20)).astype(np.float32)
SCHEMA = kd.Schema(
    [
        kd.Field("logits", "float32", (20,), codec="fp16"),
        kd.Field("top", "float32", (20,), codec=kd.TopK(4)),
        kd.Field("steps", "float32", (None, 3)),
    ]
)


def program(feed):
    logits = np.asarray(feed["x"]) @ W
    steps = [
        np.repeat(row[:3][None, :], int(i) % 4, axis=0)
        for i, row in zip(feed["sample_id"], logits, strict=True)
    ]
    return {"logits": logits, "top": logits, "steps": steps}


def samples():
    for i in range(N):
        yield X[i], i


READER = {"sample_generator": samples, "batch_size": BATCH}
FEEDS = ["x", "sample_id"]


def in_process():
    """The teacher's program called here, through the same encoding, no transport."""
    out = []
    for start in range(0, N, BATCH):
        ids = np.arange(start, min(start + BATCH, N))
        knowledge = program({"x": X[ids], "sample_id": ids})
        out.append(kd.from_record_batch(kd.to_record_batch(knowledge, SCHEMA, ids), SCHEMA))
    return out


def _read(student):
    student.start()
    return list(student.get_knowledge_generator(batch_size=BATCH)())


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g["sample_id"], w["sample_id"])
        for name in ("logits", "top"):
            assert g[name].dtype == w[name].dtype
            assert g[name].tobytes() == w[name].tobytes()  # bit for bit
        assert g["steps"].values.tobytes() == w["steps"].values.tobytes()
        np.testing.assert_array_equal(g["steps"].offsets, w["steps"].offsets)


def test_online_offline_and_in_process_knowledge_are_bit_identical(tmp_path):
    reference = in_process()

    with kd.Teacher(tmp_path / "store", progress=False) as teacher:
        teacher.start_knowledge_service(FEEDS, SCHEMA, program, READER)
    offline = kd.Student()
    offline.register_teacher(in_path=tmp_path / "store")
    _same(_read(offline), reference)

    teacher = kd.Teacher(out_port=0, token="identity", progress=False)
    teacher.start()
    serving = threading.Thread(
        target=teacher.start_knowledge_service, args=(FEEDS, SCHEMA, program, READER), daemon=True
    )
    serving.start()
    try:
        online = kd.Student(token="identity", connect_timeout=20)
        online.register_teacher(in_address=teacher.address)
        _same(_read(online), reference)
        serving.join(timeout=30)
        assert not serving.is_alive()
    finally:
        teacher.close()
