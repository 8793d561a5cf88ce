"""Waiting for a condition in tests: :func:`eventually` and its blocking twin.

The one polling helper of the conformance suite and of the repository's tests (which import it
from ``tests/conftest.py``). It lives here because the suite ships in the wheel and must run
without the repository's ``tests/`` directory.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

Message = str | Callable[[], str]


def _failure(within: float, message: Message) -> TimeoutError:
    text = message() if callable(message) else message
    return TimeoutError(f"{text or 'condition not met'} (within {within}s)")


async def _holds(predicate: Callable[[], object]) -> bool:
    value = predicate()
    if inspect.isawaitable(value):
        value = await value
    return bool(value)


async def eventually(
    predicate: Callable[[], object],
    within: float = 5.0,
    *,
    interval: float = 0.01,
    message: Message = "",
) -> float:
    """Seconds until ``predicate()`` held, checking every ``interval`` on the running loop.

    ``predicate`` may also be an ``async def`` function (its result is awaited). Raises
    ``TimeoutError`` after ``within`` seconds; ``message`` (or a callable returning it,
    evaluated at that moment, e.g. to show ``pool.stats()``) says what was awaited. To assert a
    counter that is updated after the state you wait for, wait for the counter itself.
    """
    started = time.monotonic()
    while not await _holds(predicate):
        if time.monotonic() - started > within:
            raise _failure(within, message)
        await asyncio.sleep(interval)
    return time.monotonic() - started


def eventually_sync(
    predicate: Callable[[], object],
    within: float = 5.0,
    *,
    interval: float = 0.01,
    message: Message = "",
) -> float:
    """Blocking :func:`eventually`, for tests that drive processes without an event loop."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise _failure(within, message)
        time.sleep(interval)
    return time.monotonic() - started
