"""Pantheon's reader configs, and any iterable of batches, become feed batches."""

import numpy as np
import pytest

import kdserve as kd
from kdserve.teacher.feeds import iter_feed_batches

X = np.arange(20, dtype=np.float32).reshape(10, 2)
Y = np.arange(10)


def _samples():
    yield from zip(X, Y, strict=True)


def _collect(config, feeds=("x", "y")):
    return list(iter_feed_batches(config, list(feeds)))


@pytest.mark.parametrize("drop_last", [False, True])
def test_sample_generator_batches_samples(drop_last):
    batches = _collect({"sample_generator": _samples, "batch_size": 4, "drop_last": drop_last})
    assert [len(b["y"]) for b in batches] == ([4, 4] if drop_last else [4, 4, 2])
    np.testing.assert_array_equal(
        np.concatenate([b["x"] for b in batches]), X[: 8 if drop_last else 10]
    )


def test_sample_list_generator_and_batch_generator():
    def sample_lists():
        yield [(X[i], Y[i]) for i in range(3)]
        yield [(X[i], Y[i]) for i in range(3, 10)]

    def batches():
        yield X[:5], Y[:5]
        yield {"x": X[5:], "y": Y[5:]}

    for config in ({"sample_list_generator": sample_lists}, {"batch_generator": batches}):
        got = _collect(config)
        np.testing.assert_array_equal(np.concatenate([b["y"] for b in got]), Y)


def test_any_iterable_of_batches_and_dict_samples():
    got = _collect([(X[:6], Y[:6]), (X[6:], Y[6:])])
    assert [len(b["x"]) for b in got] == [6, 4]
    dicts = ({"x": x, "y": y} for x, y in zip(X, Y, strict=True))
    got = _collect({"sample_generator": dicts, "batch_size": 10})
    np.testing.assert_array_equal(got[0]["x"], X)


def test_variable_length_samples_stay_a_list():
    def seqs():
        for n in (1, 3, 2):
            yield (np.ones(n),)

    (batch,) = _collect({"sample_generator": seqs, "batch_size": 3}, ["tokens"])
    assert [len(s) for s in batch["tokens"]] == [1, 3, 2]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"sample_generator": _samples}, "needs 'batch_size'"),
        ({"sample_generator": _samples, "batch_size": 2, "bogus": 1}, "exactly one of"),
        ({"batch_generator": _samples, "sample_list_generator": _samples}, "exactly one of"),
        ({"nothing": 1}, "must be a dict with one of"),
        (42, "must be a dict with one of"),
        ({"batch_generator": lambda: iter([(X, Y, Y)])}, "has 3 fields but feed_list names 2"),
        ({"batch_generator": lambda: iter([{"x": X}])}, r"lacks feed\(s\) \['y'\]"),
    ],
)
def test_bad_reader_configs_are_explained(config, message):
    with pytest.raises(kd.SchemaError, match=message):
        _collect(config)


def test_one_feed_refuses_a_tuple_of_several_values():
    # DataLoader-style (inputs, labels) pairs with feeds=["x"]: each pair was taken for a
    # batch of two "samples", labels among them.
    pairs = [(X[i], Y[i]) for i in range(len(X))]
    with pytest.raises(kd.SchemaError, match=r"has 2 fields but feed_list names 1: \['x'\]"):
        _collect({"sample_generator": lambda: iter(pairs), "batch_size": 2}, ["x"])
    with pytest.raises(kd.SchemaError, match="has 2 fields but feed_list names 1"):
        _collect({"batch_generator": lambda: iter([(X, Y)])}, ["x"])
    with pytest.raises(kd.SchemaError, match="has 2 fields but feed_list names 1"):
        _collect({"batch_generator": lambda: iter([[X, Y]])}, ["x"])  # a DataLoader's
    (batch,) = _collect({"batch_generator": lambda: iter([(X,)])}, ["x"])  # a 1-tuple is fine
    np.testing.assert_array_equal(batch["x"], X)


def test_feed_list_must_name_feeds():
    with pytest.raises(kd.SchemaError, match="feed_list must be a non-empty list"):
        _collect([(X, Y)], [])
