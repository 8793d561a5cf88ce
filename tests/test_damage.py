"""Damage tests: chaos, parent SIGKILL, start/stop cycles, fuzzing, soak (see RELIABILITY.md).

Every test does real damage to real processes and checks, by scanning /proc for the run's
``SNAKEPIT_RUN_ID``, that nothing is left behind. Each is bounded in count and time; the sizes
come from ``SNAKEPIT_TEST_CHAOS_REQUESTS``, ``SNAKEPIT_TEST_SOAK_REQUESTS``,
``SNAKEPIT_TEST_CYCLES`` and ``SNAKEPIT_TEST_FUZZ_EXAMPLES`` (the Python size; node and ruby
run a fixed fraction of it). Each test prints a ``FIGURES`` line, also without ``-s``; set
``SNAKEPIT_TEST_FIGURES=file.jsonl`` to collect them. Run only these with ``-m damage``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import importlib.util
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from damage_helpers import (
    alive,
    live_pids_of_run,
    open_fds,
    read_line,
    report,
    size,
    status_field,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import snakepit_core.protocol as installed_protocol
from snakepit_core import Pool, ScriptAdapter
from snakepit_core.errors import CommandError, ProtocolError, WorkerCrashed, WorkerTimeout
from snakepit_core.registry import Registry, process_start_time
from snakepit_core.runinfo import RUN_ID

from conftest import BRIDGES, eventually, eventually_sync

pytestmark = pytest.mark.damage

ADAPTERS = ["python", "node", "ruby"]
HELPERS = Path(__file__).resolve().parent / "damage_helpers.py"


def full(pool: Pool, pool_size: int) -> bool:
    return len(pool.workers) == pool_size and pool.stats()["available"] == pool_size


# -- 1. chaos ------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_chaos_sigkill_a_busy_worker_every_50ms(adapter, capsys):
    """50 callers, a SIGKILL to a random busy worker every 50 ms and to half the workers that
    are starting: every call resolves with its result or WorkerCrashed, the breaker stays
    closed, the pool refills, nothing is left."""
    total = size("SNAKEPIT_TEST_CHAOS_REQUESTS", 5000, 2500, adapter)
    callers, pool_size = 50, 4
    outcomes: Counter[str] = Counter()
    kills = kills_busy = kills_starting = 0
    breaker_seen = False
    chaos = True
    async with Pool(
        adapter, pool_size=pool_size, pool_queue_timeout=120, pool_max_queue_size=10_000
    ) as pool:
        started = time.monotonic()

        async def caller(index: int, count: int) -> None:
            for n in range(count):
                args = {"caller": index, "n": n}
                try:
                    result = await pool.execute("echo", args, timeout=60)
                except WorkerCrashed as exc:
                    assert "signal SIGKILL" in str(exc), exc
                    outcomes["crashed"] += 1
                else:
                    assert result == {"echoed": args}
                    outcomes["ok"] += 1

        async def killer() -> None:
            nonlocal kills, kills_busy, kills_starting, breaker_seen
            while chaos:
                await asyncio.sleep(0.05)
                breaker_seen |= pool.stats()["breaker_open"]
                # Right after a burst of answers, every worker may be handed to a waiter that
                # has not sent its request yet: look again over a few loop turns.
                busy: list[Any] = []
                for _ in range(50):
                    busy = [w for w in pool.workers.values() if w.busy and w.alive]
                    if busy or not chaos:
                        break
                    await asyncio.sleep(0)
                if busy:
                    victim = random.choice(busy)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim.pid, signal.SIGKILL)
                        kills += 1
                        kills_busy += victim.busy  # still busy when the signal went out

        async def starting_killer() -> None:
            """Every other replacement is killed while it starts, 10 at most (so the chaos
            stays bounded: a node worker takes a few hundred ms to start on a busy machine)."""
            nonlocal kills_starting
            decided: set[int] = set()
            while chaos and kills_starting < 10:
                await asyncio.sleep(0.002)
                for starting in list(pool._starting):
                    if starting.pid is None or starting.pid in decided:
                        continue
                    decided.add(starting.pid)
                    if len(decided) % 2:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(starting.pid, signal.SIGKILL)
                            kills_starting += 1

        share = [total // callers + (i < total % callers) for i in range(callers)]
        killing = asyncio.gather(killer(), starting_killer())
        await asyncio.wait_for(
            asyncio.gather(*(caller(i, share[i]) for i in range(callers))), timeout=170
        )
        chaos = False
        await killing
        chaos_seconds = time.monotonic() - started
        recovery = await eventually(lambda: full(pool, pool_size), within=2.0)
        stats = pool.stats()
        assert await pool.execute("echo", {"after": 1}) == {"echoed": {"after": 1}}
    leftover = live_pids_of_run(RUN_ID)
    report(
        capsys,
        f"chaos[{adapter}]",
        requests=total,
        callers=callers,
        pool_size=pool_size,
        ok=outcomes["ok"],
        crashed=outcomes["crashed"],
        kills=kills,
        kills_of_busy_workers=kills_busy,
        kills_of_starting_workers=kills_starting,
        restarts=stats["restarts"],
        chaos_s=round(chaos_seconds, 2),
        recovery_s=round(recovery, 3),
        leftover=len(leftover),
    )
    assert outcomes["ok"] + outcomes["crashed"] == total
    assert kills_busy > 0 and outcomes["crashed"] > 0, "no kill hit a busy worker"
    # A worker killed just as its handshake answer arrives enters service, then fails a call.
    assert outcomes["crashed"] <= kills + kills_starting
    assert not breaker_seen and not stats["breaker_open"]
    assert stats["restarts"] >= kills - pool_size
    assert kills_starting > 0, "no kill hit a starting worker"
    assert leftover == []


async def test_running_out_of_descriptors_backs_off_without_opening_the_breaker(capsys):
    """Spawns failing with EMFILE for a second while two healthy workers serve: the breaker
    stays closed, every call is served, and the pool refills once descriptors are back."""
    import resource

    async with Pool("python", pool_size=3, crash_loop_threshold=2, restart_backoff_max=0.2) as pool:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        probe = os.dup(0)
        os.close(probe)
        victim = next(iter(pool.workers.values()))
        # Every descriptor below the lowest free one is taken: no new one can be opened.
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
        served = 0
        try:
            os.kill(victim.pid, signal.SIGKILL)
            until = time.monotonic() + 1.0
            while time.monotonic() < until:
                assert await pool.execute("echo", {"n": served}) == {"echoed": {"n": served}}
                assert not pool.supervisor.breaker_open
                served += 1
                await asyncio.sleep(0.005)
            in_service = len(pool.workers)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        refill = await eventually(lambda: full(pool, 3), within=15)
        stats = pool.stats()
    report(capsys, "emfile", served=served, in_service=in_service, refill_s=round(refill, 3))
    assert in_service == 2, "a worker started although no descriptor was free"
    assert not stats["breaker_open"]


async def test_sigkills_of_starting_workers_never_open_the_breaker(capsys):
    """10 s of SIGKILLs to every starting worker (and now and then a serving one) on all three
    runtimes at once, the breaker sampled every 10 ms: it never opens, no call is refused with
    AdapterUnavailable, every call resolves with its result or WorkerCrashed."""
    from snakepit_core.errors import AdapterUnavailable

    seconds = float(os.environ.get("SNAKEPIT_TEST_KILL_SECONDS", "10"))
    pool_size = 3
    pools = [
        Pool(adapter, pool_size=pool_size, pool_queue_timeout=120, pool_max_queue_size=10_000)
        for adapter in ADAPTERS
    ]
    await asyncio.gather(*(pool.start() for pool in pools))
    outcomes: dict[str, Counter[str]] = {pool.adapter.name: Counter() for pool in pools}
    deadline = time.monotonic() + seconds

    async def caller(pool: Pool) -> None:
        counts = outcomes[pool.adapter.name]
        while time.monotonic() < deadline:
            try:
                await pool.execute("echo", {"n": 1}, timeout=60)
                counts["ok"] += 1
            except WorkerCrashed:
                counts["crashed"] += 1
            except AdapterUnavailable:
                counts["unavailable"] += 1

    async def killer(pool: Pool) -> None:
        counts = outcomes[pool.adapter.name]
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            counts["breaker_open_samples"] += pool.supervisor.breaker_open
            counts["samples"] += 1
            for starting in list(pool._starting):
                if starting.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(starting.pid, signal.SIGKILL)
                        counts["kills_starting"] += 1
            serving = [w for w in pool.workers.values() if w.alive]
            if len(serving) > 1 and random.random() < 0.05:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(random.choice(serving).pid, signal.SIGKILL)
                    counts["kills_serving"] += 1

    try:
        tasks = [caller(pool) for pool in pools for _ in range(8)]
        tasks += [killer(pool) for pool in pools]
        await asyncio.wait_for(asyncio.gather(*tasks), seconds + 60)
        recovered = await eventually(lambda: all(full(p, pool_size) for p in pools), within=30)
        for pool in pools:
            assert await pool.execute("echo", {"after": 1}) == {"echoed": {"after": 1}}
    finally:
        await asyncio.gather(*(pool.stop() for pool in pools))
    figures = {f"{name}_{key}": value for name, c in outcomes.items() for key, value in c.items()}
    report(capsys, "starting_kills", seconds=seconds, recovery_s=round(recovered, 3), **figures)
    for name, counts in outcomes.items():
        assert counts["kills_starting"] >= 5, (name, counts)
        assert counts["breaker_open_samples"] == 0, (name, counts)
        assert counts["unavailable"] == 0, (name, counts)
        assert counts["ok"] > 0, (name, counts)
    assert live_pids_of_run(RUN_ID) == []


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_stop_in_the_middle_of_chaos_leaves_nothing(adapter, capsys):
    """stop() while callers are queued, workers are being killed and replacements are starting:
    every call ends (a result, WorkerCrashed or PoolStopped), stop is bounded, nothing is left."""
    pool_size, grace = 4, 0.5
    outcomes: Counter[str] = Counter()
    pool = Pool(adapter, pool_size=pool_size, pool_queue_timeout=120)
    await pool.start()
    kills = 0

    async def caller(index: int) -> None:
        from snakepit_core.errors import PoolStopped

        for n in range(1_000_000):
            try:
                await pool.execute("echo", {"caller": index, "n": n}, timeout=60)
                outcomes["ok"] += 1
            except WorkerCrashed:
                outcomes["crashed"] += 1
            except PoolStopped:
                outcomes["stopped"] += 1
                return

    async def killer() -> None:
        nonlocal kills
        while pool.running:
            await asyncio.sleep(0.02)
            for worker in list(pool.workers.values()):
                if worker.alive and random.random() < 0.5:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
                        kills += 1

    callers = [asyncio.ensure_future(caller(i)) for i in range(50)]
    killing = asyncio.ensure_future(killer())
    await asyncio.sleep(0.5)
    # Stop while replacements are most likely mid-start: right after a round of kills.
    await eventually(lambda: len(pool.workers) < pool_size, within=5, interval=0.001)
    in_service = {w.pid for w in pool.workers.values()}
    stopping = time.monotonic()
    await asyncio.wait_for(pool.stop(grace=grace), 30)
    stop_s = time.monotonic() - stopping
    at_return = set(live_pids_of_run(RUN_ID))
    await asyncio.wait_for(asyncio.gather(*callers, killing), 30)
    gone_after = await eventually(lambda: not live_pids_of_run(RUN_ID), within=2)
    report(
        capsys,
        f"stop_in_chaos[{adapter}]",
        ok=outcomes["ok"],
        crashed=outcomes["crashed"],
        stopped=outcomes["stopped"],
        kills=kills,
        stop_s=round(stop_s, 3),
        in_service_alive_at_return=len(at_return & in_service),
        starting_alive_at_return=len(at_return - in_service),
        all_gone_after_s=round(gone_after, 3),
    )
    assert outcomes["stopped"] == 50 and kills > 0
    assert stop_s < grace + 3
    assert not at_return, "a worker (in service or still starting) outlived stop()"


async def test_stop_waits_for_workers_that_are_still_starting():
    pool = Pool("python", pool_size=2)
    await pool.start()
    await pool.execute("ping", {})
    first = set(live_pids_of_run(RUN_ID))
    for worker in list(pool.workers.values()):
        os.kill(worker.pid, signal.SIGKILL)
    # Replacements spawned, not in service yet (a Python worker takes ~100 ms to be ready).
    await eventually(
        lambda: not pool.workers and bool(set(live_pids_of_run(RUN_ID)) - first),
        within=10,
        interval=0.001,
    )
    await pool.stop()
    left = live_pids_of_run(RUN_ID)
    with contextlib.suppress(TimeoutError):
        await eventually(lambda: not live_pids_of_run(RUN_ID), within=2)  # for the next test
    assert left == [], "processes of the pool outlived stop()"


# -- 2. parent SIGKILL ---------------------------------------------------------------------

#: What is disabled before the parent is killed, and so what must clean up.
VARIANTS = {
    # pdeathsig kills the workers, the watchdog their groups (the grandchild).
    "all_mechanisms": {"pdeathsig": True, "kill_watchdog": False, "reaper": None},
    # The watchdog alone: CPU-bound workers never see stdin EOF, only their group's SIGKILL.
    "watchdog_only": {"pdeathsig": False, "kill_watchdog": False, "reaper": None},
    # pdeathsig alone: the workers die; the grandchild is left for `snakepit reap`.
    "watchdog_killed": {"pdeathsig": True, "kill_watchdog": True, "reaper": "snakepit reap"},
    # Neither: spinning workers and the grandchild survive until the next pool start reaps.
    "registry_only": {"pdeathsig": False, "kill_watchdog": True, "reaper": "next pool start"},
}
SPINNERS = 3


def start_parent(
    adapter: str, registry: Path, pdeathsig: bool = True, daemon: bool = False
) -> tuple[subprocess.Popen, dict]:
    """A Python process with a busy pool (see damage_helpers.py), and its description."""
    env = {**os.environ, "SNAKEPIT_REGISTRY_DIR": str(registry)}
    env.pop("SNAKEPIT_PDEATHSIG", None)
    if not pdeathsig:
        env["SNAKEPIT_PDEATHSIG"] = "0"
    with open(registry / "parent.stderr", "wb") as stderr:
        parent = subprocess.Popen(
            [sys.executable, str(HELPERS), adapter, str(SPINNERS)]
            + (["--daemon"] if daemon else []),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    try:
        description = json.loads(read_line(parent, within=60))
    except BaseException:
        parent.kill()
        parent.wait()
        raise AssertionError((registry / "parent.stderr").read_text()[-3000:]) from None
    return parent, description


#: Three ways to run the registry reaper in a fresh process (all end in
#: ``Registry.reap_dead_runs``): the API, the command line, and the next pool start.
REAPERS = {
    "api": "import json; from snakepit_core.registry import get_registry; "
    "r = get_registry().reap_dead_runs(); print(json.dumps(r.killed))",
    "snakepit reap": "from snakepit_core.cli import main; main(['reap'])",
    "next pool start": "import asyncio; from snakepit_core import Pool\n"
    "async def main():\n"
    "    async with Pool('python', pool_size=1) as pool:\n"
    "        await pool.execute('ping', {})\n"
    "asyncio.run(main())",
}


def reap_in_fresh_process(registry: Path, how: str = "api") -> list[int] | None:
    """Run the registry reaper in a new Python; the pids it killed, where it says them."""
    env = {**os.environ, "SNAKEPIT_REGISTRY_DIR": str(registry)}
    done = subprocess.run(
        [sys.executable, "-c", REAPERS[how]], capture_output=True, env=env, timeout=60, check=True
    )
    out = done.stdout.decode()
    if how == "api":
        return json.loads(out)
    if how == "snakepit reap":  # "dead runs: 1; processes killed: 2 [123, 456]"
        listed = out.rsplit("[", 1)[1].split("]", 1)[0]
        return [int(pid) for pid in listed.replace(",", " ").split()]
    return None


def start_bystanders(registry: Path, dead_run: str) -> dict[str, int]:
    """Processes the reaper must never touch, each one a way a careless reaper could go wrong.

    ``live_run``: carries the SNAKEPIT_RUN_ID of a registered run whose owner (this process)
    is alive. ``recycled_pid``: no run id, but registered under the dead run, as a worker's pid
    reused by someone else would be. ``unknown_run``: a run id the registry never heard of.
    """
    live_run = "bystander" + uuid.uuid4().hex[:7]
    plain = {k: v for k, v in os.environ.items() if k != "SNAKEPIT_RUN_ID"}
    spawn = {
        "live_run": {**plain, "SNAKEPIT_RUN_ID": live_run},
        "recycled_pid": plain,
        "unknown_run": {**plain, "SNAKEPIT_RUN_ID": "unknown" + uuid.uuid4().hex[:9]},
    }
    pids = {
        name: subprocess.Popen(["sleep", "1000"], env=env, start_new_session=True).pid
        for name, env in spawn.items()
    }
    path = registry / "workers.sqlite3"
    Registry(path).add(pids["live_run"], live_run, "bystander")
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        owner_pid, owner_start = db.execute(
            "SELECT owner_pid, owner_start FROM workers WHERE run_id = ? LIMIT 1", (dead_run,)
        ).fetchone()
        db.execute(
            "INSERT INTO workers VALUES (?, ?, ?, ?, ?, ?)",
            (
                pids["recycled_pid"],
                process_start_time(pids["recycled_pid"]),
                dead_run,
                owner_pid,
                owner_start,
                "recycled",
            ),
        )
    return pids


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_parent_sigkill_leaves_no_process_of_its_run(adapter, variant, tmp_path, capsys):
    """SIGKILL a Python parent whose pool is mid-load (workers spinning in CPU loops, one with a
    grandchild): within 5 s nothing of the run is left, with whatever mechanisms remain."""
    mechanisms = VARIANTS[variant]
    registry = tmp_path / "registry"
    registry.mkdir(mode=0o700)
    parent, run = start_parent(adapter, registry, mechanisms["pdeathsig"])
    run_id, watchdog = run["run_id"], run["watchdog_pid"]
    bystanders: dict[str, int] = {}
    try:
        before = set(live_pids_of_run(run_id))
        assert set(run["workers"]) | {run["grandchild"]} <= before
        assert len(run["spinning"]) == SPINNERS and run["pdeathsig"] == mechanisms["pdeathsig"]
        assert watchdog is not None and alive(watchdog)
        if mechanisms["kill_watchdog"]:
            os.kill(watchdog, signal.SIGKILL)
            eventually_sync(lambda: not alive(watchdog), within=5)
        killed_at = time.monotonic()
        parent.kill()
        parent.wait(timeout=10)
        workers = run["workers"]
        if not mechanisms["kill_watchdog"]:
            # The watchdog or pdeathsig: everything, grandchild included, within 5 s.
            eventually_sync(lambda: not live_pids_of_run(run_id), within=5)
            cleanup = time.monotonic() - killed_at
            eventually_sync(lambda: not alive(watchdog), within=5)  # and the watchdog exits
            reaped, reaper_s = 0, 0.0
        else:
            if mechanisms["pdeathsig"]:
                # The workers die by pdeathsig; the grandchild has no parent-death signal.
                eventually_sync(lambda: not any(alive(pid) for pid in workers), within=5)
                expected_survivors = {run["grandchild"]}
            else:
                # Idle workers exit on stdin EOF; spinning ones never read it.
                eventually_sync(
                    lambda: not any(alive(p) for p in workers if p not in run["spinning"]),
                    within=5,
                )
                expected_survivors = {run["grandchild"], *run["spinning"]}
            time.sleep(0.3)
            assert set(live_pids_of_run(run_id)) == expected_survivors
            bystanders = start_bystanders(registry, run_id)
            reaping = time.monotonic()
            killed = reap_in_fresh_process(registry, mechanisms["reaper"])
            reaper_s = time.monotonic() - reaping
            eventually_sync(lambda: not live_pids_of_run(run_id), within=5)
            cleanup = time.monotonic() - killed_at
            if killed is not None:
                assert expected_survivors <= set(killed) <= before
            reaped = len(expected_survivors)
            for name, pid in bystanders.items():
                assert alive(pid), f"the reaper killed the {name} bystander (pid {pid})"
            # The registry forgot the dead run: reaping again kills nothing.
            assert reap_in_fresh_process(registry) == []
        report(
            capsys,
            f"parent_sigkill[{adapter}-{variant}]",
            processes_of_run=len(before),
            spinning=len(run["spinning"]),
            cleanup_s=round(cleanup, 3),
            reaped=reaped,
            reaper=mechanisms["reaper"],
            reaper_process_s=round(reaper_s, 3),
        )
    finally:
        for pid in [*bystanders.values(), *live_pids_of_run(run_id), parent.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait(timeout=10)


@pytest.mark.parametrize("kind", ["python-library", "node", "ruby"])
def test_a_daemonized_grandchild_is_left_to_the_registry_reaper(kind, tmp_path, capsys):
    """A descendant that leaves the worker's process group (a daemon) is out of reach of the
    watchdog's group kill and of pdeathsig: it outlives the parent until the registry reaper
    (``snakepit reap``, or the next pool start) finds it by its SNAKEPIT_RUN_ID."""
    registry = tmp_path / "registry"
    registry.mkdir(mode=0o700)
    parent, run = start_parent(kind, registry, daemon=True)
    run_id, daemon = run["run_id"], run["daemon"]
    try:
        assert daemon in live_pids_of_run(run_id)
        killed_at = time.monotonic()
        parent.kill()
        parent.wait(timeout=10)
        eventually_sync(lambda: set(live_pids_of_run(run_id)) <= {daemon}, within=5)
        in_group_cleanup = time.monotonic() - killed_at
        time.sleep(0.3)
        assert live_pids_of_run(run_id) == [daemon], "the daemon was expected to survive"
        assert daemon in (reap_in_fresh_process(registry) or [])
        eventually_sync(lambda: not live_pids_of_run(run_id), within=5)
        report(
            capsys,
            f"daemonized_grandchild[{kind}]",
            in_group_cleanup_s=round(in_group_cleanup, 3),
            daemon_reaped=True,
        )
    finally:
        for pid in [*live_pids_of_run(run_id), parent.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait(timeout=10)


# -- 3. start/stop cycles ------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_start_stop_cycles_leak_nothing(adapter, capsys):
    """Start and stop a small pool again and again: no process, descriptor or thread is left."""
    cycles = size("SNAKEPIT_TEST_CYCLES", 200, 50, adapter)
    fd_tolerance = 2  # a lazily opened descriptor of the interpreter or a library, not per cycle

    async def cycle() -> None:
        async with Pool(adapter, pool_size=2) as pool:
            assert (await pool.execute("ping", {}))["status"] == "ok"

    await cycle()  # warm-up: the registry, the watchdog, imports
    gc.collect()
    fds_before, threads_before = open_fds(), status_field("Threads")
    started = time.monotonic()
    for _ in range(cycles):
        await cycle()
    elapsed = time.monotonic() - started
    # The child-watcher threads of the last workers finish just after their process exits.
    with contextlib.suppress(TimeoutError):
        await eventually(lambda: status_field("Threads") <= threads_before, within=2)
    gc.collect()
    fds_after, threads_after = open_fds(), status_field("Threads")
    leftover = live_pids_of_run(RUN_ID)
    report(
        capsys,
        f"cycles[{adapter}]",
        cycles=cycles,
        pool_size=2,
        seconds=round(elapsed, 1),
        per_cycle_ms=round(1000 * elapsed / cycles, 1),
        fds_before=fds_before,
        fds_after=fds_after,
        threads_before=threads_before,
        threads_after=threads_after,
        leftover=len(leftover),
    )
    assert leftover == []
    assert fds_after <= fds_before + fd_tolerance
    assert threads_after <= threads_before


# -- 4a. fuzzing the frame decoder ---------------------------------------------------------


def protocol_module(codec: str) -> Any:
    """The protocol module on the installed codec, or a private copy on the stdlib codec.

    The copy is what runs where orjson is not installed (the tox environment): protocol.py
    loaded again while ``import orjson`` fails. The real module is not touched.
    """
    if codec == "installed":
        return installed_protocol
    spec = importlib.util.spec_from_file_location(
        "snakepit_core._protocol_on_stdlib_json", installed_protocol.__file__
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("orjson")
    sys.modules["orjson"] = None  # type: ignore[assignment]
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["orjson"]
        else:
            sys.modules["orjson"] = saved
    assert module.JSON_CODEC == "json"
    return module


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
JSON_OBJECTS = st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4)
#: Bodies that have broken JSON readers: each must be a ProtocolError, nothing else.
NASTY_BODIES = [
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b"[" * 500 + b"]" * 500,
    b"9" * 5000,
    b'{"id":1,"success":true,"result":' + b"9" * 5000 + b"}",
    b'{"id":1,"success":true,"result":1' + b"0" * 400 + b"}",
    b'{"id":1,"success":true,"result":NaN}',
    b'{"id":1,"success":true,"result":-Infinity}',
    b'{"a":1e999}',
    b'{"a":"\xff\xfe"}',
    b'{"a":"\xed\xa0\x80"}',
    b'{"a":"\\ud800"}',
    b"\xef\xbb\xbf{}",
    b"null",
    b"[]",
    b"123",
    b'"text"',
    b"",
    b"\x00" * 16,
    b'{"a":1,}',
    b"{" + b" " * 10_000,
]


def encode_body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def framed(body: bytes, delta: int = 0) -> bytes:
    return max(0, min(len(body) + delta, 0xFFFFFFFF)).to_bytes(4, "big") + body


BODIES = st.one_of(
    JSON_OBJECTS.map(encode_body),
    JSON_VALUES.map(encode_body),
    st.binary(max_size=64),
    st.sampled_from(NASTY_BODIES),
)
SEGMENTS = st.one_of(
    BODIES.map(framed),  # right length
    st.tuples(BODIES, st.integers(-8, 8) | st.integers(-(2**32), 2**32)).map(
        lambda pair: framed(*pair)
    ),  # wrong length
    st.binary(min_size=1, max_size=64),  # no frame at all
)


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    return [stream[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize("codec", ["installed", "stdlib"])
def test_fuzz_frame_decoder(codec, capsys):
    """Any bytes, in any chunking: a list of dicts or ProtocolError; valid frames round-trip."""
    examples = size("SNAKEPIT_TEST_FUZZ_EXAMPLES", 500, 500)
    protocol = protocol_module(codec)
    tally: Counter[str] = Counter()
    slowest = 0.0
    bounded = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )

    @bounded
    @given(
        segments=st.lists(SEGMENTS, min_size=1, max_size=4),
        cuts=st.lists(st.integers(0, 2**20), max_size=8),
        limit=st.sampled_from([16, 1024, 1 << 20, protocol.DEFAULT_MAX_FRAME_BYTES]),
    )
    @example(  # the bodies that break the stdlib codec, always tried first
        segments=[framed(b"{}"), framed(b"[" * 100_000), framed(b"9" * 5000)],
        cuts=[3, 50],
        limit=1 << 20,
    )
    def arbitrary_streams(segments: list[bytes], cuts: list[int], limit: int) -> None:
        nonlocal slowest
        decoder = protocol.FrameDecoder(limit)
        started = time.monotonic()
        outcome = "decoded"
        for chunk in chunked(b"".join(segments), cuts):
            try:
                messages = decoder.feed(chunk)
            except ProtocolError as exc:
                assert exc.code == "protocol_error" and exc.context.get("cause")
                outcome = f"ProtocolError:{exc.context['cause']}"
                break  # the stream cannot be trusted after that, as a worker's is not
            assert isinstance(messages, list)
            assert all(type(message) is dict for message in messages)
        tally[outcome] += 1
        slowest = max(slowest, time.monotonic() - started)
        assert time.monotonic() - started < 5, "the decoder took too long: a hang?"

    @bounded
    @given(
        messages=st.lists(JSON_OBJECTS, min_size=1, max_size=4),
        cuts=st.lists(st.integers(0, 2**20), max_size=8),
    )
    def valid_streams_round_trip(messages: list[dict[str, Any]], cuts: list[int]) -> None:
        decoder = protocol.FrameDecoder()
        stream = b"".join(protocol.encode_frame(message) for message in messages)
        decoded = [m for chunk in chunked(stream, cuts) for m in decoder.feed(chunk)]
        assert decoded == messages and decoder.pending_bytes == 0
        tally["round_trip"] += 1

    arbitrary_streams()
    valid_streams_round_trip()
    report(
        capsys,
        f"fuzz_decoder[{codec}:{protocol.JSON_CODEC}]",
        examples=sum(tally.values()),
        slowest_ms=round(1000 * slowest, 1),
        **{k.replace(":", "_"): v for k, v in sorted(tally.items())},
    )
    assert tally["round_trip"] >= examples
    assert sum(v for k, v in tally.items() if k != "round_trip") >= examples


# -- 4b. fuzzing the pool with a worker that writes anything ---------------------------------


def replay_adapter(**options: Any) -> Any:
    return ScriptAdapter(
        "replay", sys.executable, None, args=["-I", "-S", str(BRIDGES / "replay.py")], **options
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


RESPONSE_TEMPLATES = st.one_of(
    # right id, a proper response (the call may well succeed)
    st.builds(lambda r: {"id": "@ID@", "success": True, "result": r}, JSON_VALUES),
    st.builds(lambda e: {"id": "@ID@", "success": False, "error": e}, JSON_VALUES),
    # wrong id, missing fields, a success that is not a boolean
    st.builds(
        lambda i, r: {"id": i, "success": True, "result": r},
        st.integers(-(2**31), 2**31) | st.sampled_from([None, "1", 1.5, True]),
        JSON_VALUES,
    ),
    st.builds(lambda s: {"id": "@ID@", "success": s}, JSON_VALUES),
    st.just({"id": "@ID@", "success": True}),
)
REPLAY_BODIES = st.one_of(
    RESPONSE_TEMPLATES.map(encode_body),
    JSON_VALUES.map(encode_body),  # JSON that is not an object, or not a response
    st.sampled_from(NASTY_BODIES),
    st.sampled_from(
        [  # the nasty bodies again, as responses to the request in flight
            b'{"id":"@ID@","success":true,"result":' + b"[" * 100_000,
            b'{"id":"@ID@","success":true,"result":' + b"9" * 5000 + b"}",
            b'{"id":"@ID@","success":true,"result":NaN}',
            b'{"id":"@ID@","success":true,"result":"\xff"}',
        ]
    ),
    st.binary(max_size=64),
)
REPLAY_PARTS = st.one_of(
    st.builds(lambda body: {"frame": b64(body), "delta": 0}, REPLAY_BODIES),
    st.builds(
        lambda body, delta: {"frame": b64(body), "delta": delta},
        REPLAY_BODIES,
        st.integers(-8, 8) | st.sampled_from([2**20, 2**31, -(2**20)]),
    ),  # truncated frames and wrong lengths
    st.builds(lambda raw: {"raw": b64(raw)}, st.binary(min_size=1, max_size=64)),
)
REPLAY_CASES = st.fixed_dictionaries(
    {
        "parts": st.lists(REPLAY_PARTS, min_size=1, max_size=3),
        "then": st.sampled_from(["answer", "answer", "exit", "exit", "stay"]),
    }
)


def test_fuzz_worker_output_always_resolves_and_the_pool_keeps_serving(capsys):
    """A fake worker writes arbitrary bytes in reply: each call resolves (a result, or
    ProtocolError, WorkerCrashed, WorkerTimeout), never hangs, and the pool keeps serving."""
    examples = size("SNAKEPIT_TEST_FUZZ_EXAMPLES", 500, 500)
    timeout = 0.25
    tally: Counter[str] = Counter()
    slowest = 0.0
    config = {
        "pool_size": 4,
        "max_frame_bytes": 1 << 20,
        "pool_queue_timeout": 60,
        # A fake worker that breaks the protocol on its first request is an "early death":
        # keep the crash-loop breaker and its backoff out of this test.
        "crash_loop_threshold": 1_000_000,
        "restart_backoff_initial": 0.001,
        "restart_backoff_max": 0.001,
    }
    with asyncio.Runner() as runner:
        pool = Pool(replay_adapter(), **config)
        runner.run(pool.start())
        try:

            async def one(case: dict[str, Any], n: int) -> str:
                try:
                    await pool.execute("replay", case, timeout=timeout)
                except (ProtocolError, WorkerCrashed, WorkerTimeout, CommandError) as exc:
                    outcome = type(exc).__name__
                else:
                    outcome = "result"
                try:
                    echoed = await pool.execute("echo", {"n": n}, timeout=30)
                except (WorkerCrashed, ProtocolError):
                    # A fake worker that answered, then exited or wrote more, can take the next
                    # request with it: it was idle again before the rest of its output arrived.
                    # That is one request at most: the worker is replaced.
                    tally["echo_collateral"] += 1
                    echoed = await pool.execute("echo", {"n": n}, timeout=30)
                assert echoed == {"n": n}
                return outcome

            def examples_run() -> int:
                return sum(v for k, v in tally.items() if k != "echo_collateral")

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=REPLAY_CASES)
            def replayed(case: dict[str, Any]) -> None:
                nonlocal slowest
                started = time.monotonic()
                # A hang would be a TimeoutError here, not a stuck test.
                tally[runner.run(asyncio.wait_for(one(case, examples_run()), 60))] += 1
                slowest = max(slowest, time.monotonic() - started)

            replayed()
            stats = pool.stats()
        finally:
            runner.run(pool.stop())
    leftover = live_pids_of_run(RUN_ID)
    report(
        capsys,
        "fuzz_pool",
        examples=examples_run(),
        **dict(sorted(tally.items())),
        restarts=stats["restarts"],
        slowest_s=round(slowest, 2),
        leftover=len(leftover),
    )
    assert examples_run() >= examples
    assert tally["ProtocolError"] > 0 and tally["result"] > 0
    assert leftover == []


STDLIB_POOL = """
import asyncio, base64, json, sys, time
sys.modules["orjson"] = None  # what runs where orjson is not installed
from snakepit_core import Pool, ScriptAdapter, SnakepitError
from snakepit_core.protocol import JSON_CODEC

def replay_adapter():
    return ScriptAdapter("replay", sys.executable, None, args=["-I", "-S", sys.argv[1]])

async def main():
    async with Pool(replay_adapter(), pool_size=1) as pool:
        body = base64.b64encode(b'{"id":"@ID@","success":true,"result":' + b"[" * 100000).decode()
        started = time.monotonic()
        try:
            await pool.execute("replay", {"parts": [{"frame": body}]}, timeout=3)
            outcome = "result"
        except SnakepitError as exc:
            outcome = exc.code
        print(json.dumps([JSON_CODEC, outcome, time.monotonic() - started]))

asyncio.run(main())
"""


def test_a_deeply_nested_frame_is_a_protocol_error_on_the_stdlib_codec_too():
    done = subprocess.run(
        [sys.executable, "-c", STDLIB_POOL, str(BRIDGES / "replay.py")],
        capture_output=True,
        timeout=60,
        check=True,
    )
    codec, outcome, seconds = json.loads(done.stdout.splitlines()[-1])
    assert codec == "json"
    assert outcome == "protocol_error" and seconds < 1, (outcome, seconds)


async def test_a_bridge_that_breaks_the_protocol_on_every_first_request_opens_the_breaker(
    misbehaving,
):
    from snakepit_core.errors import AdapterUnavailable

    async with Pool(
        misbehaving(), pool_size=1, crash_loop_threshold=3, restart_backoff_initial=0.01
    ) as pool:
        with pytest.raises(AdapterUnavailable):
            for _ in range(10):
                with contextlib.suppress(ProtocolError):
                    await pool.execute("junk", {}, timeout=5)


async def test_a_worker_that_exits_at_once_is_reported_with_its_exit_code(caplog):
    from snakepit_core.errors import StartupError

    messages = []
    for _ in range(5):
        with pytest.raises(StartupError) as info:
            await Pool(ScriptAdapter("exits-at-once", "false"), pool_size=4).start()
        messages.append(str(info.value))
    callback_errors = [r for r in caplog.records if "Exception in callback" in r.getMessage()]
    assert not callback_errors, callback_errors[0].exc_info
    assert all("exit code 1" in message for message in messages), messages


# -- 5. soak -------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_soak_memory_and_descriptors_stay_flat(adapter, capsys):
    """Many requests through one pool: the parent's RSS and open descriptors stay flat."""
    total = size("SNAKEPIT_TEST_SOAK_REQUESTS", 100_000, 50_000, adapter)
    callers, warm_up = 16, max(1, total // 20)
    rss_tolerance_kib, fd_tolerance = 30 * 1024, 5
    async with Pool(adapter, pool_size=4) as pool:

        async def run(count: int) -> None:
            async def caller(share: int) -> None:
                for n in range(share):
                    assert (await pool.execute("echo", {"n": n}))["echoed"] == {"n": n}

            await asyncio.gather(
                *(caller(count // callers + (i < count % callers)) for i in range(callers))
            )

        await run(warm_up)
        gc.collect()
        rss_before, fds_before = status_field("VmRSS"), open_fds()
        started = time.monotonic()
        await run(total - warm_up)
        elapsed = time.monotonic() - started
        gc.collect()
        rss_after, fds_after = status_field("VmRSS"), open_fds()
        stats = pool.stats()
    report(
        capsys,
        f"soak[{adapter}]",
        requests=total,
        requests_per_s=round((total - warm_up) / elapsed),
        rss_mib_after_warm_up=round(rss_before / 1024, 1),
        rss_mib_at_end=round(rss_after / 1024, 1),
        rss_growth_kib=rss_after - rss_before,
        fds_after_warm_up=fds_before,
        fds_at_end=fds_after,
        errors=stats["errors"],
        restarts=stats["restarts"],
    )
    assert stats["errors"] == 0 and stats["restarts"] == 0
    assert rss_after - rss_before <= rss_tolerance_kib
    assert fds_after - fds_before <= fd_tolerance
    assert live_pids_of_run(RUN_ID) == []


# -- 6. many requests in flight per worker (protocol 2) ----------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_chaos_with_eight_requests_in_flight_per_worker(adapter, capsys):
    """SIGKILL a busy worker every 50 ms while 64 callers keep 8 requests in flight on each of
    4 workers: every call resolves with its result or WorkerCrashed, the breaker stays closed,
    and the pool is back to full size with every slot free."""
    total = size("SNAKEPIT_TEST_CHAOS_REQUESTS", 4000, 2000, adapter)
    callers, pool_size = 64, 4
    outcomes: Counter[str] = Counter()
    kills = 0
    chaos = True
    async with Pool(
        adapter,
        pool_size=pool_size,
        worker_concurrency=8,
        pool_queue_timeout=120,
        pool_max_queue_size=10_000,
    ) as pool:
        capacity = [w.capacity for w in pool.workers.values()]

        async def caller(index: int, count: int) -> None:
            for n in range(count):
                try:
                    result = await pool.execute("echo", {"c": index, "n": n}, timeout=60)
                except WorkerCrashed:
                    outcomes["crashed"] += 1
                else:
                    assert result == {"echoed": {"c": index, "n": n}}
                    outcomes["ok"] += 1

        async def killer() -> None:
            nonlocal kills
            while chaos:
                await asyncio.sleep(0.05)
                assert not pool.supervisor.breaker_open
                busy = [w for w in pool.workers.values() if w.busy and w.alive]
                if busy:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(random.choice(busy).pid, signal.SIGKILL)
                        kills += 1

        share = [total // callers + (i < total % callers) for i in range(callers)]
        killing = asyncio.ensure_future(killer())
        await asyncio.wait_for(
            asyncio.gather(*(caller(i, share[i]) for i in range(callers))), timeout=170
        )
        chaos = False
        await killing
        await eventually(lambda: full(pool, pool_size), within=10)
        stats = pool.stats()
    report(
        capsys,
        f"chaos_concurrency_8[{adapter}]",
        requests=total,
        capacity=capacity,
        ok=outcomes["ok"],
        crashed=outcomes["crashed"],
        kills=kills,
        restarts=stats["restarts"],
    )
    assert outcomes["ok"] + outcomes["crashed"] == total
    assert stats["in_flight"] == 0 and stats["queued"] == 0 and not stats["breaker_open"]
    assert live_pids_of_run(RUN_ID) == []


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_cancellation_storm_leaves_every_slot_free(adapter, capsys):
    """2,000 short sleeps with 8 in flight per worker, half of them cancelled at a random
    moment: afterwards nothing is busy, in flight or queued, every worker has its slots back
    and serves, and no caller that was not cancelled failed."""
    total, pool_size = 2000, 2
    outcomes: Counter[str] = Counter()
    async with Pool(
        adapter,
        pool_size=pool_size,
        worker_concurrency=8,
        pool_max_queue_size=10_000,
        pool_queue_timeout=120,
    ) as pool:
        calls = [
            asyncio.ensure_future(pool.execute("sleep", {"seconds": 0.01}, timeout=60))
            for _ in range(total)
        ]
        victims = random.sample(range(total), total // 2)
        for batch in range(0, len(victims), 50):
            await asyncio.sleep(random.uniform(0, 0.02))
            for index in victims[batch : batch + 50]:
                calls[index].cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            outcomes[type(result).__name__] += 1
        await eventually(
            lambda: pool.stats()["in_flight"] == 0 and pool.stats()["available"] == pool_size,
            within=15,
        )
        stats = pool.stats()
        for worker in list(pool.workers.values()):
            assert await pool.execute("echo", {"w": worker.id}) == {"echoed": {"w": worker.id}}
    report(capsys, f"cancel_storm[{adapter}]", calls=total, restarts=stats["restarts"], **outcomes)
    assert set(outcomes) <= {"dict", "CancelledError"}, outcomes
    assert outcomes["CancelledError"] <= total // 2
    assert (stats["busy"], stats["in_flight"], stats["queued"]) == (0, 0, 0)
    assert stats["available"] == pool_size
