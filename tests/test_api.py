"""The public API's shape: exact sync/async twins, map/submit, typed options, misuse errors."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import subprocess
import sys
import typing

import pytest

from snakepit_core import Pool, PoolConfig, SessionStore, SyncPool, SyncSessionStore
from snakepit_core.config import PoolOptions
from snakepit_core.errors import PoolSaturated, ValidationError

from conftest import eventually

#: What SyncPool has and Pool has not, on purpose: there is no async equivalent to want.
SYNC_ONLY = {"submit", "run"}


def public_members(cls: type) -> dict[str, object]:
    return {name: member for name, member in vars(cls).items() if not name.startswith("_")}


def parameters(function: object) -> list[tuple[str, object, object, object]]:
    signature = inspect.signature(function)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default, p.annotation) for p in signature.parameters.values()]


@pytest.mark.parametrize(
    ("async_cls", "sync_cls"), [(Pool, SyncPool), (SessionStore, SyncSessionStore)]
)
def test_every_async_method_has_a_blocking_twin_with_the_same_parameters(async_cls, sync_cls):
    async_members = public_members(async_cls)
    sync_members = public_members(sync_cls)
    for name, member in async_members.items():
        assert name in sync_members, f"{sync_cls.__name__} has no twin of {name}"
        if isinstance(member, property):
            assert isinstance(sync_members[name], property), name
            continue
        assert parameters(sync_members[name]) == parameters(member), name
    extras = set(sync_members) - set(async_members) - {"start"}
    allowed = SYNC_ONLY | ({"adapter", "config", "node_id"} if sync_cls is SyncPool else set())
    assert extras <= allowed, extras
    assert parameters(SyncPool.__init__) == parameters(Pool.__init__)


def test_pool_options_are_every_config_field_with_its_type():
    hints = typing.get_type_hints(PoolOptions)
    fields = {f.name: f.type for f in dataclasses.fields(PoolConfig)}
    assert set(hints) == set(fields)
    config_hints = typing.get_type_hints(PoolConfig)
    assert all(hints[name] == config_hints[name] for name in fields)


async def test_map_yields_results_in_input_order_without_saturating_the_pool():
    async with Pool("python", pool_size=2, pool_max_queue_size=4) as pool:
        items = ({"message": n} for n in range(3000))
        results = [r async for r in pool.map("echo", items)]
        assert results == [{"echoed": {"message": n}} for n in range(3000)]
        assert pool.stats()["pool_saturated"] == 0


async def test_map_raises_the_first_error_in_its_turn_and_cancels_the_rest():
    async with Pool("python", pool_size=2) as pool:
        items = [{"message": 1}, {"message": 2}, {"bogus": object()}, {"message": 4}]
        seen = []
        with pytest.raises(ValidationError, match=r"args\.bogus"):
            async for result in pool.map("echo", items):
                seen.append(result)
        assert seen == [{"echoed": {"message": 1}}, {"echoed": {"message": 2}}]
        await eventually(lambda: pool.stats()["available"] == 2, message=pool.stats)


def test_sync_map_submit_and_an_early_break():
    with SyncPool("python", pool_size=2, pool_max_queue_size=2) as pool:
        assert list(pool.map("echo", [{"n": i} for i in range(500)])) == [
            {"echoed": {"n": i}} for i in range(500)
        ]
        for result in pool.map("sleep", [{"seconds": 0.05}] * 20):
            assert result == {"slept": 0.05}
            break
        future = pool.submit("compute", {"operation": "add", "a": 5, "b": 3})
        assert isinstance(future, concurrent.futures.Future)
        assert future.result(timeout=30)["result"] == 8
        assert pool.running
        stats = pool.stats()
        assert stats["pool_saturated"] == 0
        assert pool.execute("echo", {"after": 1}) == {"echoed": {"after": 1}}
    assert not pool.running


async def test_misuse_is_a_clear_error():
    with pytest.raises(TypeError, match="adapter must be an adapter name or an Adapter"):
        Pool(42)  # type: ignore[arg-type]
    async with Pool("python", pool_size=1) as pool:
        with pytest.raises(RuntimeError, match="already started"):
            await pool.start()
    with pytest.raises(PoolSaturated.__mro__[1]):  # every error is a SnakepitError
        await pool.execute("ping")


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "snakepit_core", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "adapters" in done.stdout and "doctor" in done.stdout


def test_the_top_level_is_small_and_moved_names_warn_for_one_release():
    import snakepit_core

    assert len(snakepit_core.__all__) <= 25
    assert all(hasattr(snakepit_core, name) for name in snakepit_core.__all__)
    with pytest.warns(DeprecationWarning, match=r"import it from snakepit_core\.errors"):
        moved = snakepit_core.WorkerCrashed  # type: ignore[attr-defined]
    from snakepit_core.errors import WorkerCrashed

    assert moved is WorkerCrashed
    with pytest.raises(AttributeError):
        snakepit_core.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018


def test_error_facts_are_typed_attributes_and_survive_pickling():
    import pickle

    from snakepit_core.errors import QueueTimeout, SnakepitTimeout, WorkerCrashed, WorkerTimeout

    crashed = WorkerCrashed("died", adapter="mine", worker_id="mine-1", exit_code=-9)
    assert (crashed.exit_code, crashed.worker_id, crashed.stderr_tail) == (-9, "mine-1", None)
    again = pickle.loads(pickle.dumps(crashed))
    assert type(again) is WorkerCrashed and again.context == crashed.context
    assert again.code == "worker_crashed" and str(again) == "died"
    with pytest.raises(TypeError, match="carries no fact 'exit_cod'"):
        WorkerCrashed("typo", exit_cod=1)
    for timeout in (WorkerTimeout("slow", timeout=1.0), QueueTimeout("queued")):
        assert isinstance(timeout, SnakepitTimeout) and isinstance(timeout, TimeoutError)


def test_script_adapter_is_a_real_adapter_class():
    from snakepit_core import Adapter, ScriptAdapter

    adapter = ScriptAdapter("mine", sys.executable, "bridge.py", timeouts={"slow": 60})
    assert isinstance(adapter, ScriptAdapter) and isinstance(adapter, Adapter)
    assert dataclasses.replace(adapter, distribution="mine-dist").timeout_for("slow") == 60
