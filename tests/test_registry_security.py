"""The process registry distrusts its files: hostile or broken registries never stop a pool,
never make it kill a live run, and the run id is never shown to other users (RELIABILITY.md).

Each hostile case is built for real (a FIFO, a symbolic link, a world-writable directory, a
directory and a forged database made by uid 65534 from a process that dropped to it), then a
real pool of the "python" adapter must start and serve with one warning logged.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from damage_helpers import alive
from rich.console import Console

from snakepit_core import Pool
from snakepit_core import registry as registry_module
from snakepit_core.doctor import print_registry
from snakepit_core.registry import DB_NAME, get_registry
from snakepit_core.runinfo import current_run_id
from snakepit_core.watchdog import get_watchdog

NOBODY = 65534
SCHEMA = (
    "CREATE TABLE workers (pid INTEGER, start_time INTEGER, run_id TEXT, owner_pid INTEGER,"
    " owner_start INTEGER, worker_id TEXT, PRIMARY KEY (pid, start_time))"
)


@pytest.fixture
def use_registry(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """Point this process's registry at a directory and forget the current one."""

    def use(directory: Path) -> None:
        monkeypatch.setenv("SNAKEPIT_REGISTRY_DIR", str(directory))
        monkeypatch.setattr(registry_module, "_registry", None)

    return use


def registry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "snakepit.registry"]


async def serve_one() -> None:
    async with Pool("python", pool_size=1) as pool:
        assert (await pool.execute("ping", {}))["status"] == "ok"


def write_forged_db(path: Path, run_id: str, pids: list[int]) -> None:
    """A registry naming ``run_id`` (a live run) with an owner that is long gone."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(SCHEMA)
        db.executemany(
            "INSERT INTO workers VALUES (?, ?, ?, ?, ?, ?)",
            [(pid, 1, run_id, 2**22 - 1, 1, "forged") for pid in pids],
        )


# -- hostile directories and files ---------------------------------------------------------


def fifo_as_db(base: Path) -> Path:
    base.mkdir(mode=0o700)
    os.mkfifo(base / DB_NAME)
    return base


def directory_as_db(base: Path) -> Path:
    base.mkdir(mode=0o700)
    (base / DB_NAME).mkdir()
    return base


def symlink_as_db(base: Path) -> Path:
    base.mkdir(mode=0o700)
    (base / DB_NAME).symlink_to(base.parent / "elsewhere.sqlite3")
    return base


def symlinked_dir(base: Path) -> Path:
    real = base.parent / "real"
    real.mkdir(mode=0o700)
    base.symlink_to(real)
    return base


def world_writable_dir(base: Path) -> Path:
    base.mkdir()
    base.chmod(0o777)
    return base


def group_readable_dir(base: Path) -> Path:
    base.mkdir(mode=0o700)
    base.chmod(0o750)
    return base


def group_writable_dir(base: Path) -> Path:
    base.mkdir()
    base.chmod(0o770)
    return base


def file_as_dir(base: Path) -> Path:
    base.write_bytes(b"not a directory")
    return base


HOSTILE = {
    "fifo_as_db": (fifo_as_db, "is a FIFO"),
    "directory_as_db": (directory_as_db, "is a directory"),
    "symlink_as_db": (symlink_as_db, "is a symbolic link"),
    "symlinked_dir": (symlinked_dir, "is a symbolic link"),
    "world_writable_dir": (world_writable_dir, "has mode 0777"),
    "group_writable_dir": (group_writable_dir, "has mode 0770"),
    "group_readable_dir": (group_readable_dir, "has mode 0750"),
    "file_as_dir": (file_as_dir, "is not a directory"),
}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Type and mode of everything under ``root``, without following links."""
    return {
        str(path.relative_to(root)): (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode))
        for path in [root, *root.rglob("*")]
        for info in [path.lstat()]
    }


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_hostile_registry_is_refused_and_pools_still_serve(
    case, tmp_path, use_registry, caplog
):
    make, reason = HOSTILE[case]
    use_registry(make(tmp_path / "registry"))
    before = snapshot(tmp_path)
    caplog.set_level(logging.WARNING, "snakepit.registry")
    await serve_one()
    disabled = get_registry().disabled
    assert disabled is not None and reason in disabled.reason
    assert "SNAKEPIT_REGISTRY_DIR" in disabled.remedy
    [warning] = registry_warnings(caplog)
    assert warning.startswith("process registry disabled") and reason in warning
    assert snapshot(tmp_path) == before, "the registry changed what it refused"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
async def test_a_corrupt_database_is_moved_aside_and_replaced(
    damage, tmp_path, use_registry, caplog
):
    directory = tmp_path / "registry"
    directory.mkdir(mode=0o700)
    db = directory / DB_NAME
    if damage == "garbage":
        db.write_bytes(os.urandom(8192))
    else:  # a sound header, then pages that are not there
        write_forged_db(db, "x", list(range(2000)))
        db.write_bytes(db.read_bytes()[:6000])
    broken = db.read_bytes()
    use_registry(directory)
    caplog.set_level(logging.WARNING, "snakepit.registry")
    async with Pool("python", pool_size=1) as pool:
        assert (await pool.execute("ping", {}))["status"] == "ok"
        [worker] = pool.workers.values()
        with contextlib.closing(sqlite3.connect(db)) as check:
            rows = check.execute("SELECT pid, run_id FROM workers").fetchall()
        assert rows == [(worker.pid, current_run_id())]
    assert get_registry().disabled is None
    [aside] = directory.glob(f"{DB_NAME}.corrupt-*")
    assert aside.read_bytes() == broken
    [warning] = registry_warnings(caplog)
    assert "corrupt" in warning and aside.name in warning


async def test_the_registry_it_creates_is_private(tmp_path, use_registry):
    directory = tmp_path / "new" / "registry"
    use_registry(directory)
    await serve_one()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = list(directory.iterdir())
    assert {f.name for f in files} >= {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"}
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


async def test_doctor_says_the_registry_is_disabled_and_why(tmp_path, use_registry):
    use_registry(world_writable_dir(tmp_path / "registry"))
    out = io.StringIO()
    print_registry(Console(file=out, width=1000))
    line = out.getvalue()
    assert "process registry: disabled" in line and "mode 0777" in line
    assert f"Remedy: check its content and run `chmod 700 {tmp_path / 'registry'}`" in line


# -- forged databases naming a live run ----------------------------------------------------

VICTIM = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING)
from snakepit_core import SyncPool
from snakepit_core.registry import get_registry
with SyncPool("python", pool_size=1) as pool:
    pong = pool.execute("ping", {})["status"]
registry = get_registry()
killed = registry.reap_dead_runs().killed
reason = registry.disabled and registry.disabled.reason
print(json.dumps({"pong": pong, "killed": killed, "disabled": reason, "path": str(registry.path)}))
"""


def run_victim(env: dict[str, str]) -> tuple[dict, str]:
    """A fresh process that starts a pool (which reaps) and reaps again: what it saw."""
    done = subprocess.run(
        [sys.executable, "-c", VICTIM], capture_output=True, env=env, timeout=60, check=True
    )
    return json.loads(done.stdout), done.stderr.decode()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SNAKEPIT_", "XDG_"))}
    return {**env, **extra}


def as_nobody(action: Callable[[], None]) -> None:
    """Run ``action`` in a forked child that dropped to uid/gid 65534 (a different local user)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the attacker's setup failed"


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A fresh directory like /tmp (root's, mode 1777), so another user can create in it."""
    base = Path(tempfile.mkdtemp(prefix="snakepit-shared-"))
    base.chmod(0o1777)
    yield base
    shutil.rmtree(base)


@pytest.fixture
async def live_pool(tmp_path, use_registry) -> AsyncIterator[Pool]:
    """A running pool of this process, with its registry in a private directory."""
    directory = tmp_path / "own-registry"
    directory.mkdir(mode=0o700)
    use_registry(directory)
    async with Pool("python", pool_size=2) as pool:
        yield pool


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user (uid 65534)")
async def test_a_registry_directory_planted_by_another_user_is_refused(shared_tmp, live_pool):
    """Another user pre-creates the default registry directory with a database naming our live
    run with a dead owner: our next pool start and our reaper refuse it and kill nothing."""
    workers = [w.pid for w in live_pool.workers.values()]
    planted = shared_tmp / f"snakepit-{os.getuid()}"
    run_id = current_run_id()

    def plant() -> None:
        planted.mkdir(mode=0o700)
        write_forged_db(planted / DB_NAME, run_id, workers)

    as_nobody(plant)
    assert planted.stat().st_uid == NOBODY
    seen, stderr = run_victim(clean_env(TMPDIR=str(shared_tmp)))
    assert seen["killed"] == [] and all(alive(pid) for pid in workers)
    assert seen["path"] == str(planted / DB_NAME) and seen["pong"] == "ok"
    assert seen["disabled"] == f"{planted} is owned by uid {NOBODY}, not by you (uid 0)"
    assert stderr.count("process registry disabled") == 1
    assert (await live_pool.execute("ping", {}))["status"] == "ok"
    assert [w.pid for w in live_pool.workers.values()] == workers


async def test_a_forged_entry_in_our_own_registry_cannot_kill_a_live_run(tmp_path, live_pool):
    """Even a forged entry that reached our private registry (a live run id, a dead owner) kills
    nothing: a run is dead only when the owner named by its id is gone."""
    workers = [w.pid for w in live_pool.workers.values()]
    directory = tmp_path / "forged"
    directory.mkdir(mode=0o700)
    write_forged_db(directory / DB_NAME, current_run_id(), workers)
    seen, _ = run_victim(clean_env(SNAKEPIT_REGISTRY_DIR=str(directory)))
    assert seen["killed"] == [] and all(alive(pid) for pid in workers)
    assert seen["disabled"] is None
    assert (await live_pool.execute("ping", {}))["status"] == "ok"


# -- the run id stays private ---------------------------------------------------------------


async def test_the_run_id_is_in_no_command_line_or_shared_name(live_pool):
    token = current_run_id().split("-")[-1]  # the secret part
    watchdog = get_watchdog().pid
    assert watchdog is not None and alive(watchdog)
    pids = [watchdog, *(w.pid for w in live_pool.workers.values())]
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert cmdline and token.encode() not in cmdline, (pid, cmdline)
    names = os.listdir(tempfile.gettempdir()) + os.listdir("/dev/shm")
    assert not [name for name in names if token in name]
