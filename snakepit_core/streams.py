"""Streaming results: what :meth:`Pool.execute_stream` returns, and the items' way to it.

A streaming call holds one slot of its worker from its first item to its end. The worker sends
items as they are produced, at most ``stream_window`` ahead of what the consumer has taken; the
consumer's taking them is what grants the worker more (``$credit``, in batches of half a
window), so a slow consumer holds the producer back instead of growing the parent's memory.
A worker without the ``stream`` capability gets an ordinary request, whose result is the one
item. See PROTOCOL.md, *Streaming*.

Ending: the worker's error or death reaches the consumer after the items already received; a
timeout (``timeout`` bounds the whole stream, the consumer's time included) fails at once.
Stopping early (``break``, ``aclose()``, leaving ``async with``, the task cancelled, the stream
dropped unclosed) cancels the handler on its worker, with the usual cancellation semantics.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .errors import WorkerTimeout
from .worker import _CommandFailure

if TYPE_CHECKING:
    from types import TracebackType

    from .pool import Pool, _Call

__all__ = ["Stream", "StreamItems"]


class StreamItems:
    """The items a worker sent for one stream and the consumer has not taken yet."""

    __slots__ = (
        "buffer",
        "credit_left",
        "first_at",
        "streaming",
        "taken",
        "waiter",
        "window",
    )

    def __init__(self, window: int) -> None:
        self.window = window
        self.buffer: deque[Any] = deque()
        #: The worker streams (capability ``stream``); else its one result is the one item.
        self.streaming = False
        #: Items the worker may still send before it needs more credit.
        self.credit_left = window
        #: Items the consumer has taken.
        self.taken = 0
        #: ``time.monotonic()`` of the first item (or of the one result).
        self.first_at = 0.0
        #: The consumer waiting for an item, if it is.
        self.waiter: asyncio.Future[None] | None = None

    def put(self, item: Any) -> bool:
        """An item from the worker; ``False`` if the worker had no credit for it."""
        if self.credit_left <= 0:
            return False
        self.credit_left -= 1
        if not self.first_at:
            self.first_at = time.monotonic()
        self.buffer.append(item)
        self.wake()
        return True

    def wake(self, ended: asyncio.Future[Any] | None = None) -> None:
        """Wake the consumer: an item came, or the call ``ended``, whose error the consumer
        gets when it reads on (and none is reported as never retrieved if it does not)."""
        if ended is not None and not ended.cancelled():
            ended.exception()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


#: ``start(items)``: validate, dispatch and send the streaming call (PoolStopped, ValidationError,
#: ... raise here); the call whose future is the stream's end.
Starter = Callable[[StreamItems], Awaitable["_Call"]]


class Stream:
    """The items of one streaming call: an async iterator and an async context manager.

    Nothing is sent before the first item is asked for. ``async with pool.execute_stream(...)
    as items: async for item in items: ...``, or iterate it directly and ``aclose()`` it when
    stopping early (a stream dropped unclosed is cancelled when it is collected).
    """

    def __init__(self, pool: Pool, command: str, start: Starter) -> None:
        self._pool = pool
        self._command = command
        self._start = start
        self._items = StreamItems(pool.config.stream_window)
        self._call: _Call | None = None
        #: Items taken since credit was last granted.
        self._ungranted = 0
        self._done = False
        self._finalizer: weakref.finalize[Any, Stream] | None = None

    # -- the consumer's side ------------------------------------------------------------------

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        call = self._call
        if call is None:
            call = await self._begin()
        items = self._items
        future = call.future
        while True:
            if future.done() and isinstance(future.exception(), WorkerTimeout):
                self._end(future.exception())
            if items.buffer:
                if call.worker is not None and time.monotonic() > self._deadline(call):
                    self._time_out(call)
                self._items.taken += 1
                self._grant(call)
                return self._processed(call, items.buffer.popleft())
            if future.done():
                return self._last(call)
            items.waiter = future.get_loop().create_future()
            try:
                await items.waiter
            except asyncio.CancelledError:
                self._stop()
                raise
            finally:
                items.waiter = None

    async def aclose(self) -> None:
        """Stop reading: the handler is cancelled on its worker if it still runs."""
        self._stop()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop()

    # -- steps --------------------------------------------------------------------------------

    async def _begin(self) -> _Call:
        try:
            self._call = call = await self._start(self._items)
        except BaseException:
            self._done = True  # the starter accounted for the failed call
            raise
        call.future.add_done_callback(self._items.wake)
        self._finalizer = weakref.finalize(self, _drop, call.future.get_loop(), call, self._items)
        self._finalizer.atexit = False
        return call

    @staticmethod
    def _deadline(call: _Call) -> float:
        """When the stream's time is up: ``timeout`` after it was sent."""
        return call.started + call.queue_wait + call.timeout

    def _grant(self, call: _Call) -> None:
        """One more item taken: acknowledge items in batches of half a window."""
        items = self._items
        if not items.streaming:
            return
        self._ungranted += 1
        if self._ungranted >= max(1, items.window // 2) and call.worker is not None:
            items.credit_left += self._ungranted
            call.worker.grant(call.request_id, self._ungranted)
            self._ungranted = 0

    def _processed(self, call: _Call, item: Any) -> Any:
        if call.hooks.has_process:
            return call.hooks.process_response(self._command, item)
        return item

    def _last(self, call: _Call) -> Any:
        """The call ended and every item it sent was taken: its result (the last item of a
        stream unless None, the one item of an ordinary request) or its error."""
        error = call.future.exception()
        if isinstance(error, _CommandFailure):
            error = self._pool._command_error(call, error)
        if error is not None:
            self._end(error)
        result = call.future.result()
        if self._items.streaming and result is None:
            self._end(None)
        if not self._items.first_at:
            self._items.first_at = time.monotonic()
        self._items.taken += 1
        item = self._processed(call, result)
        self._end(None, raise_stop=False)
        return item

    def _time_out(self, call: _Call) -> None:
        error = WorkerTimeout(
            f"adapter {self._pool.adapter.name!r}: the stream of {self._command!r} did not end "
            f"within {call.timeout}s",
            adapter=self._pool.adapter.name,
            worker_id=call.worker.id if call.worker is not None else None,
            command=self._command,
            timeout=call.timeout,
        )
        if not call.future.done():
            call.future.cancel()
            self._pool._abandon(call)
        self._end(error)

    def _stop(self) -> None:
        """The consumer stops early (or the stream already ended)."""
        if self._done:
            return
        call = self._call
        if call is not None and not call.future.done():
            call.future.cancel()
            self._pool._abandon(call)
        self._end(None, raise_stop=False)

    def _end(self, error: BaseException | None, *, raise_stop: bool = True) -> None:
        """The stream is over: account for it once; raise ``error``, or end the iteration."""
        if not self._done:
            self._done = True
            if self._finalizer is not None:
                self._finalizer.detach()
            if self._call is not None:
                self._pool._finish_stream(self._call, self._items, error)
        if error is not None:
            raise error
        if raise_stop:
            raise StopAsyncIteration


def _drop(loop: asyncio.AbstractEventLoop, call: _Call, items: StreamItems) -> None:
    """A stream collected unclosed: cancel its handler, from whatever thread collects it."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(_cancel_dropped, call, items)


def _cancel_dropped(call: _Call, items: StreamItems) -> None:
    if not call.future.done():
        call.future.cancel()
        call.pool._abandon(call)
    call.pool._finish_stream(call, items, None)
