"""Damage to streams, on every bundled runtime: workers SIGKILLed with streams open, and
hundreds of streams abandoned at random points (issue 15)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import signal
from collections import Counter

import pytest
from damage_helpers import report

from snakepit_core import Pool
from snakepit_core.errors import WorkerCrashed

from conftest import eventually

ADAPTERS = ["python", "node", "ruby"]


def items_of(count: int) -> list[dict[str, int]]:
    return [{"i": i} for i in range(count)]


async def whole(pool: Pool) -> None:
    """Full size, every slot free, and every worker serves a stream and a call."""

    def settled() -> bool:
        stats = pool.stats()
        return (
            stats["workers"] == pool.config.pool_size
            and stats["in_flight"] == 0
            and stats["queued"] == 0
            and stats["available"] == pool.config.pool_size
        )

    await eventually(settled, within=30, message=lambda: f"not whole: {pool.stats()}")
    for worker in list(pool.workers.values()):
        assert worker.in_flight == 0 and worker.alive, worker
    streams = [pool.execute_stream("stream", {"count": 5}) for _ in range(pool.config.pool_size)]
    for stream in streams:
        assert [item async for item in stream] == items_of(5)
    assert await pool.execute("echo", {"ok": True}) == {"echoed": {"ok": True}}


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_sigkill_chaos_with_streams_open(adapter, capsys):
    """Workers are SIGKILLed while 24 consumers read streams: each stream delivers its items in
    order and then either ends complete or fails with WorkerCrashed; the pool refills."""
    outcomes: Counter[str] = Counter()
    chaos = True
    kills = 0
    async with Pool(
        adapter, pool_size=3, worker_concurrency=8, stream_window=8, pool_queue_timeout=60
    ) as pool:

        async def consumer() -> None:
            while chaos:
                received = []
                try:
                    async for item in pool.execute_stream(
                        "stream", {"count": 200, "delay": 0.001}, timeout=60
                    ):
                        received.append(item)
                except WorkerCrashed as crash:
                    assert "SIGKILL" in str(crash), crash
                    outcomes["crashed"] += 1
                    assert received == items_of(len(received)), "items out of order"
                else:
                    assert received == items_of(200)
                    outcomes["complete"] += 1

        async def killer() -> None:
            nonlocal kills
            for _ in range(12):
                await asyncio.sleep(0.15)
                busy = [w for w in pool.workers.values() if w.busy and w.alive]
                if busy:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(random.choice(busy).pid, signal.SIGKILL)
                        kills += 1

        consumers = [asyncio.ensure_future(consumer()) for _ in range(24)]
        await killer()
        chaos = False
        await asyncio.wait_for(asyncio.gather(*consumers), 120)
        report(
            capsys,
            f"stream_chaos[{adapter}]",
            kills=kills,
            restarts=pool.stats()["restarts"],
            **outcomes,
        )
        assert kills >= 6 and outcomes["crashed"] >= 1 and outcomes["complete"] >= 1, outcomes
        assert not pool.stats()["breaker_open"]
        await whole(pool)


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_500_streams_abandoned_at_random_points(adapter, capsys):
    """500 streams (40 at a time), each stopped after a random number of items by break,
    aclose(), leaving ``async with``, cancelling its task or dropping it: no consumer fails,
    every slot comes back and every worker serves. (A worker that takes longer than
    ``cancel_grace_period`` to let go of a cancelled stream, as a Python worker sometimes does
    on a machine whose CPUs are all busy, is retired and replaced, as designed: the figures
    show how many were.)"""
    ways: Counter[str] = Counter()
    rng = random.Random(15)
    async with Pool(adapter, pool_size=2, worker_concurrency=16, stream_window=4) as pool:

        async def abandon(index: int) -> None:
            stop_after = rng.randrange(0, 12)
            way = rng.choice(["break", "aclose", "async with", "cancel", "drop"])
            ways[way] += 1
            args = {"count": 10_000, "delay": rng.choice([0, 0.001])}
            if way == "cancel":

                async def read_forever() -> None:
                    async for _ in pool.execute_stream("stream", args):
                        pass

                task = asyncio.ensure_future(read_forever())
                await asyncio.sleep(rng.uniform(0, 0.02))
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return
            stream = pool.execute_stream("stream", args)
            if way == "async with":
                async with stream as items:
                    async for item in items:
                        if item["i"] >= stop_after:
                            break
                return
            taken = 0
            async for _ in stream:
                taken += 1
                if taken > stop_after:
                    break
            if way == "aclose":
                await stream.aclose()
            elif way == "drop":
                del stream
                gc.collect()
            # "break": the stream is dropped when this coroutine ends

        for batch in range(0, 500, 40):
            await asyncio.gather(*(abandon(i) for i in range(batch, min(batch + 40, 500))))
        await whole(pool)
        stats = pool.stats()
        report(
            capsys,
            f"streams_abandoned[{adapter}]",
            streams=stats["streams"],
            restarts=stats["restarts"],
            **ways,
        )
        assert stats["streams"] >= 500
        assert stats["restarts"] <= 25, "more than one worker in twenty cancels was retired"
