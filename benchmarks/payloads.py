"""Large payloads, with the peers in the same run (BENCHMARKS.md, "Large payloads").

Echo round trips of one value of SIZE bytes, 4 workers, 32 callers at a time:
ProcessPoolExecutor (a copy of ``../shared/bench/peer_payload.py``'s, pickling str, bytes and
numpy arrays with Python 3.11's default protocol 4) beside snakepit echoing a ``str`` (a JSON
string: a text attachment from 32768 characters), a ``bytes`` value and a float32 numpy array
(binary values), on every runtime given. MB/s of payload per direction, the median of
``--rounds``; peers interleaved round by round.

``--shm-threshold`` sets ``shm_threshold_bytes`` (``none``: everything on the pipe), to find the
break-even point; ``--rss SIZE`` prints the parent's peak RSS over one echo of SIZE bytes
(VmHWM minus the RSS before it, after ``/proc/self/clear_refs``) instead.

Usage: python benchmarks/payloads.py [--sizes 1000,100000,1000000,10000000,100000000]
       [--rounds 3] [--kinds str,bytes,numpy] [--runtime python|node|ruby ...]
       [--shm-threshold N|none] [--codec auto|json|orjson] [--no-peer] [--rss SIZE] [--json]
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

import numpy

from snakepit_core import Pool

CALLERS = 32
KINDS = ("str", "bytes", "numpy")


def requests_for(size: int) -> int:
    """As many echoes as the peer script sends for this size."""
    return max(20, min(5000, 200_000_000 // (size * 10)))


def echo(value: Any) -> Any:
    return value


def make_value(kind: str, size: int) -> Any:
    if kind == "str":
        return "x" * size
    if kind == "bytes":
        return os.urandom(size)
    return numpy.frombuffer(os.urandom(size // 4 * 4), dtype=numpy.float32)


def ppe_rate(size: int, kind: str) -> float:
    """ProcessPoolExecutor's echo MB/s: a copy of ``peer_payload.py``'s ``ppe`` (all requests
    submitted at once, 4 processes, pickle)."""
    message = make_value(kind, size)
    count = requests_for(size)
    with cf.ProcessPoolExecutor(4) as executor:
        list(executor.map(echo, [message] * 4))
        started = time.perf_counter()
        for future in [executor.submit(echo, message) for _ in range(count)]:
            future.result()
        return count * size / (time.perf_counter() - started) / 1e6


async def snakepit_rate(
    runtime: str, size: int, kind: str, threshold: int | None, codec: str
) -> float:
    """Echo MB/s; a numpy array comes back as bytes and is made an array again, zero-copy, as
    a caller would (``numpy.frombuffer``)."""
    value = make_value(kind, size)
    count = requests_for(size)
    options = {
        "pool_size": 4,
        "worker_concurrency": 8,
        "shm_threshold_bytes": threshold,
        "json_codec": codec,
    }
    async with Pool(runtime, **options) as pool:  # type: ignore[arg-type]
        await asyncio.gather(*(pool.execute("echo", {"v": value}, timeout=300) for _ in range(4)))
        gate = asyncio.Semaphore(CALLERS)

        async def one() -> None:
            async with gate:
                answer = await pool.execute("echo", {"v": value}, timeout=300)
                if kind == "numpy":
                    numpy.frombuffer(answer["echoed"]["v"], dtype=numpy.float32)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        return count * size / (time.perf_counter() - started) / 1e6


def peak_rss(size: int, runtime: str, threshold: int | None) -> None:
    """The parent's peak RSS growth over one echo of ``size`` bytes, against the payload."""

    def field(name: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
        raise LookupError(name)

    async def run() -> None:
        value = os.urandom(size)
        async with Pool(runtime, pool_size=1, shm_threshold_bytes=threshold) as pool:
            await pool.execute("echo", {"v": b"warm"})
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # VmHWM := VmRSS
            before = field("VmRSS:")
            answer = await pool.execute("echo", {"v": value}, timeout=300)
            grown = field("VmHWM:") - before
            assert answer["echoed"]["v"] == value
        print(
            f"peak RSS over one {size / 1e6:.0f} MB echo ({runtime}, shm_threshold_bytes="
            f"{threshold}): {grown / 1e6:.1f} MB = {grown / size:.2f}x the payload "
            "(the answer itself is 1x)"
        )

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000,1000000,10000000,100000000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--runtime", action="append", choices=("python", "node", "ruby"))
    parser.add_argument("--shm-threshold", default="65536")
    parser.add_argument("--no-peer", action="store_true", help="leave ProcessPoolExecutor out")
    parser.add_argument("--codec", default="auto", choices=("auto", "json", "orjson"))
    parser.add_argument("--rss", type=int, metavar="SIZE")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    runtimes = options.runtime or ["python"]
    threshold = None if options.shm_threshold == "none" else int(options.shm_threshold)
    if options.rss:
        for runtime in runtimes:
            peak_rss(options.rss, runtime, threshold)
        return
    kinds = options.kinds.split(",")
    rows: dict[str, dict[str, float]] = {}
    for size in (int(s) for s in options.sizes.split(",")):
        samples: dict[str, list[float]] = {}
        for _ in range(options.rounds):
            for kind in kinds:
                if not options.no_peer:
                    samples.setdefault(f"PPE {kind}", []).append(ppe_rate(size, kind))
                for runtime in runtimes:
                    if kind == "numpy" and runtime != "python":
                        continue
                    rate = asyncio.run(snakepit_rate(runtime, size, kind, threshold, options.codec))
                    samples.setdefault(f"{runtime} {kind}", []).append(rate)
        rows[str(size)] = {name: statistics.median(values) for name, values in samples.items()}
        print(f"size {size} done", file=sys.stderr)
    if options.json:
        print(json.dumps(rows))
        return
    names = list(next(iter(rows.values())))
    print(
        f"echo MB/s, 4 workers, {CALLERS} callers, median of {options.rounds}, "
        f"shm_threshold_bytes={threshold}, json_codec={options.codec}, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    print(f"  {'size':>10} " + " ".join(f"{name:>13}" for name in names))
    for size, figures in rows.items():
        print(f"  {size:>10} " + " ".join(f"{figures[name]:13.1f}" for name in names))


if __name__ == "__main__":
    main()
