"""Protocol 2 on the pool side: many requests in flight per worker, matched by id, dispatched by
free slots, with cancellation that retires a worker instead of failing a bystander. The bridge is
a third-party-style protocol-2 script (tests/bridges/concurrent_v2.py)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import pytest

from snakepit_core import Pool, ScriptAdapter
from snakepit_core.errors import WorkerCrashed, WorkerTimeout

from conftest import BRIDGES, eventually


def v2(max_concurrency: int = 64) -> ScriptAdapter:
    return ScriptAdapter(
        f"v2-{max_concurrency}",
        sys.executable,
        BRIDGES / "concurrent_v2.py",
        args=[str(max_concurrency)],
    )


async def test_the_handshake_settles_on_the_smaller_concurrency_and_warns_once(caplog):
    caplog.set_level(logging.WARNING, logger="snakepit.worker")
    async with Pool(v2(4), pool_size=2, worker_concurrency=8) as pool:
        assert [(w.protocol, w.capacity) for w in pool.workers.values()] == [(2, 4), (2, 4)]
    warnings = [r for r in caplog.records if "take 4 requests at once" in r.getMessage()]
    assert len(warnings) == 1


async def test_a_protocol_1_bridge_gets_one_request_at_a_time(misbehaving):
    async with Pool(misbehaving(), pool_size=1, worker_concurrency=8) as pool:
        worker = next(iter(pool.workers.values()))
        assert (worker.protocol, worker.capacity) == (1, 1)
        results = await asyncio.gather(*(pool.execute("echo", {"n": n}) for n in range(20)))
        assert results == [{"n": n} for n in range(20)]


async def test_requests_run_at_once_and_answers_are_matched_by_id():
    async with Pool(v2(), pool_size=1, worker_concurrency=8) as pool:
        started = time.monotonic()
        seconds = [0.8, 0.1, 0.6, 0.2, 0.7, 0.3, 0.5, 0.4]
        calls = [pool.execute("sleep", {"seconds": s}, timeout=20) for s in seconds]
        results = await asyncio.gather(*calls)
        assert [r["slept"] for r in results] == seconds
        assert time.monotonic() - started < 4, "the requests did not run at once"
        # The time budget travels in meta.deadline_ms.
        assert all(19_000 <= r["deadline_ms"] <= 20_000 for r in results)


async def test_stats_count_slots_and_dispatch_goes_to_the_least_loaded_worker():
    async with Pool(v2(), pool_size=2, worker_concurrency=4) as pool:
        calls = [
            asyncio.ensure_future(pool.execute("sleep", {"seconds": 1.0}, timeout=20))
            for _ in range(4)
        ]
        await eventually(lambda: pool.stats()["in_flight"] == 4, message=pool.stats)
        stats = pool.stats()
        assert [w["in_flight"] for w in stats["per_worker"].values()] == [2, 2]
        assert stats["busy"] == 2 and stats["available"] == 2 and stats["queued"] == 0
        more = [
            asyncio.ensure_future(pool.execute("sleep", {"seconds": 1.0}, timeout=20))
            for _ in range(5)
        ]
        await eventually(lambda: pool.stats()["queued"] == 1, message=pool.stats)
        assert pool.stats()["available"] == 0 and pool.stats()["in_flight"] == 8
        await asyncio.gather(*calls, *more)
        stats = pool.stats()
        assert (stats["in_flight"], stats["busy"], stats["available"]) == (0, 0, 2)


async def test_a_worker_dying_with_requests_in_flight_fails_all_of_them_at_once():
    async with Pool(v2(), pool_size=1, worker_concurrency=8) as pool:
        calls = [
            asyncio.ensure_future(pool.execute("sleep", {"seconds": 30}, timeout=60))
            for _ in range(7)
        ]
        await eventually(lambda: pool.stats()["in_flight"] == 7)
        started = time.monotonic()
        with pytest.raises(WorkerCrashed):
            await pool.execute("die", {})
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, WorkerCrashed) for r in results), results
        assert time.monotonic() - started < 5
        await eventually(lambda: pool.stats()["available"] == 1, message=pool.stats)
        assert await pool.execute("echo", {"after": 1}) == {"after": 1}


async def test_a_cancelled_request_frees_its_slot_and_touches_no_other():
    async with Pool(v2(), pool_size=1, worker_concurrency=4) as pool:
        others = [
            asyncio.ensure_future(pool.execute("sleep", {"seconds": 0.5}, timeout=20))
            for _ in range(3)
        ]
        victim = asyncio.ensure_future(pool.execute("sleep", {"seconds": 30}, timeout=60))
        await eventually(lambda: pool.stats()["in_flight"] == 4)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        assert [r["slept"] for r in await asyncio.gather(*others)] == [0.5] * 3
        await eventually(lambda: pool.stats()["in_flight"] == 0, message=pool.stats)
        worker = next(iter(pool.workers.values()))
        assert not worker.retiring and pool.stats()["restarts"] == 0


async def test_a_request_the_bridge_cannot_stop_retires_the_worker_but_fails_no_bystander():
    async with Pool(v2(), pool_size=1, worker_concurrency=4, cancel_grace_period=0.2) as pool:
        first = next(iter(pool.workers.values()))
        bystanders = [
            asyncio.ensure_future(pool.execute("sleep", {"seconds": 1.0}, timeout=20))
            for _ in range(3)
        ]
        started = time.monotonic()
        with pytest.raises(WorkerTimeout):
            await pool.execute("stubborn", {"seconds": 3}, timeout=0.2)
        assert time.monotonic() - started < 1.5, "the caller did not fail at once"
        await eventually(lambda: first.retiring, message=pool.stats)
        assert [r["slept"] for r in await asyncio.gather(*bystanders)] == [1.0] * 3
        # Only the stuck request is left: the worker leaves and is replaced.
        await eventually(lambda: first.id not in pool.workers, within=10)
        await eventually(lambda: pool.stats()["available"] == 1, within=10, message=pool.stats)
        assert await pool.execute("echo", {"after": 1}) == {"after": 1}


async def test_recycling_drains_the_requests_in_flight_before_the_worker_leaves():
    async with Pool(v2(), pool_size=1, worker_concurrency=4, max_requests_per_worker=2) as pool:
        first = next(iter(pool.workers.values()))
        long_ones = [
            asyncio.ensure_future(pool.execute("sleep", {"seconds": 1.0}, timeout=20))
            for _ in range(2)
        ]
        await pool.execute("echo", {"n": 1})
        await pool.execute("echo", {"n": 2})  # due now: a replacement starts
        await eventually(lambda: len(pool.workers) == 2 and first.retiring, message=pool.stats)
        assert [r["slept"] for r in await asyncio.gather(*long_ones)] == [1.0, 1.0]
        await eventually(lambda: first.id not in pool.workers, within=10)
        assert first.exit_reason == "recycled"
