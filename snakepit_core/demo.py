"""``snakepit demo``: the seed's examples on every installed adapter, on the embedded defaults."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from .errors import SnakepitError
from .plugins import get_plugin_manager
from .pool import Pool
from .sessions import SessionHelpers

#: (title, command, args) run on every adapter that declares the command.
EXAMPLES: list[tuple[str, str, dict[str, Any]]] = [
    ("ping", "ping", {}),
    ("echo", "echo", {"message": "hello from snakepit"}),
    ("compute add", "compute", {"operation": "add", "a": 5, "b": 3}),
    ("compute subtract", "compute", {"operation": "subtract", "a": 10, "b": 4}),
    ("compute multiply", "compute", {"operation": "multiply", "a": 10, "b": 5}),
    ("compute divide", "compute", {"operation": "divide", "a": 7, "b": 2}),
    ("compute power", "compute", {"operation": "power", "a": 2, "b": 10}),
    ("compute sqrt", "compute", {"operation": "sqrt", "a": 16}),
    ("random integer", "random", {"type": "integer", "min": 1, "max": 6}),
    ("process_data", "process_data", {"data": "abc"}),
    ("generate_report", "generate_report", {"title": "Demo", "data": [1, 2, 3]}),
    ("info", "info", {}),
    ("divide by zero (error)", "compute", {"operation": "divide", "a": 1, "b": 0}),
    ("missing field (refused)", "compute", {"operation": "add", "a": 1}),
]


def _short(value: Any, limit: int = 90) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _supports(pool: Pool, command: str, args: dict[str, Any]) -> bool:
    """Whether the adapter declares ``command`` (and, for compute, the operation)."""
    if command not in (pool.adapter.commands or ()):
        return False
    if command != "compute":
        return True
    schema = pool.adapter.schemas.get("compute", {})
    operations = schema.get("properties", {}).get("operation", {}).get("enum", [])
    return args["operation"] in operations


async def _examples(pool: Pool, table: Table) -> None:
    for title, command, args in EXAMPLES:
        if not _supports(pool, command, args):
            continue
        try:
            result = await pool.execute(command, args)
            table.add_row(title, "[green]ok[/green]", _short(result))
        except SnakepitError as exc:
            table.add_row(title, f"[yellow]{exc.code}[/yellow]", _short(str(exc)))


async def _sessions_and_concurrency(pool: Pool, table: Table) -> None:
    started = time.perf_counter()
    results = await asyncio.gather(*(pool.execute("ping", {}) for _ in range(1000)))
    elapsed = time.perf_counter() - started
    table.add_row(
        "1000 concurrent pings",
        "[green]ok[/green]",
        f"{len(results)} results in {elapsed:.3f}s ({len(results) / elapsed:.0f}/s)",
    )
    await pool.execute_in_session("demo-session", "store", {"key": "answer", "value": 42})
    kept = await pool.execute_in_session("demo-session", "retrieve", {"key": "answer"})
    table.add_row("session store/retrieve", "[green]ok[/green]", _short(kept))
    helpers = SessionHelpers(pool)
    program = await helpers.execute_program_command(
        "demo-session", "create_program", {"signature": "question -> answer", "temperature": 0.7}
    )
    answer = await helpers.execute_program_command(
        "demo-session",
        "execute_program",
        {"program_id": program["program_id"], "inputs": {"question": "What is snakepit?"}},
    )
    table.add_row("program create/execute", "[green]ok[/green]", _short(answer))


async def _demo_adapter(name: str, pool_size: int, console: Console) -> bool:
    table = Table(title=f"adapter {name}", show_lines=False)
    table.add_column("example")
    table.add_column("outcome")
    table.add_column("result")
    try:
        async with Pool(name, pool_size=pool_size) as pool:
            await _examples(pool, table)
            await _sessions_and_concurrency(pool, table)
            stats = pool.stats()
    except SnakepitError as exc:
        console.print(f"[red]{name}: {exc.code}[/red]: {exc}")
        return False
    console.print(table)
    shown = {
        k: stats[k]
        for k in (
            "workers",
            "available",
            "busy",
            "requests",
            "queued",
            "errors",
            "queue_timeouts",
            "pool_saturated",
            "restarts",
        )
    }
    console.print(f"stats: {shown}\n")
    return True


async def run_demo(only: list[str] | None, pool_size: int, console: Console) -> bool:
    """Run the demo; False if any adapter could not run it."""
    manager = get_plugin_manager()
    names = only or sorted(manager.adapters())
    if not names:
        console.print("[red]no adapters installed[/red]: pip install ./plugins/snakepit-python")
        return False
    console.print(f"snakepit demo on: {', '.join(names)}\n")
    results = [await _demo_adapter(name, pool_size, console) for name in names]
    for failure in manager.failures:
        console.print(f"[red]broken plugin[/red] {failure.name}: {failure.error}")
    return all(results)
