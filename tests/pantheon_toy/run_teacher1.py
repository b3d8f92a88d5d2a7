"""Toy teacher 1: knowledge ``x``, ``2x-1`` and ``result`` (a copy of 2x-1).

Pantheon-style kdserve use: Teacher(out_path= or out_port=), start(),
start_knowledge_service(...); no close(), no `with`, no token.
"""

import numpy as np
from utils import parse_args, reader_config

from kdserve import Teacher


def program(feed):
    """y = 2 * x - 1, and its copy ``result``."""
    x = np.asarray(feed["x"], dtype="int64").reshape((-1, 1))
    y = x * 2 - 1
    return {"y": y, "result": y.copy()}


def run(args):
    if args.out_path and args.out_port:
        raise ValueError("give one of --out_path and --out_port, not both")
    if not args.out_path and not args.out_port:
        raise ValueError("give one of --out_path and --out_port")

    teacher = Teacher(out_path=args.out_path, out_port=args.out_port)
    teacher.start()

    if args.test_send_recv:
        teacher.send("greetings from teacher1")
        teacher.send({"x": 1, "y": 2})
        teacher.send([3, 5])
        print(f"recved {teacher.recv()}", flush=True)

    teacher.start_knowledge_service(
        feed_list=["x"],
        schema={"x": "x", "2x-1": "y", "result": "result"},
        program=program,
        reader_config=reader_config(args),
        exe=None,
        use_fp16=True,
        times=args.serving_times,
    )


if __name__ == "__main__":
    run(parse_args())
