"""Callback figures, one worker per runtime (BENCHMARKS.md, "Callbacks").

1. Callback round trips per second from one worker: one ``call_host`` request whose handler
   calls the host's ``noop`` callback ``--calls`` times, one after another.
2. The latency a callback adds to a request: ``--requests`` ``call_host`` requests of one call
   each, one at a time, beside as many plain ``ping`` requests; p50 and p99 of each.

The callback is async and returns ``None``. Medians of ``--rounds``.

Usage: python benchmarks/callbacks.py [--rounds 3] [--calls 5000] [--requests 2000]
       [--runtime python|node|ruby ...] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from snakepit_core import Pool

RUNTIMES = ("python", "node", "ruby")


async def noop(args: dict[str, Any], ctx: Any) -> None:
    return None


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def latencies(pool: Pool, command: str, args: dict[str, Any], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await pool.execute(command, args)
        samples.append(time.perf_counter() - started)
    return samples


async def measure(runtime: str, calls: int, requests: int) -> dict[str, float]:
    async with Pool(runtime, pool_size=1, worker_concurrency=4) as pool:
        pool.register_callback("noop", noop)
        one = {"name": "noop"}
        await pool.execute("call_host", {"name": "noop", "times": 100})
        started = time.perf_counter()
        await pool.execute("call_host", {"name": "noop", "times": calls}, timeout=600)
        rate = calls / (time.perf_counter() - started)
        plain = await latencies(pool, "ping", {}, requests)
        with_callback = await latencies(pool, "call_host", one, requests)
    return {
        "callbacks_per_s": rate,
        "ping_p50_us": percentile(plain, 0.5) * 1e6,
        "ping_p99_us": percentile(plain, 0.99) * 1e6,
        "callback_request_p50_us": percentile(with_callback, 0.5) * 1e6,
        "callback_request_p99_us": percentile(with_callback, 0.99) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--runtime", action="append", choices=RUNTIMES)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    runtimes = options.runtime or list(RUNTIMES)
    samples: dict[str, list[dict[str, float]]] = {runtime: [] for runtime in runtimes}
    for _ in range(options.rounds):
        for runtime in runtimes:
            samples[runtime].append(asyncio.run(measure(runtime, options.calls, options.requests)))
    table = {
        runtime: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        for runtime, rounds in samples.items()
    }
    if options.json:
        print(json.dumps(table))
        return
    print(f"callbacks, one worker, median of {options.rounds}")
    keys = list(next(iter(table.values())))
    print(f"  {'runtime':>8} " + " ".join(f"{key:>24}" for key in keys))
    for runtime, figures in table.items():
        print(f"  {runtime:>8} " + " ".join(f"{figures[key]:24.1f}" for key in keys))


if __name__ == "__main__":
    main()
