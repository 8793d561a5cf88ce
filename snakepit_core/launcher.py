"""How a worker's command line is launched so it dies with its parent.

On Linux, ``setpriv --pdeathsig KILL`` (util-linux) sets the parent-death signal in the child
right before it execs the worker, so the kernel kills the worker when the thread that spawned
it dies, even if the worker is busy in a loop that never reads stdin. This avoids
``preexec_fn``, which is unsafe in a process with threads. Where setpriv is missing, workers
still exit on stdin EOF and the watchdog and registry clean up (see RELIABILITY.md).
"""

from __future__ import annotations

import os
import shutil
import sys
from functools import cache

#: Set to "0" to launch workers without the parent-death signal (for measurements).
PDEATHSIG_ENV = "SNAKEPIT_PDEATHSIG"


@cache
def _setpriv() -> str | None:
    if not sys.platform.startswith("linux") or os.environ.get(PDEATHSIG_ENV) == "0":
        return None
    return shutil.which("setpriv")


def launch_argv(argv: list[str]) -> list[str]:
    """``argv`` wrapped so the worker gets SIGKILL when its parent dies (where supported)."""
    setpriv = _setpriv()
    if setpriv is None:
        return argv
    return [setpriv, "--pdeathsig", "KILL", "--", *argv]


def pdeathsig_available() -> bool:
    return _setpriv() is not None
