"""Binary values (capability ``binary``, inline frames) in the Python bridge library and bridge.

Raw frames to real worker processes, playing the pool (PROTOCOL.md, "Binary values"): requests
built with the host's :func:`~snakepit_core.binary.encode_binary_frame`, answers read back with
the host's :class:`~snakepit_core.protocol.FrameDecoder`, so both ends agree on the layout. The
protocol-2 handshake declares ``binary``; ``echo`` gives bytes back as bytes (empty, 1 byte,
1 MiB, 10 MiB, nested, several at once); handlers get read-only memoryviews and may return
bytes, bytearray, memoryview or any contiguous buffer (array.array), however deep; generators
stream binary items within their window; the frame limit holds for binary frames; every
malformed binary frame makes the worker exit 3 saying why; a protocol-1 worker answers as
before. Most cases run at ``max_in_flight`` 1 (one request at a time) and 4 (the concurrent
server). Last, through the real pool.
"""

from __future__ import annotations

import array
import json
import os
import re
import select
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from snakepit_python import plugin

import snakepit_core
from snakepit_core.binary import encode_binary_frame
from snakepit_core.protocol import STDLIB_CODEC, FrameDecoder

from raw_worker import RawWorker, frame
from raw_worker import binary_body as body

BRIDGE = [sys.executable, str(plugin.BRIDGE_PATH)]
MiB = 1 << 20
LIMIT = 64 * MiB
#: Generous: a 2-core machine may run other tests at the same time.
TIMEOUT = 30.0

# Handlers of every kind, written with the library.
CUSTOM_WORKER = r"""
import array
import asyncio

from snakepit_python import command, run


def look(value):  # what a handler got: each binary value's type, whether read-only, its size
    if isinstance(value, memoryview):
        return [type(value).__name__, value.readonly, value.nbytes]
    if isinstance(value, dict):
        return {key: look(item) for key, item in value.items()}
    if isinstance(value, list):
        return [look(item) for item in value]
    return value


@command
def shape(args):
    return look(args)


@command
def view_bytes(args):  # a view of the request given back, sliced
    return args["v"][1:-1]


KINDS = {
    "bytes": lambda: b"bytes",
    "bytearray": lambda: bytearray(b"bytearray"),
    "memoryview": lambda: memoryview(b"<memoryview>")[1:-1],
    "array": lambda: array.array("H", [1, 0x0203]),
    "doubles": lambda: array.array("d", [1.5]),
    "matrix": lambda: memoryview(bytes(range(12))).cast("B", (3, 4)),
    "big_bytes": lambda: bytes(range(256)) * 1024,
    "big_bytearray": lambda: bytearray(b"\x07") * 300_000,
    "big_array": lambda: array.array("i", range(50_000)),
}


@command
def kind(args):
    return KINDS[args["kind"]]()


@command(cancellable=False)
def quick_kind(args):  # on the reading thread of a concurrent worker
    return KINDS[args["kind"]]()


@command
async def async_kind(args):
    await asyncio.sleep(0)
    return KINDS[args["kind"]]()


@command
def mix(args):
    twice = b"twice"
    return {
        "text": "stays text",
        "image": bytearray(b"\x07") * args["n"],
        "list": [1, b"a", {"deep": (None, memoryview(b""))}, "b"],
        "keys": {1: b"one", False: b"false", None: b"null", 2.5: b"float"},
        "twice": twice,
        "again": twice,
        "array": array.array("b", [1, 2]),
    }


KEPT = {"b": b"kept", "list": [bytearray(b"k"), "text"], "tuple": (b"t",)}


@command
def kept(args):  # the handler's own objects must be left as they were
    return KEPT


@command
def still_kept(args):
    return [KEPT["b"] == b"kept", type(KEPT["list"][0]).__name__, KEPT["tuple"] == (b"t",)]


@command
def strided(args):
    return {"fine": b"ok", "list": [1, memoryview(b"abcdef")[::2]]}


@command
def cyclic(args):
    value = {"b": b"x"}
    value["self"] = value
    return value


@command
def not_json(args):
    return {"b": b"x", "other": object()}


@command
def sized(args):
    return b"x" * args["n"]


@command
def chunks(args):
    for i in range(args["n"]):
        yield {"i": i, "data": bytes([i]) * args["size"]}
    return b"end"


@command
async def async_chunks(args):
    for i in range(args["n"]):
        yield {"i": i, "data": bytearray([i]) * args["size"]}


@command
def reuse(args):  # one buffer, changed after each yield: each item has the bytes it had
    buffer = bytearray(args["size"])
    for i in range(args["n"]):
        buffer[:] = bytes([i]) * args["size"]
        yield buffer


@command
async def async_reuse(args):
    buffer = bytearray(args["size"])
    for i in range(args["n"]):
        buffer[:] = bytes([i]) * args["size"]
        yield memoryview(buffer)


@command
def raw_item(args):
    yield b"\x00"


run()
"""

Start = Callable[..., RawWorker]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Starts the bundled bridge or (``custom``) the worker above, handshaken with
    ``max_in_flight`` unless it is None (a protocol-1 pool); kills what is left."""
    script = tmp_path / "binary_worker.py"
    script.write_text(CUSTOM_WORKER)
    workers: list[RawWorker] = []

    def start(
        max_in_flight: int | None = 4, *, custom: bool = False, env: dict[str, str] | None = None
    ) -> RawWorker:
        worker = RawWorker([sys.executable, str(script)] if custom else BRIDGE, env=env)
        workers.append(worker)
        args: dict[str, Any] = {"worker_id": "bin", "initialization": True}
        if max_in_flight is not None:
            args["max_in_flight"] = max_in_flight
        answer = worker.call("ping", args)
        assert answer["success"] is True, answer
        worker.handshake_answer = answer["result"]  # type: ignore[attr-defined]
        return worker

    yield start
    for worker in workers:
        worker.kill()


both_modes = pytest.mark.parametrize("max_in_flight", [1, 4])


def read_exactly(worker: RawWorker, n: int, timeout: float = TIMEOUT) -> bytearray:
    """``n`` bytes of the worker's stdout (into one buffer: 10 MiB is no quadratic copy)."""
    assert worker.proc.stdout is not None
    fd = worker.proc.stdout.fileno()
    data = bytearray(n)
    view = memoryview(data)
    got = 0
    while got < n:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no frame within {timeout}s (got {got} of {n} bytes)")
        count = os.readv(fd, [view[got:]])
        if count == 0:
            raise EOFError(f"worker closed stdout after {got} of {n} bytes")
        got += count
    return data


def raw_frame(worker: RawWorker) -> bytes:
    """The next frame, length prefix included."""
    header = read_exactly(worker, 4)
    (length,) = struct.unpack(">I", header)
    return bytes(header + read_exactly(worker, length))


def decode(raw: bytes, limit: int = LIMIT) -> dict[str, Any]:
    """A frame decoded as the pool decodes it: binary values as bytes."""
    (message,) = FrameDecoder(limit, STDLIB_CODEC).feed(raw)
    assert isinstance(message, dict)
    return message


def receive(worker: RawWorker) -> dict[str, Any]:
    return decode(raw_frame(worker))


def envelope_of(raw: bytes) -> dict[str, Any]:
    """A binary frame's envelope as written (keys in their order), its values still null."""
    assert raw[4:5] == b"\x00", raw[:16]
    (size,) = struct.unpack(">I", raw[5:9])
    envelope: dict[str, Any] = json.loads(raw[9 : 9 + size])
    return envelope


def binary_values(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """Every bytes, bytearray or memoryview in ``value``, with its path (depth first)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return [(path, memoryview(value))]
    if isinstance(value, dict):
        return [b for k, v in value.items() for b in binary_values(v, (*path, k))]
    if isinstance(value, list):
        return [b for i, v in enumerate(value) for b in binary_values(v, (*path, i))]
    return []


def binary_request(
    request_id: int, command: str, args: dict[str, Any], meta: dict[str, Any] | None = None
) -> bytes:
    """A request frame whose binary values travel as bytes (the pool's encoder)."""
    message: dict[str, Any] = {"id": request_id, "command": command, "args": args}
    if meta is not None:
        message["meta"] = meta
    binary = [(("args", *path), view) for path, view in binary_values(args)]
    assert binary, "no binary value in the arguments"
    return encode_binary_frame(message, binary, LIMIT, STDLIB_CODEC)


def receive_echo(worker: RawWorker, args: dict[str, Any]) -> Any:
    worker.send_raw(binary_request(11, "echo", args))
    answer = receive(worker)
    assert answer["success"] is True, answer
    return answer["result"]["echoed"]


def ok(request_id: int, result: Any) -> dict[str, Any]:
    return {"id": request_id, "success": True, "result": result}


def failed(request_id: int, error: str) -> dict[str, Any]:
    return {"id": request_id, "success": False, "error": error}


def as_bytes(value: Any) -> Any:
    """``value`` with every bytearray and memoryview as bytes (what comes back)."""
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict):
        return {k: as_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_bytes(v) for v in value]
    return value


def stream_meta(window: int) -> dict[str, Any]:
    return {"deadline_ms": 30_000, "stream": {"window": window}}


def assert_quiet(worker: RawWorker, seconds: float = 0.3) -> None:
    assert worker.proc.stdout is not None
    ready, _, _ = select.select([worker.proc.stdout.fileno()], [], [], seconds)
    assert not ready, "the worker sent a frame"


# -------------------------------------------------------------------------------------------
# Handshake
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_in_flight", [1, 8])
def test_the_protocol_2_handshake_declares_binary(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    answer = worker.handshake_answer  # type: ignore[attr-defined]
    assert answer["capabilities"] == ["cancel", "deadline", "stream", "binary", "text", "callbacks"]
    assert answer["protocol"] == 2
    assert worker.result("ping")["capabilities"] == ["cancel"]  # the health check: protocol 1


def test_a_protocol_1_handshake_is_unchanged(start: Start) -> None:
    worker = start(None)
    assert worker.handshake_answer["capabilities"] == ["cancel"]  # type: ignore[attr-defined]
    assert "protocol" not in worker.handshake_answer  # type: ignore[attr-defined]


# -------------------------------------------------------------------------------------------
# echo
# -------------------------------------------------------------------------------------------


@both_modes
@pytest.mark.parametrize("size", [0, 1, MiB, 10 * MiB], ids=["empty", "1 B", "1 MiB", "10 MiB"])
def test_echo_gives_the_same_bytes_back(start: Start, max_in_flight: int, size: int) -> None:
    worker = start(max_in_flight)
    data = os.urandom(size)
    worker.send_raw(binary_request(7, "echo", {"data": data}))
    raw = raw_frame(worker)
    envelope = envelope_of(raw)
    assert envelope == {
        "id": 7, "success": True, "result": {"echoed": {"data": None}},
        "$binary": [{"path": ["result", "echoed", "data"], "size": size}],
    }  # fmt: skip
    assert list(envelope) == ["id", "success", "result", "$binary"]
    (head,) = struct.unpack(">I", raw[5:9])
    assert len(raw) == 4 + 5 + head + size
    assert decode(raw) == ok(7, {"echoed": {"data": data}})


@both_modes
def test_echo_of_values_nested_and_several_beside_text(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    args = {
        "text": "stays text",
        "list": [b"\x00", "x", [b"", b"\xff" * 10, {"deeper": [1, b"\x01"]}]],
        "object": {"inner": {"bytes": b"\x01\x02"}, "n": 3, "none": None},
        "big": os.urandom(100_000),
        "buffer": bytearray(b"from a bytearray"),
        "view": memoryview(b"from a memoryview"),
    }
    worker.send_raw(binary_request(3, "echo", args))
    answer = receive(worker)
    assert answer == ok(3, {"echoed": as_bytes(args)})
    assert type(answer["result"]["echoed"]["text"]) is str
    assert answer["result"]["echoed"]["object"]["none"] is None


def test_the_answer_lists_the_values_in_order_after_its_envelope(start: Start) -> None:
    worker = start(4)
    worker.send_raw(binary_request(1, "echo", {"a": b"AB", "b": [b"C"], "c": b"D" * 20_000}))
    raw = raw_frame(worker)
    assert envelope_of(raw)["$binary"] == [
        {"path": ["result", "echoed", "a"], "size": 2},
        {"path": ["result", "echoed", "b", 0], "size": 1},
        {"path": ["result", "echoed", "c"], "size": 20_000},
    ]
    assert raw.endswith(b"}ABC" + b"D" * 20_000)


def test_a_deeply_nested_value_goes_back_to_its_place(start: Start) -> None:
    worker = start(4)
    args: Any = b"bottom"
    for level in range(300):
        args = {"d": args} if level % 2 else [1, args]
    echoed = receive_echo(worker, {"deep": args})["deep"]
    for level in reversed(range(300)):
        echoed = echoed["d"] if level % 2 else echoed[1]
    assert echoed == b"bottom"


def test_an_answer_without_binary_values_is_a_plain_json_frame(start: Start) -> None:
    worker = start(4)
    worker.send("echo", {"t": "text"}, id=7)
    assert json.loads(raw_frame(worker)[4:]) == ok(7, {"echoed": {"t": "text"}})


@both_modes
def test_binary_requests_in_flight_together(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    sent = {i: os.urandom(i * 40_000) for i in range(1, 25)}
    requests = b"".join(
        binary_request(i, "echo", {"d": [d, {"e": d[:3]}]}) for i, d in sent.items()
    )
    # More than a pipe holds in each direction: written while the answers are read.
    writer = threading.Thread(
        target=worker.send_raw,
        args=(requests + frame({"id": 99, "command": "echo", "args": {"plain": True}}),),
    )
    writer.start()
    answers = {a["id"]: a for a in (receive(worker) for _ in range(len(sent) + 1))}
    writer.join()
    assert answers.pop(99) == ok(99, {"echoed": {"plain": True}})
    assert answers == {i: ok(i, {"echoed": {"d": [d, {"e": d[:3]}]}}) for i, d in sent.items()}


@both_modes
def test_values_stored_in_a_session_come_back_as_bytes(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    value = {"blob": os.urandom(50_000), "tiny": b"t", "list": [b"", "text"]}
    worker.send_raw(binary_request(1, "store", {"session_id": "s", "key": "k", "value": value}))
    assert receive(worker) == ok(1, {"stored": True, "session_id": "s", "key": "k"})
    worker.send("retrieve", {"session_id": "s", "key": "k"}, id=2)
    assert receive(worker) == ok(2, {"found": True, "session_id": "s", "key": "k", "value": value})


def test_at_protocol_1_binary_values_cannot_be_answered_as_before(start: Start) -> None:
    """A protocol-1 worker declared no ``binary``: its results are JSON, as they always were."""
    worker = start(None)
    worker.send_raw(binary_request(2, "echo", {"b": b"\xff"}))
    assert receive(worker) == failed(
        2,
        "echo: result cannot be sent as JSON (Object of type memoryview is not JSON serializable)",
    )
    worker = start(None, custom=True)
    worker.send("kind", {"kind": "bytes"}, id=3)
    assert receive(worker) == failed(
        3, "kind: result cannot be sent as JSON (Object of type bytes is not JSON serializable)"
    )
    worker.send_raw(binary_request(4, "shape", {"b": b"\xff"}))  # received as at protocol 2
    assert receive(worker) == ok(4, {"b": ["memoryview", True, 1]})


# -------------------------------------------------------------------------------------------
# Handlers: what they get, what they may return
# -------------------------------------------------------------------------------------------


@both_modes
def test_handlers_get_read_only_memoryviews_wherever_the_values_are(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True)
    args = {"a": b"abc", "list": [b"", 1, {"b": b"xy"}], "n": None, "s": "text"}
    worker.send_raw(binary_request(1, "shape", args))
    assert receive(worker) == ok(
        1,
        {
            "a": ["memoryview", True, 3],
            "list": [["memoryview", True, 0], 1, {"b": ["memoryview", True, 2]}],
            "n": None,
            "s": "text",
        },
    )
    big = os.urandom(3 * MiB)  # read in pieces, into a buffer of its own
    worker.send_raw(binary_request(2, "shape", {"big": big}))
    assert receive(worker) == ok(2, {"big": ["memoryview", True, 3 * MiB]})
    worker.send_raw(binary_request(3, "view_bytes", {"v": big}))
    assert receive(worker) == ok(3, big[1:-1])


KINDS = {
    "bytes": b"bytes",
    "bytearray": b"bytearray",
    "memoryview": b"memoryview",
    "array": struct.pack("=HH", 1, 0x0203),
    "doubles": struct.pack("=d", 1.5),
    "matrix": bytes(range(12)),
    "big_bytes": bytes(range(256)) * 1024,
    "big_bytearray": b"\x07" * 300_000,
    "big_array": array.array("i", range(50_000)).tobytes(),
}


@both_modes
@pytest.mark.parametrize("command", ["kind", "quick_kind", "async_kind"])
def test_every_kind_of_buffer_is_its_bytes(start: Start, max_in_flight: int, command: str) -> None:
    worker = start(max_in_flight, custom=True)
    for request_id, (kind, expected) in enumerate(KINDS.items()):
        worker.send(command, {"kind": kind}, id=request_id)
        raw = raw_frame(worker)
        assert envelope_of(raw)["$binary"] == [{"path": ["result"], "size": len(expected)}], kind
        assert decode(raw) == ok(request_id, expected), kind


@both_modes
def test_a_nested_mix_decodes_at_the_right_paths(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight, custom=True)
    worker.send("mix", {"n": 200_000}, id=4)
    raw = raw_frame(worker)
    assert [entry["path"] for entry in envelope_of(raw)["$binary"]] == [
        ["result", "image"],
        ["result", "list", 1],
        ["result", "list", 2, "deep", 1],
        ["result", "keys", "1"],
        ["result", "keys", "false"],
        ["result", "keys", "null"],
        ["result", "keys", "2.5"],
        ["result", "twice"],
        ["result", "again"],
        ["result", "array"],
    ]
    assert decode(raw) == ok(
        4,
        {
            "text": "stays text",
            "image": b"\x07" * 200_000,
            "list": [1, b"a", {"deep": [None, b""]}, "b"],
            "keys": {"1": b"one", "false": b"false", "null": b"null", "2.5": b"float"},
            "twice": b"twice",
            "again": b"twice",
            "array": b"\x01\x02",
        },
    )


@both_modes
def test_the_handlers_own_objects_are_left_as_they_were(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight, custom=True)
    expected = {"b": b"kept", "list": [b"k", "text"], "tuple": [b"t"]}
    for request_id in (1, 2):
        worker.send("kept", id=request_id)
        assert receive(worker) == ok(request_id, expected)
    worker.send("still_kept", id=3)
    assert receive(worker) == ok(3, [True, "bytearray", True])


def test_a_buffer_that_is_not_contiguous_is_refused_naming_its_path(start: Start) -> None:
    worker = start(4, custom=True)
    assert worker.error("strided") == (
        'strided: result cannot be sent as JSON (the value at ["result", "list", 1] is a buffer '
        "that is not contiguous (copy it first, e.g. with numpy.ascontiguousarray))"
    )
    assert worker.result("ping")["status"] == "ok"


@both_modes
def test_a_cyclic_or_unsendable_result_with_binary_values_is_refused(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True)
    assert (
        worker.error("cyclic")
        == "cyclic: result cannot be sent as JSON (Circular reference detected)"
    )
    assert worker.error("not_json") == (
        "not_json: result cannot be sent as JSON (Object of type object is not JSON serializable)"
    )
    assert worker.result("ping")["status"] == "ok"


# -------------------------------------------------------------------------------------------
# The frame limit
# -------------------------------------------------------------------------------------------


@both_modes
def test_a_binary_response_over_the_frame_limit_is_refused(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True, env={"SNAKEPIT_MAX_FRAME_BYTES": "65536"})
    envelope = (
        '{"id": 1, "success": true, "result": null, "$binary": [{"path": ["result"], '
        '"size": 60000}]}'
    )
    fits = 65536 - 5 - len(envelope)  # a frame of exactly the limit
    worker.send("sized", {"n": fits}, id=1)
    raw = raw_frame(worker)
    assert len(raw) == 4 + 65536
    assert decode(raw, 65536) == ok(1, b"x" * fits)
    message = worker.error("sized", {"n": fits + 1})
    assert message == "sized: response of 65537 bytes exceeds the frame limit of 65536 bytes"
    message = worker.error("sized", {"n": 10 * MiB})
    assert re.fullmatch(
        r"sized: response of \d+ bytes exceeds the frame limit of 65536 bytes", message
    )
    assert worker.result("ping")["status"] == "ok"


@both_modes
@pytest.mark.parametrize("command", ["chunks", "async_chunks"])
def test_a_binary_item_over_the_frame_limit_ends_the_stream(
    start: Start, max_in_flight: int, command: str
) -> None:
    worker = start(max_in_flight, custom=True, env={"SNAKEPIT_MAX_FRAME_BYTES": "4096"})
    worker.send(command, {"n": 3, "size": 5000}, id=1, meta=stream_meta(8))
    answer = receive(worker)
    assert answer["id"] == 1 and answer["success"] is False, answer
    assert re.fullmatch(
        rf"{command}: item of \d+ bytes exceeds the frame limit of 4096 bytes", answer["error"]
    )
    assert worker.result("ping")["status"] == "ok"


# -------------------------------------------------------------------------------------------
# Streams
# -------------------------------------------------------------------------------------------


@both_modes
@pytest.mark.parametrize("command", ["chunks", "async_chunks"])
def test_a_stream_of_binary_items_keeps_its_window(
    start: Start, max_in_flight: int, command: str
) -> None:
    worker = start(max_in_flight, custom=True)
    size = 100_000
    worker.send(command, {"n": 5, "size": size}, id=9, meta=stream_meta(2))
    first = [raw_frame(worker) for _ in range(2)]
    assert [envelope_of(raw)["$binary"] for raw in first] == [
        [{"path": ["item", "data"], "size": size}]
    ] * 2
    assert [decode(raw) for raw in first] == [
        {"id": 9, "item": {"i": i, "data": bytes([i]) * size}} for i in range(2)
    ]
    assert_quiet(worker)  # two items unacknowledged: the generator waits
    worker.send("$credit", {"items": 4}, id=9)  # a generator is resumed only with credit
    rest = [receive(worker) for _ in range(3)]
    assert rest == [{"id": 9, "item": {"i": i, "data": bytes([i]) * size}} for i in range(2, 5)]
    # a sync generator's return value is the last item, in the answer that ends the stream
    assert receive(worker) == ok(9, b"end" if command == "chunks" else None)


@both_modes
@pytest.mark.parametrize("command", ["reuse", "async_reuse"])
@pytest.mark.parametrize("size", [100, 40_000, 400_000])
def test_each_item_carries_the_bytes_it_had_when_yielded(
    start: Start, max_in_flight: int, command: str, size: int
) -> None:
    worker = start(max_in_flight, custom=True)
    worker.send(command, {"n": 4, "size": size}, id=2, meta=stream_meta(64))
    assert [receive(worker) for _ in range(4)] == [
        {"id": 2, "item": bytes([i]) * size} for i in range(4)
    ]
    assert receive(worker) == ok(2, None)


@both_modes
def test_a_binary_generator_called_without_a_stream_answers_its_items(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True)
    worker.send("chunks", {"n": 2, "size": 3}, id=1)
    raw = raw_frame(worker)
    assert [e["path"] for e in envelope_of(raw)["$binary"]] == [
        ["result", 0, "data"], ["result", 1, "data"], ["result", 2]
    ]  # fmt: skip
    assert decode(raw) == ok(
        1, [{"i": 0, "data": b"\x00" * 3}, {"i": 1, "data": b"\x01" * 3}, b"end"]
    )


@both_modes
def test_an_item_that_is_a_binary_value_has_the_path_item(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight, custom=True)
    worker.send("raw_item", id=5, meta=stream_meta(4))
    raw = raw_frame(worker)
    assert envelope_of(raw) == {"id": 5, "item": None, "$binary": [{"path": ["item"], "size": 1}]}
    assert raw.endswith(b"}\x00")
    assert receive(worker) == ok(5, None)


@both_modes
def test_a_plain_binary_result_as_a_stream_is_its_one_item(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    worker.send_raw(binary_request(4, "echo", {"b": b"\x00\x01"}, meta=stream_meta(4)))
    raw = raw_frame(worker)
    assert envelope_of(raw)["$binary"] == [{"path": ["item", "echoed", "b"], "size": 2}]
    assert decode(raw) == {"id": 4, "item": {"echoed": {"b": b"\x00\x01"}}}
    assert receive(worker) == ok(4, None)


# -------------------------------------------------------------------------------------------
# Malformed binary frames: the stream cannot be trusted, exit 3
# -------------------------------------------------------------------------------------------


def request(entries: Any, args: Any = None, request_id: int = 1) -> dict[str, Any]:
    return {"id": request_id, "command": "echo", "args": {"a": None} if args is None else args,
            "$binary": entries}  # fmt: skip


def entry(path: Any, size: Any = 3) -> dict[str, Any]:
    return {"path": path, "size": size}


MALFORMED = {
    "too short": (b"\x00\x00\x00", "binary frame is shorter than its header"),
    "envelope overruns": (
        b"\x00" + struct.pack(">I", 100) + b"{}",
        "binary frame's envelope of 100 bytes overruns the frame of 7 bytes",
    ),
    "envelope not JSON": (body(b"{nope"), "binary frame's envelope is not valid JSON"),
    "envelope with NaN": (body(b'{"id": NaN}'), "binary frame's envelope is not valid JSON"),
    "envelope not UTF-8": (
        body(b'{"id":1,"x":"\xff"}'),
        "binary frame's envelope is not valid UTF-8",
    ),
    "envelope not an object": (body([1]), "binary frame's envelope is not a JSON object but list"),
    "no $binary": (body({"id": 1, "command": "echo"}), "binary frame has no '$binary' list"),
    "$binary not a list": (
        body(request(entry(["args", "a"])), b"abc"),
        "binary frame has no '$binary' list",
    ),
    "entry not an object": (body(request([5]), b"abc"), "'$binary' entry 5 is not an object"),
    "empty path": (body(request([entry([])]), b"abc"), "needs a non-empty 'path'"),
    "path not a list": (body(request([entry("args")]), b"abc"), "needs a non-empty 'path'"),
    "no size": (body(request([{"path": ["args", "a"]}]), b"abc"), "and a 'size' >= 0"),
    "negative size": (body(request([entry(["args", "a"], -1)]), b"abc"), "and a 'size' >= 0"),
    "fractional size": (body(request([entry(["args", "a"], 1.5)]), b"abc"), "and a 'size' >= 0"),
    "boolean size": (body(request([entry(["args", "a"], True)]), b"abc"), "and a 'size' >= 0"),
    "string size": (body(request([entry(["args", "a"], "3")]), b"abc"), "and a 'size' >= 0"),
    "shared memory": (
        body(request([{"path": ["args", "a"], "size": 3, "shm": "seg"}])),
        "'$binary' entry names a shared-memory segment",
    ),
    "missing key": (
        body(request([entry(["args", "b"])]), b"abc"),
        'binary value\'s path ["args", "b"] leads nowhere',
    ),
    "index out of range": (
        body(request([entry(["args", "l", 1])], {"l": [None]}), b"abc"),
        "leads nowhere",
    ),
    "negative index": (
        body(request([entry(["args", "l", -1])], {"l": [None]}), b"abc"),
        "leads nowhere",
    ),
    "boolean index": (
        body(request([entry(["args", "l", False])], {"l": [None]}), b"abc"),
        "leads nowhere",
    ),
    "string key into a list": (
        body(request([entry(["args", "l", "0"])], {"l": [None]}), b"abc"),
        "leads nowhere",
    ),
    "index into an object": (
        body(request([entry(["args", 0])], {"0": None}), b"abc"),
        "leads nowhere",
    ),
    "through a scalar": (
        body(request([entry(["args", "a", "x"])], {"a": 1}), b"abc"),
        "leads nowhere",
    ),
    "into a value already placed": (
        body(request([entry(["args", "a"]), entry(["args", "a", 0], 0)]), b"abc"),
        "leads nowhere",
    ),
    "to $binary itself": (body(request([entry(["$binary"])]), b"abc"), "leads nowhere"),
    "not to null": (
        body(request([entry(["args", "a"])], {"a": 1}), b"abc"),
        'binary value\'s path ["args", "a"] does not lead to null',
    ),
    "the same place twice": (
        body(request([entry(["args", "a"], 1), entry(["args", "a"], 2)]), b"abc"),
        "does not lead to null",
    ),
    "value overruns": (
        body(request([entry(["args", "a"], 10)]), b"abc"),
        'binary value at ["args", "a"] of 10 bytes overruns the frame',
    ),
    "bytes left over": (
        body(request([entry(["args", "a"], 2)]), b"abc"),
        "binary frame has 1 bytes beyond its values",
    ),
    "no id": (
        body({"command": "echo", "args": {"a": None}, "$binary": [entry(["args", "a"])]}, b"abc"),
        "request without an integer 'id'",
    ),
}


@pytest.mark.parametrize(("data", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_binary_frame_exits_3_saying_why(
    start: Start, data: bytes, reason: str
) -> None:
    worker = start(4)
    worker.send_raw(frame(data))
    assert worker.wait(TIMEOUT) == 3
    stderr = worker.stderr_text()
    assert reason in stderr and stderr.rstrip().endswith("exiting with status 3"), stderr


@both_modes
def test_the_answers_to_frames_before_a_malformed_one_still_go_out(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    good = binary_request(1, "echo", {"b": b"\x01"})
    worker.send_raw(
        good + frame({"id": 2, "command": "echo"}) + frame(MALFORMED["bytes left over"][0])
    )
    assert receive(worker) == ok(1, {"echoed": {"b": b"\x01"}})
    assert receive(worker) == ok(2, {"echoed": {}})
    assert worker.wait(TIMEOUT) == 3
    assert "binary frame has 1 bytes beyond its values" in worker.stderr_text()


def test_a_malformed_binary_frame_while_a_handler_runs_exits_3(start: Start) -> None:
    """One request at a time, SIGIO reads ahead while a handler runs; the frame is refused once
    the serving loop reaches it."""
    worker = start(1)
    worker.send("sleep", {"seconds": 0.3}, id=1)
    worker.send_raw(frame(MALFORMED["not to null"][0]))
    assert receive(worker) == ok(1, {"slept": 0.3})
    assert worker.wait(TIMEOUT) == 3
    assert "does not lead to null" in worker.stderr_text()


def test_a_well_formed_frame_like_the_malformed_ones_is_answered(start: Start) -> None:
    """The malformed cases differ from this one in the one thing they name."""
    worker = start(4)
    args = {"a": None, "l": [None], "0": None, "b": 1}
    entries = [entry(["args", "a"], 1), entry(["args", "l", 0], 2), entry(["args", "0"], 0)]
    worker.send_raw(frame(body(request(entries, args), b"abc")))
    assert receive(worker) == ok(1, {"echoed": {"a": b"a", "l": [b"bc"], "0": b"", "b": 1}})
    worker.send_raw(frame(body(request([], request_id=2))))  # an empty list is no error
    assert receive(worker) == ok(2, {"echoed": {"a": None}})


# -------------------------------------------------------------------------------------------
# Through the pool
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [{}, {"worker_concurrency": 4}], ids=["default", "4"])
async def test_the_pool_gets_exactly_the_bytes(concurrency: dict[str, int]) -> None:
    async with snakepit_core.Pool("python", pool_size=1, **concurrency) as pool:
        args = {"b": b"\x00\xff" * 1000, "n": [b"", b"x"]}
        assert await pool.execute("echo", args) == {"echoed": args}
        big = os.urandom(10 * MiB)
        assert await pool.execute("echo", {"big": big}) == {"echoed": {"big": big}}
