"""The online boundary: what an unauthenticated, hostile or broken peer can do to a teacher.

Real teachers (subprocesses, or servers on threads of this process) and real Flight
clients on 127.0.0.1; nothing of kdserve is mocked. A "rogue teacher" is a plain pyarrow
Flight server written here: a peer that sends what kdserve never would.

* memory: peak RSS (VmHWM) of a teacher process while an unauthenticated client sends a
  300 MB request through every Flight method that carries a body;
* validation: every request field, and one-line typed errors (never a traceback);
* messages: size and depth limits on both sides, checked without recursion; a message
  that cannot be decoded is reported naming its sender and dropped, and later ones arrive;
* a seeded fuzz of malformed authenticated requests, after which a student still gets
  every sample exactly once with exact values.

Every wait is bounded.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyarrow import flight

import kdserve as kd
from _helpers import EXACT_TEACHER, ScriptProc, Scripts
from kdserve.online.client import TeacherClient
from kdserve.online.messages import (
    MAX_MESSAGE_BYTES,
    MAX_MESSAGE_DEPTH,
    decode_message,
    encode_message,
    json_depth,
)
from kdserve.online.protocol import VERSION, SendRequest, TeacherInfo
from kdserve.online.server import MAX_POSITION, MAX_WORLD_SIZE, TeacherServer

TOKEN = "boundary-token"
AUTH = [(b"authorization", f"Bearer {TOKEN}".encode())]
WIDTH = 4
N = 200  # samples a teacher process serves, in batches of BATCH
BATCH = 10
JOIN = 20.0  # seconds a thread gets to finish
BIG = 300 << 20  # bytes of the unauthenticated request
RSS_LIMIT_KB = 10_000  # the teacher's peak RSS may grow by less than this (KiB)
PORT_LINE = re.compile(r"^port (\d+)$", re.M)

# A bare TeacherServer with mutual TLS (kdserve.Teacher does not offer it yet): it
# answers queries (the identity) until killed.
MUTUAL_TLS_SERVER = """
import json
import sys
import time
from pathlib import Path

from kdserve.online.server import TeacherServer

cfg = json.loads(sys.argv[1])
pem = {k: Path(v).read_bytes() for k, v in cfg["pem"].items()}
server = TeacherServer(
    name="mtls", host="127.0.0.1", port=0, token=cfg["token"], schema=None, window=None,
    query=lambda batch: batch, tls=(pem["cert"], pem["key"]), tls_client_ca=pem["ca"],
)
print(f"port {server.port}", file=sys.stderr, flush=True)
time.sleep(600)
"""


# -- processes and memory -------------------------------------------------------------


class Proc(ScriptProc):
    """A teacher process whose stderr goes to a file; killed and reaped at teardown."""

    def memory_kb(self) -> dict[str, int]:
        """VmHWM (peak resident set) and VmRSS of the process, in KiB."""
        found: dict[str, int] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(value.split()[0])
        return found


@pytest.fixture
def procs(scripts: Scripts) -> Callable[..., Proc]:
    """Start a teacher process with ``cfg``: EXACT_TEACHER (one pass of exact values; it
    answers queries too) or ``script``."""

    def start(script: str = EXACT_TEACHER, **cfg: Any) -> Proc:
        base = {"name": "fz", "width": WIDTH, "n": N, "batch": BATCH, "token": TOKEN}
        return scripts.start(Proc, script, base | cfg)

    return start


def call_options(timeout: float = 10.0, headers: Any = AUTH) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=headers, timeout=timeout)


def clean(error: BaseException) -> str:
    """The error's text, after checking it is one line with no server traceback."""
    text = str(error)
    assert "Traceback" not in text and 'File "' not in text, text
    assert "\n" not in text, text
    return text


# -- 1. an unauthenticated 300 MB request ---------------------------------------------------


def big_call(client: flight.FlightClient, method: str, payload: bytes, options: Any) -> None:
    """Send ``payload`` as the body of one ``method`` call; the call must be refused."""
    buffer = pa.py_buffer(payload)
    table = pa.table(
        {
            "blob": pa.Array.from_buffers(
                pa.binary(), 1, [None, pa.py_buffer(np.array([0, len(payload)], np.int32)), buffer]
            )
        }
    )
    with pytest.raises((flight.FlightError, pa.ArrowException)) as refused:
        if method == "do_action":
            list(client.do_action(flight.Action("info", buffer), options))
        elif method == "do_get":
            client.do_get(flight.Ticket(payload), options).read_all()
        elif method == "do_put":
            writer, _ = client.do_put(
                flight.FlightDescriptor.for_command(b"query"), table.schema, options
            )
            try:
                writer.write_table(table)
            finally:
                writer.close()
        else:
            writer, reader = client.do_exchange(
                flight.FlightDescriptor.for_command(b"query"), options
            )
            try:
                writer.begin(table.schema)
                writer.write_table(table)
                writer.done_writing()
                reader.read_all()
            finally:
                writer.close()
    clean(refused.value)


def peak_growth(proc: Proc, client: flight.FlightClient, method: str, options: Any) -> int:
    """How much the teacher's peak RSS grows (KiB) over one ``BIG`` ``method`` request,
    after the same small request has warmed up that code path."""
    big_call(client, method, b"w" * 1024, options)
    time.sleep(0.3)
    before = proc.memory_kb()["VmHWM"]
    big_call(client, method, b"x" * BIG, options)
    time.sleep(0.3)
    after = proc.memory_kb()
    print(f"{method}: VmHWM {before} -> {after['VmHWM']} KiB, VmRSS now {after['VmRSS']} KiB")
    return after["VmHWM"] - before


_BUFFERED = pytest.mark.xfail(
    strict=True,
    reason=(
        "gRPC (inside pyarrow) receives a unary request message whole before Flight "
        "middleware or the handler runs, and pyarrow 26 offers no server option to bound "
        "it (see kdserve.online.server's docstring); measured about +700 MB. Use mutual TLS "
        "(test_mutual_tls_...) beyond loopback."
    ),
)


@pytest.mark.parametrize(
    "method",
    [
        pytest.param("do_action", marks=_BUFFERED),
        pytest.param("do_get", marks=_BUFFERED),
        "do_put",
        "do_exchange",
    ],
)
def test_unauthenticated_300mb_request_barely_grows_the_teacher(procs, method):
    teacher = procs()
    port = teacher.wait_serving()
    client = flight.FlightClient(f"grpc://127.0.0.1:{port}")
    try:
        wrong = call_options(timeout=120, headers=[(b"authorization", b"Bearer nope")])
        growth = peak_growth(teacher, client, method, wrong)
        # The teacher serves on: an authenticated call is answered.
        info = json.loads(
            next(
                iter(client.do_action(flight.Action("info", b""), call_options()))
            ).body.to_pybytes()
        )
        assert info["name"] == "fz"
    finally:
        client.close()
    assert teacher.proc.poll() is None
    assert growth < RSS_LIMIT_KB, f"{method}: peak RSS grew by {growth} KiB"


def test_an_oversized_authenticated_action_body_is_not_copied_into_python(procs):
    """gRPC's buffering cannot be avoided (above), and past the token check Arrow's C++
    copies an action's body once more (measured +120..170 MB over a stranger's request);
    the teacher refuses the oversized body without a copy of its own (one would add
    another +300 MB: measured)."""
    growth = {}
    for who, headers in (("stranger", [(b"authorization", b"Bearer nope")]), ("student", AUTH)):
        teacher = procs()
        client = flight.FlightClient(f"grpc://127.0.0.1:{teacher.wait_serving()}")
        try:
            growth[who] = peak_growth(teacher, client, "do_action", call_options(120, headers))
        finally:
            client.close()
    assert growth["student"] < growth["stranger"] + BIG // 1024 * 5 // 6, growth


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA, the teacher's certificate for 127.0.0.1, and a student's client certificate."""
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    student = ca.issue_cert("student@example.org")
    folder = tmp_path_factory.mktemp("pki")
    files = {
        "ca": ca.cert_pem.bytes(),
        "cert": server.cert_chain_pems[0].bytes(),
        "key": server.private_key_pem.bytes(),
    }
    for name, data in files.items():
        (folder / f"{name}.pem").write_bytes(data)
    return {
        "files": {name: str(folder / f"{name}.pem") for name in files},
        "ca": files["ca"],
        "cert": files["cert"],
        "key": files["key"],
        "student": (student.cert_chain_pems[0].bytes(), student.private_key_pem.bytes()),
        "stranger": (
            trustme.CA().issue_cert("x").cert_chain_pems[0].bytes(),
            student.private_key_pem.bytes(),
        ),
    }


@pytest.mark.parametrize("method", ["do_action", "do_get", "do_put", "do_exchange"])
def test_mutual_tls_bounds_what_a_client_without_a_certificate_costs(procs, pki, method):
    teacher = procs(MUTUAL_TLS_SERVER, pem=pki["files"])
    port = teacher.wait_serving(PORT_LINE)
    location = f"grpc+tls://127.0.0.1:{port}"
    stranger = flight.FlightClient(location, tls_root_certs=pki["ca"])
    try:
        growth = peak_growth(teacher, stranger, method, call_options(timeout=30))
    finally:
        stranger.close()
    assert growth < RSS_LIMIT_KB, f"{method}: peak RSS grew by {growth} KiB"
    # A student with a certificate from the CA, and the token, is served.
    client = TeacherClient(
        f"127.0.0.1:{port}",
        name="mtls",
        token=TOKEN,
        tls_root_certs=pki["ca"],
        tls_client_cert=pki["student"],
        connect_timeout=10.0,
    )
    try:
        assert client.teacher_info().query is True
        batch = pa.record_batch([pa.array([1, 2])], names=["v"])
        assert [b.to_pydict() for b in client.query([batch], 1)] == [{"v": [1, 2]}]
    finally:
        client.close()
    assert teacher.proc.poll() is None


def test_mutual_tls_refuses_certificates_of_another_ca_and_needs_a_server_certificate(pki):
    with pytest.raises(kd.KdserveError, match="needs tls="):
        TeacherServer(
            name="t", host="127.0.0.1", port=0, token=TOKEN, schema=None, window=None,
            query=None, tls_client_ca=pki["ca"],
        )  # fmt: skip
    server = TeacherServer(
        name="t", host="127.0.0.1", port=0, token=TOKEN, schema=None, window=None,
        query=lambda b: b, tls=(pki["cert"], pki["key"]), tls_client_ca=pki["ca"],
    )  # fmt: skip
    try:
        for cert in (None, pki["stranger"]):
            client = TeacherClient(
                f"127.0.0.1:{server.port}",
                name="t",
                token=TOKEN,
                tls_root_certs=pki["ca"],
                tls_client_cert=cert,
                connect_timeout=1.0,
            )
            with pytest.raises(kd.TeacherUnavailableError):
                client.teacher_info()
            client.close()
    finally:
        shutdown(server)


# -- in-process servers ------------------------------------------------------------------


def shutdown(server: flight.FlightServerBase) -> None:
    """Stop a server, failing (not hanging) if that takes too long."""
    stopper = threading.Thread(target=server.shutdown, daemon=True)
    stopper.start()
    stopper.join(JOIN)
    assert not stopper.is_alive(), "server shutdown hung"


@pytest.fixture
def servers() -> Iterator[Callable[..., TeacherServer]]:
    """``servers(**kwargs)``: a TeacherServer on 127.0.0.1 answering queries (identity by
    default); shut down at teardown."""
    made: list[TeacherServer] = []

    def make(**kwargs: Any) -> TeacherServer:
        base: dict[str, Any] = {
            "name": "t",
            "host": "127.0.0.1",
            "port": 0,
            "token": TOKEN,
            "schema": None,
            "window": None,
            "query": lambda batch: batch,
        }
        made.append(TeacherServer(**(base | kwargs)))
        return made[-1]

    yield make
    for server in made:
        shutdown(server)


def client_of(server: TeacherServer, **kwargs: Any) -> TeacherClient:
    kwargs = {"name": server.name, "token": TOKEN, "connect_timeout": 5.0} | kwargs
    return TeacherClient(f"127.0.0.1:{server.port}", **kwargs)


@pytest.fixture
def teacher() -> Iterator[kd.Teacher]:
    """A query-only kdserve Teacher on 127.0.0.1, serving on a thread until teardown."""
    t = kd.Teacher(out_port=0, token=TOKEN, name="T", progress=False)
    t.start()
    result: list[Any] = []
    thread = threading.Thread(
        target=lambda: result.append(
            t.start_knowledge_service(["x"], ["y"], lambda feed: {"y": feed["x"] * 2}, None)
        ),
        daemon=True,
    )
    thread.start()
    yield t
    t.close()
    thread.join(JOIN)
    assert not thread.is_alive(), "the teacher's service hung"


def student_of(teacher: kd.Teacher) -> kd.Student:
    s = kd.Student(token=TOKEN, connect_timeout=10.0)
    s.register_teacher(in_address=teacher.address, name="T")
    s.start()
    return s


# -- 2. validation: one-line typed errors ---------------------------------------------------


V = b'{"version": %d, ' % VERSION  # the start of a request of this protocol version


def position(**changes: Any) -> bytes:
    spec: dict[str, Any] = {"version": VERSION, "pass": 0, "seq": 0, "rank": 0, "world_size": 1}
    spec |= changes
    return json.dumps({k: v for k, v in spec.items() if v is not ...}).encode()


BAD_POSITIONS = [
    (position(world_size=0), r"world_size=0 is outside \[1, 65536\]"),
    (position(world_size=MAX_WORLD_SIZE + 1), r"world_size=65537 is outside"),
    (position(rank=2, world_size=2), r"rank=2 is outside \[0, 1\]"),
    (position(rank=-1), r"rank=-1 is outside"),
    (position(seq=-1), r"seq=-1 is outside"),
    (position(seq=MAX_POSITION + 1), r"seq=9007199254740992 is outside"),
    (position(seq=3, rank=0, world_size=2), "batch 3 does not belong to rank 0 of 2"),
    (position(**{"pass": -5}), r"pass=-5 is outside"),
    (position(seq="0"), "seq must be an integer, got '0'"),
    (position(seq=1.0), "seq must be an integer, got 1.0"),
    (position(rank=True), "rank must be an integer, got True"),
    (position(world_size=None), "world_size must be an integer, got None"),
    (position(rank=...), "missing rank"),
    (position(extra=1), r"unknown field\(s\) \['extra'\]"),
    (position(world_size=...)[:-1] + b', "world_size": NaN}', "must be an integer, got nan"),
    (b'{"pass": 0, "seq": ' + b"9" * 5000 + b', "rank": 0, "world_size": 1}', "not kdserve"),
    (b"[0, 0, 0, 1]", "not a JSON object"),
    (b'{"pass": [[[[[0]]]]]}', r"nests 6 levels deep, over the limit of 4"),
    (b'{"pass": 0, "seq', "not kdserve JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b" " * (65 << 10), r"over the limit of 65536"),
]


@pytest.mark.parametrize(("body", "reason"), BAD_POSITIONS, ids=range(len(BAD_POSITIONS)))
def test_bad_tickets_and_acks_get_one_line_protocol_errors(procs, body, reason):
    teacher = procs(n=20)
    client = TeacherClient(f"127.0.0.1:{teacher.wait_serving()}", name="fz", token=TOKEN)
    try:
        client.teacher_info()  # the service runs
        for what, call in (
            ("ticket", lambda: client.call(
                lambda: client._client.do_get(flight.Ticket(body), call_options()).read_all(),
                "knowledge",
            )),
            ("ack", lambda: client.action("ack", body)),
        ):  # fmt: skip
            with pytest.raises(kd.ProtocolError, match=reason) as refused:
                call()
            text = clean(refused.value)
            assert text.startswith("teacher 'fz': ") and what in text, text
        # Nothing was registered: a student still gets the whole pass.
        assert [sum(b.num_rows for b in client.stream_pass(0, 0, 1, 4))] == [20]
    finally:
        client.close()
    assert teacher.finish()["delivered"] == 20


def test_tickets_and_acks_beyond_the_passes_are_refused(procs):
    teacher = procs(n=20)
    client = TeacherClient(f"127.0.0.1:{teacher.wait_serving()}", name="fz", token=TOKEN)
    try:
        with pytest.raises(kd.ProtocolError, match=r"pass 1 was asked for.*times=1"):
            list(client.stream_pass(1, 0, 1, 4))
        with pytest.raises(kd.ProtocolError, match=r"pass=2 is outside \[0, 1\]"):
            client.action("ack", position(**{"pass": 2}))
        assert sum(b.num_rows for b in client.stream_pass(0, 0, 1, 4)) == 20
    finally:
        client.close()
    assert teacher.finish()["delivered"] == 20


@pytest.mark.parametrize(
    ("kind", "body", "reason"),
    [
        ("recv", V + b'"after": -1}', r"after=-1 is outside"),
        ("recv", V + b'"after": 0, "wait": "1"}', "wait must be a number of seconds >= 0"),
        ("recv", V + b'"after": 0, "wait": -0.5}', "wait must be a number"),
        ("recv", V + b'"after": 0, "wait": Infinity}', "wait must be a number"),
        ("recv", V + b'"after": 0, "wait": true}', "wait must be a number"),
        ("recv", V + b'"after": 0, "timeout": 1}', r"unknown field\(s\) \['timeout'\]"),
        ("info", b"{}", "bad info request: it takes no body"),
        ("schema", b"x", "bad schema request: it takes no body"),
        ("nonsense", b"", "unknown action 'nonsense'"),
        ("x" * 1000, b"", r"unknown action 'xxxx.*\.\.\."),
        ("line\nbreak", b"", r"unknown action 'line\\nbreak'"),
        ("send", b"not json", "message refused and dropped: .* not kdserve JSON"),
        ("send", V + b'"student": "s"}', "exactly 'student' and 'message'"),
        ("send", V + b'"student": 7, "message": 1}', "sender is not a string"),
        ("send", b'{"student": "s", "message": ' + b"[" * 70 + b"]" * 70 + b"}", "nests 71"),
        ("send", b" " * (MAX_MESSAGE_BYTES + (64 << 10) + 1), "over the limit of 4259840"),
    ],
)
def test_bad_actions_get_one_line_protocol_errors(teacher, kind, body, reason):
    client = TeacherClient(teacher.address, name="T", token=TOKEN, connect_timeout=5.0)
    try:
        with pytest.raises(kd.ProtocolError, match=reason) as refused:
            client.action(kind, body)
        assert clean(refused.value).startswith("teacher 'T': ")
    finally:
        client.close()


def test_methods_kdserve_does_not_serve_get_one_line_errors(teacher):
    raw = flight.FlightClient(f"grpc://{teacher.address}")
    descriptor = flight.FlightDescriptor.for_path("anything")
    schema = pa.schema([("a", pa.int8())])

    def upload() -> None:
        raw.do_put(descriptor, schema, call_options())[0].close()

    def flights() -> None:
        list(raw.list_flights(options=call_options()))

    def info() -> None:
        raw.get_flight_info(descriptor, call_options())

    def exchange() -> None:
        raw.do_exchange(flight.FlightDescriptor.for_command(b"nope"), call_options())[1].read_all()

    calls = {
        "uploads": upload,
        "lists no flights": flights,
        "no flight info": info,
        "bad exchange: the command is b'nope'": exchange,
    }
    try:
        for reason, call in calls.items():
            with pytest.raises(flight.FlightServerError, match=f"kdserve: .*{re.escape(reason)}"):
                try:
                    call()
                except flight.FlightError as exc:
                    clean(exc)
                    raise
    finally:
        raw.close()


def test_an_unexpected_failure_is_logged_and_reaches_the_client_as_one_line(servers, caplog):
    """A query function whose answers change schema: writing the second answer fails in
    pyarrow, an error no handler expects. It is logged with its traceback on the teacher;
    the student gets one line naming it."""
    answers = iter([{"a": [1]}, {"b": ["text"]}])
    server = servers(query=lambda batch: pa.record_batch(next(answers)))
    client = client_of(server)
    batch = pa.record_batch([pa.array([0])], names=["x"])
    with (
        caplog.at_level(logging.ERROR, logger="kdserve"),
        pytest.raises(kd.KdserveError, match=r"failed on a do_exchange call") as failed,
    ):
        list(client.query([batch, batch], 1))
    text = clean(failed.value)
    assert "ArrowInvalid" in text and "log has the details" in text
    assert not isinstance(failed.value, kd.ProtocolError)
    assert any(r.exc_info and "do_exchange" in r.getMessage() for r in caplog.records)
    client.close()


def test_query_batches_over_the_limit_are_refused(servers):
    server = servers(max_query_bytes=1000)
    client = client_of(server)
    small = pa.record_batch([pa.array(np.zeros(100, np.int64))], names=["x"])
    large = pa.record_batch([pa.array(np.zeros(200, np.int64))], names=["x"])
    assert [b.num_rows for b in client.query([small], 1)] == [100]
    with pytest.raises(kd.ProtocolError, match=r"batch of 1600 bytes, over the limit of 1000"):
        list(client.query([large], 1))
    assert [b.num_rows for b in client.query([small], 1)] == [100]
    client.close()


def test_server_limits_must_be_positive_sizes():
    for bad in (0, -1, 1.5, None):
        with pytest.raises(ValueError, match="max_message_bytes must be a positive number"):
            TeacherServer(
                name="t", host="127.0.0.1", port=0, token=TOKEN, schema=None, window=None,
                query=None, max_message_bytes=bad,
            )  # fmt: skip


# -- 3. messages ----------------------------------------------------------------------------


def nested(depth: int, leaf: Any = 0) -> Any:
    """``leaf`` inside ``depth`` lists."""
    value: Any = leaf
    for _ in range(depth):
        value = [value]
    return value


def test_messages_at_the_depth_limit_travel_and_deeper_ones_are_refused_at_send():
    assert decode_message(encode_message(nested(MAX_MESSAGE_DEPTH))) == nested(MAX_MESSAGE_DEPTH)
    arrays = nested(MAX_MESSAGE_DEPTH - 3, np.arange(3))  # an array counts 3 levels
    assert json_depth(encode_message(arrays)) == MAX_MESSAGE_DEPTH
    assert decode_message(encode_message(arrays))  # it travels
    too_deep = (
        nested(MAX_MESSAGE_DEPTH + 1),
        nested(100_000),
        nested(MAX_MESSAGE_DEPTH - 2, np.zeros(1)),
        {"a": nested(MAX_MESSAGE_DEPTH)},
    )
    for value in too_deep:
        with pytest.raises(ValueError, match="cannot be sent: it nests deeper than 64"):
            encode_message(value)
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="or it holds itself"):
        encode_message({"a": cycle})


def test_messages_at_the_size_limit_travel_and_larger_ones_are_refused_at_send():
    text = "a" * (MAX_MESSAGE_BYTES - 2)  # plus its two quotes
    assert decode_message(encode_message(text)) == text
    with pytest.raises(ValueError, match=r"4194305 bytes encoded, over the limit of 4194304"):
        encode_message(text + "a")
    with pytest.raises(ValueError, match="its arrays alone take over"):
        encode_message({"big": np.zeros(MAX_MESSAGE_BYTES, np.uint8)})  # refused before encoding
    with pytest.raises(ValueError, match="over the limit of 100"):
        encode_message("a" * 200, max_bytes=100)


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 1_000_000 + b"]" * 1_000_000,
        b'{"a":' * 500_000 + b"1" + b"}" * 500_000,
        b"[" * 3_000_000,  # malformed as well
        b'{"student": "s", "message": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["lists", "objects", "unclosed", "envelope"],
)
def test_deep_json_is_refused_before_parsing_without_recursion(data):
    for decode in (decode_message, SendRequest.from_bytes):
        with pytest.raises(kd.ProtocolError, match=r"nests \d+ levels deep, over the limit"):
            decode(data)


@pytest.mark.parametrize(
    ("data", "depth"),
    [
        (b"1", 0),
        (b'"[[[{{{"', 0),
        (b'["\\"[", ["]"]]', 2),
        (b'["\\\\", ["a"]]', 2),  # an escaped backslash ends nothing
        (b'{"a": "\\u005b", "b": {}}', 2),
        (b'"unterminated [[[', 0),
        (b'["\\', 1),
        (b"]]][[", 0),
    ],
)
def test_json_depth_ignores_brackets_in_strings(data, depth):
    assert json_depth(data) == depth


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\u00e9\n,:'),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(alphabet='[]{}"\\a', max_size=3), inner, max_size=4)
    ),
    max_leaves=30,
)


def reference_depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(reference_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(reference_depth, value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(_JSON)
def test_json_depth_matches_the_parsed_nesting(value):
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        assert json_depth(text.encode()) == reference_depth(value)


@pytest.mark.parametrize(
    "spec",
    [
        {"dtype": "<f4", "shape": [1]},  # no data
        {"dtype": "<f4", "shape": [1], "data": "AAAAAA==", "extra": 1},
        {"dtype": ["<f4"], "shape": [1], "data": "AAAAAA=="},
        {"dtype": "<f4", "shape": [-1], "data": "AAAAAA=="},
        {"dtype": "<f4", "shape": [True], "data": "AAAAAA=="},
        {"dtype": "<f4", "shape": [1] * 40, "data": "AAAAAA=="},
        {"dtype": "<f4", "shape": [2], "data": "AAAAAA=="},  # too short
        {"dtype": "<f4", "shape": [1], "data": "AAAAAA"},  # bad padding
        {"dtype": "f4,f4", "shape": [1], "data": "AAAAAAAAAAA="},  # structured
        {"dtype": "(2,)f4", "shape": [1], "data": "AAAAAAAAAAA="},  # subarray
        {"dtype": "M8[s]", "shape": [1], "data": "AAAAAAAAAAA="},  # datetime
        {"dtype": "x" * 100, "shape": [1], "data": ""},
        [1, 2],
    ],
)
def test_malformed_arrays_in_messages_are_protocol_errors(spec):
    with pytest.raises(kd.ProtocolError, match="not kdserve JSON"):
        decode_message(json.dumps({"a": {"__ndarray__": spec}}).encode())


def test_an_envelope_round_trips_and_refuses_bad_senders():
    data = SendRequest("s1", {"v": np.arange(3)}).to_bytes()
    request = SendRequest.from_bytes(data)
    assert request.student == "s1"
    np.testing.assert_array_equal(request.message["v"], np.arange(3))
    for bad in ("", "x" * 257, 7):
        with pytest.raises(ValueError, match="a sender id is a string"):
            SendRequest(bad, 1).to_bytes()  # type: ignore[arg-type]


class Rogue(flight.FlightServerBase):  # type: ignore[misc]
    """A foreign teacher: a query-only kdserve teacher as far as info goes, whose outbox
    holds whatever bytes it is given."""

    def __init__(self, outbox: list[bytes]) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.outbox = outbox

    def do_action(self, context: Any, action: flight.Action) -> Iterator[flight.Result]:
        if action.type == "info":
            info = TeacherInfo("rogue", times=0, buf_size=0, stream=False, query=True)
            return iter([flight.Result(info.to_bytes())])
        if action.type == "recv":
            after = json.loads(action.body.to_pybytes())["after"]
            return iter([flight.Result(m) for m in self.outbox[after:]])
        raise flight.FlightServerError("kdserve: not here")


def test_an_undecodable_teacher_message_is_reported_once_and_later_ones_arrive():
    outbox = [
        encode_message("m0"),
        b"not json",
        encode_message({"m": 2}),
        b"[" * 500_000 + b"]" * 500_000,
        b'{"__ndarray__": {"dtype": "|O", "shape": [1], "data": "AAAAAAAAAAA="}}',
        encode_message(["m", 5]),
        encode_message(np.arange(3)),
    ]
    rogue = Rogue(outbox)
    s = kd.Student(token=TOKEN, connect_timeout=5.0)
    s.register_teacher(in_address=f"127.0.0.1:{rogue.port}", name="R")
    s.start()
    try:
        assert s.recv(0, timeout=5.0) == "m0"  # the bad message after it is not its problem
        for index, expected in ((1, None), (2, {"m": 2}), (3, None), (4, None), (5, ["m", 5])):
            if expected is None:
                with pytest.raises(kd.ProtocolError, match=rf"'R' sent message #{index} that"):
                    s.recv(0, timeout=5.0)
            else:
                assert s.recv(0, timeout=5.0) == expected
        np.testing.assert_array_equal(s.recv(0, timeout=5.0), np.arange(3))
        with pytest.raises(TimeoutError):
            s.recv(0, timeout=0.3)
        rogue.outbox.append(encode_message("late"))
        assert s.recv(0, timeout=5.0) == "late"
    finally:
        s.close()
        shutdown(rogue)


def test_a_bad_student_message_is_dropped_and_the_teacher_receives_later_ones(teacher, caplog):
    raw = flight.FlightClient(f"grpc://{teacher.address}")
    bad = [
        b"\x00\xff garbage",
        b'{"student": "s", "message": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        b'{"student": "s", "message": {"__ndarray__": {"dtype": "<f4", "shape": [9], "data": ""}}}',
    ]
    with caplog.at_level(logging.WARNING, logger="kdserve"):
        for body in bad:
            with pytest.raises(
                flight.FlightServerError, match="message refused and dropped"
            ) as refused:
                list(raw.do_action(flight.Action("send", body), call_options()))
            clean(refused.value)
    raw.close()
    s = student_of(teacher)
    s.send({"after": "the bad ones"})
    assert teacher.recv(timeout=5.0) == {"after": "the bad ones"}
    drops = [r.getMessage() for r in caplog.records if "dropped a message from" in r.getMessage()]
    assert len(drops) == len(bad)
    assert all(re.search(r"teacher T: dropped a message from ipv[46]:", m) for m in drops), drops
    with pytest.raises(ValueError, match="nests deeper"):  # refused at send, not sent
        s.send(nested(100_000))
    with pytest.raises(ValueError, match="nests deeper"):
        teacher.send(nested(100_000))
    with pytest.raises(TimeoutError):
        teacher.recv(timeout=0.3)
    s.close()


def test_unread_student_messages_are_bounded(servers):
    server = servers(max_inbox_bytes=4000)
    client = client_of(server, connect_timeout=1.0)
    sent = 0
    with pytest.raises(kd.TeacherUnavailableError, match="not received yet"):
        for sent in range(100):  # noqa: B007
            client.send("s", "x" * 900)
    assert 3 <= sent <= 5, sent
    assert server.inbox.get(timeout=1) == ("s", "x" * 900)
    client.send("s", "after")  # room again
    client.close()


def test_a_recv_answer_is_bounded_and_every_message_arrives_in_order(servers):
    server = servers()
    client = client_of(server)
    client.teacher_info()
    payloads = [bytes([i]) * (2 << 20) for i in range(8)]  # 2.7 MiB encoded
    for i, p in enumerate(payloads):
        server.broadcast({"i": i, "p": np.frombuffer(p, np.uint8)})
    first = client.recv(0, 0)
    assert 1 <= len(first) < len(payloads)  # 16 MiB at most per answer
    got: list[Any] = []
    while len(got) < len(payloads):
        batch = client.recv(len(got), 0.5)
        assert batch, "a message went missing"
        got += batch
    assert [m["i"] for m in got] == list(range(8))
    assert all(m["p"].tobytes() == p for m, p in zip(got, payloads, strict=True))
    client.close()


def test_a_teacher_with_a_larger_message_limit_tells_its_students(servers):
    server = servers(max_message_bytes=MAX_MESSAGE_BYTES * 2)
    client = client_of(server)
    big = "a" * (MAX_MESSAGE_BYTES + 10)
    client.send("s", big)  # the client asks the teacher's limit before its first message
    assert server.inbox.get(timeout=1) == ("s", big)
    server.broadcast(big)
    assert client.recv(0, 1.0) == [big]
    client.close()


# -- 4. a fuzz of malformed authenticated requests ---------------------------------------

BAD_VALUES: list[Any] = [
    -1, -(2**63), MAX_POSITION + 1, 2**64, 10**30, 1.5, 0.0, 1e308, "0", "", None, True,
    False, [], {}, [0], {"v": 0}, [[[[[0]]]]],
]  # fmt: skip
POSITION_KEYS = ["pass", "seq", "rank", "world_size"]
VALID_POSITION = {"pass": 0, "seq": 0, "rank": 0, "world_size": 1}


def valid_position(body: bytes, last_pass: int) -> bool:
    """The spec of a ticket (last_pass 0) or an ack (last_pass = times), independently of
    the server: such a request would succeed, and change what the teacher serves."""
    try:
        spec = json.loads(body)
    except Exception:  # RecursionError included
        return False
    if not isinstance(spec, dict) or set(spec) != set(POSITION_KEYS):
        return False
    if not all(type(spec[k]) is int for k in POSITION_KEYS):
        return False
    world, rank, pass_, seq = (spec[k] for k in ("world_size", "rank", "pass", "seq"))
    return (
        1 <= world <= MAX_WORLD_SIZE
        and 0 <= rank < world
        and 0 <= pass_ <= last_pass
        and 0 <= seq <= MAX_POSITION
        and seq % world == rank
    )


def valid_recv(body: bytes) -> bool:
    try:
        spec = json.loads(body)
    except Exception:
        return False
    return isinstance(spec, dict) and set(spec) <= {"after", "wait"}


def garble(rng: random.Random, data: bytes) -> bytes:
    """``data`` damaged: truncated, cut with an invalid byte, or bytes replaced."""
    how = rng.randrange(4)
    if how == 0 and len(data) > 1:
        return data[: rng.randrange(1, len(data))]
    if how == 1:
        at = rng.randrange(len(data) + 1)
        return data[:at] + bytes([rng.choice([0xFF, 0xC0, 0x80, 0x00])]) + data[at:]
    if how == 2:
        raw = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] = rng.choice(b'{}[]":,\\0a-')
        return bytes(raw)
    return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))


def mutated_spec(rng: random.Random, valid: dict[str, Any], keys: list[str]) -> bytes:
    """A request object with one or more fields broken in one of many ways."""
    spec = dict(valid)
    how = rng.randrange(9)
    key = rng.choice(keys)
    if how == 0:
        del spec[key]
    elif how == 1:
        spec[rng.choice(["extra", "Pass", "", "seq "])] = rng.choice([*BAD_VALUES, 0])
    elif how == 2:
        spec[key] = rng.choice(BAD_VALUES)
    elif how == 3:
        world = rng.randrange(1, 5)
        spec |= {"world_size": world, "rank": world + rng.randrange(3)}
    elif how == 4:
        spec |= {"world_size": rng.choice([0, -3, MAX_WORLD_SIZE + 1, 2**40])}
    elif how == 5:
        world = rng.randrange(2, 6)
        rank = rng.randrange(world)
        spec |= {"world_size": world, "rank": rank, "seq": rank + 1 + world * rng.randrange(9)}
    elif how == 6:
        spec[key] = nested(rng.randrange(3, 300))
    elif how == 7:
        return garble(rng, json.dumps(spec).encode())
    else:
        spec["pass"] = rng.choice([-1, 2, 7, MAX_POSITION])
    text = json.dumps(spec, allow_nan=True)
    if rng.random() < 0.1:
        text = text.replace("0", rng.choice(["NaN", "-Infinity", "9" * 5000, "00", "0e99999"]), 1)
    return text.encode()


def bad_message(rng: random.Random) -> bytes:
    """The body of a "send" that a teacher must refuse (or a few valid ones, harmless)."""
    how = rng.randrange(10)
    if how == 0:
        return garble(rng, SendRequest("fuzz", {"v": [1, 2, 3]}).to_bytes())
    if how == 1:
        depth = rng.choice([MAX_MESSAGE_DEPTH + 1, 100, 10_000, 300_000])
        return b'{"student": "s", "message": ' + b"[" * depth + b"]" * depth + b"}"
    if how == 2:
        return json.dumps(
            {"student": rng.choice([1, None, "", "x" * 300, ["s"]]), "message": 1}
        ).encode()
    if how == 3:
        return json.dumps({rng.choice(["from", "student"]): "s", "msg": 1}).encode()
    if how == 4:
        spec = {"dtype": rng.choice(["|O", "<U2", "M8", "nonsense", "f4,i4", "<f4"]),
                "shape": rng.choice([[1], [-1], [2**40], "1", [1.5]]),
                "data": rng.choice(["", "!!", "AAAA", 7])}  # fmt: skip
        return json.dumps({"student": "s", "message": {"__ndarray__": spec}}).encode()
    if how == 5:
        return json.dumps(rng.choice([[], "s", 1, None, {"student": "s"}])).encode()
    if how == 6:
        return b'{"student": "s", "message": ' + b"9" * rng.choice([5000, 50_000]) + b"}"
    if how == 7:
        return b'{"student": "s", "message": "' + b"\\" * rng.randrange(1, 9) + b'"}'
    if how == 8:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    return SendRequest("fuzz", {"ok": rng.randrange(100)}).to_bytes()  # valid: it is received


class Fuzz:
    """Runs fuzz cases against one teacher; records every outcome."""

    def __init__(self, port: int) -> None:
        self.raw = flight.FlightClient(f"grpc://127.0.0.1:{port}")
        self.outcomes: dict[str, int] = {}
        self.cases = 0

    def run(self, kind: str, call: Callable[[], Any], may_succeed: bool = False) -> None:
        self.cases += 1
        try:
            call()
        except flight.FlightError as exc:
            text = clean(exc)
            assert "kdserve internal" not in text, f"{kind}: an unexpected failure: {text}"
            self.outcomes[f"{kind}: {type(exc).__name__}"] = (
                self.outcomes.get(f"{kind}: {type(exc).__name__}", 0) + 1
            )
            return
        assert may_succeed, f"{kind}: a malformed request succeeded"
        self.outcomes[f"{kind}: ok"] = self.outcomes.get(f"{kind}: ok", 0) + 1

    def action(self, kind: str, body: bytes, headers: Any = AUTH) -> Callable[[], Any]:
        return lambda: list(
            self.raw.do_action(flight.Action(kind, body), call_options(10, headers))
        )

    def get(self, ticket: bytes) -> Callable[[], Any]:
        return lambda: self.raw.do_get(flight.Ticket(ticket), call_options()).read_all()

    def exchange(self, command: bytes, batch: pa.RecordBatch | None) -> Callable[[], Any]:
        def run() -> Any:
            descriptor = flight.FlightDescriptor.for_command(command)
            writer, reader = self.raw.do_exchange(descriptor, call_options())
            try:
                if batch is not None:
                    writer.begin(batch.schema)
                    writer.write_batch(batch)
                writer.done_writing()
                return reader.read_all()
            finally:
                writer.close()

        return run


def query_batch(rng: random.Random) -> pa.RecordBatch:
    """An input batch a teacher reading feed "x" must refuse."""
    n = rng.randrange(0, 5)
    columns = {
        0: {"y": pa.array(np.zeros(n, np.float32))},
        1: {"sample_id": pa.array(np.arange(n)), "y": pa.array(np.zeros(n))},
        2: {"X": pa.array(np.zeros(n))},
        3: {},
    }[rng.randrange(4)]
    if not columns:
        return pa.RecordBatch.from_pydict({}, schema=pa.schema([]))
    return pa.record_batch(list(columns.values()), names=list(columns))


def fuzz_requests(fuzz: Fuzz, rng: random.Random) -> int:
    """Malformed tickets, acks, recv requests and messages; returns how many generated
    cases were valid requests (not sent: they would change what the teacher serves)."""
    skipped = 0
    for kind, count, last_pass in (("ticket", 260, 0), ("ack", 220, 1)):
        for _ in range(count):
            body = mutated_spec(rng, VALID_POSITION, POSITION_KEYS)
            if valid_position(body, last_pass):
                skipped += 1
            elif kind == "ticket":
                fuzz.run(kind, fuzz.get(body))
            else:
                fuzz.run(kind, fuzz.action(kind, body))
    for _ in range(150):
        body = mutated_spec(rng, {"after": 0, "wait": 0}, ["after", "wait"])
        fuzz.run("recv", fuzz.action("recv", body), may_succeed=valid_recv(body))
    for _ in range(260):
        body = bad_message(rng)
        try:
            SendRequest.from_bytes(body)
            valid = True  # harmless: the teacher gets a message
        except kd.ProtocolError:
            valid = False
        fuzz.run("send", fuzz.action("send", body), may_succeed=valid)
    return skipped


def fuzz_calls(fuzz: Fuzz, rng: random.Random) -> None:
    """Unknown actions, bodies where none is taken, queries, tokens, unserved methods."""
    for _ in range(60):
        name = rng.choice(["", "ACK", "info ", "stream", "x" * rng.randrange(60, 5000), "\x00"])
        fuzz.run("action", fuzz.action(name, garble(rng, b'{"a": 1}')))
        fuzz.run("info", fuzz.action(rng.choice(["info", "schema"]), b"{}"))
    for _ in range(30):
        fuzz.run("query", fuzz.exchange(b"query", query_batch(rng)))
        fuzz.run("exchange", fuzz.exchange(garble(rng, b"query"), None))
    schema = pa.schema([("a", pa.int8())])
    for _ in range(20):
        token = "".join(rng.choice(TOKEN + "Bearer xyz") for _ in range(rng.randrange(30)))
        headers = [(b"authorization", rng.choice(["", "Bearer "]).encode() + token.encode())]
        fuzz.run("token", fuzz.action("info", b"", headers), may_succeed=headers == AUTH)
        descriptor = flight.FlightDescriptor.for_command(garble(rng, b"x"))

        def put(descriptor: Any = descriptor) -> None:
            fuzz.raw.do_put(descriptor, schema, call_options())[0].close()

        fuzz.run("put", put)
        fuzz.run("list", lambda: list(fuzz.raw.list_flights(options=call_options())))


def test_fuzzed_requests_get_clean_errors_and_the_teacher_serves_on(procs):
    rng = random.Random(20250811)
    teacher = procs()
    port = teacher.wait_serving()
    TeacherClient(f"127.0.0.1:{port}", name="fz", token=TOKEN).teacher_info()  # the service runs
    fuzz = Fuzz(port)
    started = time.monotonic()
    try:
        skipped = fuzz_requests(fuzz, rng)
        fuzz_calls(fuzz, rng)
    finally:
        fuzz.raw.close()
    elapsed = time.monotonic() - started
    print(f"{fuzz.cases} cases in {elapsed:.1f} s ({skipped} valid ones skipped): {fuzz.outcomes}")
    assert fuzz.cases >= 1000 and skipped < 50
    assert teacher.proc.poll() is None, "the teacher died"
    tokens = [k for k in fuzz.outcomes if k.startswith("token")]
    assert set(tokens) <= {"token: FlightUnauthenticatedError", "token: ok"}, tokens

    # A real student gets the whole pass, every sample once, exact.
    student = kd.Student(token=TOKEN, connect_timeout=10.0)
    student.register_teacher(in_address=f"127.0.0.1:{port}", name="fz")
    student.start()
    ids: list[int] = []
    for batch in student.get_knowledge_generator(32)():
        got = batch[kd.SAMPLE_ID]
        x = (got[:, None] * WIDTH + np.arange(WIDTH)).astype(np.float32)
        np.testing.assert_array_equal(batch["logits"], x * np.float32(0.5) - np.float32(3))
        ids += got.tolist()
    student.close()
    assert ids == list(range(N))
    assert teacher.finish()["delivered"] == N
    log = teacher.stderr()
    assert "Traceback" not in log and " failed" not in log, log[-3000:]
