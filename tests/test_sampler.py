"""Sampler: deterministic shuffles and partitions that cover every row exactly once."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdserve.core.sampler import Sampler


def _rows(blocks):
    out = []
    for b in blocks:
        out.extend(range(b.start, b.stop) if b.rows is None else b.rows.tolist())
    return out


@settings(max_examples=150, deadline=None)
@given(
    num_rows=st.integers(0, 300),
    block_rows=st.integers(1, 64),
    world_size=st.integers(1, 4),
    num_workers=st.integers(1, 3),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 5),
)
def test_partitions_cover_every_row_exactly_once(
    num_rows, block_rows, world_size, num_workers, shuffle, seed, epoch
):
    parts = []
    for rank in range(world_size):
        for worker in range(num_workers):
            sampler = Sampler(shuffle, seed, block_rows, rank, world_size, worker, num_workers)
            parts.append(_rows(sampler.plan(num_rows, epoch)))
    assert sorted(r for p in parts for r in p) == list(range(num_rows))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1  # balanced


def test_unshuffled_plan_is_in_order_and_contiguous():
    blocks = Sampler(block_rows=10).plan(35)
    assert [(b.start, b.stop, b.rows) for b in blocks] == [
        (0, 10, None),
        (10, 20, None),
        (20, 30, None),
        (30, 35, None),
    ]


def test_shuffle_is_deterministic_per_seed_and_epoch_and_differs_across_epochs():
    sampler = Sampler(shuffle=True, seed=7, block_rows=16)
    first = _rows(sampler.plan(200, epoch=0))
    assert first == _rows(Sampler(shuffle=True, seed=7, block_rows=16).plan(200, epoch=0))
    assert first != _rows(sampler.plan(200, epoch=1))
    assert first != _rows(Sampler(shuffle=True, seed=8, block_rows=16).plan(200, epoch=0))
    assert first != list(range(200))


def test_bad_settings_and_env(monkeypatch):
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        Sampler(rank=2, world_size=2)
    with pytest.raises(ValueError, match="worker 1 is outside num_workers 1"):
        Sampler(worker=1)
    with pytest.raises(ValueError, match="block_rows must be >= 1"):
        Sampler(block_rows=0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert Sampler.world_from_env() == (3, 4)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="not integers"):
        Sampler.world_from_env()


def test_block_rows_are_a_permutation_inside_their_block():
    for b in Sampler(shuffle=True, seed=1, block_rows=8).plan(50, 2):
        assert sorted(b.rows.tolist()) == list(range(b.start, b.stop))
        assert isinstance(b.rows, np.ndarray)


@settings(max_examples=150, deadline=None)
@given(
    num_rows=st.integers(1, 300),
    block_rows=st.integers(1, 64),
    world_size=st.integers(2, 4),
    num_workers=st.integers(1, 3),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31),
    even=st.sampled_from(["pad", "drop"]),
)
def test_even_parts_have_equal_sizes_for_data_parallel_ranks(
    num_rows, block_rows, world_size, num_workers, shuffle, seed, even
):
    parts = []
    for rank in range(world_size):
        for worker in range(num_workers):
            sampler = Sampler(
                shuffle, seed, block_rows, rank, world_size, worker, num_workers, even=even
            )
            parts.append(_rows(sampler.plan(num_rows, 3)))
    n = world_size * num_workers
    size = num_rows // n if even == "drop" else -(-num_rows // n)
    assert [len(p) for p in parts] == [size] * n  # no rank waits for another in a collective
    rows = [r for p in parts for r in p]
    if even == "drop":  # each row at most once, fewer than n left out
        assert len(set(rows)) == len(rows) and num_rows - len(rows) < n
    else:  # every row at least once; padding repeats rows from the start of the sequence
        assert set(rows) == set(range(num_rows))
        unpadded = Sampler(shuffle, seed, block_rows, 0, 1).plan(num_rows, 3)
        sequence = _rows(unpadded)
        assert rows == [sequence[i % num_rows] for i in range(len(rows))]


def test_1001_rows_on_2_ranks_give_each_rank_the_same_batches():
    # 1001 rows, 2 ranks, batch 500: uneven parts would give 1 and 2 batches.
    for even, size in (("pad", 501), ("drop", 500)):
        sizes = [len(_rows(Sampler(rank=r, world_size=2, even=even).plan(1001))) for r in (0, 1)]
        assert sizes == [size, size]
    with pytest.raises(ValueError, match="even must be one of"):
        Sampler(even="sometimes")
