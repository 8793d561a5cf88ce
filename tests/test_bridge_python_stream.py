"""Streaming in the Python bridge library and the bundled bridge's ``stream`` command.

Raw frames to real worker processes, playing the pool (PROTOCOL.md, "Streaming"): a request with
``meta.stream = {"window": W}``, item frames ``{"id", "item"}``, ``$credit`` frames granting
more, and the ordinary answer that ends the stream. Most cases run at ``max_in_flight`` 1, where
the main thread drives the generator and reads its credit itself, and at 4, where sync
generators run on handler threads, async ones as tasks, and the reading thread hands them their
credit.
"""

from __future__ import annotations

import select
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from snakepit_python import plugin

from raw_worker import RawWorker, frame, write_syscalls

BRIDGE = [sys.executable, str(plugin.BRIDGE_PATH)]

# Handlers of every kind, written with the library.
CUSTOM_WORKER = r"""
import asyncio
import contextvars
import time

from snakepit_python import CommandError, command, run

VAR = contextvars.ContextVar("var", default="unset")


def mark(path):
    with open(path, "w") as file:
        file.write("closed")


@command
async def numbers(args):
    for i in range(args["n"]):
        yield i


@command
def sync_numbers(args):
    for i in range(args["n"]):
        yield i
    return args.get("ret")


@command(cancellable=False)
def quick_numbers(args):
    yield from range(args["n"])
    return args.get("ret")


@command
def wrapped(args):  # a sync function returning an async generator
    return numbers(args)


@command
async def endless(args):  # yields until closed, `ms` apart
    try:
        i = 0
        while True:
            yield i
            i += 1
            await asyncio.sleep(args["ms"] / 1000)
    finally:
        mark(args["marker"])


@command
def sync_endless(args):
    try:
        i = 0
        while True:
            yield i
            i += 1
            time.sleep(args["ms"] / 1000)
    finally:
        mark(args["marker"])


@command
def stuck(args):  # after item 0, `ms` inside one next()
    try:
        yield 0
        time.sleep(args["ms"] / 1000)
        yield 1
    finally:
        mark(args["marker"])


@command
async def swallower(args):  # swallows its task's cancellation and goes on
    try:
        for i in range(1000):
            try:
                await asyncio.sleep(args["ms"] / 1000)
            except asyncio.CancelledError:
                pass
            yield i
    finally:
        mark(args["marker"])


@command
async def boom(args):
    yield "first"
    raise RuntimeError("kaput")


@command
def sync_boom(args):
    yield "first"
    raise CommandError("expected")


@command
def unserializable(args):
    try:
        yield {1, 2}
    finally:
        mark(args["marker"])


@command
async def big(args):
    yield "x" * args["size"]


@command
async def context_kept(args):
    VAR.set("set by the generator")
    for _ in range(3):
        yield VAR.get()


@command
def plain(args):
    return args.get("value")


@command
async def plain_async(args):
    return {"value": args.get("value")}


if __name__ == "__main__":
    run()
"""

#: Generous: a 2-core CI machine may run other tests at the same time.
TIMEOUT = 10.0
QUIET = 0.2


Worker = RawWorker

Start = Callable[..., Worker]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Starts the bundled bridge (or the custom worker) and shakes hands with max_in_flight
    (``None``: a protocol-1 pool)."""
    workers: list[Worker] = []
    script = tmp_path / "custom_worker.py"
    script.write_text(CUSTOM_WORKER)

    def start(max_in_flight: int | None, *, custom: bool = False, **env: str) -> Worker:
        worker = Worker([sys.executable, str(script)] if custom else BRIDGE, env=env)
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


def receive(worker: RawWorker, count: int) -> list[dict[str, Any]]:
    return [worker.receive(TIMEOUT) for _ in range(count)]


def items_of(worker: RawWorker, request_id: int, count: int) -> list[Any]:
    """The next ``count`` frames, which must be items of ``request_id``."""
    frames = receive(worker, count)
    assert all(f.keys() == {"id", "item"} and f["id"] == request_id for f in frames), frames
    return [f["item"] for f in frames]


def collect(worker: RawWorker, request_id: int) -> tuple[list[Any], dict[str, Any]]:
    """A stream's items and the answer that ends it, crediting each item as it arrives."""
    items: list[Any] = []
    while True:
        reply = worker.receive(TIMEOUT)
        assert reply["id"] == request_id, reply
        if "item" not in reply:
            return items, reply
        assert set(reply) == {"id", "item"}, reply
        items.append(reply["item"])
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
# Items, window and credit
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
@pytest.mark.parametrize("command", ["stream", "sync_numbers", "quick_numbers"])
def test_a_full_window_holds_the_producer_until_credit_comes(
    start: Start, max_in_flight: int, command: str
) -> None:
    worker = start(max_in_flight, custom=command != "stream")
    request_id = stream(worker, command, {"count": 5, "n": 5}, window=2)
    first, second, third = ({"i": i} if command == "stream" else i for i in range(3))
    assert receive(worker, 2) == [item(request_id, first), item(request_id, second)]
    assert_nothing_more(worker)
    if max_in_flight > 1:
        assert worker.result("ping")["status"] == "ok"  # the reading thread does not wait
    credit(worker, request_id, 1)
    assert receive(worker, 1) == [item(request_id, third)]
    if command == "stream":
        assert_nothing_more(worker)
    credit(worker, request_id, 10)
    assert len(items_of(worker, request_id, 2)) == 2
    assert worker.receive(TIMEOUT) == ended(request_id)


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
def test_the_end_of_a_full_window_waits_for_credit(start: Start, max_in_flight: int) -> None:
    """Finding out that the generator is done means resuming it: not without credit."""
    worker = start(max_in_flight, custom=True)
    request_id = stream(worker, "sync_numbers", {"n": 2, "ret": "last"}, window=2)
    assert items_of(worker, request_id, 2) == [0, 1]
    assert_nothing_more(worker)
    credit(worker, request_id, 2)
    assert worker.receive(TIMEOUT) == ended(request_id, "last")  # the return value ends it


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
    assert receive(worker, 3) == [
        item(request_id, {"i": 1}),
        item(request_id, {"i": 2}),
        ended(request_id),
    ]


@both_modes
def test_malformed_and_stray_credit_is_ignored(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    request_id = stream(worker, "stream", {"count": 2}, window=1)
    assert worker.receive(TIMEOUT) == item(request_id, {"i": 0})
    for items in (0, -1, "1", 1.5, None, True):
        credit(worker, request_id, items)
    credit(worker, 424242, 5)  # not a stream in flight
    assert_nothing_more(worker)
    credit(worker, request_id, 1)
    assert worker.receive(TIMEOUT) == item(request_id, {"i": 1})
    assert_nothing_more(worker)  # the window is full again: the end waits for credit too
    credit(worker, request_id, 1)
    assert worker.receive(TIMEOUT) == ended(request_id)
    credit(worker, request_id, 1)  # the stream has ended: ignored, silently
    assert worker.result("ping")["status"] == "ok"  # no $credit was answered
    lines = stderr_after_exit(worker).splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        f"ignoring $credit for request {request_id}: items={shown} is not an integer >= 1"
        for shown in ("0", "-1", '"1"', "1.5", "null", "true")
    ]


@pytest.mark.parametrize("spec", [{"window": 0}, {"window": "8"}, {"window": True}, {}, 64])
def test_a_malformed_meta_stream_is_refused(start: Start, spec: Any) -> None:
    worker = start(4)
    request_id = worker.send("stream", {"count": 1}, meta={"stream": spec})
    assert worker.receive(TIMEOUT) == failed(
        request_id, "stream: meta.stream.window must be an integer >= 1"
    )
    no_stream = worker.send("echo", {}, meta={"stream": None})  # null: an ordinary request
    assert worker.receive(TIMEOUT) == ended(no_stream, {"echoed": {}})


@both_modes
def test_the_items_of_a_burst_leave_in_few_writes(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    before = write_syscalls(worker.proc.pid)
    request_id = stream(worker, "stream", {"count": 2000}, window=4096)
    assert items_of(worker, request_id, 2000) == [{"i": i} for i in range(2000)]
    assert worker.receive(TIMEOUT) == ended(request_id)
    writes = write_syscalls(worker.proc.pid) - before
    assert writes <= 20, f"{writes} writes for 2000 items"


@both_modes
def test_credit_as_items_arrive_keeps_a_long_stream_going(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    count = 5000
    request_id = stream(worker, "stream", {"count": count}, window=64)
    for i in range(count):
        assert worker.receive(TIMEOUT) == item(request_id, {"i": i})
        if i % 32 == 31:
            credit(worker, request_id, 32)
    assert worker.receive(TIMEOUT) == ended(request_id)


# -------------------------------------------------------------------------------------------
# The end: return values, errors
# -------------------------------------------------------------------------------------------


@both_modes
def test_final_is_the_last_item_and_null_adds_none(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    final = stream(worker, "stream", {"count": 2, "final": {"done": True}})
    assert collect(worker, final) == ([{"i": 0}, {"i": 1}, {"done": True}], ended(final))
    none = stream(worker, "stream", {"count": 2, "final": None})
    assert collect(worker, none) == ([{"i": 0}, {"i": 1}], ended(none))
    empty = stream(worker, "stream", {"count": 0})
    assert worker.receive(TIMEOUT) == ended(empty)


@both_modes
def test_a_sync_generator_s_return_value_is_the_end_s_result(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True)
    valued = stream(worker, "sync_numbers", {"n": 2, "ret": {"total": 2}})
    assert collect(worker, valued) == ([0, 1], ended(valued, {"total": 2}))
    plain = stream(worker, "sync_numbers", {"n": 2})
    assert collect(worker, plain) == ([0, 1], ended(plain))


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
    request_id = stream(worker, "boom", {})
    assert collect(worker, request_id) == (["first"], failed(request_id, "boom: kaput"))
    expected = stream(worker, "sync_boom", {})
    assert collect(worker, expected) == (["first"], failed(expected, "sync_boom: expected"))
    stderr = stderr_after_exit(worker)
    assert "command 'boom' failed:\nTraceback (most recent call last):" in stderr
    assert "RuntimeError: kaput" in stderr and "sync_boom" not in stderr


@both_modes
def test_an_item_that_cannot_be_sent_ends_the_stream(
    start: Start, max_in_flight: int, tmp_path: Path
) -> None:
    worker = start(max_in_flight, custom=True, SNAKEPIT_MAX_FRAME_BYTES="1000")
    marker = tmp_path / "closed"
    request_id = stream(worker, "unserializable", {"marker": str(marker)})
    answer = worker.receive(TIMEOUT)
    assert answer["id"] == request_id and answer["success"] is False, answer
    assert answer["error"].startswith("unserializable: item cannot be sent as JSON (")
    assert marker.exists()  # the generator was closed
    request_id = stream(worker, "big", {"size": 2000})
    assert worker.receive(TIMEOUT)["error"].startswith("big: item of 20")
    assert worker.result("ping")["status"] == "ok"


INVALID_ARGUMENTS: list[tuple[dict[str, Any], str]] = [
    ({}, "'count' must be an integer from 0 to 1000000"),
    ({"count": -1}, "'count' must be an integer from 0 to 1000000"),
    ({"count": 1_000_001}, "'count' must be an integer from 0 to 1000000"),
    ({"count": 2.0}, "'count' must be an integer from 0 to 1000000"),
    ({"count": True}, "'count' must be an integer from 0 to 1000000"),
    ({"count": 3, "delay": -1}, "'delay' must be a number from 0 to 3600"),
    ({"count": 3, "delay": "1"}, "'delay' must be a number from 0 to 3600"),
    ({"count": 3, "fail_at": 1.5}, "'fail_at' must be an integer"),
    ({"count": 3, "wait_for": 7}, "'wait_for' must be a non-empty string (a file path)"),
    ({"count": 3, "progress": ""}, "'progress' must be a non-empty string (a file path)"),
]


def test_invalid_arguments_fail_before_the_first_item(start: Start) -> None:
    worker = start(4)
    for args, message in INVALID_ARGUMENTS:
        request_id = stream(worker, "stream", args)
        assert worker.receive(TIMEOUT) == failed(request_id, f"stream: {message}")
        assert worker.error("stream", args) == f"stream: {message}"  # and by execute


# -------------------------------------------------------------------------------------------
# Cancel
# -------------------------------------------------------------------------------------------


def answer_after_items(worker: RawWorker, request_id: int) -> dict[str, Any]:
    """The answer to ``request_id``, past the items the bridge sent before it read a cancel."""
    reply = worker.receive(TIMEOUT)
    while "item" in reply:
        assert reply["id"] == request_id, reply
        reply = worker.receive(TIMEOUT)
    return reply


@both_modes
def test_cancel_stops_a_stream_between_items(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    request_id = stream(worker, "stream", {"count": 1000, "delay": 0.05})
    assert worker.receive(TIMEOUT) == item(request_id, {"i": 0})
    worker.send("$cancel", id=request_id)
    assert answer_after_items(worker, request_id) == failed(request_id, "cancelled")
    assert_nothing_more(worker)
    assert worker.result("echo", {"after": True}) == {"echoed": {"after": True}}


@both_modes
@pytest.mark.parametrize("command", ["endless", "sync_endless"])
@pytest.mark.parametrize("window", [64, 1])  # 1: cancelled while it waits for credit
def test_cancel_closes_the_generator_before_the_answer(
    start: Start, tmp_path: Path, max_in_flight: int, command: str, window: int
) -> None:
    worker = start(max_in_flight, custom=True)
    marker = tmp_path / "closed"
    request_id = stream(worker, command, {"ms": 20, "marker": str(marker)}, window)
    assert worker.receive(TIMEOUT) == item(request_id, 0)
    worker.send("$cancel", id=request_id)
    answer = answer_after_items(worker, request_id)
    assert marker.exists()  # its finally ran before the answer
    assert answer == failed(request_id, "cancelled")
    credit(worker, request_id, 5)  # too late: ignored
    assert worker.result("ping")["status"] == "ok"  # call() checks the id: no stray item
    assert stderr_after_exit(worker) == ""  # a cancel is no failure


def test_a_sync_generator_inside_next_on_a_thread_is_answered_once_it_stops(
    start: Start, tmp_path: Path
) -> None:
    worker = start(4, custom=True)
    marker = tmp_path / "closed"
    request_id = stream(worker, "stuck", {"ms": 1000, "marker": str(marker)})
    assert worker.receive(TIMEOUT) == item(request_id, 0)
    worker.send("$cancel", id=request_id)
    answer = worker.receive(TIMEOUT)
    assert answer == failed(request_id, "cancelled")  # item 1, made after the cancel, dropped
    # Its finally ran before the answer: a generator inside next() cannot be closed, so the
    # answer came only once that next() had returned (no clock needed to tell).
    assert marker.exists()


def test_one_at_a_time_a_cancel_interrupts_a_sync_generator_s_next(
    start: Start, tmp_path: Path
) -> None:
    worker = start(1, custom=True)
    marker = tmp_path / "closed"
    request_id = stream(worker, "stuck", {"ms": 30_000, "marker": str(marker)})
    assert worker.receive(TIMEOUT) == item(request_id, 0)
    time.sleep(0.1)
    worker.send("$cancel", id=request_id)
    assert worker.receive(TIMEOUT) == failed(request_id, "cancelled")
    assert marker.exists()


@both_modes
def test_a_generator_that_swallows_the_cancel_stops_before_its_next_item(
    start: Start, tmp_path: Path, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True)
    marker = tmp_path / "closed"
    request_id = stream(worker, "swallower", {"ms": 100, "marker": str(marker)})
    assert worker.receive(TIMEOUT) == item(request_id, 0)
    worker.send("$cancel", id=request_id)
    assert answer_after_items(worker, request_id) == failed(request_id, "cancelled")
    assert marker.exists()


@both_modes
def test_cancel_stops_wait_for(start: Start, max_in_flight: int, tmp_path: Path) -> None:
    worker = start(max_in_flight)
    request_id = stream(worker, "stream", {"count": 3, "wait_for": str(tmp_path / "never")})
    assert worker.receive(TIMEOUT) == item(request_id, {"i": 0})
    worker.send("$cancel", id=request_id)
    assert worker.receive(TIMEOUT) == failed(request_id, "cancelled")
    assert_nothing_more(worker)


@both_modes
@pytest.mark.parametrize("command", ["endless", "sync_endless"])
def test_the_end_of_input_cancels_a_stream_waiting_for_credit(
    start: Start, max_in_flight: int, tmp_path: Path, command: str
) -> None:
    worker = start(max_in_flight, custom=True)
    marker = tmp_path / "closed"
    request_id = stream(worker, command, {"ms": 1, "marker": str(marker)}, window=1)
    assert worker.receive(TIMEOUT) == item(request_id, 0)
    worker.close_stdin()  # no credit can come any more
    assert worker.receive(TIMEOUT) == failed(request_id, "cancelled")
    assert worker.wait(TIMEOUT) == 0
    assert marker.read_text() == "closed"


# -------------------------------------------------------------------------------------------
# Handlers and requests of the other kind
# -------------------------------------------------------------------------------------------


@both_modes
def test_a_generator_called_by_execute_answers_the_list(start: Start, max_in_flight: int) -> None:
    bridge = start(max_in_flight)
    assert bridge.result("stream", {"count": 3}) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert bridge.result("stream", {"count": 2, "final": "end"}) == [{"i": 0}, {"i": 1}, "end"]
    assert bridge.result("stream", {"count": 0}) == []
    assert bridge.error("stream", {"count": 3, "fail_at": 1}) == "stream: failed at item 1"
    worker = start(max_in_flight, custom=True)
    assert worker.result("numbers", {"n": 3}) == [0, 1, 2]
    assert worker.result("sync_numbers", {"n": 3, "ret": 3}) == [0, 1, 2, 3]
    assert worker.result("quick_numbers", {"n": 2}) == [0, 1]
    assert worker.result("wrapped", {"n": 2}) == [0, 1]


@both_modes
def test_execute_of_a_generator_is_cancellable(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    request_id = worker.send("stream", {"count": 1000, "delay": 0.05})
    time.sleep(0.2)
    worker.send("$cancel", id=request_id)
    assert worker.receive(TIMEOUT) == failed(request_id, "cancelled")


@both_modes
def test_a_plain_handler_as_a_stream_gives_its_result_as_one_item(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True)
    cases: list[tuple[str, dict[str, Any], Any]] = [
        ("plain", {"value": [1, 2]}, [1, 2]),
        ("plain", {"value": None}, None),  # None too is the one item
        ("plain", {}, None),
        ("plain_async", {"value": "v"}, {"value": "v"}),
    ]
    for command, args, value in cases:
        request_id = stream(worker, command, args, window=1)
        assert receive(worker, 2) == [item(request_id, value), ended(request_id)]
    assert worker.result("ping")["status"] == "ok"  # call() checks the id: no stray frame


@both_modes
def test_the_bridge_s_plain_commands_as_streams(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    echo = stream(worker, "echo", {"a": 1})
    assert receive(worker, 2) == [item(echo, {"echoed": {"a": 1}}), ended(echo)]
    sleep = stream(worker, "sleep", {"seconds": 0})
    assert receive(worker, 2) == [item(sleep, {"slept": 0}), ended(sleep)]
    ping = stream(worker, "ping", {})
    (one, end) = receive(worker, 2)
    assert one["item"]["status"] == "ok" and end == ended(ping)


@both_modes
def test_a_sync_wrapper_around_an_async_generator_streams(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight, custom=True)
    request_id = stream(worker, "wrapped", {"n": 3}, window=2)
    assert collect(worker, request_id) == ([0, 1, 2], ended(request_id))


@both_modes
def test_context_variables_live_on_across_credit_waits(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight, custom=True)
    request_id = stream(worker, "context_kept", {}, window=1)
    assert collect(worker, request_id) == (["set by the generator"] * 3, ended(request_id))


def test_streams_and_ordinary_requests_interleave(start: Start) -> None:
    worker = start(4)
    first = stream(worker, "stream", {"count": 4}, window=1)
    second = stream(worker, "stream", {"count": 4, "final": "second"}, window=1)
    assert {worker.receive(TIMEOUT)["id"] for _ in range(2)} == {first, second}
    # Both wait for credit; an ordinary request is answered meanwhile.
    assert worker.result("echo", {"n": 1}) == {"echoed": {"n": 1}}
    credit(worker, second, 10)
    assert receive(worker, 5) == [
        item(second, {"i": 1}),
        item(second, {"i": 2}),
        item(second, {"i": 3}),
        item(second, "second"),
        ended(second),
    ]
    assert_nothing_more(worker, 0.1)  # the first still waits
    sleeper = worker.send("sleep", {"seconds": 0.2})
    credit(worker, first, 10)
    frames = receive(worker, 5)
    assert [f for f in frames if f["id"] == first] == [
        item(first, {"i": 1}),
        item(first, {"i": 2}),
        item(first, {"i": 3}),
        ended(first),
    ]
    assert [f for f in frames if f["id"] == sleeper] == [ended(sleeper, {"slept": 0.2})]


@pytest.mark.parametrize("custom", [False, True])
def test_two_streams_at_once_on_one_worker(start: Start, custom: bool) -> None:
    worker = start(2, custom=custom)
    command = "sync_numbers" if custom else "stream"
    meta = {"stream": {"window": 128}}
    worker.send_raw(
        b"".join(
            frame({"id": i, "command": command, "args": {"count": 100, "n": 100}, "meta": meta})
            for i in (1, 2)
        )
    )
    frames = receive(worker, 202)
    for request_id in (1, 2):
        mine = [f for f in frames if f["id"] == request_id]
        assert [f["item"] for f in mine[:-1]] == [{"i": i} if not custom else i for i in range(100)]
        assert mine[-1] == ended(request_id)


def test_one_at_a_time_a_stream_holds_the_worker_until_it_ends(start: Start) -> None:
    worker = start(1)
    request_id = stream(worker, "stream", {"count": 2}, window=1)
    assert worker.receive(TIMEOUT) == item(request_id, {"i": 0})
    echo = worker.send("echo", {})
    assert_nothing_more(worker)  # the echo waits for the stream
    credit(worker, request_id, 2)
    assert receive(worker, 3) == [
        item(request_id, {"i": 1}),
        ended(request_id),
        ended(echo, {"echoed": {}}),
    ]
