"""Large payloads, with the peers in the same run (BENCHMARKS.md, "Large payloads").

Echo round trips of one value of SIZE bytes, 4 workers, 32 callers at a time:
ProcessPoolExecutor (a copy of ``../shared/bench/peer_payload.py``'s, pickling str and bytes) beside
snakepit echoing a ``str`` (a JSON string) and a ``bytes`` value (a binary value, on workers
declaring the ``binary`` capability), on every runtime given. MB/s of payload per direction,
the median of ``--rounds``.

Usage: python benchmarks/payloads.py [--sizes 1000,100000,1000000,10000000] [--rounds 3]
       [--runtime python|node|ruby ...] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import os
import statistics
import sys
import time
from typing import Any

from snakepit_core import Pool

CALLERS = 32


def requests_for(size: int) -> int:
    """As many echoes as the peer script sends for this size."""
    return max(20, min(5000, 200_000_000 // (size * 10)))


def echo(value: Any) -> Any:
    return value


def ppe_rate(size: int, kind: str) -> float:
    """ProcessPoolExecutor's echo MB/s: a copy of ``peer_payload.py``'s ``ppe`` (all requests
    submitted at once, 4 processes, pickle)."""
    message: Any = "x" * size if kind == "str" else os.urandom(size)
    count = requests_for(size)
    with cf.ProcessPoolExecutor(4) as executor:
        list(executor.map(echo, [message] * 4))
        started = time.perf_counter()
        for future in [executor.submit(echo, message) for _ in range(count)]:
            future.result()
        return count * size / (time.perf_counter() - started) / 1e6


async def snakepit_rate(runtime: str, size: int, kind: str) -> float:
    value: Any = "x" * size if kind == "str" else bytes(size)
    count = requests_for(size)
    async with Pool(runtime, pool_size=4, worker_concurrency=8) as pool:
        await asyncio.gather(*(pool.execute("echo", {"v": value}, timeout=120) for _ in range(4)))
        gate = asyncio.Semaphore(CALLERS)

        async def one() -> None:
            async with gate:
                await pool.execute("echo", {"v": value}, timeout=120)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        return count * size / (time.perf_counter() - started) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000,1000000,10000000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", action="append", choices=("python", "node", "ruby"))
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    runtimes = options.runtime or ["python"]
    rows: dict[str, dict[str, float]] = {}
    for size in (int(s) for s in options.sizes.split(",")):
        samples: dict[str, list[float]] = {}
        for _ in range(options.rounds):
            for kind in ("str", "bytes"):
                samples.setdefault(f"PPE {kind}", []).append(ppe_rate(size, kind))
                for runtime in runtimes:
                    rate = asyncio.run(snakepit_rate(runtime, size, kind))
                    samples.setdefault(f"snakepit {runtime} {kind}", []).append(rate)
        rows[str(size)] = {name: statistics.median(values) for name, values in samples.items()}
        print(f"size {size} done", file=sys.stderr)
    if options.json:
        print(json.dumps(rows))
        return
    names = list(next(iter(rows.values())))
    print(f"echo MB/s, 4 workers, {CALLERS} callers, median of {options.rounds}")
    print(f"  {'size':>10} " + " ".join(f"{name:>22}" for name in names))
    for size, figures in rows.items():
        print(f"  {size:>10} " + " ".join(f"{figures[name]:22.1f}" for name in names))


if __name__ == "__main__":
    main()
