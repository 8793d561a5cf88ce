"""start() cancelled or overtaken by stop(): nothing of the pool outlives either (RELIABILITY.md)."""

from __future__ import annotations

import asyncio

import pytest

from snakepit_core import Pool, SyncPool
from snakepit_core.errors import PoolStopped
from snakepit_core.runinfo import current_run_id

from conftest import pids_of_run


@pytest.mark.parametrize("adapter", ["python", "node", "ruby"])
async def test_start_cancelled_by_wait_for_stops_every_worker(adapter):
    pool = Pool(adapter, pool_size=4)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(pool.start(), 0.02)
    assert pool.stats()["state"] == "stopped"
    assert pool.workers == {}
    assert pids_of_run(current_run_id()) == []


async def test_start_cancelled_while_workers_never_answer_stops_them(misbehaving):
    pool = Pool(misbehaving("never_ready"), pool_size=2, worker_init_timeout=60)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(pool.start(), 0.5)
    assert pool.stats()["state"] == "stopped"
    assert pids_of_run(current_run_id()) == []


@pytest.mark.parametrize("delay", [0, 0.001, 0.01, 0.03, 0.1])
async def test_stop_during_the_first_start_leaves_no_process(delay):
    pool = Pool("python", pool_size=3)
    starting = asyncio.ensure_future(pool.start())
    await asyncio.sleep(delay)
    overtaken = not starting.done()
    await pool.stop()
    assert pids_of_run(current_run_id()) == [], "a worker outlived stop()"
    if overtaken:
        with pytest.raises(PoolStopped, match="stopped while it started"):
            await starting
    assert pool.stats()["state"] == "stopped"


def test_sync_pool_stats_after_stop_answers():
    pool = SyncPool("python", pool_size=1).start()
    pool.execute("ping", {})
    pool.stop()
    stats = pool.stats()
    assert stats["state"] == "stopped" and stats["requests"] == 1
