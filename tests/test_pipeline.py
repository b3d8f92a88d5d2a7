"""teacher.Pipeline: a real Encoder (a numpy program) into real sinks -- a StoreSink on
disk, a ServeSink with its ReplayWindow, and a recording Sink subclass written here (a
new destination is one more Sink class: the extension point users have). Checked: every
batch reaches every sink in order with exact values, a sink gets only the rows it wants,
the stop signal takes effect between two batches and ends the threads, a failure is told
to every sink and re-raised, and readers that yield nothing. Every wait is bounded."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

import kdserve as kd
from _helpers import Background, wait_for
from kdserve.core.batch import from_record_batch
from kdserve.core.schema import SAMPLE_ID, Schema
from kdserve.errors import KdserveError, SchemaError
from kdserve.online.replay import ReplayWindow
from kdserve.store import StoreReader
from kdserve.teacher.encoder import Encoder
from kdserve.teacher.pipeline import Pipeline
from kdserve.teacher.sinks import Rows, ServeSink, Sink, StoreSink

WIDTH = 3
BATCH = 4
WAIT = 10.0  # seconds a run, or a thread, gets to end
CALLER = "pipeline-caller"  # the thread that calls run()


def inputs(n: int) -> np.ndarray:
    """Sample i's feed: i * WIDTH + arange(WIDTH), exact in float32."""
    return np.arange(n * WIDTH, dtype=np.float32).reshape(n, WIDTH)


def expected(ids: np.ndarray) -> np.ndarray:
    """The program's output for samples ``ids`` (exact in float32)."""
    x = ids[:, None].astype(np.float32) * np.float32(WIDTH) + np.arange(WIDTH, dtype=np.float32)
    return x * np.float32(2) + np.float32(1)


def batches(n: int) -> list[dict[str, np.ndarray]]:
    x = inputs(n)
    return [{"x": x[i : i + BATCH]} for i in range(0, n, BATCH)]


class Program:
    """y = 2x + 1; records the first sample id of every batch it runs on."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[int] = []
        self.fail_at = fail_at

    def __call__(self, feed: dict[str, Any]) -> dict[str, np.ndarray]:
        first = int(feed["x"][0, 0]) // WIDTH
        self.calls.append(first)
        if first == self.fail_at:
            raise ArithmeticError(f"the program broke on sample {first}")
        return {"y": feed["x"] * np.float32(2) + np.float32(1)}


class Schemas:
    """The teacher's part in the schema (as Teacher does): the first batch fixes it, and
    the stores are opened for it."""

    def __init__(self, stores: Iterable[StoreSink] = ()) -> None:
        self.schema: Schema | None = None
        self.stores = list(stores)

    def publish(self, schema: Schema) -> None:
        if self.schema is None:
            self.schema = schema
            for store in self.stores:
                store.open(schema)


def encoder(program: Program, schemas: Schemas) -> Encoder:
    return Encoder(program, ["y"], False, ["x"], lambda: schemas.schema, schemas.publish)


class Recorder(Sink):
    """A sink that keeps what it is given. ``keep(ids)``: the rows it wants (default all);
    ``passes``: the passes it needs; ``on_put`` runs after every put."""

    def __init__(
        self,
        keep: Callable[[np.ndarray], np.ndarray] | None = None,
        passes: Iterable[int] = (0,),
        on_put: Callable[[int, int], None] | None = None,
    ) -> None:
        self.keep = keep
        self.passes = set(passes)
        self.on_put = on_put
        self.got: list[tuple[int, int, pa.RecordBatch, Rows]] = []
        self.ends: list[tuple[int, int]] = []
        self.failures: list[str] = []
        self.threads: set[str] = set()  # the threads that called put

    def pass_needed(self, pass_: int) -> bool:
        return pass_ in self.passes

    def wants(self, pass_: int, seq: int, ids: np.ndarray) -> Rows | None:
        if self.keep is None:
            return True
        mask = self.keep(ids)
        return mask if mask.any() else None

    def put(self, pass_: int, seq: int, batch: pa.RecordBatch, rows: Rows) -> int:
        self.threads.add(threading.current_thread().name)
        self.got.append((pass_, seq, batch, rows))
        if self.on_put is not None:
            self.on_put(pass_, seq)
        return int(batch.num_rows) if rows is True else int(np.count_nonzero(rows))

    def end_pass(self, pass_: int, batches: int) -> None:
        self.ends.append((pass_, batches))

    def fail(self, why: str) -> None:
        self.failures.append(why)

    def positions(self) -> list[tuple[int, int]]:
        return [(p, s) for p, s, _, _ in self.got]

    def rows(self, schema: Schema | None) -> dict[str, np.ndarray]:
        """Every row it took (its masks applied), decoded, in the order received."""
        parts = [
            from_record_batch(b if r is True else b.filter(pa.array(r)), schema)
            for _, _, b, r in self.got
        ]
        return {k: np.concatenate([p[k] for p in parts]) for k in (SAMPLE_ID, "y")}


def pipeline(reader: Any, enc: Encoder, sinks: list[Sink], **kwargs: Any) -> Pipeline:
    kwargs = {"stop": threading.Event(), "buf_size": 2, "threads": 2, "progress": False} | kwargs
    return Pipeline(reader, ["x"], enc, sinks, **kwargs)


def run(p: Pipeline) -> int:
    """p.run() on a thread waited for with a bound: a hang fails the test."""
    return int(Background(p.run, name=CALLER).result(WAIT))


def pipeline_threads() -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith(("kdserve-read", "kdserve-encode", "kdserve-call")) and t.is_alive()
    ]


def assert_threads_end() -> None:
    """The pipeline's reading thread, its lanes and its encoding pool end, within WAIT s."""
    wait_for(lambda: not pipeline_threads(), WAIT, "the pipeline's threads to end")


def store_sink(path: Path) -> StoreSink:
    return StoreSink(str(path), {"name": "t"}, shard_bytes=1 << 20, overwrite=False)


def stored(path: Path) -> tuple[StoreReader, dict[str, np.ndarray]]:
    reader = StoreReader(path)
    reader.verify()
    return reader, from_record_batch(reader.read(0, len(reader)), reader.schema)


# -- delivery -------------------------------------------------------------------------


def test_every_batch_reaches_every_sink_in_order_with_exact_values(tmp_path):
    n = 22  # five full batches and a short one
    store = store_sink(tmp_path / "store")
    schemas = Schemas([store])
    first, second = Recorder(), Recorder()
    p = pipeline(batches(n), encoder(Program(), schemas), [first, store, second])
    assert run(p) == n
    assert p.position == n
    store.finish()
    k = -(-n // BATCH)
    for sink in (first, second):
        assert sink.positions() == [(0, s) for s in range(k)]
        assert sink.ends == [(0, k)]
        assert sink.failures == []
        assert sink.threads == {CALLER}  # delivery runs on the thread that called run()
        got = sink.rows(schemas.schema)
        np.testing.assert_array_equal(got[SAMPLE_ID], np.arange(n))
        assert got["y"].dtype == np.float32
        np.testing.assert_array_equal(got["y"], expected(np.arange(n)))
    reader, data = stored(tmp_path / "store")
    assert reader.complete
    np.testing.assert_array_equal(data[SAMPLE_ID], np.arange(n))
    np.testing.assert_array_equal(data["y"], expected(np.arange(n)))
    assert_threads_end()


def test_a_sink_that_wants_some_rows_gets_only_those():
    n = 20
    program = Program()
    schemas = Schemas()
    fives = Recorder(keep=lambda ids: ids % 5 == 0)  # no row of batch 4 (ids 16..19)
    p = pipeline(batches(n), encoder(program, schemas), [fives])
    assert run(p) == 4
    assert [s for _, s in fives.positions()] == [0, 1, 2, 3]
    got = fives.rows(schemas.schema)
    np.testing.assert_array_equal(got[SAMPLE_ID], [0, 5, 10, 15])
    np.testing.assert_array_equal(got["y"], expected(np.array([0, 5, 10, 15])))
    assert program.calls == [0, 4, 8, 12]  # a batch no sink wants is not computed
    assert fives.ends == [(0, 5)]  # yet it counts among the pass's batches


def test_a_resumed_store_takes_only_the_samples_it_lacks(tmp_path):
    path = tmp_path / "store"
    head = store_sink(path)
    assert run(pipeline(batches(8), encoder(Program(), Schemas([head])), [head])) == 8
    head.keep_incomplete("the test stopped it")
    head.finish()
    assert not StoreReader(path).complete
    n = 20
    store = store_sink(path)
    everything = Recorder()
    program = Program()
    schemas = Schemas([store])
    p = pipeline(batches(n), encoder(program, schemas), [store, everything])
    assert run(p) == n  # the most any sink took of each batch
    store.finish()
    reader, data = stored(path)
    assert reader.complete
    np.testing.assert_array_equal(data[SAMPLE_ID], np.arange(n))  # each sample once
    np.testing.assert_array_equal(data["y"], expected(np.arange(n)))
    np.testing.assert_array_equal(everything.rows(schemas.schema)[SAMPLE_ID], np.arange(n))


# -- the stop signal --------------------------------------------------------------------


def endless() -> Iterator[dict[str, np.ndarray]]:
    """Batches for ever: only the stop signal ends a run over it."""
    i = 0
    while True:
        yield {"x": np.arange(i * WIDTH, (i + BATCH) * WIDTH, dtype=np.float32).reshape(-1, WIDTH)}
        i += BATCH


def test_the_stop_signal_stops_between_two_batches_and_ends_the_threads():
    stop = threading.Event()

    def stop_after(pass_: int, seq: int) -> None:
        if seq == 2:
            stop.set()  # as close() does, between the delivery of batch 2 and the next

    schemas = Schemas()
    sink = Recorder(on_put=stop_after)
    other = Recorder()
    p = pipeline(
        {"batch_generator": endless}, encoder(Program(), schemas), [sink, other], stop=stop
    )
    assert run(p) == 3 * BATCH
    for s in (sink, other):
        assert s.positions() == [(0, 0), (0, 1), (0, 2)]  # nothing after the stop
        assert s.ends == []  # the pass did not end
        assert s.failures == []  # a stop is no failure
    np.testing.assert_array_equal(other.rows(schemas.schema)["y"], expected(np.arange(3 * BATCH)))
    assert_threads_end()


def test_a_batch_read_after_a_stop_from_another_thread_is_never_computed():
    stop = threading.Event()
    reading = threading.Event()

    def slow() -> Iterator[dict[str, np.ndarray]]:
        yield {"x": inputs(BATCH)}
        reading.set()
        while not stop.wait(0.01):  # a reader waiting for data
            pass
        yield {"x": inputs(2 * BATCH)[BATCH:]}

    sink = Recorder()
    program = Program()
    p = pipeline({"batch_generator": slow}, encoder(program, Schemas()), [sink], stop=stop)
    running = Background(p.run)
    assert reading.wait(WAIT)
    assert running.blocked(), "the run ended before the stop"
    stop.set()
    assert running.result(WAIT) == BATCH
    assert program.calls == [0]
    assert sink.positions() == [(0, 0)]
    assert sink.ends == []
    assert_threads_end()


# -- failures ---------------------------------------------------------------------------


def test_a_failing_program_is_re_raised_and_told_to_every_sink(tmp_path):
    path = tmp_path / "store"
    store = store_sink(path)
    schemas = Schemas([store])
    sinks = [Recorder(), store, Recorder()]
    p = pipeline(batches(40), encoder(Program(fail_at=12), schemas), sinks)
    with pytest.raises(ArithmeticError, match="broke on sample 12"):
        run(p)
    why = "ArithmeticError: the program broke on sample 12"
    for sink in (sinks[0], sinks[2]):
        assert sink.failures == [why]
        assert [s for _, s in sink.positions()] == [0, 1, 2]  # the batches before it
    assert store.failed is not None and why in store.failed
    store.finish()
    reader, data = stored(path)
    assert not reader.complete  # a re-run resumes it
    np.testing.assert_array_equal(data[SAMPLE_ID], np.arange(12))
    assert_threads_end()


def test_a_reader_that_yields_nothing_is_a_schema_error():
    sink = Recorder()
    with pytest.raises(SchemaError, match="yielded no batches"):
        run(pipeline([], encoder(Program(), Schemas()), [sink]))
    assert len(sink.failures) == 1 and "yielded no batches" in sink.failures[0]
    assert sink.got == []
    assert_threads_end()


def test_two_passes_of_a_one_shot_iterator_are_a_clear_error():
    sink = Recorder(passes=(0, 1))
    p = pipeline(iter(batches(8)), encoder(Program(), Schemas()), [sink], times=2)
    with pytest.raises(KdserveError, match="nothing on pass 1: it can be read only once") as err:
        run(p)
    assert not isinstance(err.value, SchemaError)
    assert sink.positions() == [(0, 0), (0, 1)]  # pass 0 was served
    assert sink.ends == [(0, 2)]
    assert len(sink.failures) == 1 and "only once" in sink.failures[0]


# -- a restarted teacher's ServeSink --------------------------------------------------


class Reiterable:
    """A re-iterable reader that counts its passes."""

    def __init__(self, items: list[dict[str, np.ndarray]]) -> None:
        self.items = items
        self.passes = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.passes += 1
        return iter(self.items)


def test_a_serve_sink_skips_a_pass_its_students_are_past():
    # A restarted teacher of 3 passes: its one student has acknowledged passes 0 and 1.
    n = 12
    window = ReplayWindow(times=3, buf_size=10, min_bytes=0)
    window.ack(0, 1, (2, 0))
    reader = Reiterable(batches(n))
    program = Program()
    schemas = Schemas()
    p = pipeline(reader, encoder(program, schemas), [ServeSink(window, student_grace=0.0)], times=3)
    running = Background(p.run)

    def student() -> list[pa.RecordBatch]:
        got = [b for _, b in window.stream(2, 0, 0, 1)]
        window.ack(0, 1, (3, 0))  # past the last pass: the teacher's run drains
        return got

    try:
        got = Background(student).result(WAIT)
        assert running.result(WAIT) == n
        assert window.rank_rows(1, 1, timeout=0) is None  # pass 1 never ended: skipped
        assert window.rank_rows(2, 1, timeout=0) == [n]
    finally:
        window.stop()
    assert reader.passes == 2  # passes 0 and 2; pass 1 was never read
    assert program.calls == [0, 0, 4, 8]  # pass 0: its first batch alone, for the schema
    data = [from_record_batch(b, schemas.schema) for b in got]
    np.testing.assert_array_equal(np.concatenate([d[SAMPLE_ID] for d in data]), np.arange(n))
    np.testing.assert_array_equal(np.concatenate([d["y"] for d in data]), expected(np.arange(n)))
    assert_threads_end()


class _Concurrent:
    """A program that can run ``concurrency`` calls at once; each call waits for the
    others (a Barrier), so it only completes if kdserve calls it from that many threads."""

    def __init__(self, concurrency: Any) -> None:
        self.concurrency = concurrency
        self.meet = threading.Barrier(concurrency if isinstance(concurrency, int) else 1)
        self.threads: set[int] = set()

    def __call__(self, feed: dict[str, Any]) -> dict[str, Any]:
        self.threads.add(threading.get_ident())
        self.meet.wait(timeout=10)  # BrokenBarrierError if the calls were serialised
        return {"y": feed["x"] * 2}


def test_a_programs_concurrency_sets_the_default_inference_threads(tmp_path):
    data = [{"x": inputs(9)[i : i + 3]} for i in range(0, 9, 3)]
    keep = Schema([kd.Field("y", "float32", (WIDTH,))])
    program = _Concurrent(3)
    assert kd.dump(program, data, tmp_path / "s", keep=keep, progress=False) == 9
    assert len(program.threads) == 3 and not program.meet.broken
    stored = from_record_batch(StoreReader(tmp_path / "s").read(0, 9))
    np.testing.assert_array_equal(stored["y"], inputs(9) * 2)
    with pytest.raises(TypeError, match="concurrency attribute must be an int >= 1"):
        kd.dump(_Concurrent(0), data, tmp_path / "t", keep=keep, progress=False)


# -- a program that submits its calls -------------------------------------------------


class Submitting(Program):
    """y = 2x + 1 that also offers ``submit``: its calls queue for one thread of its own
    (a lane), which waits ``pause`` s before it takes each (as a lane busy with another
    call would), so a call can be cancelled while queued. ``most``: the most calls ever
    submitted and not yet ended; ``cancelled``: the first sample of each call cancelled."""

    def __init__(self, fail_at: int | None = None, pause: float = 0.0) -> None:
        super().__init__(fail_at)
        self.pause = pause
        self.queue: queue.SimpleQueue[tuple[Future[Any], dict[str, Any]]] = queue.SimpleQueue()
        self.cancelled: list[int] = []
        self.in_flight = self.most = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._lane, name="test-lane", daemon=True).start()

    def submit(self, feed: dict[str, Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        self.queue.put((future, feed))
        return future

    def _lane(self) -> None:
        while True:
            future, feed = self.queue.get()
            time.sleep(self.pause)
            outcome: tuple[bool, Any] | None = None
            if future.set_running_or_notify_cancel():
                try:
                    outcome = (True, self(feed))
                except ArithmeticError as exc:
                    outcome = (False, exc)
            else:
                self.cancelled.append(int(feed["x"][0, 0]) // WIDTH)
            with self.lock:  # ended before the caller hears of it
                self.in_flight -= 1
            if outcome is not None:
                future.set_result(outcome[1]) if outcome[0] else future.set_exception(outcome[1])


@pytest.mark.parametrize("calls", [1, 2])
def test_a_program_that_submits_is_kept_one_call_ahead_per_call_running(tmp_path, calls):
    n = 42
    store = store_sink(tmp_path / "store")
    schemas = Schemas([store])
    program = Submitting(pause=0.002)
    sink = Recorder()
    p = pipeline(batches(n), encoder(program, schemas), [sink, store], calls=calls)
    assert run(p) == n
    store.finish()
    assert program.calls == list(range(0, n, BATCH))  # each batch once, in order
    assert program.most == 2 * calls  # one queued behind each call running, never more
    assert sink.positions() == [(0, s) for s in range(-(-n // BATCH))]
    np.testing.assert_array_equal(sink.rows(schemas.schema)["y"], expected(np.arange(n)))
    reader, data = stored(tmp_path / "store")
    assert reader.complete
    np.testing.assert_array_equal(data["y"], expected(np.arange(n)))
    assert_threads_end()


def test_a_submitted_call_that_fails_is_re_raised_and_the_one_queued_never_runs():
    program = Submitting(fail_at=12, pause=0.2)
    sink = Recorder()
    with pytest.raises(ArithmeticError, match="broke on sample 12"):
        run(pipeline(batches(40), encoder(program, Schemas()), [sink]))
    assert sink.positions() == [(0, 0), (0, 1), (0, 2)]
    assert sink.failures == ["ArithmeticError: the program broke on sample 12"]
    wait_for(lambda: program.in_flight == 0, WAIT, "the queued call to be dropped")
    assert program.calls == [0, 4, 8, 12] and program.cancelled == [16]
    assert_threads_end()


def test_a_stop_cancels_the_call_queued_and_computes_nothing_after_it():
    stop = threading.Event()

    def stop_after(pass_: int, seq: int) -> None:
        if seq == 2:
            stop.set()

    program = Submitting(pause=0.2)
    sink = Recorder(on_put=stop_after)
    p = pipeline({"batch_generator": endless}, encoder(program, Schemas()), [sink], stop=stop)
    assert run(p) == 3 * BATCH
    assert sink.positions() == [(0, 0), (0, 1), (0, 2)] and sink.failures == []
    wait_for(lambda: program.in_flight == 0, WAIT, "the queued call to be dropped")
    assert program.calls == [0, 4, 8, 12] and program.cancelled == [16]
    assert_threads_end()


def test_a_submit_that_is_not_the_protocol_is_a_clear_type_error():
    class NoFuture(Program):
        def submit(self, feed: dict[str, Any]) -> Any:
            return self(feed)

    class NotAMethod(Program):
        submit = 3

    with pytest.raises(TypeError, match=r"submit\(feed\) must return a concurrent.futures.Future"):
        run(pipeline(batches(12), encoder(NoFuture(), Schemas()), [Recorder()]))
    with pytest.raises(TypeError, match="submit attribute must be a method"):
        run(pipeline(batches(12), encoder(NotAMethod(), Schemas()), [Recorder()]))
