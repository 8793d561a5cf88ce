"""Supervision of a pool's workers: replacement, crash-loop breaker, health checks, recycling.

One refill task keeps the pool at ``pool_size``: a worker that had been serving is replaced at
once; early deaths (during start-up, or on the first request with a crash status) are retried
with exponential backoff, and ``crash_loop_threshold`` of them in a row open the breaker.

The breaker is for a bridge that cannot start, not for a hostile environment: a worker killed
from outside (SIGKILL, SIGTERM) never counts, and running out of descriptors, processes or
memory only backs off. While the breaker is open, one probe worker is started every
``crash_loop_probe_interval`` and the first request a worker started since then serves closes
it; calls fail fast with ``AdapterUnavailable`` only while no worker at all is in service.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import PoolConfig
from .errors import AdapterUnavailable, PoolStopped, SnakepitError, StartupError
from .registry import get_registry
from .shm import reap_dead_runs as reap_dead_segments
from .telemetry import Attr, PoolTelemetry
from .worker import Worker, describe_exit

if TYPE_CHECKING:
    from .dispatch import Dispatcher
    from .plugins import AdapterHooks
    from .tasks import BackgroundTasks

log = logging.getLogger("snakepit.supervisor")

EXTERNAL_KILL_CODES = (-signal.SIGKILL, -signal.SIGTERM)
#: Spawn failures that say the machine is short of something, not that the bridge is broken.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM, errno.ENOSPC})
#: Read a worker's RSS for ``max_worker_memory_mb`` at most this often (seconds).
MEMORY_CHECK_INTERVAL = 0.5


@dataclass(frozen=True)
class PoolControls:
    """What the supervisor may do to its pool, handed over by the pool: its only way in."""

    #: ``start_worker(slot, restart)``: start a worker into service; raises ``StartupError``.
    start_worker: Callable[[str, str | None], Awaitable[Worker]]
    #: ``retire(worker)``: no new requests for it; it leaves once its requests are done.
    retire: Callable[[Worker], None]
    #: The adapter's hooks as they are now (plugins may come and go).
    hooks: Callable[[], AdapterHooks]
    running: Callable[[], bool]


class _Watch:
    """The supervisor's record of one worker in service."""

    __slots__ = ("health_misses", "health_ping", "next_memory_check", "recycling")

    def __init__(self) -> None:
        self.health_ping: asyncio.Future[Any] | None = None
        self.health_misses = 0
        self.next_memory_check = 0.0
        #: A replacement is starting for it; it serves meanwhile.
        self.recycling = False


class Supervisor:
    """Keeps one pool healthy; created by the pool, driven by its events."""

    def __init__(
        self,
        adapter_name: str,
        config: PoolConfig,
        *,
        workers: Mapping[str, Worker],
        dispatch: Dispatcher,
        tasks: BackgroundTasks,
        telemetry: PoolTelemetry,
        controls: PoolControls,
    ) -> None:
        self._adapter = adapter_name
        self._config = config
        #: The workers in service (the pool's own mapping, read only here).
        self._workers = workers
        self._dispatch = dispatch
        self._tasks = tasks
        self._telemetry = telemetry
        self._pool = controls
        self._watched: dict[Worker, _Watch] = {}
        self.restarts = 0
        self.breaker = "closed"  # closed -> open -> half_open -> closed
        self.consecutive_early_deaths = 0
        self.last_failure = ""
        #: Loop time the breaker last opened: only workers ready after it close it again.
        self._opened_at = 0.0
        self._backoff = 0.0
        self._wake = asyncio.Event()
        self._slot_restarts: dict[str, int] = {}

    @property
    def breaker_open(self) -> bool:
        return self.breaker != "closed"

    def unavailable_error(self) -> AdapterUnavailable:
        name = self._adapter
        return AdapterUnavailable(
            f"adapter {name!r} is unavailable: its workers died early "
            f"{self.consecutive_early_deaths} times in a row (crash-loop breaker open; "
            f"probing every {self._config.crash_loop_probe_interval}s). Last failure: "
            f"{self.last_failure}",
            adapter=name,
        )

    # -- pool life cycle ----------------------------------------------------------------------

    def before_start(self) -> None:
        get_registry().reap_dead_runs()
        reap_dead_segments()

    def after_start(self) -> None:
        self._tasks.spawn(self._refill_loop(), "refill")
        self._tasks.spawn(self._health_loop(), "health checks")
        if len(self._workers) < self._config.pool_size:
            self._wake.set()

    def before_stop(self) -> list[asyncio.Task[Any]]:
        """Cancel every background task of the pool; the caller awaits what is returned."""
        return self._tasks.cancel_all()

    def after_stop(self) -> None:
        self._wake.clear()

    # -- worker events ------------------------------------------------------------------------

    def worker_ready(self, worker: Worker, restart: str | None = None) -> None:
        """``worker`` entered service; ``restart`` says why when it replaces another one (counted
        here, so ``restarts`` is up to date as soon as the replacement serves)."""
        assert worker.pid is not None
        if restart is not None:
            self._restarted(worker, restart)
        self._watched[worker] = _Watch()
        startup_time = worker.ready_at - worker.started_at
        self._pool.hooks().worker_started(
            worker_id=worker.id, pid=worker.pid, startup_time=startup_time
        )
        self._telemetry.worker_span(
            "snakepit.worker.start",
            {
                Attr.WORKER_ID: worker.id,
                Attr.PROCESS_PID: worker.pid,
                Attr.STARTUP_TIME: startup_time,
            },
        )
        if self.breaker == "open":
            self.breaker = "half_open"

    def worker_exited(self, worker: Worker) -> None:
        """A worker that was in service is gone: account for it and refill the pool."""
        assert worker.pid is not None
        self._watched.pop(worker, None)
        reason = worker.exit_reason or "crashed"
        self._pool.hooks().worker_exited(
            worker_id=worker.id, pid=worker.pid, exit_code=worker.exit_code, reason=reason
        )
        self._telemetry.worker_span(
            "snakepit.worker.exit",
            {
                Attr.WORKER_ID: worker.id,
                Attr.PROCESS_PID: worker.pid,
                Attr.PROCESS_EXIT_CODE: worker.exit_code if worker.exit_code is not None else -1,
                Attr.EXIT_REASON: reason,
            },
        )
        if not self._pool.running():
            return
        if reason not in ("stopped", "recycled"):
            log.warning(
                "pool %s: worker %s (pid %s) exited: %s (%s)%s",
                self._adapter,
                worker.id,
                worker.pid,
                reason,
                describe_exit(worker.exit_code),
                worker.stderr_excerpt(lines=5),
            )
        if self._is_early_death(worker, reason):
            self._record_early_death(
                f"worker {worker.id} died on its first request ({describe_exit(worker.exit_code)})"
                f"{worker.stderr_excerpt()}"
            )
        elif reason != "recycled" and worker.completed:
            self.consecutive_early_deaths = 0
            self._backoff = 0.0
        if reason != "recycled":
            self._slot_restarts[worker.slot] = self._slot_restarts.get(worker.slot, 0) + 1
            self._telemetry.record_restart(reason)
        self._wake.set()

    @staticmethod
    def _is_early_death(worker: Worker, reason: str) -> bool:
        if worker.completed > 0 or reason not in ("crashed", "protocol_error"):
            return False
        # After a protocol error the SIGKILL is the pool's own, not an external kill.
        return reason == "protocol_error" or worker.exit_code not in EXTERNAL_KILL_CODES

    def _grow_backoff(self) -> None:
        config = self._config
        self._backoff = min(
            config.restart_backoff_max,
            self._backoff * 2 if self._backoff else config.restart_backoff_initial,
        )

    def _record_early_death(self, description: str) -> None:
        self.consecutive_early_deaths += 1
        self.last_failure = description
        self._grow_backoff()
        config = self._config
        if self.consecutive_early_deaths >= config.crash_loop_threshold and self.breaker != "open":
            self.breaker = "open"
            self._opened_at = time.monotonic()
            error = self.unavailable_error()
            log.error("%s", error.message)
            if not self._workers:  # waiters of a pool still serving keep their place
                self._dispatch.fail_all(lambda: error)

    def record_startup_failure(self, failure: BaseException) -> None:
        """A worker failed to start: count it toward the breaker unless it is not the bridge's
        fault (killed from outside: retried at once; short of resources: backed off)."""
        description = getattr(failure, "message", repr(failure))
        cause = getattr(failure, "cause", None)
        if cause == "exited" and getattr(failure, "exit_code", None) in EXTERNAL_KILL_CODES:
            log.info("pool %s: a starting worker was killed: %s", self._adapter, description)
            return
        if cause == "spawn" and getattr(failure, "errno", None) in RESOURCE_ERRNOS:
            log.warning(
                "pool %s: cannot start a worker, backing off: %s",
                self._adapter,
                description,
            )
            self._grow_backoff()
            return
        self._record_early_death(description)

    def slot_restarts(self, worker: Worker) -> int:
        return self._slot_restarts.get(worker.slot, 0)

    # -- refill -------------------------------------------------------------------------------

    def _missing(self) -> int:
        return self._config.pool_size - len(self._workers)

    async def _refill_loop(self) -> None:
        """Keep the pool at ``pool_size`` for as long as it runs.

        A bug in one round is logged, shows in ``stats()["background_error"]``, and the loop
        goes on after a pause: self-healing never silently ends.
        """
        config = self._config
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._refill()
            except Exception as exc:  # a bug: record it, keep healing
                self._tasks.record("refill", exc)
                await asyncio.sleep(config.restart_backoff_max)
                self._wake.set()

    async def _refill(self) -> None:
        config = self._config
        while self._pool.running() and self._missing() > 0:
            if self.breaker == "open":
                await asyncio.sleep(config.crash_loop_probe_interval)
                count = 1
            else:
                if self._backoff:
                    await asyncio.sleep(self._backoff)
                count = self._missing()
            if not self._pool.running() or count <= 0:
                return
            slots = self._free_slots(count)
            results = await asyncio.gather(
                *(self._pool.start_worker(slot, "replaced") for slot in slots),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, StartupError):
                    self.record_startup_failure(result)
                elif isinstance(result, BaseException):
                    if not isinstance(result, PoolStopped):
                        raise result
                elif not self.consecutive_early_deaths:
                    self._backoff = 0.0  # resources are back

    def _restarted(self, worker: Worker, why: str) -> None:
        self.restarts += 1
        self._telemetry.worker_span(
            "snakepit.worker.restart",
            {Attr.WORKER_ID: worker.id, Attr.PROCESS_PID: worker.pid or -1, Attr.EXIT_REASON: why},
        )

    def _free_slots(self, count: int) -> list[str]:
        used = {w.slot for w in self._workers.values()}
        free = [str(i) for i in range(self._config.pool_size) if str(i) not in used]
        return free[:count]

    # -- health checks ------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        config = self._config
        while True:
            await asyncio.sleep(config.worker_health_check_interval)
            for worker in list(self._workers.values()):
                self._check_health(worker)

    def _check_health(self, worker: Worker) -> None:
        watch = self._watched.get(worker)
        if watch is None:
            return
        config = self._config
        if watch.health_ping is not None:
            watch.health_misses += 1
        elif not worker.busy and self._dispatch.try_take(worker):
            budget = config.worker_health_check_interval * (config.worker_health_check_misses + 1)
            try:
                ping = worker.send("ping", {}, timeout=budget)
            except SnakepitError:
                self._dispatch.release(worker)
                watch.health_misses += 1
            else:
                watch.health_ping = ping
                ping.add_done_callback(lambda done: self._health_answer(watch, done))
        if watch.health_misses >= config.worker_health_check_misses:
            log.warning(
                "pool %s: worker %s missed %d health checks; replacing it",
                self._adapter,
                worker.id,
                watch.health_misses,
            )
            worker.kill("unhealthy")

    @staticmethod
    def _health_answer(watch: _Watch, ping: asyncio.Future[Any]) -> None:
        watch.health_ping = None
        if ping.cancelled() or ping.exception() is not None:
            watch.health_misses += 1
        else:
            watch.health_misses = 0

    # -- recycling ----------------------------------------------------------------------------

    def after_answer(self, worker: Worker) -> None:
        """Called on every answer, before the slot is handed on: close a half-open breaker
        (a worker started since it opened has served), and start recycling when due."""
        if self.breaker == "half_open" and worker.completed and worker.ready_at > self._opened_at:
            self.breaker = "closed"
            self.consecutive_early_deaths = 0
            self._backoff = 0.0
            log.info("pool %s: crash-loop breaker closed", self._adapter)
            self._wake.set()
        watch = self._watched.get(worker)
        if watch is None or watch.recycling or worker.retiring or not self._pool.running():
            return
        config = self._config
        due = bool(config.max_requests_per_worker) and (
            worker.completed >= config.max_requests_per_worker
        )
        if not due and config.max_worker_memory_mb:
            now = time.monotonic()
            if now >= watch.next_memory_check:
                watch.next_memory_check = now + MEMORY_CHECK_INTERVAL
                rss = worker.rss_bytes()
                due = rss is not None and rss > config.max_worker_memory_mb * 1024 * 1024
        if due:
            watch.recycling = True
            self._tasks.spawn(self._recycle(worker, watch), f"recycling {worker.id}")

    async def _recycle(self, old: Worker, watch: _Watch) -> None:
        """Start the replacement first; only then take ``old`` out of service, once the
        requests in flight on it are answered (no capacity dip, no request lost)."""
        try:
            await self._pool.start_worker(old.slot, "recycled")
        except SnakepitError as exc:
            log.warning("pool %s: recycling %s: replacement failed: %s", self._adapter, old.id, exc)
            watch.recycling = False
            return
        old.exit_reason = "recycled"
        self._pool.retire(old)
