"""The pool: starts workers concurrently, dispatches requests, queues, supervises.

Dispatch is a handful of dict and deque operations on the event loop: an idle worker is taken
at once; otherwise the caller waits in a bounded FIFO queue (or in the queue of the one worker a
strict session is bound to). A worker that finishes a request serves its own oldest waiter
first, then the head of the general queue, and only then becomes idle.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import os
import time
import warnings
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Unpack

from opentelemetry import metrics, trace

from .adapter import Adapter
from .callbacks import (
    Callback,
    CallbackFunction,
    CallbackRegistry,
    CallbackRunner,
    running_callback_of,
)
from .config import AFFINITY_MODES, PoolConfig, PoolOptions
from .deadlines import Deadlines
from .dispatch import Dispatcher
from .errors import (
    CallbackDeadlock,
    CommandError,
    PoolStopped,
    SessionLost,
    SnakepitError,
    StartupError,
    ValidationError,
)
from .forking import detach_worker_pipes
from .json_values import PLAIN, CheckedArguments, check_arguments
from .nodes import NodePresence, default_node_id
from .plugins import AdapterHooks, get_plugin_manager, resolve_adapter
from .runinfo import current_run_id, next_worker_id
from .sessions import Session, new_session_store
from .shm import STAGE_BYTES, SharedMemory, get_shared_memory, stage_segments
from .stats import PoolCounters
from .streams import Stream, StreamItems
from .supervisor import PoolControls, Supervisor
from .tasks import BackgroundTasks
from .telemetry import PoolTelemetry
from .worker import Worker, _CommandFailure, terminate_process_groups

if TYPE_CHECKING:
    from .sessions import SessionStore

log = logging.getLogger("snakepit.pool")

#: Pools that are running, so that interpreter exit can stop what was left open.
_running_pools: weakref.WeakSet[Pool] = weakref.WeakSet()
#: Pools started in this process and not yet stopped: what a fork child must forget.
_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def _forget_pools_after_fork() -> None:
    """In a fork child: the parent's pools are the parent's. Mark them inherited (every call
    raises ``PoolStopped``, ``stop()`` returns at once), never signal their workers, and let
    go of the pipes to those workers."""
    pids: list[int] = []
    for pool in list(_live_pools):
        pids.extend(pool._mark_inherited())
    _live_pools.clear()
    _running_pools.clear()
    detach_worker_pipes(pids)


os.register_at_fork(after_in_child=_forget_pools_after_fork)


@atexit.register
def _stop_pools_left_open() -> None:
    for pool in list(_running_pools):
        warnings.warn(
            f"{pool!r} was still running at interpreter exit; stopping its workers "
            "(use 'async with Pool(...)' or await pool.stop())",
            ResourceWarning,
            stacklevel=1,
        )
        pool._terminate_now()


def _seconds(value: Any, what: str, adapter: str, command: str) -> float:
    """``value`` as a timeout in seconds: a finite number > 0, else ``ValidationError``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
        if math.isfinite(seconds) and seconds > 0:
            return seconds
    raise ValidationError(
        f"adapter {adapter!r}: {command}: {what} must be a finite number of seconds > 0, "
        f"not {value!r}",
        adapter=adapter,
        command=command,
        field="timeout",
    )


def _delete_staged(shared: SharedMemory, staging: asyncio.Future[dict[Any, str]]) -> None:
    if not staging.cancelled() and staging.exception() is None:
        shared.delete(staging.result().values())


class _Call:
    """One ``execute`` from validation to answer. When no slot is free it waits in the
    dispatcher's queue as itself, so a freed slot sends it at once (:meth:`give`) and the
    caller wakes once, for the answer."""

    __slots__ = (
        "args",
        "checked",
        "command",
        "deadline",
        "finished",
        "future",
        "hooks",
        "items",
        "pool",
        "queue",
        "queue_wait",
        "request_id",
        "session_id",
        "span",
        "staged",
        "started",
        "timeout",
        "worker",
    )

    def __init__(
        self,
        pool: Pool,
        loop: asyncio.AbstractEventLoop,
        hooks: AdapterHooks,
        command: str,
        session_id: str | None,
    ) -> None:
        self.pool = pool
        self.hooks = hooks
        self.command = command
        self.session_id = session_id
        self.started = time.monotonic()
        self.future: asyncio.Future[Any] = loop.create_future()
        self.span: trace.Span | None = None
        self.args: dict[str, Any] = {}
        self.timeout = 0.0
        self.checked = PLAIN
        #: Segments written for its big binary values before it was sent, by path.
        self.staged: dict[tuple[Any, ...], str] | None = None
        self.worker: Worker | None = None
        self.request_id = 0
        self.queue_wait = 0.0
        #: A streaming call's items (None: an ordinary call).
        self.items: StreamItems | None = None
        self.finished = False
        #: Set by the dispatcher while queued.
        self.deadline = 0.0
        self.queue: deque[Any] = deque()

    def give(self, worker: Worker) -> None:
        self.pool._send_queued(self, worker)


class Pool:
    """A pool of worker processes of one adapter. Use ``async with Pool("my-adapter") as pool``."""

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
        from .config_sources import load_config

        if not isinstance(adapter, str | Adapter):
            raise TypeError(
                f"adapter must be an adapter name or an Adapter, not {type(adapter).__name__}"
            )
        self.adapter = resolve_adapter(adapter)
        self.config = load_config(config, dict(overrides))
        self._plugins = get_plugin_manager()
        self._hook_errors = 0
        self._hooks: AdapterHooks = self._plugins.hooks_for(self.adapter, self._count_hook_error)
        self.telemetry = PoolTelemetry(
            self.adapter, tracer_provider=tracer_provider, meter_provider=meter_provider
        )
        self.telemetry.bind_stats(self._gauges)
        self.counters = PoolCounters(self.config.latency_window)
        self.workers: dict[str, Worker] = {}
        self.dispatch = Dispatcher(
            self.adapter.name,
            self.counters,
            max_queue=self.config.pool_max_queue_size,
            queue_timeout=self.config.pool_queue_timeout,
            watch_deadline=lambda when: self._deadlines.watch(when),
        )
        #: Workers between spawn and service (stop() waits for them too).
        self._starting: set[Worker] = set()
        self._state = "new"  # new -> starting -> running -> stopping -> stopped; or inherited
        #: The process that started the pool (a fork child sees another pid and may not use it).
        self._owner_pid = os.getpid()
        #: The tasks of start() that bring up the first workers (stop() cancels them).
        self._startup_tasks: list[asyncio.Task[Worker]] = []
        self._stopped = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines: Deadlines  # created by start(), on the pool's loop
        #: Every background task of the pool (refill, health, recycling, stops, clean-ups).
        self.tasks = BackgroundTasks(f"pool {self.adapter.name}")
        self.supervisor = Supervisor(
            self.adapter.name,
            self.config,
            workers=self.workers,
            dispatch=self.dispatch,
            tasks=self.tasks,
            telemetry=self.telemetry,
            controls=PoolControls(
                start_worker=self._start_worker,
                retire=self._retire,
                hooks=self._current_hooks,
                running=lambda: self.running,
            ),
        )
        self._session_store = session_store
        self._sessions: SessionStore | None = None
        #: This pool's name among hosts sharing sessions (``config.node_id`` or
        #: ``<hostname>-<pid>``, taken again at start so that a fork child's pool has its own).
        self.node_id = self.config.node_id or default_node_id()
        self._presence: NodePresence | None = None
        #: Host functions workers may call (``register_callback``, plugins' hook).
        self.callbacks = CallbackRegistry()
        self._callback_runner = CallbackRunner(
            self, self.callbacks, self.counters, self.telemetry, self.config.max_pending_callbacks
        )

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._state == "running"

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start ``pool_size`` workers concurrently; ``StartupError`` if none can start.

        If ``start()`` is cancelled (``asyncio.wait_for(pool.start(), 1)``) or the pool is
        stopped meanwhile, every worker it started is stopped before the error propagates.
        """
        if self._state != "new":
            raise RuntimeError(f"pool of {self.adapter.name!r} was already started")
        store = self.sessions  # a session backend that cannot be built fails before workers start
        self._loop = asyncio.get_running_loop()
        self._deadlines = Deadlines(self._loop, self._expire_due)
        self._state = "starting"
        self._owner_pid = os.getpid()
        self.node_id = self.config.node_id or default_node_id()
        _live_pools.add(self)
        self.telemetry.refresh()
        for callback, source in self._plugins.callbacks_for(self.adapter):
            self.callbacks.add(callback, source)
        self.supervisor.before_start()
        size = self.config.pool_size
        tasks = [asyncio.ensure_future(self._start_worker(str(slot))) for slot in range(size)]
        self._startup_tasks = tasks
        try:
            done, pending = await asyncio.wait(tasks, timeout=self.config.pool_startup_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        except BaseException:
            await self.stop(0)
            raise
        self._startup_tasks = []
        if self._state != "starting":
            raise PoolStopped(
                f"pool of {self.adapter.name!r} was stopped while it started",
                adapter=self.adapter.name,
            )
        failures: list[BaseException] = [
            error for error in (task.exception() for task in done) if error is not None
        ]
        if pending:
            failures.append(
                StartupError(
                    f"adapter {self.adapter.name!r}: {len(pending)} worker(s) not ready within "
                    f"pool_startup_timeout={self.config.pool_startup_timeout}s",
                    adapter=self.adapter.name,
                )
            )
        if not self.workers:
            self._state = "stopped"
            _live_pools.discard(self)
            self._deadlines.close()
            self._stopped.set()
            self.supervisor.after_stop()
            first = failures[0] if failures else None
            if isinstance(first, StartupError):
                raise StartupError(
                    f"no worker of adapter {self.adapter.name!r} could start: {first.message}",
                    **first.context,
                ) from None
            raise StartupError(f"no worker of adapter {self.adapter.name!r} could start: {first!r}")
        for failure in failures:
            log.warning(
                "pool %s: a worker failed to start (will retry): %s", self.adapter.name, failure
            )
            self.supervisor.record_startup_failure(failure)
        self._state = "running"
        _running_pools.add(self)
        self.supervisor.after_start()
        self._presence = NodePresence(
            self.node_id,
            self.adapter.name,
            store,
            interval=self.config.node_heartbeat_interval,
            ttl=self.config.node_ttl,
            on_clear=self._clear_workers,
        )
        self.tasks.spawn(self._presence.run(), "node heartbeat")
        store.start_cleanup()

    async def _start_worker(self, slot: str = "0", restart: str | None = None) -> Worker:
        """Start one worker and put it into service; raises ``StartupError``.

        ``restart`` says why when it replaces a worker (``replaced``, ``recycled``).
        """
        worker = Worker(
            self.adapter,
            next_worker_id(self.adapter.name),
            self.config,
            run_id=current_run_id(),
            slot=slot,
            on_answer=self._on_answer,
            on_stuck=self._on_stuck,
            on_exit=self._on_worker_exit,
            watch_deadline=self._deadlines.watch,
            on_callback=self._callback_runner.on_call,
        )
        self._starting.add(worker)
        try:
            await worker.start()
        except BaseException:
            worker.abort()
            raise
        finally:
            self._starting.discard(worker)
        if self._state not in ("starting", "running"):
            await worker.stop(0)
            raise PoolStopped(f"pool of {self.adapter.name!r} stopped while a worker started")
        self.workers[worker.id] = worker
        self.supervisor.worker_ready(worker, restart)
        self.dispatch.add(worker)
        return worker

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within ``grace``, stop every worker.

        Idempotent; concurrent callers all wait for the same stop.
        """
        if self._state == "inherited":
            return  # the parent's workers are the parent's to stop
        if self._state in ("stopping", "stopped"):
            await self._stopped.wait()
            return
        if self._state == "new":
            self._state = "stopped"
            self._stopped.set()
            return
        self._state = "stopping"
        self._callback_runner.cancel_all()
        grace = self.config.worker_shutdown_grace_period if grace is None else grace
        starting = list(self._starting)
        cancelled = [*self.supervisor.before_stop(), *self._startup_tasks]
        for task in self._startup_tasks:
            task.cancel()
        self.dispatch.fail_all(lambda: PoolStopped(f"pool of {self.adapter.name!r} is stopping"))
        # A cancelled start aborts (SIGKILLs) its worker: wait for that, then for those
        # processes to be gone, so that nothing of the pool outlives stop().
        await asyncio.gather(*cancelled, return_exceptions=True)
        bound = self.config.cleanup_retry_interval * self.config.cleanup_max_retries
        await asyncio.gather(
            *(asyncio.wait_for(asyncio.shield(w.exited), bound) for w in starting),
            return_exceptions=True,
        )
        deadline = time.monotonic() + grace
        while any(w.busy for w in self.workers.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._sessions is not None:
            self._sessions.close()
        await asyncio.gather(
            *(
                worker.stop(max(0.0, deadline - time.monotonic()))
                for worker in list(self.workers.values())
            ),
            *([self._presence.leave()] if self._presence is not None else []),
            return_exceptions=True,
        )
        self._state = "stopped"
        _running_pools.discard(self)
        _live_pools.discard(self)
        self._deadlines.close()
        self.supervisor.after_stop()
        self._stopped.set()

    def _terminate_now(self) -> None:
        """Stop every worker without the event loop: SIGTERM each process group, wait up to
        the grace period, then SIGKILL. For interpreter exit, when the loop may be gone."""
        if self._state == "inherited":
            return
        self._state = "stopped"
        _running_pools.discard(self)
        _live_pools.discard(self)
        pids = [w.pid for w in self.workers.values() if w.pid is not None]
        terminate_process_groups(pids, self.config.worker_shutdown_grace_period)

    def _mark_inherited(self) -> list[int]:
        """In a fork child: this pool is the parent's. Returns its workers' pids."""
        self._state = "inherited"
        return [w.pid for w in [*self.workers.values(), *self._starting] if w.pid is not None]

    # -- dispatch -----------------------------------------------------------------------------

    def _on_answer(self, worker: Worker) -> None:
        """``worker`` answered a request: its slot goes to the next caller, unless it is due to
        leave service (recycling), in which case it leaves once nothing is in flight."""
        if not worker.alive:
            return
        self.supervisor.after_answer(worker)
        self.dispatch.release(worker)
        if worker.retiring and worker.reserved <= worker.stuck:
            self._leave_service(worker)

    def _on_stuck(self, worker: Worker) -> None:
        """A request the caller gave up on is still running on ``worker`` and cannot be
        stopped: no new requests for it; it leaves once only such requests remain."""
        if worker.exit_reason is None:
            worker.exit_reason = "killed"
        self._retire(worker)

    def _retire(self, worker: Worker) -> None:
        """Take ``worker`` out of dispatch; it leaves service when its requests are done."""
        self.dispatch.retire(worker)
        if worker.reserved <= worker.stuck:
            self._leave_service(worker)

    def _leave_service(self, worker: Worker) -> None:
        if not worker.alive or self._loop is None:
            return
        if worker.stuck:
            worker.kill(worker.exit_reason or "killed")  # what is left cannot be stopped
        else:
            self.tasks.spawn(
                worker.stop(self.config.worker_shutdown_grace_period), f"stopping {worker.id}"
            )

    def _expire_due(self, now: float) -> float | None:
        """Expire every request and queued caller whose deadline passed; the next deadline."""
        following = self.dispatch.expire_due(now)
        for worker in [*self.workers.values(), *self._starting]:
            deadline = worker.expire_due(now)
            if deadline is not None and (following is None or deadline < following):
                following = deadline
        return following

    def _on_worker_exit(self, worker: Worker) -> None:
        if self.workers.pop(worker.id, None) is None:
            return  # never entered service (a failed start): the starter reports it
        self.dispatch.remove(
            worker,
            lambda: SessionLost(
                f"adapter {self.adapter.name!r}: worker {worker.id} of the session died "
                f"({worker.exit_reason}); the next call binds the session to another worker",
                adapter=self.adapter.name,
                worker_id=worker.id,
            ),
        )
        self.supervisor.worker_exited(worker)

    # -- execution ----------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state != "running":
            if self._state == "inherited":
                raise PoolStopped(
                    f"pool of {self.adapter.name!r} belongs to process {self._owner_pid}: it was "
                    f"inherited through fork() and cannot be used in process {os.getpid()}; "
                    "start a new pool in this process",
                    adapter=self.adapter.name,
                    owner_pid=self._owner_pid,
                )
            state = {"new": "not started", "starting": "still starting"}.get(self._state, "stopped")
            raise PoolStopped(
                f"pool of {self.adapter.name!r} is {state}", adapter=self.adapter.name
            )

    def execute(
        self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Coroutine[Any, Any, Any]:
        """Run ``command`` on a free worker and return (when awaited) the worker's result.

        ``timeout`` (seconds) bounds the execution; without it the adapter's (or a plugin's)
        timeout applies. Raises a :class:`SnakepitError` subclass on failure. A plain method
        returning the coroutine, so each call costs one coroutine frame, not two.
        """
        return self._execute(command, args, timeout, None, None, False, False)

    def _checked_request(
        self,
        hooks: AdapterHooks,
        command: str,
        args: dict[str, Any] | None,
        timeout: float | None,
        session_id: str | None,
    ) -> tuple[dict[str, Any], float, CheckedArguments]:
        """Validate and prepare a request before any worker is taken.

        Returns the arguments to send, the timeout in seconds and what the JSON check found
        (the exact encoder needed, binary values). Raises ``ValidationError`` naming the
        argument or option at fault.
        """
        adapter = self.adapter.name
        if args is None:
            args = {}
        elif not isinstance(args, dict):
            raise ValidationError(
                f"adapter {adapter!r}: {command}: args must be an object (a dict), "
                f"not {type(args).__name__}",
                adapter=adapter,
                command=command,
            )
        if timeout is not None:
            timeout = _seconds(timeout, "timeout", adapter, command)
        # JSON first: the schema walk and the codecs must only ever see JSON values.
        checked = check_arguments(args, adapter=adapter, command=command) if args else PLAIN
        hooks.validate_command(command, args)
        if session_id is not None:
            args = {**args, "session_id": session_id}
        if hooks.has_prepare:
            args = hooks.prepare_args(command, args)
            checked = check_arguments(args, adapter=adapter, command=command)
        if timeout is None:
            if hooks.has_timeout:
                timeout = hooks.command_timeout(command, args)
            if timeout is None:
                timeout = self.adapter.timeout_for(command)
            timeout = _seconds(timeout, "the command timeout", adapter, command)
        return args, timeout, checked

    async def _execute(
        self,
        command: str,
        args: dict[str, Any] | None,
        timeout: float | None,
        session_id: str | None,
        preferred: Worker | None,
        strict: bool,
        fail_fast: bool,
    ) -> Any:
        call = self._new_call(command, session_id)
        telemetry = self.telemetry
        # Hooks' own spans nest under the request's.
        token = telemetry.activate(call.span) if call.span is not None else None
        error: BaseException | None = None
        try:
            await self._dispatch(call, args, timeout, preferred, strict, fail_fast)
            result = await self._answer(call)
            if call.hooks.has_process:
                result = call.hooks.process_response(command, result)
            return result
        except BaseException as exc:
            error = exc
            self._count_error(exc)
            raise
        finally:
            self._finish(call, error)
            if token is not None:
                telemetry.deactivate(token)

    def _new_call(self, command: str, session_id: str | None) -> _Call:
        """A call of ``command``, counted and (when tracing) with its span started."""
        if self._state != "running":
            self._check_running()
        assert self._loop is not None
        hooks = self._current_hooks()
        self.counters.requests += 1
        call = _Call(self, self._loop, hooks, command, session_id)
        if self.telemetry.tracing:
            call.span = self.telemetry.start_request(command, session_id)
        return call

    async def _dispatch(
        self,
        call: _Call,
        args: dict[str, Any] | None,
        timeout: float | None,
        preferred: Worker | None,
        strict: bool,
        fail_fast: bool,
    ) -> None:
        """Validate ``call`` and send it, or queue it to be sent by the next free slot."""
        call.args, call.timeout, call.checked = self._checked_request(
            call.hooks, call.command, args, timeout, call.session_id
        )
        if call.checked.binary:
            await self._stage(call)
        dispatch = self.dispatch
        worker = dispatch.take(preferred, strict, fail_fast)
        if worker is None:
            if self.supervisor.breaker_open and not self.workers:
                raise self.supervisor.unavailable_error()
            if running_callback_of.get() is self:
                self._refuse_deadlock(call.command)
        bound_to = preferred if strict else None
        if call.session_id is not None and (worker is None or worker is not preferred):
            # The session records its worker before the request is sent (``preferred`` is
            # the worker it was read bound to, here: nothing to record).
            if worker is None:
                worker = await dispatch.wait(bound_to)
            try:
                await self.sessions.note_worker(
                    call.session_id, worker.id, self.node_id, self.adapter.name
                )
            except BaseException:
                dispatch.release(worker)
                raise
        if worker is None:
            dispatch.enqueue(call, bound_to)
            return
        try:
            self._send(call, worker)
        except BaseException:
            dispatch.release(worker)  # nothing was sent: the slot goes back
            raise

    def _refuse_deadlock(self, command: str) -> None:
        """A callback calls this pool and no slot is free: if every slot is held by a request
        waiting for a callback, none can free, so fail now (``CallbackDeadlock``)."""
        slots = sum(w.capacity for w in self.workers.values() if w.alive and not w.retiring)
        waiting = self._callback_runner.waiting_requests
        if waiting >= slots:
            raise CallbackDeadlock(
                f"adapter {self.adapter.name!r}: {command!r} called from a callback while all "
                f"{slots} slot(s) of the pool are held by requests waiting for callbacks: it "
                "could never run (raise pool_size or worker_concurrency, or do not call the "
                "pool from this callback)",
                adapter=self.adapter.name,
                command=command,
            )

    def register_callback(
        self,
        name: str,
        fn: CallbackFunction | None = None,
        *,
        schema: dict[str, Any] | None = None,
    ) -> Any:
        """Let workers call ``fn(args, ctx)`` as ``name`` (``ctx.call(name, args)`` in a
        handler; docs/PROTOCOL.md, *Callbacks*). Without ``fn``, a decorator. ``fn`` may be
        sync (it runs on a thread) or async; ``schema`` (JSON Schema) checks the arguments
        first. ``ValueError`` if ``name`` is taken (by a plugin too).
        """

        def register(function: CallbackFunction) -> CallbackFunction:
            self.callbacks.add(Callback(name, function, schema), "register_callback")
            return function

        return register if fn is None else register(fn)

    async def _stage(self, call: _Call) -> None:
        """Write ``call``'s big binary values into shared memory on a thread, before a worker
        is taken: copying megabytes on the event loop would stall every other caller, and a
        thread lets the copy use another core. Small requests are left to :meth:`Worker.send`.
        """
        shared = get_shared_memory()
        threshold = self.config.shm_threshold
        if shared is None or threshold is None:
            return
        binary = call.checked.binary
        big = [(("args", *path), view) for path, view in binary if view.nbytes >= threshold]
        if sum(view.nbytes for _, view in big) < STAGE_BYTES:
            return
        assert self._loop is not None
        staging = self._loop.run_in_executor(None, stage_segments, shared, big)
        try:
            call.staged = await asyncio.shield(staging)
        except asyncio.CancelledError:
            # The thread goes on writing: what it wrote is deleted once it is done.
            staging.add_done_callback(lambda done: _delete_staged(shared, done))
            raise

    def _drop_staged(self, call: _Call) -> None:
        """Delete the staged segments no worker took (it was sent inline, or never sent)."""
        staged, call.staged = call.staged, None
        if staged:
            shared = get_shared_memory()
            if shared is not None:
                shared.delete(staged.values())

    async def _answer(self, call: _Call) -> Any:
        """The worker's answer to ``call``; a caller cancelled meanwhile abandons it."""
        try:
            return await call.future
        except asyncio.CancelledError:
            self._abandon(call)
            raise
        except _CommandFailure as failure:
            raise self._command_error(call, failure) from None

    def _abandon(self, call: _Call) -> None:
        """``call``'s caller gave up: it leaves the queue, or is cancelled on its worker (whose
        slot comes back when the worker lets go)."""
        if call.worker is None:
            self.dispatch.leave(call)
        else:
            self._callback_runner.cancel_for(call)
            call.worker.abandon(call.request_id)

    def _command_error(self, call: _Call, failure: _CommandFailure) -> CommandError:
        worker_id = call.worker.id if call.worker is not None else None
        return CommandError(
            f"adapter {self.adapter.name!r}: worker {worker_id}: command {call.command!r} "
            f"failed: {failure.error}",
            adapter=self.adapter.name,
            worker_id=worker_id,
            command=call.command,
            error=failure.error,
        )

    def _count_error(self, error: BaseException) -> None:
        if isinstance(error, SnakepitError) or not isinstance(error, asyncio.CancelledError):
            self.counters.errors += 1

    def _send(self, call: _Call, worker: Worker) -> None:
        """Send ``call`` on ``worker``, whose slot is taken for it; raises if it cannot."""
        call.worker = worker
        call.queue_wait = time.monotonic() - call.started
        meta = None
        span = call.span
        if span is not None:
            self.telemetry.set_worker(span, worker.id, worker.pid, call.queue_wait)
            meta = self.telemetry.inject(span)
        try:
            worker.send(
                call.command,
                call.args,
                timeout=call.timeout,
                meta=meta,
                checked=call.checked,
                future=call.future,
                stream=call.items,
                staged=call.staged,
                caller=call,
            )
        finally:
            if call.staged is not None:
                self._drop_staged(call)
        call.request_id = worker.last_request_id
        hooks = call.hooks
        if hooks.has_request_telemetry:
            hooks.request_started(
                command=call.command,
                request_id=call.request_id,
                worker_id=worker.id,
                session_id=call.session_id,
            )

    def _send_queued(self, call: _Call, worker: Worker) -> None:
        """A freed slot of ``worker`` sends the queued ``call``. If it cannot be sent, its
        caller gets the error, and the slot goes to the next entry on the next loop
        iteration (not recursively: a queue of unsendable calls must not nest)."""
        try:
            self._send(call, worker)
        except BaseException as exc:
            call.worker = None
            if not call.future.done():
                call.future.set_exception(exc)
            call.future.get_loop().call_soon(self.dispatch.release, worker)

    def _finish(self, call: _Call, error: BaseException | None) -> None:
        """Account for a finished call: latency, the observer hooks, metrics, its span."""
        call.finished = True
        self._callback_runner.cancel_for(call)
        if call.staged is not None:
            self._drop_staged(call)
        duration = time.monotonic() - call.started
        self.counters.record_latency(duration)
        worker = call.worker
        if call.hooks.has_request_telemetry:
            call.hooks.request_finished(
                command=call.command,
                request_id=call.request_id,
                worker_id=worker.id if worker else None,
                session_id=call.session_id,
                duration=duration,
                queue_wait=call.queue_wait,
                error=error,
            )
        telemetry = self.telemetry
        if telemetry.metering:
            telemetry.record_metrics(call.command, duration, error)
        if call.span is not None:
            telemetry.end_request(call.span, duration - call.queue_wait, error)

    async def map(
        self,
        command: str,
        args_iterable: Iterable[dict[str, Any] | None],
        *,
        timeout: float | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Run ``command`` once per item of ``args_iterable``; yield the results in input order.

        At most the pool's capacity plus its free queue places are in flight, so mapping over
        any number of items never makes the pool refuse them (``PoolSaturated``). The first
        error is raised when its turn comes; the calls still in flight are then cancelled.
        """
        window = max(1, self.dispatch.capacity_left())
        in_flight: deque[asyncio.Future[Any]] = deque()
        try:
            for args in args_iterable:
                in_flight.append(
                    asyncio.ensure_future(self.execute(command, args, timeout=timeout))
                )
                if len(in_flight) >= window:
                    yield await in_flight.popleft()
            while in_flight:
                yield await in_flight.popleft()
        finally:
            for future in in_flight:
                future.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    # -- sessions -----------------------------------------------------------------------------

    @property
    def sessions(self) -> SessionStore:
        """The pool's :class:`~snakepit_core.sessions.SessionStore` (created on first use)."""
        if self._sessions is None:
            self._sessions = self._session_store or new_session_store(self.config)
            self._sessions.add_listener(self._on_session_removed)
        return self._sessions

    async def execute_in_session(
        self,
        session_id: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        affinity: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run ``command`` for ``session_id`` (created when absent), routed by affinity.

        ``prefer`` (default): the session's last worker if idle, else any. ``strict``: always
        that worker, waiting for it. ``strict_fail_fast``: that worker or ``AffinityBusy``.
        ``session_id`` is added to ``args`` after validation.
        """
        mode = self._affinity(session_id, affinity)
        route = await self._route(session_id, mode)
        return await self._execute(command, args, timeout, session_id, *route)

    def _affinity(self, session_id: str, affinity: str | None) -> str:
        """The affinity mode of a session call, checked with its session id."""
        from .sessions import check_session_id

        self._check_running()
        check_session_id(session_id)
        mode = affinity or self.config.session_affinity
        if mode not in AFFINITY_MODES:
            raise ValidationError(
                f"affinity must be one of {', '.join(AFFINITY_MODES)}, not {mode!r}"
            )
        return mode

    async def _route(self, session_id: str, mode: str) -> tuple[Worker | None, bool, bool]:
        """``(preferred worker, strict, fail fast)`` for a call of the session (created when
        absent); ``SessionLost`` if a strict session's worker died, ``SessionElsewhere`` if
        another node's pool holds it."""
        store = self.sessions
        session = await store.get_or_create_session(session_id)
        strict = mode != "prefer"
        if not await self._held_here(session, strict):
            return None, False, False
        bound_id = session.last_worker_id
        preferred = self.workers.get(bound_id) if bound_id else None
        if strict and bound_id and preferred is None:
            await store.update_session(session_id, lambda s: s.bind(None))
            raise SessionLost(
                f"adapter {self.adapter.name!r}: session {session_id!r} was bound to worker "
                f"{bound_id}, which died; the next call binds it to another worker",
                adapter=self.adapter.name,
                worker_id=bound_id,
                session_id=session_id,
            )
        return preferred, strict and preferred is not None, mode == "strict_fail_fast"

    async def _held_here(self, session: Session, strict: bool) -> bool:
        if self._presence is None:
            raise PoolStopped(f"pool of {self.adapter.name!r} is not running")
        return await self._presence.holds(session, strict)

    async def session_owner(self, session_id: str) -> str | None:
        """The node whose pool holds ``session_id``: the one that served it last, while its
        heartbeat is live; None for a new, free or missing session. A router sends the
        session's calls there (:func:`~snakepit_core.routing.rendezvous_node` picks a node
        for a free one)."""
        self._check_running()
        session = await self.sessions.peek_session(session_id)
        if session is None or session.owner is None or self._presence is None:
            return None
        return session.node_id if await self._presence.is_alive(session.owner) else None

    # -- streams ------------------------------------------------------------------------------

    def execute_stream(
        self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Stream:
        """Run ``command`` and iterate over the items it produces, as they come.

        ``async with pool.execute_stream("generate", {...}) as items: async for item in
        items: ...``. Nothing is sent before the first item is asked for; ``timeout`` bounds
        the whole stream, the consumer's time included. A handler that does not stream gives
        its result as the one item. Stopping early cancels the handler (see
        :class:`~snakepit_core.streams.Stream`).
        """

        async def start(items: StreamItems) -> _Call:
            return await self._start_stream(items, command, args, timeout, None, None)

        return Stream(self, command, start)

    def execute_stream_in_session(
        self,
        session_id: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        affinity: str | None = None,
        timeout: float | None = None,
    ) -> Stream:
        """:meth:`execute_stream` for ``session_id``, routed as :meth:`execute_in_session`."""
        mode = self._affinity(session_id, affinity)

        async def start(items: StreamItems) -> _Call:
            route = await self._route(session_id, mode)
            return await self._start_stream(items, command, args, timeout, session_id, route)

        return Stream(self, command, start)

    async def _start_stream(
        self,
        items: StreamItems,
        command: str,
        args: dict[str, Any] | None,
        timeout: float | None,
        session_id: str | None,
        route: tuple[Worker | None, bool, bool] | None,
    ) -> _Call:
        """Send a streaming call (or queue it); the stream consumes what it produces."""
        call = self._new_call(command, session_id)
        call.items = items
        self.counters.streams += 1
        token = self.telemetry.activate(call.span) if call.span is not None else None
        try:
            await self._dispatch(call, args, timeout, *(route or (None, False, False)))
        except BaseException as exc:
            self._count_error(exc)
            self._finish(call, exc)
            raise
        finally:
            if token is not None:
                self.telemetry.deactivate(token)
        return call

    def _finish_stream(self, call: _Call, items: StreamItems, error: BaseException | None) -> None:
        """Account for a stream that ended, failed or was stopped by its consumer."""
        if call.finished:
            return
        self.counters.stream_items += items.taken
        if error is not None:
            self._count_error(error)
        if call.span is not None:
            first = items.first_at - call.started - call.queue_wait if items.first_at else None
            self.telemetry.set_stream(call.span, items.taken, first)
        self._finish(call, error)

    async def execute_program_command(
        self,
        session_id: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        affinity: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The seed's program helper: ``create_program`` / ``execute_program`` in a session.

        Same as ``SessionHelpers(pool).execute_program_command(...)``; see
        :class:`~snakepit_core.sessions.SessionHelpers`.
        """
        from .sessions import SessionHelpers

        return await SessionHelpers(self).execute_program_command(
            session_id, command, args, affinity=affinity, timeout=timeout
        )

    def _on_session_removed(self, session: Session) -> None:
        """Tell every worker that served a removed session to free its state: this pool's
        at once, other pools' through their inboxes (they read them with their heartbeat)."""
        if self._state != "running" or self._loop is None or self._presence is None:
            return
        for owner, worker_ids in session.served_by().items():
            if owner in ("", self._presence.owner):
                self._clear_workers(session.id, worker_ids)
            else:
                self.tasks.spawn(
                    self._send_clear(owner, session.id, worker_ids), f"clearing {session.id}"
                )

    def _clear_workers(self, session_id: str, worker_ids: set[str]) -> None:
        for worker_id in worker_ids:
            if worker_id in self.workers:
                self.tasks.spawn(
                    self._clear_on_worker(session_id, worker_id), f"clearing {session_id}"
                )

    async def _send_clear(self, owner: str, session_id: str, worker_ids: set[str]) -> None:
        """Post ``clear_session`` to the pool ``owner`` if it is still there (a silent one's
        workers are gone, and nobody would read its inbox)."""
        backend = self.sessions.backend
        try:
            if await backend.is_alive(owner):
                await backend.send_clear(owner, session_id, worker_ids)
        except SnakepitError as exc:
            log.warning("could not ask %s to clear session %r: %s", owner, session_id, exc)

    async def _clear_on_worker(self, session_id: str, worker_id: str) -> None:
        worker = self.workers.get(worker_id)
        if worker is None or not self.running:
            return
        if self.adapter.commands is not None and "clear_session" not in self.adapter.commands:
            return
        with contextlib.suppress(SnakepitError):
            await self._execute("clear_session", {}, 5.0, session_id, worker, True, False)

    def _current_hooks(self) -> AdapterHooks:
        """The adapter's hooks, rebuilt when a plugin came or went since they were built."""
        hooks = self._hooks
        if hooks.version != self._plugins.version:
            hooks = self._hooks = self._plugins.hooks_for(self.adapter, self._count_hook_error)
        return hooks

    def _count_hook_error(self, _hook: str, _plugin: str) -> None:
        self._hook_errors += 1

    # -- statistics ---------------------------------------------------------------------------

    def _gauges(self) -> dict[str, int]:
        busy = sum(1 for w in self.workers.values() if w.busy)
        return {"queued": self.dispatch.queued, "busy": busy, "available": self.dispatch.available}

    def stats(self) -> dict[str, Any]:
        """A snapshot: workers, available (with a free slot), busy (with a request in flight),
        in_flight, requests, queued, errors, timeouts, per-worker figures, ..."""
        gauges = self._gauges()
        now = time.monotonic()
        return {
            "adapter": self.adapter.name,
            "state": self._state,
            "workers": len(self.workers),
            "available": gauges["available"],
            "busy": gauges["busy"],
            "in_flight": sum(w.in_flight for w in self.workers.values()),
            "queued": gauges["queued"],
            **self.counters.snapshot(),
            "callbacks_running": self._callback_runner.running,
            "restarts": self.supervisor.restarts,
            "background_error": self.tasks.last_error,
            "breaker_open": self.supervisor.breaker_open,
            "hook_errors": self._hook_errors,
            "per_worker": {
                w.id: {
                    "pid": w.pid,
                    "state": "busy" if w.busy else w.state,
                    "in_flight": w.in_flight,
                    "capacity": w.capacity,
                    "protocol": w.protocol,
                    "requests": w.requests,
                    "errors": w.errors,
                    "uptime": round(now - w.started_at, 3),
                    "restarts": self.supervisor.slot_restarts(w),
                }
                for w in self.workers.values()
            },
        }

    def __repr__(self) -> str:
        return f"<Pool {self.adapter.name} {self._state} workers={len(self.workers)}>"


__all__ = ["Pool"]
