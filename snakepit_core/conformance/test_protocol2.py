"""Protocol 2: many requests in flight on one worker (docs/PROTOCOL.md, *Protocol 2*).

Selected for an adapter whose worker answers a handshake offering ``max_in_flight`` 8 (or
``--worker-concurrency``, if more) with ``"protocol": 2``; deselected for any other, with the
reason in the collection report. Every case asks for that many requests in flight.

* Protocol level (any such adapter, whatever its commands; ``ping`` and a command no adapter
  has): the handshake's ``max_concurrency``; requests written together while others are in
  flight, each answered once by id with its own outcome, ``meta.deadline_ms`` accepted; a
  ``$cancel`` among them fails no other request; a pool keeps that many in flight on a worker.
* Bundled level (the shared commands, so ``sleep``): answers in the order requests finish,
  matched by id; eight one-second calls on one worker take about one second; a cancelled or
  timed-out request fails its caller at once and no other, and the pool is whole after it; the
  keys of the handshake's answer, and of a health-check ping after it.

Deadlines: the pool sends every request's time budget as ``meta.deadline_ms``, and the bundled
bridge libraries hand it to handlers as ``ctx.deadline``, but no shared command reveals it, so
these cases check only that requests carrying it are answered as any other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from snakepit_core.conformance.aio import PoolFactory, in_loop
from snakepit_core.conformance.contract import RESULT_KEYS
from snakepit_core.conformance.levels import (
    BUNDLED,
    PROTOCOL,
    PROTOCOL_2_IN_FLIGHT,
    level,
    needs_capability,
    needs_protocol,
)
from snakepit_core.conformance.polling import eventually
from snakepit_core.conformance.test_bundled import assert_keys_in_order
from snakepit_core.conformance.test_protocol import (
    META,
    NO_SUCH_COMMAND,
    assert_failure,
    assert_ping_ok,
)
from snakepit_core.conformance.wire import FAILURE_KEYS, SUCCESS_KEYS, WireWorker, encode
from snakepit_core.errors import CommandError, UnknownCommand, WorkerTimeout

pytestmark = needs_protocol(2)

#: Request ids the pool would never repeat on a worker: large, out of order, far from the ones
#: :class:`WireWorker` numbers itself (1, 2, ...).
IDS = [10**6 + 7919 * i for i in (5, 2, 7, 0, 6, 3, 1, 4, 9, 8, 11, 10)]


def ids_for(worker: WireWorker, count: int | None = None) -> list[int]:
    """As many ids as ``worker`` takes at once (at most ``count``), from :data:`IDS` and beyond."""
    wanted = min(worker.capacity, count or worker.capacity)
    return [*IDS, *range(2 * 10**6, 2 * 10**6 + wanted)][:wanted]


def request(command: str, request_id: int, args: dict[str, object] | None = None) -> bytes:
    """A request frame as the pool writes it, ``meta.deadline_ms`` included."""
    return encode({"id": request_id, "command": command, "args": args or {}, "meta": META})


# -- protocol level: frames, with ping and a command no adapter has ------------------------------


@level(PROTOCOL)
def test_the_handshake_answers_protocol_2_with_a_max_concurrency(
    spawn: Callable[[], WireWorker], protocol_2_concurrency: int
) -> None:
    """A handshake offering ``max_in_flight`` gets ``"protocol": 2`` and ``max_concurrency``,
    an integer >= 1 (anything else and a pool sends one request at a time); a later ``ping {}``
    is the health check. (A handshake without ``max_in_flight`` is the protocol level's.)"""
    worker = spawn()
    frame = worker.handshake(max_in_flight=protocol_2_concurrency)
    assert set(frame.data) <= SUCCESS_KEYS, f"the answer carries {sorted(frame.data)}"
    result = frame.data["result"]
    assert result["protocol"] == 2
    offered = result.get("max_concurrency")
    assert type(offered) is int and offered >= 1, f"max_concurrency is {offered!r}"
    assert worker.capacity == min(protocol_2_concurrency, offered)
    assert_ping_ok(worker.call("ping", {}), 2)


@level(PROTOCOL)
def test_requests_in_flight_are_each_answered_once_by_id(concurrent_worker: WireWorker) -> None:
    """As many requests as the worker takes at once, written together (ids out of order, each
    with ``meta.deadline_ms``): each is answered once, by its id, with its own outcome, in any
    order; twice over, then the worker keeps serving."""
    worker = concurrent_worker
    for round_ in range(2):
        ids = [i + 500_000 * round_ for i in ids_for(worker)]
        pings = set(ids[::2])
        worker.send_raw(
            b"".join(request("ping" if i in pings else NO_SUCH_COMMAND, i, {"n": i}) for i in ids)
        )
        answers = worker.receive_answers(ids)
        for request_id, frame in answers.items():
            if request_id in pings:
                assert_ping_ok(frame, request_id)
            else:
                assert_failure(frame, request_id)
        assert worker.silent_for(0.1), "an answer beyond the requests in flight"
    assert worker.result("ping", {})["status"] == "ok"


@level(PROTOCOL)
@needs_capability("cancel")
def test_a_cancel_among_requests_in_flight_fails_no_other(concurrent_worker: WireWorker) -> None:
    """A ``$cancel`` written among requests in flight (and one for an id never sent) gets no
    answer of its own and fails no other request: each is answered once, the cancelled one
    with its real outcome or ``"cancelled"``."""
    worker = concurrent_worker
    ids = ids_for(worker)
    target = ids[len(ids) // 2]
    frames = [request("ping", i) for i in ids]
    frames.insert(len(ids) // 2 + 1, encode({"id": target, "command": "$cancel"}))
    frames.append(encode({"id": 3 * 10**6, "command": "$cancel"}))
    worker.send_raw(b"".join(frames))
    answers = worker.receive_answers(ids)
    for request_id, frame in answers.items():
        if request_id == target and frame.data.get("success") is False:
            assert frame.data.get("error") == "cancelled", frame.data
            assert set(frame.data) <= FAILURE_KEYS, frame.data
        else:
            assert_ping_ok(frame, request_id)
    assert worker.silent_for(0.3), "a $cancel frame got an answer"
    assert worker.result("ping", {})["status"] == "ok"


@level(PROTOCOL)
@in_loop
async def test_a_pool_keeps_many_requests_in_flight_on_one_worker(
    new_pool: PoolFactory, protocol_2_concurrency: int
) -> None:
    """A pool of one worker negotiates protocol 2 and that many slots; 200 concurrent pings
    and an unknown command among them each get their own answer; no slot stays taken."""
    async with new_pool(pool_size=1, worker_concurrency=protocol_2_concurrency) as pool:
        (figures,) = pool.stats()["per_worker"].values()
        assert figures["protocol"] == 2, figures
        assert 1 <= figures["capacity"] <= protocol_2_concurrency, figures
        calls = [pool.execute("ping", {}, timeout=20) for _ in range(200)]
        calls.insert(100, pool.execute(NO_SUCH_COMMAND, {}, timeout=20))
        answers = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(answers.pop(100), UnknownCommand | CommandError)
        assert all(isinstance(a, dict) and a["status"] == "ok" for a in answers), answers
        stats = pool.stats()
        assert stats["in_flight"] == 0 and stats["available"] == 1, stats
        assert stats["restarts"] == 0, stats


# -- bundled level: with sleep -----------------------------------------------------------------


@level(BUNDLED)
def test_answers_come_as_requests_finish_matched_by_id(concurrent_worker: WireWorker) -> None:
    """Three sleeps written together, longest first: answered shortest first, each on its own
    id with its own result (one at a time would answer them in the order sent)."""
    worker = concurrent_worker
    seconds = dict(zip(ids_for(worker, 3), (0.4, 0.02, 0.2), strict=False))
    assert len(seconds) == 3, "the worker takes fewer than three requests at once"
    worker.send_raw(b"".join(request("sleep", i, {"seconds": s}) for i, s in seconds.items()))
    answers = worker.receive_answers(seconds)
    assert list(answers) == sorted(seconds, key=seconds.__getitem__), [
        (i, seconds[i]) for i in answers
    ]
    for request_id, frame in answers.items():
        assert frame.data.get("success") is True, frame.data
        assert frame.data["result"] == {"slept": seconds[request_id]}, frame.data


@level(BUNDLED)
@in_loop
async def test_eight_one_second_calls_on_one_worker_take_about_one_second(
    new_pool: PoolFactory, protocol_2_concurrency: int
) -> None:
    async with new_pool(pool_size=1, worker_concurrency=protocol_2_concurrency) as pool:
        (worker,) = pool.workers.values()
        count = PROTOCOL_2_IN_FLIGHT
        started = time.monotonic()
        calls = [
            asyncio.ensure_future(pool.execute("sleep", {"seconds": 1}, timeout=10))
            for _ in range(count)
        ]
        at_once = min(count, worker.capacity)
        await eventually(
            lambda: pool.stats()["in_flight"] == at_once,
            within=2,
            message=lambda: f"not {at_once} in flight: {pool.stats()}",
        )
        (figures,) = pool.stats()["per_worker"].values()
        assert figures["in_flight"] == at_once and figures["protocol"] == 2, figures
        results = await asyncio.gather(*calls)
        elapsed = time.monotonic() - started
        assert results == [{"slept": 1}] * count
        assert elapsed < 4, f"{count} one-second calls on one worker took {elapsed:.2f}s"
        stats = pool.stats()
        assert stats["in_flight"] == 0 and stats["available"] == 1, stats


@level(BUNDLED)
@in_loop
async def test_a_cancelled_call_fails_its_caller_at_once_and_no_other(
    new_pool: PoolFactory, protocol_2_concurrency: int
) -> None:
    """Eight sleeps in flight on one worker; one caller is cancelled and one times out: both
    fail at once, the other six get their results on time, and afterwards every slot is free
    and the pool has its worker (kept, or retired and replaced)."""
    async with new_pool(pool_size=1, worker_concurrency=protocol_2_concurrency) as pool:
        started = time.monotonic()
        cancelled = asyncio.ensure_future(pool.execute("sleep", {"seconds": 30}))
        timed_out = asyncio.ensure_future(pool.execute("sleep", {"seconds": 30}, timeout=0.3))
        bystanders = [
            asyncio.ensure_future(pool.execute("sleep", {"seconds": 0.5}, timeout=10))
            for _ in range(PROTOCOL_2_IN_FLIGHT - 2)
        ]
        await asyncio.sleep(0.15)
        cancelled.cancel()
        cancelling = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert time.monotonic() - cancelling < 0.25, "the cancelled caller waited"
        with pytest.raises(WorkerTimeout):
            await timed_out
        assert time.monotonic() - started < 0.3 + 0.5, "the timed-out caller waited"
        assert await asyncio.gather(*bystanders) == [{"slept": 0.5}] * len(bystanders)
        assert time.monotonic() - started < 0.5 + 1.0, "the others waited for the cancels"

        def whole() -> bool:
            stats = pool.stats()
            return bool(stats["in_flight"] == 0 and stats["available"] == stats["workers"] == 1)

        await eventually(whole, within=5, message=lambda: f"the pool is not whole: {pool.stats()}")
        assert (await pool.execute("ping", {}))["status"] == "ok"


@level(BUNDLED)
def test_a_cancel_of_a_running_sleep_fails_no_other(concurrent_worker: WireWorker) -> None:
    """A ``$cancel`` for a sleep running among others: that sleep is answered once, on its own
    id, with ``"cancelled"`` if the bridge could stop it or its real result if not (a Python
    sync handler on the thread pool runs to its end); the others get their results; the
    ``$cancel`` itself gets no answer."""
    worker = concurrent_worker
    target, *others = ids_for(worker, PROTOCOL_2_IN_FLIGHT)
    frames = [request("sleep", target, {"seconds": 0.6})]
    frames += [request("sleep", i, {"seconds": 0.2}) for i in others]
    worker.send_raw(b"".join(frames))
    time.sleep(0.1)
    worker.cancel(target)
    answers = worker.receive_answers([target, *others], timeout=5)
    cancelled = answers[target].data
    if cancelled.get("success") is False:
        assert cancelled.get("error") == "cancelled", cancelled
        assert set(cancelled) <= FAILURE_KEYS, cancelled
    else:
        assert cancelled.get("result") == {"slept": 0.6}, cancelled
    for request_id in others:
        frame = answers[request_id]
        assert frame.data.get("success") is True, frame.data
        assert frame.data["result"] == {"slept": 0.2}, frame.data
    assert worker.silent_for(0.2), "the $cancel frame itself got an answer"
    assert worker.result("ping", {})["status"] == "ok"


@level(BUNDLED)
def test_the_handshake_and_a_later_ping_have_the_documented_keys(
    spawn: Callable[[], WireWorker], protocol_2_concurrency: int
) -> None:
    """The answer to a handshake offering ``max_in_flight`` has ping's keys in their order, then
    ``protocol`` and ``max_concurrency``, and capabilities ``cancel`` and ``deadline``; a later
    ``ping {}`` (the pool's health check, a caller's ``execute("ping")``) has ping's keys only,
    as at protocol 1."""
    worker = spawn()
    result = worker.handshake(max_in_flight=protocol_2_concurrency).data["result"]
    assert tuple(result) == (*RESULT_KEYS["ping"], "protocol", "max_concurrency"), list(result)
    assert {"cancel", "deadline"} <= set(result["capabilities"]), result
    assert_keys_in_order("ping", worker.result("ping", {}))
