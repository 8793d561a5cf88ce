"""One watchdog process per parent process, started with the first pool.

The kernel's parent-death signal stops the workers themselves when the parent dies, but not
what they started, and not on every platform. The watchdog (``_watchdog.py``) learns every
worker's process group through a pipe and kills those groups when that pipe reaches EOF,
which happens whenever the parent dies, however it dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from .runinfo import RUN_ID

log = logging.getLogger("snakepit.watchdog")

SCRIPT = Path(__file__).resolve().parent / "_watchdog.py"


class Watchdog:
    """The parent's end of the watchdog pipe (thread-safe, started lazily)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._owner_pid = -1
        #: The groups being watched, re-sent to a new watchdog if the old one was killed.
        self._groups: set[int] = set()

    def _ensure_started(self) -> subprocess.Popen[bytes] | None:
        alive = self._process is not None and self._process.poll() is None
        if alive and self._owner_pid == os.getpid():
            return self._process
        if self._owner_pid != os.getpid():
            self._groups.clear()  # a forked child inherits none of its parent's workers
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", str(SCRIPT), RUN_ID],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            log.warning(
                "cannot start the snakepit watchdog (%s); relying on the parent-death "
                "signal, stdin EOF and the registry",
                exc,
            )
            self._process = None
        self._owner_pid = os.getpid()
        if self._process is not None and self._process.stdin is not None and self._groups:
            with contextlib.suppress(OSError, ValueError):
                self._process.stdin.write(b"".join(b"+%d\n" % g for g in self._groups))
                self._process.stdin.flush()
        return self._process

    def _send(self, line: bytes) -> None:
        with self._lock:
            process = self._ensure_started()
            if process is None or process.stdin is None:
                return
            with contextlib.suppress(OSError, ValueError):
                process.stdin.write(line)
                process.stdin.flush()

    def watch(self, pgid: int) -> None:
        """Kill process group ``pgid`` if this process dies before :meth:`forget`."""
        self._groups.add(pgid)
        self._send(b"+%d\n" % pgid)

    def forget(self, pgid: int) -> None:
        self._groups.discard(pgid)
        self._send(b"-%d\n" % pgid)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid


_watchdog = Watchdog()


def get_watchdog() -> Watchdog:
    return _watchdog
