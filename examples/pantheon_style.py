"""Pantheon's names, unchanged: the two-teacher job as Pantheon code writes it.

Teacher A dumps to a store (``Teacher(out_path=...)``); teacher B serves online
(``Teacher(out_port=...)``) from a thread, as Pantheon users run it in a thread or
another process. The student registers both, exchanges a message with B, and reads one
pass merged by sample id (mean). No ``close()``, ``with`` or token: an offline store is
complete when ``start_knowledge_service`` returns, and on 127.0.0.1 the student finds
the token that teacher B generated. (``out_port=0`` picks a free port;
``teacher.address`` says which.)

Run: python examples/pantheon_style.py --out /tmp/kd-pantheon
"""

import argparse
import tempfile
import threading
from pathlib import Path

import numpy as np

from kdserve import Student, Teacher

N, DIM, CLASSES = 500, 16, 10
inputs = np.random.default_rng(0).normal(size=(N, DIM)).astype(np.float32)
W_A = np.random.default_rng(1).normal(size=(DIM, CLASSES)).astype(np.float32)
W_B = np.random.default_rng(2).normal(size=(DIM, CLASSES)).astype(np.float32)


def samples():
    """Pantheon's sample generator: one tuple per sample, in feed_list order."""
    for x in inputs:
        yield (x,)


def knowledge_service(teacher, w):
    teacher.start_knowledge_service(
        feed_list=["x"],
        schema=["logits"],
        program=lambda feed: {"logits": feed["x"] @ w},
        reader_config={"sample_generator": samples, "batch_size": 64},
    )


def run_teacher_b(teacher):
    """Teacher B's process, as a thread: greet the student, await its reply, serve."""
    teacher.send({"teacher": "b", "classes": CLASSES})
    assert teacher.recv() == "ready"
    knowledge_service(teacher, W_B)


def main(out: Path) -> None:
    teacher_a = Teacher(out_path=out / "teacher_a")
    teacher_a.start()
    knowledge_service(teacher_a, W_A)  # returns with the store complete

    teacher_b = Teacher(out_port=0)
    teacher_b.start()
    thread = threading.Thread(target=run_teacher_b, args=(teacher_b,), daemon=True)
    thread.start()

    student = Student(merge_strategy={"logits": "mean"})
    student.register_teacher(in_path=out / "teacher_a")
    student.register_teacher(in_address=teacher_b.address)
    student.start()
    assert student.recv(1) == {"teacher": "b", "classes": CLASSES}
    student.send("ready")

    desc = student.get_knowledge_desc()
    assert desc["logits"]["shape"][-1] == CLASSES, desc
    reader = student.get_knowledge_generator(batch_size=32)
    rows, error = 0, 0.0
    for batch in reader():  # one pass; call reader() again for the next one
        ids = batch["sample_id"]
        expected = (inputs[ids] @ W_A + inputs[ids] @ W_B) / 2
        error = max(error, float(np.abs(batch["logits"] - expected).max()))
        rows += len(ids)
    thread.join(timeout=30)
    assert not thread.is_alive(), "teacher B did not finish its service"
    assert rows == N and error < 1e-4, (rows, error)
    print(f"pantheon: merged {rows} samples from 1 offline + 1 online teacher")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="output directory (default: a temp dir)")
    args = parser.parse_args()
    if args.out is not None:
        main(args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
