"""The watchdog process: kills a parent's worker process groups when the parent dies.

Run by :mod:`snakepit_core.watchdog` as ``python -I -S _watchdog.py`` in its own session, with
its stdin a pipe from the parent. The first line is the parent's ``SNAKEPIT_RUN_ID`` (sent on
the pipe because a command line is readable by every user); then the parent writes ``+PGID``
when a worker starts and ``-PGID`` when it is gone, and ``=PATH`` for its shared-memory
directory. When stdin reaches EOF the parent has exited (cleanly or by SIGKILL): every process
group still listed is sent SIGKILL, which also takes the workers' own children, and then the
directory is removed if its ``.run`` file names the run (so no other directory is touched).
A group is only killed if one of its processes still belongs to this user and carries the run
id, so a process group id reused by someone else is never touched.
Standard library only, so it starts in milliseconds.
"""

import contextlib
import os
import shutil
import signal
import sys


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    run_id = sys.stdin.buffer.readline().strip()
    groups, directories = listed()
    # Where /proc exists, kill only groups that still hold a process of this run; elsewhere
    # the recorded groups are all there is to go on.
    if os.path.isdir("/proc"):
        groups &= groups_of_run(run_id)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    for directory in directories:
        remove_directory_of_run(directory, run_id)


def listed() -> tuple[set[int], set[bytes]]:
    """The groups still listed when stdin ends (``+PGID`` adds, ``-PGID`` removes) and the
    directories (``=PATH``)."""
    groups = set()
    directories = set()
    for line in sys.stdin.buffer:
        text = line.rstrip(b"\n")
        if not text.strip():
            continue
        sign, rest = text[:1], text[1:]
        if sign == b"=":
            directories.add(rest)
        elif sign == b"+":
            groups.add(int(rest))
        else:
            groups.discard(int(rest))
    return groups, directories


def remove_directory_of_run(directory: bytes, run_id: bytes) -> None:
    """Remove ``directory`` if its ``.run`` file (not a link) holds ``run_id``."""
    try:
        fd = os.open(os.path.join(directory, b".run"), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        if os.read(fd, 200) != run_id:
            return
    finally:
        os.close(fd)
    shutil.rmtree(directory, ignore_errors=True)


def is_ours(pid: str) -> bool:
    """True if the process's real and effective uid are this process's."""
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"Uid:"):
                real, effective = (int(uid) for uid in line.split()[1:3])
                return real == effective == os.getuid()
    return False


def groups_of_run(run_id: bytes) -> set[int]:
    """Process groups that have a member of this user whose environment carries ``run_id``."""
    marker = b"SNAKEPIT_RUN_ID=" + run_id
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if not is_ours(entry):
                continue
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if marker not in environ.read().split(b"\0"):
                    continue
            found.add(os.getpgid(int(entry)))
        except (OSError, ValueError):
            continue
    return found


if __name__ == "__main__":
    main()
