"""Two online teachers (Arrow Flight on 127.0.0.1, any free port) served from background
threads; one student merges them (mean) for 2 passes.

Run: python examples/two_teachers_online.py
"""

import argparse
import secrets
import threading

import numpy as np

import kdserve as kd

N, DIM, CLASSES, PASSES = 400, 16, 10, 2
TOKEN = secrets.token_urlsafe(16)  # shared by teachers and student; every call is checked
inputs = np.random.default_rng(0).normal(size=(N, DIM)).astype(np.float32)


def samples():
    for x in inputs:
        yield (x,)


def make_program(seed):
    w = np.random.default_rng(seed).normal(size=(DIM, CLASSES)).astype(np.float32)
    return lambda feed: {"logits": feed["x"] @ w}


def serve(teacher, seed, errors):
    """The teacher's knowledge service: returns once the student has read every pass."""
    try:
        teacher.start_knowledge_service(
            feed_list=["x"],
            schema=["logits"],
            program=make_program(seed),
            reader_config={"sample_generator": samples, "batch_size": 50},
            times=PASSES,
        )
    except Exception as exc:  # a thread's exception is otherwise only printed
        errors.append(exc)


def main() -> None:
    # out_port=0 picks a free port; start() binds it, so teacher.address is known.
    teachers = [
        kd.Teacher(out_port=0, token=TOKEN, name=f"teacher_{i}", progress=False) for i in (1, 2)
    ]
    threads, errors = [], []
    try:
        for seed, teacher in enumerate(teachers, start=1):
            teacher.start()
            thread = threading.Thread(target=serve, args=(teacher, seed, errors), daemon=True)
            thread.start()
            threads.append(thread)

        with kd.Student(merge_strategy={"logits": "mean"}, token=TOKEN) as student:
            for teacher in teachers:
                student.register_teacher(in_address=teacher.address)
            student.start()
            reader = student.get_knowledge_generator(batch_size=32)
            for epoch in range(PASSES):
                ids = np.concatenate([batch["sample_id"] for batch in reader()])
                assert sorted(ids.tolist()) == list(range(N)), f"pass {epoch} lost samples"
                print(f"online: pass {epoch}: {len(ids)} merged samples")
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a teacher did not finish its service"
        assert not errors, errors
    finally:
        for teacher in teachers:  # always close: stops serving, frees the port
            teacher.close()
    print(f"online: merged 2 teachers for {PASSES} passes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="unused: this example writes nothing")
    parser.parse_args()
    main()
