"""Rendezvous hashing for routers (snakepit_core.routing): deterministic, written down so
other languages agree, balanced, and minimal movement when nodes come and go."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from snakepit_core.routing import node_weight, rendezvous_node

NODES = [f"host-{n}:{1000 + n}" for n in range(5)]
SESSIONS = [f"session-{n}" for n in range(5000)]


def test_the_weight_is_the_documented_hash() -> None:
    digest = hashlib.sha256(b"node-a\x00user-42").digest()
    assert node_weight("user-42", "node-a") == int.from_bytes(digest[:8], "big")
    # Fixed points, for routers written in other languages to check themselves against
    # (README, "Routing sessions across hosts").
    assert node_weight("user-42", "node-a") == 0x9A76BC4213C899AA
    assert rendezvous_node("user-42", ["node-a", "node-b", "node-c"]) == "node-b"


def test_the_same_inputs_give_the_same_node_in_any_order() -> None:
    for session in SESSIONS[:200]:
        assert rendezvous_node(session, NODES) == rendezvous_node(session, reversed(NODES))
        assert rendezvous_node(session, NODES) in NODES


def test_sessions_spread_evenly() -> None:
    counts = Counter(rendezvous_node(session, NODES) for session in SESSIONS)
    assert set(counts) == set(NODES)
    assert max(counts.values()) < 1.2 * len(SESSIONS) / len(NODES)


def test_removing_a_node_moves_only_its_sessions_and_adding_one_takes_a_fair_share() -> None:
    before = {session: rendezvous_node(session, NODES) for session in SESSIONS}
    fewer = NODES[:-1]
    after = {session: rendezvous_node(session, fewer) for session in SESSIONS}
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert moved and all(before[s] == NODES[-1] for s in moved)
    more = [*NODES, "host-new:1"]
    taken = [s for s in SESSIONS if rendezvous_node(s, more) != before[s]]
    assert all(rendezvous_node(s, more) == "host-new:1" for s in taken)
    assert 0.1 < len(taken) / len(SESSIONS) < 0.25  # about 1/6


def test_no_nodes_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one node id"):
        rendezvous_node("s", [])
