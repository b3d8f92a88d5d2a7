"""Two online teachers served in the background with ``kd.serve`` (Arrow Flight on
127.0.0.1, any free port); one student merges them (mean of the logits) for 2 passes.

On 127.0.0.1 each teacher generates a token and publishes it for this user; the student
finds it. Beyond loopback, pass the same ``token=`` to ``kd.serve`` and ``kd.Student``.

Run: python examples/two_teachers_online.py
"""

import argparse

import numpy as np

import kdserve as kd

N, DIM, CLASSES, PASSES = 400, 16, 10, 2
inputs = np.random.default_rng(0).normal(size=(N, DIM)).astype(np.float32)
# Re-iterable (a list, not a generator): each pass reads the data again.
batches = [{"x": inputs[i : i + 50]} for i in range(0, N, 50)]


def make_program(seed):
    w = np.random.default_rng(seed).normal(size=(DIM, CLASSES)).astype(np.float32)
    return lambda feed: {"logits": feed["x"] @ w}


def main() -> None:
    # serve() returns once students can connect; leaving `with` stops the service.
    with (
        kd.serve(make_program(1), batches, times=PASSES, name="teacher_1") as teacher_1,
        kd.serve(make_program(2), batches, times=PASSES, name="teacher_2") as teacher_2,
    ):
        with kd.Student(merge_strategy={"logits": "mean"}) as student:
            student.add_teacher(teacher_1.address)
            student.add_teacher(teacher_2.address)
            loader = student.loader(batch_size=32)
            for epoch in range(PASSES):
                ids = np.concatenate([batch["sample_id"] for batch in loader])
                assert sorted(ids.tolist()) == list(range(N)), f"pass {epoch} lost samples"
                print(f"online: pass {epoch}: {len(ids)} merged samples")
        # wait() returns what a teacher served, or re-raises the error that stopped it.
        for teacher in (teacher_1, teacher_2):
            assert teacher.wait(timeout=30) == PASSES * N
    print(f"online: merged 2 teachers for {PASSES} passes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="unused: this example writes nothing")
    parser.parse_args()
    main()
