"""Protocol 2 in the Python bridge library, frame by frame on real worker processes.

The handshake v2 answer, requests in flight at once (sync handlers on threads, async handlers
as tasks), replies in completion order, ``ctx.deadline``, the protocol-2 cancel semantics per
kind of handler, and what a worker does with requests in flight when its input ends, its
output breaks or SIGTERM comes. The pool does not speak protocol 2 yet, so these tests send
``max_in_flight`` themselves; ``test_bridge_python.py`` keeps covering one request at a time.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from snakepit_python import plugin

from conftest import BRIDGES
from raw_worker import RawWorker

BRIDGE = [sys.executable, str(plugin.BRIDGE_PATH)]
CONCURRENT = [sys.executable, str(BRIDGES / "python_concurrent.py")]
PING_KEYS_V2 = [
    "status", "uptime", "requests_handled", "worker_id", "runtime", "capabilities", "pid",
    "protocol", "max_concurrency",
]  # fmt: skip
#: How quickly a reply that needs no handler to finish must come (a busy 2-core machine).
PROMPT = 0.5


def start(argv: list[str], max_in_flight: int | None, **env: str) -> RawWorker:
    """A worker after a handshake asking for ``max_in_flight`` (``None``: a protocol-1 pool)."""
    worker = RawWorker(argv, env=env)
    args: dict[str, Any] = {"worker_id": "p2", "initialization": True}
    if max_in_flight is not None:
        args["max_in_flight"] = max_in_flight
    try:
        answer = worker.call("ping", args)
        assert answer["success"] is True and answer["result"]["status"] == "ok", answer
    except BaseException:
        worker.kill()
        raise
    worker.handshake_answer = answer["result"]  # type: ignore[attr-defined]
    return worker


@pytest.fixture
def bridge() -> Iterator[RawWorker]:
    with start(BRIDGE, 8) as worker:
        yield worker


@pytest.fixture
def concurrent() -> Iterator[RawWorker]:
    with start(CONCURRENT, 256) as worker:
        yield worker


def receive_all(worker: RawWorker, count: int, timeout: float = 5.0) -> dict[int, dict[str, Any]]:
    """The next ``count`` replies, by id (each id once)."""
    replies: dict[int, dict[str, Any]] = {}
    for _ in range(count):
        reply = worker.receive(timeout)
        assert reply["id"] not in replies, reply
        replies[reply["id"]] = reply
    return replies


def cancelled(request_id: int) -> dict[str, Any]:
    return {"id": request_id, "success": False, "error": "cancelled"}


def finish(worker: RawWorker) -> tuple[int, str]:
    worker.close_stdin()
    status = worker.wait()
    return status, worker.stderr_text()


# -------------------------------------------------------------------------
# Handshake
# -------------------------------------------------------------------------


def test_handshake_v2_answer() -> None:
    with start(BRIDGE, 8) as worker:
        ping = worker.handshake_answer  # type: ignore[attr-defined]
        assert list(ping) == PING_KEYS_V2  # the protocol-1 keys in their order, then two more
        assert ping["capabilities"] == [
            "cancel",
            "deadline",
            "stream",
            "binary",
            "text",
            "callbacks",
        ]
        assert (ping["protocol"], ping["max_concurrency"]) == (2, 4096)
        assert ping["worker_id"] == "p2" and ping["requests_handled"] == 1
        later = worker.result("ping")  # the health check gets protocol 1's keys, as documented
        assert list(later) == PING_KEYS_V2[:7] and later["capabilities"] == ["cancel"]
        assert later["requests_handled"] == 2
        again = worker.result("ping", {"max_in_flight": 8})  # protocol 2 says so when asked
        assert list(again) == PING_KEYS_V2 and again["requests_handled"] == 3


@pytest.mark.parametrize("max_in_flight", [None, 0, "8", True])
def test_without_a_valid_max_in_flight_the_answer_is_protocol_1(max_in_flight: Any) -> None:
    args = {} if max_in_flight is None else {"max_in_flight": max_in_flight}
    with RawWorker(BRIDGE) as worker:
        ping = worker.result("ping", {"worker_id": "p1", "initialization": True, **args})
        assert "protocol" not in ping and ping["capabilities"] == ["cancel"]
        status, stderr = finish(worker)
        assert status == 0
        assert ("ignoring max_in_flight" in stderr) is (max_in_flight is not None)


def test_max_in_flight_1_serves_one_at_a_time_and_cancels_inline() -> None:
    with start(CONCURRENT, 1) as worker:
        assert worker.handshake_answer["protocol"] == 2  # type: ignore[attr-defined]
        first = worker.send("nap", {"seconds": 0.3})
        second = worker.send("wait", {"seconds": 0})
        assert worker.receive()["id"] == first  # the second waited for the first
        assert worker.receive()["id"] == second
        for command in ("nap", "wait"):  # a sync handler inline, an async one on the loop
            request_id = worker.send(command, {"seconds": 30})
            time.sleep(0.2)
            sent = time.monotonic()
            worker.send("$cancel", id=request_id)  # SIGIO raises into time.sleep, as before
            assert worker.receive() == cancelled(request_id)
            assert time.monotonic() - sent < PROMPT


# -------------------------------------------------------------------------
# Concurrency
# -------------------------------------------------------------------------


def test_eight_sleeps_at_once(bridge: RawWorker) -> None:
    started = time.monotonic()
    ids = [bridge.send("sleep", {"seconds": 1}) for _ in range(8)]
    replies = receive_all(bridge, 8)
    assert sorted(replies) == ids
    assert all(reply["result"] == {"slept": 1} for reply in replies.values())
    assert time.monotonic() - started < 4  # one after another would take 8 s


def test_sync_handlers_run_at_once_on_threads() -> None:
    with start(CONCURRENT, 8) as worker:
        started = time.monotonic()
        ids = [worker.send("nap", {"seconds": 1}) for _ in range(8)]
        replies = receive_all(worker, 8)
        assert sorted(replies) == ids
        assert all(reply["result"] == {"napped": 1} for reply in replies.values())
        assert time.monotonic() - started < 4


def test_replies_come_as_requests_finish_matched_by_id(concurrent: RawWorker) -> None:
    slow = concurrent.send("wait", {"seconds": 0.6})
    medium = concurrent.send("nap", {"seconds": 0.3})
    quick = concurrent.send("wait", {"seconds": 0})
    order = [concurrent.receive()["id"] for _ in range(3)]
    assert order == [quick, medium, slow]


def test_async_handlers_run_as_tasks(concurrent: RawWorker) -> None:
    started = time.monotonic()
    ids = [concurrent.send("wait", {"seconds": 0.1}) for _ in range(200)]
    replies = receive_all(concurrent, 200)
    assert time.monotonic() - started < 2  # one after another would take 20 s
    assert sorted(replies) == ids
    assert all(reply["result"] == {"waited": 0.1} for reply in replies.values())


def test_ping_answers_while_every_handler_thread_is_busy() -> None:
    with start(CONCURRENT, 2) as worker:
        busy = [worker.send("nap", {"seconds": 3}) for _ in range(3)]  # 2 threads, 1 queued
        time.sleep(0.1)
        sent = time.monotonic()
        ping = worker.call("ping")
        assert time.monotonic() - sent < PROMPT
        assert ping["result"]["requests_handled"] == 2  # the naps are not answered yet
        assert busy  # killed with the worker


def test_requests_handled_counts_every_reply_once(concurrent: RawWorker) -> None:
    kinds = [("nap", {"seconds": 0.01}), ("wait", {"seconds": 0.01}), ("deadline", {})]
    for index in range(120):
        concurrent.send(*kinds[index % 3])
    receive_all(concurrent, 120)
    assert concurrent.result("ping")["requests_handled"] == 1 + 120 + 1


@pytest.mark.parametrize("max_in_flight", [1, 4])
def test_deadline_in_the_context(max_in_flight: int) -> None:
    """Also one at a time: a protocol-2 handshake asking for 1 (protocol 1 is in
    test_bridge_python.py)."""
    with start(CONCURRENT, max_in_flight) as worker:
        worker.send("deadline", meta={"deadline_ms": 5000})
        timed = worker.receive()["result"]
        assert timed["deadline_ms"] == 5000 and 4 < timed["deadline"] <= 5
        worker.send("deadline", meta={"deadline_ms": 0})
        assert worker.receive()["result"]["deadline"] <= 0  # it may go negative
        assert worker.result("deadline") == {"deadline": None, "deadline_ms": None}


def test_sync_function_returning_a_coroutine(concurrent: RawWorker) -> None:
    assert concurrent.result("wrapped", {"seconds": 0.01}) == "awaited"


# -------------------------------------------------------------------------
# Cancel, protocol 2
# -------------------------------------------------------------------------


def test_cancel_of_a_task_is_answered_once_the_task_has_ended(concurrent: RawWorker) -> None:
    request_id = concurrent.send("linger", {"seconds": 30, "cleanup": 0.4})
    time.sleep(0.1)
    sent = time.monotonic()
    concurrent.send("$cancel", id=request_id)
    assert concurrent.receive() == cancelled(request_id)
    assert 0.35 < time.monotonic() - sent < 3  # after the handler's own clean-up


def test_a_task_that_swallows_the_cancel_answers_its_result(concurrent: RawWorker) -> None:
    request_id = concurrent.send("stubborn", {"seconds": 30})
    time.sleep(0.1)
    concurrent.send("$cancel", id=request_id)
    assert concurrent.receive() == {
        "id": request_id,
        "success": True,
        "result": "ignored the cancel",
    }


def test_cancel_of_a_coroutine_returned_by_a_sync_function(concurrent: RawWorker) -> None:
    request_id = concurrent.send("wrapped", {"seconds": 30})
    time.sleep(0.1)
    concurrent.send("$cancel", id=request_id)
    assert concurrent.receive(timeout=PROMPT * 4) == cancelled(request_id)


def test_cancel_of_a_queued_sync_request_drops_it_at_once() -> None:
    with start(CONCURRENT, 2) as worker:
        running = [worker.send("nap", {"seconds": 1}) for _ in range(2)]  # both threads
        queued = worker.send("nap", {"seconds": 1})
        time.sleep(0.1)
        sent = time.monotonic()
        worker.send("$cancel", id=queued)
        assert worker.receive() == cancelled(queued)
        assert time.monotonic() - sent < PROMPT
        replies = receive_all(worker, 2)
        assert sorted(replies) == running
        assert all(reply["result"] == {"napped": 1} for reply in replies.values())


def test_cancel_of_a_running_thread_handler_answers_its_real_result(
    concurrent: RawWorker,
) -> None:
    request_id = concurrent.send("nap", {"seconds": 0.5})
    time.sleep(0.1)
    concurrent.send("$cancel", id=request_id)  # a thread cannot be interrupted: no "cancelled"
    assert concurrent.receive() == {"id": request_id, "success": True, "result": {"napped": 0.5}}
    assert concurrent.result("ping")["status"] == "ok"  # a stray "cancelled" would come first


def test_cancel_of_the_bundled_sleep(bridge: RawWorker) -> None:
    """The bundled ``sleep`` is async, so a cancel stops it at any concurrency (the bundled
    conformance level cancels it)."""
    request_id = bridge.send("sleep", {"seconds": 30})
    other = bridge.send("sleep", {"seconds": 0.3})
    time.sleep(0.1)
    sent = time.monotonic()
    bridge.send("$cancel", id=request_id)
    assert bridge.receive() == cancelled(request_id)
    assert time.monotonic() - sent < PROMPT
    assert bridge.receive() == {"id": other, "success": True, "result": {"slept": 0.3}}


def test_a_cancel_leaves_the_other_requests_alone(concurrent: RawWorker) -> None:
    task = concurrent.send("wait", {"seconds": 0.5})
    thread = concurrent.send("nap", {"seconds": 0.5})
    doomed = concurrent.send("wait", {"seconds": 30})
    time.sleep(0.1)
    concurrent.send("$cancel", id=doomed)
    concurrent.send("$cancel", id=424242)  # not in flight: ignored
    assert concurrent.receive() == cancelled(doomed)
    assert receive_all(concurrent, 2) == {
        task: {"id": task, "success": True, "result": {"waited": 0.5}},
        thread: {"id": thread, "success": True, "result": {"napped": 0.5}},
    }


# -------------------------------------------------------------------------
# Process behaviour with requests in flight
# -------------------------------------------------------------------------


def test_end_of_input_answers_what_is_in_flight_then_exits_0(concurrent: RawWorker) -> None:
    ids = [concurrent.send("nap", {"seconds": 0.3}), concurrent.send("wait", {"seconds": 0.3})]
    status, stderr = finish(concurrent)
    assert status == 0 and stderr == ""
    assert sorted(receive_all(concurrent, 2)) == ids


def test_sigterm_while_busy_exits_0(concurrent: RawWorker) -> None:
    concurrent.send("nap", {"seconds": 30})
    concurrent.send("wait", {"seconds": 30})
    time.sleep(0.1)
    os.kill(concurrent.proc.pid, signal.SIGTERM)
    assert concurrent.wait(5) == 0
    assert concurrent.stderr_text() == ""


def test_a_pool_that_stops_reading_ends_the_worker(bridge: RawWorker) -> None:
    assert bridge.proc.stdout is not None
    bridge.proc.stdout.close()
    bridge.send("sleep", {"seconds": 30})  # still running: the worker does not wait for it
    bridge.send("echo", {})
    assert bridge.wait(5) == 0


def test_an_undecodable_frame_exits_3(bridge: RawWorker) -> None:
    bridge.send("sleep", {"seconds": 30})
    bridge.send_raw(b"\x00\x00\x00\x05notjs")
    assert bridge.wait(5) == 3
    assert "undecodable frame" in bridge.stderr_text()


@pytest.mark.parametrize("max_in_flight", [1, 4])
def test_a_handler_exception_logs_its_traceback(max_in_flight: int) -> None:
    with start(CONCURRENT, max_in_flight) as worker:
        assert worker.error("boom") == "boom: it broke"
        assert worker.result("nap", {"seconds": 0}) == {"napped": 0}  # still serving
        status, stderr = finish(worker)
        assert status == 0
        assert "command 'boom' failed:\nTraceback (most recent call last):" in stderr
        assert 'python_concurrent.py", line' in stderr and "RuntimeError: it broke" in stderr
