"""core.prefetch.Prefetcher: order, the buffer bound, errors handed to the consumer, and a
producer thread that always ends (on a break, on close(), even on close() from itself),
with a join that times out logged. Real threads; every wait bounded."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest

import kdserve as kd
from _helpers import Background, wait_for
from kdserve.core import prefetch
from kdserve.core.prefetch import Prefetcher

WAIT = 5.0  # seconds a thread gets to do what it must
SETTLE = 0.1  # seconds a producer that could run further gets to do so


def producer_thread(name: str) -> threading.Thread | None:
    return next((t for t in threading.enumerate() if t.name == name), None)


def assert_gone(name: str) -> None:
    """The thread ``name`` ends within WAIT seconds."""
    wait_for(lambda: producer_thread(name) is None, WAIT, f"thread {name} to end")


class Counted:
    """A producer generator that counts the items it has yielded and records its cleanup."""

    def __init__(self, n: int | None = None) -> None:
        self.n = n
        self.produced = 0
        self.cleaned = threading.Event()

    def __call__(self) -> Iterator[int]:
        i = 0
        try:
            while self.n is None or i < self.n:
                self.produced += 1
                yield i
                i += 1
        finally:
            self.cleaned.set()


def test_items_arrive_in_order_and_the_producer_ends():
    produce = Counted(500)
    assert list(Prefetcher(produce, 4, name="pf-order")) == list(range(500))
    assert produce.cleaned.is_set()
    assert_gone("pf-order")


def test_buf_size_must_be_positive():
    with pytest.raises(ValueError, match="buf_size"):
        Prefetcher(Counted(1), 0, name="pf-zero")


@pytest.mark.parametrize("buf", [1, 3])
def test_a_slow_consumer_holds_the_producer_buf_size_ahead(buf):
    n = 8
    produce = Counted(n)
    work = Prefetcher(produce, buf, name=f"pf-bound-{buf}")
    # Nothing consumed: the queue fills to buf_size, and the producer holds one more item
    # that it cannot put.
    wait_for(lambda: work.qsize() == buf, WAIT, f"{buf} items queued")
    time.sleep(SETTLE)
    assert work.qsize() == buf
    assert produce.produced == buf + 1
    consumed = 0
    for item in work:
        assert item == consumed
        consumed += 1
        ahead = min(n, consumed + buf + 1)
        wait_for(lambda a=ahead: produce.produced >= a, WAIT, f"{ahead} items produced")
        time.sleep(SETTLE)  # a slow consumer: the producer must not run further meanwhile
        assert produce.produced == ahead, f"{produce.produced} produced, {consumed} consumed"
        if n - consumed >= buf:  # (later the queue holds the end-of-stream marker too)
            assert work.qsize() == buf
    assert consumed == n
    assert work.qsize() == 0


def test_an_error_in_the_producer_is_raised_in_the_consumer():
    def produce() -> Iterator[int]:
        yield 0
        yield 1
        raise KeyError("producer broke")

    got = []
    with pytest.raises(KeyError, match="producer broke"):
        for item in Prefetcher(produce, 2, name="pf-error"):
            got.append(item)
    assert got == [0, 1]
    assert_gone("pf-error")


def test_an_error_from_produce_itself_is_raised_in_the_consumer():
    # produce() fails before it returns an iterable (a reader that cannot open its data).
    def produce() -> Iterator[int]:
        raise OSError("no such dataset")

    with pytest.raises(OSError, match="no such dataset"):
        list(Prefetcher(produce, 2, name="pf-error-early"))
    assert_gone("pf-error-early")


def test_breaking_out_of_the_loop_stops_the_producer_and_runs_its_cleanup(caplog):
    produce = Counted()  # endless
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kdserve"):
        for item in Prefetcher(produce, 2, name="pf-break"):
            if item == 3:
                break
        assert produce.cleaned.wait(WAIT), "the producer's finally did not run"
        assert_gone("pf-break")
    assert time.monotonic() - started < 2.0
    assert not caplog.records  # an orderly stop is not a warning


def test_close_stops_a_producer_that_nobody_consumes():
    produce = Counted()
    work = Prefetcher(produce, 2, name="pf-close")
    wait_for(lambda: work.qsize() == 2, WAIT, "2 items queued")
    started = time.monotonic()
    work.close()
    assert time.monotonic() - started < 2.0
    assert producer_thread("pf-close") is None  # close() joined it
    assert produce.cleaned.is_set()


def test_close_from_the_producer_thread_itself_does_not_deadlock():
    holder: list[Prefetcher[int]] = []
    ready = threading.Event()
    closed = threading.Event()

    def produce() -> Iterator[int]:
        assert ready.wait(WAIT)
        yield 0
        yield 1
        holder[0].close()  # on the producer's own thread: no join of itself
        closed.set()
        yield from range(2, 100)

    work = Prefetcher(produce, 100, name="pf-self-close")
    holder.append(work)
    ready.set()
    items: list[int] = []

    def read() -> None:
        for item in work:
            items.append(item)

    # The consumer is told its stream was cut short: a prefix is never passed off as all.
    with pytest.raises(kd.KdserveError, match="pf-self-close was closed before the end"):
        Background(read).result(WAIT)
    assert closed.is_set()
    assert items[:2] == [0, 1]
    assert items == list(range(len(items)))  # a prefix: nothing lost or reordered
    assert len(items) <= 3  # the producer stops at its next item after the close
    assert_gone("pf-self-close")


def test_a_join_that_times_out_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(prefetch, "_JOIN_WAIT", 0.2)
    busy = threading.Event()
    release = threading.Event()
    cleaned = threading.Event()

    def produce() -> Iterator[int]:
        try:
            yield 0
            busy.set()
            release.wait(WAIT)  # a long call that does not look at the stop flag
            yield 1
        finally:
            cleaned.set()

    work = Prefetcher(produce, 1, name="pf-stuck")
    try:
        assert busy.wait(WAIT)
        with caplog.at_level(logging.WARNING, logger="kdserve"):
            started = time.monotonic()
            work.close()
            assert time.monotonic() - started < 2.0  # the patched wait, not 30 s
        warnings = [r for r in caplog.records if r.name.startswith("kdserve")]
        assert len(warnings) == 1, caplog.records
        assert warnings[0].levelno == logging.WARNING
        assert "pf-stuck" in warnings[0].getMessage()
        assert "did not stop within 0.2 s" in warnings[0].getMessage()
        assert producer_thread("pf-stuck") is not None  # it was really still running
    finally:
        release.set()
    assert_gone("pf-stuck")
    assert cleaned.is_set()


def test_qsize_counts_items_not_the_end_of_the_stream():
    prefetcher = Prefetcher(lambda: iter([1, 2]), 4, name="pf-qsize")
    wait_for(lambda: producer_thread("pf-qsize") is None, WAIT, "the producer to finish")
    assert prefetcher.qsize() == 2  # both items are queued, and the end marker after them
    assert list(prefetcher) == [1, 2]
    assert prefetcher.qsize() == 0
