"""A process registry on disk, so workers of a dead parent can be found and reaped.

Each worker is recorded (pid, its kernel start time, run id, owner pid and owner start time)
in a small SQLite file in ``$XDG_RUNTIME_DIR/snakepit`` or a 0700 per-user temp directory. At
the next pool start, and with ``snakepit reap``, every process whose environment carries the
``SNAKEPIT_RUN_ID`` of a run whose owner is gone is killed, with its process group. A pid is
only ever killed after checking that it still belongs to that run (start time or environment),
so a recycled pid is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .runinfo import RUN_ID

log = logging.getLogger("snakepit.registry")

REGISTRY_DIR_ENV = "SNAKEPIT_REGISTRY_DIR"


def registry_dir() -> Path:
    """Where the registry lives: a private (0700) per-user directory."""
    explicit = os.environ.get(REGISTRY_DIR_ENV)
    if explicit:
        base = Path(explicit)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "snakepit"
    else:
        base = Path(tempfile.gettempdir()) / f"snakepit-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The command name may contain spaces and parentheses: split after the last ')'.
            fields = stat.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def process_run_id(pid: int) -> str | None:
    """The ``SNAKEPIT_RUN_ID`` in ``pid``'s environment, if readable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            for entry in environ.read().split(b"\0"):
                if entry.startswith(b"SNAKEPIT_RUN_ID="):
                    return entry.split(b"=", 1)[1].decode()
    except OSError:
        return None
    return None


def processes_of_run(run_id: str) -> list[int]:
    """Every live pid whose environment carries ``run_id`` (scans /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and process_run_id(int(entry)) == run_id:
            found.append(int(entry))
    return found


@dataclass(frozen=True)
class ReapReport:
    runs: int
    killed: list[int]


class Registry:
    """The on-disk record of this user's workers (one per process, thread-safe)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or registry_dir() / "workers.sqlite3"
        self._lock = threading.Lock()
        self._own_start = process_start_time(os.getpid())
        self._db = sqlite3.connect(
            self.path, timeout=5, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS workers (pid INTEGER, start_time INTEGER, run_id TEXT,"
            " owner_pid INTEGER, owner_start INTEGER, worker_id TEXT,"
            " PRIMARY KEY (pid, start_time))"
        )

    def add(self, pid: int, run_id: str, worker_id: str) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.execute(
                "INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?, ?, ?)",
                (pid, process_start_time(pid), run_id, os.getpid(), self._own_start, worker_id),
            )

    def remove(self, pid: int) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.execute("DELETE FROM workers WHERE pid = ? AND run_id = ?", (pid, RUN_ID))

    def _dead_runs(self) -> list[str]:
        rows = self._db.execute(
            "SELECT DISTINCT run_id, owner_pid, owner_start FROM workers"
        ).fetchall()
        return [
            run_id
            for run_id, owner_pid, owner_start in rows
            if run_id != RUN_ID and process_start_time(owner_pid) != owner_start
        ]

    def reap_dead_runs(self) -> ReapReport:
        """Kill what is left of runs whose owner died; forget them."""
        with self._lock:
            try:
                dead = self._dead_runs()
            except sqlite3.Error as exc:
                log.warning("process registry %s unreadable: %s", self.path, exc)
                return ReapReport(0, [])
            killed: list[int] = []
            for run_id in dead:
                killed.extend(kill_run(run_id))
                self._db.execute("DELETE FROM workers WHERE run_id = ?", (run_id,))
            if killed:
                log.warning(
                    "reaped %d orphaned worker process(es) of %d dead run(s): %s",
                    len(killed),
                    len(dead),
                    killed,
                )
            return ReapReport(len(dead), killed)


def kill_run(run_id: str) -> list[int]:
    """SIGKILL every process (and its group) that carries ``run_id``; returns the pids."""
    pids = processes_of_run(run_id)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
    return pids


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = Registry()
        return _registry
