"""A bug in a pool's background work reaches ``snakepit doctor``, another process, through the
process registry, for as long as the pool runs (issue 14, item 6).

The pool runs in a real subprocess with the bundled "python" bridge; its adapter's
``worker_env`` has a bug after the first worker started, as a third-party adapter might, so
every refill after a killed worker fails.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

from snakepit_core.registry import DB_NAME, PROBLEMS_PER_RUN, Registry
from snakepit_core.runinfo import current_run_id

from conftest import eventually_sync, pids_of_run

#: Prints the pool's background error once its refill failed; a line on stdin stops the pool
#: (it prints "stopped"), the end of stdin ends the process.
BUGGY_POOL = textwrap.dedent(
    """
    import asyncio, dataclasses, os, signal, sys
    from snakepit_core import Adapter, Pool
    from snakepit_core.plugins import resolve_adapter

    class BuggyEnv(Adapter):
        calls = 0

        def worker_env(self, extra):
            BuggyEnv.calls += 1
            if BuggyEnv.calls > 1:
                raise RuntimeError("boom")
            return super().worker_env(extra)

    async def main():
        python = resolve_adapter("python")
        fields = {f.name: getattr(python, f.name) for f in dataclasses.fields(python)}
        async with Pool(BuggyEnv(**fields), pool_size=1, restart_backoff_max=0.2) as pool:
            os.kill(next(iter(pool.workers.values())).pid, signal.SIGKILL)
            while pool.stats()["background_error"] is None:
                await asyncio.sleep(0.05)
            print(pool.stats()["background_error"], flush=True)
            await asyncio.to_thread(sys.stdin.readline)
        print("stopped", flush=True)
        await asyncio.to_thread(sys.stdin.read)

    asyncio.run(main())
    """
)


def snakepit(registry_dir: Path, command: str) -> subprocess.CompletedProcess[str]:
    """``snakepit COMMAND`` as a user runs it, from another shell of the pool's user."""
    return subprocess.run(
        [sys.executable, "-m", "snakepit_core.cli", command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "SNAKEPIT_REGISTRY_DIR": str(registry_dir), "COLUMNS": "300"},
    )


@contextlib.contextmanager
def buggy_pool(registry_dir: Path, log: Path) -> Iterator[subprocess.Popen[str]]:
    """A process whose pool's refill has failed at least once; it ends with the block.

    Its log (a traceback every refill round) goes to ``log``: a pipe no one reads would fill.
    """
    with log.open("w") as stderr:
        owner = subprocess.Popen(
            [sys.executable, "-c", BUGGY_POOL],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "SNAKEPIT_REGISTRY_DIR": str(registry_dir)},
        )
    assert owner.stdin is not None and owner.stdout is not None
    try:
        assert owner.stdout.readline().strip() == "refill: RuntimeError('boom')", log.read_text()
        yield owner
    finally:
        owner.stdin.close()
        owner.wait(timeout=60)


def assert_reported(done: subprocess.CompletedProcess[str], owner_pid: int) -> None:
    """The refill bug of ``owner_pid``'s pool is one line, then a remedy; doctor exits 1."""
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    [line] = [n for n, text in enumerate(lines) if "refill failed" in text]
    assert lines[line].startswith(f"pool python (pid {owner_pid}): refill failed ")
    assert lines[line].endswith(" ago: RuntimeError('boom')")
    assert lines[line + 1].startswith("  remedy: this pool's self-healing hit a bug")


def assert_healthy(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pool background tasks: ok (no failures recorded by running pools)" in done.stdout
    assert "remedy:" not in done.stdout


def run_ids(database: Path) -> set[str]:
    """The runs with problems recorded, read past the registry."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        return {row[0] for row in db.execute("SELECT run_id FROM background_problems")}


def test_doctor_reports_a_running_pools_refill_bug_until_its_process_dies(tmp_path):
    registry_dir, log = tmp_path / "registry", tmp_path / "owner.log"
    with buggy_pool(registry_dir, log) as owner:
        done = snakepit(registry_dir, "doctor")
        assert_reported(done, owner.pid)
        [run_id] = run_ids(registry_dir / DB_NAME)
        assert run_id.rsplit("-", 1)[1] not in done.stdout  # the run's secret token
        owner.kill()  # no stop(): the rows stay behind
        owner.wait(timeout=60)
    eventually_sync(lambda: not pids_of_run(run_id), message="the run's watchdog lives on")
    assert "pool python: refill failed\nTraceback" in log.read_text()
    assert_healthy(snakepit(registry_dir, "doctor"))
    assert run_ids(registry_dir / DB_NAME) == {run_id}  # ignored, not yet forgotten
    assert snakepit(registry_dir, "reap").returncode == 0
    assert not run_ids(registry_dir / DB_NAME)


def test_a_stopped_pools_bug_is_forgotten_while_its_process_runs(tmp_path):
    registry_dir, log = tmp_path / "registry", tmp_path / "owner.log"
    with buggy_pool(registry_dir, log) as owner:
        assert_reported(snakepit(registry_dir, "doctor"), owner.pid)
        assert owner.stdin is not None and owner.stdout is not None
        owner.stdin.write("stop\n")
        owner.stdin.flush()
        assert owner.stdout.readline().strip() == "stopped", log.read_text()
        assert_healthy(snakepit(registry_dir, "doctor"))
        assert not run_ids(registry_dir / DB_NAME)
    assert owner.returncode == 0, log.read_text()


def test_record_problem_keeps_the_runs_last_few(tmp_path):
    registry = Registry(tmp_path / "registry" / DB_NAME)
    assert registry.disabled is None
    for n in range(PROBLEMS_PER_RUN + 5):
        registry.record_problem(1, "pool python", "refill", f"RuntimeError('boom {n}')")
    problems = registry.live_problems()
    assert [p.error for p in problems] == [
        f"RuntimeError('boom {n}')" for n in range(5, PROBLEMS_PER_RUN + 5)
    ]
    assert {(p.run_id, p.owner_pid, p.owner, p.what) for p in problems} == {
        (current_run_id(), os.getpid(), "pool python", "refill")
    }


def test_forget_problems_forgets_one_owner_of_a_shared_name(tmp_path):
    registry = Registry(tmp_path / "registry" / DB_NAME)
    registry.record_problem(1, "pool python", "refill", "RuntimeError('first pool')")
    registry.record_problem(2, "pool python", "refill", "RuntimeError('second pool')")
    registry.forget_problems(1)
    assert [p.error for p in registry.live_problems()] == ["RuntimeError('second pool')"]


def test_a_dead_runs_problems_are_ignored_then_reaped(tmp_path):
    registry = Registry(tmp_path / "registry" / DB_NAME)
    registry.record_problem(1, "pool python", "refill", "RuntimeError('live')")
    dead_run = f"{2**22 - 1}-1-{'0' * 16}"  # a pid above the kernel's limit: never alive
    with contextlib.closing(sqlite3.connect(registry.path)) as db, db:
        db.execute(
            "INSERT INTO background_problems VALUES (?, ?, ?, ?, ?, ?, ?)",
            (dead_run, 2**22 - 1, 1, "pool ruby", "refill", "RuntimeError('dead')", 0.0),
        )
    assert [p.error for p in registry.live_problems()] == ["RuntimeError('live')"]
    registry.reap_dead_runs()
    assert run_ids(registry.path) == {current_run_id()}


def test_a_disabled_registry_records_nothing_and_never_raises(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # others could replace the database: the registry refuses it
    registry = Registry(shared / DB_NAME)
    assert registry.disabled is not None
    registry.record_problem(1, "pool python", "refill", "RuntimeError('boom')")
    registry.forget_problems(1)
    assert registry.live_problems() == []
    assert not (shared / DB_NAME).exists()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777
