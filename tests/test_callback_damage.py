"""Damage around callbacks: a worker killed while its callbacks run in the host (they are
cancelled there, nothing is left running), and a worker flooding call frames (at most
``max_pending_callbacks`` run, the rest are refused, the pool keeps serving)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from typing import Any

import pytest
from damage_helpers import report

from snakepit_core import CallbackContext, Pool, ScriptAdapter
from snakepit_core.errors import WorkerCrashed

from conftest import BRIDGES, eventually


@pytest.mark.parametrize("runtime", ["python", "node", "ruby"])
async def test_a_worker_killed_while_its_callbacks_run_leaves_nothing_running(
    runtime: str, capsys: Any
) -> None:
    cancelled = 0

    async def forever(args: dict[str, Any], ctx: CallbackContext) -> None:
        nonlocal cancelled
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled += 1
            raise

    async with Pool(runtime, pool_size=2, worker_concurrency=4) as pool:
        pool.register_callback("forever", forever)
        many = {"name": "forever", "times": 10, "parallel": True}
        calls = [asyncio.ensure_future(pool.execute("call_host", many)) for _ in range(4)]
        await eventually(lambda: pool.stats()["callbacks_running"] == 40, 20)
        for worker in list(pool.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(outcome, WorkerCrashed) for outcome in outcomes), outcomes
        await eventually(lambda: pool.stats()["callbacks_running"] == 0)
        assert cancelled == 40
        await eventually(lambda: pool.stats()["available"] == 2, 30)
        pool.register_callback("echo", lambda args, ctx: args)
        answer = await pool.execute("call_host", {"name": "echo", "args": {"ok": True}})
        assert answer == {"results": [{"ok": True}]}
    report(capsys, f"callbacks of a killed worker {runtime}", cancelled=cancelled)


async def test_a_worker_flooding_call_frames_is_bounded_and_the_pool_keeps_serving(
    capsys: Any,
) -> None:
    release = asyncio.Event()
    peak = 0

    async def hold(args: dict[str, Any], ctx: CallbackContext) -> int:
        nonlocal peak
        peak = max(peak, ctx.pool.stats()["callbacks_running"])
        await release.wait()
        return args["i"]

    adapter = ScriptAdapter("flood", sys.executable, BRIDGES / "callback_bridge.py")
    async with Pool(adapter, pool_size=2, max_pending_callbacks=64) as pool:
        pool.register_callback("hold", hold)
        calls = {"calls": [["hold", {"i": i}] for i in range(3000)]}
        flood = asyncio.ensure_future(pool.execute("call", calls, timeout=60))
        await eventually(lambda: pool.stats()["callback_errors"] == 3000 - 64, 30)
        # The other worker serves meanwhile.
        served = await pool.execute("call", {"calls": []})
        assert served == []
        release.set()
        answers = await flood
        assert sum(a["success"] for a in answers) == 64 and peak <= 64
        assert pool.stats()["restarts"] == 0 and pool.stats()["callbacks_running"] == 0
    report(capsys, "callback flood", calls=3000, ran=64, peak=peak)
