"""Protocol 2 figures, with the peers in the same run (BENCHMARKS.md, "Many requests in flight").

1. Ping throughput, 4 Python workers, 128 independent callers each awaiting ``pool.execute``
   (no batch path), default asyncio loop, at ``worker_concurrency`` 1 and 16, next to
   ProcessPoolExecutor and the pipelined raw pipe loop (16 frames in flight per child), both
   from ``../shared/bench``. Rounds are interleaved; medians are printed.
2. I/O-bound: one worker per runtime (Python and Node async handlers, Ruby threads), 200
   concurrent calls that each wait 100 ms, at ``worker_concurrency=200``: the wall time.

Usage: python benchmarks/concurrency.py [--rounds 5] [--requests 40000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from snakepit_core import Pool, PoolConfig

HERE = Path(__file__).resolve().parent
PEERS = HERE.parent.parent / "shared" / "bench"
WORKERS = HERE / "workers"
CALLERS = 128


def peer(script: str, *args: object) -> float:
    """Requests per second printed by one of the reference peers."""
    done = subprocess.run(
        [sys.executable, str(PEERS / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    found = re.search(r"throughput=(\d+)", done.stdout)
    if found is None:
        raise RuntimeError(f"{script} printed no throughput: {done.stdout!r}")
    return float(found.group(1))


async def snakepit_pings(requests: int, concurrency: int) -> float:
    config = PoolConfig(
        pool_size=4, worker_concurrency=concurrency, pool_max_queue_size=requests + CALLERS
    )
    async with Pool("python", config=config) as pool:
        share, extra = divmod(requests, CALLERS)

        async def caller(count: int) -> None:
            for _ in range(count):
                await pool.execute("ping", {})

        await asyncio.gather(*(caller(10) for _ in range(CALLERS)))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(caller(share + (i < extra)) for i in range(CALLERS)))
        return requests / (time.perf_counter() - started)


def io_bound_adapter(runtime: str) -> Any:
    if runtime == "python":
        from snakepit_python import python_adapter

        return python_adapter("io-python", WORKERS / "io_worker.py")
    if runtime == "node":
        from snakepit_node import node_adapter

        return node_adapter("io-node", WORKERS / "io_worker.js")
    from snakepit_ruby import ruby_adapter

    return ruby_adapter("io-ruby", WORKERS / "io_worker.rb")


async def io_bound_seconds(runtime: str, calls: int = 200, wait: float = 0.1) -> float:
    config = PoolConfig(pool_size=1, worker_concurrency=calls)
    async with Pool(io_bound_adapter(runtime), config=config) as pool:
        await pool.execute("wait", {"seconds": 0.001})
        started = time.perf_counter()
        await asyncio.gather(*(pool.execute("wait", {"seconds": wait}) for _ in range(calls)))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    samples: dict[str, list[float]] = {}
    for round_number in range(options.rounds):
        measured = {
            "ProcessPoolExecutor": peer("peer_ppe.py", options.requests, 4),
            "pipelined raw loop (16 in flight)": peer(
                "peer_pipe_pipelined.py", options.requests, 4, 16
            ),
            "snakepit, worker_concurrency=1": asyncio.run(snakepit_pings(options.requests, 1)),
            "snakepit, worker_concurrency=16": asyncio.run(snakepit_pings(options.requests, 16)),
        }
        for name, value in measured.items():
            samples.setdefault(name, []).append(value)
        print(f"round {round_number + 1}/{options.rounds} done", file=sys.stderr)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ppe = medians["ProcessPoolExecutor"]
    raw = medians["pipelined raw loop (16 in flight)"]
    io_bound = {
        runtime: asyncio.run(io_bound_seconds(runtime)) for runtime in ("python", "node", "ruby")
    }
    if options.json:
        print(json.dumps({"rounds": samples, "medians": medians, "io_bound_s": io_bound}))
        return
    print(f"ping throughput, 4 python workers, {CALLERS} callers, median of {options.rounds}:")
    print(f"  {'':36} {'req/s':>8} {'/ PPE':>7} {'/ pipelined':>12}")
    for name, value in medians.items():
        print(f"  {name:36} {value:8.0f} {value / ppe:7.2f} {value / raw:12.2f}")
    print("I/O-bound: one worker, 200 calls waiting 100 ms each, worker_concurrency=200:")
    for runtime, seconds in io_bound.items():
        print(f"  {runtime:8} {seconds:.3f} s")


if __name__ == "__main__":
    main()
