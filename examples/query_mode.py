"""Query mode (on-policy distillation): ``kd.serve(program, None, feeds=[...])`` has no
data of its own; the student sends its own inputs and gets the teacher's knowledge for
exactly those inputs.

Run: python examples/query_mode.py
"""

import argparse

import numpy as np

import kdserve as kd

DIM, CLASSES = 8, 5
W = np.random.default_rng(1).normal(size=(DIM, CLASSES)).astype(np.float32)


def program(feed):
    return {"logits": feed["x"] @ W}


def main() -> None:
    rng = np.random.default_rng(0)
    # data=None: answer queries only, until closed; feeds= names what a query holds.
    with (
        kd.serve(program, None, feeds=["x"], name="query_teacher") as service,
        kd.Student() as student,
    ):
        tid = student.add_teacher(service.address)
        student.start()

        # One request: e.g. inputs the student just generated itself.
        x = rng.normal(size=(16, DIM)).astype(np.float32)
        answer = student.query(tid, {"x": x})
        assert np.allclose(answer["logits"], x @ W, atol=1e-5)

        # Many requests, 4 in flight at once to hide the round trip; results in order.
        batches = [rng.normal(size=(32, DIM)).astype(np.float32) for _ in range(20)]
        rows = 0
        for xb, knowledge in zip(
            batches,
            student.query_stream(tid, ({"x": xb} for xb in batches), max_in_flight=4),
            strict=True,
        ):
            assert np.allclose(knowledge["logits"], xb @ W, atol=1e-5)
            rows += len(knowledge["sample_id"])
    # `with` closed the student, then the service: wait() returns the samples answered.
    assert service.wait(timeout=0) == len(x) + rows
    print(f"query: 1 query + {len(batches)} streamed queries answered ({rows} rows)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="unused: this example writes nothing")
    parser.parse_args()
    main()
