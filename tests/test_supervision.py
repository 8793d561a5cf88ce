"""Supervision: restarts, the crash-loop breaker, health checks, recycling, stop, cancellation.

Behaviour that a bundled bridge takes part in runs on every installed adapter."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import ClassVar

import pytest

from snakepit_core import Pool, ScriptAdapter
from snakepit_core.errors import AdapterUnavailable, PoolStopped, WorkerCrashed

from conftest import BRIDGES, eventually, pids_of_run

ADAPTERS = ["python", "node", "ruby"]


def full(pool: Pool, size: int):
    return lambda: len(pool.workers) == size and pool.stats()["available"] == size


def replaced(pool: Pool, size: int, restarts: int):
    """``full`` and at least ``restarts`` restarts counted: a test that asserts the counter
    waits for the counter, not only for the state that comes with it."""
    return lambda: full(pool, size)() and pool.stats()["restarts"] >= restarts


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_killed_serving_worker_is_replaced_at_once(adapter):
    async with Pool(adapter, pool_size=2) as pool:
        await pool.execute("ping", {})
        victim = next(iter(pool.workers.values()))
        os.kill(victim.pid, signal.SIGKILL)
        await eventually(lambda: victim.id not in pool.workers, message="death not noticed")
        await eventually(replaced(pool, 2, 1), message=lambda: f"not replaced: {pool.stats()}")
        assert pool.stats()["restarts"] == 1 and not pool.stats()["breaker_open"]
        assert (await pool.execute("ping", {}))["status"] == "ok"


async def test_a_crash_loop_opens_the_breaker_within_seconds(misbehaving):
    started = time.monotonic()
    async with Pool(
        misbehaving("crash_on_request"),
        pool_size=2,
        crash_loop_threshold=3,
        restart_backoff_initial=0.05,
        crash_loop_probe_interval=0.5,
    ) as pool:
        errors = []
        while time.monotonic() - started < 10:
            try:
                await pool.execute("echo", {}, timeout=5)
            except WorkerCrashed as exc:
                errors.append(exc)
            except AdapterUnavailable as exc:
                unavailable = exc
                break
        else:
            pytest.fail("the breaker never opened")
        assert time.monotonic() - started < 10
        assert unavailable.code == "adapter_unavailable"
        message = str(unavailable)
        assert "misbehave-crash_on_request" in message and "exit code 1" in message
        assert "has no attribute 'teleport'" in message
        assert pool.stats()["breaker_open"] is True
        with pytest.raises(AdapterUnavailable):  # fail fast, no waiting
            await asyncio.wait_for(pool.execute("echo", {}), 1)


async def test_the_breaker_closes_on_the_first_worker_that_serves(misbehaving, tmp_path):
    flag = tmp_path / "broken"
    async with Pool(
        misbehaving(f"fail_if_exists:{flag}"),
        pool_size=2,
        crash_loop_threshold=3,
        restart_backoff_initial=0.05,
        crash_loop_probe_interval=0.3,
    ) as pool:
        flag.touch()
        for worker in list(pool.workers.values()):
            os.kill(worker.pid, signal.SIGKILL)
        await eventually(lambda: pool.stats()["breaker_open"], within=10, message="never opened")
        with pytest.raises(AdapterUnavailable, match="flag file exists"):
            await pool.execute("echo", {})
        flag.unlink()

        async def serves():
            while True:
                try:
                    return await pool.execute("echo", {"back": 1})
                except AdapterUnavailable:
                    await asyncio.sleep(0.1)

        assert await asyncio.wait_for(serves(), 10) == {"back": 1}
        await eventually(lambda: not pool.stats()["breaker_open"], within=5)
        await eventually(full(pool, 2), within=10)


async def test_external_kills_of_serving_workers_never_open_the_breaker(misbehaving):
    async with Pool(misbehaving(), pool_size=2, crash_loop_threshold=3) as pool:
        for kills in range(1, 11):
            await pool.execute("echo", {})
            worker = next(iter(pool.workers.values()))
            os.kill(worker.pid, signal.SIGKILL)
            await eventually(lambda w=worker: w.id not in pool.workers)
            await eventually(replaced(pool, 2, kills), message=lambda: str(pool.stats()))
        assert pool.stats()["breaker_open"] is False and pool.stats()["restarts"] == 10


async def test_unhealthy_workers_are_replaced_and_busy_ones_are_not_pinged(misbehaving):
    async with Pool(
        misbehaving("mute_pings"),
        pool_size=2,
        worker_health_check_interval=0.1,
        worker_health_check_misses=2,
    ) as pool:
        first = set(pool.workers)
        await eventually(
            lambda: not (first & set(pool.workers)),
            within=5,
            message="mute workers were not replaced",
        )
    async with Pool("python", pool_size=1, worker_health_check_interval=0.05) as pool:
        worker = next(iter(pool.workers.values()))
        call = asyncio.ensure_future(pool.execute("sleep", {"seconds": 0.5}))
        # A health ping may be in flight first; the sleep is sent when it is answered.
        await eventually(lambda: worker.commands_in_flight == ["sleep"])
        at_send, seen = worker.requests, time.monotonic()
        while time.monotonic() - seen < 0.25:  # five health intervals, all within the sleep
            assert worker.requests == at_send, "a health ping was sent to a busy worker"
            await asyncio.sleep(0.01)
        assert (await call)["slept"] == 0.5
        await eventually(lambda: worker.requests > at_send, within=2, message="no ping")


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_recycling_by_request_count_keeps_capacity(adapter):
    size = 3
    async with Pool(adapter, pool_size=size, max_requests_per_worker=20) as pool:
        samples: list[tuple[int, int]] = []
        done = False

        async def sample() -> None:
            while not done:
                stats = pool.stats()
                samples.append((stats["available"], stats["busy"]))
                await asyncio.sleep(0.001)

        sampler = asyncio.ensure_future(sample())

        async def caller() -> None:
            for _ in range(100):
                await pool.execute("ping", {})
                await asyncio.sleep(0.002)

        await asyncio.gather(caller(), caller())
        done = True
        await sampler
        await eventually(lambda: pool.stats()["restarts"] >= 2, message=lambda: str(pool.stats()))
        worst = min(available - (size - busy) for available, busy in samples)
        assert worst >= 0, f"capacity dipped: {min(samples)}"
        await eventually(full(pool, size))


async def test_recycling_by_memory(misbehaving):
    async with Pool(misbehaving(), pool_size=1, max_worker_memory_mb=60) as pool:
        first = next(iter(pool.workers))
        await pool.execute("hog", {"mb": 100})
        await pool.execute("echo", {})
        await eventually(lambda: first not in pool.workers)
        await eventually(replaced(pool, 1, 1), message=lambda: str(pool.stats()))
        assert pool.stats()["restarts"] == 1


async def test_a_worker_that_cannot_cancel_is_killed_and_replaced(misbehaving):
    async with Pool(misbehaving(), pool_size=1) as pool:
        pid = next(iter(pool.workers.values())).pid
        call = asyncio.ensure_future(pool.execute("spin", {}))
        await asyncio.sleep(0.2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert (await pool.execute("echo", {"x": 1})) == {"x": 1}
        assert next(iter(pool.workers.values())).pid != pid


async def test_stop_lets_in_flight_calls_finish_and_refuses_new_ones():
    pool = Pool("python", pool_size=2)
    await pool.start()
    in_flight = asyncio.ensure_future(pool.execute("sleep", {"seconds": 0.3}))
    await asyncio.sleep(0.05)
    stopping = asyncio.ensure_future(pool.stop(grace=5))
    await asyncio.sleep(0.01)
    with pytest.raises(PoolStopped):
        await pool.execute("ping", {})
    assert (await in_flight) == {"slept": 0.3}
    await stopping


async def test_stop_kills_grandchildren_and_leaves_nothing(misbehaving):
    from snakepit_core.runinfo import RUN_ID

    pool = Pool(misbehaving(), pool_size=2)
    await pool.start()
    grandchild = (await pool.execute("grandchild", {}))["pid"]
    await pool.stop(grace=0.2)
    await asyncio.sleep(0.05)
    assert not os.path.exists(f"/proc/{grandchild}") or _zombie(grandchild)
    assert not [p for p in pids_of_run(RUN_ID) if not _zombie(p)]


async def test_stop_escalates_to_sigkill_for_a_worker_that_ignores_eof(misbehaving):
    pool = Pool(misbehaving(), pool_size=1, worker_shutdown_grace_period=0.2)
    await pool.start()
    worker = next(iter(pool.workers.values()))
    spinning = asyncio.ensure_future(pool.execute("spin", {}, timeout=60))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await pool.stop()
    assert time.monotonic() - started < 3
    assert worker.exit_code in (-signal.SIGTERM, -signal.SIGKILL)
    with pytest.raises(WorkerCrashed):
        await spinning


def test_per_worker_statistics():
    from snakepit_core import SyncPool

    with SyncPool("python", pool_size=2) as pool:
        for _ in range(10):
            pool.execute("ping", {})
        per_worker = pool.stats()["per_worker"]
        assert len(per_worker) == 2
        for figures in per_worker.values():
            assert {"pid", "requests", "errors", "restarts", "uptime"} <= set(figures)
        assert sum(f["requests"] for f in per_worker.values()) == 12  # + 2 handshakes


LEFT_OPEN = textwrap.dedent(
    """
    import asyncio, os, sys
    from snakepit_core import Pool, SyncPool
    sync_pool = SyncPool("python", pool_size=1).start()
    print(sync_pool.execute("info", {})["pid"], flush=True)
    async def main():
        pool = Pool("python", pool_size=1)
        await pool.start()
        print((await pool.execute("info", {}))["pid"], flush=True)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(main())
    # exit without stopping either pool
    """
)


def test_pools_left_open_are_stopped_at_interpreter_exit_with_a_warning():
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", LEFT_OPEN],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    pids = [int(line) for line in done.stdout.split()]
    assert len(pids) == 2
    assert done.stderr.count("still running at interpreter exit") == 2
    time.sleep(0.2)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


SIGNAL_STOP = textwrap.dedent(
    """
    import os, signal, sys
    from snakepit_core import SyncPool
    pool = SyncPool("python", pool_size=2).start()
    print(pool.execute("info", {})["pid"], flush=True)
    def on_term(signum, frame):
        pool.stop()
        print("stopped", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    os.kill(os.getpid(), signal.SIGTERM)
    """
)


def test_stop_is_safe_from_a_signal_handler():
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_STOP], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    pid_line, status = done.stdout.split()
    assert status == "stopped"
    assert not os.path.exists(f"/proc/{pid_line}") or _zombie(int(pid_line))


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class _BuggyEnvAdapter(ScriptAdapter):
    """An adapter whose ``worker_env`` has a bug on its second and third call only."""

    calls: ClassVar[list[int]] = []

    def worker_env(self, extra):
        self.calls.append(1)
        if len(self.calls) in (2, 3):
            raise RuntimeError("bug in worker_env")
        return super().worker_env(extra)


async def test_a_bug_in_the_refill_is_logged_shown_in_stats_and_healing_goes_on(caplog):
    adapter = _BuggyEnvAdapter(
        "buggy-env", sys.executable, BRIDGES / "misbehave.py", args=["normal"]
    )
    async with Pool(adapter, pool_size=1, restart_backoff_max=0.2) as pool:
        os.kill(next(iter(pool.workers.values())).pid, signal.SIGKILL)
        await eventually(lambda: pool.stats()["background_error"] is not None, within=10)
        assert "bug in worker_env" in pool.stats()["background_error"]
        await eventually(lambda: pool.stats()["available"] == 1, within=15, message=pool.stats)
        assert await pool.execute("echo", {"healed": True}) == {"healed": True}
    assert any("refill failed" in r.getMessage() for r in caplog.records)
