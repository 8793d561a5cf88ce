"""``snakepit demo --redis URL``: two nodes in two processes sharing sessions through Redis.

Node A creates a session, keeps a value in its worker and stores a program; node B, another
OS process with its own pool, sees that A holds the session, is refused it under strict
affinity (``SessionElsewhere`` naming A), runs A's program, and then continues the session
itself under ``prefer`` affinity, which moves it (A's worker-side value stays behind on A).
Each step is printed with the node that took it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
from typing import Any

from rich.console import Console
from rich.table import Table

from .errors import SessionElsewhere, SnakepitError
from .pool import Pool

#: How long the demo waits for a node's next step before it gives up.
STEP_TIMEOUT = 60.0


def _pool(adapter: str, url: str, prefix: str, node_id: str) -> Pool:
    return Pool(
        adapter,
        pool_size=1,
        session_backend="redis",
        redis_url=url,
        redis_key_prefix=prefix,
        node_id=node_id,
    )


async def _node_a(steps: Any, adapter: str, url: str, prefix: str, session: str, done: Any) -> None:
    async with _pool(adapter, url, prefix, "demo-node-a") as pool:
        await pool.execute_in_session(session, "store", {"key": "answer", "value": 42})
        steps.put(("node-a", "execute_in_session store answer=42", "ok"))
        program = await pool.execute_program_command(
            session, "create_program", {"signature": "question -> answer"}
        )
        steps.put(("node-a", "create_program", program["program_id"]))
        steps.put(("node-a", "session_owner", await pool.session_owner(session)))
        steps.put(("node-a", "ready", program["program_id"]))
        await asyncio.get_running_loop().run_in_executor(None, done.wait, STEP_TIMEOUT)
    steps.put(("node-a", "stopped", "gracefully: its heartbeat is gone, its sessions free"))


async def _node_b(
    steps: Any, adapter: str, url: str, prefix: str, session: str, program_id: str
) -> None:
    async with _pool(adapter, url, prefix, "demo-node-b") as pool:
        steps.put(("node-b", "session_owner", await pool.session_owner(session)))
        try:
            await pool.execute_in_session(session, "retrieve", {"key": "answer"}, affinity="strict")
            steps.put(("node-b", "strict retrieve", "served here (unexpected)"))
        except SessionElsewhere as exc:
            steps.put(("node-b", "strict retrieve", f"{exc.code}: node_id={exc.node_id}"))
        answer = await pool.execute_program_command(
            session, "execute_program", {"program_id": program_id, "inputs": {"question": "why?"}}
        )
        steps.put(("node-b", "execute_program (A's program)", str(answer["outputs"])))
        kept = await pool.execute_in_session(session, "retrieve", {"key": "answer"})
        steps.put(("node-b", "prefer retrieve", f"found={kept['found']} (A's value stayed on A)"))
        steps.put(("node-b", "session_owner", await pool.session_owner(session)))
        await pool.sessions.delete_session(session)
        steps.put(("node-b", "delete_session", "A's worker is told to clear it"))


def _run_node(target: Any, steps: Any, *args: Any) -> None:
    try:
        asyncio.run(target(steps, *args))
    except SnakepitError as exc:
        steps.put(("error", f"{exc.code}: {exc}", ""))


def _take(steps: Any, table: Table, until: str) -> str | None:
    """Add steps to ``table`` up to the step ``until`` (its result is returned); None on
    an error or a timeout."""
    while True:
        try:
            who, what, result = steps.get(timeout=STEP_TIMEOUT)
        except queue.Empty:
            table.add_row("demo", f"no step within {STEP_TIMEOUT:.0f} s", "")
            return None
        if who == "error":
            table.add_row("[red]error[/red]", what, "")
            return None
        if what != "ready":
            table.add_row(who, what, str(result))
        if what == until:
            return str(result)


def run_nodes_demo(url: str, adapter: str, console: Console) -> bool:
    """Run the two-node demo against the Redis at ``url``; False if a step failed."""
    context = multiprocessing.get_context("spawn")
    steps, done = context.Queue(), context.Event()
    prefix = f"snakepit-demo:{os.urandom(4).hex()}:"
    session = "demo-shared-session"
    table = Table(title=f"two nodes, one session ({adapter} adapter, keys under {prefix})")
    for column in ("host", "step", "result"):
        table.add_column(column)
    node_a = context.Process(
        target=_run_node, args=(_node_a, steps, adapter, url, prefix, session, done)
    )
    node_a.start()
    processes = [node_a]
    ok = False
    try:
        program_id = _take(steps, table, "ready")
        if program_id is not None:
            node_b = context.Process(
                target=_run_node, args=(_node_b, steps, adapter, url, prefix, session, program_id)
            )
            node_b.start()
            processes.append(node_b)
            ok = _take(steps, table, "delete_session") is not None
            done.set()
            ok = _take(steps, table, "stopped") is not None and ok
    finally:
        done.set()
        for process in processes:
            process.join(STEP_TIMEOUT)
            if process.is_alive():
                process.kill()
    console.print(table)
    return ok
