"""Damage: a ``$cancel`` that lands just after a Ruby handler returned must be discarded safely.

The Ruby bridge's watcher thread raises ``Cancelled`` into the handler's thread. When the raise
lands after the handler returned, the exception stays queued (masked) and the library must drain
it before the next request. On Ruby 3.1 the old drain, guarded by
``Thread.pending_interrupt?(Cancelled)``, segfaulted whenever such a cancel was queued. These
tests land cancels on that boundary against the bundled bridge and check the worker survives,
answers every request exactly once and keeps answering normal requests correctly. Under
protocol 2 each handler runs on a pool thread, and the same must hold for every one of them.
"""

from __future__ import annotations

import random
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from snakepit_ruby.plugin import ruby_adapter, snakepit_adapters

from raw_worker import RawWorker, frame

#: The bridge's watcher looks at the input this often while a handler runs (Inbox::POLL_SECONDS).
WATCHER_POLL = 0.05
#: Requests (each followed by its $cancel) in the storm.
STORM = 1000
#: Storm requests sent before their answers are read (keeps both pipes far from full).
BATCH = 25
#: Tiny delays (seconds) before each half of a storm request's $cancel.
DELAYS = [0.0, 0.0, 0.0002, 0.0005, 0.001, 0.002, 0.003]
#: Requests in the protocol-2 storm, and how many are in flight at once.
STORM_2 = 1000
IN_FLIGHT = 8
#: The library with its late-cancel window held open on every pool thread.
LATE_CANCEL_WORKER = Path(__file__).parent / "bridges" / "ruby_late_cancel_worker.rb"


def bridge_argv() -> list[str]:
    (adapter,) = snakepit_adapters()
    return adapter.command_line()


@pytest.fixture
def bridge() -> Iterator[RawWorker]:
    with RawWorker(bridge_argv()) as worker:
        worker.handshake()
        yield worker


def cancel_frame(request_id: int) -> bytes:
    return frame({"id": request_id, "command": "$cancel"})


def receive(worker: RawWorker) -> dict[str, Any]:
    """The next frame; if the worker died instead, fail with its exit status and stderr."""
    try:
        return worker.receive(timeout=5.0)
    except (EOFError, TimeoutError) as error:
        try:
            status: int | None = worker.wait(5)  # closed stdout: it is dying; let it finish
            stderr = worker.stderr_text()[:1500]
        except subprocess.TimeoutExpired:
            status, stderr = None, "(still running)"
        pytest.fail(f"no answer ({error}); worker exit status {status}; stderr:\n{stderr}")


def assert_answer(frame: dict[str, Any], request_id: int, result: dict[str, Any]) -> None:
    """The one answer of a request that raced its $cancel: its result, or "cancelled"."""
    assert frame["id"] == request_id, frame
    if frame["success"]:
        assert frame == {"id": request_id, "success": True, "result": result}
    else:
        assert frame == {"id": request_id, "success": False, "error": "cancelled"}


def assert_healthy_then_exit_0(worker: RawWorker) -> None:
    """Normal requests still answered correctly, no stray frame, a clean exit and no crash."""
    assert worker.result("ping")["status"] == "ok"  # a stray answer would arrive first
    assert worker.result("echo", {"x": [1, "two"]}) == {"echoed": {"x": [1, "two"]}}
    computed = worker.result("compute", {"operation": "multiply", "a": 6, "b": 7})
    assert computed["result"] == 42
    assert worker.result("sleep", {"seconds": 0.01}) == {"slept": 0.01}  # no cancel left over
    worker.close_stdin()
    status = worker.wait(10)
    stderr = worker.stderr_text()
    assert status == 0, f"exit status {status}; stderr:\n{stderr[:1500]}"
    assert stderr == ""
    assert worker.proc.stdout is not None
    assert worker.proc.stdout.read() == b""  # nothing unanswered or answered twice is left


def test_a_cancel_held_by_the_watcher_until_the_handler_returned_is_discarded(
    bridge: RawWorker,
) -> None:
    """The watcher starts reading a $cancel during the handler; the rest arrives around its end.

    Half a $cancel frame is in the pipe while ``sleep`` runs, so the watcher's next poll starts
    reading it and waits for the rest holding the bridge's lock. The rest is sent just before,
    at or just after the moment the handler returns: the cancel then lands inside the handler
    (answer "cancelled") or after it returned (answer the result; the late cancel is discarded).
    """
    rng = random.Random(20240531)
    for _ in range(25):
        seconds = round(WATCHER_POLL + rng.uniform(0.005, 0.02), 4)
        request_id = bridge.send("sleep", {"seconds": seconds})
        cancel = cancel_frame(request_id)
        bridge.send_raw(cancel[:10])
        time.sleep(max(0.0, seconds + rng.uniform(-0.004, 0.012)))
        bridge.send_raw(cancel[10:])
        assert_answer(receive(bridge), request_id, {"slept": seconds})
        # The next handler must not be stopped by a cancel left queued by the previous one.
        assert bridge.result("echo", {"after": request_id}) == {"echoed": {"after": request_id}}
    assert_healthy_then_exit_0(bridge)


def test_a_storm_of_cancels_racing_fast_handlers_leaves_the_worker_serving(
    bridge: RawWorker,
) -> None:
    """1,000 fast requests, each chased by its $cancel (split in two) after varied tiny delays.

    Most cancels arrive after their request was answered (ignored); those the watcher picks up
    (it polls every WATCHER_POLL) land while the handler runs or just after it returned. Stale cancels for long-finished ids
    are mixed in. Every request gets exactly one answer, in order.
    """
    rng = random.Random(7)
    finished: list[int] = []
    for batch_start in range(0, STORM, BATCH):
        sent: list[tuple[int, dict[str, Any]]] = []
        for index in range(batch_start, batch_start + BATCH):
            kind = index % 4
            if kind == 0:
                command, args = "echo", {"n": index}
                result: dict[str, Any] = {"echoed": args}
            elif kind == 1:
                command, args = "compute", {"operation": "add", "a": index, "b": 1}
                result = {"operation": "add", "inputs": {"a": index, "b": 1}, "result": index + 1}
            else:
                seconds = rng.choice([0, 0.0005, 0.001, 0.002, 0.003])
                command, args = "sleep", {"seconds": seconds}
                result = {"slept": seconds}
            request_id = bridge.send(command, args)
            # The cancel follows after a tiny delay, in two parts a tiny delay apart: a watcher
            # poll that starts reading it waits for the rest, so it lands around the return.
            cancel = cancel_frame(request_id)
            split = rng.randrange(1, len(cancel))
            for part in (cancel[:split], cancel[split:]):
                delay = rng.choice(DELAYS)
                if delay:
                    time.sleep(delay)
                bridge.send_raw(part)
            if finished and rng.random() < 0.2:
                bridge.send_raw(cancel_frame(rng.choice(finished)))  # for an id no longer running
            sent.append((request_id, result))
        for request_id, result in sent:
            assert_answer(receive(bridge), request_id, result)
            finished.append(request_id)
    assert len(finished) == len(set(finished)) == STORM
    assert_healthy_then_exit_0(bridge)


def storm_request(rng: random.Random, index: int) -> tuple[str, dict[str, Any], Any, float]:
    """A request of the protocol-2 storm: command, args, its result and how long it runs."""
    kind = index % 4
    if kind == 0:
        return "echo", {"n": index}, {"echoed": {"n": index}}, 0.0
    if kind == 1:
        args = {"operation": "add", "a": index, "b": 1}
        result = {"operation": "add", "inputs": {"a": index, "b": 1}, "result": index + 1}
        return "compute", args, result, 0.0
    seconds = rng.choice([0, 0.0005, 0.001, 0.002, 0.004, 0.008])
    return "sleep", {"seconds": seconds}, {"slept": seconds}, seconds


@pytest.mark.parametrize("late_window", [False, True], ids=["bridge", "late-window"])
def test_a_storm_of_cancels_on_eight_threads_stops_only_the_requests_named(
    late_window: bool,
) -> None:
    """Protocol 2, max_in_flight 8: 1,000 requests, about half chased by their $cancel.

    Each chased request's $cancel (in two parts) is timed around the moment its handler ends:
    just before (answer "cancelled"), at, or just after it (the late Cancelled stays queued in
    that pool thread and must be discarded before the thread runs its next request); some are
    sent again once the answer arrived. A request nobody cancelled must always succeed: a
    leftover Cancelled would stop it instead. Every request gets exactly one answer.

    Against the bundled bridge, and against a worker that holds the late window open on every
    pool thread (MRI's GVL makes it narrow), where late cancels must really have happened.
    """
    rng = random.Random(8)
    if late_window:
        adapter = ruby_adapter("late-window", LATE_CANCEL_WORKER)
        argv, env = adapter.command_line(), adapter.env
    else:
        argv, env = bridge_argv(), None
    with RawWorker(argv, env=env) as worker:
        ping = worker.call("ping", {"worker_id": "raw-1", "max_in_flight": IN_FLIGHT})["result"]
        assert ping["protocol"] == 2
        assert worker.proc.stdout is not None
        stdout = worker.proc.stdout.fileno()
        in_flight: dict[int, tuple[Any, bool]] = {}  # id -> (result, chased by a $cancel)
        cancels: list[tuple[float, int]] = []  # (when to send, id)
        outcomes = {"cancelled": 0, "finished first": 0}
        sent = answered = 0
        while answered < STORM_2:
            while sent < STORM_2 and len(in_flight) < IN_FLIGHT:
                command, args, result, seconds = storm_request(rng, sent)
                request_id = worker.send(command, args)
                chased = rng.random() < 0.5
                if chased:
                    ends = time.monotonic() + seconds + 0.0003  # roughly
                    cancels.append((ends + rng.uniform(-0.002, 0.002), request_id))
                in_flight[request_id] = (result, chased)
                sent += 1
            cancels.sort()
            while cancels and cancels[0][0] <= time.monotonic():
                frame = cancel_frame(cancels.pop(0)[1])
                split = rng.randrange(1, len(frame))
                bridge_delay = rng.choice(DELAYS[:4])
                worker.send_raw(frame[:split])
                if bridge_delay:
                    time.sleep(bridge_delay)
                worker.send_raw(frame[split:])
            wait = min(max(0.0, cancels[0][0] - time.monotonic()), 0.005) if cancels else 0.005
            if not select.select([stdout], [], [], wait)[0]:
                continue
            frame = receive(worker)
            request_id = frame["id"]
            assert request_id in in_flight, f"answered twice or never asked: {frame}"
            result, chased = in_flight.pop(request_id)
            answered += 1
            if not chased:
                assert frame == {"id": request_id, "success": True, "result": result}
                continue
            assert_answer(frame, request_id, result)
            outcomes["finished first" if frame["success"] else "cancelled"] += 1
            if rng.random() < 0.3:
                worker.send_raw(cancel_frame(request_id))  # just after it finished: ignored
        # Both sides of the race were hit, not only one.
        assert all(count > 0 for count in outcomes.values()), outcomes
        if late_window:
            assert worker.result("late_cancels", {}) > 10  # about 300 here
        assert_healthy_then_exit_0(worker)
