"""``snakepit doctor``: what works here, what is missing, and what to do about it."""

from __future__ import annotations

import sys

from rich.console import Console

from .cli import runtime_version
from .config_sources import load_config
from .launcher import pdeathsig_available
from .plugins import get_plugin_manager
from .protocol import get_codec
from .registry import get_registry


def run_doctor(console: Console) -> bool:
    """Print one line per check; False if something an installed adapter needs is missing."""
    healthy = True
    manager = get_plugin_manager()
    console.print(f"python {sys.version.split()[0]} on {sys.platform}")
    for name, adapter in sorted(manager.adapters().items()):
        path, version = runtime_version(adapter)
        mark = "[green]ok[/green]" if path else "[red]missing[/red]"
        healthy &= path is not None
        console.print(f"adapter {name}: {mark} {version} ({adapter.distribution or 'in-process'})")
    for failure in manager.failures:
        healthy = False
        console.print(f"[red]broken plugin[/red] {failure.name}: {failure.error}")
    if pdeathsig_available():
        console.print("parent-death signal: [green]ok[/green] (setpriv --pdeathsig)")
    else:
        console.print(
            "parent-death signal: [yellow]unavailable[/yellow] (stdin EOF and the "
            "registry still clean up)"
        )
    print_registry(console)
    console.print(f"JSON codec: {get_codec(load_config(None, {}).json_codec).name}")
    try:
        import uvloop  # noqa: F401

        console.print("event loop: uvloop available")
    except ImportError:
        console.print("event loop: asyncio (install snakepit-core[fast] for uvloop and orjson)")
    return healthy


def print_registry(console: Console) -> None:
    """Where the registry is, or why this process runs without it and what to do about it."""
    registry = get_registry()
    if registry.disabled is None:
        console.print(f"process registry: [green]ok[/green] {registry.path}")
        return
    console.print(
        f"process registry: [yellow]disabled[/yellow] ({registry.disabled.reason}); orphans of"
        f" a parent that dies are not reaped. Remedy: {registry.disabled.remedy}",
        highlight=False,
    )
