"""Running the suite's ``async def`` tests without pytest-asyncio.

The suite runs in other people's environments: under pytest-asyncio's strict or auto mode, any
of its versions and loop-scope settings, or without it. So it depends on none of them: each
async test is a plain test function that runs its coroutine with :func:`asyncio.run`, bounded
in time, and the :class:`~snakepit_core.Pool` it is given (the ``pool`` fixture, created but
not started) is started in that loop before the test and stopped after it. Pools a test makes
itself (with the ``new_pool`` fixture, a :class:`PoolFactory`) it starts with ``async with``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, Protocol, Unpack

from ..config import PoolOptions
from ..pool import Pool

P = ParamSpec("P")

#: No conformance test takes longer; a hung worker fails its test rather than the whole run.
TEST_BOUND = 120.0


def in_loop(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """``test`` as a synchronous test function that runs it in a fresh event loop."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        async def main() -> None:
            async with contextlib.AsyncExitStack() as stack:
                for value in kwargs.values():
                    if isinstance(value, Pool):
                        await stack.enter_async_context(value)
                await asyncio.wait_for(test(*args, **kwargs), TEST_BOUND)

        asyncio.run(main())

    return run


class PoolFactory(Protocol):
    """The ``new_pool`` fixture: ``new_pool(**options)`` is a pool of the adapter under test,
    not started, with the suite's ``worker_concurrency`` unless ``options`` give one."""

    def __call__(self, **options: Unpack[PoolOptions]) -> Pool: ...
