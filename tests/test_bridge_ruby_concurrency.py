"""Protocol 2 in the Ruby bridge library, with raw frames against real ruby processes.

The pool does not speak protocol 2 yet, so these tests play the pool: a handshake ``ping``
with ``max_in_flight`` N, then up to N requests in flight at once, answered in any order.
The multi-threaded cancel storm is in test_ruby_cancel_race.py.
"""

from __future__ import annotations

import json
import select
import signal
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
  s.command("deadline") do |args, ctx|
    sleep(args["nap"]) if args["nap"]
    { "deadline" => ctx.deadline, "deadline_ms" => ctx.deadline_ms }
  end
  s.command("unwinding") do |args|
    sleep(30)
  ensure
    sleep(args["cleanup"]) # the bridge answers "cancelled" only once this is done
  end
  s.command("spin") { x = 0; x += 1 while true }
  s.command("on_main") { Thread.current == Thread.main }
  s.command("echo") { |args| { "echoed" => args } }
end
"""


Worker = RawWorker

Start = Callable[..., Worker]


def bridge_argv() -> list[str]:
    (adapter,) = snakepit_adapters()
    return adapter.command_line()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Starts the bundled bridge (or the custom worker) and shakes hands with max_in_flight."""
    workers: list[Worker] = []
    script = tmp_path / "custom.rb"
    script.write_text(CUSTOM_WORKER)

    def start(max_in_flight: Any, *, custom: bool = False) -> Worker:
        if custom:
            adapter = ruby_adapter("custom", script)
            worker = Worker(adapter.command_line(), env=adapter.env)
        else:
            worker = Worker(bridge_argv())
        workers.append(worker)
        worker.shake_hands(max_in_flight, "raw-2")
        return worker

    yield start
    for worker in workers:
        worker.kill()


def receive_all(worker: RawWorker, count: int, timeout: float = 5.0) -> dict[int, dict[str, Any]]:
    """The next `count` frames by id, each id answered once."""
    frames: dict[int, dict[str, Any]] = {}
    for _ in range(count):
        frame = worker.receive(timeout)
        assert frame["id"] not in frames, f"answered twice: {frame} and {frames[frame['id']]}"
        frames[frame["id"]] = frame
    return frames


def assert_nothing_more(worker: RawWorker, wait: float = 0.1) -> None:
    assert worker.proc.stdout is not None
    ready, _, _ = select.select([worker.proc.stdout.fileno()], [], [], wait)
    assert not ready, "an unexpected frame"


def cancelled(request_id: int) -> dict[str, Any]:
    return {"id": request_id, "success": False, "error": "cancelled"}


# -------------------------------------------------------------------------------------------
# Handshake v2
# -------------------------------------------------------------------------------------------


def test_the_handshake_with_max_in_flight_answers_protocol_2(start: Start) -> None:
    worker = start(8)
    ping = worker.handshake_answer
    assert list(ping) == [
        "status", "uptime", "requests_handled", "worker_id", "runtime", "capabilities", "pid",
        "protocol", "max_concurrency",
    ]  # fmt: skip
    assert ping["status"] == "ok" and ping["worker_id"] == "raw-2"
    assert ping["capabilities"] == ["cancel", "deadline", "stream", "binary", "text", "callbacks"]
    assert ping["protocol"] == 2 and ping["max_concurrency"] == 4096
    assert ping["requests_handled"] == 1
    later = worker.result("ping")  # a health check gets the plain answer, as on every runtime
    assert "protocol" not in later and later["capabilities"] == ["cancel"]
    assert later["requests_handled"] == 2


@pytest.mark.parametrize("max_in_flight", [None, 0, -3, "8", 2.5, True])
def test_without_a_valid_max_in_flight_the_answer_is_protocol_1(
    start: Start, max_in_flight: Any
) -> None:
    worker = start(max_in_flight)
    ping = worker.handshake_answer
    assert "protocol" not in ping and "max_concurrency" not in ping
    assert ping["capabilities"] == ["cancel"]
    worker.close_stdin()
    assert worker.wait() == 0
    stderr = worker.stderr_text()
    if max_in_flight is None:
        assert stderr == ""
    else:  # the value as Ruby writes it, which for these is as JSON writes it
        assert stderr == (
            f"snakepit-ruby: ignoring max_in_flight={json.dumps(max_in_flight)} "
            "(not an integer >= 1): protocol 1\n"
        )


def test_max_in_flight_in_a_later_ping_changes_nothing(start: Start) -> None:
    worker = start(None)
    later = worker.result("ping", {"max_in_flight": 8})
    assert "protocol" not in later
    first = worker.send("sleep", {"seconds": 0.2})
    second = worker.send("echo", {"n": 2})
    assert [worker.receive()["id"] for _ in range(2)] == [first, second]  # one at a time


@pytest.mark.parametrize(("max_in_flight", "on_main"), [(None, True), (1, True), (4, False)])
def test_handlers_run_on_the_main_thread_only_one_at_a_time(
    start: Start, max_in_flight: int | None, on_main: bool
) -> None:
    worker = start(max_in_flight, custom=True)
    assert worker.result("on_main") is on_main


# -------------------------------------------------------------------------------------------
# Concurrency
# -------------------------------------------------------------------------------------------


def test_eight_sleeps_of_a_second_run_at_once(start: Start) -> None:
    worker = start(8)
    started = time.monotonic()
    ids = [worker.send("sleep", {"seconds": 1}) for _ in range(8)]
    frames = receive_all(worker, 8)
    elapsed = time.monotonic() - started
    assert elapsed < 4.0, elapsed
    assert frames == {i: {"id": i, "success": True, "result": {"slept": 1}} for i in ids}


def test_replies_come_as_they_are_ready_matched_by_id(start: Start) -> None:
    worker = start(4)
    slow = worker.send("sleep", {"seconds": 0.6})
    medium = worker.send("sleep", {"seconds": 0.3})
    fast = worker.send("echo", {"n": 3})
    order = [worker.receive() for _ in range(3)]
    assert [frame["id"] for frame in order] == [fast, medium, slow]
    assert order == [
        {"id": fast, "success": True, "result": {"echoed": {"n": 3}}},
        {"id": medium, "success": True, "result": {"slept": 0.3}},
        {"id": slow, "success": True, "result": {"slept": 0.6}},
    ]


def test_two_hundred_waits_run_on_threads_at_once(start: Start) -> None:
    """200 waits of 100 ms with max_in_flight 200: 64 threads, the rest queue, all in < 2 s."""
    worker = start(200)
    started = time.monotonic()
    ids = [worker.send("sleep", {"seconds": 0.1}) for _ in range(200)]
    frames = receive_all(worker, 200)
    assert time.monotonic() - started < 2.0
    assert sorted(frames) == sorted(ids)
    assert all(frame["result"] == {"slept": 0.1} for frame in frames.values())
    # Every request counted once, from any thread: 1 handshake + 200 + this ping.
    assert worker.result("ping")["requests_handled"] == 202


def test_a_slow_request_holds_up_no_other_answer(start: Start) -> None:
    worker = start(4)
    busy = worker.send("sleep", {"seconds": 0.5})
    unknown = worker.send("nope", {})
    refused = worker.send("compute", {"operation": "divide", "a": 1, "b": 0})
    frames = [worker.receive(), worker.receive()]
    assert frames[0]["id"] == unknown and frames[0]["error"].startswith("unknown command 'nope'")
    assert frames[1] == {"id": refused, "success": False, "error": "compute: division by zero"}
    assert worker.receive()["id"] == busy


def test_sessions_stay_consistent_under_concurrent_stores(start: Start) -> None:
    worker = start(16)
    for key in range(100):
        worker.send("store", {"session_id": "s", "key": f"k{key}", "value": key})
    assert all(frame["success"] for frame in receive_all(worker, 100).values())
    cleared = worker.result("clear_session", {"session_id": "s"})
    assert cleared == {"cleared": True, "session_id": "s", "keys": 100}


def test_end_of_input_answers_what_is_in_flight_then_exits_0(start: Start) -> None:
    worker = start(4)
    ids = [worker.send("sleep", {"seconds": 0.3}) for _ in range(3)]
    worker.close_stdin()
    assert sorted(receive_all(worker, 3)) == ids
    assert worker.wait(5) == 0
    assert worker.stderr_text() == ""


def test_sigterm_exits_0_while_requests_run(start: Start) -> None:
    worker = start(4)
    for _ in range(3):
        worker.send("sleep", {"seconds": 30})
    time.sleep(0.1)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(5) == 0


# -------------------------------------------------------------------------------------------
# Deadlines
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_in_flight", [None, 4])
def test_ctx_deadline_is_the_seconds_left(start: Start, max_in_flight: int | None) -> None:
    worker = start(max_in_flight, custom=True)
    none = worker.send("deadline", {})
    fresh = worker.send("deadline", {}, meta={"deadline_ms": 1500})
    napped = worker.send("deadline", {"nap": 0.3}, meta={"deadline_ms": 1000})
    late = worker.send("deadline", {"nap": 0.2}, meta={"deadline_ms": 50})
    results = {i: frame["result"] for i, frame in receive_all(worker, 4).items()}
    assert results[none] == {"deadline": None, "deadline_ms": None}
    assert 1.0 < results[fresh]["deadline"] <= 1.5
    assert results[fresh]["deadline_ms"] == 1500
    # Counted from when the request was read, not when the handler asked.
    assert 0.3 < results[napped]["deadline"] < 0.75
    assert -1.0 < results[late]["deadline"] < -0.1  # may go negative


def test_a_deadline_that_is_not_a_number_is_none(start: Start) -> None:
    worker = start(4, custom=True)
    request_id = worker.send("deadline", {}, meta={"deadline_ms": "soon"})
    assert worker.receive() == {
        "id": request_id,
        "success": True,
        "result": {"deadline": None, "deadline_ms": "soon"},
    }


# -------------------------------------------------------------------------------------------
# Cancel
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["sleep", "spin"])
def test_cancel_stops_the_running_request_and_no_other(start: Start, command: str) -> None:
    worker = start(4, custom=command == "spin")
    if command == "sleep":
        other = worker.send("sleep", {"seconds": 0.6})
    else:
        other = worker.send("deadline", {"nap": 0.6})
    target = worker.send(command, {"seconds": 30})
    time.sleep(0.2)  # both run
    started = time.monotonic()
    worker.send("$cancel", id=target)
    assert worker.receive() == cancelled(target)
    assert time.monotonic() - started < 0.5
    assert worker.result("echo", {"n": 1}) == {"echoed": {"n": 1}}
    frame = worker.receive()
    assert frame["id"] == other and frame["success"] is True  # ran to its end, untouched
    assert_nothing_more(worker)


def test_cancelled_is_answered_once_the_handler_has_unwound(start: Start) -> None:
    worker = start(4, custom=True)
    target = worker.send("unwinding", {"cleanup": 0.4})
    time.sleep(0.1)
    started = time.monotonic()
    worker.send("$cancel", id=target)
    time.sleep(0.05)
    worker.send("$cancel", id=target)  # a second cancel does not cut the cleanup short
    # Other requests are served while it unwinds.
    assert worker.result("on_main") is False
    assert worker.receive() == cancelled(target)
    assert time.monotonic() - started >= 0.4
    assert_nothing_more(worker)


def test_a_queued_request_is_dropped_and_answered_at_once(start: Start) -> None:
    """With max_in_flight 100 the bridge runs 64 threads: requests 65 and on wait for one."""
    worker = start(100)
    running = [worker.send("sleep", {"seconds": 30}) for _ in range(64)]
    queued = worker.send("sleep", {"seconds": 0})
    behind = worker.send("echo", {"behind": True})
    time.sleep(0.2)
    started = time.monotonic()
    worker.send("$cancel", id=queued)
    assert worker.receive() == cancelled(queued)
    assert time.monotonic() - started < 0.3
    # ping answers at once although every thread is busy.
    ping = worker.result("ping")
    assert ping["requests_handled"] == 1 + 64 + 2 + 1
    worker.send("$cancel", id=queued)  # no longer there: ignored
    for request_id in running:
        worker.send("$cancel", id=request_id)
    frames = receive_all(worker, 65)
    assert frames.pop(behind) == {
        "id": behind,
        "success": True,
        "result": {"echoed": {"behind": True}},
    }
    assert frames == {request_id: cancelled(request_id) for request_id in running}
    assert worker.result("sleep", {"seconds": 0.01}) == {"slept": 0.01}
    assert_nothing_more(worker)


def test_a_cancel_for_an_id_not_in_flight_is_ignored(start: Start) -> None:
    worker = start(4)
    busy = worker.send("sleep", {"seconds": 0.3})
    worker.send("$cancel", id=424242)
    assert worker.result("echo", {}) == {"echoed": {}}
    assert worker.receive() == {"id": busy, "success": True, "result": {"slept": 0.3}}
    worker.send("$cancel", id=busy)  # answered already: ignored
    assert worker.result("ping")["status"] == "ok"
