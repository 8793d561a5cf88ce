"""One watchdog process per parent process, started with the first pool.

The kernel's parent-death signal stops the workers themselves when the parent dies, but not
what they started, and not on every platform. The watchdog (``_watchdog.py``) learns the run id
and every worker's process group through a pipe and kills those groups when that pipe reaches
EOF, which happens whenever the parent dies, however it dies.

The run id goes down the pipe, never on the watchdog's command line, which every user can read.
The parent keeps the pipe's write end as a raw descriptor: a fork child closes its copy at once
(``os.register_at_fork``), so a living fork child never holds the pipe open after the parent's
death, and starts a watchdog of its own if it starts workers.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from .runinfo import current_run_id

log = logging.getLogger("snakepit.watchdog")

SCRIPT = Path(__file__).resolve().parent / "_watchdog.py"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Watchdog:
    """The parent's end of the watchdog pipe (thread-safe, started lazily)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        #: The write end of the watchdog's stdin, -1 when there is none.
        self._pipe = -1
        #: The groups being watched, re-sent to a new watchdog if the old one was killed.
        self._groups: set[int] = set()
        #: Shared-memory directories to remove when this process dies (re-sent likewise).
        self._directories: set[Path] = set()

    def _start(self) -> None:
        """Start a watchdog and tell it the run id and every watched group."""
        self._close_pipe()
        read, write = os.pipe()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", str(SCRIPT)],
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            os.close(write)
            log.warning(
                "cannot start the snakepit watchdog (%s); relying on the parent-death "
                "signal, stdin EOF and the registry",
                exc,
            )
            self._process = None
            return
        finally:
            os.close(read)
        self._pipe = write
        lines = [
            current_run_id().encode(),
            *(b"+%d" % group for group in self._groups),
            *(b"=" + os.fsencode(directory) for directory in self._directories),
        ]
        self._write(b"\n".join(lines) + b"\n")

    def _write(self, data: bytes) -> bool:
        try:
            _write_all(self._pipe, data)
        except OSError:  # the watchdog died (EPIPE)
            self._close_pipe()
            return False
        return True

    def _close_pipe(self) -> None:
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1

    def _send(self, line: bytes) -> None:
        with self._lock:
            alive = self._process is not None and self._process.poll() is None
            if not (alive and self._pipe >= 0 and self._write(line)):
                self._start()  # it sends every group, this one included

    def watch(self, pgid: int) -> None:
        """Kill process group ``pgid`` if this process dies before :meth:`forget`."""
        self._groups.add(pgid)
        self._send(b"+%d\n" % pgid)

    def forget(self, pgid: int) -> None:
        self._groups.discard(pgid)
        self._send(b"-%d\n" % pgid)

    def remove_at_exit(self, directory: Path) -> None:
        """Remove ``directory`` (this run's shared-memory segments) if this process dies.

        The watchdog removes it only if its ``.run`` file names this run."""
        self._directories.add(directory)
        self._send(b"=" + os.fsencode(directory) + b"\n")

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _reset_in_fork_child(self) -> None:
        """Forget the parent's watchdog: close the inherited write end (raw, nothing to flush)."""
        self._close_pipe()
        if self._process is not None:
            # The parent's child, not ours: mark it done so Popen neither waits nor warns.
            self._process.returncode = 0
        self._lock = threading.Lock()
        self._process = None
        self._groups = set()
        self._directories = set()


_watchdog = Watchdog()


def get_watchdog() -> Watchdog:
    return _watchdog


# Holding the lock across fork() means no message is half sent and no watchdog half started.
os.register_at_fork(
    before=lambda: _watchdog._lock.acquire(),
    after_in_parent=lambda: _watchdog._lock.release(),
    after_in_child=_watchdog._reset_in_fork_child,
)
