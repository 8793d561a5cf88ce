"""A synchronous facade: ``SyncPool`` and the module-level ``start``/``execute``/``stop``.

The async pool runs on an event loop in a private daemon thread, so callers need no event loop
of their own: any number of threads may call ``execute`` at once, and so may code running
inside someone else's loop (a Jupyter cell), which must not block on its own loop.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
import warnings
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

from .adapter import Adapter
from .errors import PoolStopped
from .pool import Pool

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

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and wait for its result (from any other thread)."""
        if self.inherited:
            coroutine.close()
            raise PoolStopped(
                f"this pool belongs to process {self.owner_pid}: it was inherited through fork() "
                f"and cannot be used in process {os.getpid()}; start a new pool in this process",
                owner_pid=self.owner_pid,
            )
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

    def close(self) -> None:
        if self.inherited:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class SyncPool:
    """A :class:`Pool` for code without an event loop. ``with SyncPool("my-adapter") as pool:``."""

    def __init__(self, adapter: str | Adapter, **kwargs: Any) -> None:
        self._runner = LoopThread()
        self._call = self._runner.call
        self._closed = False
        self._lock = threading.Lock()
        try:
            self.pool: Pool = self._call(self._make(adapter, kwargs))
        except BaseException:
            self._runner.close()
            raise

    @staticmethod
    async def _make(adapter: str | Adapter, kwargs: dict[str, Any]) -> Pool:
        return Pool(adapter, **kwargs)

    def start(self) -> SyncPool:
        self._call(self.pool.start())
        _open_pools.add(self)
        return self

    def execute(
        self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Blocking :meth:`Pool.execute`; safe from any thread."""
        if self._closed:
            raise PoolStopped(f"pool of {self.pool.adapter.name!r} is stopped")
        return self._call(self.pool.execute(command, args, timeout=timeout))

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
        return self._call(
            self.pool.execute_in_session(
                session_id, command, args, affinity=affinity, timeout=timeout
            )
        )

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run any coroutine on the pool's loop (e.g. a session-store call) and wait for it."""
        return self._call(coroutine)

    @property
    def sessions(self) -> Any:
        """A synchronous view of the pool's session store."""
        from .sessions import SyncSessionStore

        return SyncSessionStore(self.pool.sessions, self._call)

    def stats(self) -> dict[str, Any]:
        """:meth:`Pool.stats`; still answers after ``stop()`` (the final figures)."""
        if self._closed or self._runner.inherited:
            return self.pool.stats()
        return self._call(_stats(self.pool))

    def execute_program_command(
        self, session_id: str, command: str, args: dict[str, Any] | None = None, **options: Any
    ) -> Any:
        """Blocking :meth:`SessionHelpers.execute_program_command` on this pool."""
        from .sessions import SessionHelpers

        return self._call(
            SessionHelpers(self.pool).execute_program_command(session_id, command, args, **options)
        )

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

    def __enter__(self) -> SyncPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SyncPool {self.pool!r}>"


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


def start(adapter: str | Adapter, **kwargs: Any) -> SyncPool:
    """Start the process-wide default pool (stopping a previous one: reconfiguration)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.stop()
        _default = SyncPool(adapter, **kwargs).start()
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


def stats() -> dict[str, Any]:
    return get_pool().stats()


def execute_program_command(
    session_id: str, command: str, args: dict[str, Any] | None = None, **options: Any
) -> Any:
    """The seed's module-level program helper, on the default pool."""
    return get_pool().execute_program_command(session_id, command, args, **options)


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
    "execute",
    "execute_in_session",
    "execute_program_command",
    "get_pool",
    "start",
    "stats",
    "stop",
]
