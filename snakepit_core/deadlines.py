"""One event-loop timer for many deadlines.

Every request has an execution deadline and every queued caller a queue deadline; arming and
cancelling a loop timer for each costs more than the rest of the dispatch. Instead the pool
keeps plain float deadlines and this object keeps one timer, armed for the earliest known
deadline. When it fires, the owner expires what is due and returns the next deadline. A new
deadline re-arms the timer only if it is earlier than the armed one, which with a common
timeout is almost never.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadlines:
    """A lazily re-armed timer; ``expire_due(now)`` returns the next deadline or None."""

    __slots__ = ("_armed_at", "_expire_due", "_handle", "_loop")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, expire_due: Callable[[float], float | None]
    ) -> None:
        self._loop = loop
        self._expire_due = expire_due
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = 0.0

    def watch(self, when: float) -> None:
        """Make sure the timer fires no later than ``when`` (loop time)."""
        if self._handle is None or when < self._armed_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        following = self._expire_due(self._loop.time())
        if following is not None and self._handle is None:
            self._arm(following)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
