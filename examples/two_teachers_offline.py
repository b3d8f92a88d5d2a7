"""Two teachers dump their knowledge to stores with ``kd.dump``; a student merges the
stores by sample id (mean of the logits) and reads one shuffled pass with ``loader``.

Run: python examples/two_teachers_offline.py --out /tmp/kd-offline
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

import kdserve as kd

N, DIM, CLASSES = 500, 16, 10
inputs = np.random.default_rng(0).normal(size=(N, DIM)).astype(np.float32)
# The teachers' data: any iterable of batches; dict batches name their feeds.
batches = [{"x": inputs[i : i + 64]} for i in range(0, N, 64)]


def make_program(seed):
    """A teacher 'model': any callable from a dict of feed arrays to a dict of outputs."""
    w = np.random.default_rng(seed).normal(size=(DIM, CLASSES)).astype(np.float32)
    return lambda feed: {"logits": feed["x"] @ w}


def main(out: Path) -> None:
    stores = [out / "teacher_a", out / "teacher_b"]
    for seed, store in enumerate(stores, start=1):
        # The store is complete when dump returns; overwrite=True starts it over
        # (the default resumes an interrupted dump).
        written = kd.dump(make_program(seed), batches, store, overwrite=True)
        assert written == N, written

    # The student aligns both stores by sample id and averages their logits.
    with kd.Student(merge_strategy={"logits": "mean"}, shuffle=True, seed=0) as student:
        for store in stores:
            student.add_store(store)
        loader = student.loader(batch_size=32)  # each `for` over it is one more pass
        rows, ids = 0, []
        for batch in loader:
            rows += len(batch["sample_id"])
            ids.append(batch["sample_id"])
            assert batch["logits"].shape[1] == CLASSES
        assert len(loader) == -(-N // 32)  # batches per pass, known for stores
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
