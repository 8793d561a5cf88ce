"""A synchronous facade: ``SyncPool`` and the module-level ``start``/``execute``/``stop``.

The async pool runs on an event loop in a private daemon thread, so callers need no event loop
of their own: any number of threads may call ``execute`` at once, and so may code running
inside someone else's loop (a Jupyter cell), which must not block on its own loop.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any, Protocol, TypeVar, Unpack

from opentelemetry import metrics, trace

from .adapter import Adapter
from .callbacks import CallbackFunction
from .config import PoolConfig, PoolOptions
from .errors import PoolStopped
from .pool import Pool
from .sessions import RemovalListener, Session, SessionStore

T = TypeVar("T")

_open_pools: weakref.WeakSet[SyncPool] = weakref.WeakSet()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (``snakepit-core[fast]``), else asyncio's.

    Only for loops snakepit owns; ``SNAKEPIT_UVLOOP=0`` turns it off.
    """
    if os.environ.get("SNAKEPIT_UVLOOP") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


class LoopThread:
    """An event loop running in a private daemon thread, and a way to wait on it.

    The thread exists only in the process that started it: in a fork child, ``call`` raises
    ``PoolStopped`` naming the parent instead of waiting forever for a loop that is not there,
    and ``close`` returns at once.
    """

    def __init__(self) -> None:
        self.owner_pid = os.getpid()
        self.loop = new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="snakepit-loop", daemon=True
        )
        self.thread.start()

    @property
    def inherited(self) -> bool:
        """True in a fork child of the process that started the loop."""
        return os.getpid() != self.owner_pid

    def _inherited_error(self) -> PoolStopped:
        return PoolStopped(
            f"this pool belongs to process {self.owner_pid}: it was inherited through fork() "
            f"and cannot be used in process {os.getpid()}; start a new pool in this process",
            owner_pid=self.owner_pid,
        )

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and wait for its result (from any other thread)."""
        if self.inherited:
            coroutine.close()
            raise self._inherited_error()
        if threading.current_thread() is self.thread:
            coroutine.close()
            raise RuntimeError("a blocking snakepit call was made from its own loop thread")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                future.cancel()
            raise

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coroutine`` on the loop; its ``concurrent.futures.Future``."""
        if self.inherited:
            coroutine.close()
            raise self._inherited_error()
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        if self.inherited:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class _Closable(Protocol):
    """What a blocking generator drives on the loop: ``map``'s results or a stream."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    def __anext__(self) -> Awaitable[Any]: ...

    def aclose(self) -> Coroutine[Any, Any, None]: ...


class BlockingCall(Protocol):
    """Runs a coroutine on a loop of snakepit's and waits for its result."""

    def __call__(self, coroutine: Coroutine[Any, Any, T], /) -> T: ...


class SyncSessionStore:
    """The blocking twin of :class:`~snakepit_core.sessions.SessionStore`, method for method.

    Built by ``SyncPool.sessions`` (on the pool's loop), or stand-alone with
    ``SyncSessionStore()`` (a loop thread of its own). Calls from many threads are serialized
    on that loop, so e.g. concurrent ``create_session`` of one id has exactly one winner.
    """

    def __init__(
        self,
        store: SessionStore | None = None,
        call: BlockingCall | None = None,
        **store_options: Any,
    ) -> None:
        #: The loop thread this store owns (stand-alone use), stopped by :meth:`close`.
        self._runner: LoopThread | None = None
        if call is None:
            self._runner = LoopThread()
            call = self._runner.call
        self._call: BlockingCall = call
        self.store = store or SessionStore(**store_options)

    def add_listener(self, listener: RemovalListener) -> None:
        self.store.add_listener(listener)

    def start_cleanup(self) -> None:
        """:meth:`SessionStore.start_cleanup`, on the store's loop."""
        self._call(_start_cleanup(self.store))

    def close(self) -> None:
        """Stop the store's cleanup task, and its loop thread if it has its own."""
        self._call(_close_store(self.store))
        if self._runner is not None:
            self._runner.close()

    def create_session(
        self, session_id: str, *, ttl: float | None = None, metadata: dict[str, Any] | None = None
    ) -> Session:
        return self._call(self.store.create_session(session_id, ttl=ttl, metadata=metadata))

    def get_session(self, session_id: str) -> Session:
        return self._call(self.store.get_session(session_id))

    def get_or_create_session(self, session_id: str) -> Session:
        return self._call(self.store.get_or_create_session(session_id))

    def update_session(
        self, session_id: str, update: Callable[[Session], Session | None]
    ) -> Session:
        return self._call(self.store.update_session(session_id, update))

    def session_exists(self, session_id: str) -> bool:
        return self._call(self.store.session_exists(session_id))

    def list_sessions(self) -> list[str]:
        return self._call(self.store.list_sessions())

    def delete_session(self, session_id: str) -> bool:
        return self._call(self.store.delete_session(session_id))

    def peek_session(self, session_id: str) -> Session | None:
        return self._call(self.store.peek_session(session_id))

    def note_worker(
        self,
        session_id: str,
        worker_id: str,
        node_id: str | None = None,
        adapter: str | None = None,
    ) -> None:
        self._call(self.store.note_worker(session_id, worker_id, node_id, adapter))

    def cleanup_expired_sessions(self) -> int:
        return self._call(self.store.cleanup_expired_sessions())

    def store_program(self, session_id: str, program_id: str, data: Any) -> None:
        self._call(self.store.store_program(session_id, program_id, data))

    def get_program(self, session_id: str, program_id: str) -> Any:
        return self._call(self.store.get_program(session_id, program_id))

    def store_global_program(self, program_id: str, data: Any) -> None:
        self._call(self.store.store_global_program(program_id, data))

    def get_global_program(self, program_id: str) -> Any:
        return self._call(self.store.get_global_program(program_id))

    def get_stats(self) -> dict[str, Any]:
        return self._call(self.store.get_stats())


class SyncPool:
    """A :class:`Pool` for code without an event loop. ``with SyncPool("my-adapter") as pool:``.

    The blocking twin of :class:`Pool`, method for method with the same parameters (as httpx's
    ``Client`` is of ``AsyncClient``); ``submit`` and ``run`` are its own additions.
    """

    def __init__(
        self,
        adapter: str | Adapter,
        *,
        config: PoolConfig | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        session_store: SessionStore | None = None,
        **overrides: Unpack[PoolOptions],
    ) -> None:
        self._runner = LoopThread()
        self._call = self._runner.call
        self._closed = False
        self._lock = threading.Lock()
        options = {
            "config": config,
            "tracer_provider": tracer_provider,
            "meter_provider": meter_provider,
            "session_store": session_store,
        }
        try:
            self.pool: Pool = self._call(_make_pool(adapter, options, overrides))
        except BaseException:
            self._runner.close()
            raise

    @property
    def adapter(self) -> Adapter:
        return self.pool.adapter

    @property
    def config(self) -> PoolConfig:
        return self.pool.config

    @property
    def running(self) -> bool:
        return self.pool.running and not self._runner.inherited

    def start(self) -> SyncPool:
        """Blocking :meth:`Pool.start`; returns the pool, so ``SyncPool(...).start()`` works."""
        self._call(self.pool.start())
        _open_pools.add(self)
        return self

    def execute(
        self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Blocking :meth:`Pool.execute`; safe from any thread."""
        self._check_open()
        return self._call(self.pool.execute(command, args, timeout=timeout))

    def submit(
        self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> concurrent.futures.Future[Any]:
        """:meth:`execute` without waiting: a ``concurrent.futures.Future`` of the result."""
        self._check_open()
        return self._runner.submit(self.pool.execute(command, args, timeout=timeout))

    def map(
        self,
        command: str,
        args_iterable: Iterable[dict[str, Any] | None],
        *,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """Blocking :meth:`Pool.map`: the results in input order, the first error in its turn.

        Closing the iterator early (``break``) cancels the calls still in flight.
        """
        self._check_open()
        yield from self._items(self.pool.map(command, args_iterable, timeout=timeout))

    def execute_stream(
        self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Iterator[Any]:
        """Blocking :meth:`Pool.execute_stream`: a generator of the items as they come.

        Closing it (``break`` out of a ``for`` over it, ``close()``, or dropping it) cancels
        the handler if it still runs.
        """
        self._check_open()
        return self._items(self.pool.execute_stream(command, args, timeout=timeout))

    def execute_stream_in_session(
        self,
        session_id: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        affinity: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """Blocking :meth:`Pool.execute_stream_in_session`: a generator, as
        :meth:`execute_stream`."""
        self._check_open()
        return self._items(
            self.pool.execute_stream_in_session(
                session_id, command, args, affinity=affinity, timeout=timeout
            )
        )

    def _items(self, stream: _Closable) -> Iterator[Any]:
        """Drive ``stream`` (map's results, a stream's items) on the loop, one item per next();
        closing the generator closes it there."""
        try:
            while True:
                try:
                    yield self._call(_next(stream))
                except StopAsyncIteration:
                    return
        finally:
            if not self._runner.inherited and not self._runner.loop.is_closed():
                self._call(stream.aclose())

    def execute_in_session(
        self,
        session_id: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        affinity: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Blocking :meth:`Pool.execute_in_session`."""
        self._check_open()
        return self._call(
            self.pool.execute_in_session(
                session_id, command, args, affinity=affinity, timeout=timeout
            )
        )

    def execute_program_command(
        self,
        session_id: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        affinity: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Blocking :meth:`Pool.execute_program_command`."""
        self._check_open()
        return self._call(
            self.pool.execute_program_command(
                session_id, command, args, affinity=affinity, timeout=timeout
            )
        )

    def session_owner(self, session_id: str) -> str | None:
        """Blocking :meth:`Pool.session_owner`."""
        self._check_open()
        return self._call(self.pool.session_owner(session_id))

    @property
    def node_id(self) -> str:
        """:attr:`Pool.node_id`."""
        return self.pool.node_id

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run any coroutine on the pool's loop and wait for it."""
        return self._call(coroutine)

    def register_callback(
        self,
        name: str,
        fn: CallbackFunction | None = None,
        *,
        schema: dict[str, Any] | None = None,
    ) -> Any:
        """:meth:`Pool.register_callback` (``fn`` runs on the pool's event loop thread if it
        is async, on a thread of its executor if not)."""
        return self.pool.register_callback(name, fn, schema=schema)

    @property
    def sessions(self) -> SyncSessionStore:
        """The blocking twin of :attr:`Pool.sessions`."""
        return SyncSessionStore(self.pool.sessions, self._call)

    def stats(self) -> dict[str, Any]:
        """:meth:`Pool.stats`; still answers after ``stop()`` (the final figures)."""
        if self._closed or self._runner.inherited:
            return self.pool.stats()
        return self._call(_stats(self.pool))

    def stop(self, grace: float | None = None) -> None:
        """Stop the pool and its loop thread. Idempotent; safe from signal handlers."""
        if self._runner.inherited:
            self._closed = True
            return  # the parent's workers are the parent's to stop
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _open_pools.discard(self)
        try:
            self._call(self.pool.stop(grace))
        finally:
            self._runner.close()

    def _check_open(self) -> None:
        if self._closed:
            raise PoolStopped(
                f"pool of {self.pool.adapter.name!r} is stopped", adapter=self.pool.adapter.name
            )

    def __enter__(self) -> SyncPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SyncPool {self.pool!r}>"


async def _start_cleanup(store: SessionStore) -> None:
    store.start_cleanup()


async def _close_store(store: SessionStore) -> None:
    store.close()  # on the store's loop, which owns its cleanup task


async def _next(results: _Closable) -> Any:
    return await anext(results)


async def _make_pool(
    adapter: str | Adapter, options: dict[str, Any], overrides: PoolOptions
) -> Pool:
    """Pools are made on their own loop (their events and futures belong to it)."""
    return Pool(adapter, **options, **overrides)


async def _stats(pool: Pool) -> dict[str, Any]:
    return pool.stats()


@atexit.register
def _stop_open_pools() -> None:
    for pool in list(_open_pools):
        if pool._runner.inherited:
            continue
        warnings.warn(
            f"{pool!r} was still running at interpreter exit; stopping it "
            "(call stop() or use 'with SyncPool(...)')",
            ResourceWarning,
            stacklevel=1,
        )
        pool.stop(grace=0.5)


# -- module-level facade, like the seed --------------------------------------------------------

_default: SyncPool | None = None
_default_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    """Another thread of the parent may have held the lock at fork(): the child needs its own."""
    global _default_lock
    _default_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def start(
    adapter: str | Adapter,
    *,
    config: PoolConfig | None = None,
    **overrides: Unpack[PoolOptions],
) -> SyncPool:
    """Start the process-wide default pool (stopping a previous one: reconfiguration)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.stop()
        _default = SyncPool(adapter, config=config, **overrides).start()
        return _default


def get_pool() -> SyncPool:
    """The default pool; ``PoolStopped`` if :func:`start` was not called."""
    if _default is None:
        raise PoolStopped("no default pool: call snakepit_core.start(adapter=...) first")
    return _default


def execute(
    command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
) -> Any:
    return get_pool().execute(command, args, timeout=timeout)


def execute_in_session(
    session_id: str,
    command: str,
    args: dict[str, Any] | None = None,
    *,
    affinity: str | None = None,
    timeout: float | None = None,
) -> Any:
    return get_pool().execute_in_session(
        session_id, command, args, affinity=affinity, timeout=timeout
    )


def execute_stream(
    command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
) -> Iterator[Any]:
    return get_pool().execute_stream(command, args, timeout=timeout)


def execute_stream_in_session(
    session_id: str,
    command: str,
    args: dict[str, Any] | None = None,
    *,
    affinity: str | None = None,
    timeout: float | None = None,
) -> Iterator[Any]:
    return get_pool().execute_stream_in_session(
        session_id, command, args, affinity=affinity, timeout=timeout
    )


def stats() -> dict[str, Any]:
    return get_pool().stats()


def execute_program_command(
    session_id: str,
    command: str,
    args: dict[str, Any] | None = None,
    *,
    affinity: str | None = None,
    timeout: float | None = None,
) -> Any:
    """The seed's module-level program helper, on the default pool."""
    return get_pool().execute_program_command(
        session_id, command, args, affinity=affinity, timeout=timeout
    )


def stop() -> None:
    """Stop the default pool (no-op if none is running)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.stop()
            _default = None


__all__ = [
    "LoopThread",
    "SyncPool",
    "SyncSessionStore",
    "execute",
    "execute_in_session",
    "execute_program_command",
    "get_pool",
    "start",
    "stats",
    "stop",
]
