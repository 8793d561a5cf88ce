"""Protocol 2 in the Node.js bridge library, and the bridge contract all runtimes share.

Raw frames to real ``node`` processes (the pool does not speak protocol 2 yet): the handshake
``max_in_flight`` answer, concurrent requests answered in any order and coalesced into few
writes, ``ctx.deadline``, protocol-2 cancel semantics (``"cancelled"`` only once the handler
has given up), and the start-up contract (duplicate or ``$`` command names, a bad
``SNAKEPIT_MAX_FRAME_BYTES``: exit 2) and stack logging of handler errors.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from snakepit_node.plugin import node_adapter, snakepit_adapters

from raw_worker import RawWorker, frame, write_syscalls

WORKER = Path(__file__).parent / "bridges" / "node_concurrency.js"
PING_KEYS = ["status", "uptime", "requests_handled", "worker_id", "runtime", "capabilities", "pid"]
V2_KEYS = [*PING_KEYS, "protocol", "max_concurrency"]

Spawn = Callable[..., RawWorker]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Starts workers (``"bridge"``, ``"worker"`` or a script path) and kills what is left."""
    workers: list[RawWorker] = []

    def start(what: str | Path = "bridge", env: Mapping[str, str] | None = None) -> RawWorker:
        if what == "bridge":
            (adapter,) = snakepit_adapters()
        else:
            adapter = node_adapter("custom", WORKER if what == "worker" else what)
        worker = RawWorker(adapter.command_line(), {**(adapter.env or {}), **(env or {})})
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.kill()


def handshake(worker: RawWorker, max_in_flight: Any = None) -> dict[str, Any]:
    """The handshake ping, with ``max_in_flight`` unless it is None; returns its result."""
    args: dict[str, Any] = {"worker_id": "w-1", "initialization": True}
    if max_in_flight is not None:
        args["max_in_flight"] = max_in_flight
    response = worker.call("ping", args)
    assert response["success"] is True, response
    result: dict[str, Any] = response["result"]
    return result


def send_together(worker: RawWorker, requests: list[tuple[int, str, dict[str, Any]]]) -> None:
    """Several requests in one write: they reach the bridge in one read (or very few)."""
    worker.send_raw(b"".join(frame({"id": i, "command": c, "args": a}) for i, c, a in requests))


def receive_all(worker: RawWorker, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    """``count`` responses in the order they came; each id answered once."""
    responses = [worker.receive(timeout) for _ in range(count)]
    ids = [r["id"] for r in responses]
    assert len(set(ids)) == len(ids), ids
    return responses


def stderr_after_eof(worker: RawWorker) -> str:
    worker.close_stdin()
    assert worker.wait() == 0
    return worker.stderr_text()


# -------------------------------------------------------------------------------------------
# Handshake
# -------------------------------------------------------------------------------------------


def test_handshake_v2_answer(spawn: Spawn) -> None:
    worker = spawn()
    ping = handshake(worker, 8)
    assert list(ping) == V2_KEYS  # the key order as written on the wire
    assert ping["status"] == "ok" and ping["worker_id"] == "w-1" and ping["runtime"] == "node"
    assert ping["capabilities"] == ["cancel", "deadline", "stream", "binary", "text", "callbacks"]
    assert (ping["protocol"], ping["max_concurrency"]) == (2, 4096)
    assert ping["requests_handled"] == 1 and ping["pid"] == worker.proc.pid
    # The health check carries no max_in_flight: it gets the protocol-1 answer.
    assert list(worker.result("ping")) == PING_KEYS


def test_handshake_without_max_in_flight_is_protocol_1(spawn: Spawn) -> None:
    ping = handshake(spawn())
    assert list(ping) == PING_KEYS and ping["capabilities"] == ["cancel"]


@pytest.mark.parametrize("value", [0, -3, 1.5, "8", True, [8]])
def test_invalid_max_in_flight_gets_protocol_1(spawn: Spawn, value: Any) -> None:
    worker = spawn()
    ping = handshake(worker, value)
    assert list(ping) == PING_KEYS and ping["capabilities"] == ["cancel"]
    assert f"ignoring max_in_flight={json.dumps(value, separators=(',', ':'))}" in (
        stderr_after_eof(worker)
    )


def test_max_in_flight_beyond_max_concurrency(spawn: Spawn) -> None:
    ping = handshake(spawn(), 100_000)
    assert (ping["protocol"], ping["max_concurrency"]) == (2, 4096)


# -------------------------------------------------------------------------------------------
# Concurrency
# -------------------------------------------------------------------------------------------


def test_eight_one_second_sleeps_at_once(spawn: Spawn) -> None:
    worker = spawn()
    handshake(worker, 8)
    started = time.monotonic()
    send_together(worker, [(10 + i, "sleep", {"seconds": 1}) for i in range(8)])
    responses = receive_all(worker, 8)
    assert time.monotonic() - started < 4
    assert sorted(r["id"] for r in responses) == list(range(10, 18))
    assert all(r == {"id": r["id"], "success": True, "result": {"slept": 1}} for r in responses)


def test_responses_in_completion_order_matched_by_id(spawn: Spawn) -> None:
    worker = spawn()
    handshake(worker, 4)
    seconds = {21: 0.6, 22: 0.3, 23: 0}
    send_together(worker, [(i, "sleep", {"seconds": s}) for i, s in seconds.items()])
    responses = receive_all(worker, 3)
    assert [r["id"] for r in responses] == [23, 22, 21]
    assert all(r["result"] == {"slept": seconds[r["id"]]} for r in responses)


def test_200_concurrent_waits_are_quick_and_coalesced(spawn: Spawn) -> None:
    worker = spawn()
    handshake(worker, 200)
    before = write_syscalls(worker.proc.pid)
    started = time.monotonic()
    send_together(worker, [(1000 + i, "sleep", {"seconds": 0.1}) for i in range(200)])
    responses = receive_all(worker, 200)
    assert time.monotonic() - started < 2
    assert sorted(r["id"] for r in responses) == list(range(1000, 1200))
    # Timers that fire together answer in one write, not one write per response.
    writes = write_syscalls(worker.proc.pid) - before
    assert writes <= 20, f"{writes} writes for 200 responses"


def test_one_at_a_time_without_max_in_flight(spawn: Spawn) -> None:
    """A protocol-1 pool never sends two requests; if it did, they would run in turn."""
    worker = spawn()
    handshake(worker)
    started = time.monotonic()
    send_together(worker, [(31, "sleep", {"seconds": 0.2}), (32, "sleep", {"seconds": 0.2})])
    assert [r["id"] for r in receive_all(worker, 2)] == [31, 32]
    assert time.monotonic() - started >= 0.4


def test_no_more_than_max_in_flight_at_once(spawn: Spawn) -> None:
    worker = spawn()
    handshake(worker, 2)
    started = time.monotonic()
    send_together(worker, [(40 + i, "sleep", {"seconds": 0.2}) for i in range(4)])
    receive_all(worker, 4)
    assert time.monotonic() - started >= 0.4  # two rounds of two


@pytest.mark.parametrize("max_in_flight", [None, 2])
def test_ping_answers_while_every_slot_is_taken(spawn: Spawn, max_in_flight: int | None) -> None:
    worker = spawn()
    handshake(worker, max_in_flight)
    send_together(worker, [(50 + i, "sleep", {"seconds": 1}) for i in range(3)])
    started = time.monotonic()
    ping_id = worker.send("ping", id=99)
    assert worker.receive(timeout=2)["id"] == ping_id
    assert time.monotonic() - started < 0.5


# -------------------------------------------------------------------------------------------
# Deadlines
# -------------------------------------------------------------------------------------------


def test_ctx_deadline(spawn: Spawn) -> None:
    worker = spawn("worker")
    handshake(worker, 4)
    worker.send("deadline", id=61, meta={"deadline_ms": 1500})
    result = worker.receive()["result"]
    assert isinstance(result["deadline"], float) and 1.0 < result["deadline"] <= 1.5
    assert result["deadlineMs"] == 1500
    worker.send("deadline", id=62, meta={"deadline_ms": -250})
    assert -0.5 < worker.receive()["result"]["deadline"] <= -0.25  # past: negative
    assert worker.result("deadline") == {"deadline": None, "deadlineMs": None}
    worker.send("deadline", id=63, meta={"traceparent": "x", "deadline_ms": "soon"})
    assert worker.receive()["result"] == {"deadline": None, "deadlineMs": None}


def test_ctx_deadline_counts_from_arrival(spawn: Spawn) -> None:
    """A request that waited for a slot has spent that time of its budget."""
    worker = spawn("worker")
    handshake(worker)  # one at a time
    worker.send_raw(
        frame({"id": 71, "command": "ignore", "args": {"ms": 400}})
        + frame({"id": 72, "command": "deadline", "args": {}, "meta": {"deadline_ms": 1000}})
    )
    first, second = receive_all(worker, 2)
    assert first["id"] == 71 and second["id"] == 72
    assert 0.2 < second["result"]["deadline"] < 0.65


# -------------------------------------------------------------------------------------------
# Cancel
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_in_flight", [None, 4])
def test_cancel_answers_cancelled_once_the_handler_gave_up(
    spawn: Spawn, max_in_flight: int | None
) -> None:
    worker = spawn("worker")
    handshake(worker, max_in_flight)
    request_id = worker.send("obey", {"ms": 10_000, "unwind_ms": 300})
    time.sleep(0.05)
    cancelled_at = time.monotonic()
    worker.send("$cancel", id=request_id)
    worker.send("$cancel", id=request_id)  # a second cancel changes nothing
    assert worker.receive(timeout=3) == {"id": request_id, "success": False, "error": "cancelled"}
    assert time.monotonic() - cancelled_at >= 0.25  # not before the handler settled
    assert worker.result("ping")["status"] == "ok"  # call() checks the id: nothing else came


@pytest.mark.parametrize("max_in_flight", [None, 4])
def test_cancel_of_a_handler_ignoring_its_signal_gets_its_result(
    spawn: Spawn, max_in_flight: int | None
) -> None:
    worker = spawn("worker")
    handshake(worker, max_in_flight)
    request_id = worker.send("ignore", {"ms": 400})
    time.sleep(0.05)
    worker.send("$cancel", id=request_id)
    answer = worker.receive(timeout=3)
    assert answer == {"id": request_id, "success": True, "result": {"done": 400, "aborted": True}}


def test_cancel_leaves_other_requests_alone(spawn: Spawn) -> None:
    worker = spawn("worker")
    handshake(worker, 8)
    send_together(
        worker,
        [
            (81, "obey", {"ms": 500}),
            (82, "obey", {"ms": 500}),
            (83, "ignore", {"ms": 500}),
            (84, "sleep", {"seconds": 0.5}),  # unknown here: answered at once
        ],
    )
    assert worker.receive()["id"] == 84
    worker.send("$cancel", id=81)
    by_id = {r["id"]: r for r in receive_all(worker, 3)}
    assert by_id[81] == {"id": 81, "success": False, "error": "cancelled"}
    assert by_id[82] == {"id": 82, "success": True, "result": {"done": 500}}
    assert by_id[83] == {"id": 83, "success": True, "result": {"done": 500, "aborted": False}}


def test_cancel_of_a_waiting_request_drops_it_at_once(spawn: Spawn) -> None:
    worker = spawn("worker")
    handshake(worker, 1)
    send_together(worker, [(91, "count", {"ms": 400}), (92, "count", {"ms": 400})])
    started = time.monotonic()
    worker.send("$cancel", id=92)
    assert worker.receive(timeout=3) == {"id": 92, "success": False, "error": "cancelled"}
    assert time.monotonic() - started < 0.3  # before the running request finished
    assert worker.receive(timeout=3) == {"id": 91, "success": True, "result": {"counted": 400}}
    assert worker.result("started") == 1  # 92 never ran


# -------------------------------------------------------------------------------------------
# The bridge contract: start-up errors, handler errors
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("run({ shout: f }, { shout: f });", "command 'shout' is registered twice"),
        ("run({ ping: f });", "command 'ping' is registered twice: the library provides it"),
        ("run({ a: f }, { $x: f });", "command '$x' starts with '$'"),
        ("run({ $cancel: f });", "command '$cancel' starts with '$'"),
    ],
)
def test_duplicate_or_dollar_names_exit_2(
    spawn: Spawn, tmp_path: Path, source: str, message: str
) -> None:
    script = tmp_path / "worker.js"
    script.write_text(f'const {{ run }} = require("snakepit");\nconst f = () => 1;\n{source}\n')
    worker = spawn(script)
    assert worker.wait() == 2  # at start-up: stdin stays open, no frame is read
    assert f"snakepit: {message}" in worker.stderr_text()
    assert worker.proc.stdout is not None and worker.proc.stdout.read() == b""


def test_several_handler_maps(spawn: Spawn, tmp_path: Path) -> None:
    script = tmp_path / "worker.js"
    script.write_text(
        "const { run } = require(\"snakepit\");\nrun({ a: () => 'A' }, { b: async () => 'B' });\n"
    )
    worker = spawn(script)
    handshake(worker)
    assert (worker.result("a"), worker.result("b")) == ("A", "B")
    assert worker.error("c") == "unknown command 'c' (supported: a, b, ping)"


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5", "1e6", "64MiB"])
def test_bad_frame_limit_variable_exits_2(spawn: Spawn, value: str) -> None:
    worker = spawn(env={"SNAKEPIT_MAX_FRAME_BYTES": value})
    assert worker.wait() == 2
    stderr = worker.stderr_text()
    assert f"SNAKEPIT_MAX_FRAME_BYTES must be a positive integer, got {json.dumps(value)}" in stderr


def test_handler_errors_log_their_stack(spawn: Spawn) -> None:
    worker = spawn("worker")
    handshake(worker, 4)
    assert worker.error("boom") == "boom: kaput"
    assert worker.error("reject_later") == "reject_later: out of range"
    assert worker.error("refuse") == "refuse: not today"  # a CommandError: expected, no log
    request_id = worker.send("obey", {"ms": 10_000})
    worker.send("$cancel", id=request_id)
    assert worker.receive()["error"] == "cancelled"  # a cancel is no failure either
    stderr = stderr_after_eof(worker)
    boom = stderr.index("command 'boom' (request 2) failed: Error: kaput\n")
    assert "node_concurrency.js:" in stderr[boom:].splitlines()[1]  # the stack's first frame
    assert "command 'reject_later' (request 3) failed: RangeError: out of range\n" in stderr
    assert "not today" not in stderr and "AbortError" not in stderr
