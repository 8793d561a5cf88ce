"""The background tasks of one pool, owned in one place.

Refill, health checks, recycling, stopping a retired worker, telling workers to forget a
session: each runs as a task of the pool's :class:`BackgroundTasks`, so ``stop()`` cancels and
awaits every one of them (nothing outlives the pool), and a task that fails with a bug is logged
as an error and remembered for ``stats()`` instead of vanishing into asyncio's
"exception was never retrieved". It is also written to the process registry, so that
``snakepit doctor``, run from another shell, shows it until the pool stops.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Coroutine
from typing import Any

from .registry import get_registry

log = logging.getLogger("snakepit.pool")

#: Tells apart, in the registry, owners of this process that share a name.
_owner_ids = itertools.count(1)


class BackgroundTasks:
    """A set of tasks with one owner: spawned here, cancelled and awaited together."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._owner_id = next(_owner_ids)
        self._tasks: set[asyncio.Task[Any]] = set()
        #: The last unexpected failure of a background task (shown by ``stats()``).
        self.last_error: str | None = None

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine, name=f"{self._owner}: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.record(task.get_name().removeprefix(f"{self._owner}: "), error)

    def record(self, what: str, error: BaseException) -> None:
        """Log a bug in background work and remember it (the work itself goes on or ends).

        ``what`` names the work without its owner (``"refill"``): the log line and the
        registry add the owner, and ``stats()`` is the owner's own.
        """
        self.last_error = f"{what}: {error!r}"
        log.error("%s: %s failed", self._owner, what, exc_info=error)
        get_registry().record_problem(self._owner_id, self._owner, what, repr(error))

    def cancel_all(self) -> list[asyncio.Task[Any]]:
        """Cancel every task (the owner stops); the caller awaits what is returned.

        What the owner recorded in the registry goes with it: ``snakepit doctor`` shows the
        bugs of running pools (``stats()`` keeps the last one).
        """
        if self.last_error is not None:
            get_registry().forget_problems(self._owner_id)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks

    def __len__(self) -> int:
        return len(self._tasks)
