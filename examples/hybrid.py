"""Hybrid: one teacher serves online (``kd.serve``), another was dumped to a store
(``kd.dump``); the student merges both by sample id, as if they were one teacher.

Run: python examples/hybrid.py --out /tmp/kd-hybrid
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

import kdserve as kd

N, DIM, CLASSES = 300, 8, 5
inputs = np.random.default_rng(0).normal(size=(N, DIM)).astype(np.float32)
W_ONLINE = np.random.default_rng(1).normal(size=(DIM, CLASSES)).astype(np.float32)
W_STORE = np.random.default_rng(2).normal(size=(DIM, CLASSES)).astype(np.float32)
# Both teachers read the same batches, so they number the same samples with the same ids.
batches = [{"x": inputs[i : i + 40]} for i in range(0, N, 40)]


def linear(w):
    """A teacher 'model': a dict of feed arrays in, a dict of outputs out."""
    return lambda feed: {"logits": feed["x"] @ w}


def main(out: Path) -> None:
    # 1. The offline teacher: dump once to a store.
    kd.dump(linear(W_STORE), batches, out / "store_teacher", overwrite=True)
    # 2. The online teacher: serves one pass in the background.
    with kd.serve(linear(W_ONLINE), batches) as online:
        # 3. The student merges both. (shuffle=True would need offline teachers only.)
        with kd.Student(merge_strategy={"logits": "mean"}) as student:
            student.add_teacher(online.address)
            student.add_store(out / "store_teacher")
            error, rows = 0.0, 0
            for batch in student.loader(batch_size=32):
                ids = batch["sample_id"]
                expected = (inputs[ids] @ W_ONLINE + inputs[ids] @ W_STORE) / 2
                error = max(error, float(np.abs(batch["logits"] - expected).max()))
                rows += len(ids)
        assert online.wait(timeout=30) == N  # re-raises the service's error, if any
    assert rows == N and error < 1e-4, (rows, error)
    print(f"hybrid: merged {rows} samples from 1 online + 1 offline teacher (max err {error:.1e})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="output directory (default: a temp dir)")
    args = parser.parse_args()
    if args.out is not None:
        main(args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
