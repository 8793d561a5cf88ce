"""Which node should serve a session: rendezvous (highest-random-weight) hashing.

A router in front of several snakepit hosts sends each session to one node, and every router
must pick the same one, whatever its language. :func:`rendezvous_node` is that choice, written
so that it can be reimplemented from its docstring alone: for each node, hash the node id and
the session id with SHA-256; the node with the highest hash wins. Removing a node moves only
its own sessions; adding one takes over about ``1/n`` of them, from every node alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["node_weight", "rendezvous_node"]


def node_weight(session_id: str, node_id: str) -> int:
    """The weight of ``node_id`` for ``session_id``: the first 8 bytes, big-endian, of
    ``SHA-256(UTF-8(node_id) + b"\\x00" + UTF-8(session_id))``."""
    digest = hashlib.sha256(node_id.encode() + b"\x00" + session_id.encode()).digest()
    return int.from_bytes(digest[:8], "big")


def rendezvous_node(session_id: str, node_ids: Iterable[str]) -> str:
    """The node of ``node_ids`` that serves ``session_id``: the one of highest
    :func:`node_weight`; equal weights (practically never) go to the smallest node id.
    ``ValueError`` if there are no nodes."""
    best: tuple[int, str] | None = None
    for node_id in node_ids:
        weight = node_weight(session_id, node_id)
        if best is None or weight > best[0] or (weight == best[0] and node_id < best[1]):
            best = (weight, node_id)
    if best is None:
        raise ValueError("rendezvous_node needs at least one node id")
    return best[1]
