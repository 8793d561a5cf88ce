"""What a fork child does with the worker pipes it inherited from its parent.

After ``fork()`` (gunicorn ``--preload``, Celery prefork, ``multiprocessing``'s fork start
method) the child holds copies of the parent's pipe ends to every worker. A child that keeps
the write end of a worker's stdin open hides the parent's death from that worker (no EOF), so
the child points those descriptors at ``/dev/null``. They are replaced with ``dup2`` rather than
closed: the child's inherited Python objects still own those descriptor numbers, and a number
closed now could be reused by a new file that a later garbage collection would close.
"""

from __future__ import annotations

import contextlib
import os

_STDIO = (0, 1, 2)


def _pipe_inodes(pids: list[int]) -> set[str]:
    """The ``pipe:[inode]`` names of the standard streams of ``pids`` (Linux /proc)."""
    found = set()
    for pid in pids:
        for fd in _STDIO:
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("pipe:"):
                    found.add(target)
    return found


def detach_worker_pipes(pids: list[int]) -> int:
    """Point this process's descriptors of the workers' stdio pipes at /dev/null.

    Returns how many descriptors were detached. Where /proc is missing nothing is done (the
    workers still die with their parent through the parent-death signal and the watchdog).
    """
    inodes = _pipe_inodes(pids)
    if not inodes:
        return 0
    try:
        own = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    detached = 0
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for name in own:
            fd = int(name)
            with contextlib.suppress(OSError):
                if fd != devnull and os.readlink(f"/proc/self/fd/{name}") in inodes:
                    os.dup2(devnull, fd, inheritable=False)
                    detached += 1
    finally:
        os.close(devnull)
    return detached
