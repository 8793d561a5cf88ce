"""``snakepit doctor``: what works here, what is missing, and what to do about it.

Every problem comes with a remedy: on the next line (``  remedy: ...``), or at the end of the
registry's one-line message. What an adapter's runtime
needs (the minimum version, how to install it, the variable that picks another executable)
comes from the adapter, so this module names no runtime.

Pools run in other processes, so what their background tasks (refill, health checks,
recycling) failed with is read from the process registry: one line per failure of a pool whose
process is still running. Such a failure is a bug that is still there, so it makes doctor exit
non-zero, as a broken adapter or plugin does. A pool that has stopped, or whose process has
ended, is not shown.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, metadata

from rich.console import Console
from rich.markup import escape

from .config_sources import load_config
from .launcher import pdeathsig_available
from .plugins import get_plugin_manager
from .protocol import get_codec
from .registry import PROBLEMS_PER_RUN, get_registry
from .runtimes import check_runtime

OK = "[green]ok[/green]"


def run_doctor(console: Console) -> bool:
    """Print one line per check (and a remedy under each problem); False if an installed
    adapter cannot run, a plugin is broken or a running pool's background task hit a bug."""
    healthy = True
    print_host(console)
    manager = get_plugin_manager()
    for name, adapter in sorted(manager.adapters().items()):
        status = check_runtime(adapter)
        source = escape(
            f"{adapter.distribution} {adapter.version or ''}".strip()
            if adapter.distribution
            else "registered in-process"
        )
        if status.problem is None:
            console.print(f"adapter {escape(name)}: {OK} {escape(status.version)} ({source})")
            continue
        healthy = False
        console.print(f"adapter {escape(name)}: [red]{escape(status.problem)}[/red] ({source})")
        print_remedy(console, status.remedy or "")
    for failure in manager.failures:
        healthy = False
        console.print(f"[red]broken plugin[/red] {escape(failure.name)}: {escape(failure.error)}")
        print_remedy(console, "fix or uninstall the distribution that provides it")
    if pdeathsig_available():
        console.print(f"parent-death signal: {OK} (setpriv --pdeathsig)")
    else:
        console.print(
            "parent-death signal: [yellow]unavailable[/yellow] (stdin EOF, the watchdog and "
            "the registry still clean up)"
        )
        print_remedy(console, "install setpriv: apt-get install -y util-linux")
    print_registry(console)
    print_shared_memory(console)
    healthy = print_background_problems(console) and healthy
    console.print(f"JSON codec: {escape(get_codec(load_config(None, {}).json_codec).name)}")
    try:
        import uvloop  # noqa: F401

        console.print("event loop: uvloop available")
    except ImportError:
        console.print(
            escape("event loop: asyncio (pip install 'snakepit-core[fast]' adds uvloop and orjson)")
        )
    return healthy


def print_host(console: Console) -> None:
    """The interpreter snakepit runs on, and the versions snakepit-core supports."""
    try:
        required = metadata("snakepit-core")["Requires-Python"] or "any"
    except (PackageNotFoundError, KeyError):  # pragma: no cover - a source tree
        required = "unknown"
    console.print(
        escape(
            f"host: {platform.python_implementation()} {platform.python_version()} on "
            f"{sys.platform} (snakepit-core supports {required})"
        ),
        highlight=False,
    )


def print_remedy(console: Console, remedy: str) -> None:
    console.print(f"  remedy: {escape(remedy)}", highlight=False)


def print_registry(console: Console) -> None:
    """Where the registry is, or why this process runs without it and what to do about it."""
    registry = get_registry()
    if registry.disabled is None:
        console.print(f"process registry: {OK} {escape(str(registry.path))}")
        return
    console.print(
        f"process registry: [yellow]disabled[/yellow] ({escape(registry.disabled.reason)}); "
        "orphans of a parent that dies are not reaped. "
        f"Remedy: {escape(registry.disabled.remedy)}",
        highlight=False,
    )


def print_shared_memory(console: Console) -> None:
    """Whether big values can go through shared memory, and how much room there is."""
    from .private_dirs import Unusable
    from .shm import SHM_ROOT, open_user_root, user_root

    try:
        os.close(open_user_root())
    except Unusable as exc:
        console.print(
            f"shared memory: [yellow]unavailable[/yellow] ({escape(exc.reason)}); big values"
            " go through the pipe"
        )
        print_remedy(console, exc.remedy)
        return
    room = os.statvfs(SHM_ROOT)
    free = room.f_bavail * room.f_frsize
    console.print(
        f"shared memory: {OK} {escape(str(user_root()))} ({free / 2**20:,.0f} MiB free on"
        f" {SHM_ROOT}; a value that finds no room goes through the pipe)"
    )


def print_background_problems(console: Console) -> bool:
    """A line for each bug the background tasks of a running pool hit; False if there is one.

    The same failure recurring (a refill loop retries every round) is one line with its count.
    The run id is not shown: it is a secret of the run (see :mod:`.runinfo`), the pid says
    which process it is.
    """
    registry = get_registry()
    if registry.disabled is not None:
        console.print("pool background tasks: [yellow]unknown[/yellow] (no process registry)")
        return True
    failures: dict[tuple[str, int, str, str], list[float]] = {}
    for problem in registry.live_problems():
        key = (problem.owner, problem.owner_pid, problem.what, problem.error)
        failures.setdefault(key, []).append(problem.at)
    if not failures:
        console.print(f"pool background tasks: {OK} (no failures recorded by running pools)")
        return True
    for (owner, pid, what, error), times in failures.items():
        failed = escape(f"{what} failed {_when(times)}: {error}")
        console.print(f"{escape(owner)} (pid {pid}): [yellow]{failed}[/yellow]", highlight=False)
        print_remedy(
            console,
            "this pool's self-healing hit a bug: see its log for the traceback; restarting the"
            " pool or its process clears it",
        )
    return False


def _when(times: list[float]) -> str:
    """``12 s ago``, ``3 times, last 12 s ago``, or ``20 or more times, ...`` when older ones
    may have been dropped (the registry keeps a run's last few)."""
    ago = _ago(max(times))
    if len(times) == 1:
        return ago
    more = " or more" if len(times) >= PROBLEMS_PER_RUN else ""
    return f"{len(times)}{more} times, last {ago}"


def _ago(at: float) -> str:
    seconds = max(0, round(time.time() - at))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"
