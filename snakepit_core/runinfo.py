"""Identity of this process's run: the id every worker carries in ``SNAKEPIT_RUN_ID``.

A run id is ``PID-START-TOKEN``: the owner's pid, its kernel start time and 64 random bits. The
owner is part of the id so that whether a run is dead is decided from the id and the live system
alone (:func:`run_is_dead`): a registry entry, which someone else may have forged, can name a run
but never make a live owner look dead. The token makes the id unguessable; it is shown only where
other users cannot read it (the workers' environment, the private registry, the watchdog's stdin).

After ``os.fork()`` the child gets a run id of its own, so its workers, registry entries and
watchdog are its own, and reaping one never touches the other's workers.
"""

from __future__ import annotations

import itertools
import os
import secrets


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The command name may contain spaces and parentheses: split after the last ')'.
            fields = stat.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _new_run_id() -> str:
    pid = os.getpid()
    start = process_start_time(pid)
    return f"{pid}-{'' if start is None else start}-{secrets.token_hex(8)}"


#: This process's run id. Prefer :func:`current_run_id`: this name is rebound in a fork child,
#: but a copy made by ``from .runinfo import RUN_ID`` keeps the parent's id.
RUN_ID = _new_run_id()

_worker_numbers = itertools.count(1)


def current_run_id() -> str:
    """The run id of the calling process (a fork child has its own)."""
    return RUN_ID


def run_owner(run_id: str) -> tuple[int, int] | None:
    """The owner's (pid, start time) named by ``run_id``; None if it names none."""
    parts = run_id.split("-")
    if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])


def run_is_dead(run_id: str) -> bool:
    """True only if ``run_id`` names its owner and that process is gone (or its pid reused).

    A run id that names no owner (another program's, or an older snakepit's) is never dead.
    """
    owner = run_owner(run_id)
    return owner is not None and process_start_time(owner[0]) != owner[1]


def next_worker_id(adapter_name: str) -> str:
    """A worker id unique within this process, e.g. ``python-7``."""
    return f"{adapter_name}-{next(_worker_numbers)}"


def _renew_after_fork() -> None:
    global RUN_ID
    RUN_ID = _new_run_id()


os.register_at_fork(after_in_child=_renew_after_fork)
