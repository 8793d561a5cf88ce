"""Sessions: state that lives across requests, and the worker a session last used.

:class:`SessionStore` is the API (async; ``snakepit_core.sync.SyncSessionStore`` is its
blocking twin). It keeps sessions in a :class:`SessionBackend`; :class:`InMemoryBackend` is
the embedded default, and another backend (e.g. a shared one) plugs in without touching the
pool. TTLs slide: reads
and updates push expiry forward. Expiry uses an injectable monotonic clock so tests drive it
without sleeping; user-facing timestamps are wall-clock UTC.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from .errors import SessionExists, SessionNotFound, ValidationError

if TYPE_CHECKING:
    from .config import PoolConfig

log = logging.getLogger("snakepit.sessions")

MAX_SESSION_ID_LENGTH = 256
#: Earlier owners a session remembers, so that their workers free its state when it ends.
MAX_LEFT_BEHIND = 16
DEFAULT_TTL = 3600.0


def check_session_id(session_id: Any) -> None:
    """Refuse ids that are not non-empty strings of at most 256 characters."""
    if not isinstance(session_id, str):
        raise ValidationError(
            f"session_id must be a string, not {type(session_id).__name__}", field="session_id"
        )
    if not session_id:
        raise ValidationError("session_id must not be empty", field="session_id")
    if len(session_id) > MAX_SESSION_ID_LENGTH:
        raise ValidationError(
            f"session_id is {len(session_id)} characters; at most {MAX_SESSION_ID_LENGTH}",
            field="session_id",
        )


def utc_now() -> datetime:
    return datetime.now(UTC)


def owner_key(node_id: str, adapter: str) -> str:
    """The name of one pool among all hosts: its node and its adapter (``host-7/python``)."""
    return f"{node_id}/{adapter}"


@dataclass
class Session:
    """One session. Its worker-side state lives in worker ``last_worker_id`` of the pool of
    adapter ``adapter`` on node ``node_id`` (its *owner*)."""

    id: str
    ttl: float
    created_at: datetime
    last_accessed: datetime
    programs: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    last_worker_id: str | None = None
    #: Every worker of the owner that served the session (they get ``clear_session`` when
    #: it ends).
    worker_ids: set[str] = field(default_factory=set)
    #: Deadline on the store's clock; refreshed on every access.
    expires_at: float = 0.0
    #: The node and adapter of the pool that served the session last.
    node_id: str | None = None
    adapter: str | None = None
    #: Workers of earlier owners, by :func:`owner_key`: state left behind when the session
    #: moved, which they free when it ends.
    left_behind: dict[str, set[str]] = field(default_factory=dict)

    @property
    def owner(self) -> str | None:
        """The owner's :func:`owner_key`, or None before a pool served the session."""
        if self.node_id is None or self.adapter is None:
            return None
        return owner_key(self.node_id, self.adapter)

    def bind(
        self, worker_id: str | None, node_id: str | None = None, adapter: str | None = None
    ) -> None:
        """Record the worker (of the pool of ``adapter`` on ``node_id``) that serves the
        session; ``None`` unbinds it. Moving to another pool leaves the old one's workers in
        :attr:`left_behind`."""
        if node_id is not None and adapter is not None:
            previous = self.owner
            if previous is not None and previous != owner_key(node_id, adapter):
                self._leave_behind(previous)
            self.node_id, self.adapter = node_id, adapter
            self.left_behind.pop(owner_key(node_id, adapter), None)
        self.last_worker_id = worker_id
        if worker_id is not None:
            self.worker_ids.add(worker_id)

    def unbind(self) -> None:
        """Forget the owner (it is gone); its workers stay in :attr:`left_behind`."""
        previous = self.owner
        if previous is not None:
            self._leave_behind(previous)
        self.node_id = self.adapter = self.last_worker_id = None

    def _leave_behind(self, owner: str) -> None:
        """Move the workers of ``owner`` to :attr:`left_behind`, which keeps the latest
        :data:`MAX_LEFT_BEHIND` owners (node ids change with every restart of a host)."""
        if self.worker_ids:
            workers = self.left_behind.pop(owner, set()) | self.worker_ids
            self.left_behind[owner] = workers
            while len(self.left_behind) > MAX_LEFT_BEHIND:
                del self.left_behind[next(iter(self.left_behind))]
        self.worker_ids = set()

    def served_by(self) -> dict[str, set[str]]:
        """Every worker that may hold the session's state, by :func:`owner_key` (workers
        recorded before any owner was known come under ``""``)."""
        served = {owner: set(workers) for owner, workers in self.left_behind.items()}
        if self.worker_ids:
            served.setdefault(self.owner or "", set()).update(self.worker_ids)
        return served


class SessionBackend(Protocol):
    """Where sessions, global programs and the statistics are kept. All methods are
    coroutines. ``update`` must be atomic against every other writer (the function may run
    more than once); ``create`` stores only if the id is free; ``claim_expired`` gives each
    expired session to exactly one caller. Pools keep a heartbeat per owner (``beat``,
    ``is_alive``, ``release``) and an inbox of sessions whose state their workers must free
    (``send_clear``, ``take_clears``)."""

    async def get(self, session_id: str) -> Session | None: ...
    async def put(self, session: Session) -> None: ...
    async def create(self, session: Session) -> bool: ...
    async def update(
        self, session_id: str, apply: Callable[[Session], Session | None]
    ) -> Session | None: ...
    async def delete(self, session_id: str) -> Session | None: ...
    async def all(self) -> list[Session]: ...
    async def claim_expired(self, now: float) -> list[str]: ...
    async def get_global(self, program_id: str) -> tuple[Any, float] | None: ...
    async def put_global(self, program_id: str, data: Any, expires_at: float) -> None: ...
    async def delete_global(self, program_id: str) -> None: ...
    async def all_globals(self) -> list[tuple[str, float]]: ...
    async def count(self, name: str, amount: int = 1) -> None: ...
    async def counts(self, names: Iterable[str]) -> dict[str, int]: ...
    async def beat(self, owner: str, ttl: float) -> None: ...
    async def is_alive(self, owner: str) -> bool: ...
    async def release(self, owner: str) -> None: ...
    async def send_clear(self, owner: str, session_id: str, worker_ids: set[str]) -> None: ...
    async def take_clears(self, owner: str) -> list[tuple[str, set[str]]]: ...


class InMemoryBackend:
    """The embedded default: dicts in this process (one event loop: nothing interleaves)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._sessions: dict[str, Session] = {}
        self._globals: dict[str, tuple[Any, float]] = {}
        self._counts: dict[str, int] = {}
        self._clock = clock
        self._heartbeats: dict[str, float] = {}
        self._inboxes: dict[str, list[tuple[str, set[str]]]] = {}

    async def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    async def put(self, session: Session) -> None:
        self._sessions[session.id] = session

    async def create(self, session: Session) -> bool:
        return self._sessions.setdefault(session.id, session) is session

    async def update(
        self, session_id: str, apply: Callable[[Session], Session | None]
    ) -> Session | None:
        session = self._sessions.get(session_id)
        updated = None if session is None else apply(session)
        if updated is not None:
            self._sessions[session_id] = updated
        return updated

    async def claim_expired(self, now: float) -> list[str]:
        return [s.id for s in self._sessions.values() if s.expires_at <= now]

    async def count(self, name: str, amount: int = 1) -> None:
        self._counts[name] = self._counts.get(name, 0) + amount

    async def counts(self, names: Iterable[str]) -> dict[str, int]:
        return {name: self._counts.get(name, 0) for name in names}

    async def delete(self, session_id: str) -> Session | None:
        return self._sessions.pop(session_id, None)

    async def all(self) -> list[Session]:
        return list(self._sessions.values())

    async def get_global(self, program_id: str) -> tuple[Any, float] | None:
        return self._globals.get(program_id)

    async def put_global(self, program_id: str, data: Any, expires_at: float) -> None:
        self._globals[program_id] = (data, expires_at)

    async def delete_global(self, program_id: str) -> None:
        self._globals.pop(program_id, None)

    async def all_globals(self) -> list[tuple[str, float]]:
        return [(key, expires) for key, (_, expires) in self._globals.items()]

    async def beat(self, owner: str, ttl: float) -> None:
        self._heartbeats[owner] = self._clock() + ttl

    async def is_alive(self, owner: str) -> bool:
        return self._heartbeats.get(owner, 0.0) > self._clock()

    async def release(self, owner: str) -> None:
        self._heartbeats.pop(owner, None)
        self._inboxes.pop(owner, None)

    async def send_clear(self, owner: str, session_id: str, worker_ids: set[str]) -> None:
        self._inboxes.setdefault(owner, []).append((session_id, set(worker_ids)))

    async def take_clears(self, owner: str) -> list[tuple[str, set[str]]]:
        return self._inboxes.pop(owner, [])


#: Runs with each session that was deleted or expired (``SessionStore.add_listener``).
RemovalListener = Callable[[Session], None]

#: The counters every backend keeps (``get_stats``).
STAT_NAMES = (
    "sessions_created",
    "sessions_deleted",
    "sessions_expired",
    "cleanup_runs",
    "global_programs_stored",
    "global_programs_expired",
)


class SessionStore:
    """Sessions with sliding TTLs, programs, global programs and statistics."""

    def __init__(
        self,
        backend: SessionBackend | None = None,
        *,
        ttl: float = DEFAULT_TTL,
        cleanup_interval: float = 60.0,
        global_program_ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend: SessionBackend = backend or InMemoryBackend(clock)
        self.ttl = ttl
        self.cleanup_interval = cleanup_interval
        self.global_program_ttl = global_program_ttl
        self.clock = clock
        self._listeners: list[RemovalListener] = []
        self._cleanup_task: asyncio.Task[None] | None = None

    # -- housekeeping -------------------------------------------------------------------------

    def add_listener(self, listener: RemovalListener) -> None:
        """``listener(session)`` runs when a session is deleted or expires (its
        :meth:`Session.served_by` names the workers that may hold its state)."""
        self._listeners.append(listener)

    def start_cleanup(self) -> None:
        """Run the background clean-up every ``cleanup_interval`` (the first session starts
        it; a pool starts it at once, since with a shared backend every host takes part in
        expiry, also one that created no session)."""
        if self._cleanup_task is None or self._cleanup_task.done():
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to schedule
                self._cleanup_task = asyncio.get_running_loop().create_task(self._cleanup_loop())

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cleanup_interval)
            try:
                await self.cleanup_expired_sessions()
            except Exception:
                log.exception("session cleanup failed; retrying next interval")

    def close(self) -> None:
        """Stop the background cleanup task."""
        if self._cleanup_task is not None:
            self._cleanup_task.cancel()
            self._cleanup_task = None

    def _removed(self, session: Session) -> None:
        for listener in self._listeners:
            try:
                listener(session)
            except Exception:
                log.exception("session removal listener failed")

    async def _live(self, session_id: str) -> Session | None:
        """The session if it exists and has not expired (expired ones are removed)."""
        session = await self.backend.get(session_id)
        if session is not None and session.expires_at <= self.clock():
            await self._expire(session)
            return None
        return session

    async def _expire(self, session: Session) -> None:
        removed = await self.backend.delete(session.id)
        if removed is not None:
            await self.backend.count("sessions_expired")
            self._removed(removed)

    def _touch(self, session: Session) -> None:
        session.last_accessed = utc_now()
        session.expires_at = self.clock() + session.ttl

    # -- sessions -----------------------------------------------------------------------------

    async def create_session(
        self, session_id: str, *, ttl: float | None = None, metadata: dict[str, Any] | None = None
    ) -> Session:
        """A new session; ``SessionExists`` if the id is taken."""
        check_session_id(session_id)
        self.start_cleanup()
        if await self._live(session_id) is not None:
            raise SessionExists(f"session {session_id!r} already exists", session_id=session_id)
        ttl = self.ttl if ttl is None else ttl
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl <= 0:
            raise ValidationError(f"session ttl must be a number of seconds > 0, not {ttl!r}")
        now = utc_now()
        session = Session(
            id=session_id,
            ttl=float(ttl),
            created_at=now,
            last_accessed=now,
            metadata=dict(metadata or {}),
            expires_at=self.clock() + ttl,
        )
        if not await self.backend.create(session):
            raise SessionExists(f"session {session_id!r} already exists", session_id=session_id)
        await self.backend.count("sessions_created")
        return session

    async def get_session(self, session_id: str) -> Session:
        """The session (its TTL refreshed); ``SessionNotFound`` if missing or expired."""
        return await self.update_session(session_id, lambda session: None)

    async def get_or_create_session(self, session_id: str) -> Session:
        try:
            return await self.get_session(session_id)
        except SessionNotFound:
            pass
        try:
            return await self.create_session(session_id)
        except SessionExists:  # another caller (or host) created it meanwhile
            return await self.get_session(session_id)

    async def update_session(
        self, session_id: str, update: Callable[[Session], Session | None]
    ) -> Session:
        """Apply ``update`` (it may mutate the session or return a new one) and save, its TTL
        refreshed. Atomic against every other writer, also on other hosts with a shared
        backend: ``update`` may then run more than once, so it must not have side effects.
        ``SessionNotFound`` if the session is missing or expired."""
        check_session_id(session_id)
        now = self.clock()

        def apply(session: Session) -> Session | None:
            if session.expires_at <= now:
                return None
            updated = update(session)
            session = session if updated is None else updated
            self._touch(session)
            return session

        result = await self.backend.update(session_id, apply)
        if result is None:
            await self._live(session_id)  # an expired session is removed (and cleared) now
            raise SessionNotFound(f"session {session_id!r} not found", session_id=session_id)
        return result

    async def session_exists(self, session_id: str) -> bool:
        return await self._live(session_id) is not None

    async def peek_session(self, session_id: str) -> Session | None:
        """The session as stored, its TTL left as it is; None if missing or expired."""
        check_session_id(session_id)
        return await self._live(session_id)

    async def list_sessions(self) -> list[str]:
        now = self.clock()
        return sorted(s.id for s in await self.backend.all() if s.expires_at > now)

    async def delete_session(self, session_id: str) -> bool:
        """Remove the session; ``False`` if there was none. Its workers free their state."""
        session = await self.backend.delete(session_id)
        if session is None:
            return False
        await self.backend.count("sessions_deleted")
        self._removed(session)
        return True

    async def note_worker(
        self,
        session_id: str,
        worker_id: str,
        node_id: str | None = None,
        adapter: str | None = None,
    ) -> None:
        """Remember that ``worker_id`` (of the pool of ``adapter`` on ``node_id``) served the
        session: affinity, ownership and clean-up."""

        def bind(current: Session) -> Session | None:
            if current.last_worker_id == worker_id and (
                node_id is None or (current.node_id, current.adapter) == (node_id, adapter)
            ):
                return None  # already bound there: nothing to write
            current.bind(worker_id, node_id, adapter)
            return current

        await self.backend.update(session_id, bind)

    async def cleanup_expired_sessions(self) -> int:
        """Remove expired sessions and global programs; returns the sessions this store
        removed (with a shared backend, each expired session is removed by one host)."""
        await self.backend.count("cleanup_runs")
        now = self.clock()
        removed = 0
        for session_id in await self.backend.claim_expired(now):
            session = await self.backend.get(session_id)
            if session is not None and session.expires_at <= now:
                await self._expire(session)
                removed += 1
        for program_id, expires_at in await self.backend.all_globals():
            if expires_at <= now:
                await self.backend.delete_global(program_id)
                await self.backend.count("global_programs_expired")
        return removed

    # -- programs -----------------------------------------------------------------------------

    async def store_program(self, session_id: str, program_id: str, data: Any) -> None:
        def put(session: Session) -> None:
            session.programs[program_id] = data

        await self.update_session(session_id, put)

    async def get_program(self, session_id: str, program_id: str) -> Any:
        """The program, or ``None`` if the session has no program of that id."""
        session = await self.get_session(session_id)
        return session.programs.get(program_id)

    async def store_global_program(self, program_id: str, data: Any) -> None:
        """A program visible to every session; it expires ``global_program_ttl`` after now."""
        await self.backend.put_global(program_id, data, self.clock() + self.global_program_ttl)
        await self.backend.count("global_programs_stored")

    async def get_global_program(self, program_id: str) -> Any:
        entry = await self.backend.get_global(program_id)
        if entry is None:
            return None
        data, expires_at = entry
        if expires_at <= self.clock():
            await self.backend.delete_global(program_id)
            await self.backend.count("global_programs_expired")
            return None
        return data

    # -- statistics ---------------------------------------------------------------------------

    async def get_stats(self) -> dict[str, Any]:
        sessions = await self.backend.all()
        now = self.clock()
        live = [s for s in sessions if s.expires_at > now]
        memory = sum(_estimate_size(s) for s in live)
        return {
            **await self.backend.counts(STAT_NAMES),
            "current_sessions": len(live),
            "global_programs": len(await self.backend.all_globals()),
            "memory_estimate_bytes": memory,
        }


def _estimate_size(session: Session) -> int:
    """A rough byte count (objects plus their repr) for the memory estimate in stats."""
    return sys.getsizeof(session) + len(repr(session.programs)) + len(repr(session.metadata))


def _program_inputs(args: dict[str, Any]) -> Any:
    """``inputs``, or ``input`` as the seed's README spells it (never both)."""
    if "inputs" in args and "input" in args:
        raise ValidationError(
            "execute_program: give args.inputs or args.input, not both", field="args.input"
        )
    return args.get("inputs", args.get("input", {}))


class SessionHelpers:
    """Programs on top of sessions (the seed's ``SessionHelpers``).

    ``create_program`` runs on a worker, then the program is stored in the session;
    ``execute_program`` loads it from the store and sends it with the inputs, so any worker
    can run it, and counts the execution.
    """

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def execute_program_command(
        self,
        session_id: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        affinity: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run a program command in ``session_id``; any other command runs as is."""
        options = {"affinity": affinity, "timeout": timeout}
        args = dict(args or {})
        store: SessionStore = self.pool.sessions
        if command == "create_program":
            result = await self.pool.execute_in_session(session_id, command, args, **options)
            record = {
                **copy.deepcopy(result),
                "created_at": utc_now().isoformat(),
                "execution_count": 0,
                "last_executed": None,
            }
            await store.store_program(session_id, result["program_id"], record)
            return result
        if command == "execute_program":
            program_id = args.pop("program_id", None)
            if not isinstance(program_id, str) or not program_id:
                raise ValidationError(
                    "execute_program: args.program_id is required", field="args.program_id"
                )
            await self.pool.sessions.get_or_create_session(session_id)
            program = await store.get_program(session_id, program_id)
            if program is None:
                program = await store.get_global_program(program_id)
            if program is None:
                raise ValidationError(
                    f"execute_program: no program {program_id!r} in session {session_id!r} "
                    "(create it first with create_program)",
                    field="args.program_id",
                )
            sent = {
                key: program[key]
                for key in ("program_id", "signature", "inputs", "outputs", "config")
                if key in program
            }
            result = await self.pool.execute_in_session(
                session_id,
                command,
                {"program": sent, "inputs": _program_inputs(args)},
                **options,
            )

            def count(session: Session) -> None:
                stored = session.programs.get(program_id)
                if stored is not None:
                    stored["execution_count"] = stored.get("execution_count", 0) + 1
                    stored["last_executed"] = utc_now().isoformat()

            if await store.session_exists(session_id):
                await store.update_session(session_id, count)
            return result
        return await self.pool.execute_in_session(session_id, command, args, **options)


def new_session_store(config: PoolConfig) -> SessionStore:
    """The store ``config`` asks for: in memory (``session_backend = "memory"``, the default)
    or in Redis (``"redis"``, at ``redis_url``, keys under ``redis_key_prefix``)."""
    backend: SessionBackend | None = None
    clock: Callable[[], float] = time.monotonic
    if config.session_backend == "redis":
        from .redis_sessions import RedisBackend

        backend = redis = RedisBackend(config.redis_url, key_prefix=config.redis_key_prefix)
        clock = redis.clock
    return SessionStore(
        backend,
        ttl=config.session_ttl,
        cleanup_interval=config.session_cleanup_interval,
        global_program_ttl=config.global_program_ttl,
        clock=clock,
    )
