"""Streaming (docs/PROTOCOL.md, *Streaming* and *The stream command*).

* Protocol level (every adapter): ``execute_stream`` of a plain command (``ping``) gives its
  result as the one item, whether or not the worker can stream.
* Bundled level, for workers answering protocol 2 with the ``stream`` capability, through the
  bundled ``stream`` command: items in order; an item reaches the consumer while the producer
  waits (nothing is buffered until the end); an error mid-stream after the items sent; the
  final value as the last item; ``execute`` answers the list; stopping early (``break``,
  ``aclose()``) stops the producer; the producer never runs more than ``stream_window`` items
  ahead of a slow consumer; a timeout bounds the whole stream; streams in a session.

The producer's side is observed through files the ``stream`` command writes (``progress``) and
waits for (``wait_for``), so the checks hold on any runtime.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from snakepit_core.conformance.aio import PoolFactory, in_loop
from snakepit_core.conformance.levels import (
    BUNDLED,
    PROTOCOL,
    level,
    needs_capability,
    needs_protocol,
)
from snakepit_core.conformance.polling import eventually
from snakepit_core.errors import CommandError, WorkerTimeout
from snakepit_core.pool import Pool

WINDOW = 4
F = TypeVar("F", bound=Callable[..., None])


def streaming(test: F) -> F:
    """A bundled-level case, for workers answering protocol 2 with the ``stream`` capability."""
    for mark in (level(BUNDLED), needs_protocol(2), needs_capability("stream")):
        test = mark(test)
    return test


def items_of(count: int) -> list[dict[str, int]]:
    return [{"i": i} for i in range(count)]


def produced(progress: Path) -> int:
    """Items the producer has produced so far, as it wrote them into ``progress``."""
    try:
        return int(progress.read_text() or 0)
    except FileNotFoundError:
        return 0


async def idle(pool: Pool) -> None:
    """Every slot comes back once the worker has let go of what was stopped."""

    def free() -> bool:
        stats = pool.stats()
        return bool(stats["in_flight"] == 0 and stats["available"] == stats["workers"] > 0)

    await eventually(free, within=10, message=lambda: f"slots still taken: {pool.stats()}")


@pytest.fixture
def scratch() -> Any:
    with tempfile.TemporaryDirectory(prefix="snakepit-stream-") as directory:
        yield Path(directory)


# -- protocol level ------------------------------------------------------------------------------


@level(PROTOCOL)
@in_loop
async def test_a_plain_command_streams_its_result_as_the_one_item(pool: Pool) -> None:
    items = [item async for item in pool.execute_stream("ping", {})]
    assert len(items) == 1, items
    assert isinstance(items[0], dict) and items[0].get("status") == "ok", items
    assert pool.stats()["in_flight"] == 0


# -- bundled level: the stream command -----------------------------------------------------------


@streaming
@pytest.mark.parametrize("count", [0, 1, 300])
@in_loop
async def test_items_come_in_order(new_pool: PoolFactory, count: int) -> None:
    async with new_pool(pool_size=1, worker_concurrency=8, stream_window=WINDOW) as pool:
        assert [i async for i in pool.execute_stream("stream", {"count": count})] == items_of(count)
        assert await pool.execute("stream", {"count": 3}) == items_of(3)


@streaming
@in_loop
async def test_an_item_reaches_the_consumer_while_the_producer_waits(
    new_pool: PoolFactory, scratch: Path
) -> None:
    """The producer yields item 0, then waits for a file the test creates only once it has
    received item 0: a bridge that buffered items until the end would never let it."""
    gate = scratch / "gate"
    async with new_pool(pool_size=1, worker_concurrency=8) as pool:
        stream = pool.execute_stream("stream", {"count": 3, "wait_for": str(gate)}, timeout=30)
        assert await asyncio.wait_for(anext(stream), 20) == {"i": 0}
        second = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.3)
        assert not second.done(), "item 1 came before the gate opened"
        gate.touch()
        assert await asyncio.wait_for(second, 20) == {"i": 1}
        assert [i async for i in stream] == [{"i": 2}]


@streaming
@in_loop
async def test_an_error_mid_stream_comes_after_the_items_sent(new_pool: PoolFactory) -> None:
    async with new_pool(pool_size=1, worker_concurrency=8) as pool:
        received = []
        with pytest.raises(CommandError, match="stream: failed at item 3"):
            async for item in pool.execute_stream("stream", {"count": 10, "fail_at": 3}):
                received.append(item)
        assert received == items_of(3)
        await idle(pool)


@streaming
@in_loop
async def test_the_final_value_is_the_last_item_unless_null(new_pool: PoolFactory) -> None:
    async with new_pool(pool_size=1, worker_concurrency=8) as pool:
        final = {"total": 2, "nested": [1, "two"]}
        with_final = {"count": 2, "final": final}
        assert [i async for i in pool.execute_stream("stream", with_final)] == [
            *items_of(2),
            final,
        ]
        assert await pool.execute("stream", with_final) == [*items_of(2), final]
        no_final = {"count": 2, "final": None}
        assert [i async for i in pool.execute_stream("stream", no_final)] == items_of(2)


async def consume_some(stream: AsyncIterator[Any], count: int) -> None:
    async for item in stream:
        if item["i"] == count - 1:
            break


@streaming
@pytest.mark.parametrize("how", ["break", "aclose"])
@in_loop
async def test_stopping_early_stops_the_producer(
    new_pool: PoolFactory, scratch: Path, how: str
) -> None:
    progress = scratch / "progress"
    args = {"count": 100_000, "delay": 0.01, "progress": str(progress)}
    async with new_pool(pool_size=1, worker_concurrency=8, stream_window=WINDOW) as pool:
        if how == "break":
            await consume_some(pool.execute_stream("stream", args), 3)
        else:
            stream = pool.execute_stream("stream", args)
            for _ in range(3):
                await anext(stream)
            await stream.aclose()
        await idle(pool)
        stopped_at = produced(progress)
        await asyncio.sleep(0.3)
        assert produced(progress) == stopped_at, "the producer went on after the consumer left"
        assert stopped_at <= 3 + WINDOW + 1, stopped_at
        assert pool.stats()["restarts"] == 0
        assert await pool.execute("ping", {}) is not None


@streaming
@in_loop
async def test_the_producer_never_runs_more_than_the_window_ahead(
    new_pool: PoolFactory, scratch: Path
) -> None:
    progress = scratch / "progress"
    async with new_pool(pool_size=1, worker_concurrency=8, stream_window=WINDOW) as pool:
        taken = 0
        async for item in pool.execute_stream("stream", {"count": 30, "progress": str(progress)}):
            assert item == {"i": taken}
            taken += 1
            await asyncio.sleep(0.02)  # a slow consumer: the producer waits for it
            ahead = produced(progress) - taken
            assert ahead <= WINDOW, f"produced {taken + ahead} items when {taken} were taken"
        assert taken == 30


@streaming
@in_loop
async def test_a_timeout_bounds_the_whole_stream(new_pool: PoolFactory) -> None:
    async with new_pool(pool_size=1, worker_concurrency=8) as pool:
        received = 0
        with pytest.raises(WorkerTimeout):
            async for _ in pool.execute_stream("stream", {"count": 1000}, timeout=0.5):
                received += 1
                await asyncio.sleep(0.05)  # the consumer's time counts
        assert 0 < received < 1000
        await idle(pool)


@streaming
@in_loop
async def test_streams_in_a_session_stay_on_its_worker(new_pool: PoolFactory) -> None:
    async with new_pool(pool_size=2, worker_concurrency=8) as pool:
        await pool.execute_in_session("s", "store", {"key": "k", "value": os.getpid()})
        worker = (await pool.sessions.get_session("s")).last_worker_id
        for _ in range(3):
            stream = pool.execute_stream_in_session("s", "stream", {"count": 3}, affinity="strict")
            assert [i async for i in stream] == items_of(3)
            assert (await pool.sessions.get_session("s")).last_worker_id == worker
