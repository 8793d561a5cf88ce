"""Streaming in the Ruby bridge library and bundled bridge: raw frames, real ruby processes.

The pool does not stream yet, so these tests play the pool (PROTOCOL.md, "Streaming"): a request
with ``meta.stream = {"window": W}``, item frames ``{"id", "item"}``, ``$credit`` frames granting
more, and the ordinary answer that ends the stream. Most cases run at ``max_in_flight`` 1, where
the handler runs on the main thread and reads its credit itself, and at 4, where it runs on a
pool thread and the main thread reads the credit for it.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from snakepit_ruby.plugin import ruby_adapter, snakepit_adapters

from raw_worker import RawWorker

CUSTOM_WORKER = """
require "snakepit"

Snakepit.run do |s|
  s.command("generate", stream: true) do |args, ctx|
    args["n"].times do |k|
      returned = ctx.emit({ "k" => k })
      raise "emit returned #{returned.inspect}" unless returned.nil?
    end
    args["final"]
  end
  s.command("maybe") do |args, ctx| # emits, but is not registered as a stream
    args["n"].times { |k| ctx.emit(k) }
    args["final"]
  end
  s.command("plain") { |args| args["value"] }
  s.command("guarded") do |args, ctx|
    args["n"].times { |k| ctx.emit(k) }
    "finished"
  ensure
    File.write(args["marker"], "unwound")
  end
  s.command("broken") do |_args, ctx|
    ctx.emit(0)
    ctx.emit(1)
    raise "boom"
  end
end
"""

#: Generous: a 2-core CI machine may run other tests at the same time.
TIMEOUT = 10.0
QUIET = 0.3


Worker = RawWorker

Start = Callable[..., Worker]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Starts the bundled bridge (or the custom worker) and shakes hands with max_in_flight."""
    workers: list[Worker] = []
    script = tmp_path / "custom.rb"
    script.write_text(CUSTOM_WORKER)

    def start(max_in_flight: int | None, *, custom: bool = False) -> Worker:
        if custom:
            adapter = ruby_adapter("custom", script)
            worker = Worker(adapter.command_line(), env=adapter.env)
        else:
            (adapter,) = snakepit_adapters()
            worker = Worker(adapter.command_line())
        workers.append(worker)
        worker.shake_hands(max_in_flight, "raw-s")
        return worker

    yield start
    for worker in workers:
        worker.kill()


def stream(worker: RawWorker, command: str, args: dict[str, Any], window: int = 64) -> int:
    return worker.send(command, args, meta={"deadline_ms": 30000, "stream": {"window": window}})


def credit(worker: RawWorker, request_id: int, items: Any = 1) -> None:
    worker.send("$credit", {"items": items}, id=request_id)


def item(request_id: int, value: Any) -> dict[str, Any]:
    return {"id": request_id, "item": value}


def ended(request_id: int, result: Any = None) -> dict[str, Any]:
    return {"id": request_id, "success": True, "result": result}


def failed(request_id: int, error: str) -> dict[str, Any]:
    return {"id": request_id, "success": False, "error": error}


def collect(worker: RawWorker, request_id: int) -> tuple[list[Any], dict[str, Any]]:
    """A stream's items and the answer that ends it, crediting each item as it arrives."""
    items: list[Any] = []
    while True:
        frame = worker.receive(TIMEOUT)
        assert frame["id"] == request_id, frame
        if "item" not in frame:
            return items, frame
        assert set(frame) == {"id", "item"}, frame
        items.append(frame["item"])
        credit(worker, request_id)


def assert_nothing_more(worker: RawWorker, wait: float = QUIET) -> None:
    assert worker.proc.stdout is not None
    ready, _, _ = select.select([worker.proc.stdout.fileno()], [], [], wait)
    assert not ready, f"an unexpected frame: {worker.receive()}"


def progress(path: Path) -> int:
    return int(path.read_text()) if path.exists() else 0


def wait_for_progress(path: Path, at_least: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while progress(path) < at_least:
        assert time.monotonic() < deadline, f"progress stayed at {progress(path)} < {at_least}"
        time.sleep(0.01)


def stderr_after_exit(worker: RawWorker) -> str:
    worker.close_stdin()
    assert worker.wait(TIMEOUT) == 0
    return worker.stderr_text()


both_modes = pytest.mark.parametrize("max_in_flight", [1, 4])


# -------------------------------------------------------------------------------------------
# Handshake
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_in_flight", [1, 8])
def test_the_protocol_2_handshake_declares_stream(start: Start, max_in_flight: int) -> None:
    answer = start(max_in_flight).handshake_answer
    assert answer["capabilities"] == ["cancel", "deadline", "stream", "binary", "text", "callbacks"]
    assert answer["protocol"] == 2


def test_a_protocol_1_handshake_and_a_health_check_are_unchanged(start: Start) -> None:
    worker = start(None)
    assert worker.handshake_answer["capabilities"] == ["cancel"]
    assert worker.result("ping")["capabilities"] == ["cancel"]


def test_info_lists_stream_among_the_sorted_commands(start: Start) -> None:
    commands = start(1).result("info")["commands"]
    assert "stream" in commands and commands == sorted(commands)


# -------------------------------------------------------------------------------------------
# Items, end and credit
# -------------------------------------------------------------------------------------------


@both_modes
def test_items_come_in_order_then_the_end(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    request_id = stream(worker, "stream", {"count": 200}, window=8)
    items, end = collect(worker, request_id)
    assert items == [{"i": i} for i in range(200)]
    assert end == ended(request_id)
    assert_nothing_more(worker, 0.05)


@both_modes
def test_a_full_window_holds_the_producer_until_credit_comes(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    request_id = stream(worker, "stream", {"count": 5}, window=2)
    assert [worker.receive(TIMEOUT) for _ in range(2)] == [
        item(request_id, {"i": 0}),
        item(request_id, {"i": 1}),
    ]
    assert_nothing_more(worker)
    credit(worker, request_id, 1)
    assert worker.receive(TIMEOUT) == item(request_id, {"i": 2})
    assert_nothing_more(worker)
    credit(worker, request_id, 10)
    assert [worker.receive(TIMEOUT) for _ in range(3)] == [
        item(request_id, {"i": 3}),
        item(request_id, {"i": 4}),
        ended(request_id),
    ]


@both_modes
def test_the_producer_is_never_more_than_the_window_ahead(
    start: Start, max_in_flight: int, tmp_path: Path
) -> None:
    worker = start(max_in_flight)
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "progress"
    window = 3
    request_id = stream(worker, "stream", {"count": 12, "progress": str(path)}, window=window)
    for consumed in range(12):
        # The producer runs up to the window, and no further, before this item is acknowledged.
        full = min(consumed + window, 12)
        wait_for_progress(path, full)
        time.sleep(0.02)
        assert progress(path) == full
        assert worker.receive(TIMEOUT) == item(request_id, {"i": consumed})
        credit(worker, request_id)
    assert worker.receive(TIMEOUT) == ended(request_id)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left beside it


@both_modes
def test_wait_for_holds_item_1_until_the_file_exists(
    start: Start, max_in_flight: int, tmp_path: Path
) -> None:
    worker = start(max_in_flight)
    gate = tmp_path / "gate"
    request_id = stream(worker, "stream", {"count": 3, "wait_for": str(gate)})
    assert worker.receive(TIMEOUT) == item(request_id, {"i": 0})
    assert_nothing_more(worker)
    gate.touch()
    assert [worker.receive(TIMEOUT) for _ in range(3)] == [
        item(request_id, {"i": 1}),
        item(request_id, {"i": 2}),
        ended(request_id),
    ]


@both_modes
def test_the_return_value_is_the_last_item_and_nil_adds_none(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    final = stream(worker, "stream", {"count": 2, "final": {"done": True}})
    assert collect(worker, final) == ([{"i": 0}, {"i": 1}], ended(final, {"done": True}))
    none = stream(worker, "stream", {"count": 2, "final": None})
    assert collect(worker, none) == ([{"i": 0}, {"i": 1}], ended(none))
    empty = stream(worker, "stream", {"count": 0})
    assert collect(worker, empty) == ([], ended(empty))


@both_modes
@pytest.mark.parametrize("value", [{"answer": 42}, None, [1, 2]])
def test_a_plain_handler_as_a_stream_gives_its_result_as_one_item(
    start: Start, max_in_flight: int, value: Any
) -> None:
    worker = start(max_in_flight, custom=True)
    request_id = stream(worker, "plain", {"value": value}, window=1)
    assert worker.receive(TIMEOUT) == item(request_id, value)
    assert worker.receive(TIMEOUT) == ended(request_id)
    assert_nothing_more(worker, 0.05)


@both_modes
def test_a_streaming_handler_called_by_execute_answers_the_list(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True)
    assert worker.result("generate", {"n": 3}) == [{"k": 0}, {"k": 1}, {"k": 2}]
    assert worker.result("generate", {"n": 2, "final": "last"}) == [{"k": 0}, {"k": 1}, "last"]
    assert worker.result("generate", {"n": 0}) == []  # registered with stream: true
    assert worker.result("maybe", {"n": 2}) == [0, 1]
    assert worker.result("maybe", {"n": 0, "final": "plain"}) == "plain"  # it emitted nothing


@both_modes
def test_a_handler_registered_as_a_stream_may_emit_nothing(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True)
    empty = stream(worker, "generate", {"n": 0})
    assert worker.receive(TIMEOUT) == ended(empty)
    final = stream(worker, "generate", {"n": 0, "final": "last"})
    assert worker.receive(TIMEOUT) == ended(final, "last")
    # Unregistered, a handler that emits nothing is a plain one: its value is the one item.
    plain = stream(worker, "maybe", {"n": 0})
    assert [worker.receive(TIMEOUT) for _ in range(2)] == [item(plain, None), ended(plain)]


def test_the_stream_command_called_by_execute_answers_the_list(start: Start) -> None:
    worker = start(4)
    assert worker.result("stream", {"count": 3, "final": 7}) == [{"i": 0}, {"i": 1}, {"i": 2}, 7]


# -------------------------------------------------------------------------------------------
# Failures
# -------------------------------------------------------------------------------------------


@both_modes
def test_fail_at_sends_the_items_before_it_then_the_error(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    request_id = stream(worker, "stream", {"count": 5, "fail_at": 3})
    items, end = collect(worker, request_id)
    assert items == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert end == failed(request_id, "stream: failed at item 3")
    assert stderr_after_exit(worker) == ""  # an expected failure: no traceback


@both_modes
def test_an_exception_mid_stream_ends_it_with_the_error_and_logs_it(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True)
    request_id = stream(worker, "broken", {})
    assert collect(worker, request_id) == ([0, 1], failed(request_id, "broken: boom"))
    stderr = stderr_after_exit(worker)
    assert "command 'broken' failed:" in stderr and "boom (RuntimeError)" in stderr


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({}, "stream: 'count' must be an integer from 0 to 1000000, got nil"),
        ({"count": 1000001}, "stream: 'count' must be an integer from 0 to 1000000, got 1000001"),
        ({"count": 2.0}, "stream: 'count' must be an integer from 0 to 1000000, got 2.0"),
        ({"count": 2, "delay": -1}, "stream: 'delay' must be a number from 0 to 3600, got -1"),
        ({"count": 2, "delay": "1"}, "stream: 'delay' must be a number from 0 to 3600, got \"1\""),
        ({"count": 2, "fail_at": 1.5}, "stream: 'fail_at' must be an integer >= 0, got 1.5"),
        ({"count": 2, "wait_for": ""}, "stream: 'wait_for' must be a file path, got \"\""),
        ({"count": 2, "progress": 3}, "stream: 'progress' must be a file path, got 3"),
    ],
)
def test_invalid_arguments_fail_before_the_first_item(
    start: Start, args: dict[str, Any], error: str
) -> None:
    worker = start(4)
    request_id = stream(worker, "stream", args)
    assert worker.receive(TIMEOUT) == failed(request_id, error)
    assert worker.error("stream", args) == error  # and by execute


@pytest.mark.parametrize("spec", [{"window": 0}, {"window": "8"}, {}, 64])
def test_a_malformed_meta_stream_is_refused(start: Start, spec: Any) -> None:
    worker = start(4)
    request_id = worker.send("stream", {"count": 1}, meta={"stream": spec})
    frame = worker.receive(TIMEOUT)
    assert frame["id"] == request_id and frame["success"] is False
    assert frame["error"].startswith("stream: meta.stream.window must be an integer >= 1, got ")


# -------------------------------------------------------------------------------------------
# Cancel
# -------------------------------------------------------------------------------------------


@both_modes
def test_cancel_stops_a_stream_between_items(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    request_id = stream(worker, "stream", {"count": 1000, "delay": 0.05})
    assert worker.receive(TIMEOUT) == item(request_id, {"i": 0})
    worker.send("$cancel", id=request_id)
    frame = worker.receive(TIMEOUT)
    while "item" in frame:  # items the bridge sent before it read the $cancel
        assert frame["id"] == request_id, frame
        frame = worker.receive(TIMEOUT)
    assert frame == failed(request_id, "cancelled")
    assert_nothing_more(worker)
    assert worker.result("echo", {"after": True}) == {"echoed": {"after": True}}


@both_modes
def test_cancel_stops_a_handler_waiting_for_credit_once_it_unwound(
    start: Start, max_in_flight: int, tmp_path: Path
) -> None:
    worker = start(max_in_flight, custom=True)
    marker = tmp_path / "marker"
    request_id = stream(worker, "guarded", {"n": 10, "marker": str(marker)}, window=2)
    assert [worker.receive(TIMEOUT) for _ in range(2)] == [item(request_id, 0), item(request_id, 1)]
    assert_nothing_more(worker, 0.2)  # blocked in emit
    worker.send("$cancel", id=request_id)
    assert worker.receive(TIMEOUT) == failed(request_id, "cancelled")
    assert marker.read_text() == "unwound"  # the ensure ran before the answer
    credit(worker, request_id, 5)  # too late: ignored
    assert_nothing_more(worker)
    assert worker.result("plain", {"value": 1}) == 1


@both_modes
def test_cancel_stops_wait_for(start: Start, max_in_flight: int, tmp_path: Path) -> None:
    worker = start(max_in_flight)
    request_id = stream(worker, "stream", {"count": 3, "wait_for": str(tmp_path / "never")})
    assert worker.receive(TIMEOUT) == item(request_id, {"i": 0})
    worker.send("$cancel", id=request_id)
    assert worker.receive(TIMEOUT) == failed(request_id, "cancelled")
    assert_nothing_more(worker)


@both_modes
def test_the_end_of_input_cancels_a_stream_waiting_for_credit(
    start: Start, max_in_flight: int, tmp_path: Path
) -> None:
    worker = start(max_in_flight, custom=True)
    marker = tmp_path / "marker"
    request_id = stream(worker, "guarded", {"n": 10, "marker": str(marker)}, window=1)
    assert worker.receive(TIMEOUT) == item(request_id, 0)
    worker.close_stdin()  # no credit can come any more
    assert worker.receive(TIMEOUT) == failed(request_id, "cancelled")
    assert worker.wait(TIMEOUT) == 0
    assert marker.read_text() == "unwound"


# -------------------------------------------------------------------------------------------
# Concurrency and $credit frames
# -------------------------------------------------------------------------------------------


def test_streams_and_ordinary_requests_interleave(start: Start) -> None:
    worker = start(4)
    first = stream(worker, "stream", {"count": 4}, window=1)
    second = stream(worker, "stream", {"count": 4, "final": "second"}, window=1)
    assert {worker.receive(TIMEOUT)["id"] for _ in range(2)} == {first, second}
    # Both wait for credit; an ordinary request is answered meanwhile.
    assert worker.result("echo", {"n": 1}) == {"echoed": {"n": 1}}
    credit(worker, second, 10)
    assert [worker.receive(TIMEOUT) for _ in range(4)] == [
        item(second, {"i": 1}),
        item(second, {"i": 2}),
        item(second, {"i": 3}),
        ended(second, "second"),
    ]
    assert_nothing_more(worker, 0.1)  # the first still waits
    sleeper = worker.send("sleep", {"seconds": 0.2})
    credit(worker, first, 10)
    frames = [worker.receive(TIMEOUT) for _ in range(5)]
    assert [frame for frame in frames if frame["id"] == first] == [
        item(first, {"i": 1}),
        item(first, {"i": 2}),
        item(first, {"i": 3}),
        ended(first),
    ]
    assert [frame for frame in frames if frame["id"] == sleeper] == [ended(sleeper, {"slept": 0.2})]


@both_modes
def test_malformed_and_stray_credit_is_ignored(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    request_id = stream(worker, "stream", {"count": 2}, window=1)
    assert worker.receive(TIMEOUT) == item(request_id, {"i": 0})
    for items in (0, -1, "1", 1.0, None):
        credit(worker, request_id, items)
    credit(worker, 424242, 5)  # not a stream in flight
    assert_nothing_more(worker)
    credit(worker, request_id, 1)
    assert worker.receive(TIMEOUT) == item(request_id, {"i": 1})
    assert_nothing_more(worker)  # the window is full again: the end waits for credit too
    credit(worker, request_id, 1)
    assert worker.receive(TIMEOUT) == ended(request_id)
    credit(worker, request_id, 1)  # the stream has ended: ignored, silently
    assert worker.result("ping")["status"] == "ok"
    stderr = stderr_after_exit(worker).splitlines()
    assert stderr == [
        f"snakepit-ruby: ignoring $credit for request {request_id}: args.items must be an "
        f"integer >= 1, got {got}"
        for got in ("0", "-1", '"1"', "1.0", "nil")
    ]
