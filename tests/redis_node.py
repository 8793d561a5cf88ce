"""One snakepit node in its own OS process, for the multi-node tests.

``python redis_node.py URL NODE_ID PREFIX [OPTIONS_JSON]`` starts a Python pool with Redis
sessions, prints ``{"ready": node_id}``, then runs one JSON command per stdin line and prints
one JSON answer per line (``{"ok": result}`` or ``{"error": code, "node_id": ...}``):
``{"call": "execute_in_session", "session": "s", "command": "store", "args": {...},
"affinity": "strict"}``, ``{"call": "execute", ...}``, ``{"call": "owner", "session": "s"}``,
``{"call": "program", "session": "s", "command": "create_program", "args": {...}}``,
``{"call": "wait_cleared", "session": "s", "key": "k"}`` (until the worker forgot the key) and
``{"call": "stop"}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from snakepit_core import Pool
from snakepit_core.errors import SnakepitError


async def run(pool: Pool, request: dict[str, Any]) -> Any:
    call = request["call"]
    if call == "execute_in_session":
        return await pool.execute_in_session(
            request["session"], request["command"], request.get("args"),
            affinity=request.get("affinity"),
        )  # fmt: skip
    if call == "execute":
        return await pool.execute(request["command"], request.get("args"))
    if call == "program":
        return await pool.execute_program_command(
            request["session"], request["command"], request.get("args")
        )
    if call == "owner":
        return await pool.session_owner(request["session"])
    if call == "wait_cleared":
        args = {"session_id": request["session"], "key": request["key"]}
        while (await pool.execute("retrieve", args))["found"]:
            await asyncio.sleep(0.05)
        return True
    raise ValueError(f"unknown call {call!r}")


def node_pool(url: str, node_id: str, prefix: str, **options: Any) -> Pool:
    """The pool of one test node: one Python worker, sessions in the Redis at ``url``."""
    return Pool(
        "python",
        pool_size=1,
        session_backend="redis",
        redis_url=url,
        redis_key_prefix=prefix,
        node_id=node_id,
        **options,
    )


async def main() -> None:
    url, node_id, prefix = sys.argv[1:4]
    options = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    pool = node_pool(url, node_id, prefix, **options)
    await pool.start()
    print(json.dumps({"ready": pool.node_id}), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        request = json.loads(line)
        if request["call"] == "stop":
            await pool.stop()
            print(json.dumps({"ok": "stopped"}), flush=True)
            return
        try:
            answer = {"ok": await run(pool, request)}
        except SnakepitError as exc:
            answer = {"error": exc.code, "node_id": getattr(exc, "node_id", None)}
        print(json.dumps(answer), flush=True)
    await pool.stop()


if __name__ == "__main__":
    asyncio.run(main())
