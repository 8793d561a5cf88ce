"""Dispatch: which worker takes a request, and what waits while none has a free slot.

A worker in service has ``capacity`` slots (1 for a protocol-1 bridge, up to
``worker_concurrency`` for a protocol-2 one). A caller takes a slot with :meth:`take`; the
slot comes back with :meth:`release` when the worker answers. When no slot is free, an
:class:`Entry` waits in a bounded FIFO queue, or, for a strict session, in the queue of the one
worker the session is bound to; a freed slot serves that worker's own queue first, then the
head of the general queue. An entry is usually the request itself, which the freed slot sends
at once (its caller sleeps once, until the answer); a caller that must do something between
getting its worker and sending (a session records its worker) waits with :meth:`wait`. Every
operation is a handful of dict and deque operations: nothing grows with the number of requests
in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .errors import AffinityBusy, PoolSaturated, QueueTimeout, SnakepitError

if TYPE_CHECKING:
    from .stats import PoolCounters
    from .worker import Worker


class Entry(Protocol):
    """Something queued for a slot: a caller waiting for a worker, or a whole request.

    ``give(worker)`` hands it a slot already taken for it; ``future`` done means it left the
    queue by other means (cancelled, timed out, failed) and is skipped.
    """

    future: asyncio.Future[Any]
    #: Loop time at which it leaves the queue with ``QueueTimeout`` (set by the dispatcher).
    deadline: float
    #: The queue it waits in (set by the dispatcher).
    queue: deque[Entry]

    def give(self, worker: Worker) -> None: ...


class _Waiter:
    """A caller waiting for a slot of its own; ``future`` receives the worker."""

    __slots__ = ("deadline", "future", "queue")

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future
        self.deadline = 0.0
        self.queue: deque[Entry] = deque()

    def give(self, worker: Worker) -> None:
        self.future.set_result(worker)


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
        self._general: deque[Entry] = deque()
        self._bound: dict[str, deque[Entry]] = {}
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
        """One slot of ``worker`` is free again: hand it to the next entry, or keep it free."""
        worker.reserved -= 1
        if worker.alive and not worker.retiring:
            self._offer(worker)

    def _take(self, worker: Worker) -> None:
        worker.reserved += 1
        if worker.reserved >= worker.capacity:
            self._free.pop(worker, None)

    def _offer(self, worker: Worker) -> bool:
        """Give one free slot to the first entry waiting; ``False`` if nobody took it."""
        for queue in (self._bound.get(worker.id), self._general):
            while queue:
                entry = queue.popleft()
                self.queued -= 1
                if not entry.future.done():
                    self._take(worker)
                    entry.give(worker)
                    return True
        if worker.reserved < worker.capacity:
            self._free[worker] = None
        return False

    # -- callers ------------------------------------------------------------------------------

    def take(self, preferred: Worker | None, strict: bool, fail_fast: bool) -> Worker | None:
        """A worker with a slot taken for the caller, or None if it must queue.

        ``preferred`` (a session's worker) is taken while it has a free slot; ``strict`` waits
        for it (None); ``fail_fast`` raises ``AffinityBusy`` instead.
        """
        if preferred is not None and preferred in self._free and preferred.alive:
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
            return None
        worker = self._least_loaded()
        if worker is not None:
            self._take(worker)
        return worker

    def enqueue(self, entry: Entry, bound_to: Worker | None = None) -> None:
        """Queue ``entry`` until a slot (of ``bound_to`` only, if given) is free for it.

        Raises ``PoolSaturated`` when the queue is full. A request queued as itself (not a
        caller) is sent by the freed slot at once, so its caller wakes once, for the answer.
        """
        if self.queued >= self._max_queue:
            self._counters.pool_saturated += 1
            raise PoolSaturated(
                f"adapter {self.adapter!r}: every worker is busy and the queue is full "
                f"({self._max_queue} waiting)",
                adapter=self.adapter,
                queued=self.queued,
            )
        queue = self._general if bound_to is None else self._bound.setdefault(bound_to.id, deque())
        entry.queue = queue
        entry.deadline = deadline = entry.future.get_loop().time() + self._queue_timeout
        self._watch_deadline(deadline)
        queue.append(entry)
        self.queued += 1

    async def wait(self, bound_to: Worker | None = None) -> Worker:
        """Wait in the queue for a worker with a slot taken for the caller."""
        waiter = _Waiter(asyncio.get_running_loop().create_future())
        self.enqueue(waiter, bound_to)
        try:
            worker: Worker = await waiter.future
        except asyncio.CancelledError:
            self.leave(waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())
            raise
        return worker

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

    def leave(self, entry: Entry) -> None:
        """``entry`` gave up waiting (its caller was cancelled): it leaves its queue."""
        with contextlib.suppress(ValueError):
            entry.queue.remove(entry)
            self.queued -= 1

    def expire_due(self, now: float) -> float | None:
        """Fail the queued callers whose queue deadline passed; the next such deadline.

        Queues are first-in first-out with one timeout, so only their heads need a look.
        """
        following: float | None = None
        for queue in [self._general, *self._bound.values()]:
            while queue and queue[0].deadline <= now:
                self._expire(queue[0])
            if queue and (following is None or queue[0].deadline < following):
                following = queue[0].deadline
        return following

    def _expire(self, entry: Entry) -> None:
        self.leave(entry)
        if not entry.future.done():
            self._counters.queue_timeouts += 1
            entry.future.set_exception(
                QueueTimeout(
                    f"adapter {self.adapter!r}: no worker became free within "
                    f"pool_queue_timeout={self._queue_timeout}s",
                    adapter=self.adapter,
                )
            )

    def fail_all(self, error: Callable[[], SnakepitError]) -> None:
        """Fail every queued caller with ``error()`` (the pool stops, or cannot serve)."""
        for queue in [self._general, *self._bound.values()]:
            self._fail(queue, error)

    def _fail(self, queue: deque[Entry], error: Callable[[], SnakepitError]) -> None:
        while queue:
            entry = queue.popleft()
            self.queued -= 1
            if not entry.future.done():
                entry.future.set_exception(error())

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
