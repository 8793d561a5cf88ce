"""Sessions and programs in Redis, shared by every host that points at the same server.

:class:`RedisBackend` is a :class:`~snakepit_core.sessions.SessionBackend` on redis-py's
asyncio client (``pip install 'snakepit-core[redis]'``), selected with
``session_backend = "redis"`` and ``redis_url``. Sessions are JSON (never pickle) under
``<prefix>session:<id>`` with a Redis expiry that slides with each access, global programs
under ``<prefix>program:<id>``, the statistics in the hash ``<prefix>stats`` so that every host
sees the same figures. ``update`` is optimistic (a compare-and-set script, retried): no update
is lost when several hosts write one session at once, and the update function may run more than
once, so it must be pure. Expiry needs nothing from the server's configuration: the sorted set
``<prefix>expiry`` lists each session's deadline, and the host whose clean-up removes an entry
is the one that reports it (so its workers get ``clear_session``). Redis being unreachable is
a :class:`~snakepit_core.errors.SessionBackendUnavailable`; the password in the URL never
appears in a message. Each pool's heartbeat is ``<prefix>node:<node_id>/<adapter>`` (a key
with a TTL), and its inbox of sessions to clear the list ``<prefix>inbox:<node_id>/<adapter>``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from .config import KEY_PREFIX_PATTERN
from .errors import ConfigError, SessionBackendUnavailable
from .sessions import Session
from .urls import redacted

__all__ = ["RedisBackend", "check_key_prefix"]

#: Seconds a session's key outlives its deadline (the store treats it as gone at the deadline).
EXPIRY_GRACE = 300.0
#: Connections one backend opens to the server at most.
MAX_CONNECTIONS = 32
#: The longest pause, in seconds, before an update is tried again.
BACKOFF = 0.05
#: How long an update keeps trying while other writers get in first.
UPDATE_PATIENCE = 30.0
#: Writes a session only if it is still the text that was read (``update``): KEYS are the
#: session and the expiry set, ARGV the old text, the new one, its expiry in milliseconds,
#: its deadline and its id.
COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
  return 1
end
return 0
"""
#: Seconds a pool's inbox of ``clear_session`` requests lasts after the last one came.
INBOX_TTL = 3600


def check_key_prefix(prefix: Any) -> None:
    """``ConfigError`` unless ``prefix`` is letters, digits and ``:_.-`` only."""
    if not isinstance(prefix, str) or not KEY_PREFIX_PATTERN.fullmatch(prefix):
        raise ConfigError(
            f"configuration key 'redis_key_prefix' = {prefix!r}: only letters, digits and "
            "':_.-' are allowed",
            key="redis_key_prefix",
        )


def _session_to_json(session: Session) -> str:
    return json.dumps(
        {
            "id": session.id,
            "ttl": session.ttl,
            "created_at": session.created_at.isoformat(),
            "last_accessed": session.last_accessed.isoformat(),
            "programs": session.programs,
            "metadata": session.metadata,
            "last_worker_id": session.last_worker_id,
            "worker_ids": sorted(session.worker_ids),
            "expires_at": session.expires_at,
            "node_id": session.node_id,
            "adapter": session.adapter,
            "left_behind": {owner: sorted(ids) for owner, ids in session.left_behind.items()},
        }
    )


def _session_from_json(text: bytes | str) -> Session:
    data = json.loads(text)
    return Session(
        id=data["id"],
        ttl=data["ttl"],
        created_at=datetime.fromisoformat(data["created_at"]),
        last_accessed=datetime.fromisoformat(data["last_accessed"]),
        programs=data["programs"],
        metadata=data["metadata"],
        last_worker_id=data["last_worker_id"],
        worker_ids=set(data["worker_ids"]),
        expires_at=data["expires_at"],
        node_id=data.get("node_id"),
        adapter=data.get("adapter"),
        left_behind={owner: set(ids) for owner, ids in data.get("left_behind", {}).items()},
    )


class RedisBackend:
    """A :class:`~snakepit_core.sessions.SessionBackend` in Redis (see the module's doc).

    Its clock is the wall clock (``time.time``): deadlines are compared across hosts.
    """

    #: The clock :class:`~snakepit_core.sessions.SessionStore` must use with this backend.
    clock: Callable[[], float] = staticmethod(time.time)

    def __init__(self, url: str, *, key_prefix: str = "snakepit:") -> None:
        check_key_prefix(key_prefix)
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise ConfigError(
                "session_backend 'redis' needs the redis package: pip install "
                "'snakepit-core[redis]'",
                key="session_backend",
            ) from None
        self.url = redacted(url)
        try:
            # Blocking: many calls at once wait for a free connection instead of failing.
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=MAX_CONNECTIONS,
                timeout=10,
                socket_timeout=5,
                socket_connect_timeout=5,
            )
            self._redis = aioredis.Redis(connection_pool=pool)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"configuration key 'redis_url' = {self.url!r} does not parse: "
                f"{str(exc).replace(url, self.url)}",
                key="redis_url",
            ) from None
        self._errors: tuple[type[BaseException], ...] = (
            aioredis.ConnectionError,
            aioredis.TimeoutError,
            aioredis.AuthenticationError,
            aioredis.ResponseError,
            OSError,
        )
        self._compare_and_set = self._redis.register_script(COMPARE_AND_SET)
        self._prefix = key_prefix

    # -- keys and errors ----------------------------------------------------------------------

    def _session_key(self, session_id: str) -> str:
        return f"{self._prefix}session:{session_id}"

    def _program_key(self, program_id: str) -> str:
        return f"{self._prefix}program:{program_id}"

    @property
    def _expiry_key(self) -> str:
        return f"{self._prefix}expiry"

    @property
    def _stats_key(self) -> str:
        return f"{self._prefix}stats"

    def _node_key(self, owner: str) -> str:
        return f"{self._prefix}node:{owner}"

    def _inbox_key(self, owner: str) -> str:
        return f"{self._prefix}inbox:{owner}"

    def _unavailable(self, exc: BaseException) -> SessionBackendUnavailable:
        what = str(exc).replace(self.url, "") or type(exc).__name__
        return SessionBackendUnavailable(
            f"session backend redis at {self.url} is unavailable: {type(exc).__name__}: {what}"
        )

    async def _call(self, operation: Callable[[], Any]) -> Any:
        try:
            return await operation()
        except self._errors as exc:
            raise self._unavailable(exc) from None

    # -- sessions -----------------------------------------------------------------------------

    @staticmethod
    def _milliseconds_left(session: Session) -> int:
        """The key's expiry: the session's deadline plus :data:`EXPIRY_GRACE`, so the host
        that claims an expired session still finds which workers served it."""
        return max(1, int((session.expires_at - time.time() + EXPIRY_GRACE) * 1000))

    async def get(self, session_id: str) -> Session | None:
        raw = await self._call(lambda: self._redis.get(self._session_key(session_id)))
        return None if raw is None else _session_from_json(raw)

    async def put(self, session: Session) -> None:
        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(
                    self._session_key(session.id),
                    _session_to_json(session),
                    px=self._milliseconds_left(session),
                )
                pipe.zadd(self._expiry_key, {session.id: session.expires_at})
                await pipe.execute()

        await self._call(write)

    async def create(self, session: Session) -> bool:
        """Store a new session unless its id is taken (``SET NX``); True if stored."""

        async def write() -> bool:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(
                    self._session_key(session.id),
                    _session_to_json(session),
                    px=self._milliseconds_left(session),
                    nx=True,
                )
                pipe.zadd(self._expiry_key, {session.id: session.expires_at})
                stored, _ = await pipe.execute()
            return bool(stored)

        stored: bool = await self._call(write)
        return stored

    async def update(
        self, session_id: str, apply: Callable[[Session], Session | None]
    ) -> Session | None:
        """Apply ``apply`` to the session and store the result, atomically against every other
        writer: a compare-and-set script writes it only if the session is still what was
        read, else it is read and applied again. None if there is no session, or ``apply``
        returned None (nothing is written). One round trip to read, one to write."""
        key = self._session_key(session_id)

        async def attempt() -> Session | None:
            give_up = time.monotonic() + UPDATE_PATIENCE
            for tries in itertools.count():
                raw = await self._redis.get(key)
                if raw is None:
                    return None
                updated = apply(_session_from_json(raw))
                if updated is None:
                    return None
                written = await self._compare_and_set(
                    keys=[key, self._expiry_key],
                    args=[
                        raw,
                        _session_to_json(updated),
                        self._milliseconds_left(updated),
                        repr(updated.expires_at),
                        updated.id,
                    ],
                )
                if written:
                    return updated
                if time.monotonic() > give_up:
                    break
                # Another writer got in first: back off (jittered, growing), so that many
                # writers of one session do not keep invalidating each other.
                await asyncio.sleep(random.uniform(0, min(BACKOFF, 0.0005 * 2**tries)))
            raise SessionBackendUnavailable(
                f"session {session_id!r}: other writers kept changing it for "
                f"{UPDATE_PATIENCE:.0f} s while it was being updated; giving up"
            )

        result: Session | None = await self._call(attempt)
        return result

    async def delete(self, session_id: str) -> Session | None:
        async def remove() -> Session | None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.getdel(self._session_key(session_id))
                pipe.zrem(self._expiry_key, session_id)
                raw, _ = await pipe.execute()
            return None if raw is None else _session_from_json(raw)

        result: Session | None = await self._call(remove)
        return result

    async def all(self) -> list[Session]:
        async def scan() -> list[Session]:
            keys = [key async for key in self._redis.scan_iter(f"{self._prefix}session:*", 500)]
            sessions = []
            for start in range(0, len(keys), 500):
                for raw in await self._redis.mget(keys[start : start + 500]):
                    if raw is not None:
                        sessions.append(_session_from_json(raw))
            return sessions

        result: list[Session] = await self._call(scan)
        return result

    async def claim_expired(self, now: float) -> list[str]:
        """The ids of sessions whose deadline passed, each claimed by exactly one caller
        (the one whose ``ZREM`` removed it) and whose key is gone or stale."""

        async def claim() -> list[str]:
            due = await self._redis.zrangebyscore(self._expiry_key, "-inf", now)
            claimed: list[str] = []
            for member in due:
                session_id = member.decode() if isinstance(member, bytes) else str(member)
                if await self._redis.zrem(self._expiry_key, session_id):
                    claimed.append(session_id)
            return claimed

        result: list[str] = await self._call(claim)
        return result

    # -- global programs ----------------------------------------------------------------------

    async def get_global(self, program_id: str) -> tuple[Any, float] | None:
        raw = await self._call(lambda: self._redis.get(self._program_key(program_id)))
        if raw is None:
            return None
        entry = json.loads(raw)
        return entry["data"], entry["expires_at"]

    async def put_global(self, program_id: str, data: Any, expires_at: float) -> None:
        text = json.dumps({"data": data, "expires_at": expires_at})
        left = max(1, int((expires_at - time.time()) * 1000))
        await self._call(lambda: self._redis.set(self._program_key(program_id), text, px=left))

    async def delete_global(self, program_id: str) -> None:
        await self._call(lambda: self._redis.delete(self._program_key(program_id)))

    async def all_globals(self) -> list[tuple[str, float]]:
        async def scan() -> list[tuple[str, float]]:
            found = []
            pattern = f"{self._prefix}program:*"
            async for key in self._redis.scan_iter(pattern, 500):
                raw = await self._redis.get(key)
                if raw is not None:
                    name = key.decode() if isinstance(key, bytes) else key
                    found.append((name[len(self._prefix) + 8 :], json.loads(raw)["expires_at"]))
            return found

        result: list[tuple[str, float]] = await self._call(scan)
        return result

    # -- statistics ---------------------------------------------------------------------------

    async def count(self, name: str, amount: int = 1) -> None:
        await self._call(lambda: self._redis.hincrby(self._stats_key, name, amount))

    async def counts(self, names: Iterable[str]) -> dict[str, int]:
        wanted = list(names)
        values = await self._call(lambda: self._redis.hmget(self._stats_key, wanted))
        return {name: int(value or 0) for name, value in zip(wanted, values, strict=True)}

    # -- nodes --------------------------------------------------------------------------------

    async def beat(self, owner: str, ttl: float) -> None:
        """The heartbeat of pool ``owner``: a key that lives ``ttl`` seconds."""
        stamp = str(time.time())
        await self._call(lambda: self._redis.set(self._node_key(owner), stamp, px=int(ttl * 1000)))

    async def is_alive(self, owner: str) -> bool:
        return bool(await self._call(lambda: self._redis.exists(self._node_key(owner))))

    async def release(self, owner: str) -> None:
        await self._call(lambda: self._redis.delete(self._node_key(owner), self._inbox_key(owner)))

    async def send_clear(self, owner: str, session_id: str, worker_ids: set[str]) -> None:
        """Ask pool ``owner`` to free ``session_id`` on ``worker_ids``. The inbox outlives a
        heartbeat by :data:`INBOX_TTL` at most, so that a pool that died leaves nothing."""
        entry = json.dumps({"session_id": session_id, "worker_ids": sorted(worker_ids)})

        async def post() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(self._inbox_key(owner), entry)
                pipe.expire(self._inbox_key(owner), INBOX_TTL)
                await pipe.execute()

        await self._call(post)

    async def take_clears(self, owner: str) -> list[tuple[str, set[str]]]:
        async def take() -> list[bytes]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.lrange(self._inbox_key(owner), 0, -1)
                pipe.delete(self._inbox_key(owner))
                entries, _ = await pipe.execute()
            return list(entries)

        taken = []
        for raw in await self._call(take):
            entry = json.loads(raw)
            taken.append((entry["session_id"], set(entry["worker_ids"])))
        return taken

    async def close(self) -> None:
        await self._redis.aclose()
