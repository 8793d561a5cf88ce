"""Streaming in the Node.js bridge library and the bundled bridge's ``stream`` command.

Raw frames to real ``node`` processes (the pool has no ``execute_stream`` yet): item frames in
order, the credit window (the generator is not resumed without credit), the end answer and
its last item, errors mid-stream, ``$cancel`` (answered once the generator has stopped, its
``finally`` run), generators called without ``meta.stream``, plain handlers called as a stream,
and streams interleaved with ordinary requests.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from snakepit_node.plugin import node_adapter, snakepit_adapters

from raw_worker import RawWorker, frame, write_syscalls

# User-defined handlers of every kind, written with the library.
WORKER = r"""
const { run } = require("snakepit");
const fs = require("fs");
const { setTimeout: delay } = require("timers/promises");

run({
  numbers: async function* (args) {
    for (let i = 0; i < args.n; i++) yield i;
    return args.ret;
  },
  sync_numbers: function* (args) {
    for (let i = 0; i < args.n; i++) yield i;
    return args.ret;
  },
  // Yields until closed, `ms` apart (cancellable); leaves `marker` behind once closed.
  endless: async function* (args, ctx) {
    try {
      for (let i = 0; ; i++) {
        yield i;
        await delay(args.ms, undefined, { signal: ctx.signal });
      }
    } finally {
      fs.writeFileSync(args.marker, "closed");
    }
  },
  // After item 0 it waits `ms` ignoring its signal: a cancel cannot stop it sooner.
  stubborn: async function* (args) {
    try {
      yield 0;
      await new Promise((resolve) => setTimeout(resolve, args.ms));
      yield 1;
    } finally {
      fs.writeFileSync(args.marker, "closed");
    }
  },
  boom: async function* () {
    yield "first";
    throw new Error("kaput");
  },
  unserializable: function* (args) {
    try {
      yield 1n;
    } finally {
      fs.writeFileSync(args.marker, "closed");
    }
  },
  plain: (args) => args.value,
  plain_async: async (args) => ({ value: args.value }),
});
"""

Spawn = Callable[..., RawWorker]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Starts the bundled bridge (``"bridge"``) or the custom worker (``"worker"``),
    handshaken with ``max_in_flight``; kills what is left."""
    script = tmp_path / "stream_worker.js"
    script.write_text(WORKER)
    workers: list[RawWorker] = []

    def start(what: str = "bridge", max_in_flight: int = 8) -> RawWorker:
        if what == "bridge":
            (adapter,) = snakepit_adapters()
        else:
            adapter = node_adapter("custom", script)
        worker = RawWorker(adapter.command_line(), adapter.env or {})
        workers.append(worker)
        ping = worker.call(
            "ping", {"worker_id": "w-1", "initialization": True, "max_in_flight": max_in_flight}
        )
        assert ping["success"] is True, ping
        return worker

    yield start
    for worker in workers:
        worker.kill()


def stream(worker: RawWorker, command: str, args: dict[str, Any], window: int = 64) -> int:
    return worker.send(command, args, meta={"deadline_ms": 30_000, "stream": {"window": window}})


def credit(worker: RawWorker, request_id: int, items: Any) -> None:
    worker.send("$credit", {"items": items}, id=request_id)


def items(worker: RawWorker, request_id: int, count: int) -> list[Any]:
    """The next ``count`` frames, which must be items of ``request_id``."""
    frames = [worker.receive() for _ in range(count)]
    assert all(f.keys() == {"id", "item"} and f["id"] == request_id for f in frames), frames
    return [f["item"] for f in frames]


def assert_quiet(worker: RawWorker, seconds: float = 0.3) -> None:
    """Nothing arrives on the worker's stdout for ``seconds``."""
    assert worker.proc.stdout is not None
    ready, _, _ = select.select([worker.proc.stdout.fileno()], [], [], seconds)
    assert not ready, "the worker sent a frame"


def stderr_after_eof(worker: RawWorker) -> str:
    worker.close_stdin()
    assert worker.wait() == 0
    return worker.stderr_text()


def ok(request_id: int, result: Any = None) -> dict[str, Any]:
    return {"id": request_id, "success": True, "result": result}


def failed(request_id: int, error: str) -> dict[str, Any]:
    return {"id": request_id, "success": False, "error": error}


# -------------------------------------------------------------------------------------------
# Handshake
# -------------------------------------------------------------------------------------------


def test_protocol_2_handshake_declares_stream(spawn: Spawn) -> None:
    worker = spawn()
    answer = worker.call("ping", {"worker_id": "w-1", "initialization": True, "max_in_flight": 2})
    assert answer["result"]["capabilities"] == [
        "cancel",
        "deadline",
        "stream",
        "binary",
        "text",
        "callbacks",
    ]
    # The health check and a protocol-1 handshake keep the protocol-1 answer.
    assert worker.result("ping")["capabilities"] == ["cancel"]
    assert worker.result("ping", {"worker_id": "w-1", "initialization": True})["capabilities"] == [
        "cancel"
    ]


def test_info_lists_stream(spawn: Spawn) -> None:
    commands = spawn().result("info")["commands"]
    assert "stream" in commands and commands == sorted(commands)


# -------------------------------------------------------------------------------------------
# Items, window and credit
# -------------------------------------------------------------------------------------------


def test_items_in_order_then_the_end(spawn: Spawn) -> None:
    worker = spawn()
    request_id = stream(worker, "stream", {"count": 50})
    assert items(worker, request_id, 50) == [{"i": i} for i in range(50)]
    assert worker.receive() == ok(request_id)


def test_no_item_beyond_the_window_without_credit(spawn: Spawn) -> None:
    worker = spawn()
    request_id = stream(worker, "stream", {"count": 10}, window=2)
    assert items(worker, request_id, 2) == [{"i": 0}, {"i": 1}]
    assert_quiet(worker)
    credit(worker, request_id, 1)
    assert items(worker, request_id, 1) == [{"i": 2}]
    assert_quiet(worker)
    credit(worker, request_id, 100)
    assert items(worker, request_id, 7) == [{"i": i} for i in range(3, 10)]
    assert worker.receive() == ok(request_id)


def test_the_producer_is_never_more_than_the_window_ahead(spawn: Spawn, tmp_path: Path) -> None:
    worker = spawn()
    (tmp_path / "out").mkdir()
    progress = tmp_path / "out" / "progress"
    window = 3
    request_id = stream(worker, "stream", {"count": 12, "progress": str(progress)}, window)
    consumed = 0
    while consumed < 12:
        assert items(worker, request_id, 1) == [{"i": consumed}]
        time.sleep(0.02)  # time for a producer that ran ahead to show it
        produced = int(progress.read_text())
        assert consumed < produced <= consumed + window
        consumed += 1
        credit(worker, request_id, 1)
    assert worker.receive() == ok(request_id)
    assert progress.read_text() == "12"
    assert [p.name for p in progress.parent.iterdir()] == ["progress"]  # no temporary file


def test_a_full_window_stops_the_generator_before_its_next_item(
    spawn: Spawn, tmp_path: Path
) -> None:
    worker = spawn()
    progress = tmp_path / "progress"
    request_id = stream(worker, "stream", {"count": 10, "progress": str(progress)}, window=4)
    items(worker, request_id, 4)
    assert_quiet(worker)
    assert progress.read_text() == "4"  # item 4 was not begun


def test_a_sync_generator_streams_with_backpressure(spawn: Spawn) -> None:
    worker = spawn("worker")
    request_id = stream(worker, "sync_numbers", {"n": 5, "ret": "last"}, window=2)
    assert items(worker, request_id, 2) == [0, 1]
    assert_quiet(worker)
    credit(worker, request_id, 4)
    assert items(worker, request_id, 3) == [2, 3, 4]
    assert worker.receive() == ok(request_id, "last")


def test_the_end_of_a_full_window_waits_for_credit(spawn: Spawn) -> None:
    """Finding out that the generator is done means resuming it: not without credit."""
    worker = spawn("worker")
    request_id = stream(worker, "numbers", {"n": 2}, window=2)
    assert items(worker, request_id, 2) == [0, 1]
    assert_quiet(worker)
    credit(worker, request_id, 2)
    assert worker.receive() == ok(request_id)


def test_bad_or_stray_credit_is_ignored(spawn: Spawn) -> None:
    worker = spawn()
    request_id = stream(worker, "stream", {"count": 3}, window=1)
    items(worker, request_id, 1)
    for bad in [0, -1, 1.5, "2", None, True]:
        credit(worker, request_id, bad)
    credit(worker, 999, 5)  # no such stream
    assert_quiet(worker)
    credit(worker, request_id, 5)
    assert items(worker, request_id, 2) == [{"i": 1}, {"i": 2}]
    assert worker.receive() == ok(request_id)
    assert worker.result("ping")["status"] == "ok"  # no answer to any $credit came
    stderr = stderr_after_eof(worker)
    assert f"ignoring $credit for request {request_id}: items=0 is not an integer >= 1" in stderr
    assert 'items="2"' in stderr and "items=999" not in stderr


def test_an_invalid_window_is_refused(spawn: Spawn) -> None:
    worker = spawn()
    worker.send("stream", {"count": 3}, id=5, meta={"stream": {"window": 0}})
    assert worker.receive() == failed(5, "stream: meta.stream.window must be an integer >= 1")


def test_wait_for_gates_item_1(spawn: Spawn, tmp_path: Path) -> None:
    worker = spawn()
    gate = tmp_path / "gate"
    request_id = stream(worker, "stream", {"count": 3, "wait_for": str(gate)})
    assert items(worker, request_id, 1) == [{"i": 0}]
    assert_quiet(worker)
    gate.touch()
    assert items(worker, request_id, 2) == [{"i": 1}, {"i": 2}]
    assert worker.receive() == ok(request_id)


def test_many_items_leave_in_few_writes(spawn: Spawn) -> None:
    worker = spawn()
    before = write_syscalls(worker.proc.pid)
    request_id = stream(worker, "stream", {"count": 2000}, window=4096)
    assert items(worker, request_id, 2000) == [{"i": i} for i in range(2000)]
    assert worker.receive() == ok(request_id)
    writes = write_syscalls(worker.proc.pid) - before
    assert writes <= 20, f"{writes} writes for 2000 items"


def test_credit_as_items_arrive_keeps_a_long_stream_going(spawn: Spawn) -> None:
    worker = spawn()
    count = 20_000
    request_id = stream(worker, "stream", {"count": count}, window=64)
    for i in range(count):
        assert items(worker, request_id, 1) == [{"i": i}]
        if i % 16 == 15:
            credit(worker, request_id, 16)
    assert worker.receive() == ok(request_id)


# -------------------------------------------------------------------------------------------
# The end: return values, errors
# -------------------------------------------------------------------------------------------


def test_the_return_value_is_the_last_item(spawn: Spawn) -> None:
    worker = spawn()
    request_id = stream(worker, "stream", {"count": 2, "final": {"total": 2}})
    assert items(worker, request_id, 2) == [{"i": 0}, {"i": 1}]
    assert worker.receive() == ok(request_id, {"total": 2})


@pytest.mark.parametrize("args", [{"n": 2}, {"n": 2, "ret": None}])
def test_no_return_value_adds_no_item(spawn: Spawn, args: dict[str, Any]) -> None:
    worker = spawn("worker")
    request_id = stream(worker, "numbers", args)
    assert items(worker, request_id, 2) == [0, 1]
    assert worker.receive() == ok(request_id)


def test_an_empty_stream_is_just_the_end(spawn: Spawn) -> None:
    worker = spawn()
    request_id = stream(worker, "stream", {"count": 0})
    assert worker.receive() == ok(request_id)


def test_fail_at_sends_the_items_then_the_error(spawn: Spawn) -> None:
    worker = spawn()
    request_id = stream(worker, "stream", {"count": 5, "fail_at": 3})
    assert items(worker, request_id, 3) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert worker.receive() == failed(request_id, "stream: failed at item 3")
    assert "failed at item" not in stderr_after_eof(worker)  # a CommandError: not logged


def test_an_error_mid_stream_logs_its_stack(spawn: Spawn) -> None:
    worker = spawn("worker")
    request_id = stream(worker, "boom", {})
    assert items(worker, request_id, 1) == ["first"]
    assert worker.receive() == failed(request_id, "boom: kaput")
    assert f"command 'boom' (request {request_id}) failed: Error: kaput" in stderr_after_eof(worker)


def test_an_unserializable_item_ends_the_stream(spawn: Spawn, tmp_path: Path) -> None:
    worker = spawn("worker")
    marker = tmp_path / "closed"
    request_id = stream(worker, "unserializable", {"marker": str(marker)})
    answer = worker.receive()
    assert answer["id"] == request_id and answer["success"] is False, answer
    assert answer["error"].startswith("unserializable: item is not JSON-serializable: ")
    assert marker.exists()  # the generator was closed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "'count' must be an integer from 0 to 1000000"),
        ({"count": -1}, "'count' must be an integer from 0 to 1000000"),
        ({"count": 1_000_001}, "'count' must be an integer from 0 to 1000000"),
        ({"count": 2.5}, "'count' must be an integer from 0 to 1000000"),
        ({"count": 3, "delay": -1}, "'delay' must be a number from 0 to 3600"),
        ({"count": 3, "delay": "1"}, "'delay' must be a number from 0 to 3600"),
        ({"count": 3, "fail_at": 1.5}, "'fail_at' must be an integer"),
        ({"count": 3, "wait_for": 7}, "'wait_for' must be a non-empty string (a file path)"),
        ({"count": 3, "progress": ""}, "'progress' must be a non-empty string (a file path)"),
    ],
)
def test_argument_errors_come_before_the_first_item(
    spawn: Spawn, args: dict[str, Any], message: str
) -> None:
    worker = spawn()
    request_id = stream(worker, "stream", args)
    assert worker.receive() == failed(request_id, f"stream: {message}")
    assert worker.error("stream", args) == f"stream: {message}"  # the same with execute


# -------------------------------------------------------------------------------------------
# Cancel
# -------------------------------------------------------------------------------------------


def test_cancel_mid_stream(spawn: Spawn) -> None:
    worker = spawn()
    request_id = stream(worker, "stream", {"count": 1000, "delay": 0.05})
    items(worker, request_id, 2)
    worker.send("$cancel", id=request_id)
    assert worker.receive() == failed(request_id, "cancelled")
    assert_quiet(worker, 0.2)
    assert worker.result("ping")["status"] == "ok"  # call() checks the id: no stray item


@pytest.mark.parametrize("window", [64, 1])  # 1: cancelled while it waits for credit
def test_cancel_closes_the_generator(spawn: Spawn, tmp_path: Path, window: int) -> None:
    worker = spawn("worker")
    marker = tmp_path / "closed"
    request_id = stream(worker, "endless", {"ms": 20, "marker": str(marker)}, window)
    items(worker, request_id, 1)
    worker.send("$cancel", id=request_id)
    answer = worker.receive()
    assert marker.exists()  # its finally ran before the answer
    assert answer == failed(request_id, "cancelled")
    assert worker.result("ping")["status"] == "ok"
    assert "AbortError" not in stderr_after_eof(worker)  # a cancel is no failure


def test_cancel_waits_for_a_generator_that_ignores_its_signal(spawn: Spawn, tmp_path: Path) -> None:
    worker = spawn("worker")
    marker = tmp_path / "closed"
    request_id = stream(worker, "stubborn", {"ms": 500, "marker": str(marker)})
    assert items(worker, request_id, 1) == [0]
    cancelled_at = time.monotonic()
    worker.send("$cancel", id=request_id)
    answer = worker.receive()
    assert time.monotonic() - cancelled_at >= 0.3  # not before it stopped
    assert answer == failed(request_id, "cancelled")  # item 1, made after the cancel, dropped
    assert marker.exists()


def test_cancel_of_a_wait_for(spawn: Spawn, tmp_path: Path) -> None:
    worker = spawn()
    request_id = stream(worker, "stream", {"count": 3, "wait_for": str(tmp_path / "never")})
    items(worker, request_id, 1)
    worker.send("$cancel", id=request_id)
    assert worker.receive() == failed(request_id, "cancelled")


# -------------------------------------------------------------------------------------------
# Handlers and requests of the other kind
# -------------------------------------------------------------------------------------------


def test_execute_of_a_generator_answers_the_list(spawn: Spawn) -> None:
    bridge = spawn()
    assert bridge.result("stream", {"count": 3}) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert bridge.result("stream", {"count": 2, "final": "end"}) == [{"i": 0}, {"i": 1}, "end"]
    assert bridge.result("stream", {"count": 0}) == []
    assert bridge.error("stream", {"count": 3, "fail_at": 1}) == "stream: failed at item 1"
    worker = spawn("worker")
    assert worker.result("numbers", {"n": 3, "ret": None}) == [0, 1, 2]
    assert worker.result("sync_numbers", {"n": 3, "ret": 3}) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("command", "args", "item"),
    [
        ("plain", {"value": [1, 2]}, [1, 2]),
        ("plain", {"value": None}, None),
        ("plain", {}, None),  # undefined goes as null
        ("plain_async", {"value": "v"}, {"value": "v"}),
    ],
)
def test_a_plain_handler_streams_its_result_as_one_item(
    spawn: Spawn, command: str, args: dict[str, Any], item: Any
) -> None:
    worker = spawn("worker")
    request_id = stream(worker, command, args)
    assert worker.receive() == {"id": request_id, "item": item}
    assert worker.receive() == ok(request_id)


def test_the_bridge_echo_as_a_stream(spawn: Spawn) -> None:
    worker = spawn()
    request_id = stream(worker, "echo", {"a": 1})
    assert items(worker, request_id, 1) == [{"echoed": {"a": 1}}]
    assert worker.receive() == ok(request_id)


def test_streams_and_ordinary_requests_interleave(spawn: Spawn) -> None:
    worker = spawn(max_in_flight=4)
    stalled = stream(worker, "stream", {"count": 5}, window=1)  # waits for credit
    slow = stream(worker, "stream", {"count": 4, "delay": 0.1})
    assert items(worker, stalled, 1) == [{"i": 0}]
    echo = worker.send("echo", {"x": 1})
    sleep = worker.send("sleep", {"seconds": 0.15})
    frames = [worker.receive() for _ in range(6)]  # 4 items of slow, echo, sleep
    assert ok(echo, {"echoed": {"x": 1}}) in frames and ok(sleep, {"slept": 0.15}) in frames
    assert [f["item"] for f in frames if f["id"] == slow] == [{"i": i} for i in range(4)]
    assert frames.index(ok(echo, {"echoed": {"x": 1}})) < 3  # not behind the whole stream
    assert worker.receive() == ok(slow)
    credit(worker, stalled, 10)
    assert items(worker, stalled, 4) == [{"i": i} for i in range(1, 5)]
    assert worker.receive() == ok(stalled)


def test_two_streams_on_one_worker(spawn: Spawn) -> None:
    worker = spawn(max_in_flight=2)
    meta = {"stream": {"window": 128}}
    worker.send_raw(
        b"".join(
            frame({"id": i, "command": "stream", "args": {"count": 100}, "meta": meta})
            for i in (1, 2)
        )
    )
    frames = [worker.receive() for _ in range(202)]
    for request_id in (1, 2):
        mine = [f for f in frames if f["id"] == request_id]
        assert [f["item"] for f in mine[:-1]] == [{"i": i} for i in range(100)]
        assert mine[-1] == ok(request_id)


def test_a_stream_holds_its_slot_until_it_ends(spawn: Spawn) -> None:
    worker = spawn(max_in_flight=1)
    request_id = stream(worker, "stream", {"count": 2}, window=1)
    items(worker, request_id, 1)
    echo = worker.send("echo", {})
    assert_quiet(worker)  # the echo waits for the one slot
    credit(worker, request_id, 2)
    assert items(worker, request_id, 1) == [{"i": 1}]
    assert worker.receive() == ok(request_id)
    assert worker.receive() == ok(echo, {"echoed": {}})
