"""Shared-memory segments: big values travel through tmpfs files instead of the pipe.

docs/PROTOCOL.md (*Shared memory*) is the contract. A process that runs pools has one segment
directory, made when its first pool starts a worker: ``/dev/shm/snakepit-<uid>/<16 hex digits>``,
inside a per-user 0700 directory with the registry's checks (:mod:`.private_dirs`), and
holding a ``.run`` file with the run id so that a dead run's directory can be found. The pool
writes request values as ``p<n>`` files; each worker gets a random prefix for the values it
sends back. Nothing in a name tells another user which run, pid or worker it belongs to.

The pool only ever ``read``\\ s a segment (never maps one), after checking that it is a regular
file of this user at least as long as announced, so a worker that truncates or swaps a file
cannot crash the pool or make it read anything else. Files are deleted when the request ends,
when the worker that made them exits, when this process exits (``atexit``), by the watchdog
when this process is killed, and by :func:`reap_dead_runs` (``snakepit reap``, the next pool
start) for a run whose owner died.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import logging
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ProtocolError
from .private_dirs import Unusable, open_private_dir
from .runinfo import current_run_id, run_is_dead

__all__ = ["SHM_ROOT", "Segments", "SharedMemory", "get_shared_memory", "reap_dead_runs"]

log = logging.getLogger("snakepit.shm")

#: Where segment directories are made: tmpfs on Linux (never a disk-backed directory).
SHM_ROOT = Path("/dev/shm")
#: The file in a run's directory that names the run (for reaping).
RUN_FILE = ".run"
#: A message whose values in shared memory add up to this much has them written (requests)
#: or read (answers) on a thread, off the event loop: a copy of megabytes would stall every
#: other caller, and the thread puts the second core to work. Below it the hand-over costs
#: more than it gives (BENCHMARKS.md: a tie at 600 KB, +30 % at 1 MB).
STAGE_BYTES = 768 * 1024
#: Errors that mean "no room for this segment": the value goes through the pipe instead.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOMEM)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def user_root() -> Path:
    """This user's directory of run directories."""
    return SHM_ROOT / f"snakepit-{os.getuid()}"


def _elsewhere(fix: str) -> str:
    return f"{fix}; until then big values go through the pipe"


def _is_tmpfs(path: Path) -> bool:
    """True if ``path`` is on tmpfs (Linux ``/proc/self/mountinfo``: the deepest mount
    containing it)."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                head, _, tail = line.partition(" - ")
                fields = head.split()
                if len(fields) < 5 or not tail:
                    continue
                point = fields[4].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, tail.split()[0]
    except OSError:
        return False
    return kind == "tmpfs"


def open_user_root() -> int:
    """An fd of :func:`user_root`, made if missing; ``Unusable`` if there is no tmpfs or the
    directory is not this user's alone."""
    if not SHM_ROOT.is_dir() or not _is_tmpfs(SHM_ROOT):
        raise Unusable(
            f"{SHM_ROOT} is not a tmpfs directory", _elsewhere("shared memory needs Linux tmpfs")
        )
    return open_private_dir(user_root(), _elsewhere)


class SharedMemory:
    """This process's segment directory (one per run, thread-safe)."""

    def __init__(self, directory: Path, dir_fd: int) -> None:
        self.directory = directory
        self._dir_fd = dir_fd
        self._numbers = itertools.count(1)
        self._owner = os.getpid()

    @classmethod
    def create(cls) -> SharedMemory:
        """Make the run's directory; :class:`~.private_dirs.Unusable` if it cannot be trusted."""
        root = user_root()
        root_fd = open_user_root()
        try:
            name = secrets.token_hex(8)
            os.mkdir(name, 0o700, dir_fd=root_fd)
            dir_fd = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd
            )
        except OSError as exc:
            raise Unusable(
                f"cannot make a directory in {root}: {exc.strerror}", _elsewhere(f"check {root}")
            ) from None
        finally:
            os.close(root_fd)
        run_file = os.open(RUN_FILE, _NEW_FILE, 0o600, dir_fd=dir_fd)
        try:
            os.write(run_file, current_run_id().encode())
        finally:
            os.close(run_file)
        return cls(root / name, dir_fd)

    @staticmethod
    def new_prefix() -> str:
        """A fresh name prefix for one worker's segments."""
        return f"w{secrets.token_hex(8)}-"

    def write(self, data: memoryview) -> str | None:
        """A new segment holding ``data``; None if there is no room (the caller sends the value
        through the pipe). Reserved with ``posix_fallocate`` first, so a full tmpfs fails here
        with ENOSPC, never later with a SIGBUS in a worker that maps it."""
        name = f"p{next(self._numbers)}"
        fd = os.open(name, _NEW_FILE, 0o600, dir_fd=self._dir_fd)
        try:
            os.posix_fallocate(fd, 0, data.nbytes)
            written = 0
            while written < data.nbytes:
                written += os.write(fd, data[written:])
        except OSError as exc:
            os.close(fd)
            self.delete((name,))
            if exc.errno in _NO_ROOM:
                return None
            raise
        os.close(fd)
        return name

    def take(self, name: str, size: int, prefix: str) -> int:
        """Open the worker's segment ``name`` and delete its name: the descriptor returned is
        then all that is left of it (read it with :func:`read_taken`, which closes it).

        ``ProtocolError`` for a name outside ``prefix``, anything but a regular file of ours,
        or a file shorter than ``size``.
        """
        if not name.startswith(prefix) or "/" in name or "\0" in name:
            raise ProtocolError(
                f"shared-memory segment {name[:80]!r} is not one of its own (they start "
                f"with {prefix!r})",
                cause="bad_segment",
            )
        try:
            fd = os.open(name, _READ_FILE, dir_fd=self._dir_fd)
        except OSError as exc:
            raise ProtocolError(
                f"shared-memory segment {name[:80]!r} cannot be opened ({exc.strerror})",
                cause="bad_segment",
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                raise ProtocolError(
                    f"shared-memory segment {name[:80]!r} is not a regular file of this user",
                    cause="bad_segment",
                )
            if info.st_size < size:
                raise _short(name, info.st_size, size)
        except BaseException:
            os.close(fd)
            raise
        finally:
            self.delete((name,))
        return fd

    def read(self, name: str, size: int, prefix: str) -> bytes:
        """The first ``size`` bytes of the worker's segment ``name``, which is then deleted
        (the checks of :meth:`take`)."""
        return read_taken(self.take(name, size, prefix), size, name)

    def delete(self, names: Iterable[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._dir_fd)

    def delete_prefixed(self, prefix: str) -> None:
        """Delete what a worker that has exited left behind."""
        with contextlib.suppress(OSError):
            self.delete(name for name in os.listdir(self._dir_fd) if name.startswith(prefix))

    def remove(self) -> None:
        """Delete the directory and everything in it (this process's pools are done)."""
        if os.getpid() != self._owner:
            return
        shutil.rmtree(self.directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._dir_fd)


def read_taken(fd: int, size: int, name: str) -> bytes:
    """The first ``size`` bytes of a segment :meth:`SharedMemory.take` opened; closes ``fd``.
    Safe on any thread. ``ProtocolError`` if the file has shrunk meanwhile."""
    try:
        data = _read_exactly(fd, size)
    finally:
        os.close(fd)
    if len(data) < size:
        raise _short(name, len(data), size)
    return data


def _short(name: str, has: int, size: int) -> ProtocolError:
    return ProtocolError(
        f"shared-memory segment {name[:80]!r} has {has} bytes, fewer than the {size} announced",
        cause="bad_segment",
    )


def _read_exactly(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes of ``fd`` in one buffer (fewer only at the end of the file)."""
    data = os.read(fd, size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        chunk = os.read(fd, size - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def stage_segments(
    shared: SharedMemory, values: Iterable[tuple[tuple[Any, ...], memoryview]]
) -> dict[tuple[Any, ...], str]:
    """Write each value into a new segment (run on a thread); the names by path. A value that
    finds no room is left out (it goes through the pipe); on an error nothing is left."""
    staged: dict[tuple[Any, ...], str] = {}
    try:
        for path, view in values:
            name = shared.write(view)
            if name is not None:
                staged[path] = name
    except BaseException:
        shared.delete(staged.values())
        raise
    return staged


class Segments:
    """One worker's view of the segment directory: its prefix, what it may read."""

    __slots__ = ("prefix", "shared", "threshold")

    def __init__(self, shared: SharedMemory, threshold: int) -> None:
        self.shared = shared
        self.prefix = shared.new_prefix()
        self.threshold = threshold

    def environment(self) -> dict[str, str]:
        """What the worker is told (PROTOCOL.md, *Shared memory*)."""
        return {
            "SNAKEPIT_SHM_DIR": str(self.shared.directory),
            "SNAKEPIT_SHM_PREFIX": self.prefix,
            "SNAKEPIT_SHM_THRESHOLD": str(self.threshold),
        }

    def read(self, name: str, size: int) -> bytes:
        return self.shared.read(name, size, self.prefix)

    def take(self, name: str, size: int) -> int:
        return self.shared.take(name, size, self.prefix)

    def clean_up(self) -> None:
        """The worker has exited: delete the segments it made and never sent."""
        self.shared.delete_prefixed(self.prefix)


_shared: SharedMemory | None = None
_unusable = False
_lock = threading.Lock()


def get_shared_memory() -> SharedMemory | None:
    """This process's segment directory, made at the first call; None where shared memory
    cannot be used (no tmpfs, an untrustworthy directory: logged once)."""
    global _shared, _unusable
    with _lock:
        if _shared is None and not _unusable:
            try:
                _shared = SharedMemory.create()
            except Unusable as exc:
                _unusable = True
                log.warning("shared memory disabled: %s. Remedy: %s", exc.reason, exc.remedy)
                return None
            except OSError as exc:
                _unusable = True
                log.warning("shared memory disabled: %s; big values go through the pipe", exc)
                return None
            from .watchdog import get_watchdog

            get_watchdog().remove_at_exit(_shared.directory)
            atexit.register(_shared.remove)
        return _shared


def reap_dead_runs() -> int:
    """Remove the segment directories of this user's runs whose owner died; how many."""
    root = user_root()
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    removed = 0
    try:
        info = os.fstat(root_fd)
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            return 0
        for name in os.listdir(root_fd):
            if run_is_dead(_run_of(root_fd, name)):
                shutil.rmtree(name, ignore_errors=True, dir_fd=root_fd)
                removed += 1
    finally:
        os.close(root_fd)
    return removed


def _run_of(root_fd: int, name: str) -> str:
    """The run id in ``name/.run`` ("" if unreadable: such a directory is left alone)."""
    try:
        fd = os.open(f"{name}/{RUN_FILE}", _READ_FILE, dir_fd=root_fd)
    except OSError:
        return ""
    try:
        return os.read(fd, 200).decode("ascii", "replace")
    finally:
        os.close(fd)


def _forget_after_fork() -> None:
    """A fork child makes its own directory (its run id is its own); the parent's stays the
    parent's (``SharedMemory.remove`` does nothing in the child)."""
    global _shared, _unusable, _lock
    _shared, _unusable, _lock = None, False, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
