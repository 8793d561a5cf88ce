"""``snakepit doctor``: what works here, what is missing, and what to do about it.

Every problem comes with a remedy: on the next line (``  remedy: ...``), or at the end of the
registry's one-line message. What an adapter's runtime
needs (the minimum version, how to install it, the variable that picks another executable)
comes from the adapter, so this module names no runtime.
"""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, metadata

from rich.console import Console
from rich.markup import escape

from .config_sources import load_config
from .launcher import pdeathsig_available
from .plugins import get_plugin_manager
from .protocol import get_codec
from .registry import get_registry
from .runtimes import check_runtime

OK = "[green]ok[/green]"


def run_doctor(console: Console) -> bool:
    """Print one line per check (and a remedy under each problem); False if an installed
    adapter cannot run or a plugin is broken."""
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
