"""Binary values (capability ``binary``, inline frames) in the Node.js bridge library and bridge.

Raw frames to real ``node`` processes, built with :func:`snakepit_core.binary.encode_binary_frame`
and read back with :class:`snakepit_core.protocol.FrameDecoder`: the protocol-2 handshake
declares ``binary``; ``echo`` gives bytes back as bytes (empty, 1 byte, 1 MiB, 10 MiB, nested,
several at once); handlers get Buffers and may return any Buffer, typed array, DataView or
ArrayBuffer; streams carry binary items within their credit window; the frame limit holds for
binary frames; every malformed binary frame makes the worker exit 3 saying why; a protocol-1
worker answers as before. Last, through the real pool.
"""

from __future__ import annotations

import json
import os
import re
import select
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from snakepit_node.plugin import node_adapter, snakepit_adapters

import snakepit_core
from snakepit_core.binary import encode_binary_frame
from snakepit_core.protocol import STDLIB_CODEC, FrameDecoder

from raw_worker import RawWorker, frame
from raw_worker import binary_body as body

MiB = 1 << 20
LIMIT = 64 * MiB

# Handlers returning binary values of every kind, written with the library.
WORKER = r"""
const { run } = require("snakepit");

/** What the handler got: each Buffer as "Buffer(<its length>)". */
function shape(value) {
  if (Buffer.isBuffer(value)) return `Buffer(${value.length})`;
  if (Array.isArray(value)) return value.map(shape);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, shape(v)]));
  }
  return value;
}

const kept = { b: Buffer.from("kept"), list: [Buffer.from("k")] };

run({
  shape: (args) => shape(args),
  buffer: () => Buffer.from("buffer"),
  uint8: () => new Uint8Array([1, 2, 3]),
  arraybuffer: () => new Uint8Array([4, 5]).buffer,
  views: () => {
    const bytes = new ArrayBuffer(8);
    new DataView(bytes).setUint32(0, 0x01020304);
    return {
      dataview: new DataView(bytes, 0, 4),
      float64: new Float64Array([1.5]),
      uint16: new Uint16Array([1, 0x0203]),
      slice: Buffer.from("0123456789").subarray(2, 5),
      shared: new Uint8Array(new SharedArrayBuffer(2)).fill(9).buffer,
    };
  },
  mix: async (args) => {
    const twice = Buffer.from("twice");
    return {
      text: "stays text",
      image: Buffer.alloc(args.n, 7),
      list: [1, Buffer.from("a"), { deep: [null, new Uint8Array(0)] }, "b"],
      twice,
      again: twice,
      when: new Date(0),
    };
  },
  sized: (args) => Buffer.alloc(args.n, 120),
  // The handler's own objects are left as they were: the next call finds its Buffers.
  kept: () => kept,
  still_kept: () => Buffer.isBuffer(kept.b) && Buffer.isBuffer(kept.list[0]),
  circular: () => {
    const o = { b: Buffer.from("x") };
    o.self = o;
    return o;
  },
  // A cycle that branches: refused at once, not walked branch by branch.
  branching: () => {
    const o = { b: Buffer.from("x") };
    o.a = o.c = o.d = o;
    return o;
  },
  deep: (args) => {
    let value = Buffer.from("bottom");
    for (let i = 0; i < args.depth; i++) value = i % 2 ? [value] : { v: value };
    return value;
  },
  // What toJSON returns is serialized, not the object it was called on.
  tojson: () => ({
    custom: { b: Buffer.from("hidden"), toJSON: () => ({ shown: "by toJSON" }) },
    u: Buffer.from("u"),
  }),
  chunks: async function* (args) {
    for (let i = 0; i < args.n; i++) yield { i, data: Buffer.alloc(args.size, i) };
    return Buffer.from("end");
  },
  // One buffer, changed after each yield: each item still carries the bytes it had.
  reuse: function* (args) {
    const buffer = Buffer.alloc(args.size);
    for (let i = 0; i < args.n; i++) {
      buffer.fill(i);
      yield buffer;
    }
  },
});
"""

Spawn = Callable[..., RawWorker]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Starts the bundled bridge (``"bridge"``) or the custom worker (``"worker"``),
    handshaken with ``max_in_flight`` unless it is None; kills what is left."""
    script = tmp_path / "binary_worker.js"
    script.write_text(WORKER)
    workers: list[RawWorker] = []

    def start(
        what: str = "bridge", max_in_flight: int | None = 4, env: Mapping[str, str] | None = None
    ) -> RawWorker:
        if what == "bridge":
            (adapter,) = snakepit_adapters()
        else:
            adapter = node_adapter("custom", script)
        worker = RawWorker(adapter.command_line(), {**(adapter.env or {}), **(env or {})})
        workers.append(worker)
        args: dict[str, Any] = {"worker_id": "w-1", "initialization": True}
        if max_in_flight is not None:
            args["max_in_flight"] = max_in_flight
        ping = worker.call("ping", args)
        assert ping["success"] is True, ping
        return worker

    yield start
    for worker in workers:
        worker.kill()


def read_exactly(worker: RawWorker, n: int, timeout: float = 30.0) -> bytearray:
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


def receive(worker: RawWorker) -> dict[str, Any]:
    """The next frame decoded as the pool decodes it: binary values as bytes."""
    (message,) = FrameDecoder(LIMIT, STDLIB_CODEC).feed(raw_frame(worker))
    assert isinstance(message, dict)
    return message


def envelope_of(data: bytes) -> dict[str, Any]:
    """A binary frame's envelope as written (keys in their order), its values still null."""
    assert data[4:5] == b"\x00", data[:16]
    (size,) = struct.unpack(">I", data[5:9])
    envelope: dict[str, Any] = json.loads(data[9 : 9 + size])
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


def ok(request_id: int, result: Any) -> dict[str, Any]:
    return {"id": request_id, "success": True, "result": result}


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


def test_protocol_2_handshake_declares_binary(spawn: Spawn) -> None:
    worker = spawn(max_in_flight=None)
    answer = worker.result("ping", {"worker_id": "w-1", "initialization": True, "max_in_flight": 2})
    assert answer["capabilities"] == ["cancel", "deadline", "stream", "binary", "text", "callbacks"]
    # The health check and a protocol-1 handshake keep the protocol-1 answer.
    assert worker.result("ping")["capabilities"] == ["cancel"]
    assert spawn(max_in_flight=None).result("ping")["capabilities"] == ["cancel"]


# -------------------------------------------------------------------------------------------
# echo
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, MiB, 10 * MiB])
def test_echo_gives_the_same_bytes_back(spawn: Spawn, size: int) -> None:
    worker = spawn()
    data = os.urandom(size)
    worker.send_raw(binary_request(7, "echo", {"data": data}))
    raw = raw_frame(worker)
    assert envelope_of(raw) == {
        "id": 7, "success": True, "result": {"echoed": {"data": None}},
        "$binary": [{"path": ["result", "echoed", "data"], "size": size}],
    }  # fmt: skip
    assert list(envelope_of(raw)) == ["id", "success", "result", "$binary"]
    assert len(raw) == 4 + 5 + len(json.dumps(envelope_of(raw), separators=(",", ":"))) + size
    assert FrameDecoder(LIMIT).feed(raw) == [ok(7, {"echoed": {"data": data}})]


def test_echo_of_binary_values_nested_and_beside_text(spawn: Spawn) -> None:
    worker = spawn()
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


def test_handlers_get_buffers_wherever_the_values_are(spawn: Spawn) -> None:
    worker = spawn("worker")
    args = {"a": b"abc", "list": [b"", 1, {"b": b"xy"}], "n": None, "s": "text"}
    worker.send_raw(binary_request(1, "shape", args))
    assert receive(worker) == ok(
        1, {"a": "Buffer(3)", "list": ["Buffer(0)", 1, {"b": "Buffer(2)"}], "n": None, "s": "text"}
    )


def test_binary_requests_in_flight_together(spawn: Spawn) -> None:
    worker = spawn()
    sent = {i: os.urandom(i * 7_000) for i in range(1, 9)}
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


def test_big_frames_back_to_back_in_pieces(spawn: Spawn) -> None:
    """Big bodies are filled as their bytes arrive; the next frame may start in the same read."""
    worker = spawn()
    sent = {1: os.urandom(300_001), 2: os.urandom(1), 3: os.urandom(700_000), 4: b""}
    data = b"".join(binary_request(i, "echo", {"d": d}) for i, d in sent.items())
    pieces = [data[i : i + 100_003] for i in range(0, len(data), 100_003)]

    def write() -> None:
        for piece in pieces:
            worker.send_raw(piece)

    writer = threading.Thread(target=write)
    writer.start()
    answers = [receive(worker) for _ in sent]
    writer.join()
    assert answers == [ok(i, {"echoed": {"d": d}}) for i, d in sent.items()]


def test_values_stored_in_a_session_come_back_as_bytes(spawn: Spawn) -> None:
    worker = spawn()
    value = {"blob": os.urandom(50_000), "tiny": b"t"}
    worker.send_raw(binary_request(1, "store", {"session_id": "s", "key": "k", "value": value}))
    assert receive(worker) == ok(1, {"stored": True, "session_id": "s", "key": "k"})
    worker.send("retrieve", {"session_id": "s", "key": "k"}, id=2)
    assert receive(worker) == ok(2, {"found": True, "session_id": "s", "key": "k", "value": value})


# -------------------------------------------------------------------------------------------
# Binary results of custom handlers
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [("buffer", b"buffer"), ("uint8", b"\x01\x02\x03"), ("arraybuffer", b"\x04\x05")],
)
def test_a_binary_result(spawn: Spawn, command: str, expected: bytes) -> None:
    worker = spawn("worker")
    worker.send(command, id=5)
    raw = raw_frame(worker)
    assert envelope_of(raw)["$binary"] == [{"path": ["result"], "size": len(expected)}]
    assert FrameDecoder().feed(raw) == [ok(5, expected)]


def test_every_kind_of_view_is_its_bytes(spawn: Spawn) -> None:
    worker = spawn("worker")
    worker.send("views", id=1)
    assert receive(worker) == ok(
        1,
        {
            "dataview": b"\x01\x02\x03\x04",
            "float64": struct.pack("=d", 1.5),
            "uint16": struct.pack("=HH", 1, 0x0203),
            "slice": b"234",
            "shared": b"\x09\x09",
        },
    )


def test_a_nested_mix_decodes_at_the_right_paths(spawn: Spawn) -> None:
    worker = spawn("worker")
    worker.send("mix", {"n": 200_000}, id=4)
    raw = raw_frame(worker)
    assert [entry["path"] for entry in envelope_of(raw)["$binary"]] == [
        ["result", "image"],
        ["result", "list", 1],
        ["result", "list", 2, "deep", 1],
        ["result", "twice"],
        ["result", "again"],
    ]
    assert FrameDecoder(LIMIT).feed(raw) == [
        ok(
            4,
            {
                "text": "stays text",
                "image": b"\x07" * 200_000,
                "list": [1, b"a", {"deep": [None, b""]}, "b"],
                "twice": b"twice",
                "again": b"twice",
                "when": "1970-01-01T00:00:00.000Z",
            },
        )
    ]


def test_the_handlers_own_objects_are_left_as_they_were(spawn: Spawn) -> None:
    worker = spawn("worker")
    for request_id in (1, 2):
        worker.send("kept", id=request_id)
        assert receive(worker) == ok(request_id, {"b": b"kept", "list": [b"k"]})
    worker.send("still_kept", id=3)
    assert receive(worker) == ok(3, True)


def test_a_circular_result_with_binary_values_is_refused(spawn: Spawn) -> None:
    worker = spawn("worker")
    assert worker.error("circular").startswith(
        "circular: result is not JSON-serializable: Converting circular structure to JSON"
    )
    assert worker.result("ping")["status"] == "ok"


def test_a_branching_cycle_is_refused_at_once(spawn: Spawn) -> None:
    worker = spawn("worker")
    assert worker.error("branching").startswith(
        "branching: result is not JSON-serializable: Converting circular structure to JSON"
    )


@pytest.mark.parametrize("depth", [3, 63, 64, 65, 300])
def test_a_binary_value_deep_down(spawn: Spawn, depth: int) -> None:
    worker = spawn("worker")
    worker.send("deep", {"depth": depth}, id=1)
    raw = raw_frame(worker)
    expected: Any = b"bottom"
    path: list[Any] = []
    for i in range(depth):
        expected, path = ([expected], [0, *path]) if i % 2 else ({"v": expected}, ["v", *path])
    assert envelope_of(raw)["$binary"] == [{"path": ["result", *path], "size": 6}]
    assert FrameDecoder().feed(raw) == [ok(1, expected)]


def test_an_object_with_tojson_is_what_tojson_returns(spawn: Spawn) -> None:
    worker = spawn("worker")
    worker.send("tojson", id=1)
    assert receive(worker) == ok(1, {"custom": {"shown": "by toJSON"}, "u": b"u"})


def test_protocol_1_answers_buffers_as_json_as_before(spawn: Spawn) -> None:
    worker = spawn("worker", max_in_flight=None)
    assert worker.result("buffer") == {"type": "Buffer", "data": list(b"buffer")}
    assert worker.result("uint8") == {"0": 1, "1": 2, "2": 3}
    assert worker.result("arraybuffer") == {}


# -------------------------------------------------------------------------------------------
# The frame limit
# -------------------------------------------------------------------------------------------


def test_a_binary_response_over_the_frame_limit_is_refused(spawn: Spawn) -> None:
    worker = spawn("worker", env={"SNAKEPIT_MAX_FRAME_BYTES": "4096"})
    envelope = '{"id":1,"success":true,"result":null,"$binary":[{"path":["result"],"size":4000}]}'
    fits = 4096 - 5 - len(envelope)  # a frame of exactly the limit
    worker.send("sized", {"n": fits}, id=1)
    raw = raw_frame(worker)
    assert len(raw) == 4 + 4096
    assert FrameDecoder(4096).feed(raw) == [ok(1, b"x" * fits)]
    message = worker.error("sized", {"n": fits + 1})
    assert message == "sized: response of 4097 bytes exceeds the frame limit of 4096 bytes"
    message = worker.error("sized", {"n": 10 * MiB})
    assert re.fullmatch(
        r"sized: response of \d+ bytes exceeds the frame limit of 4096 bytes", message
    )
    assert worker.result("ping")["status"] == "ok"


def test_a_binary_item_over_the_frame_limit_ends_the_stream(spawn: Spawn) -> None:
    worker = spawn("worker", env={"SNAKEPIT_MAX_FRAME_BYTES": "4096"})
    worker.send("chunks", {"n": 3, "size": 5000}, id=1, meta=stream_meta(8))
    answer = receive(worker)
    assert answer["id"] == 1 and answer["success"] is False, answer
    assert re.fullmatch(
        r"chunks: item of \d+ bytes exceeds the frame limit of 4096 bytes", answer["error"]
    )
    assert worker.result("ping")["status"] == "ok"


# -------------------------------------------------------------------------------------------
# Streams
# -------------------------------------------------------------------------------------------


def test_a_stream_of_binary_items_keeps_its_window(spawn: Spawn) -> None:
    worker = spawn("worker")
    size = 100_000
    worker.send("chunks", {"n": 5, "size": size}, id=9, meta=stream_meta(2))
    first = [receive(worker) for _ in range(2)]
    assert first == [{"id": 9, "item": {"i": i, "data": bytes([i]) * size}} for i in range(2)]
    assert_quiet(worker)  # two items unacknowledged: the generator waits
    worker.send("$credit", {"items": 3}, id=9)
    rest = [receive(worker) for _ in range(3)]
    assert rest == [{"id": 9, "item": {"i": i, "data": bytes([i]) * size}} for i in range(2, 5)]
    # Whether the generator has more is known only by resuming it, which needs credit; its
    # return value, the last item, is the end answer's result.
    assert_quiet(worker)
    worker.send("$credit", {"items": 1}, id=9)
    assert receive(worker) == ok(9, b"end")


@pytest.mark.parametrize("size", [100, 40_000])
def test_each_item_carries_the_bytes_it_had_when_yielded(spawn: Spawn, size: int) -> None:
    worker = spawn("worker")
    worker.send("reuse", {"n": 4, "size": size}, id=2, meta=stream_meta(64))
    assert [receive(worker) for _ in range(4)] == [
        {"id": 2, "item": bytes([i]) * size} for i in range(4)
    ]
    assert receive(worker) == ok(2, None)


def test_a_binary_generator_called_without_a_stream_answers_its_items(spawn: Spawn) -> None:
    worker = spawn("worker")
    worker.send("chunks", {"n": 2, "size": 3}, id=1)
    raw = raw_frame(worker)
    assert [e["path"] for e in envelope_of(raw)["$binary"]] == [
        ["result", 0, "data"], ["result", 1, "data"], ["result", 2]
    ]  # fmt: skip
    assert FrameDecoder().feed(raw) == [
        ok(1, [{"i": 0, "data": b"\x00" * 3}, {"i": 1, "data": b"\x01" * 3}, b"end"])
    ]


def test_a_plain_binary_result_as_a_stream_is_its_one_item(spawn: Spawn) -> None:
    worker = spawn()
    worker.send_raw(binary_request(4, "echo", {"b": b"\x00\x01"}, meta=stream_meta(4)))
    raw = raw_frame(worker)
    assert envelope_of(raw)["$binary"] == [{"path": ["item", "echoed", "b"], "size": 2}]
    assert FrameDecoder().feed(raw) == [{"id": 4, "item": {"echoed": {"b": b"\x00\x01"}}}]
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
    "envelope not UTF-8": (
        body(b'{"id":1,"x":"\xff"}'),
        "binary frame's envelope is not valid UTF-8",
    ),
    "envelope not an object": (body([1]), "binary frame's envelope is not a JSON object"),
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
    "string size": (body(request([entry(["args", "a"], "3")]), b"abc"), "and a 'size' >= 0"),
    "shared memory": (
        body(request([{"path": ["args", "a"], "size": 3, "shm": "seg"}])),
        "'$binary' entry names a shared-memory segment",
    ),
    "missing key": (body(request([entry(["args", "b"])]), b"abc"), "leads nowhere"),
    "index out of range": (
        body(request([entry(["args", "l", 1])], {"l": [None]}), b"abc"),
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
    "inherited key": (
        body(request([entry(["args", "toString"])]), b"abc"),
        "leads nowhere",
    ),
    "not to null": (
        body(request([entry(["args", "a"])], {"a": 1}), b"abc"),
        'path ["args","a"] does not lead to null',
    ),
    "the same place twice": (
        body(request([entry(["args", "a"], 1), entry(["args", "a"], 2)]), b"abc"),
        "does not lead to null",
    ),
    "value overruns": (
        body(request([entry(["args", "a"], 10)]), b"abc"),
        'binary value at ["args","a"] of 10 bytes overruns the frame',
    ),
    "bytes left over": (
        body(request([entry(["args", "a"], 2)]), b"abc"),
        "binary frame has 1 bytes beyond its values",
    ),
    "no id": (
        body({"command": "echo", "args": {"a": None}, "$binary": [entry(["args", "a"])]}, b"abc"),
        "request has no valid 'id'",
    ),
}


@pytest.mark.parametrize(("data", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_binary_frame_exits_3_saying_why(
    spawn: Spawn, data: bytes, reason: str
) -> None:
    worker = spawn()
    worker.send_raw(frame(data))
    assert worker.wait() == 3
    stderr = worker.stderr_text()
    assert "protocol error: " in stderr and reason in stderr, stderr
    assert stderr.rstrip().endswith("exiting"), stderr


def test_a_well_formed_frame_like_the_malformed_ones_is_answered(spawn: Spawn) -> None:
    """The malformed cases differ from this one in the one thing they name."""
    worker = spawn()
    args = {"a": None, "l": [None], "0": None, "b": 1}
    entries = [entry(["args", "a"], 1), entry(["args", "l", 0], 2), entry(["args", "0"], 0)]
    worker.send_raw(frame(body(request(entries, args), b"abc")))
    assert receive(worker) == ok(1, {"echoed": {"a": b"a", "l": [b"bc"], "0": b"", "b": 1}})
    worker.send_raw(frame(body(request([], request_id=2))))  # an empty list is no error
    assert receive(worker) == ok(2, {"echoed": {"a": None}})


# -------------------------------------------------------------------------------------------
# Through the pool
# -------------------------------------------------------------------------------------------


async def test_the_pool_gets_exactly_the_bytes() -> None:
    async with snakepit_core.Pool("node", worker_concurrency=4) as pool:
        args = {"b": b"\x00\xff" * 1000, "n": [b"", b"x"]}
        assert await pool.execute("echo", args) == {"echoed": args}
        big = os.urandom(10 * MiB)
        assert await pool.execute("echo", {"big": big}) == {"echoed": {"big": big}}
