"""Session figures, the in-memory backend beside Redis (BENCHMARKS.md, "Sessions").

Starts its own ``redis-server`` on a free loopback port (no persistence), then measures:

1. Session operations per second, a create/get/update/delete mix, on each backend from one
   process, and on Redis from 2 and 4 client processes at once.
2. ``update_session`` throughput on one hot session from 1, 2 and 4 client processes at once
   (each with 32 concurrent updates), beside redis-server's own CPU time.
3. ``execute_in_session("echo")`` one at a time on one Python worker, each backend: calls per
   second and p50/p99, and what Redis adds to a call; the backends alternate, ``--rounds``
   times, and the medians are printed.

Usage: python benchmarks/sessions.py [--operations 4000] [--updates 2000] [--calls 2000]
[--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from snakepit_core import Pool, PoolConfig
from snakepit_core.sessions import SessionStore, new_session_store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_server import RedisServer

UPDATER = """
import asyncio, sys
from snakepit_core import PoolConfig
from snakepit_core.sessions import new_session_store

async def main():
    store = new_session_store(PoolConfig(
        session_backend="redis", redis_url=sys.argv[1], redis_key_prefix="bench:"))
    gate = asyncio.Semaphore(32)
    def add(session):
        session.metadata["n"] = session.metadata.get("n", 0) + 1
    async def one():
        async with gate:
            await store.update_session("hot", add)
    await asyncio.gather(*(one() for _ in range(int(sys.argv[2]))))

asyncio.run(main())
"""


MIXER = """
import asyncio, sys
from snakepit_core import PoolConfig
from snakepit_core.sessions import new_session_store

async def main():
    store = new_session_store(PoolConfig(
        session_backend="redis", redis_url=sys.argv[1], redis_key_prefix="bench:"))
    def touch(session):
        session.metadata["seen"] = True
    for i in range(int(sys.argv[2]) // 4):
        name = f"mix-{sys.argv[3]}-{i}"
        await store.create_session(name)
        await store.get_session(name)
        await store.update_session(name, touch)
        await store.delete_session(name)

asyncio.run(main())
"""


def store_for(backend: str, url: str) -> SessionStore:
    if backend == "memory":
        return new_session_store(PoolConfig())
    return new_session_store(
        PoolConfig(session_backend="redis", redis_url=url, redis_key_prefix="bench:")
    )


async def operations_per_second(store: SessionStore, count: int) -> float:
    def touch(session: Any) -> None:
        session.metadata["seen"] = True

    started = time.perf_counter()
    for i in range(count // 4):
        name = f"mix-{i}"
        await store.create_session(name)
        await store.get_session(name)
        await store.update_session(name, touch)
        await store.delete_session(name)
    return (count // 4) * 4 / (time.perf_counter() - started)


def mix_from_processes(server: RedisServer, processes: int, operations: int) -> float:
    """The create/get/update/delete mix from ``processes`` client processes at once."""
    script = Path(tempfile.mkdtemp()) / "mixer.py"
    script.write_text(MIXER)
    share = operations // processes
    started = time.perf_counter()
    children = [
        subprocess.Popen([sys.executable, str(script), server.url, str(share), str(n)])
        for n in range(processes)
    ]
    for child in children:
        assert child.wait(600) == 0
    return share // 4 * 4 * processes / (time.perf_counter() - started)


def redis_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def updates_per_second(
    server: RedisServer, processes: int, updates: int
) -> tuple[float, float]:
    store = store_for("redis", server.url)
    if not await store.session_exists("hot"):
        await store.create_session("hot")
    script = Path(tempfile.mkdtemp()) / "updater.py"
    script.write_text(UPDATER)
    assert server.process is not None
    cpu_before = redis_cpu_seconds(server.process.pid)
    started = time.perf_counter()
    children = [
        subprocess.Popen([sys.executable, str(script), server.url, str(updates // processes)])
        for _ in range(processes)
    ]
    for child in children:
        assert child.wait(600) == 0
    elapsed = time.perf_counter() - started
    cpu = redis_cpu_seconds(server.process.pid) - cpu_before
    return updates / elapsed, cpu / elapsed


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def session_calls(backend: str, url: str, calls: int) -> dict[str, float]:
    options: dict[str, Any] = {"pool_size": 1}
    if backend == "redis":
        options.update(session_backend="redis", redis_url=url, redis_key_prefix="calls:")
    async with Pool("python", **options) as pool:
        for _ in range(50):
            await pool.execute_in_session("warm", "echo", {})
        samples = []
        started = time.perf_counter()
        for i in range(calls):
            begun = time.perf_counter()
            await pool.execute_in_session(f"s-{i % 100}", "echo", {"i": i})
            samples.append(time.perf_counter() - begun)
        rate = calls / (time.perf_counter() - started)
    return {"calls_per_s": rate, "p50_ms": percentile(samples, 0.5) * 1e3,
            "p99_ms": percentile(samples, 0.99) * 1e3}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operations", type=int, default=4000)
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    server = RedisServer(Path(tempfile.mkdtemp())).start()
    try:
        print("session operations per second (create/get/update/delete mix, one process)")
        for backend in ("memory", "redis"):
            rate = await operations_per_second(store_for(backend, server.url), options.operations)
            print(f"  {backend:>6}: {rate:10.0f} ops/s")
        for processes in (2, 4):
            rate = mix_from_processes(server, processes, options.operations)
            print(f"  redis from {processes} processes: {rate:10.0f} ops/s")
        print("update_session on one hot session, 32 concurrent per process")
        for processes in (1, 2, 4):
            rate, cpu = await updates_per_second(server, processes, options.updates)
            print(f"  {processes} process(es): {rate:8.0f} updates/s, redis-server CPU {cpu:.2f}")
        print("execute_in_session('echo'), one at a time, one python worker")
        rounds: dict[str, list[dict[str, float]]] = {"memory": [], "redis": []}
        for _ in range(options.rounds):
            for backend, taken in rounds.items():
                taken.append(await session_calls(backend, server.url, options.calls))
        figures = {
            backend: {key: statistics.median(row[key] for row in taken) for key in taken[0]}
            for backend, taken in rounds.items()
        }
        for backend, row in figures.items():
            print(
                f"  {backend:>6}: {row['calls_per_s']:8.0f} calls/s, p50 {row['p50_ms']:.3f} ms,"
                f" p99 {row['p99_ms']:.3f} ms (medians of {options.rounds} rounds)"
            )
        added = figures["redis"]["p50_ms"] - figures["memory"]["p50_ms"]
        print(f"  Redis adds {added:.3f} ms p50 to a session call (target: under 0.3 ms)")
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
