"""Damage to shared-memory transfers: no segment outlives what it was for.

Workers of every bundled runtime are SIGKILLed in the middle of big transfers, and 1,000 big
echoes are cancelled at random moments; afterwards the run's directory holds nothing but its
``.run`` file, the pool serves, and every caller got its answer or a clear error. (A parent
killed mid-transfer: tests/test_shm.py, whose watchdog removes the whole directory.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal

import pytest
from damage_helpers import report

from snakepit_core import Pool
from snakepit_core.errors import SnakepitError, WorkerTimeout
from snakepit_core.shm import RUN_FILE, get_shared_memory

from conftest import eventually

THRESHOLD = 64 * 1024


def uses_shared_memory(pool: Pool) -> bool:
    return all("shm" in worker.capabilities for worker in pool.workers.values())


def leftovers() -> set[str]:
    shared = get_shared_memory()
    assert shared is not None, "shared memory is unavailable on this machine"
    return set(os.listdir(shared.directory)) - {RUN_FILE}


@pytest.mark.parametrize("runtime", ["python", "node", "ruby"])
async def test_workers_killed_mid_transfer_leave_no_segment(runtime: str, capsys) -> None:
    """Three callers echo 8 MiB values until six busy workers have been SIGKILLed."""
    value = os.urandom(8 << 20)
    rng = random.Random(16)
    crashed = answered = kills = 0
    killing = True
    async with Pool(
        runtime, pool_size=2, worker_concurrency=4, shm_threshold_bytes=THRESHOLD
    ) as pool:
        assert uses_shared_memory(pool)

        async def caller() -> None:
            nonlocal crashed, answered
            while killing:
                try:
                    answer = await pool.execute("echo", {"v": value}, timeout=60)
                except SnakepitError as exc:
                    assert "died during 'echo'" in exc.message or "is being replaced" in exc.message
                    crashed += 1
                else:
                    assert answer == {"echoed": {"v": value}}
                    answered += 1

        async def killer() -> None:
            nonlocal kills, killing
            give_up = asyncio.get_running_loop().time() + 60
            while kills < 6 and asyncio.get_running_loop().time() < give_up:
                await asyncio.sleep(rng.uniform(0.005, 0.05))
                busy = [w for w in pool.workers.values() if w.busy and w.alive]
                if busy:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rng.choice(busy).pid, signal.SIGKILL)
                        kills += 1
            killing = False

        await asyncio.gather(caller(), caller(), caller(), killer())
        await eventually(lambda: pool.stats()["available"] == 2, 30)
        assert await pool.execute("echo", {"v": value}) == {"echoed": {"v": value}}
    await eventually(lambda: not leftovers(), 10, message=lambda: f"left: {leftovers()}")
    assert kills == 6 and crashed >= 1, (kills, crashed, answered)
    report(capsys, f"kill mid-transfer {runtime}", kills=kills, answered=answered, crashed=crashed)


async def test_a_thousand_big_transfers_cancelled_at_random_leave_no_segment(capsys) -> None:
    rng = random.Random(1000)
    values = [os.urandom(rng.randrange(THRESHOLD, 1 << 20)) for _ in range(8)]
    outcomes = {"answered": 0, "cancelled": 0, "timed out": 0}
    options = {"pool_size": 2, "worker_concurrency": 8, "shm_threshold_bytes": THRESHOLD}
    async with Pool("python", **options) as pool:  # type: ignore[arg-type]
        assert uses_shared_memory(pool)

        async def one(index: int) -> None:
            value = values[index % len(values)]
            call = asyncio.ensure_future(
                pool.execute("echo", {"v": value, "text": "é" * (40000 + index)}, timeout=30)
            )
            fate = rng.random()
            if fate < 0.3:
                await asyncio.sleep(rng.uniform(0, 0.01))
                call.cancel()
            try:
                answer = await call
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1
            except WorkerTimeout:
                outcomes["timed out"] += 1
            else:
                assert answer == {"echoed": {"v": value, "text": "é" * (40000 + index)}}
                outcomes["answered"] += 1

        gate = asyncio.Semaphore(24)

        async def gated(index: int) -> None:
            async with gate:
                await one(index)

        await asyncio.gather(*(gated(i) for i in range(1000)))
        await eventually(lambda: pool.stats()["available"] == 2, 30)
        await eventually(lambda: not leftovers(), 10, message=lambda: f"left: {leftovers()}")
        assert await pool.execute("echo", {"v": values[0]}) == {"echoed": {"v": values[0]}}
    assert sum(outcomes.values()) == 1000
    assert outcomes["answered"] >= 500 and outcomes["cancelled"] >= 100, outcomes
    report(capsys, "1000 big transfers, random cancels", **outcomes)
