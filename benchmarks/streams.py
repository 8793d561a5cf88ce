"""Streaming figures, one worker per runtime (BENCHMARKS.md, "Streaming").

1. Items per second: one ``execute_stream("stream", {"count": N})`` read by an ``async for``
   consumer that does nothing else (items are ``{"i": n}``; default ``stream_window``, 64).
2. Time to the first item: 500 one-item streams one after another, p50 and p99.
3. The parent's memory with a slow consumer: the worker produces as fast as it can while the
   consumer takes an item every millisecond (about 100 times slower); the parent's RSS,
   sampled every 0.5 s for ``--slow-seconds``, must stay flat (the window holds the producer).

Usage: python benchmarks/streams.py [--rounds 3] [--items 200000] [--slow-seconds 6]
       [--runtime python|node|ruby ...] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time
from typing import Any

from snakepit_core import Pool

RUNTIMES = ("python", "node", "ruby")


def rss_kib() -> int:
    """The parent's resident memory now (Linux /proc), in KiB."""
    with open("/proc/self/statm", "rb") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() // 1024


async def items_per_second(pool: Pool, count: int) -> float:
    started = time.perf_counter()
    received = 0
    async for _ in pool.execute_stream("stream", {"count": count}, timeout=600):
        received += 1
    assert received == count
    return count / (time.perf_counter() - started)


async def first_item_ms(pool: Pool, streams: int = 500) -> tuple[float, float]:
    samples = []
    for _ in range(streams):
        stream = pool.execute_stream("stream", {"count": 1})
        started = time.perf_counter()
        await anext(stream)
        samples.append((time.perf_counter() - started) * 1000)
        await stream.aclose()
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


async def slow_consumer_rss(pool: Pool, seconds: float) -> dict[str, Any]:
    samples: list[int] = []
    taken = 0
    async with pool.execute_stream("stream", {"count": 1_000_000}, timeout=600) as items:
        started = next_sample = time.perf_counter()
        async for _ in items:
            taken += 1
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            if now >= next_sample:
                samples.append(rss_kib())
                next_sample = now + 0.5
            if now - started > seconds:
                break
    return {
        "items_taken": taken,
        "rss_kib_first": samples[0],
        "rss_kib_last": samples[-1],
        "rss_kib_max": max(samples),
        "growth_kib": samples[-1] - samples[0],
    }


async def measure(runtime: str, rounds: int, count: int, slow_seconds: float) -> dict[str, Any]:
    async with Pool(runtime, pool_size=1, worker_concurrency=8) as pool:
        await items_per_second(pool, 1000)  # warm-up
        rates = [await items_per_second(pool, count) for _ in range(rounds)]
        p50, p99 = await first_item_ms(pool)
        memory = await slow_consumer_rss(pool, slow_seconds)
    return {
        "items_per_s": statistics.median(rates),
        "rounds": rates,
        "first_item_p50_ms": p50,
        "first_item_p99_ms": p99,
        **memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--slow-seconds", type=float, default=6.0)
    parser.add_argument("--runtime", action="append", choices=RUNTIMES, help="default: all")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    figures = {
        runtime: asyncio.run(measure(runtime, options.rounds, options.items, options.slow_seconds))
        for runtime in options.runtime or RUNTIMES
    }
    if options.json:
        print(json.dumps(figures))
        return
    print(f"one worker per runtime, {options.items} items per stream, median of {options.rounds}")
    print(f"  {'':8} {'items/s':>9} {'first p50':>10} {'first p99':>10} {'slow: RSS KiB':>22}")
    for runtime, f in figures.items():
        rss = f"{f['rss_kib_first']} -> {f['rss_kib_last']} (max {f['rss_kib_max']})"
        print(
            f"  {runtime:8} {f['items_per_s']:9.0f} {f['first_item_p50_ms']:8.3f}ms"
            f" {f['first_item_p99_ms']:8.3f}ms {rss:>22}   ({f['items_taken']} taken)"
        )


if __name__ == "__main__":
    main()
