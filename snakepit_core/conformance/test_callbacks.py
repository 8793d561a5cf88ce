"""Callbacks (docs/PROTOCOL.md, *Callbacks*), for workers declaring ``callbacks``.

Bundled level, through the ``call_host`` command: a round trip; a host failure, an unknown
callback and a deadlock as the handler's ``CallbackError`` (the command fails with its code);
concurrent calls; a callback that calls the pool; the request's deadline and cancellation
reaching the callbacks in the host (and the worker letting go: no restart); binary values both
ways.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from snakepit_core.callbacks import CallbackContext
from snakepit_core.conformance.aio import PoolFactory, in_loop
from snakepit_core.conformance.levels import BUNDLED, level, needs_capability
from snakepit_core.conformance.polling import eventually
from snakepit_core.errors import CommandError, SnakepitTimeout
from snakepit_core.pool import Pool

F = TypeVar("F", bound=Callable[..., None])


def callback_case(test: F) -> F:
    """A bundled-level case, for workers that declare the ``callbacks`` capability."""
    for mark in (level(BUNDLED), needs_capability("callbacks")):
        test = mark(test)
    return test


def echo(args: dict[str, Any], ctx: CallbackContext) -> dict[str, Any]:
    return {"args": args, "command": ctx.command, "worker_id": ctx.worker_id}


@callback_case
@in_loop
async def test_a_callback_round_trip(pool: Pool) -> None:
    pool.register_callback("echo", echo)
    answer = await pool.execute("call_host", {"name": "echo", "args": {"x": [1, "two"]}})
    (result,) = answer["results"]
    assert result["args"] == {"x": [1, "two"]} and result["command"] == "call_host"
    assert result["worker_id"] in pool.workers
    sequential = await pool.execute("call_host", {"name": "echo", "times": 5})
    assert len(sequential["results"]) == 5


@callback_case
@in_loop
async def test_host_failures_reach_the_handler_as_callback_errors_with_their_code(
    pool: Pool,
) -> None:
    def boom(args: dict[str, Any], ctx: CallbackContext) -> Any:
        return args["missing"]

    pool.register_callback("boom", boom)
    with pytest.raises(CommandError) as failed:
        await pool.execute("call_host", {"name": "boom"})
    assert "call_host: callback_failed: callback 'boom' failed: KeyError" in failed.value.message
    with pytest.raises(CommandError) as unknown:
        await pool.execute("call_host", {"name": "nope"})
    assert "call_host: unknown_callback: unknown callback 'nope'" in unknown.value.message
    assert pool.stats()["restarts"] == 0


@callback_case
@in_loop
async def test_concurrent_callbacks_from_one_handler(pool: Pool) -> None:
    arrived = 0
    all_in = asyncio.Event()

    async def gather(args: dict[str, Any], ctx: CallbackContext) -> int:
        nonlocal arrived
        arrived += 1
        if arrived == 10:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 20)  # all ten are in the host at once
        return arrived

    pool.register_callback("gather", gather)
    answer = await pool.execute("call_host", {"name": "gather", "times": 10, "parallel": True})
    assert answer["results"] == [10] * 10


@callback_case
@in_loop
async def test_a_callback_may_call_the_pool(new_pool: PoolFactory) -> None:
    async with new_pool(pool_size=2) as pool:

        async def nested(args: dict[str, Any], ctx: CallbackContext) -> Any:
            return await ctx.pool.execute("echo", {"from": "callback"})

        pool.register_callback("nested", nested)
        answer = await pool.execute("call_host", {"name": "nested"})
        assert answer["results"] == [{"echoed": {"from": "callback"}}]


@callback_case
@in_loop
async def test_a_call_that_could_never_get_a_slot_fails_at_once(new_pool: PoolFactory) -> None:
    async with new_pool(pool_size=1, worker_concurrency=1) as pool:

        async def nested(args: dict[str, Any], ctx: CallbackContext) -> Any:
            return await ctx.pool.execute("echo", {})

        pool.register_callback("nested", nested)
        with pytest.raises(CommandError) as failed:
            await pool.execute("call_host", {"name": "nested"}, timeout=60)
        assert "call_host: callback_deadlock:" in failed.value.message


@callback_case
@in_loop
async def test_deadlines_and_cancellation_reach_the_callbacks(pool: Pool) -> None:
    cancelled: list[str] = []

    async def forever(args: dict[str, Any], ctx: CallbackContext) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(args["how"])
            raise

    pool.register_callback("forever", forever)
    with pytest.raises(SnakepitTimeout):
        await pool.execute("call_host", {"name": "forever", "args": {"how": "timeout"}}, timeout=1)
    task = asyncio.ensure_future(
        pool.execute("call_host", {"name": "forever", "args": {"how": "cancel"}})
    )
    await eventually(lambda: pool.stats()["callbacks"] == 2)
    task.cancel()
    await eventually(lambda: sorted(cancelled) == ["cancel", "timeout"])
    await eventually(lambda: pool.stats()["available"] == 2, 10)
    assert pool.stats()["restarts"] == 0  # the handlers let go of the cancelled requests


@callback_case
@in_loop
async def test_binary_values_travel_both_ways(pool: Pool) -> None:
    def blob(args: dict[str, Any], ctx: CallbackContext) -> dict[str, Any]:
        assert type(args["data"]) is bytes
        return {"data": args["data"] + b"\xff"}

    pool.register_callback("blob", blob)
    answer = await pool.execute("call_host", {"name": "blob", "args": {"data": b"\x00\x01"}})
    assert answer["results"] == [{"data": b"\x00\x01\xff"}]
