"""Bundled level: the shared commands with the exact results of the bundled bridges.

Every bundled adapter (and any adapter that declares all the shared commands) passes it with
the same result shapes, key order and number format; see docs/PROTOCOL.md. Pool-level tests
check values as users see them; frame-level tests (``worker``) check what only the wire shows:
the order of keys and the text of each number.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

from snakepit_core.conformance.aio import PoolFactory, in_loop
from snakepit_core.conformance.contract import OPEN_RESULTS, RESULT_KEYS, SHARED_COMMANDS
from snakepit_core.conformance.levels import BUNDLED, level
from snakepit_core.conformance.polling import eventually
from snakepit_core.conformance.wire import FAILURE_KEYS, WireWorker
from snakepit_core.errors import (
    AffinityBusy,
    CommandError,
    PoolSaturated,
    QueueTimeout,
    UnknownCommand,
    ValidationError,
    WorkerCrashed,
    WorkerTimeout,
)
from snakepit_core.pool import Pool
from snakepit_core.sessions import SessionHelpers

pytestmark = level(BUNDLED)


@in_loop
async def test_declares_the_shared_commands(pool: Pool) -> None:
    assert pool.adapter.commands is not None
    assert pool.adapter.commands >= SHARED_COMMANDS
    assert set(pool.adapter.schemas) >= pool.adapter.commands


@in_loop
async def test_handshake_and_ping_shape(pool: Pool) -> None:
    for worker in pool.workers.values():
        assert "cancel" in worker.capabilities
    ping = await pool.execute("ping", {})
    assert ping["status"] == "ok" and ping["worker_id"] in pool.workers
    assert isinstance(ping["uptime"], int | float) and ping["uptime"] >= 0
    assert isinstance(ping["requests_handled"], int) and ping["requests_handled"] >= 1
    # Any non-empty name (the bundled bridges' exact names are checked in the repository's
    # tests/test_bridge_contract.py: the core names no runtime), the same in ping and info.
    assert isinstance(ping["runtime"], str) and ping["runtime"].strip(), "runtime must be named"
    assert (await pool.execute("info", {}))["runtime"] == ping["runtime"], "info disagrees"
    assert ping["pid"] == pool.workers[ping["worker_id"]].pid
    assert "cancel" in ping["capabilities"]


@in_loop
async def test_echo(pool: Pool) -> None:
    args = {"message": "hi", "nested": {"list": [1, "two", None, True]}, "unicode": "é漢🐍"}
    assert await pool.execute("echo", args) == {"echoed": args}


@pytest.mark.parametrize(
    ("operation", "a", "b", "expected"),
    [
        ("add", 5, 3, 8),
        ("subtract", 10, 4, 6),
        ("multiply", 10, 5, 50),
        ("divide", 7, 2, 3.5),
        ("divide", 6, 2, 3),
        ("add", 2.5, 0.5, 3),
        ("multiply", -1.5, 2, -3),
        ("add", 0.1, 0.2, 0.30000000000000004),
    ],
)
@in_loop
async def test_compute(pool: Pool, operation: str, a: float, b: float, expected: float) -> None:
    result = await pool.execute("compute", {"operation": operation, "a": a, "b": b})
    assert result == {"operation": operation, "inputs": {"a": a, "b": b}, "result": expected}
    assert type(result["result"]) is type(expected), "integral results are JSON integers"


@in_loop
async def test_compute_failures(pool: Pool) -> None:
    with pytest.raises(CommandError, match="compute: division by zero"):
        await pool.execute("compute", {"operation": "divide", "a": 1, "b": 0})
    with pytest.raises(CommandError, match="compute: result is not a finite number"):
        await pool.execute("compute", {"operation": "multiply", "a": 1e308, "b": 10})
    with pytest.raises(ValidationError, match="finite number"):
        await pool.execute("compute", {"operation": "add", "a": float("nan"), "b": 1})


@in_loop
async def test_integers_beyond_two_to_the_53(pool: Pool) -> None:
    big = 2**60 + 1
    try:
        result = await pool.execute("compute", {"operation": "add", "a": big, "b": 1})
    except CommandError as exc:  # documented: JavaScript refuses rather than round
        assert "2^53" in str(exc)
    else:
        assert result["result"] == big + 1


@in_loop
async def test_info_shape(pool: Pool) -> None:
    info = await pool.execute("info", {})
    for key, kind in [
        ("runtime", str),
        ("runtime_version", str),
        ("bridge_version", str),
        ("platform", str),
        ("arch", str),
        ("pid", int),
        ("worker_id", str),
        ("requests_handled", int),
        ("commands", list),
    ]:
        assert isinstance(info[key], kind), key
    assert isinstance(info["uptime"], int | float)
    assert info["memory"]["rss_bytes"] > 0
    assert set(info["commands"]) >= SHARED_COMMANDS and info["commands"] == sorted(info["commands"])


@in_loop
async def test_validation_and_unknown_command(pool: Pool) -> None:
    with pytest.raises(ValidationError, match=r"args\.b is required"):
        await pool.execute("compute", {"operation": "add", "a": 1})
    with pytest.raises(UnknownCommand, match="ping"):
        await pool.execute("no_such_command", {})
    assert pool.stats()["restarts"] == 0


@in_loop
async def test_timeout_cancels_and_the_worker_keeps_serving(pool: Pool) -> None:
    pids = {w.pid for w in pool.workers.values()}
    started = time.monotonic()
    with pytest.raises(WorkerTimeout):
        await pool.execute("sleep", {"seconds": 30}, timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert (await pool.execute("sleep", {"seconds": 0.01})) == {"slept": 0.01}
    assert {w.pid for w in pool.workers.values()} == pids


@in_loop
async def test_cancelling_the_caller_cancels_on_the_worker(pool: Pool) -> None:
    pids = {w.pid for w in pool.workers.values()}
    call = asyncio.ensure_future(pool.execute("sleep", {"seconds": 30}))
    await asyncio.sleep(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await eventually(lambda: pool.stats()["available"] == 2)
    assert (await pool.execute("ping", {}))["status"] == "ok"
    assert {w.pid for w in pool.workers.values()} == pids, "the worker was replaced"
    assert pool.stats()["restarts"] == 0


@in_loop
async def test_a_worker_killed_mid_request(pool: Pool) -> None:
    call = asyncio.ensure_future(pool.execute("sleep", {"seconds": 30}))
    await asyncio.sleep(0.2)
    (busy,) = [w for w in pool.workers.values() if w.busy]
    os.kill(busy.pid or 0, signal.SIGKILL)
    with pytest.raises(WorkerCrashed, match="signal SIGKILL") as crashed:
        await call
    assert crashed.value.exit_code == -signal.SIGKILL
    await eventually(lambda: len(pool.workers) == 2 and pool.stats()["available"] == 2)
    assert (await pool.execute("ping", {}))["status"] == "ok"
    assert await pool.execute("echo", {"after": True}) == {"echoed": {"after": True}}


@in_loop
async def test_queue_saturation_and_queue_timeout(new_pool: PoolFactory) -> None:
    async with new_pool(pool_size=1, pool_max_queue_size=1, pool_queue_timeout=0.3) as pool:
        (only,) = pool.workers.values()  # every slot it negotiated taken, then the queue's one
        busy = [
            asyncio.ensure_future(pool.execute("sleep", {"seconds": 0.8}))
            for _ in range(only.capacity)
        ]
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(pool.execute("ping", {}))
        await asyncio.sleep(0.05)
        with pytest.raises(PoolSaturated):
            await pool.execute("ping", {})
        with pytest.raises(QueueTimeout):
            await queued
        assert await asyncio.gather(*busy) == [{"slept": 0.8}] * only.capacity


@in_loop
async def test_concurrent_callers(pool: Pool) -> None:
    results = await asyncio.gather(
        *(pool.execute("compute", {"operation": "multiply", "a": i, "b": 3}) for i in range(300))
    )
    assert [r["result"] for r in results] == [i * 3 for i in range(300)]
    assert len({w.id for w in pool.workers.values()}) == 2


@in_loop
async def test_worker_side_session_state(pool: Pool) -> None:
    value: dict[str, Any] = {"weights": [0.1, 0.2], "name": "model"}
    stored = await pool.execute_in_session(
        "conf", "store", {"key": "m", "value": value}, affinity="strict"
    )
    assert stored == {"stored": True, "session_id": "conf", "key": "m"}
    kept = await pool.execute_in_session("conf", "retrieve", {"key": "m"}, affinity="strict")
    assert kept == {"found": True, "session_id": "conf", "key": "m", "value": value}
    missing = await pool.execute_in_session("conf", "retrieve", {"key": "x"}, affinity="strict")
    assert missing["found"] is False and missing["value"] is None
    with pytest.raises(CommandError, match="session_id is required"):
        await pool.execute("store", {"key": "k", "value": 1})
    cleared = await pool.execute_in_session("conf", "clear_session", {}, affinity="strict")
    assert cleared["cleared"] is True and cleared["session_id"] == "conf"


@in_loop
async def test_strict_fail_fast(pool: Pool) -> None:
    await pool.execute_in_session("ff", "ping", {}, affinity="strict")
    slots = max(w.capacity for w in pool.workers.values())  # the session's worker, all taken
    running = [
        asyncio.ensure_future(
            pool.execute_in_session("ff", "sleep", {"seconds": 0.4}, affinity="strict")
        )
        for _ in range(slots)
    ]
    await asyncio.sleep(0.1)
    with pytest.raises(AffinityBusy):
        await pool.execute_in_session("ff", "ping", {}, affinity="strict_fail_fast")
    await asyncio.gather(*running)


@in_loop
async def test_programs(pool: Pool) -> None:
    helpers = SessionHelpers(pool)
    created = await helpers.execute_program_command(
        "prog",
        "create_program",
        {"signature": "question, context -> answer, confidence", "model": "m", "temperature": 0},
    )
    assert created["program_id"].startswith("prog_")
    assert created["inputs"] == ["question", "context"]
    assert created["outputs"] == ["answer", "confidence"]
    assert created["config"] == {"model": "m", "temperature": 0}
    executed = await helpers.execute_program_command(
        "prog",
        "execute_program",
        {
            "program_id": created["program_id"],
            "inputs": {"question": "why?", "context": {"k": [1, 2]}},
        },
    )
    assert executed["outputs"] == {
        "answer": 'answer(question=why?, context={"k":[1,2]})',
        "confidence": 'confidence(question=why?, context={"k":[1,2]})',
    }
    with pytest.raises(CommandError, match="missing input 'context'"):
        await pool.execute(
            "execute_program",
            {"program": {"signature": "question, context -> a"}, "inputs": {"question": "q"}},
        )
    with pytest.raises(ValidationError):
        await pool.execute("create_program", {"signature": "no arrow"})


# -- what only the wire shows ---------------------------------------------------------------

#: One call of each shared command, in an order that gives every result something to show.
KEY_ORDER_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("ping", {}),
    ("echo", {"zeta": 1, "alpha": {"y": 1, "x": 2}, "mid": [1]}),
    ("compute", {"operation": "add", "a": 1, "b": 2}),
    ("info", {}),
    ("sleep", {"seconds": 0.01}),
    ("store", {"session_id": "order", "key": "k", "value": {"b": 1, "a": 2}}),
    ("retrieve", {"session_id": "order", "key": "k"}),
    ("clear_session", {"session_id": "order"}),
    ("create_program", {"signature": "q, c -> b, a", "program_id": "p", "zeta": 1, "alpha": 2}),
    ("execute_program", {"program": {"signature": "q, c -> b, a"}, "inputs": {"c": 1, "q": 2}}),
]


def assert_keys_in_order(command: str, result: dict[str, Any]) -> None:
    documented = RESULT_KEYS[command]
    if command in OPEN_RESULTS:
        present = [key for key in result if key in documented]
        assert set(documented) <= set(result), f"{command}: missing {set(documented) - set(result)}"
    else:
        present = list(result)
    assert tuple(present) == documented, f"{command}: keys {present}, documented {documented}"


def test_result_keys_in_the_documented_order(worker: WireWorker) -> None:
    """Results are objects whose keys come in the bundled bridges' order (docs/PROTOCOL.md);
    objects a caller passed in keep the caller's order."""
    for command, args in KEY_ORDER_CALLS:
        result = worker.result(command, args)
        assert_keys_in_order(command, result)
        if command == "echo":
            assert list(result["echoed"]) == list(args)
            assert list(result["echoed"]["alpha"]) == ["y", "x"]
        if command == "retrieve":
            assert list(result["value"]) == ["b", "a"]
        if command == "create_program":
            assert list(result["config"]) == ["zeta", "alpha"]
        if command == "execute_program":
            assert list(result["outputs"]) == ["b", "a"], "outputs follow the signature"
    assert list(worker.result("compute", {"operation": "add", "a": 1, "b": 2})["inputs"]) == [
        "a",
        "b",
    ]


def significant_digits(number: str) -> str:
    """The significant digits of a JSON number's text: ``1.0e-07`` and ``1e-7`` give ``1``."""
    mantissa = number.lstrip("-").lower().split("e")[0].replace(".", "")
    return mantissa.strip("0") or "0"


#: compute calls whose float results need every one of 16 or 17 digits, or an exponent.
FLOAT_CALLS = [
    ("add", 0.1, 0.2),
    ("divide", 1, 3),
    ("divide", 2, 3e10),
    ("multiply", 5e-324, 1),
    ("multiply", 1e-7, 1),
    ("add", 123456789.123, 0),
    ("divide", 2.5e-300, 3),
]


def test_floats_are_written_with_the_shortest_round_trip_digits(worker: WireWorker) -> None:
    """Every float is written with the fewest digits that read back as the same double, as
    Python's repr, JavaScript and Ruby's Float#to_s write it; the exponent's spelling
    (``1e-07``, ``1e-7``, ``1.0e-07``) is free. Too few digits lose precision (%.15g gives
    0.333333333333333); too many are noise."""
    for operation, a, b in FLOAT_CALLS:
        frame = worker.call("compute", {"operation": operation, "a": a, "b": b})
        assert frame.data["success"] is True, frame.data
        assert frame.float_texts, f"{operation}({a}, {b}) wrote no float: {frame.body!r}"
        for text in frame.float_texts:
            shortest = repr(float(text))
            assert significant_digits(text) == significant_digits(shortest), (
                f"{operation}({a}, {b}) wrote {text}; the shortest round trip is {shortest}"
            )


def test_cancel_answers_the_original_request(worker: WireWorker) -> None:
    running = worker.send("sleep", {"seconds": 30})
    time.sleep(0.2)
    worker.cancel(running)
    answer = worker.receive(timeout=5)
    assert answer.id == running, f"answered id {answer.id!r}, not the cancelled {running}"
    assert answer.data["success"] is False and answer.data["error"] == "cancelled", answer.data
    assert set(answer.data) <= FAILURE_KEYS, answer.data
    assert worker.silent_for(0.3), "the $cancel frame itself got an answer"
    assert worker.result("ping", {})["status"] == "ok"


@in_loop
async def test_large_echo(pool: Pool) -> None:
    args = {"blob": "x" * (2 * 1024 * 1024) + "é漢🐍", "list": list(range(10_000))}
    assert await pool.execute("echo", args) == {"echoed": args}
