"""Protocol level: what any worker must do to be run by a pool, whatever its commands.

Nothing here calls a command the adapter may not have: requests go to ``ping`` (the handshake,
also the pool's health check) and to a command no adapter has. Most tests drive one worker
frame by frame (:class:`~snakepit_core.conformance.wire.WireWorker`); the last ones run it in a
:class:`~snakepit_core.Pool` as users do. See docs/PROTOCOL.md, *Conformance levels*.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import pytest

from snakepit_core.adapter import Adapter
from snakepit_core.conformance.aio import PoolFactory, in_loop
from snakepit_core.conformance.levels import PROTOCOL, level, needs_capability
from snakepit_core.conformance.wire import (
    FAILURE_KEYS,
    SUCCESS_KEYS,
    Frame,
    WireWorker,
)
from snakepit_core.errors import CommandError, UnknownCommand
from snakepit_core.pool import Pool

pytestmark = level(PROTOCOL)

NO_SUCH_COMMAND = "snakepit_conformance_no_such_command"
#: Larger than any pipe buffer and than the usual 1 MiB read chunk, well under the frame limit.
LARGE = 2 * 1024 * 1024
#: ``meta`` as the pool sends it to every worker: trace context and the time budget.
META = {
    "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01",
    "tracestate": "",
    "deadline_ms": 30_000,
}


def assert_failure(frame: Frame, request_id: int) -> None:
    """A well-formed failure answer to ``request_id``: a non-empty message and nothing else."""
    assert frame.id == request_id, f"answered id {frame.id!r}, not {request_id}"
    assert frame.data.get("success") is False, frame.data
    assert set(frame.data) <= FAILURE_KEYS, f"a failure carries {sorted(frame.data)}"
    message = frame.data.get("error")
    assert isinstance(message, str) and message.strip(), "the error must be a message"


def assert_ping_ok(frame: Frame, request_id: int) -> None:
    assert frame.id == request_id, f"answered id {frame.id!r}, not {request_id}"
    assert frame.data.get("success") is True and set(frame.data) <= SUCCESS_KEYS, frame.data
    assert frame.data["result"]["status"] == "ok", frame.data


def test_handshake(spawn: Callable[[], WireWorker]) -> None:
    worker = spawn()
    frame = worker.handshake()
    assert set(frame.data) <= SUCCESS_KEYS, f"the answer carries {sorted(frame.data)}"
    assert isinstance(frame.data["id"], int) and frame.data["id"] == 1
    capabilities = frame.data["result"].get("capabilities", [])
    assert isinstance(capabilities, list) and all(isinstance(c, str) for c in capabilities)
    # The pool's health check: a later ping with no arguments.
    assert_ping_ok(worker.call("ping", {}), 2)


def test_unknown_command_fails_and_the_worker_keeps_serving(worker: WireWorker) -> None:
    request_id = worker.send(NO_SUCH_COMMAND, {"x": 1})
    assert_failure(worker.receive(), request_id)
    assert_ping_ok(worker.call("ping", {}), request_id + 1)


def test_frames_in_pieces_and_several_in_one_write(worker: WireWorker) -> None:
    """A reader must not assume one write per frame: a header and a body arrive in pieces,
    three frames arrive in one write; lengths count bytes, not characters; ids are any
    integers; ``meta`` (trace context, ``deadline_ms``) may be ignored."""
    big_id, split = worker.request("ping", {}, id=2**31 + 7, meta=META)
    for piece in (split[:2], split[2:4], split[4:9], split[9:]):
        worker.send_raw(piece)
        time.sleep(0.05)
    assert_ping_ok(worker.receive(), big_id)
    unicode_id, unicode = worker.request(NO_SUCH_COMMAND, {"text": "é漢🐍" * 100}, meta=META)
    ping_id, ping = worker.request("ping", {}, meta=META)
    unknown_id, unknown = worker.request(NO_SUCH_COMMAND, {})
    worker.send_raw(unicode + ping + unknown)
    answers = {frame.id: frame for frame in (worker.receive() for _ in range(3))}
    assert set(answers) == {unicode_id, ping_id, unknown_id}
    assert_failure(answers[unicode_id], unicode_id)
    assert_ping_ok(answers[ping_id], ping_id)
    assert_failure(answers[unknown_id], unknown_id)


def test_large_frames(worker: WireWorker) -> None:
    text = "x" * LARGE + "é漢🐍" * 1000
    request_id, frame = worker.request(NO_SUCH_COMMAND, {"text": text})
    assert len(frame) > LARGE
    worker.send_raw(frame)
    assert_failure(worker.receive(timeout=60), request_id)
    assert_ping_ok(worker.call("ping", {}), request_id + 1)


def test_exit_0_on_eof(spawn: Callable[[], WireWorker]) -> None:
    served = spawn()
    served.handshake()
    served.close_stdin()
    assert served.wait() == 0, served.stderr_text()[-2000:]
    never_asked = spawn()
    never_asked.close_stdin()
    assert never_asked.wait() == 0, never_asked.stderr_text()[-2000:]


def _same_pipe(pid: int, fd: int, ours: int) -> bool:
    return os.stat(f"/proc/{pid}/fd/{fd}").st_ino == os.fstat(ours).st_ino


def test_stdout_carries_only_frames(spawn: Callable[[], WireWorker]) -> None:
    """Nothing but frames on stdout, and no way for the worker's own code to add any: by the
    time it answers the handshake, its fd 1 and fd 0 are no longer the protocol's pipes (so
    print(), a direct write to fd 1 or a child process cannot corrupt the stream or steal
    request bytes)."""
    worker = spawn()
    worker.handshake()  # the very first bytes on stdout were this frame
    assert worker.proc.stdout is not None and worker.proc.stdin is not None
    pid = worker.proc.pid
    assert not _same_pipe(pid, 1, worker.proc.stdout.fileno()), "fd 1 is the protocol's stdout"
    assert not _same_pipe(pid, 0, worker.proc.stdin.fileno()), "fd 0 is the protocol's stdin"
    worker.call(NO_SUCH_COMMAND, {})
    worker.close_stdin()
    assert worker.rest_of_stdout() == b"", "bytes after the last answer are not frames"
    assert worker.wait() == 0


@needs_capability("cancel")
def test_cancel_of_a_request_not_running_is_ignored(worker: WireWorker) -> None:
    """``$cancel`` itself is never answered; for an id that is not running (never sent, or
    already answered) it changes nothing."""
    worker.cancel(10_000)
    assert worker.silent_for(0.3), "a $cancel frame got an answer"
    ping_id = worker.send("ping", {})
    assert_ping_ok(worker.receive(), ping_id)
    worker.cancel(ping_id)
    assert worker.silent_for(0.3), "a $cancel for an answered id got an answer"
    assert_ping_ok(worker.call("ping", {}), ping_id + 1)


async def _peak_in_flight(pool: Pool, peaks: dict[str, int]) -> None:
    """Record each worker's most requests in flight, every turn of the loop, until cancelled."""
    while True:
        for worker in pool.workers.values():
            peaks[worker.id] = max(peaks.get(worker.id, 0), worker.in_flight)
        await asyncio.sleep(0)


@in_loop
async def test_a_pool_of_it_serves_and_stops_cleanly(
    adapter: Adapter, new_pool: PoolFactory
) -> None:
    """Two workers serve 50 concurrent pings, each taking as many at once as it negotiated (one
    unless its handshake answered protocol 2, whatever ``worker_concurrency`` asked for), and
    stopping the pool leaves no process."""
    async with new_pool(pool_size=2) as pool:
        assert len(pool.workers) == 2
        if adapter.commands is not None:
            assert "ping" in adapter.commands, "declared commands must include ping"
        for figures in pool.stats()["per_worker"].values():
            limit = 1 if figures["protocol"] == 1 else pool.config.worker_concurrency
            assert 1 <= figures["capacity"] <= limit, figures
        peaks: dict[str, int] = {}
        sampler = asyncio.ensure_future(_peak_in_flight(pool, peaks))
        try:
            answers = await asyncio.gather(*(pool.execute("ping", {}) for _ in range(50)))
        finally:
            sampler.cancel()
        assert all(answer["status"] == "ok" for answer in answers)
        for worker in pool.workers.values():
            assert peaks.get(worker.id, 0) <= worker.capacity, (peaks, pool.stats())
        with pytest.raises((UnknownCommand, CommandError)):
            await pool.execute(NO_SUCH_COMMAND, {})
        assert pool.stats()["restarts"] == 0
        pids = [w.pid for w in pool.workers.values()]
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
