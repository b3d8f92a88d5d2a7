"""Pantheon's toy demo, ported to kdserve: shared arguments and the three data readers.

The readers yield the natural numbers 0..max_n-1 as Pantheon's three reader configs do;
the teachers' programs are numpy callables in place of Paddle programs.
"""

import argparse

import numpy as np


def str2bool(text):
    return text.lower() in ("true", "t", "1")


def parse_args():
    parser = argparse.ArgumentParser(description="a toy kdserve teacher")
    parser.add_argument("--out_port", type=int, default=None)
    parser.add_argument("--out_path", type=str, default=None)
    parser.add_argument("--use_cuda", type=str2bool, default=False)
    parser.add_argument("--test_send_recv", type=str2bool, default=False)
    parser.add_argument(
        "--generator_type",
        choices=["sample_generator", "sample_list_generator", "batch_generator"],
        default="batch_generator",
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--serving_times", type=int, default=1)
    parser.add_argument("--max_n", type=int, default=1000)
    return parser.parse_args()


def sample_generator(max_n):
    """A function whose generator yields one sample, ``[i]``, at a time."""

    def samples():
        for i in range(max_n):
            yield [i]

    return samples


def sample_list_generator(max_n, batch_size=500):
    """A function whose generator yields lists of up to ``batch_size`` samples."""

    def sample_lists():
        chunk = []
        for sample in sample_generator(max_n)():
            chunk.append(sample)
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    return sample_lists


def batch_generator(max_n, batch_size=500):
    """A function whose generator yields batches: a list holding one int64 array."""

    def batches():
        for start in range(0, max_n, batch_size):
            stop = min(start + batch_size, max_n)
            yield [np.arange(start, stop, dtype="int64").reshape((-1, 1))]

    return batches


def reader_config(args):
    """The reader config that ``--generator_type`` names, as Pantheon's toy builds it."""
    if args.generator_type == "sample_generator":
        return {
            "sample_generator": sample_generator(args.max_n),
            "batch_size": args.batch_size,
            "drop_last": False,
        }
    if args.generator_type == "sample_list_generator":
        return {"sample_list_generator": sample_list_generator(args.max_n, args.batch_size)}
    return {"batch_generator": batch_generator(args.max_n, args.batch_size)}
