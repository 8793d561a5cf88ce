"""The ``snakepit`` command line: demo, adapters, exec, doctor, reap, bench."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import SnakepitError
from .plugins import get_plugin_manager
from .pool import Pool
from .runtimes import runtime_version

console = Console()


def plugin_versions() -> list[str]:
    """One line per adapter distribution: its name, version and the adapters it provides."""
    manager = get_plugin_manager()
    provided: dict[tuple[str, str], list[str]] = {}
    for name, adapter in sorted(manager.adapters().items()):
        if adapter.distribution:
            key = (adapter.distribution, adapter.version or "unknown version")
            provided.setdefault(key, []).append(name)
    lines = [
        f"{dist} {version} (adapter{'s' if len(names) > 1 else ''} {', '.join(names)})"
        for (dist, version), names in sorted(provided.items())
    ]
    lines.extend(f"broken plugin {failure.name}: {failure.error}" for failure in manager.failures)
    return lines


def print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"snakepit-core {__version__}")
    for line in plugin_versions():
        click.echo(line)
    ctx.exit()


@click.group()
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=print_version,
    help="Show the versions of snakepit-core and of the installed adapter plugins, and exit.",
)
def main() -> None:
    """snakepit: pools of long-lived worker processes in any runtime."""


@main.command()
def adapters() -> None:
    """List installed adapters, their distribution, version and runtime.

    Exits with 1 if a plugin is broken (fails to import, raises, or provides an adapter name
    another plugin provides too), so that an install check in CI fails.
    """
    manager = get_plugin_manager()
    found = manager.adapters()
    table = Table(title="snakepit adapters")
    for column in ("adapter", "distribution", "version", "runtime", "commands"):
        table.add_column(column)
    for name, adapter in sorted(found.items()):
        path, version = runtime_version(adapter)
        runtime = escape(f"{version} ({path})") if path else f"[red]{escape(version)}[/red]"
        commands = str(len(adapter.commands)) if adapter.commands is not None else "any"
        cells = (name, adapter.distribution or "-", adapter.version or "-")
        table.add_row(*map(escape, cells), runtime, commands)
    console.print(table)
    if not found:
        console.print("no adapters installed: pip install snakepit-python (or -node, -ruby)")
    failures = manager.failures
    for failure in failures:
        console.print(
            f"[red]broken plugin[/red] {escape(failure.name)} ({escape(failure.group)}): "
            f"{escape(failure.error)}"
        )
    if failures:
        sys.exit(1)


@main.command(name="exec")
@click.argument("adapter")
@click.argument("command")
@click.argument("args", required=False, default="{}")
@click.option("--timeout", type=float, default=None, help="Execution timeout in seconds.")
def exec_command(adapter: str, command: str, args: str, timeout: float | None) -> None:
    """Run COMMAND with JSON ARGS on one ADAPTER worker and print the result as JSON."""
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as exc:
        click.echo(f"validation_error: ARGS is not valid JSON: {exc}", err=True)
        sys.exit(2)

    async def run() -> Any:
        async with Pool(adapter, pool_size=1) as pool:
            return await pool.execute(command, parsed, timeout=timeout)

    try:
        result = asyncio.run(run())
    except SnakepitError as exc:
        click.echo(f"{exc.code}: {exc}", err=True)
        sys.exit(1)
    click.echo(json.dumps(result, indent=2, sort_keys=True))


@main.command()
@click.option("--adapter", "only", multiple=True, help="Only these adapters (default: all).")
@click.option("--pool-size", default=2, show_default=True)
@click.option(
    "--redis",
    "redis_url",
    metavar="URL",
    help="Instead: two nodes in two processes sharing a session through the Redis at URL.",
)
def demo(only: tuple[str, ...], pool_size: int, redis_url: str | None) -> None:
    """Run the examples of the Elixir Snakepit v0.1.2 README on every installed adapter
    (with --redis: a session created on one node and continued on another)."""
    if redis_url is not None:
        from .demo_nodes import run_nodes_demo

        adapter = only[0] if only else min(get_plugin_manager().adapters(), default=None)
        if adapter is None:
            console.print("[red]no adapters installed[/red]")
            sys.exit(1)
        ok = run_nodes_demo(redis_url, adapter, console)
    else:
        from .demo import run_demo

        ok = asyncio.run(run_demo(list(only) or None, pool_size, console))
    sys.exit(0 if ok else 1)


@main.command()
@click.argument("adapters", nargs=-1)
@click.option("-x", "--exitfirst", is_flag=True, help="Stop at the first failure.")
@click.option(
    "--worker-concurrency",
    type=click.IntRange(min=1),
    help="Run every case with pools of this worker_concurrency (protocol 2).",
)
def conformance(adapters: tuple[str, ...], exitfirst: bool, worker_concurrency: int | None) -> None:
    """Run the conformance suite against ADAPTERS (default: every installed adapter).

    An ADAPTER is an installed adapter's name, or module:NAME or path/to/file.py:NAME naming
    an Adapter defined in Python (a ScriptAdapter needs no plugin).
    """
    from .conformance import missing_requirement, run

    problem = missing_requirement()
    if problem:
        click.echo(problem, err=True)
        sys.exit(2)
    extra = ["-x"] if exitfirst else []
    if worker_concurrency is not None:
        extra.append(f"--worker-concurrency={worker_concurrency}")
    sys.exit(run(list(adapters), extra))


@main.command()
def reap() -> None:
    """Kill worker processes and remove shared-memory segments left behind by snakepit runs
    whose parent died."""
    from .registry import get_registry
    from .shm import reap_dead_runs

    report = get_registry().reap_dead_runs()
    directories = reap_dead_runs()
    console.print(
        f"dead runs: {report.runs}; processes killed: {len(report.killed)} {report.killed};"
        f" segment directories removed: {directories}"
    )


@main.command()
def doctor() -> None:
    """Check the runtimes, plugins, registry and platform guarantees."""
    from .doctor import run_doctor

    sys.exit(0 if run_doctor(console) else 1)


@main.command()
@click.option("--requests", default=20000, show_default=True, help="Pings per measurement.")
@click.option("--rounds", default=3, show_default=True, help="Rounds; medians are reported.")
@click.option("--adapter", "only", multiple=True, help="Only these adapters (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--quick", is_flag=True, help="Fewer worker counts and requests.")
@click.option("--uvloop/--no-uvloop", default=False, help="Run snakepit on uvloop if installed.")
def bench(
    requests: int, rounds: int, only: tuple[str, ...], as_json: bool, quick: bool, uvloop: bool
) -> None:
    """Benchmark ping throughput/latency, start-up and sessions against reference peers."""
    from .bench import run_bench

    run_bench(
        requests=requests,
        rounds=rounds,
        adapters=list(only) or None,
        as_json=as_json,
        quick=quick,
        console=console,
        use_uvloop=uvloop,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
