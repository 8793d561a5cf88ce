"""The foundation's user flows on real Python workers: execute, concurrency, queueing, stats."""

from __future__ import annotations

import asyncio
import time

import pytest

from snakepit_core import Pool, PoolConfig
from snakepit_core.errors import (
    CommandError,
    PoolSaturated,
    PoolStopped,
    QueueTimeout,
    ValidationError,
)


async def test_execute_the_seeds_commands():
    async with Pool("python", pool_size=4) as pool:
        r = await pool.execute("compute", {"operation": "add", "a": 5, "b": 3})
        assert r == {"operation": "add", "inputs": {"a": 5, "b": 3}, "result": 8}
        assert (await pool.execute("echo", {"message": "hi"}))["echoed"]["message"] == "hi"
        info = await pool.execute("info", {})
        assert info["runtime"] == "python" and info["pid"] > 0
        ping = await pool.execute("ping", {})
        assert ping["status"] == "ok" and ping["worker_id"].startswith("python-")
        assert {"uptime", "requests_handled"} <= set(ping)


async def test_a_thousand_concurrent_callers():
    async with Pool("python", pool_size=4) as pool:
        results = await asyncio.gather(*(pool.execute("ping", {}) for _ in range(1000)))
        assert len(results) == 1000 and all(r["status"] == "ok" for r in results)
        served_by = {r["worker_id"] for r in results}
        assert len(served_by) == 4
        stats = pool.stats()
        assert stats["workers"] == 4 and stats["available"] == 4 and stats["busy"] == 0
        assert stats["requests"] == 1000 and stats["errors"] == 0 and stats["queued"] == 0
        for key in ("queue_timeouts", "pool_saturated", "latency_p50", "latency_p99"):
            assert key in stats


async def test_division_by_zero_is_a_command_error_and_costs_no_restart():
    async with Pool("python", pool_size=1) as pool:
        with pytest.raises(CommandError, match="division by zero"):
            await pool.execute("compute", {"operation": "divide", "a": 1, "b": 0})
        assert pool.stats()["restarts"] == 0 and pool.stats()["errors"] == 1


async def test_saturation_and_queue_timeout():
    async with Pool("python", pool_size=1, pool_max_queue_size=1, pool_queue_timeout=0.3) as pool:
        busy = asyncio.ensure_future(pool.execute("sleep", {"seconds": 1.0}))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(pool.execute("ping", {}))
        await asyncio.sleep(0.05)
        assert pool.stats()["queued"] == 1
        with pytest.raises(PoolSaturated) as saturated:
            await pool.execute("ping", {})
        assert saturated.value.code == "pool_saturated"
        started = time.monotonic()
        with pytest.raises(QueueTimeout) as timed_out:
            await queued
        assert timed_out.value.code == "queue_timeout"
        assert time.monotonic() - started < 1.0
        assert pool.stats()["queued"] == 0  # the entry really left the queue
        assert (await busy) == {"slept": 1.0}
        stats = pool.stats()
        assert stats["pool_saturated"] == 1 and stats["queue_timeouts"] == 1


async def test_a_cancelled_waiter_leaves_the_queue():
    async with Pool("python", pool_size=1) as pool:
        busy = asyncio.ensure_future(pool.execute("sleep", {"seconds": 0.5}))
        await asyncio.sleep(0.05)
        waiter = asyncio.ensure_future(pool.execute("ping", {}))
        await asyncio.sleep(0.05)
        assert pool.stats()["queued"] == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pool.stats()["queued"] == 0
        await busy
        assert (await pool.execute("ping", {}))["status"] == "ok"


async def test_fifo_order_of_waiters():
    async with Pool("python", pool_size=1) as pool:
        order: list[int] = []

        async def call(i: int) -> None:
            await pool.execute("echo", {"i": i})
            order.append(i)

        blocker = asyncio.ensure_future(pool.execute("sleep", {"seconds": 0.2}))
        await asyncio.sleep(0.05)
        tasks = []
        for i in range(20):
            tasks.append(asyncio.ensure_future(call(i)))
            await asyncio.sleep(0)
        await asyncio.gather(blocker, *tasks)
        assert order == list(range(20))


async def test_validation_refuses_bad_arguments_before_dispatch():
    async with Pool("python", pool_size=1) as pool:
        with pytest.raises(ValidationError, match=r"args\.b is required"):
            await pool.execute("compute", {"operation": "add", "a": 1})
        with pytest.raises(ValidationError, match="must be an object"):
            await pool.execute("echo", ["not", "a", "dict"])  # type: ignore[arg-type]
        stats = pool.stats()
        # Counted as failed requests, never sent: the worker served nothing.
        assert stats["requests"] == 2 and stats["errors"] == 2
        assert [w["requests"] for w in stats["per_worker"].values()] == [1]  # the handshake


async def test_several_pools_of_different_adapters_in_one_process():
    async with Pool("python", pool_size=1) as py, Pool("node", pool_size=1) as js:
        a, b = await asyncio.gather(
            py.execute("compute", {"operation": "add", "a": 1, "b": 2}),
            js.execute("compute", {"operation": "add", "a": 3, "b": 4}),
        )
        assert (a["result"], b["result"]) == (3, 7)


async def test_config_object_and_keyword_overrides():
    config = PoolConfig(pool_size=3, pool_queue_timeout=2.5)
    pool = Pool("python", config=config, pool_size=2)
    assert pool.config.pool_size == 2 and pool.config.pool_queue_timeout == 2.5


async def test_stopped_pool_refuses_calls_and_stop_is_idempotent():
    pool = Pool("python", pool_size=2)
    with pytest.raises(PoolStopped, match="not started"):
        await pool.execute("ping", {})
    await pool.start()
    pids = [w.pid for w in pool.workers.values()]
    await asyncio.gather(pool.stop(), pool.stop())
    await pool.stop()
    with pytest.raises(PoolStopped) as info:
        await pool.execute("ping", {})
    assert info.value.code == "pool_stopped"
    for pid in pids:
        assert not _alive(pid)


async def test_runtime_reconfiguration_by_stop_and_start():
    async with Pool("python", pool_size=1) as small:
        assert small.stats()["workers"] == 1
    async with Pool("python", config=small.config.replace(pool_size=3)) as bigger:
        assert bigger.stats()["workers"] == 3


def _alive(pid: int | None) -> bool:
    import os

    try:
        os.kill(pid, 0)  # type: ignore[arg-type]
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1][0] != "Z"
