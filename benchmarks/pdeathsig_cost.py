"""What the parent-death signal costs at start-up: ``setpriv --pdeathsig KILL`` vs nothing.

Every worker is launched through ``setpriv`` on Linux (snakepit_core/launcher.py), which is one
extra ``execve`` per worker. This measures, in fresh interpreters (the launcher decides once per
process), the time for ``Pool.start()`` of N Python workers with the default launcher and with
``SNAKEPIT_PDEATHSIG=0``, alternating the order each round, and reports medians. It also times
the bare exec: ``setpriv --pdeathsig KILL -- true`` against ``true``.

    python benchmarks/pdeathsig_cost.py [--workers 16] [--rounds 7] [--execs 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

CHILD = """
import asyncio, json, time
from snakepit_core import Pool
from snakepit_core.launcher import pdeathsig_available

async def main(size):
    pool = Pool("python", pool_size=size, pool_startup_timeout=120)
    started = time.perf_counter()
    await pool.start()
    elapsed = time.perf_counter() - started
    assert len(pool.workers) == size
    await pool.stop()
    print(json.dumps({"seconds": elapsed, "pdeathsig": pdeathsig_available()}))

import sys
asyncio.run(main(int(sys.argv[1])))
"""


def pool_start(workers: int, pdeathsig: bool) -> float:
    env = dict(os.environ)
    env.pop("SNAKEPIT_PDEATHSIG", None)
    if not pdeathsig:
        env["SNAKEPIT_PDEATHSIG"] = "0"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(workers)],
        capture_output=True,
        env=env,
        check=True,
        timeout=300,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    if result["pdeathsig"] != pdeathsig:
        raise SystemExit(f"setpriv is not available here (pdeathsig={result['pdeathsig']})")
    return float(result["seconds"])


def exec_time(argv: list[str], count: int) -> float:
    """Median seconds of fork + exec + wait of ``argv``."""
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        subprocess.run(argv, check=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--execs", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="one JSON object, for RELIABILITY.md")
    options = parser.parse_args()
    setpriv = shutil.which("setpriv")
    true = shutil.which("true")
    if not sys.platform.startswith("linux") or setpriv is None or true is None:
        raise SystemExit("needs Linux with setpriv (util-linux) and true on PATH")

    with_signal: list[float] = []
    without: list[float] = []
    for round_number in range(options.rounds):
        order = [True, False] if round_number % 2 == 0 else [False, True]
        for pdeathsig in order:
            (with_signal if pdeathsig else without).append(pool_start(options.workers, pdeathsig))
    plain_exec = exec_time([true], options.execs)
    wrapped_exec = exec_time([setpriv, "--pdeathsig", "KILL", "--", true], options.execs)

    figures = {
        "workers": options.workers,
        "rounds": options.rounds,
        "start_ms_with_pdeathsig": round(1000 * statistics.median(with_signal), 1),
        "start_ms_without": round(1000 * statistics.median(without), 1),
        "start_ms_difference": round(
            1000 * (statistics.median(with_signal) - statistics.median(without)), 1
        ),
        "start_ms_range_with": [round(1000 * min(with_signal)), round(1000 * max(with_signal))],
        "start_ms_range_without": [round(1000 * min(without)), round(1000 * max(without))],
        "exec_ms_true": round(1000 * plain_exec, 3),
        "exec_ms_setpriv_true": round(1000 * wrapped_exec, 3),
        "exec_ms_per_worker_overhead": round(1000 * (wrapped_exec - plain_exec), 3),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if options.json:
        print(json.dumps(figures))
        return
    print(f"Pool.start() of {options.workers} python workers, median of {options.rounds} rounds")
    print(f"  with setpriv --pdeathsig KILL : {figures['start_ms_with_pdeathsig']:8.1f} ms")
    print(f"  SNAKEPIT_PDEATHSIG=0          : {figures['start_ms_without']:8.1f} ms")
    print(f"  difference                    : {figures['start_ms_difference']:8.1f} ms")
    print(
        f"  ranges (min..max)             : with {figures['start_ms_range_with']} ms, "
        f"without {figures['start_ms_range_without']} ms"
    )
    print(f"bare exec, median of {options.execs}")
    print(f"  true                          : {figures['exec_ms_true']:8.3f} ms")
    print(f"  setpriv --pdeathsig KILL true : {figures['exec_ms_setpriv_true']:8.3f} ms")
    print(f"  per-worker overhead           : {figures['exec_ms_per_worker_overhead']:8.3f} ms")
    print(f"({figures['cpus']} CPUs, load average {figures['load_average_1min']})")


if __name__ == "__main__":
    main()
