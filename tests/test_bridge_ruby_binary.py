"""Binary values in the Ruby bridge library and bundled bridge: raw frames, real ruby processes.

These tests play the pool (PROTOCOL.md, "Binary values"): binary frames built with the host's
own :func:`~snakepit_core.binary.encode_binary_frame`, answers decoded with the host's
:class:`~snakepit_core.protocol.FrameDecoder`, so both ends agree on the layout. Inline values
only (no shared memory). The last test goes through the real pool.
"""

from __future__ import annotations

import json
import select
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from snakepit_ruby.plugin import ruby_adapter, snakepit_adapters

import snakepit_core
from snakepit_core.binary import encode_binary_frame
from snakepit_core.protocol import FrameDecoder, get_codec

from raw_worker import RawWorker, frame

CUSTOM_WORKER = """
require "snakepit"

Snakepit.run do |s|
  s.command("mixed") do |args|
    {
      "text" => "plain text", "ascii_bytes" => "abc".b, "bytes" => "\\xff\\x00\\xfe".b,
      "list" => ["t", "u".b, { "deep" => [1, "\\x01\\x02".b, nil] }], :sym => "\\x80".b,
      "sizes" => args.values_at("a", "b").map { |value| value.bytesize },
      "encodings" => args.values_at("a", "b").map { |value| value.encoding.name },
      "same" => args["a"] == ("\\x00" * 3).b,
    }
  end
  kept = { "inner" => ["keep".b, "text"] }.freeze # sending it must not change it
  s.command("shared") { [kept, kept["inner"], kept["inner"].frozen?] }
  s.command("items") do |args, ctx|
    args["n"].times { |k| ctx.emit({ "k" => k, "bytes" => ([k] * k).pack("C*") }) }
    "\\xde\\xad".b
  end
  s.command("raw_item", stream: true) { |_args, ctx| ctx.emit("\\x00".b) }
  s.command("big") { |args| "x".b * args["size"] }
  s.command("cyclic") do
    list = ["x".b]
    list << list
    list
  end
end
"""

#: Generous: a 2-core CI machine may run other tests at the same time.
TIMEOUT = 30.0
MAX_FRAME = 64 * 1024 * 1024
CODEC = get_codec()
MIB = 1024 * 1024


class Worker(RawWorker):
    """A worker and its answer to the handshake."""

    def send_binary(
        self, command: str, args: dict[str, Any], binary: dict[tuple[Any, ...], bytes], **meta: Any
    ) -> int:
        """A request whose `args` hold None at each path of `binary`, as a binary frame."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "command": command, "args": args}
        if meta:
            message["meta"] = meta
        values = [(("args", *path), memoryview(value)) for path, value in binary.items()]
        self.send_raw(encode_binary_frame(message, values, MAX_FRAME, CODEC))
        return self._next_id

    def receive_any(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next frame, binary or JSON, decoded as the pool decodes it."""
        header = self._read_exactly(4, timeout)
        (length,) = struct.unpack(">I", header)
        (message,) = FrameDecoder(MAX_FRAME, CODEC).feed(
            header + self._read_exactly(length, timeout)
        )
        return message

    def receive_raw(self, timeout: float = TIMEOUT) -> bytes:
        """The next frame's body, as it came."""
        (length,) = struct.unpack(">I", self._read_exactly(4, timeout))
        return self._read_exactly(length, timeout)

    def answer(self, request_id: int) -> Any:
        response = self.receive_any()
        assert response["id"] == request_id and response["success"] is True, response
        return response["result"]


Start = Callable[..., Worker]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Starts the bundled bridge (or the custom worker) and shakes hands with max_in_flight."""
    workers: list[Worker] = []
    script = tmp_path / "custom.rb"
    script.write_text(CUSTOM_WORKER)

    def start(
        max_in_flight: int | None, *, custom: bool = False, env: dict[str, str] | None = None
    ) -> Worker:
        if custom:
            adapter = ruby_adapter("custom", script)
            worker = Worker(adapter.command_line(), env={**adapter.env, **(env or {})})
        else:
            (adapter,) = snakepit_adapters()
            worker = Worker(adapter.command_line(), env=env)
        workers.append(worker)
        worker.shake_hands(max_in_flight, "raw-b")
        return worker

    yield start
    for worker in workers:
        worker.kill()


both_modes = pytest.mark.parametrize("max_in_flight", [1, 4])


def binary_envelope(body: bytes) -> dict[str, Any]:
    """The JSON envelope of a binary frame's body."""
    assert body[:1] == b"\x00", body[:80]
    (length,) = struct.unpack(">I", body[1:5])
    envelope: dict[str, Any] = json.loads(body[5 : 5 + length])
    return envelope


# -------------------------------------------------------------------------------------------
# Handshake
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_in_flight", [1, 8])
def test_the_protocol_2_handshake_declares_binary(start: Start, max_in_flight: int) -> None:
    answer = start(max_in_flight).handshake_answer
    assert answer["capabilities"] == ["cancel", "deadline", "stream", "binary", "text", "callbacks"]
    assert answer["protocol"] == 2


def test_a_protocol_1_handshake_and_a_health_check_are_unchanged(start: Start) -> None:
    worker = start(None)
    assert worker.handshake_answer["capabilities"] == ["cancel"]
    assert worker.result("ping")["capabilities"] == ["cancel"]


# -------------------------------------------------------------------------------------------
# echo
# -------------------------------------------------------------------------------------------


SIZES = {
    "empty": b"",
    "1 byte": b"\xff",
    "NUL": b"\x00",
    "1 MiB": bytes(range(256)) * (MIB // 256),
    "10 MiB": bytes(range(255, -1, -1)) * (10 * MIB // 256),
}


@both_modes
@pytest.mark.parametrize("value", SIZES.values(), ids=SIZES.keys())
def test_echo_gives_the_bytes_back(start: Start, max_in_flight: int, value: bytes) -> None:
    worker = start(max_in_flight)
    request_id = worker.send_binary("echo", {"b": None}, {("b",): value})
    assert worker.answer(request_id) == {"echoed": {"b": value}}


@both_modes
def test_echo_gives_nested_and_several_values_back_with_the_text_as_text(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    args = {"t": "text", "n": [None, 1, {"c": None, "d": "x"}, [None]], "e": None, "z": None}
    binary = {("n", 0): b"\x01\x02", ("n", 2, "c"): b"abc", ("n", 3, 0): b"", ("e",): b"\xff"}
    request_id = worker.send_binary("echo", args, binary)
    echoed = {"t": "text", "n": [b"\x01\x02", 1, {"c": b"abc", "d": "x"}, [b""]], "e": b"\xff"}
    assert worker.answer(request_id) == {"echoed": {**echoed, "z": None}}


def test_a_deeply_nested_value_goes_back_to_its_place(start: Start) -> None:
    worker = start(4)
    args: Any = None
    for level in range(400):
        args = {"d": args} if level % 2 else [1, args]
    path = tuple("d" if level % 2 else 1 for level in reversed(range(400)))
    request_id = worker.send_binary("echo", {"deep": args}, {("deep", *path): b"bottom"})
    echoed = worker.answer(request_id)["echoed"]["deep"]
    for key in path:
        echoed = echoed[key]
    assert echoed == b"bottom"


def test_the_answer_frame_is_laid_out_as_the_protocol_says(start: Start) -> None:
    worker = start(4)
    request_id = worker.send_binary(
        "echo", {"a": None, "b": [None]}, {("a",): b"AB", ("b", 0): b"C"}
    )
    body = worker.receive_raw()
    envelope = binary_envelope(body)
    assert envelope == {
        "id": request_id,
        "success": True,
        "result": {"echoed": {"a": None, "b": [None]}},
        "$binary": [
            {"path": ["result", "echoed", "a"], "size": 2},
            {"path": ["result", "echoed", "b", 0], "size": 1},
        ],
    }
    assert body.endswith(b"}ABC")


def test_an_answer_without_binary_values_is_a_plain_json_frame(start: Start) -> None:
    worker = start(4)
    worker.send("echo", {"t": "text"}, id=7)
    assert json.loads(worker.receive_raw()) == {
        "id": 7,
        "success": True,
        "result": {"echoed": {"t": "text"}},
    }


def test_many_binary_requests_in_flight_are_each_answered(start: Start) -> None:
    worker = start(16)
    sent = {}
    for k in range(40):
        value = bytes([k]) * (k * 1000)
        sent[worker.send_binary("echo", {"v": None, "k": k}, {("v",): value})] = value
    answers = [worker.receive_any() for _ in sent]
    assert {a["id"]: a["result"]["echoed"]["v"] for a in answers} == sent


def test_library_text_stays_text(start: Start) -> None:
    """info's fields come partly from Etc.uname, whose Strings are ASCII-8BIT: still text."""
    worker = start(4)
    worker.send("info", id=3)
    info = json.loads(worker.receive_raw())["result"]
    assert isinstance(info["platform"], str) and isinstance(info["arch"], str)
    assert isinstance(info["runtime_version"], str) and info["commands"]


def test_at_protocol_1_binary_strings_are_refused_as_before(start: Start) -> None:
    """Without the capability declared the answer cannot be binary: Ruby's JSON refuses the
    bytes, as it always did."""
    worker = start(None)
    request_id = worker.send_binary("echo", {"b": None}, {("b",): b"\xff\x00"})
    response = worker.receive_any()
    assert response["id"] == request_id and response["success"] is False
    assert response["error"].startswith("echo: result cannot be encoded as JSON")
    request_id = worker.send_binary("echo", {"b": None}, {("b",): b"ascii"})
    assert worker.answer(request_id) == {"echoed": {"b": "ascii"}}  # as JSON text, as before


def test_sessions_keep_binary_values(start: Start) -> None:
    worker = start(4)
    args = {"session_id": "s", "key": "k", "value": None}
    worker.answer(worker.send_binary("store", args, {("value",): b"\x00stored"}))
    worker.send("retrieve", {"session_id": "s", "key": "k"}, id=100)
    assert worker.receive_any()["result"]["value"] == b"\x00stored"


# -------------------------------------------------------------------------------------------
# Custom handlers
# -------------------------------------------------------------------------------------------


@both_modes
def test_a_handler_gets_binary_strings_and_its_ascii_8bit_strings_go_out_as_binary(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True)
    request_id = worker.send_binary(
        "mixed", {"a": None, "b": None}, {("a",): b"\0\0\0", ("b",): b"z"}
    )
    assert worker.answer(request_id) == {
        "text": "plain text",
        "ascii_bytes": b"abc",
        "bytes": b"\xff\x00\xfe",
        "list": ["t", b"u", {"deep": [1, b"\x01\x02", None]}],
        "sym": b"\x80",
        "sizes": [3, 1],
        "encodings": ["ASCII-8BIT", "ASCII-8BIT"],
        "same": True,
    }


def test_the_handlers_objects_are_sent_whole_and_left_as_they_were(start: Start) -> None:
    worker = start(4, custom=True)
    for request_id in (1, 2):
        worker.send("shared", id=request_id)
        assert worker.answer(request_id) == [{"inner": [b"keep", "text"]}, [b"keep", "text"], False]


@both_modes
def test_a_handler_streams_binary_items(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight, custom=True)
    request_id = worker.send("items", {"n": 5}, meta={"stream": {"window": 2}})
    items = []
    while True:
        message = worker.receive_any()
        assert message["id"] == request_id, message
        if "item" not in message:
            break
        items.append(message["item"])
        worker.send("$credit", {"items": 1}, id=request_id)
    assert items == [{"k": k, "bytes": bytes([k] * k)} for k in range(5)]
    # the block's value is the last item, in the answer that ends the stream
    assert message == {"id": request_id, "success": True, "result": b"\xde\xad"}


def test_binary_items_keep_the_window(start: Start) -> None:
    worker = start(4, custom=True)
    request_id = worker.send("items", {"n": 5}, meta={"stream": {"window": 2}})
    first = [worker.receive_raw() for _ in range(2)]
    assert [binary_envelope(body)["$binary"][0]["path"] for body in first] == [
        ["item", "bytes"],
        ["item", "bytes"],
    ]
    time.sleep(0.3)
    assert not readable(worker), "an item beyond the window"
    worker.send("$credit", {"items": 10}, id=request_id)
    rest = [worker.receive_any() for _ in range(4)]
    assert [message.get("item") for message in rest[:3]] == [
        {"k": k, "bytes": bytes([k] * k)} for k in (2, 3, 4)
    ]
    assert rest[-1] == {"id": request_id, "success": True, "result": b"\xde\xad"}


def readable(worker: RawWorker) -> bool:
    assert worker.proc.stdout is not None
    ready, _, _ = select.select([worker.proc.stdout.fileno()], [], [], 0)
    return bool(ready)


def test_an_item_that_is_a_binary_string_has_the_path_item(start: Start) -> None:
    worker = start(4, custom=True)
    request_id = worker.send("raw_item", meta={"stream": {"window": 4}})
    body = worker.receive_raw()
    assert binary_envelope(body) == {
        "id": request_id,
        "item": None,
        "$binary": [{"path": ["item"], "size": 1}],
    }
    assert body.endswith(b"\x00")
    assert worker.receive_any() == {"id": request_id, "success": True, "result": None}


def test_a_binary_answer_over_the_frame_limit_is_an_error_answer(start: Start) -> None:
    worker = start(4, custom=True, env={"SNAKEPIT_MAX_FRAME_BYTES": "4096"})
    worker.send("big", {"size": 4096}, id=1)
    response = worker.receive_any()
    assert response["success"] is False
    assert response["error"].startswith("big: response of ")
    assert response["error"].endswith(" bytes exceeds the frame limit 4096")
    worker.send("big", {"size": 1000}, id=2)  # and the worker goes on
    assert worker.answer(2) == b"x" * 1000


def test_a_cyclic_result_with_binary_values_is_an_error_answer(start: Start) -> None:
    worker = start(4, custom=True)
    worker.send("cyclic", id=1)
    response = worker.receive_any()
    assert response == {
        "id": 1,
        "success": False,
        "error": "cyclic: result cannot be encoded as JSON (nesting of 1001 is too deep)",
    }


# -------------------------------------------------------------------------------------------
# Malformed binary frames: the worker logs why and exits with status 3
# -------------------------------------------------------------------------------------------


def binary_body(envelope: Any, *attachments: bytes, length: int | None = None) -> bytes:
    head = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
    size = len(head) if length is None else length
    return b"\x00" + struct.pack(">I", size) + head + b"".join(attachments)


def request(binary: Any, args: Any = None) -> dict[str, Any]:
    return {
        "id": 9,
        "command": "echo",
        "args": {"v": None} if args is None else args,
        "$binary": binary,
    }


GOOD = [{"path": ["args", "v"], "size": 2}]

MALFORMED = {
    "shorter than its header": b"\x00\x00\x00",
    "envelope overruns the frame": binary_body(request(GOOD), b"ab", length=500),
    "envelope is not JSON": binary_body(b"{not json", b"ab"),
    "envelope is not UTF-8": binary_body(b'{"id": 9, "x": "\xff"}'),
    "envelope is not an object": binary_body([1, 2]),
    "no $binary": binary_body({"id": 9, "command": "echo", "args": {}}),
    "$binary is not a list": binary_body(request({"path": ["args", "v"], "size": 2}), b"ab"),
    "entry is not an object": binary_body(request([3]), b"ab"),
    "entry without a path": binary_body(request([{"size": 2}]), b"ab"),
    "empty path": binary_body(request([{"path": [], "size": 2}]), b"ab"),
    "path is not a list": binary_body(request([{"path": "args", "size": 2}]), b"ab"),
    "negative size": binary_body(request([{"path": ["args", "v"], "size": -1}]), b"ab"),
    "size not an integer": binary_body(request([{"path": ["args", "v"], "size": 2.0}]), b"ab"),
    "size missing": binary_body(request([{"path": ["args", "v"]}]), b"ab"),
    "shared memory": binary_body(request([{"path": ["args", "v"], "size": 2, "shm": "x"}])),
    "sizes beyond the frame": binary_body(request([{"path": ["args", "v"], "size": 3}]), b"ab"),
    "bytes beyond the values": binary_body(request(GOOD), b"abc"),
    "path to a missing key": binary_body(request([{"path": ["args", "w"], "size": 2}]), b"ab"),
    "path not to null": binary_body(request(GOOD, {"v": 1}), b"ab"),
    "path through a scalar": binary_body(request([{"path": ["id", 0], "size": 2}]), b"ab"),
    "index out of range": binary_body(request([{"path": ["args", "v", 1], "size": 2}], {"v": [None]}), b"ab"),
    "negative index": binary_body(request([{"path": ["args", "v", -1], "size": 2}], {"v": [None]}), b"ab"),
    "string index into a list": binary_body(request([{"path": ["args", "v", "0"], "size": 2}], {"v": [None]}), b"ab"),
    "integer key into an object": binary_body(request([{"path": ["args", 0], "size": 2}]), b"ab"),
    "the same path twice": binary_body(request(GOOD * 2), b"ab", b"cd"),
    "path to $binary": binary_body(request([{"path": ["$binary"], "size": 2}]), b"ab"),
}  # fmt: skip

REASONS = {
    "shorter than its header": "binary frame is shorter than its header",
    "envelope overruns the frame": "envelope of 500 bytes overruns the frame",
    "envelope is not JSON": "binary frame's envelope is not valid JSON",
    "envelope is not UTF-8": "binary frame's envelope is not valid UTF-8",
    "envelope is not an object": "binary frame's envelope is not a JSON object",
    "no $binary": "binary frame has no '$binary' list",
    "$binary is not a list": "binary frame has no '$binary' list",
    "entry is not an object": "'$binary' entry 3 is not an object",
    "entry without a path": "'$binary' entry needs a non-empty 'path' and a 'size' >= 0",
    "empty path": "'$binary' entry needs a non-empty 'path' and a 'size' >= 0",
    "path is not a list": "'$binary' entry needs a non-empty 'path' and a 'size' >= 0",
    "negative size": "'$binary' entry needs a non-empty 'path' and a 'size' >= 0",
    "size not an integer": "'$binary' entry needs a non-empty 'path' and a 'size' >= 0",
    "size missing": "'$binary' entry needs a non-empty 'path' and a 'size' >= 0",
    "shared memory": "names a shared-memory segment",
    "sizes beyond the frame": "of 3 bytes overruns the frame",
    "bytes beyond the values": "binary frame has 1 bytes beyond its values",
    "path not to null": 'path ["args", "v"] does not lead to null',
    "path to a missing key": 'path ["args", "w"] leads nowhere',
    "path through a scalar": 'path ["id", 0] leads nowhere',
    "index out of range": 'path ["args", "v", 1] leads nowhere',
    "negative index": 'path ["args", "v", -1] leads nowhere',
    "string index into a list": 'path ["args", "v", "0"] leads nowhere',
    "integer key into an object": 'path ["args", 0] leads nowhere',
    "the same path twice": 'path ["args", "v"] does not lead to null',
    "path to $binary": 'path ["$binary"] leads nowhere',
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_binary_frame_exits_3_with_the_reason(start: Start, case: str) -> None:
    assert set(REASONS) == set(MALFORMED)
    worker = start(4)
    worker.send_raw(frame(MALFORMED[case]))
    assert worker.wait(TIMEOUT) == 3
    stderr = worker.stderr_text()
    assert "snakepit-ruby: protocol error: " in stderr and "; exiting" in stderr, stderr
    assert REASONS[case] in stderr, stderr


def test_a_malformed_binary_frame_while_a_handler_runs_exits_3(start: Start) -> None:
    """At one request at a time, the watcher reads while a handler runs: the same rule."""
    worker = start(1)
    worker.send("sleep", {"seconds": 5})
    worker.send_raw(frame(MALFORMED["bytes beyond the values"]))
    assert worker.wait(TIMEOUT) == 3
    assert "binary frame has 1 bytes beyond its values" in worker.stderr_text()


# -------------------------------------------------------------------------------------------
# Through the pool
# -------------------------------------------------------------------------------------------


async def test_the_pool_gets_the_bytes_back_from_a_ruby_worker() -> None:
    async with snakepit_core.Pool("ruby", pool_size=1, worker_concurrency=4) as pool:
        result = await pool.execute("echo", {"b": b"\x00\xff" * 1000, "n": [b"", b"x"]})
        assert result == {"echoed": {"b": b"\x00\xff" * 1000, "n": [b"", b"x"]}}
        big = bytes(range(256)) * (10 * MIB // 256)
        result = await pool.execute("echo", {"big": big})
        assert result["echoed"]["big"] == big
