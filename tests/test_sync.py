"""The synchronous facade: no event loop needed, many threads, inside a running loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

import snakepit_core as snakepit
from snakepit_core import SyncPool
from snakepit_core.errors import PoolStopped


def test_sync_pool_from_many_threads():
    with SyncPool("python", pool_size=2) as pool:
        assert pool.execute("echo", {"message": "hello"}, timeout=5)["echoed"]["message"] == "hello"
        with ThreadPoolExecutor(16) as threads:
            results = list(
                threads.map(
                    lambda i: pool.execute("compute", {"operation": "multiply", "a": i, "b": 2}),
                    range(200),
                )
            )
        assert [r["result"] for r in results] == [i * 2 for i in range(200)]
        assert pool.stats()["requests"] == 201


async def test_sync_pool_inside_a_running_event_loop():
    """Like a Jupyter cell: a loop is running in this thread and we call the blocking API."""
    assert asyncio.get_running_loop().is_running()
    with SyncPool("python", pool_size=1) as pool:
        assert pool.execute("ping", {})["status"] == "ok"


def test_module_level_facade_like_the_seed():
    snakepit.start(adapter="python", pool_size=2)
    try:
        assert snakepit.execute("ping", {})["status"] == "ok"
        assert snakepit.execute("compute", {"operation": "add", "a": 5, "b": 3})["result"] == 8
        assert snakepit.stats()["workers"] == 2
        snakepit.start(adapter="python", pool_size=1)  # reconfiguration: stop, then start
        assert snakepit.stats()["workers"] == 1
    finally:
        snakepit.stop()
    with pytest.raises(PoolStopped):
        snakepit.execute("ping", {})


def test_stopped_sync_pool_refuses_calls():
    pool = SyncPool("python", pool_size=1).start()
    pool.stop()
    pool.stop()
    with pytest.raises(PoolStopped):
        pool.execute("ping", {})
