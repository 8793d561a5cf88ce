"""Callbacks: host functions that workers call in the middle of a request.

docs/PROTOCOL.md (*Callbacks*) is the wire contract. A pool's callbacks come from
``pool.register_callback`` and from plugins' ``snakepit_callbacks`` hook; a worker that declares
the ``callbacks`` capability calls one with a call frame, and :class:`CallbackRunner` runs it as
a task of its own, bounded by the calling request's deadline, and answers with a ``$callback``
frame. Every refusal is an answer with a ``code``, never a broken worker: a worker that calls
nonsense gets told, and the pool keeps serving.

A callback that calls its own pool (``ctx.pool.execute``) is recognised by a context variable:
if every slot is held by a request waiting for a callback at that moment, no slot can free and
the call fails at once with :class:`~snakepit_core.errors.CallbackDeadlock`.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jsonschema.exceptions import best_match

from .errors import SnakepitError, ValidationError
from .validation import compile_schema, describe_error

if TYPE_CHECKING:
    from .pool import Pool
    from .stats import PoolCounters
    from .telemetry import PoolTelemetry
    from .worker import Worker

__all__ = ["Callback", "CallbackContext", "CallbackRegistry", "CallbackRunner"]

log = logging.getLogger("snakepit.callbacks")

#: The pool whose callback the current task (or thread) runs, for deadlock detection.
running_callback_of: contextvars.ContextVar[Pool | None] = contextvars.ContextVar(
    "snakepit_callback_pool", default=None
)


@dataclass(frozen=True)
class CallbackContext:
    """What a callback knows about the request that called it."""

    #: The calling request's id on its worker, its command, worker and session.
    request_id: int
    command: str
    worker_id: str
    session_id: str | None
    #: The pool, to call other commands (``await ctx.pool.execute(...)``).
    pool: Pool
    #: When the calling request's deadline passes (``time.monotonic()``).
    expires_at: float

    @property
    def deadline(self) -> float:
        """Seconds left before the calling request's deadline (negative once it passed)."""
        return self.expires_at - time.monotonic()


#: What a callback is: ``fn(args, ctx)``, sync or async.
CallbackFunction = Callable[[dict[str, Any], CallbackContext], Any]


@dataclass(frozen=True)
class Callback:
    """A host function workers may call by ``name``; ``schema`` (JSON Schema) checks its
    arguments first. ``fn(args, ctx)`` may be sync (it runs on a thread, off the event loop)
    or async."""

    name: str
    fn: CallbackFunction
    schema: dict[str, Any] | None = None


class CallbackRegistry:
    """A pool's callbacks by name, each with where it came from (for error messages)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Callback, str, Any]] = {}

    def add(self, callback: Callback, source: str) -> None:
        """Register ``callback``; ``ValueError`` naming both sources if its name is taken."""
        if not isinstance(callback.name, str) or not callback.name:
            raise ValueError(f"a callback name must be a non-empty string, not {callback.name!r}")
        if not callable(callback.fn):
            raise TypeError(f"callback {callback.name!r}: fn must be callable ({source})")
        taken = self._entries.get(callback.name)
        if taken is not None:
            raise ValueError(
                f"callback {callback.name!r} is registered twice: by {taken[1]} and by {source}"
            )
        checker = None if callback.schema is None else compile_schema(callback.schema)
        self._entries[callback.name] = (callback, source, checker)

    def get(self, name: str) -> tuple[Callback, Any] | None:
        entry = self._entries.get(name)
        return None if entry is None else (entry[0], entry[2])

    def names(self) -> list[str]:
        return sorted(self._entries)


class _Running:
    """One callback call running in the host."""

    __slots__ = ("call", "caller", "task", "worker")

    def __init__(self, worker: Worker, caller: Any, call: int) -> None:
        self.worker = worker
        self.caller = caller
        self.call = call
        self.task: asyncio.Task[None] | None = None


class CallbackRunner:
    """Runs the callbacks a pool's workers call: one task per call, all owned here, cancelled
    when their request ends or is abandoned, or the pool stops."""

    def __init__(
        self,
        pool: Pool,
        registry: CallbackRegistry,
        counters: PoolCounters,
        telemetry: PoolTelemetry,
        max_pending: int,
    ) -> None:
        self._pool = pool
        self._registry = registry
        self._counters = counters
        self._telemetry = telemetry
        self._max_pending = max_pending
        #: The calls running for each calling request (the pool's call object).
        self._by_caller: dict[Any, list[_Running]] = {}
        #: How many calls each worker has running.
        self._per_worker: dict[str, int] = {}

    @property
    def running(self) -> int:
        """Callback calls running in the host now."""
        return sum(self._per_worker.values())

    @property
    def waiting_requests(self) -> int:
        """Requests in flight that wait for at least one callback."""
        return len(self._by_caller)

    def on_call(self, worker: Worker, caller: Any, message: dict[str, Any]) -> None:
        """A worker's call frame (``caller`` is the pool's call of the request, None if the
        frame names no request in flight): run it, or answer why not."""
        request_id, call, name = message.get("id"), message.get("call"), message.get("name")
        args = message.get("args", {})
        problem = None
        if type(call) is not int or call < 0:
            problem = f"'call' must be an integer >= 0, not {call!r}"[:200]
        elif caller is None:
            problem = f"id {request_id!r} is not a request in flight"[:200]
        elif not isinstance(name, str):
            problem = f"'name' must be a string, not {name!r}"[:200]
        elif not isinstance(args, dict):
            problem = f"'args' must be an object, not {type(args).__name__}"
        elif any(r.call == call for r in self._by_caller.get(caller, ())):
            problem = f"call {call} is already pending"
        if problem is not None:
            self._refuse(worker, request_id, call, "bad_callback", f"bad callback frame: {problem}")
            return
        assert isinstance(call, int) and isinstance(name, str) and isinstance(args, dict)
        if self._per_worker.get(worker.id, 0) >= self._max_pending:
            self._refuse(
                worker,
                request_id,
                call,
                "too_many_callbacks",
                f"callback {name!r} refused: worker {worker.id} already has "
                f"{self._max_pending} callbacks running (max_pending_callbacks)",
            )
            return
        found = self._registry.get(name)
        if found is None:
            known = ", ".join(self._registry.names()) or "none"
            self._refuse(
                worker,
                request_id,
                call,
                "unknown_callback",
                f"unknown callback {name!r} (registered: {known})",
            )
            return
        callback, checker = found
        if checker is not None:
            error = best_match(checker.iter_errors(args))
            if error is not None:
                why = describe_error(f"callback {name!r}", error)[2]
                self._refuse(worker, request_id, call, "invalid_arguments", why)
                return
        self._start(worker, caller, call, callback, args)

    def _refuse(self, worker: Worker, request_id: Any, call: Any, code: str, error: str) -> None:
        self._counters.callback_errors += 1
        worker.answer_callback(
            request_id, {"call": call, "success": False, "error": error, "code": code}
        )

    def _start(
        self, worker: Worker, caller: Any, call: int, callback: Callback, args: dict[str, Any]
    ) -> None:
        self._counters.callbacks += 1
        running = _Running(worker, caller, call)
        self._by_caller.setdefault(caller, []).append(running)
        self._per_worker[worker.id] = self._per_worker.get(worker.id, 0) + 1
        running.task = asyncio.get_running_loop().create_task(
            self._run(running, callback, args), name=f"callback {callback.name}"
        )

    async def _run(self, running: _Running, callback: Callback, args: dict[str, Any]) -> None:
        worker, caller = running.worker, running.caller
        request_id = caller.request_id
        span = self._telemetry.start_callback(callback.name, caller.span)
        remaining = worker.time_left(request_id)
        context = CallbackContext(
            request_id=request_id,
            command=caller.command,
            worker_id=worker.id,
            session_id=caller.session_id,
            pool=self._pool,
            expires_at=time.monotonic() + (remaining if remaining is not None else 1e9),
        )
        token = running_callback_of.set(self._pool)
        error: BaseException | None = None
        try:
            result = await asyncio.wait_for(self._call(callback, args, context), remaining)
            answer = {"call": running.call, "success": True, "result": result}
        except asyncio.CancelledError as exc:
            error = exc
            answer = _failure(running.call, "cancelled", f"callback {callback.name!r}: cancelled")
        except TimeoutError as exc:
            error = exc
            answer = _failure(
                running.call,
                "timeout",
                f"callback {callback.name!r}: the request's deadline passed while it ran",
            )
        except SnakepitError as exc:
            error = exc
            answer = _failure(
                running.call, exc.code, f"callback {callback.name!r} failed: {exc.message}"
            )
        except Exception as exc:
            error = exc
            answer = _failure(
                running.call,
                "callback_failed",
                f"callback {callback.name!r} failed: {type(exc).__name__}: {exc}",
            )
        finally:
            running_callback_of.reset(token)
            self._forget(running)
        if error is not None:
            self._counters.callback_errors += 1
        self._telemetry.end_callback(span, callback.name, error)
        try:
            worker.answer_callback(request_id, answer)
        except ValidationError as exc:
            worker.answer_callback(
                request_id,
                _failure(
                    running.call,
                    "callback_failed",
                    f"callback {callback.name!r} returned what cannot be sent: {exc.message}",
                ),
            )

    @staticmethod
    async def _call(callback: Callback, args: dict[str, Any], context: CallbackContext) -> Any:
        if inspect.iscoroutinefunction(callback.fn):
            return await callback.fn(args, context)
        loop = asyncio.get_running_loop()
        run = contextvars.copy_context().run
        result = await loop.run_in_executor(None, run, callback.fn, args, context)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _forget(self, running: _Running) -> None:
        calls = self._by_caller.get(running.caller)
        if calls is not None:
            calls.remove(running)
            if not calls:
                del self._by_caller[running.caller]
        left = self._per_worker.get(running.worker.id, 1) - 1
        if left:
            self._per_worker[running.worker.id] = left
        else:
            self._per_worker.pop(running.worker.id, None)

    def cancel_for(self, caller: Any) -> None:
        """The calling request ended or its caller gave up: cancel its callbacks."""
        for running in list(self._by_caller.get(caller, ())):
            if running.task is not None:
                running.task.cancel()

    def cancel_all(self) -> None:
        for calls in list(self._by_caller.values()):
            for running in calls:
                if running.task is not None:
                    running.task.cancel()


def _failure(call: int, code: str, error: str) -> dict[str, Any]:
    return {"call": call, "success": False, "error": error, "code": code}
