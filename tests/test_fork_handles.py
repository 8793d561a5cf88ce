"""After ``os.fork()`` the child has its own run id, registry connection and (no) watchdog.

Run as a script (``python tests/test_fork_handles.py``), this module is the parent of the
parent-SIGKILL test: it starts a SyncPool whose worker has a grandchild, forks a child that
starts nothing and sleeps, prints one JSON line describing both, and waits to be killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from damage_helpers import alive, live_pids_of_run, read_line, report, spin_adapter

from snakepit_core import registry as registry_module
from snakepit_core.registry import DB_NAME, get_registry
from snakepit_core.runinfo import current_run_id, run_owner
from snakepit_core.watchdog import get_watchdog

from conftest import eventually_sync


def in_fork_child(probe: Any) -> dict[str, Any]:
    """Run ``probe()`` in a forked child; its JSON-able result (the child always exits)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 1
        try:
            os.write(write, json.dumps(probe()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as result:
        data = result.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


def test_a_fork_child_has_its_own_run_id_and_registry_and_the_parents_stays_sound(
    tmp_path, monkeypatch
):
    directory = tmp_path / "registry"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("SNAKEPIT_REGISTRY_DIR", str(directory))
    monkeypatch.setattr(registry_module, "_registry", None)
    parent_registry = get_registry()
    parent_run = current_run_id()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        parent_registry.add(sleeper.pid, parent_run, "parent-worker")

        def probe() -> dict[str, Any]:
            inherited = registry_module._registry
            child_registry = get_registry()
            child_registry.add(os.getpid(), current_run_id(), "child-worker")
            return {
                "pid": os.getpid(),
                "run_id": current_run_id(),
                "owner": run_owner(current_run_id()),
                "forgot_registry": inherited is None and child_registry is not parent_registry,
                "child_registry_ok": child_registry.disabled is None,
                "reaped": child_registry.reap_dead_runs().killed,
                "watchdog": get_watchdog().pid,
            }

        child = in_fork_child(probe)
        assert child["run_id"] != parent_run
        assert child["owner"][0] == child["pid"]
        assert child["forgot_registry"] and child["child_registry_ok"]
        assert child["reaped"] == [] and child["watchdog"] is None
        # The parent's connection still works, and the file is sound with both records.
        parent_registry.add(sleeper.pid + 1, parent_run, "after-fork")
        assert parent_registry.disabled is None
        with contextlib.closing(sqlite3.connect(directory / DB_NAME)) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            runs = {row[0] for row in db.execute("SELECT run_id FROM workers")}
        assert runs == {parent_run, child["run_id"]}
        # The child is gone: reaping its run kills nothing of the parent's.
        assert parent_registry.reap_dead_runs().runs == 1 and alive(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()


def start_forking_parent(registry: Path, pdeathsig: bool) -> tuple[subprocess.Popen, dict]:
    env = {**os.environ, "SNAKEPIT_REGISTRY_DIR": str(registry)}
    env.pop("SNAKEPIT_PDEATHSIG", None)
    if not pdeathsig:
        env["SNAKEPIT_PDEATHSIG"] = "0"
    with open(registry / "parent.stderr", "wb") as stderr:
        parent = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    try:
        return parent, json.loads(read_line(parent, within=60))
    except BaseException:
        parent.kill()
        parent.wait()
        raise AssertionError((registry / "parent.stderr").read_text()[-3000:]) from None


@pytest.mark.parametrize("pdeathsig", [True, False], ids=["all_layers", "watchdog_only"])
def test_parent_sigkill_with_a_live_fork_child_leaves_no_worker_or_grandchild(
    pdeathsig, tmp_path, capsys
):
    """A fork child that lives on must not keep the watchdog's pipe open: when the parent is
    SIGKILLed, its workers and their grandchild are gone within 5 s, the child still runs."""
    registry = tmp_path / "registry"
    registry.mkdir(mode=0o700)
    parent, run = start_forking_parent(registry, pdeathsig)
    run_id, child = run["run_id"], run["child_pid"]
    try:
        assert run["child_run_id"] != run_id and run["child_watchdog"] is None
        # A grandchild can be caught mid-exec, its environment not yet readable: wait for it.
        everyone = {*run["workers"], run["grandchild"]}
        eventually_sync(lambda: everyone <= set(live_pids_of_run(run_id)), within=5)
        killed_at = time.monotonic()
        parent.kill()
        parent.wait(timeout=10)
        eventually_sync(lambda: not live_pids_of_run(run_id), within=5)
        cleanup = time.monotonic() - killed_at
        eventually_sync(lambda: not alive(run["watchdog_pid"]), within=5)
        assert alive(child), "the fork child was expected to live on"
        report(
            capsys,
            f"fork_child_parent_sigkill[{'pdeathsig' if pdeathsig else 'no_pdeathsig'}]",
            cleanup_s=round(cleanup, 3),
        )
    finally:
        # Only processes still alive now: a reaped parent's pid may already be someone else's.
        for pid in [*live_pids_of_run(run_id), child]:
            with contextlib.suppress(ProcessLookupError):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        parent.kill()  # a no-op once it was waited for
        parent.wait(timeout=10)
        parent.stdout.close()


def _forking_parent() -> None:
    from snakepit_core import SyncPool

    pool = SyncPool(spin_adapter("python"), pool_size=2).start()
    grandchild = pool.execute("grandchild", {})["pid"]
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, json.dumps([current_run_id(), get_watchdog().pid]).encode() + b"\n")
        time.sleep(1000)  # starts nothing; lives on after the parent's death
        os._exit(0)
    child_run_id, child_watchdog = json.loads(os.read(read, 4096))
    description = {
        "run_id": current_run_id(),
        "workers": [w.pid for w in pool.pool.workers.values()],
        "grandchild": grandchild,
        "watchdog_pid": get_watchdog().pid,
        "child_pid": child,
        "child_run_id": child_run_id,
        "child_watchdog": child_watchdog,
    }
    sys.stdout.write(json.dumps(description) + "\n")
    sys.stdout.flush()
    time.sleep(1000)  # until SIGKILL


if __name__ == "__main__":  # tests/ is sys.path[0]: damage_helpers imports as above
    _forking_parent()
