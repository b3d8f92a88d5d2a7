"""Hybrid: one teacher serves online (background thread), another was dumped offline to a
store; the student merges both by sample id, as if they were one teacher.

Run: python examples/hybrid.py --out /tmp/kd-hybrid
"""

import argparse
import secrets
import tempfile
import threading
from pathlib import Path

import numpy as np

import kdserve as kd

N, DIM, CLASSES = 300, 8, 5
TOKEN = secrets.token_urlsafe(16)
inputs = np.random.default_rng(0).normal(size=(N, DIM)).astype(np.float32)
W_ONLINE = np.random.default_rng(1).normal(size=(DIM, CLASSES)).astype(np.float32)
W_STORE = np.random.default_rng(2).normal(size=(DIM, CLASSES)).astype(np.float32)


def samples():
    for x in inputs:
        yield (x,)


def service_args(w):
    """What both teachers share: the same reader (so the same sample ids), one program."""
    return {
        "feed_list": ["x"],
        "schema": ["logits"],
        "program": lambda feed: {"logits": feed["x"] @ w},
        "reader_config": {"sample_generator": samples, "batch_size": 40},
    }


def main(out: Path) -> None:
    # 1. The offline teacher: dump once to a store.
    with kd.Teacher(out / "store_teacher", overwrite=True, progress=False) as teacher:
        teacher.start_knowledge_service(**service_args(W_STORE))

    # 2. The online teacher: serve one pass from a background thread.
    online = kd.Teacher(out_port=0, token=TOKEN, name="online_teacher", progress=False)
    try:
        online.start()  # binds the port: online.address is now known
        thread = threading.Thread(
            target=online.start_knowledge_service, kwargs=service_args(W_ONLINE), daemon=True
        )
        thread.start()

        # 3. The student merges both. (shuffle=True would need offline teachers only.)
        with kd.Student(merge_strategy={"logits": "mean"}, token=TOKEN) as student:
            student.register_teacher(in_address=online.address)
            student.register_teacher(in_path=out / "store_teacher")
            student.start()
            reader = student.get_knowledge_generator(batch_size=32)
            error, rows = 0.0, 0
            for batch in reader():
                ids = batch["sample_id"]
                expected = (inputs[ids] @ W_ONLINE + inputs[ids] @ W_STORE) / 2
                error = max(error, float(np.abs(batch["logits"] - expected).max()))
                rows += len(ids)
        thread.join(timeout=30)
        assert not thread.is_alive(), "the online teacher did not finish"
    finally:
        online.close()
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
