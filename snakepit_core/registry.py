"""A process registry on disk, so workers of a dead parent can be found and reaped.

Each worker is recorded (pid, its kernel start time, run id, owner pid and owner start time)
in a small SQLite file in ``$SNAKEPIT_REGISTRY_DIR``, else ``$XDG_RUNTIME_DIR/snakepit``, else
``$TMPDIR/snakepit-$UID``. At the next pool start, and with ``snakepit reap``, every process of
this user whose environment carries the ``SNAKEPIT_RUN_ID`` of a dead run is killed, with its
process group. A run is dead only when the owner its id names (see :mod:`.runinfo`) is gone, so
the database decides which runs are looked at, never which are dead: a forged entry naming a
live run kills nothing. A pid is killed only right after checking that it is still this user's
and still carries that run id, so a recycled pid is never touched.

The registry trusts its directory only if it is a real directory (not a symbolic link) owned by
this user that no one else can write: no group or other write bit. Read access for others is
allowed (they see file names; the files are 0600), so a directory made by ``mkdir`` with the
usual umask can be configured. A directory the registry creates is 0700; it never changes the
mode of an existing one. Its parents are not checked: a configured directory should sit in a
tree only you, or root, can change. Files are trusted only if they are regular files owned by
this user (made 0600, so no one else reads the run ids). Anything else disables the registry
for this process: one warning, a line in ``snakepit doctor``, and pools run without it. A
corrupt database in that private directory is ours: it is moved aside
(``workers.sqlite3.corrupt-TIME-PID``) and a new one is created. No method raises.

The same file carries the bugs a pool's background tasks hit (:meth:`Registry.record_problem`,
the last :data:`PROBLEMS_PER_RUN` of each run), so that ``snakepit doctor``, another process,
can show the failures of pools that are still running. Like the workers, they are looked at
only for runs that are alive; they are forgotten when their pool stops or the run is reaped.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .private_dirs import Unusable, open_private_dir
from .runinfo import current_run_id, process_start_time, run_is_dead

__all__ = [
    "REGISTRY_DIR_ENV",
    "BackgroundProblem",
    "ReapReport",
    "Registry",
    "RegistryDisabled",
    "get_registry",
    "kill_run",
    "process_run_id",
    "process_start_time",
    "processes_of_run",
    "registry_dir",
]

log = logging.getLogger("snakepit.registry")

REGISTRY_DIR_ENV = "SNAKEPIT_REGISTRY_DIR"
DB_NAME = "workers.sqlite3"
#: The files SQLite keeps beside the database in WAL mode (created with the database's mode).
COMPANIONS = ("-wal", "-shm")
#: SQLite's primary result codes for a file that is not, or no longer, a sound database.
CORRUPT_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
#: How many background problems are kept per run: a bug that recurs every round of a loop
#: would otherwise grow the file for as long as the pool runs.
PROBLEMS_PER_RUN = 20
#: The longest error text kept (a repr can be as long as the data it shows).
MAX_ERROR_CHARS = 500


def registry_dir() -> Path:
    """Where the registry lives (nothing is created or checked here)."""
    explicit = os.environ.get(REGISTRY_DIR_ENV)
    if explicit:
        return Path(explicit)
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "snakepit"
    return Path(tempfile.gettempdir()) / f"snakepit-{os.getuid()}"


# -- processes -----------------------------------------------------------------------------


def _is_ours(pid: int) -> bool:
    """True if ``pid``'s real and effective uid are ours (/proc/PID/status ``Uid:``)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Uid:"):
                    real, effective = (int(uid) for uid in line.split()[1:3])
                    return real == effective == os.getuid()
    except (OSError, ValueError):
        return False
    return False


def process_run_id(pid: int) -> str | None:
    """The ``SNAKEPIT_RUN_ID`` in ``pid``'s environment, if readable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            for entry in environ.read().split(b"\0"):
                if entry.startswith(b"SNAKEPIT_RUN_ID="):
                    return entry.split(b"=", 1)[1].decode()
    except (OSError, UnicodeDecodeError):
        return None
    return None


def _of_run(pid: int, run_id: str) -> bool:
    return _is_ours(pid) and process_run_id(pid) == run_id


def processes_of_run(run_id: str) -> list[int]:
    """Every live pid of this user whose environment carries ``run_id`` (scans /proc)."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _of_run(int(e), run_id)]


def kill_run(run_id: str) -> list[int]:
    """SIGKILL every process of this user (and its group) that carries ``run_id``; the pids."""
    killed = []
    for pid in processes_of_run(run_id):
        # Checked again just before the signal: the scan took a while, the pid may be reused.
        if not _of_run(pid, run_id):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


@dataclass(frozen=True)
class ReapReport:
    runs: int
    killed: list[int]


@dataclass(frozen=True)
class BackgroundProblem:
    """A bug a pool's background task hit, as recorded by the process that runs the pool."""

    run_id: str
    owner_pid: int
    #: Whose task it was, e.g. ``"pool python"``.
    owner: str
    #: Which task failed, e.g. ``"refill"``.
    what: str
    #: The error's repr, at most :data:`MAX_ERROR_CHARS` long.
    error: str
    #: When it failed (``time.time()``: the reader is another process).
    at: float


# -- opening the database safely -----------------------------------------------------------


@dataclass(frozen=True)
class RegistryDisabled:
    """Why this process runs without the registry, and what the user can do about it."""

    reason: str
    remedy: str


class _Unusable(Exception):
    def __init__(self, reason: str, remedy: str) -> None:
        super().__init__(reason)
        self.problem = RegistryDisabled(reason, remedy)


class _Corrupt(Exception):
    pass


def _elsewhere(fix: str) -> str:
    return f"{fix}, or set {REGISTRY_DIR_ENV} to a directory of yours with mode 0700"


def _describe(mode: int) -> str:
    kinds = {stat.S_IFLNK: "a symbolic link", stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO"}
    return kinds.get(stat.S_IFMT(mode), "not a regular file")


def _open_private_dir(directory: Path) -> int:
    """An fd of ``directory`` (created 0700 if missing) after checking that only we control it."""
    try:
        return open_private_dir(directory, _elsewhere)
    except Unusable as exc:
        raise _Unusable(exc.reason, exc.remedy) from None


def _check_file(dir_fd: int, path: Path, create: bool) -> tuple[int, int] | None:
    """(device, inode) of our regular file ``path``, made 0600; None if it is absent.

    Inspected with lstat, never opened (closing any descriptor of a database this process has
    open would drop SQLite's locks on it); created with O_EXCL | O_NOFOLLOW when asked.
    """
    if create:
        with contextlib.suppress(FileExistsError):
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            os.close(os.open(path.name, flags, 0o600, dir_fd=dir_fd))
    try:
        info = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        raise _Unusable(f"{path} is {_describe(info.st_mode)}", _elsewhere(f"remove {path}"))
    if info.st_uid != os.getuid():
        raise _Unusable(
            f"{path} is owned by uid {info.st_uid}, not by you", _elsewhere(f"remove {path}")
        )
    if info.st_mode & 0o077:
        os.chmod(path.name, 0o600, dir_fd=dir_fd)  # ours, in a directory only we can write
    return info.st_dev, info.st_ino


def _check_files(dir_fd: int, path: Path) -> tuple[int, int]:
    """Check the database (creating it) and its companions; the database's identity."""
    identity = _check_file(dir_fd, path, create=True)
    assert identity is not None
    for suffix in COMPANIONS:
        _check_file(dir_fd, path.with_name(path.name + suffix), create=False)
    return identity


def _connect(path: Path) -> sqlite3.Connection:
    """An open, checked connection; ``_Corrupt`` if the file is not a sound database."""
    db = sqlite3.connect(path, timeout=5, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        db.execute(
            "CREATE TABLE IF NOT EXISTS workers (pid INTEGER, start_time INTEGER, run_id TEXT,"
            " owner_pid INTEGER, owner_start INTEGER, worker_id TEXT,"
            " PRIMARY KEY (pid, start_time))"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS background_problems (run_id TEXT NOT NULL, owner_pid"
            " INTEGER NOT NULL, owner_id INTEGER NOT NULL, owner TEXT NOT NULL, what TEXT NOT"
            " NULL, error TEXT NOT NULL, at REAL NOT NULL)"
        )
        if db.execute("PRAGMA quick_check").fetchone() != ("ok",):
            raise _Corrupt("quick_check failed")
    except sqlite3.DatabaseError as exc:
        db.close()
        code = getattr(exc, "sqlite_errorcode", None)  # absent on the module's own errors
        if isinstance(code, int) and code & 0xFF in CORRUPT_CODES:
            raise _Corrupt(str(exc)) from None
        raise _Unusable(f"database error: {exc}", _elsewhere(f"check {path}")) from None
    except _Corrupt:
        db.close()
        raise
    return db


@contextlib.contextmanager
def _locked(dir_fd: int) -> Iterator[None]:
    fcntl.flock(dir_fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(dir_fd, fcntl.LOCK_UN)


def _move_aside(dir_fd: int, path: Path, identity: tuple[int, int], why: str) -> None:
    """Rename the corrupt database and its companions, unless another process already did."""
    aside = f"{path.name}.corrupt-{int(time.time())}-{os.getpid()}"
    with _locked(dir_fd):
        info = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
        if (info.st_dev, info.st_ino) != identity:
            return
        for suffix in ("", *COMPANIONS):
            with contextlib.suppress(FileNotFoundError):
                os.rename(path.name + suffix, aside + suffix, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    log.warning("process registry was corrupt (%s): moved aside to %s, starting anew", why, aside)


def _open_database(path: Path) -> sqlite3.Connection:
    """Check the directory and files, connect, and check that SQLite opened what was checked."""
    dir_fd = _open_private_dir(path.parent)
    try:
        identity = _check_files(dir_fd, path)
        try:
            db = _connect(path)
        except _Corrupt as exc:
            _move_aside(dir_fd, path, identity, str(exc))
            identity = _check_files(dir_fd, path)
            db = _connect(path)
        opened = os.stat(path, follow_symlinks=False)
        if (opened.st_dev, opened.st_ino) != identity:
            db.close()
            raise _Unusable(f"{path} was replaced while it was opened", _elsewhere("retry"))
        return db
    except OSError as exc:
        raise _Unusable(f"{path}: {exc.strerror}", _elsewhere(f"check {path.parent}")) from None
    except _Corrupt as exc:
        raise _Unusable(f"{path} is corrupt: {exc}", _elsewhere(f"remove {path}")) from None
    finally:
        os.close(dir_fd)


# -- the registry --------------------------------------------------------------------------


class Registry:
    """The on-disk record of this user's workers and of the bugs their pools' background tasks
    hit (one per process, thread-safe, never raises).

    :attr:`disabled` says why it is off, if it is: then every method does nothing.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or registry_dir() / DB_NAME
        self.disabled: RegistryDisabled | None = None
        self._lock = threading.Lock()
        self._own_start = process_start_time(os.getpid())
        self._db: sqlite3.Connection | None = None
        try:
            self._db = _open_database(self.path)
        except _Unusable as exc:
            self._disable(exc.problem)

    def _disable(self, problem: RegistryDisabled) -> None:
        self.disabled = problem
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        log.warning(
            "process registry disabled: %s. Workers left behind by a parent that dies are then"
            " not reaped. Remedy: %s",
            problem.reason,
            problem.remedy,
        )

    def _failed(self, exc: sqlite3.Error) -> None:
        self._disable(
            RegistryDisabled(
                f"{self.path}: {exc}",
                f"if it persists, see `snakepit doctor`; a corrupt {DB_NAME} is moved aside"
                " by the next process that opens it",
            )
        )

    def add(self, pid: int, run_id: str, worker_id: str) -> None:
        with self._lock:
            if self._db is None:
                return
            try:
                # The owner columns are no longer read here (the run id names its owner), but
                # older snakepit versions sharing this file read them.
                self._db.execute(
                    "INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?, ?, ?)",
                    (pid, process_start_time(pid), run_id, os.getpid(), self._own_start, worker_id),
                )
            except sqlite3.Error as exc:
                self._failed(exc)

    def remove(self, pid: int) -> None:
        with self._lock:
            if self._db is None:
                return
            try:
                self._db.execute(
                    "DELETE FROM workers WHERE pid = ? AND run_id = ?", (pid, current_run_id())
                )
            except sqlite3.Error as exc:
                self._failed(exc)

    def record_problem(self, owner_id: int, owner: str, what: str, error: str) -> None:
        """Remember that ``owner``'s background task ``what`` failed with ``error`` (a repr).

        ``owner_id`` tells apart owners of one run that share a name (two pools of one
        adapter), for :meth:`forget_problems`. Only the run's last :data:`PROBLEMS_PER_RUN`
        are kept.
        """
        run_id = current_run_id()
        row = (run_id, os.getpid(), owner_id, owner, what, error[:MAX_ERROR_CHARS], time.time())
        with self._lock:
            if self._db is None:
                return
            try:
                self._db.execute(
                    "INSERT INTO background_problems VALUES (?, ?, ?, ?, ?, ?, ?)", row
                )
                self._db.execute(
                    "DELETE FROM background_problems WHERE run_id = ?1 AND rowid NOT IN (SELECT"
                    " rowid FROM background_problems WHERE run_id = ?1 ORDER BY rowid DESC"
                    " LIMIT ?2)",
                    (run_id, PROBLEMS_PER_RUN),
                )
            except sqlite3.Error as exc:
                self._failed(exc)

    def forget_problems(self, owner_id: int) -> None:
        """Forget what this run's ``owner_id`` recorded: it has stopped, its bugs are gone."""
        with self._lock:
            if self._db is None:
                return
            try:
                self._db.execute(
                    "DELETE FROM background_problems WHERE run_id = ? AND owner_id = ?",
                    (current_run_id(), owner_id),
                )
            except sqlite3.Error as exc:
                self._failed(exc)

    def live_problems(self) -> list[BackgroundProblem]:
        """The recorded problems of runs whose owner is alive, oldest first.

        A dead run's are not shown: its pools are gone, and the next reaping forgets them.
        """
        with self._lock:
            if self._db is None:
                return []
            try:
                rows = self._db.execute(
                    "SELECT run_id, owner_pid, owner, what, error, at FROM background_problems"
                    " ORDER BY rowid"
                ).fetchall()
            except sqlite3.Error as exc:
                self._failed(exc)
                return []
        problems = [BackgroundProblem(*row) for row in rows]
        return [problem for problem in problems if not run_is_dead(problem.run_id)]

    def reap_dead_runs(self) -> ReapReport:
        """Kill what is left of runs whose owner died; forget them and their problems."""
        with self._lock:
            if self._db is None:
                return ReapReport(0, [])
            try:
                self._forget_dead_problems(self._db)
                return self._reap(self._db)
            except sqlite3.Error as exc:
                self._failed(exc)
            except OSError as exc:  # no /proc to scan
                log.warning("cannot reap dead runs: %s", exc)
            return ReapReport(0, [])

    def _reap(self, db: sqlite3.Connection) -> ReapReport:
        run_ids = [row[0] for row in db.execute("SELECT DISTINCT run_id FROM workers")]
        dead = [run_id for run_id in run_ids if run_is_dead(run_id)]
        killed: list[int] = []
        for run_id in dead:
            killed.extend(kill_run(run_id))
            db.execute("DELETE FROM workers WHERE run_id = ?", (run_id,))
        if killed:
            log.warning(
                "reaped %d orphaned worker process(es) of %d dead run(s): %s",
                len(killed),
                len(dead),
                killed,
            )
        return ReapReport(len(dead), killed)

    @staticmethod
    def _forget_dead_problems(db: sqlite3.Connection) -> None:
        run_ids = [row[0] for row in db.execute("SELECT DISTINCT run_id FROM background_problems")]
        for run_id in run_ids:
            if run_is_dead(run_id):
                db.execute("DELETE FROM background_problems WHERE run_id = ?", (run_id,))

    def _close_in_fork_child(self) -> None:
        """Close this (inherited) connection in a fork child; the parent's stays intact.

        Closing, rather than abandoning, clears SQLite's per-process lock bookkeeping, which a
        new connection to the same file would otherwise inherit. It cannot disturb the parent:
        the child holds none of the parent's POSIX locks, and the parent's shared lock on the
        database keeps the child from checkpointing or deleting the WAL. ``_before_fork`` made
        sure no statement was running.
        """
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    """This process's registry, opened at the first call (a fork child opens its own)."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = Registry()
        return _registry


def _before_fork() -> None:
    _registry_lock.acquire()
    if _registry is not None:
        _registry._lock.acquire()


def _after_fork_in_parent() -> None:
    if _registry is not None:
        _registry._lock.release()
    _registry_lock.release()


def _after_fork_in_child() -> None:
    global _registry, _registry_lock
    inherited, _registry = _registry, None
    _registry_lock = threading.Lock()
    if inherited is not None:
        inherited._close_in_fork_child()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
