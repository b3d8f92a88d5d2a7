"""The online protocol (kdserve.online.protocol): every message round-trips and carries the
version, its format is pinned, each malformed field is a clear ProtocolError, another
version is refused naming both, and errors cross a real Flight server on 127.0.0.1 as the
same kdserve exception, message and context."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from pyarrow import flight

import kdserve as kd
from kdserve import errors
from kdserve.online.client import TeacherClient
from kdserve.online.protocol import (
    ERROR_KINDS,
    VERSION,
    Ack,
    ChunkMeta,
    ErrorInfo,
    MessageLimit,
    RecvRequest,
    SendRequest,
    TeacherInfo,
    Ticket,
)
from kdserve.online.server import TeacherServer

TOKEN = "protocol-token"
JOIN = 10.0  # seconds a server gets to shut down

MESSAGES: list[Any] = [
    Ticket(3, 7, 1, 2),
    Ack(4, 0, 0, 2),
    RecvRequest(),
    RecvRequest(after=12, wait=0.5),
    TeacherInfo("t", times=2, buf_size=8, stream=True, query=False, max_message_bytes=99),
    TeacherInfo(
        "t",
        1,
        4,
        False,
        True,
        kdserve_version="9.1",
        model="gpt-x",
        provenance={"tokenizer": "bpe-3f2a", "vocab_size": 32000, "temperature": 2.0, "v2": True},
    ),
    MessageLimit(32 << 20),
    ChunkMeta(0, 4, part=1, parts=3),
    ChunkMeta(1, 2, rows=(3, 0, 5)),
    ChunkMeta(1, 9, shares=()),  # the end of a pass in which this rank got nothing
    ErrorInfo("AlignmentError", "ids differ", {"teachers": ["a", "b"], "sample_ids": [1, None]}),
    ErrorInfo("ProtocolError", "bad ticket"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_and_carries_the_version(message):
    data = message.to_bytes()
    assert json.loads(data)["version"] == VERSION
    assert type(message).from_bytes(data) == message


def test_a_send_request_round_trips_with_arrays():
    data = SendRequest("s1", {"v": np.arange(3), "note": "hi"}).to_bytes()
    assert json.loads(data)["version"] == VERSION
    request = SendRequest.from_bytes(data)
    assert request.student == "s1" and request.message["note"] == "hi"
    np.testing.assert_array_equal(request.message["v"], np.arange(3))


def test_the_format_is_pinned():
    """Golden bytes: a change here is a change of the wire format, and of VERSION."""
    assert VERSION == 2
    assert Ticket(0, 1, 1, 2).to_bytes() == (
        b'{"version": 2, "pass": 0, "seq": 1, "rank": 1, "world_size": 2}'
    )
    assert ChunkMeta(0, 3, rows=(2, 2)).to_bytes() == (
        b'{"version": 2, "pass": 0, "seq": 3, "part": 0, "parts": 1, "rows": [2, 2]}'
    )
    assert SendRequest("s", [1]).to_bytes() == (b'{"version": 2, "student": "s", "message": [1]}')
    assert RecvRequest(2, 0.5).to_bytes() == b'{"version": 2, "after": 2, "wait": 0.5}'
    info = TeacherInfo("t", 1, 4, True, False, 99, "0.1.0", "m", {"vocab_size": 8})
    assert info.to_bytes() == (
        b'{"version": 2, "name": "t", "times": 1, "buf_size": 4, "stream": true, "query": '
        b'false, "max_message_bytes": 99, "kdserve_version": "0.1.0", "model": "m", '
        b'"provenance": {"vocab_size": 8}}'
    )


V1_INFO = b'{"version": 1, "name": "t", "times": 1, "buf_size": 4, "stream": true, "query": false}'


@pytest.mark.parametrize(
    ("decode", "data"),
    [
        (Ticket.from_bytes, b'{"pass": 0, "seq": 0, "rank": 0, "world_size": 1}'),
        (SendRequest.from_bytes, b'{"student": "s", "message": 1}'),
        (TeacherInfo.from_bytes, V1_INFO),
    ],
    ids=["no-version", "no-version-send", "v1-info"],
)
def test_a_version_1_message_is_refused_naming_both_and_the_fix(decode, data):
    """Version 1 (also a message without a version) is a kdserve whose teacher info had no
    provenance: refused, with the upgrade to make, not misread."""
    with pytest.raises(kd.ProtocolError) as refused:
        decode(data)
    text = str(refused.value)
    assert "protocol version 1" in text and "but this kdserve speaks version 2" in text
    assert "upgrade kdserve where version 1 runs" in text
    assert ("it carries no version" in text) == (b'"version"' not in data)


def newer(message: Any) -> bytes:
    return json.dumps(json.loads(message.to_bytes()) | {"version": VERSION + 1}).encode()


@pytest.mark.parametrize(
    "data",
    [newer(m) for m in MESSAGES] + [newer(SendRequest("s", 1))],
    ids=[type(m).__name__ for m in MESSAGES] + ["SendRequest"],
)
def test_another_version_is_refused_naming_both_and_the_fix(data):
    kind = json.loads(data)
    cls = {
        frozenset({"pass", "seq", "rank", "world_size"}): Ticket,
        frozenset({"after", "wait"}): RecvRequest,
        frozenset({"student", "message"}): SendRequest,
    }.get(frozenset(kind) - {"version"})
    for decode in [cls] if cls else [TeacherInfo, ChunkMeta, ErrorInfo]:
        with pytest.raises(kd.ProtocolError) as refused:
            decode.from_bytes(data)
        text = str(refused.value)
        assert f"version {VERSION + 1}" in text and f"speaks version {VERSION}" in text
        assert "upgrade kdserve" in text


def body(**fields: Any) -> bytes:
    """A message of this version (unless ``version`` is given); ``...`` leaves a field out."""
    return json.dumps(
        {k: v for k, v in ({"version": VERSION} | fields).items() if v is not ...}
    ).encode()


TICKET = {"pass": 0, "seq": 0, "rank": 0, "world_size": 1}
INFO = {
    "name": "t", "times": 1, "buf_size": 4, "stream": True, "query": False,
    "kdserve_version": "0.1.0",
}  # fmt: skip
META = {"pass": 0, "seq": 0, "part": 0, "parts": 1}

MALFORMED: list[tuple[Callable[[bytes], Any], bytes, str]] = [
    (Ticket.from_bytes, body(**TICKET | {"version": "1"}), "version must be an integer"),
    (Ticket.from_bytes, body(**TICKET | {"version": 0}), "version must be an integer >= 1"),
    (Ticket.from_bytes, body(**TICKET | {"rank": ...}), "bad ticket: missing rank"),
    (Ticket.from_bytes, body(**TICKET | {"x": 1}), r"unknown field\(s\) \['x'\]"),
    (Ticket.from_bytes, body(**TICKET | {"seq": 1.0}), "seq must be an integer, got 1.0"),
    (Ticket.from_bytes, body(**TICKET | {"rank": 1}), r"rank=1 is outside \[0, 0\]"),
    (Ticket.from_bytes, body(**TICKET | {"world_size": 2, "seq": 1}), "batch 1 does not"),
    (Ack.from_bytes, body(**TICKET | {"pass": True}), "bad ack: pass must be an integer"),
    (RecvRequest.from_bytes, body(after=-1), r"bad recv request: after=-1 is outside"),
    (RecvRequest.from_bytes, body(wait="1"), "wait must be a number of seconds >= 0"),
    (
        RecvRequest.from_bytes,
        b'{"version": 2, "wait": NaN}',
        "wait must be a number of seconds >= 0",
    ),
    (RecvRequest.from_bytes, b"[]", "bad recv request: not a JSON object"),
    (RecvRequest.from_bytes, b'{"after": 1', "recv request is not kdserve JSON"),
    (TeacherInfo.from_bytes, body(**INFO | {"name": ""}), "name must be a string of 1"),
    (TeacherInfo.from_bytes, body(**INFO | {"times": -1}), r"times=-1 is outside"),
    (TeacherInfo.from_bytes, body(**INFO | {"stream": 1}), "stream must be true or false"),
    (TeacherInfo.from_bytes, body(**INFO | {"max_message_bytes": 0}), "max_message_bytes=0"),
    (TeacherInfo.from_bytes, body(**INFO | {"query": ...}), "missing query"),
    (TeacherInfo.from_bytes, body(**INFO | {"kdserve_version": ...}), "missing kdserve_version"),
    (TeacherInfo.from_bytes, body(**INFO | {"kdserve_version": ""}), "kdserve_version must be"),
    (TeacherInfo.from_bytes, body(**INFO | {"model": 3}), "model must be a string"),
    (TeacherInfo.from_bytes, body(**INFO | {"provenance": [1]}), "provenance must be an object"),
    (TeacherInfo.from_bytes, body(**INFO | {"provenance": {"t": None}}), "provenance maps names"),
    (TeacherInfo.from_bytes, body(**INFO | {"provenance": {"": 1}}), "provenance maps names"),
    (TeacherInfo.from_bytes, body(**INFO | {"provenance": {"t": [1]}}), "'t': \\[1\\]"),
    (
        TeacherInfo.from_bytes,
        body(**INFO)[:-1] + b', "provenance": {"t": NaN}}',
        "provenance maps names.*got 't': nan",
    ),
    (
        TeacherInfo.from_bytes,
        body(**INFO | {"provenance": {str(i): i for i in range(65)}}),
        "provenance must be an object of at most 64 names",
    ),
    (ChunkMeta.from_bytes, body(**META | {"parts": 0}), r"parts=0 is outside \[1, "),
    (ChunkMeta.from_bytes, body(**META | {"part": 2, "parts": 2}), r"part=2 is outside \[0, 1\]"),
    (ChunkMeta.from_bytes, body(**META | {"rows": [1, -2]}), "rows must be a list of integers"),
    (ChunkMeta.from_bytes, body(**META | {"shares": 3}), "shares must be a list of integers"),
    (ChunkMeta.from_bytes, b"\xff", "batch metadata is not kdserve JSON: not UTF-8"),
    (ErrorInfo.from_bytes, body(kind="", message="m"), "kind must be a string of 1 to 64"),
    (ErrorInfo.from_bytes, body(kind="X", message=7), "message must be a string"),
    (ErrorInfo.from_bytes, body(kind="X", message="m", context=[1]), "context must map"),
    (ErrorInfo.from_bytes, body(kind="X", message="m", context={"args": 1}), "context must map"),
    (SendRequest.from_bytes, body(student="s"), "exactly 'student' and 'message'"),
    (SendRequest.from_bytes, body(student="", message=1), "sender is not a string"),
    (SendRequest.from_bytes, b"[" * 100 + b"]" * 100, "nests 100 levels deep"),
]


@pytest.mark.parametrize(("decode", "data", "reason"), MALFORMED, ids=range(len(MALFORMED)))
def test_each_malformed_field_is_a_one_line_protocol_error(decode, data, reason):
    with pytest.raises(kd.ProtocolError, match=reason) as refused:
        decode(data)
    assert "\n" not in str(refused.value)


# -- errors across a real Flight server -------------------------------------------------


def example(kind: type[kd.KdserveError]) -> kd.KdserveError:
    """An instance of ``kind`` with the context kdserve gives it."""
    context: dict[str, Any] = {
        kd.AlignmentError: {"teachers": ("a", "b"), "sample_ids": (4, None)},
        kd.SchemaError: {"field": "logits"},
        kd.CodecError: {"field": "logits", "codec": "fp16"},
        kd.StoreError: {"path": "/data/store"},
        kd.StoreLockedError: {"path": "/data/store", "pid": 42, "host": "node1"},
    }.get(kind, {})
    return kind(f"a {kind.__name__} on the teacher", **context)


@pytest.fixture
def serving() -> Iterator[Callable[[Callable[[pa.RecordBatch], pa.RecordBatch]], TeacherClient]]:
    """``serving(query)``: a client of a TeacherServer on 127.0.0.1 answering with ``query``."""
    made: list[tuple[TeacherServer, TeacherClient]] = []

    def start(query: Callable[[pa.RecordBatch], pa.RecordBatch]) -> TeacherClient:
        server = TeacherServer(
            name="remote", host="127.0.0.1", port=0, token=TOKEN, schema=None, window=None,
            query=query,
        )  # fmt: skip
        client = TeacherClient(
            f"127.0.0.1:{server.port}", name="T", token=TOKEN, connect_timeout=5.0
        )
        made.append((server, client))
        return client

    yield start
    for server, client in made:
        client.close()
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        stopper.join(JOIN)
        assert not stopper.is_alive(), "server shutdown hung"


def test_every_kdserve_error_crosses_the_wire_as_itself(serving):
    raised: list[kd.KdserveError] = []

    def query(batch: pa.RecordBatch) -> pa.RecordBatch:
        raised.append(example(ERROR_KINDS[batch.column(0)[0].as_py()]))
        raise raised[-1]

    client = serving(query)
    assert set(ERROR_KINDS) == set(errors.__all__)
    for name, kind in ERROR_KINDS.items():
        batch = pa.record_batch([pa.array([name])], names=["kind"])
        with pytest.raises(kind) as got:
            list(client.query([batch], 1))
        assert type(got.value) is kind, name
        assert str(got.value) == f"teacher 'T': query refused: {raised[-1]}"
        assert got.value.teacher == "T"  # as the student names it
        for key, value in vars(raised[-1]).items():
            if key != "teacher":
                assert getattr(got.value, key) == value, (name, key)


class Foreign(flight.FlightServerBase):  # type: ignore[misc]
    """A Flight server that is no kdserve teacher: its errors carry ``extra_info`` as given."""

    def __init__(self, extra_info: bytes) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.extra_info = extra_info

    def do_action(self, context: Any, action: flight.Action) -> Iterator[flight.Result]:
        raise flight.FlightServerError("refused here", extra_info=self.extra_info)


@pytest.mark.parametrize(
    ("extra_info", "error", "reason"),
    [
        (b"", kd.ProtocolError, r"'F' at 127\.0\.0\.1:\d+ failed: refused here"),
        (
            b"not json",
            kd.ProtocolError,
            r"failed \(error details is not kdserve JSON.*\): refused here",
        ),
        (newer(ErrorInfo("SchemaError", "x")), kd.ProtocolError, "upgrade kdserve"),
        (
            ErrorInfo("FutureError", "from later", {"field": "f"}).to_bytes(),
            kd.KdserveError,
            r"teacher 'F': from later \(FutureError, an error this kdserve does not know",
        ),
    ],
    ids=["no-info", "garbage", "newer", "unknown-kind"],
)
def test_errors_from_elsewhere_fall_back_to_protocol_or_kdserve_errors(extra_info, error, reason):
    server = Foreign(extra_info)
    client = TeacherClient(f"127.0.0.1:{server.port}", name="F", token=TOKEN, connect_timeout=5)
    try:
        with pytest.raises(error, match=reason) as got:
            client.action("anything")
        assert type(got.value) is error
    finally:
        client.close()
        server.shutdown()
