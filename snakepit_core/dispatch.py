"""Dispatch: which worker takes a request, and who waits while none has a free slot.

A worker in service has ``capacity`` slots (1 for a protocol-1 bridge, up to
``worker_concurrency`` for a protocol-2 one). A caller takes a slot with :meth:`acquire`; the
slot comes back with :meth:`release` when the worker answers. Callers that find no free slot
wait in a bounded FIFO queue, or, for a strict session, in the queue of the one worker the
session is bound to; a freed slot serves that worker's own waiters first, then the head of the
general queue. Every operation is a handful of dict and deque operations: nothing grows with the
number of requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import AffinityBusy, PoolSaturated, QueueTimeout, SnakepitError

if TYPE_CHECKING:
    from .stats import PoolCounters
    from .worker import Worker


class _Waiter:
    """A caller waiting for a slot; ``future`` receives the worker."""

    __slots__ = ("deadline", "future", "queue")

    def __init__(
        self, future: asyncio.Future[Worker], queue: deque[_Waiter], deadline: float
    ) -> None:
        self.future = future
        self.queue = queue
        #: Loop time at which it leaves the queue with ``QueueTimeout``.
        self.deadline = deadline


class Dispatcher:
    """Slots of the workers in service and the callers waiting for one (one per pool)."""

    def __init__(
        self,
        adapter: str,
        counters: PoolCounters,
        *,
        max_queue: int,
        queue_timeout: float,
        watch_deadline: Callable[[float], None],
    ) -> None:
        self.adapter = adapter
        self._counters = counters
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout
        self._watch_deadline = watch_deadline
        #: Workers in service with at least one free slot, most recently freed last.
        self._free: dict[Worker, None] = {}
        self._waiters: deque[_Waiter] = deque()
        self._bound: dict[str, deque[_Waiter]] = {}
        #: Callers waiting, in every queue.
        self.queued = 0

    # -- workers ------------------------------------------------------------------------------

    def add(self, worker: Worker) -> None:
        """``worker`` entered service: offer each of its slots."""
        for _ in range(worker.capacity - worker.reserved):
            if not self._offer(worker):
                break

    def retire(self, worker: Worker) -> None:
        """``worker`` takes no new requests (its requests in flight go on)."""
        worker.retiring = True
        self._free.pop(worker, None)

    def remove(self, worker: Worker, error: Callable[[], SnakepitError]) -> None:
        """``worker`` left service: forget it; callers bound to it fail with ``error()``."""
        self._free.pop(worker, None)
        self._fail(self._bound.pop(worker.id, deque()), error)

    def try_take(self, worker: Worker) -> bool:
        """Take a slot of ``worker`` if it has one free and nobody is waiting for it."""
        if worker not in self._free or self._bound.get(worker.id):
            return False
        self._take(worker)
        return True

    def release(self, worker: Worker) -> None:
        """One slot of ``worker`` is free again: hand it to a waiter, or keep it free."""
        worker.reserved -= 1
        if worker.alive and not worker.retiring:
            self._offer(worker)

    def _take(self, worker: Worker) -> None:
        worker.reserved += 1
        if worker.reserved >= worker.capacity:
            self._free.pop(worker, None)

    def _offer(self, worker: Worker) -> bool:
        """Give one free slot to the first waiter; ``False`` if nobody took it."""
        for queue in (self._bound.get(worker.id), self._waiters):
            while queue:
                waiter = queue.popleft()
                self.queued -= 1
                if not waiter.future.done():
                    self._take(worker)
                    waiter.future.set_result(worker)
                    return True
        if worker.reserved < worker.capacity:
            self._free[worker] = None
        return False

    # -- callers ------------------------------------------------------------------------------

    async def acquire(
        self,
        preferred: Worker | None,
        strict: bool,
        fail_fast: bool,
        unavailable: Callable[[], SnakepitError] | None = None,
    ) -> Worker:
        """A worker with a slot taken for the caller, waiting in a queue if needed.

        ``preferred`` (a session's worker) is taken while it has a free slot; ``strict`` waits
        for it; ``fail_fast`` raises ``AffinityBusy`` instead. ``unavailable``: no worker can
        come (the crash-loop breaker is open and none is in service): raise ``unavailable()``
        rather than wait.
        """
        free = self._free
        if preferred is not None and preferred in free and preferred.alive:
            self._take(preferred)
            return preferred
        if strict:
            assert preferred is not None
            if fail_fast:
                raise AffinityBusy(
                    f"adapter {self.adapter!r}: worker {preferred.id} of the session is busy "
                    "(affinity='strict_fail_fast')",
                    adapter=self.adapter,
                    worker_id=preferred.id,
                )
            queue = self._bound.setdefault(preferred.id, deque())
        else:
            worker = self._least_loaded()
            if worker is not None:
                self._take(worker)
                return worker
            queue = self._waiters
        if unavailable is not None:
            raise unavailable()
        if self.queued >= self._max_queue:
            self._counters.pool_saturated += 1
            raise PoolSaturated(
                f"adapter {self.adapter!r}: every worker is busy and the queue is full "
                f"({self._max_queue} waiting)",
                adapter=self.adapter,
                queued=self.queued,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._queue_timeout
        waiter = _Waiter(loop.create_future(), queue, deadline)
        self._watch_deadline(deadline)
        queue.append(waiter)
        self.queued += 1
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._leave(waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())
            raise

    def _least_loaded(self) -> Worker | None:
        free = self._free
        while free:
            # At concurrency 1 every free worker is idle: the most recently freed one is as
            # good as any (and warm). Otherwise the one with the most free slots.
            worker = next(reversed(free))
            if worker.capacity > 1:
                worker = min(free, key=_load)
            if worker.alive:
                return worker
            del free[worker]  # a worker whose process just exited may still be listed
        return None

    def _leave(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            waiter.queue.remove(waiter)
            self.queued -= 1

    def expire_due(self, now: float) -> float | None:
        """Fail the queued callers whose queue deadline passed; the next such deadline.

        Queues are first-in first-out with one timeout, so only their heads need a look.
        """
        following: float | None = None
        for queue in [self._waiters, *self._bound.values()]:
            while queue and queue[0].deadline <= now:
                self._expire(queue[0])
            if queue and (following is None or queue[0].deadline < following):
                following = queue[0].deadline
        return following

    def _expire(self, waiter: _Waiter) -> None:
        self._leave(waiter)
        if not waiter.future.done():
            self._counters.queue_timeouts += 1
            waiter.future.set_exception(
                QueueTimeout(
                    f"adapter {self.adapter!r}: no worker became free within "
                    f"pool_queue_timeout={self._queue_timeout}s",
                    adapter=self.adapter,
                )
            )

    def fail_all(self, error: Callable[[], SnakepitError]) -> None:
        """Fail every queued caller with ``error()`` (the pool stops, or cannot serve)."""
        for queue in [self._waiters, *self._bound.values()]:
            self._fail(queue, error)

    def _fail(self, queue: deque[_Waiter], error: Callable[[], SnakepitError]) -> None:
        while queue:
            waiter = queue.popleft()
            self.queued -= 1
            if not waiter.future.done():
                waiter.future.set_exception(error())

    # -- figures ------------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Workers in service with a free slot."""
        return len(self._free)

    def capacity_left(self) -> int:
        """Free slots plus free queue places: what ``Pool.map`` may keep in flight."""
        slots = sum(w.capacity - w.reserved for w in self._free)
        return slots + max(0, self._max_queue - self.queued)


def _load(worker: Worker) -> float:
    return worker.reserved / worker.capacity
