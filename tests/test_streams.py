"""Streaming on the host side: ``execute_stream`` against a third-party bridge written from
PROTOCOL.md (tests/bridges/stream_v2.py) and against workers that cannot stream."""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from pathlib import Path

import pytest

from snakepit_core import Pool
from snakepit_core.adapter import ScriptAdapter
from snakepit_core.errors import CommandError, ProtocolError, ValidationError, WorkerTimeout

STREAM_BRIDGE = Path(__file__).parent / "bridges" / "stream_v2.py"


def stream_adapter() -> ScriptAdapter:
    return ScriptAdapter("stream-v2", sys.executable, STREAM_BRIDGE)


def idle(pool: Pool) -> None:
    stats = pool.stats()
    assert stats["in_flight"] == 0 and stats["busy"] == 0 and stats["queued"] == 0, stats
    assert stats["available"] == stats["workers"] == pool.config.pool_size, stats


async def eventually_idle(pool: Pool, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            idle(pool)
            return
        except AssertionError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.01)


@pytest.fixture
async def pool():
    async with Pool(stream_adapter(), pool_size=1, worker_concurrency=8, stream_window=4) as pool:
        yield pool


async def test_items_come_in_order_and_a_final_result_is_the_last_item(pool):
    items = [item async for item in pool.execute_stream("count", {"n": 10})]
    assert items == [{"i": i} for i in range(10)] + [{"done": 10}]
    ended = [i async for i in pool.execute_stream("count", {"n": 3, "plain_end": True})]
    assert ended == [{"i": 0}, {"i": 1}, {"i": 2}]
    stats = pool.stats()
    assert stats["streams"] == 2 and stats["stream_items"] == 14
    idle(pool)


async def test_a_long_stream_moves_far_past_its_window(pool):
    count = 0
    async with pool.execute_stream("count", {"n": 5000, "plain_end": True}) as items:
        async for item in items:
            assert item == {"i": count}
            count += 1
    assert count == 5000
    idle(pool)


async def test_an_error_mid_stream_comes_after_the_items_sent(pool):
    received = []
    with pytest.raises(CommandError, match="failed at item 3") as raised:
        async for item in pool.execute_stream("count", {"n": 10, "fail_at": 3}):
            received.append(item)
    assert received == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert raised.value.code == "command_error"
    idle(pool)


@pytest.mark.parametrize("how", ["break", "aclose", "async with", "cancelled task", "dropped"])
async def test_stopping_early_cancels_the_producer_and_frees_the_slot(pool, how):
    if how == "break":

        async def consume_some() -> None:
            async for item in pool.execute_stream("count", {"n": 1_000_000}):
                if item["i"] == 5:
                    break  # the stream is dropped as the loop ends

        await consume_some()
    stream = pool.execute_stream("count", {"n": 1_000_000})
    if how == "break":
        pass
    elif how == "aclose":
        assert await anext(stream) == {"i": 0}
        await stream.aclose()
    elif how == "async with":
        async with stream as items:
            async for item in items:
                if item["i"] == 5:
                    break
    elif how == "cancelled task":

        async def consume() -> None:
            async for _ in pool.execute_stream("count", {"n": 1_000_000}):
                await asyncio.sleep(0)

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        assert await anext(stream) == {"i": 0}
        del stream
        gc.collect()
    await eventually_idle(pool)
    assert pool.stats()["restarts"] == 0
    # The worker serves on, streams included.
    assert [i async for i in pool.execute_stream("count", {"n": 2})] == [
        {"i": 0},
        {"i": 1},
        {"done": 2},
    ]


async def test_nothing_is_sent_before_the_first_item_is_asked_for(pool):
    stream = pool.execute_stream("count", {"n": 3})
    await asyncio.sleep(0.05)
    assert pool.stats()["requests"] == 0
    assert await anext(stream) == {"i": 0}
    await stream.aclose()


async def test_streams_interleave_with_each_other_and_ordinary_calls(pool):
    async def collect(n: int) -> list:
        return [item async for item in pool.execute_stream("count", {"n": n})]

    results = await asyncio.gather(
        *(collect(n) for n in (50, 80, 20)), *(pool.execute("echo", {"k": k}) for k in range(5))
    )
    for n, items in zip((50, 80, 20), results[:3], strict=True):
        assert items == [{"i": i} for i in range(n)] + [{"done": n}]
    assert results[3:] == [{"k": k} for k in range(5)]
    idle(pool)


async def test_execute_on_a_streaming_handler_returns_the_list_of_its_items(pool):
    assert await pool.execute("count", {"n": 3}) == [{"i": 0}, {"i": 1}, {"i": 2}, {"done": 3}]


async def test_a_bridge_that_ignores_its_credit_is_a_protocol_error(pool):
    with pytest.raises(ProtocolError, match="more items than its window of 4"):
        async for _ in pool.execute_stream("flood", {"n": 50}):
            await asyncio.sleep(0.01)  # the bridge sends all 50 at once regardless


async def test_timeout_bounds_the_whole_stream_including_the_consumer(pool):
    received = 0
    with pytest.raises(WorkerTimeout):
        async for _ in pool.execute_stream("count", {"n": 1000}, timeout=0.3):
            received += 1
            await asyncio.sleep(0.05)  # a slow consumer: 1000 items would take 50 s
    assert 0 < received < 1000
    await eventually_idle(pool)


async def test_bad_arguments_fail_the_first_item_and_send_nothing(pool):
    stream = pool.execute_stream("count", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="args must be an object"):
        await anext(stream)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    idle(pool)


async def test_a_worker_that_cannot_stream_gives_its_result_as_the_one_item():
    async with Pool("python", pool_size=1, worker_concurrency=4) as pool:
        assert [i async for i in pool.execute_stream("echo", {"a": 1})] == [{"echoed": {"a": 1}}]
        sessions = pool.execute_stream_in_session("s1", "retrieve", {"key": "k"})
        assert [i async for i in sessions] == [
            {"found": False, "session_id": "s1", "key": "k", "value": None}
        ]
        idle(pool)


def test_the_blocking_twin_is_a_generator_and_closing_it_cancels_the_producer():
    from snakepit_core import SyncPool

    with SyncPool(stream_adapter(), pool_size=1, worker_concurrency=4, stream_window=4) as pool:
        assert list(pool.execute_stream("count", {"n": 3})) == [
            {"i": 0},
            {"i": 1},
            {"i": 2},
            {"done": 3},
        ]
        items = pool.execute_stream("count", {"n": 1_000_000})
        for item in items:
            if item["i"] == 10:
                break
        items.close()
        with pytest.raises(CommandError, match="failed at item 1"):
            list(pool.execute_stream("count", {"n": 5, "fail_at": 1}))
        session_items = pool.execute_stream_in_session("s", "count", {"n": 2})
        assert list(session_items) == [{"i": 0}, {"i": 1}, {"done": 2}]
        deadline = time.monotonic() + 10
        while pool.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = pool.stats()
        assert stats["in_flight"] == 0 and stats["available"] == 1, stats
        assert stats["streams"] == 4
