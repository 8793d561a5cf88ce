"""Bad input from workers and callers: each gets a clear error with its code, and the pool keeps
serving everyone else. The bridge is a third-party-style script (tests/bridges/misbehave.py)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import pytest

from snakepit_core import Pool, PoolConfig, ScriptAdapter
from snakepit_core.errors import (
    CommandError,
    ConfigError,
    ProtocolError,
    StartupError,
    UnknownAdapter,
    UnknownCommand,
    WorkerCrashed,
    WorkerTimeout,
)

from conftest import eventually


def serving(pool: Pool, size: int, restarts: int = 0):
    """A predicate for ``eventually``: ``size`` workers available, ``restarts`` counted."""
    return lambda: (
        len(pool.workers) >= size
        and pool.stats()["available"] >= size
        and pool.stats()["restarts"] >= restarts
    )


def stats_of(pool: Pool):
    return lambda: f"pool did not recover: {pool.stats()}"


async def test_junk_on_stdout_is_a_protocol_error_and_the_worker_is_replaced(misbehaving):
    async with Pool(misbehaving(), pool_size=2) as pool:
        with pytest.raises(ProtocolError) as info:
            await pool.execute("junk", {})
        assert info.value.code == "protocol_error"
        assert "Loading model" in str(info.value) and "printing to stdout" in str(info.value)
        assert await pool.execute("echo", {"still": "serving"}) == {"still": "serving"}
        await eventually(serving(pool, 2, restarts=1), message=stats_of(pool))


async def test_wrong_id_is_a_protocol_error(misbehaving):
    async with Pool(misbehaving(), pool_size=1) as pool:
        with pytest.raises(ProtocolError, match="does not match the request in flight"):
            await pool.execute("wrong_id", {})
        await eventually(serving(pool, 1, restarts=1), message=stats_of(pool))
        assert await pool.execute("echo", {"n": 1}) == {"n": 1}


async def test_oversized_frame_is_refused(misbehaving):
    async with Pool(misbehaving(), pool_size=1, max_frame_bytes=1024 * 1024) as pool:
        with pytest.raises(ProtocolError, match="over the maximum of 1048576 bytes"):
            await pool.execute("oversized", {})
        await eventually(serving(pool, 1, restarts=1), message=stats_of(pool))
        assert await pool.execute("echo", {}) == {}


async def test_oversized_request_is_refused_before_sending(misbehaving):
    from snakepit_core.errors import ValidationError

    async with Pool(misbehaving(), pool_size=1, max_frame_bytes=1024) as pool:
        with pytest.raises(ValidationError, match="over the maximum frame size"):
            await pool.execute("echo", {"blob": "x" * 5000})
        assert await pool.execute("echo", {"ok": True}) == {"ok": True}
        assert pool.stats()["restarts"] == 0


async def test_exit_during_handshake_is_a_startup_error_with_exit_code_and_stderr(misbehaving):
    started = time.monotonic()
    with pytest.raises(StartupError) as info:
        await Pool(misbehaving("exit_in_handshake"), pool_size=2).start()
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert info.value.code == "startup_failed"
    assert "exit code 4" in message and "no module named 'torch'" in message


async def test_never_ready_fails_within_the_init_timeout(misbehaving):
    started = time.monotonic()
    with pytest.raises(StartupError, match="did not become ready within 0.5s"):
        await Pool(misbehaving("never_ready"), pool_size=1, worker_init_timeout=0.5).start()
    assert time.monotonic() - started < 5


async def test_bad_handshake_answer_is_refused(misbehaving):
    with pytest.raises(StartupError, match="not status 'ok'"):
        await Pool(misbehaving("bad_handshake"), pool_size=1).start()


async def test_missing_executable_names_it():
    adapter = ScriptAdapter("ghost", "/nonexistent/bin/ghost-runtime", "bridge.x")
    with pytest.raises(StartupError, match="ghost-runtime") as info:
        await Pool(adapter, pool_size=2).start()
    assert info.value.code == "startup_failed"


async def test_hang_on_a_request_times_out_promptly_and_the_worker_is_replaced(misbehaving):
    async with Pool(misbehaving(), pool_size=2) as pool:
        started = time.monotonic()
        with pytest.raises(WorkerTimeout) as info:
            await pool.execute("sleep", {"seconds": 60}, timeout=0.3)
        assert time.monotonic() - started < 2
        assert info.value.code == "worker_timeout" and "'sleep'" in str(info.value)
        assert await pool.execute("echo", {"a": 1}) == {"a": 1}
        await eventually(serving(pool, 2, restarts=1), message=stats_of(pool))


async def test_adapter_timeout_applies_when_the_caller_gives_none(misbehaving):
    async with Pool(misbehaving(timeouts={"sleep": 0.3}), pool_size=1) as pool:
        with pytest.raises(WorkerTimeout, match="within 0.3s"):
            await pool.execute("sleep", {"seconds": 60})


async def test_death_mid_request_reports_exit_code_and_last_stderr_line(misbehaving):
    async with Pool(misbehaving(), pool_size=2) as pool:
        others = [asyncio.ensure_future(pool.execute("sleep", {"seconds": 0.3}))]
        with pytest.raises(WorkerCrashed) as info:
            await pool.execute("die", {"code": 9})
        error = info.value
        assert error.code == "worker_crashed" and error.exit_code == 9
        assert "exit code 9" in str(error)
        assert "fatal: the bridge is going down" in str(error)
        assert "fatal: the bridge is going down" in error.stderr_tail
        assert (await asyncio.gather(*others)) == [{"slept": 0.3}]
        await eventually(serving(pool, 2, restarts=1), message=stats_of(pool))


async def test_command_failure_is_a_command_error(misbehaving):
    async with Pool(misbehaving(), pool_size=1) as pool:
        with pytest.raises(CommandError, match="this command always fails") as info:
            await pool.execute("fail", {})
        assert info.value.code == "command_error"
        assert pool.stats()["restarts"] == 0


async def test_unknown_command_when_the_adapter_declares_its_commands(misbehaving):
    async with Pool(misbehaving(commands=["ping", "echo"]), pool_size=1) as pool:
        with pytest.raises(UnknownCommand) as info:
            await pool.execute("launch_rockets", {})
        assert info.value.code == "unknown_command"
        assert "launch_rockets" in str(info.value) and "echo, ping" in str(info.value)
        assert pool.stats()["per_worker"] and pool.stats()["busy"] == 0


async def test_any_command_passes_through_when_the_adapter_declares_none(misbehaving):
    async with Pool(misbehaving(), pool_size=1) as pool:
        assert await pool.execute("anything_at_all", {"x": 1}) == {"x": 1}


def test_unknown_adapter_lists_the_installed_ones():
    with pytest.raises(UnknownAdapter) as info:
        Pool("cobol")
    assert info.value.code == "unknown_adapter"
    assert "cobol" in str(info.value) and "python" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"pool_size": 0}, "pool_size"),
        ({"pool_size": "four"}, "pool_size"),
        ({"pool_queue_timeout": -1}, "pool_queue_timeout"),
        ({"pool_max_queue_size": -5}, "pool_max_queue_size"),
        ({"session_affinity": "sometimes"}, "session_affinity"),
        ({"pool_sise": 4}, "pool_sise"),
    ],
)
def test_config_nonsense_names_the_key(overrides, key, misbehaving):
    with pytest.raises(ConfigError) as info:
        Pool(misbehaving(), **overrides)
    assert info.value.code == "config_error" and repr(key) in str(info.value)


def test_pool_config_defaults_are_the_seeds():
    import os

    config = PoolConfig()
    assert config.pool_size == (os.cpu_count() or 1) * 2
    assert (config.pool_startup_timeout, config.pool_queue_timeout) == (10, 5)
    assert (config.worker_init_timeout, config.worker_health_check_interval) == (20, 30)
    assert (config.worker_shutdown_grace_period, config.cleanup_retry_interval) == (2, 0.1)
    assert (config.cleanup_max_retries, config.pool_max_queue_size) == (10, 1000)
    assert config.max_frame_bytes == 64 * 1024 * 1024


async def test_a_one_mebibyte_stderr_line_breaks_nothing(misbehaving, caplog):
    caplog.set_level(logging.INFO, logger="snakepit.worker.stderr")
    async with Pool(misbehaving("huge_stderr"), pool_size=1, worker_output="logging") as pool:
        assert await pool.execute("stderr_line", {"size": 1024 * 1024}) == {"written": 1048576}
        assert await pool.execute("echo", {"after": "line"}) == {"after": "line"}
        worker = next(iter(pool.workers.values()))
        assert any("more characters" in line for line in worker.stderr_tail)
    assert any(worker.id in record.getMessage() for record in caplog.records)


async def test_worker_output_goes_to_the_parents_stderr_by_default(misbehaving, capfd):
    async with Pool(misbehaving(), pool_size=1) as pool:
        assert await pool.execute("flood", {"lines": 3}) == {"lines": 3}
        worker = next(iter(pool.workers.values()))
        assert await pool.execute("echo", {}) == {}
    lines = [line for line in capfd.readouterr().err.splitlines() if "flood line" in line]
    assert lines == [f"[{worker.id}] flood line {i}" for i in range(3)]
    assert list(worker.stderr_tail)[-3:] == [f"flood line {i}" for i in range(3)]


async def test_a_stderr_flood_does_not_stall_requests(misbehaving):
    async with Pool(misbehaving(), pool_size=2) as pool:
        flood = asyncio.ensure_future(pool.execute("flood", {"lines": 200_000}, timeout=60))
        started = time.monotonic()
        for _ in range(50):
            assert await pool.execute("echo", {"k": 1}) == {"k": 1}
        assert time.monotonic() - started < 10
        assert await flood == {"lines": 200_000}
        worker_tails = [list(w.stderr_tail) for w in pool.workers.values()]
        assert any("flood line 199999" in tail for tail in worker_tails)


async def test_startup_serves_with_the_workers_that_start(misbehaving, tmp_path):
    """Half the workers fail their start: the pool serves with the rest and keeps retrying."""
    flaky = tmp_path / "flaky.py"
    marker = tmp_path / "count"
    flaky.write_text(
        "import fcntl, os, sys, runpy\n"
        f"path = {str(marker)!r}\n"
        "with open(path, 'a+') as f:\n"
        "    fcntl.flock(f, fcntl.LOCK_EX); f.seek(0); n = len(f.read()); f.write('x')\n"
        "if n % 2 == 0: sys.exit(5)\n"
        f"sys.argv = ['misbehave', 'normal']; runpy.run_path({str(misbehaving().script)!r})\n"
    )
    adapter = ScriptAdapter("flaky", sys.executable, flaky)
    async with Pool(adapter, pool_size=2, restart_backoff_initial=0.05) as pool:
        assert 1 <= len(pool.workers) <= 2
        assert await pool.execute("echo", {"x": 1}) == {"x": 1}
        await eventually(serving(pool, 2), within=10, message=stats_of(pool))
