"""Sessions: the store's API and statistics, TTL with an injected clock, affinity, programs."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

import pytest

from snakepit_core import Pool, SessionHelpers, SessionStore, SyncPool, SyncSessionStore
from snakepit_core.errors import (
    AffinityBusy,
    SessionExists,
    SessionLost,
    SessionNotFound,
    ValidationError,
)

from conftest import eventually


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def test_session_store_api():
    store = SessionStore()
    session = await store.create_session("s1", ttl=60, metadata={"user": "ada"})
    assert session.id == "s1" and session.ttl == 60 and session.metadata == {"user": "ada"}
    assert session.created_at.tzinfo is UTC and session.last_worker_id is None
    with pytest.raises(SessionExists) as exists:
        await store.create_session("s1")
    assert exists.value.code == "session_exists"
    assert await store.session_exists("s1") and not await store.session_exists("s2")
    with pytest.raises(SessionNotFound) as missing:
        await store.get_session("s2")
    assert missing.value.code == "session_not_found"
    updated = await store.update_session("s1", lambda s: s.metadata.update(step=2))
    assert updated.metadata == {"user": "ada", "step": 2}
    await store.store_program("s1", "p1", {"signature": "a -> b"})
    assert await store.get_program("s1", "p1") == {"signature": "a -> b"}
    assert await store.get_program("s1", "nope") is None
    await store.store_global_program("g1", {"signature": "x -> y"})
    assert await store.get_global_program("g1") == {"signature": "x -> y"}
    await store.create_session("s0")
    assert await store.list_sessions() == ["s0", "s1"]
    assert await store.delete_session("s0") is True
    assert await store.delete_session("s0") is False
    stats = await store.get_stats()
    assert stats["sessions_created"] == 2 and stats["sessions_deleted"] == 1
    assert stats["current_sessions"] == 1 and stats["global_programs_stored"] == 1
    assert stats["memory_estimate_bytes"] > 0
    store.close()


async def test_sliding_ttl_and_cleanup_with_an_injected_clock():
    clock = FakeClock()
    store = SessionStore(ttl=100, clock=clock, global_program_ttl=50)
    await store.create_session("a")
    await store.create_session("b", ttl=10)
    await store.store_global_program("g", {"x": 1})
    clock.advance(60)
    await store.get_session("a")  # a read slides the TTL: a now expires at +160
    clock.advance(60)  # t = +120: b (ttl 10) and g (ttl 50) are long gone, a is alive
    assert await store.get_global_program("g") is None
    assert await store.list_sessions() == ["a"]
    assert await store.cleanup_expired_sessions() == 1  # b
    clock.advance(39)  # t = +159: one second before a expires
    assert await store.session_exists("a")
    clock.advance(200)
    with pytest.raises(SessionNotFound):
        await store.get_session("a")
    stats = await store.get_stats()
    assert stats["sessions_expired"] == 2 and stats["cleanup_runs"] == 1
    assert stats["global_programs_expired"] == 1 and stats["current_sessions"] == 0
    store.close()


async def test_the_background_cleanup_task_removes_expired_sessions():
    clock = FakeClock()
    store = SessionStore(ttl=5, clock=clock, cleanup_interval=0.05)
    removed: list[str] = []
    store.add_listener(lambda session: removed.append(session.id))
    await store.create_session("short")
    clock.advance(10)
    await eventually(lambda: removed, within=2, message="the cleanup task removed nothing")
    assert removed == ["short"]
    assert (await store.get_stats())["cleanup_runs"] >= 1
    store.close()


@pytest.mark.parametrize(
    "bad", ["", 42, None, "x" * 1_000_000], ids=["empty", "int", "none", "one-megabyte"]
)
async def test_bad_session_ids_are_refused_clearly(bad):
    store = SessionStore()
    with pytest.raises(ValidationError, match="session_id"):
        await store.create_session(bad)
    async with Pool("python", pool_size=1) as pool:
        with pytest.raises(ValidationError, match="session_id"):
            await pool.execute_in_session(bad, "ping", {})


def test_concurrent_creation_of_one_id_has_exactly_one_winner():
    store = SyncSessionStore()
    wins, losses = [], []
    barrier = threading.Barrier(16)

    def create() -> None:
        barrier.wait()
        try:
            store.create_session("contested")
            wins.append(1)
        except SessionExists:
            losses.append(1)

    threads = [threading.Thread(target=create) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(wins), len(losses)) == (1, 15)


async def test_execute_in_session_adds_session_id_and_keeps_worker_state():
    async with Pool("python", pool_size=3) as pool:
        await pool.execute_in_session("s1", "store", {"key": "k", "value": [1, 2]})
        kept = await pool.execute_in_session("s1", "retrieve", {"key": "k"})
        assert kept["found"] is True and kept["value"] == [1, 2] and kept["session_id"] == "s1"
        echoed = await pool.execute_in_session("s1", "echo", {"x": 1})
        assert echoed["echoed"] == {"x": 1, "session_id": "s1"}
        session = await pool.sessions.get_session("s1")
        assert session.last_worker_id in pool.workers
        assert isinstance(session.last_accessed, datetime)


async def test_prefer_affinity_sticks_when_the_worker_is_idle():
    async with Pool("python", pool_size=4) as pool:
        sessions = [f"s{i}" for i in range(6)]
        first = {
            sid: (await pool.execute_in_session(sid, "ping", {}))["worker_id"] for sid in sessions
        }
        for _ in range(10):
            for sid in sessions:
                served = (await pool.execute_in_session(sid, "ping", {}))["worker_id"]
                assert served == first[sid]


async def test_prefer_affinity_under_concurrency_remembers_the_worker_used():
    """Many sessions and requests at once: every call is served; the last worker that served
    a session (read from the worker id in results) is the one the store remembers."""
    async with Pool("python", pool_size=4) as pool:
        sessions = [f"c{i}" for i in range(12)]

        async def session_calls(sid: str) -> list[str]:
            return [
                (await pool.execute_in_session(sid, "ping", {}))["worker_id"] for _ in range(20)
            ]

        results = await asyncio.gather(*(session_calls(sid) for sid in sessions))
        for sid, served in zip(sessions, results, strict=True):
            assert len(served) == 20 and set(served) <= set(pool.workers)
            session = await pool.sessions.get_session(sid)
            assert session.last_worker_id == served[-1]
            assert set(served) <= session.worker_ids


async def test_strict_affinity_always_uses_the_same_worker():
    async with Pool("python", pool_size=3) as pool:
        first = await pool.execute_in_session("st", "ping", {}, affinity="strict")
        results = await asyncio.gather(
            *(pool.execute_in_session("st", "ping", {}, affinity="strict") for _ in range(30)),
            *(pool.execute("sleep", {"seconds": 0.01}) for _ in range(30)),
        )
        served = {r["worker_id"] for r in results[:30]}
        assert served == {first["worker_id"]}


async def test_strict_fail_fast_raises_affinity_busy():
    async with Pool("python", pool_size=2) as pool:
        await pool.execute_in_session("ff", "ping", {}, affinity="strict")
        busy = asyncio.ensure_future(
            pool.execute_in_session("ff", "sleep", {"seconds": 0.5}, affinity="strict")
        )
        await asyncio.sleep(0.1)
        with pytest.raises(AffinityBusy) as info:
            await pool.execute_in_session("ff", "ping", {}, affinity="strict_fail_fast")
        assert info.value.code == "affinity_busy"
        await busy


async def test_strict_session_lost_once_when_its_worker_dies_then_rebinds():
    async with Pool("python", pool_size=2) as pool:
        first = await pool.execute_in_session(
            "sl", "store", {"key": "k", "value": 1}, affinity="strict"
        )
        worker = pool.workers[(await pool.sessions.get_session("sl")).last_worker_id]
        worker.kill("crashed")
        await worker.exited
        with pytest.raises(SessionLost) as info:
            await pool.execute_in_session("sl", "retrieve", {"key": "k"}, affinity="strict")
        assert info.value.code == "session_lost"
        again = await pool.execute_in_session("sl", "retrieve", {"key": "k"}, affinity="strict")
        assert again["found"] is False  # the state died with its worker
        assert first["stored"] is True


async def test_strict_waiters_get_session_lost_when_the_worker_dies_under_them():
    async with Pool("python", pool_size=2) as pool:
        await pool.execute_in_session("w", "ping", {}, affinity="strict")
        running = asyncio.ensure_future(
            pool.execute_in_session("w", "sleep", {"seconds": 5}, affinity="strict")
        )
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(pool.execute_in_session("w", "ping", {}, affinity="strict"))
        await asyncio.sleep(0.1)
        worker = pool.workers[(await pool.sessions.get_session("w")).last_worker_id]
        worker.kill("crashed")
        with pytest.raises(SessionLost):
            await waiting
        with pytest.raises(Exception, match="died"):
            await running


async def test_a_freed_worker_serves_its_bound_waiter_before_the_general_queue():
    async with Pool("python", pool_size=1) as pool:
        await pool.execute_in_session("b", "ping", {}, affinity="strict")
        order: list[str] = []
        blocker = asyncio.ensure_future(pool.execute("sleep", {"seconds": 0.2}))
        await asyncio.sleep(0.05)

        async def general() -> None:
            await pool.execute("ping", {})
            order.append("general")

        async def bound() -> None:
            await pool.execute_in_session("b", "ping", {}, affinity="strict")
            order.append("bound")

        tasks = [asyncio.ensure_future(general())]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.ensure_future(bound()))
        await asyncio.gather(blocker, *tasks)
        assert order == ["bound", "general"]


async def test_clear_session_reaches_every_worker_that_served_it():
    async with Pool("python", pool_size=2) as pool:
        await pool.execute_in_session("c", "store", {"key": "k", "value": "v"})
        session = await pool.sessions.get_session("c")
        worker_id = session.last_worker_id
        assert await pool.sessions.delete_session("c")

        async def cleared_on_the_worker_that_served_it() -> bool:
            worker = pool.workers[worker_id]
            probe = await pool._execute("retrieve", {"key": "k"}, 5.0, "c", worker, True, False)
            return probe["found"] is False

        await eventually(cleared_on_the_worker_that_served_it, within=2)


async def test_program_lifecycle():
    async with Pool("python", pool_size=2) as pool:
        helpers = SessionHelpers(pool)
        created = await helpers.execute_program_command(
            "p",
            "create_program",
            {"signature": "question -> answer", "model": "m1", "temperature": 0.2},
        )
        program_id = created["program_id"]
        assert created["inputs"] == ["question"] and created["outputs"] == ["answer"]
        stored = await pool.sessions.get_program("p", program_id)
        assert stored["execution_count"] == 0 and stored["last_executed"] is None
        assert stored["created_at"]
        result = await helpers.execute_program_command(
            "p", "execute_program", {"program_id": program_id, "inputs": {"question": "why?"}}
        )
        assert result["outputs"] == {"answer": "answer(question=why?)"}
        stored = await pool.sessions.get_program("p", program_id)
        assert stored["execution_count"] == 1 and stored["last_executed"]
        with pytest.raises(ValidationError, match="no program"):
            await helpers.execute_program_command(
                "p", "execute_program", {"program_id": "missing", "inputs": {}}
            )


def test_module_level_program_helper_on_the_default_pool():
    import snakepit_core as snakepit

    snakepit.start(adapter="python", pool_size=1)
    try:
        created = snakepit.execute_program_command(
            "m", "create_program", {"signature": "a, b -> c"}
        )
        out = snakepit.execute_program_command(
            "m",
            "execute_program",
            {"program_id": created["program_id"], "inputs": {"a": 1, "b": "two"}},
        )
        assert out["outputs"] == {"c": "c(a=1, b=two)"}
    finally:
        snakepit.stop()


def test_sync_pool_sessions_twin():
    with SyncPool("python", pool_size=1) as pool:
        pool.sessions.create_session("sync-1", ttl=30)
        assert pool.sessions.session_exists("sync-1")
        pool.execute_in_session("sync-1", "store", {"key": "a", "value": 1})
        assert pool.execute_in_session("sync-1", "retrieve", {"key": "a"})["value"] == 1
        assert pool.sessions.get_stats()["current_sessions"] == 1


def test_a_session_served_here_is_owned_by_this_node_sync_and_async_alike():
    with SyncPool("python", pool_size=1, node_id="here-1") as pool:
        assert pool.session_owner("s") is None  # not yet created
        pool.execute_in_session("s", "echo", {})
        assert pool.session_owner("s") == pool.node_id == "here-1"
        session = pool.sessions.peek_session("s")
        assert session is not None and (session.node_id, session.adapter) == ("here-1", "python")
        assert pool.run(pool.pool.session_owner("s")) == "here-1"


def test_a_session_moving_between_pools_remembers_the_latest_sixteen_it_left():
    from snakepit_core.sessions import MAX_LEFT_BEHIND, Session

    now = datetime.now(UTC)
    session = Session(id="s", ttl=1.0, created_at=now, last_accessed=now)
    for n in range(20):
        session.bind(f"w{n}", f"node-{n}", "python")
    assert session.worker_ids == {"w19"} and session.owner == "node-19/python"
    assert list(session.left_behind) == [
        f"node-{n}/python" for n in range(19 - MAX_LEFT_BEHIND, 19)
    ]
    session.unbind()
    assert session.owner is None and session.served_by()["node-19/python"] == {"w19"}
