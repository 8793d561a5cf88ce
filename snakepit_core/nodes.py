"""A pool's place among the hosts that share sessions: its node id, heartbeat and inbox.

Several hosts, each with its own pool, may share one session backend (Redis). A session is
owned by the pool that served it last, named by :func:`~snakepit_core.sessions.owner_key`
(node id and adapter), as long as that pool's heartbeat is live. :class:`NodePresence` keeps the
heartbeat of one pool and reads its inbox: the sessions whose state its workers must free
because another host deleted them or claimed their expiry. A graceful stop deletes the
heartbeat, which releases every session the pool owned; a pool that dies silently loses them
once ``node_ttl`` has passed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from collections.abc import Callable

from .errors import SessionElsewhere, SessionLost, SnakepitError
from .sessions import Session, SessionStore, owner_key

log = logging.getLogger("snakepit.nodes")

#: How long a graceful stop waits for the backend to take the heartbeat away.
LEAVE_TIMEOUT = 2.0


def default_node_id() -> str:
    """``<hostname>-<pid>``, the hostname reduced to the characters a node id may hold."""
    host = re.sub(r"[^A-Za-z0-9:_.\-]", "-", socket.gethostname())[:180] or "host"
    return f"{host}-{os.getpid()}"


class NodePresence:
    """The heartbeat and inbox of one pool (one owner). Its loop is a task of the pool."""

    def __init__(
        self,
        node_id: str,
        adapter: str,
        store: SessionStore,
        *,
        interval: float,
        ttl: float,
        on_clear: Callable[[str, set[str]], None],
    ) -> None:
        self.node_id = node_id
        self.adapter = adapter
        self.owner = owner_key(node_id, adapter)
        self._store = store
        self._interval = interval
        self._ttl = ttl
        self._on_clear = on_clear
        self._failing = False

    async def run(self) -> None:
        """Beat and read the inbox every ``interval`` until cancelled. An unreachable backend
        is logged once per outage; the pool goes on serving plain calls meanwhile."""
        while True:
            try:
                await self._store.backend.beat(self.owner, self._ttl)
                for session_id, worker_ids in await self._store.backend.take_clears(self.owner):
                    self._on_clear(session_id, worker_ids)
            except SnakepitError as exc:
                if not self._failing:
                    log.warning("node %s: heartbeat failed (will retry): %s", self.owner, exc)
                self._failing = True
            else:
                if self._failing:
                    log.warning("node %s: heartbeat restored", self.owner)
                self._failing = False
            await asyncio.sleep(self._interval)

    async def is_alive(self, owner: str) -> bool:
        """Whether the pool named ``owner`` still beats (this pool always does)."""
        return owner == self.owner or await self._store.backend.is_alive(owner)

    async def leave(self) -> None:
        """Delete the heartbeat (a graceful stop): this pool's sessions are free to move.
        Bounded, so that a stop never hangs on an unreachable backend."""
        try:
            await asyncio.wait_for(self._store.backend.release(self.owner), LEAVE_TIMEOUT)
        except (SnakepitError, TimeoutError) as exc:
            log.warning("node %s: could not remove its heartbeat (it expires): %s", self.owner, exc)

    async def holds(self, session: Session, strict: bool) -> bool:
        """Whether ``session`` is bound to this pool (or to none), so that its last worker
        here may serve it. Bound to another pool whose heartbeat is live: strict affinity
        raises :class:`SessionElsewhere` naming that node; ``prefer`` returns False (served
        here, the binding moves). Bound to a pool that went silent: strict affinity raises
        :class:`SessionLost` once, as when a worker dies here, and the binding is dropped;
        ``prefer`` returns False."""
        owner = session.owner
        if owner is None or owner == self.owner:
            return True
        if await self.is_alive(owner):
            if strict:
                raise SessionElsewhere(
                    f"session {session.id!r} is held by the {session.adapter!r} pool of node "
                    f"{session.node_id!r}; send its calls there (or use affinity 'prefer' to "
                    "move it here without its worker-side state)",
                    node_id=session.node_id,
                    adapter=session.adapter,
                    session_id=session.id,
                )
            return False
        if strict:
            await self._store.update_session(session.id, Session.unbind)
            raise SessionLost(
                f"session {session.id!r} was held by the {session.adapter!r} pool of node "
                f"{session.node_id!r}, which is gone (stopped, or silent for node_ttl); the next "
                "call binds it here",
                adapter=self.adapter,
                worker_id=session.last_worker_id,
                session_id=session.id,
            )
        return False
