"""Run by tests/test_fork.py as ``python fork_scenarios.py sync|async``: a parent with a running
pool forks while a call is in flight; the child reports what it sees, then exits normally (its
``atexit`` hooks run). The parent then reports whether its own pool noticed anything.

Output: one JSON line from the child (``"who": "child"``), then one from the parent.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import sys
import threading
import time
from typing import Any

import snakepit_core
from snakepit_core import Pool, SyncPool
from snakepit_core.errors import PoolStopped
from snakepit_core.registry import get_registry
from snakepit_core.runinfo import current_run_id


def refused(call: Any) -> str:
    """The PoolStopped message ``call()`` raises, or what went wrong instead."""
    try:
        call()
    except PoolStopped as exc:
        return str(exc)
    except Exception as exc:
        return f"unexpected {exc!r}"
    return "not refused"


def run_coroutine_inline(coroutine: Any) -> Any:
    """Step a coroutine that must finish without waiting (the inherited loop is not ours)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise AssertionError("the coroutine waited on the inherited event loop")


def own_pool_in_child() -> dict[str, Any]:
    """The child may start pools of its own; they get the child's run id."""
    with SyncPool("python", pool_size=1) as pool:
        echoed = pool.execute("echo", {"from": "child"})
        worker = next(iter(pool.pool.workers.values()))
        return {"own_echo": echoed, "own_worker_run_id": worker.run_id}


def child_report(parent_run_id: str, stop_seconds: float, refusals: dict[str, str]) -> None:
    report: dict[str, Any] = {
        "who": "child",
        "pid": os.getpid(),
        "run_id": current_run_id(),
        "parent_run_id": parent_run_id,
        "stop_seconds": stop_seconds,
        "refusals": refusals,
    }
    report |= own_pool_in_child()
    report["reaped"] = get_registry().reap_dead_runs().killed
    print(json.dumps(report), flush=True)


def sync_scenario() -> None:
    pool = SyncPool("python", pool_size=2).start()
    snakepit_core.start("python", pool_size=1)
    pids = sorted(w.pid for w in pool.pool.workers.values())
    results: list[Any] = []
    in_flight = threading.Thread(
        target=lambda: results.append(pool.execute("sleep", {"seconds": 1.0}))
    )
    in_flight.start()
    time.sleep(0.2)
    parent_run_id = current_run_id()
    child = os.fork()
    if child == 0:
        refusals = {
            "execute": refused(lambda: pool.execute("ping", {})),
            "module_execute": refused(lambda: snakepit_core.execute("ping", {})),
        }
        started = time.monotonic()
        pool.stop()
        snakepit_core.stop()
        child_report(parent_run_id, time.monotonic() - started, refusals)
        sys.exit(0)  # a normal exit: atexit hooks run here
    _, status = os.waitpid(child, 0)
    in_flight.join()
    after = pool.execute("echo", {"after": "fork"})
    report = {
        "who": "parent",
        "pid": os.getpid(),
        "child_status": status,
        "in_flight": results,
        "after": after,
        "module_after": snakepit_core.execute("echo", {"module": True}),
        "pids_before": pids,
        "pids_after": sorted(w.pid for w in pool.pool.workers.values()),
        "restarts": pool.stats()["restarts"],
    }
    print(json.dumps(report), flush=True)
    snakepit_core.stop()
    pool.stop()


async def async_scenario() -> None:
    pool = Pool("python", pool_size=2)
    await pool.start()
    pids = sorted(w.pid for w in pool.workers.values())
    in_flight = asyncio.ensure_future(pool.execute("sleep", {"seconds": 1.0}))
    await asyncio.sleep(0.2)
    parent_run_id = current_run_id()
    child = os.fork()
    if child == 0:
        # The inherited loop shares its epoll instance with the parent: never run it here.
        refusals = {"execute": refused(lambda: run_coroutine_inline(pool.execute("ping", {})))}
        started = time.monotonic()
        run_coroutine_inline(pool.stop())
        stop_seconds = time.monotonic() - started
        thread = threading.Thread(target=child_report, args=(parent_run_id, stop_seconds, refusals))
        thread.start()
        thread.join()
        atexit._run_exitfuncs()  # what a normal exit would run
        os._exit(0)
    status = (await asyncio.to_thread(os.waitpid, child, 0))[1]
    report = {
        "who": "parent",
        "pid": os.getpid(),
        "child_status": status,
        "in_flight": [await in_flight],
        "after": await pool.execute("echo", {"after": "fork"}),
        "pids_before": pids,
        "pids_after": sorted(w.pid for w in pool.workers.values()),
        "restarts": pool.stats()["restarts"],
    }
    print(json.dumps(report), flush=True)
    await pool.stop()


if __name__ == "__main__":
    if sys.argv[1] == "sync":
        sync_scenario()
    else:
        asyncio.run(async_scenario())
