"""Checked by ``mypy --strict`` in ``tox -e lint`` (never run): the public API's types.

Each ``# type: ignore[...]`` marks a line that must be rejected; with ``warn_unused_ignores``
(part of ``--strict``) a line the type checker stops rejecting fails the lint.
"""

from __future__ import annotations

import snakepit_core
from snakepit_core import Pool, PoolConfig, SyncPool


def options_are_checked() -> None:
    SyncPool("python", pool_size=2, session_affinity="strict")
    SyncPool("python", pool_sise=2)  # type: ignore[call-arg]
    SyncPool("python", pool_size="2")  # type: ignore[arg-type]
    Pool("python", config=PoolConfig(pool_size=2), pool_queue_timeout=1.5)
    Pool("python", pool_queue_timeot=1.5)  # type: ignore[call-arg]
    snakepit_core.start("python", pool_size=1)
    snakepit_core.start("python", pool_sise=1)  # type: ignore[call-arg]


def results_and_errors() -> None:
    with SyncPool("python") as pool:
        future = pool.submit("ping")
        future.result()
        for _ in pool.map("echo", [{"n": 1}]):
            pass
        pool.execute("ping", timeout="1")  # type: ignore[arg-type]
