"""Two teachers dump knowledge to stores offline; a student merges them (mean).

Run: python examples/two_teachers_offline.py --out /tmp/kd-offline
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

import kdserve as kd

N, DIM, CLASSES = 500, 16, 10
inputs = np.random.default_rng(0).normal(size=(N, DIM)).astype(np.float32)


def samples():
    """Pantheon-style sample generator: one tuple per sample, in feed_list order."""
    for x in inputs:
        yield (x,)


def make_program(seed):
    """A teacher 'model': any callable from a dict of feed arrays to a dict of outputs."""
    w = np.random.default_rng(seed).normal(size=(DIM, CLASSES)).astype(np.float32)
    return lambda feed: {"logits": feed["x"] @ w}


def main(out: Path) -> None:
    stores = []
    for name, seed in (("teacher_a", 1), ("teacher_b", 2)):
        store = out / name
        # overwrite=True starts the store over (the default resumes an interrupted dump).
        with kd.Teacher(store, overwrite=True, progress=False) as teacher:
            teacher.start_knowledge_service(
                feed_list=["x"],
                schema=["logits"],  # the fields to keep
                program=make_program(seed),
                reader_config={"sample_generator": samples, "batch_size": 64},
            )
        stores.append(store)

    # The student aligns both stores by sample id and averages their logits.
    with kd.Student(merge_strategy={"logits": "mean"}, shuffle=True, seed=0) as student:
        for store in stores:
            student.register_teacher(in_path=store)
        student.start()
        reader = student.get_knowledge_generator(batch_size=32)
        rows, ids = 0, []
        for batch in reader():  # one pass; call reader() again for the next one
            rows += len(batch["sample_id"])
            ids.append(batch["sample_id"])
            assert batch["logits"].shape[1] == CLASSES
    assert rows == N and sorted(np.concatenate(ids).tolist()) == list(range(N))
    print(f"offline: merged {rows} samples from 2 teachers in one pass")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="output directory (default: a temp dir)")
    args = parser.parse_args()
    if args.out is not None:
        main(args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
