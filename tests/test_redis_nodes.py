"""Several hosts as one, on a real ``redis-server``: each node a pool in its own OS process
(``tests/redis_node.py``), this test process being another. Ownership by node, strict affinity
on the wrong node, an owner SIGKILLed or stopped, ``clear_session`` reaching the node that
served a session, programs run anywhere."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from redis_node import node_pool
from redis_server import RedisServer

from snakepit_core import Pool
from snakepit_core.errors import SessionElsewhere, SessionLost
from snakepit_core.nodes import default_node_id

from conftest import eventually

NODE_SCRIPT = Path(__file__).with_name("redis_node.py")
#: Fast heartbeats, so that no test waits long for a node to go silent.
FAST = {"node_heartbeat_interval": 0.1, "node_ttl": 1.0}


class Node:
    """A pool in another process, driven line by line."""

    def __init__(self, url: str, node_id: str, prefix: str, **options: Any) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(NODE_SCRIPT), url, node_id, prefix, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._answer(60) == {"ready": node_id}

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"node gave no answer within {timeout} s"
        line = self.process.stdout.readline()
        assert line, f"node exited with {self.process.wait(10)}"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _call(self, timeout: float, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._answer(timeout)

    async def call(self, timeout: float = 30, **request: Any) -> dict[str, Any]:
        """One command, waited for on a thread: this process's own pool goes on meanwhile
        (its heartbeat, the clear requests it sends)."""
        return await asyncio.to_thread(self._call, timeout, request)

    async def ok(self, **request: Any) -> Any:
        answer = await self.call(**request)
        assert "ok" in answer, answer
        return answer["ok"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


@pytest.fixture
def nodes(redis_server: RedisServer) -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        node.close()


@asynccontextmanager
async def local_node(url: str, node_id: str, prefix: str, **options: Any) -> AsyncIterator[Pool]:
    """This test process as a node (the same pool as ``redis_node.py``'s)."""
    pool = node_pool(url, node_id, prefix, **options)
    async with pool:
        yield pool


async def test_strict_affinity_on_the_wrong_node_names_the_owner_and_prefer_moves_it(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    nodes.append(node_a := Node(redis_server.url, "node-a", "own:", **FAST))
    await node_a.ok(
        call="execute_in_session", session="s", command="store", args={"key": "k", "value": 1}
    )
    async with local_node(redis_server.url, "node-b", "own:", **FAST) as node_b:
        assert await node_b.session_owner("s") == "node-a"
        for affinity in ("strict", "strict_fail_fast"):
            with pytest.raises(SessionElsewhere, match="held by the 'python' pool of node") as info:
                await node_b.execute_in_session("s", "echo", {}, affinity=affinity)
            assert info.value.node_id == "node-a" and info.value.code == "session_elsewhere"
        assert await node_a.ok(call="owner", session="s") == "node-a"
        # prefer: served here, and the session moves without its worker-side state.
        answer = await node_b.execute_in_session("s", "retrieve", {"key": "k"})
        assert answer["found"] is False
        assert await node_b.session_owner("s") == "node-b"
        assert await node_a.ok(call="owner", session="s") == "node-b"
        assert await node_a.call(
            call="execute_in_session", session="s", command="echo", args={}, affinity="strict"
        ) == {"error": "session_elsewhere", "node_id": "node-b"}
        assert await node_b.session_owner("never-seen") is None


async def test_a_sigkilled_owner_loses_its_sessions_once_its_heartbeat_expires(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    nodes.append(node_a := Node(redis_server.url, "node-a", "kill:", **FAST))
    for session in ("strict-one", "prefer-one"):
        await node_a.ok(call="execute_in_session", session=session, command="echo", args={})
    async with local_node(redis_server.url, "node-b", "kill:", **FAST) as node_b:
        assert await node_b.session_owner("strict-one") == "node-a"
        os.kill(node_a.process.pid, signal.SIGKILL)
        node_a.process.wait(10)

        async def released() -> bool:
            return await node_b.session_owner("strict-one") is None

        await eventually(released, 10)
        # strict: told once that the state is gone (as when a worker dies), then bound here.
        with pytest.raises(SessionLost, match="node 'node-a', which is gone"):
            await node_b.execute_in_session("strict-one", "echo", {}, affinity="strict")
        await node_b.execute_in_session("strict-one", "echo", {}, affinity="strict")
        assert await node_b.session_owner("strict-one") == "node-b"
        # prefer: simply bound here on its next call.
        await node_b.execute_in_session("prefer-one", "echo", {})
        assert await node_b.session_owner("prefer-one") == "node-b"


async def test_a_graceful_stop_releases_the_nodes_sessions_at_once(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    options = {"node_heartbeat_interval": 5.0, "node_ttl": 60.0}  # no expiry during the test
    nodes.append(node_a := Node(redis_server.url, "node-a", "stop:", **options))
    await node_a.ok(call="execute_in_session", session="s", command="echo", args={})
    async with local_node(redis_server.url, "node-b", "stop:", **options) as node_b:
        assert await node_b.session_owner("s") == "node-a"
        assert await node_a.ok(call="stop") == "stopped"
        assert await node_b.session_owner("s") is None
        with pytest.raises(SessionLost):  # its worker-side state went with node A
            await node_b.execute_in_session("s", "echo", {}, affinity="strict")
        await node_b.execute_in_session("s", "echo", {}, affinity="strict")
        assert await node_b.session_owner("s") == "node-b"


async def test_deleting_a_session_clears_it_on_the_node_that_served_it(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    nodes.append(node_a := Node(redis_server.url, "node-a", "del:", **FAST))
    await node_a.ok(
        call="execute_in_session", session="s", command="store", args={"key": "k", "value": 1}
    )
    async with local_node(redis_server.url, "node-b", "del:", **FAST) as node_b:
        assert await node_b.sessions.delete_session("s") is True
        assert await node_a.ok(call="wait_cleared", session="s", key="k", timeout=20) is True


async def test_an_expiry_claimed_on_one_node_clears_the_session_on_the_node_that_served_it(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    # Node A never cleans up on its own: node B claims the expiry and A's worker is cleared.
    served = {**FAST, "session_ttl": 1.0, "session_cleanup_interval": 60.0}
    nodes.append(node_a := Node(redis_server.url, "node-a", "exp:", **served))
    await node_a.ok(
        call="execute_in_session", session="s", command="store", args={"key": "k", "value": 1}
    )
    async with local_node(
        redis_server.url, "node-b", "exp:", **FAST, session_cleanup_interval=0.2
    ) as node_b:
        assert await node_a.ok(call="wait_cleared", session="s", key="k", timeout=20) is True
        assert not await node_b.sessions.session_exists("s")
        assert (await node_b.sessions.get_stats())["sessions_expired"] == 1


async def test_a_program_created_on_one_node_runs_on_another(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    nodes.append(node_a := Node(redis_server.url, "node-a", "prog:", **FAST))
    created = await node_a.ok(
        call="program",
        session="p",
        command="create_program",
        args={"signature": "question -> answer"},
    )
    async with local_node(redis_server.url, "node-b", "prog:", **FAST) as node_b:
        result = await node_b.execute_program_command(
            "p",
            "execute_program",
            {"program_id": created["program_id"], "inputs": {"question": "why?"}},
        )
        assert result["outputs"] == {"answer": "answer(question=why?)"}
        program = await node_b.sessions.get_program("p", created["program_id"])
        assert program["execution_count"] == 1


async def test_the_node_id_is_hostname_and_pid_taken_at_start(redis_server: RedisServer) -> None:
    pool = Pool("python", pool_size=1, session_backend="redis", redis_url=redis_server.url)
    async with pool:
        assert pool.node_id == f"{socket.gethostname()}-{os.getpid()}"
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, default_node_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    assert os.read(read, 512).decode() == f"{socket.gethostname()}-{child}"
    os.close(read)


def test_bad_node_settings_are_refused_clearly() -> None:
    from snakepit_core import PoolConfig
    from snakepit_core.errors import ConfigError

    assert PoolConfig(node_id="edge-1:eu.west_2").node_id == "edge-1:eu.west_2"
    with pytest.raises(ConfigError, match="'node_id' = 'has space'.*letters, digits"):
        PoolConfig(node_id="has space")
    with pytest.raises(ConfigError, match="node_ttl.*longer than node_heartbeat_interval"):
        PoolConfig(node_heartbeat_interval=5.0, node_ttl=5.0)


def test_the_two_node_demo_continues_a_session_on_the_other_node(
    redis_server: RedisServer,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "snakepit_core.cli", "demo", "--redis", redis_server.url],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if "node-" in line]
    steps = [" ".join(row.split()) for row in rows]
    assert any("node-b │ session_owner │ demo-node-a" in step for step in steps), steps
    assert any("session_elsewhere: node_id=demo-node-a" in step for step in steps), steps
    assert any("answer(question=why?)" in step for step in steps), steps
    assert any("node-b │ session_owner │ demo-node-b" in step for step in steps), steps
