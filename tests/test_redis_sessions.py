"""Sessions in Redis (``session_backend = "redis"``), on a real ``redis-server`` each test
starts for itself: the whole ``SessionStore`` API, updates from two processes that lose
nothing, expiry seen alike from both, a killed and restarted server, bad configuration, and
the password kept out of every message."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis_server import RedisServer

from snakepit_core import Pool, PoolConfig
from snakepit_core.errors import ConfigError, SessionBackendUnavailable, SessionNotFound
from snakepit_core.sessions import SessionStore, new_session_store

from conftest import eventually


def store_at(url: str, **options: object) -> SessionStore:
    return new_session_store(PoolConfig(session_backend="redis", redis_url=url, **options))  # type: ignore[arg-type]


async def test_the_session_store_api_works_on_redis(redis_server: RedisServer) -> None:
    store = store_at(redis_server.url, redis_key_prefix="t1:")
    other = store_at(redis_server.url, redis_key_prefix="t1:")  # another host, same server
    session = await store.create_session("s-1", metadata={"user": "ada"})
    assert session.metadata == {"user": "ada"}
    seen = await other.get_session("s-1")
    assert seen.metadata == {"user": "ada"} and seen.created_at == session.created_at
    await other.update_session("s-1", lambda s: s.metadata.update(step=2))
    assert (await store.get_session("s-1")).metadata == {"user": "ada", "step": 2}
    await store.store_program("s-1", "p-1", {"signature": "a -> b"})
    assert await other.get_program("s-1", "p-1") == {"signature": "a -> b"}
    await store.store_global_program("g-1", {"signature": "x -> y"})
    assert await other.get_global_program("g-1") == {"signature": "x -> y"}
    await other.create_session("s-2")
    assert await store.list_sessions() == ["s-1", "s-2"]
    assert await other.delete_session("s-2") is True
    assert not await store.session_exists("s-2")
    stats_a, stats_b = await store.get_stats(), await other.get_stats()
    for key in ("sessions_created", "sessions_deleted", "global_programs_stored"):
        assert stats_a[key] == stats_b[key]
    assert stats_a["sessions_created"] == 2 and stats_a["current_sessions"] == 1


INCREMENTS = """
import asyncio, sys
from snakepit_core import PoolConfig
from snakepit_core.sessions import new_session_store

async def main():
    store = new_session_store(
        PoolConfig(session_backend="redis", redis_url=sys.argv[1], redis_key_prefix="inc:")
    )
    def add(session):
        session.metadata["count"] = session.metadata.get("count", 0) + 1
    await asyncio.gather(*(store.update_session("counter", add) for _ in range(500)))
    print("done", flush=True)

asyncio.run(main())
"""


async def test_a_thousand_concurrent_updates_from_two_processes_lose_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    store = store_at(redis_server.url, redis_key_prefix="inc:")
    await store.create_session("counter")
    script = tmp_path / "increments.py"
    script.write_text(INCREMENTS)
    processes = [
        subprocess.Popen([sys.executable, str(script), redis_server.url], stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0 and out.strip() == b"done"
    assert (await store.get_session("counter")).metadata["count"] == 1000


EXPIRY = """
import asyncio, json, sys, time
from snakepit_core import PoolConfig
from snakepit_core.sessions import new_session_store

async def main():
    store = new_session_store(PoolConfig(
        session_backend="redis", redis_url=sys.argv[1], redis_key_prefix="ttl:"))
    seen = [await store.session_exists("short")]
    await asyncio.sleep(float(sys.argv[2]) - time.time())
    seen.append(await store.session_exists("short"))
    print(json.dumps(seen))

asyncio.run(main())
"""


async def test_expiry_is_seen_alike_from_two_processes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    store = store_at(redis_server.url, redis_key_prefix="ttl:")
    await store.create_session("short", ttl=1.0)
    script = tmp_path / "expiry.py"
    script.write_text(EXPIRY)
    after = str(time.time() + 1.5)
    other = subprocess.run(
        [sys.executable, str(script), redis_server.url, after],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(other.stdout) == [True, False]
    assert not await store.session_exists("short")
    with pytest.raises(SessionNotFound):
        await store.get_session("short")


async def test_an_expired_session_clears_its_worker_state_on_the_node_that_served_it(
    redis_server: RedisServer,
) -> None:
    options = {
        "session_backend": "redis",
        "redis_url": redis_server.url,
        "redis_key_prefix": "clear:",
        "session_ttl": 1.0,
        "session_cleanup_interval": 0.2,
    }
    async with Pool("python", pool_size=1, **options) as pool:  # type: ignore[arg-type]
        await pool.execute_in_session("s", "store", {"key": "k", "value": 1})
        assert (await pool.execute_in_session("s", "retrieve", {"key": "k"}))["found"] is True

        async def cleared() -> bool:
            answer = await pool.execute("retrieve", {"session_id": "s", "key": "k"})
            return answer["found"] is False

        await eventually(cleared, 10)


async def test_a_killed_redis_gives_clear_errors_while_plain_execute_goes_on(
    redis_server: RedisServer,
) -> None:
    options = {"session_backend": "redis", "redis_url": redis_server.url}
    async with Pool("python", pool_size=1, **options) as pool:  # type: ignore[arg-type]
        await pool.execute_in_session("s", "echo", {"n": 1})
        redis_server.kill()
        started = time.monotonic()
        with pytest.raises(SessionBackendUnavailable, match=r"redis at redis://127\.0\.0\.1"):
            await pool.execute_in_session("s", "echo", {"n": 2})
        assert time.monotonic() - started < 10  # refused, not hanging
        assert await pool.execute("echo", {"n": 3}) == {"echoed": {"n": 3}}
        redis_server.start()  # the same port, empty (no persistence)

        async def back() -> bool:
            try:
                await pool.execute_in_session("s", "echo", {"n": 4})
            except SessionBackendUnavailable:
                return False
            return True

        await eventually(back, 15)


def test_bad_redis_configuration_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="redis_key_prefix.*only letters, digits"):
        PoolConfig(session_backend="redis", redis_key_prefix="has spaces")
    with pytest.raises(ConfigError, match="redis_url.*must be a redis://"):
        PoolConfig(session_backend="redis", redis_url="http://:hunter2@example.com")
    with pytest.raises(ConfigError, match="session_backend.*must be one of memory, redis"):
        PoolConfig(session_backend="etcd")
    try:
        PoolConfig(session_backend="redis", redis_url="http://:hunter2@example.com")
    except ConfigError as exc:
        assert "hunter2" not in str(exc)
    config = PoolConfig(session_backend="redis", redis_url="redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in repr(config)


async def test_a_wrong_password_is_an_error_without_the_password(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="right-one").start()
    try:
        wrong = server.url.replace("right-one", "wrong-one")
        store = store_at(wrong)
        with pytest.raises(SessionBackendUnavailable) as caught:
            await store.create_session("s")
        assert "wrong-one" not in caught.value.message and "***@" in caught.value.message
        good = store_at(server.url)
        await good.create_session("s")
        assert await good.session_exists("s")
    finally:
        server.stop()


async def test_plain_execute_never_touches_redis() -> None:
    """A pool whose Redis is not there serves every plain execute."""
    options = {"session_backend": "redis", "redis_url": "redis://127.0.0.1:1/0"}
    async with Pool("python", pool_size=1, **options) as pool:  # type: ignore[arg-type]
        assert await pool.execute("echo", {"x": 1}) == {"echoed": {"x": 1}}
        with pytest.raises(SessionBackendUnavailable):
            await pool.execute_in_session("s", "echo", {})
        await asyncio.sleep(0)


async def test_a_redis_url_that_does_not_parse_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigError, match="redis_url.*does not parse") as caught:
        store_at("redis://:hunter2@127.0.0.1:not-a-port/0")
    assert "hunter2" not in str(caught.value)
    pool = Pool("python", session_backend="redis", redis_url="redis://127.0.0.1:99999999/0")
    with pytest.raises(ConfigError, match="redis_url.*does not parse"):
        await pool.start()  # before any worker starts
    assert not pool.workers and not pool.running
