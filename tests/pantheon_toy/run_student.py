"""Toy student: merges the two toy teachers (``result`` summed: 4x) and prints every
sample, one JSON object per line, in the order the student receives them."""

import argparse
import json

from utils import str2bool

from kdserve import Student


def parse_args():
    parser = argparse.ArgumentParser(description="the toy kdserve student")
    for i in (0, 1):
        parser.add_argument(f"--in_address{i}", type=str, default=None)
        parser.add_argument(f"--in_path{i}", type=str, default=None)
    parser.add_argument("--test_send_recv", type=str2bool, default=False)
    parser.add_argument("--batch_size", type=int, default=32)
    return parser.parse_args()


def run(args):
    for i in (0, 1):
        address, path = getattr(args, f"in_address{i}"), getattr(args, f"in_path{i}")
        if address and path:
            raise ValueError(f"give one of --in_address{i} and --in_path{i}, not both")
        if not address and not path:
            raise ValueError(f"give one of --in_address{i} and --in_path{i}")

    student = Student(merge_strategy={"result": "sum"})
    student.register_teacher(in_address=args.in_address0, in_path=args.in_path0)
    student.register_teacher(in_address=args.in_address1, in_path=args.in_path1)
    student.start()

    if args.test_send_recv:
        for t in range(2):
            for _ in range(3):
                print("message", json.dumps(student.recv(t)), flush=True)
        student.send("message from student!")

    knowledge_desc = student.get_knowledge_desc()
    print("desc", json.dumps(knowledge_desc, sort_keys=True), flush=True)
    data_generator = student.get_knowledge_generator(batch_size=args.batch_size, drop_last=False)
    for batch_data in data_generator():
        batch_size = next(iter(batch_data.values())).shape[0]
        for i in range(batch_size):
            data = {key: batch_data[key][i].tolist() for key in batch_data}
            print("sample", json.dumps(data, sort_keys=True))


if __name__ == "__main__":
    run(parse_args())
