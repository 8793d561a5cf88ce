"""Shared memory on the pool's side (docs/PROTOCOL.md, *Shared memory*, *Text attachments*,
*Limits*), against a third-party-style bridge that implements the rules in a few lines and
breaks them on request (tests/bridges/shm_bridge.py): the run's private directory, which
values take which lane, segments deleted when requests end and workers exit, every fault a
``ProtocolError`` that replaces only the worker at fault, the payload limit, reaping.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from snakepit_core import Pool, PoolConfig, ScriptAdapter
from snakepit_core.binary import TEXT_THRESHOLD
from snakepit_core.conformance.polling import eventually_sync
from snakepit_core.errors import ConfigError, ProtocolError, ValidationError
from snakepit_core.runinfo import current_run_id
from snakepit_core.shm import RUN_FILE, get_shared_memory, reap_dead_runs, user_root

from conftest import BRIDGES, eventually

THRESHOLD = 4096


def shm_bridge() -> ScriptAdapter:
    return ScriptAdapter("shm-bridge", sys.executable, BRIDGES / "shm_bridge.py")


def pool(**options: object) -> Pool:
    settings: dict[str, object] = {"pool_size": 1, "shm_threshold_bytes": THRESHOLD}
    settings.update(options)
    return Pool(shm_bridge(), **settings)  # type: ignore[arg-type]


def directory() -> Path:
    shared = get_shared_memory()
    assert shared is not None, "shared memory is unavailable on this machine"
    return shared.directory


def files() -> set[str]:
    return set(os.listdir(directory())) - {RUN_FILE}


def test_the_run_directory_is_private_and_names_nothing() -> None:
    here = directory()
    assert here.parent == user_root() and here.parent.parent == Path("/dev/shm")
    for path in (here, here.parent):
        info = os.lstat(path)
        assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
        assert stat.S_IMODE(info.st_mode) == 0o700
    assert len(here.name) == 16 and int(here.name, 16) >= 0  # random: no pid, no run id
    assert (here / RUN_FILE).read_text() == current_run_id()
    assert stat.S_IMODE(os.lstat(here / RUN_FILE).st_mode) == 0o600


async def test_the_worker_is_told_its_directory_prefix_and_threshold() -> None:
    async with pool() as p:
        env = await p.execute("env", {})
    assert env["SNAKEPIT_SHM_DIR"] == str(directory())
    assert env["SNAKEPIT_SHM_THRESHOLD"] == str(THRESHOLD)
    prefix = env["SNAKEPIT_SHM_PREFIX"]
    assert len(prefix) == 18 and prefix[0] == "w" and prefix[-1] == "-"
    async with pool(shm_threshold_bytes=None) as p:
        assert await p.execute("env", {}) == dict.fromkeys(env)


async def test_values_take_the_lane_their_size_says_and_segments_go_when_requests_end() -> None:
    big, small, text = os.urandom(THRESHOLD), os.urandom(THRESHOLD - 1), "é" * TEXT_THRESHOLD
    short_text = "x" * (TEXT_THRESHOLD - 1)
    async with pool() as p:
        lanes = await p.execute(
            "lanes", {"big": big, "small": small, "n": [text, short_text], "empty": b""}
        )
        by_path = {tuple(lane["path"]): lane for lane in lanes}
        assert by_path == {
            ("args", "big"): {
                "path": ["args", "big"],
                "text": False,
                "lane": "shm",
                "exists": True,
            },
            ("args", "small"): {"path": ["args", "small"], "text": False, "lane": "inline"},
            ("args", "empty"): {"path": ["args", "empty"], "text": False, "lane": "inline"},
            ("args", "n", 0): {
                "path": ["args", "n", 0],
                "text": True,
                "lane": "shm",
                "exists": True,
            },
        }
        assert files() == set()  # the request ended: its segments are gone
        echoed = await p.execute("echo", {"big": big, "small": small, "t": text})
        assert echoed == {"big": big, "small": small, "t": text}
        assert type(echoed["big"]) is bytes and type(echoed["t"]) is str
        assert files() == set()  # the worker's segments were read and deleted


async def test_without_shared_memory_every_value_is_inline() -> None:
    async with pool(shm_threshold_bytes=None) as p:
        lanes = await p.execute("lanes", {"big": os.urandom(1 << 20)})
        assert [lane["lane"] for lane in lanes] == ["inline"]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("outside_prefix", "segment 'elsewhere' is not one of its own"),
        ("request_segment", "segment 'p1' is not one of its own"),
        ("slash", "is not one of its own"),
        ("symlink", r"cannot be opened \(Too many levels of symbolic links\)"),
        ("fifo", "is not a regular file of this user"),
        ("other_owner", "is not a regular file of this user"),
        ("short", "has 3 bytes, fewer than the 1000 announced"),
        ("missing", r"cannot be opened \(No such file or directory\)"),
        ("not_utf8", "text value at \\['result', 'x'\\] is not UTF-8"),
        ("big_not_utf8", "text value at \\['result', 'x'\\] is not UTF-8"),
        ("over_payload", "over the maximum payload of 1073741824 bytes"),
    ],
)
async def test_a_segment_that_breaks_a_rule_replaces_the_worker_and_nothing_else(
    kind: str, message: str
) -> None:
    async with pool(pool_size=2) as p:
        with pytest.raises(ProtocolError, match=message) as caught:
            await p.execute("bad", {"kind": kind})
        assert "broke the protocol" in caught.value.message
        assert "being replaced" in caught.value.message
        await eventually(lambda: p.stats()["restarts"] >= 1 and p.stats()["available"] == 2)
        assert await p.execute("echo", {"b": b"still serving"}) == {"b": b"still serving"}
        # What the worker left under its prefix went with it; a file it made outside its
        # prefix is not the pool's to judge (it might be another worker's) and goes with
        # the directory.
        outside = {"elsewhere"} if kind == "outside_prefix" else set()
        await eventually(lambda: files() == outside, message=lambda: f"left: {files()}")
        for name in outside:
            (directory() / name).unlink()
    assert os.path.exists("/etc/hostname")  # a link's target is never touched


async def test_a_segment_from_a_worker_that_was_not_offered_shared_memory_is_refused() -> None:
    async with pool(shm_threshold_bytes=None) as p:
        with pytest.raises(ProtocolError, match="which this pool did not offer"):
            await p.execute("bad", {"kind": "missing"})


async def test_segments_a_worker_made_and_never_sent_are_deleted_when_it_exits() -> None:
    async with pool() as p:
        with pytest.raises(Exception, match="died during 'bad'"):
            await p.execute("bad", {"kind": "leave_segment"})
        await eventually(lambda: files() == set(), message=lambda: f"left: {files()}")


async def test_the_payload_limit_counts_shared_memory_and_refuses_before_sending() -> None:
    limit = 64 * 1024 * 1024
    async with pool(max_payload_bytes=limit) as p:
        with pytest.raises(ValidationError, match="over the maximum payload of 67108864"):
            await p.execute("echo", {"a": bytes(limit // 2), "b": bytes(limit // 2)})
        assert files() == set()
        assert p.stats()["restarts"] == 0
        assert await p.execute("echo", {"a": b"ok"}) == {"a": b"ok"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"shm_threshold_bytes": 0}, "shm_threshold_bytes.*from 1 to max_frame_bytes"),
        ({"shm_threshold_bytes": 65 << 20}, "shm_threshold_bytes.*from 1 to max_frame_bytes"),
        ({"shm_threshold_bytes": "big"}, "shm_threshold_bytes"),
        ({"max_payload_bytes": 1 << 20}, "max_payload_bytes.*at least max_frame_bytes"),
    ],
)
def test_nonsense_limits_are_config_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PoolConfig(**options)  # type: ignore[arg-type]
    assert PoolConfig(shm_threshold_bytes=None).shm_threshold is None


def test_the_default_threshold_follows_a_smaller_frame_limit() -> None:
    assert PoolConfig().shm_threshold == 64 * 1024
    small = PoolConfig(max_frame_bytes=1024)
    assert small.shm_threshold == 1024
    assert small.replace(max_frame_bytes=1 << 20).shm_threshold == 64 * 1024
    with pytest.raises(ConfigError, match="shm_threshold_bytes"):
        PoolConfig(max_frame_bytes=1024, shm_threshold_bytes=2048)


def test_reaping_removes_only_the_directories_of_dead_runs(tmp_path: Path) -> None:
    root = user_root()
    dead = root / "00000000deadbeef"
    alive = root / "00000000a11ce000"
    unnamed = root / "000000000000cafe"
    for path, run in ((dead, "1-1-00"), (alive, current_run_id()), (unnamed, None)):
        path.mkdir(mode=0o700)
        (path / "p1").write_bytes(b"data")
        if run is not None:
            (path / RUN_FILE).write_text(run)
    try:
        # "1-1-00": pid 1 exists, but its start time is not 1 tick: that run is dead.
        assert reap_dead_runs() >= 1
        assert not dead.exists() and alive.exists() and unnamed.exists()
        (dead).mkdir(mode=0o700)
        (dead / RUN_FILE).write_text("1-1-00")
        out = subprocess.run(
            [sys.executable, "-m", "snakepit_core", "reap"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "segment directories removed: 1" in out, out
        assert not dead.exists() and alive.exists()
    finally:
        for path in (dead, alive, unnamed):
            subprocess.run(["rm", "-rf", str(path)], check=True)


def test_a_killed_parent_leaves_no_segment_directory(tmp_path: Path) -> None:
    """The watchdog removes the directory of a parent killed with SIGKILL mid-transfer."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, sys
            sys.path.insert(0, {str(BRIDGES.parent)!r})
            from snakepit_core import Pool, ScriptAdapter
            from snakepit_core.shm import get_shared_memory

            async def main():
                adapter = ScriptAdapter("shm", sys.executable, {str(BRIDGES / "shm_bridge.py")!r})
                async with Pool(adapter, pool_size=2, shm_threshold_bytes=1024) as pool:
                    print(get_shared_memory().directory, flush=True)
                    while True:
                        await pool.execute("echo", {{"a": bytes(1 << 20)}})

            asyncio.run(main())
            """
        )
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        where = Path(parent.stdout.readline().decode().strip())
        assert where.is_dir()
    finally:
        parent.kill()
        parent.wait(30)
    eventually_sync(lambda: not where.exists(), 30, message=f"{where} is still there")


FULL_SHM_SCENARIO = """
import asyncio, json, os
from snakepit_core import Pool
from snakepit_core.errors import ValidationError

async def main():
    out = {}
    big, fits = os.urandom(8 << 20), os.urandom(1 << 20)
    async with Pool("python", pool_size=1, shm_threshold_bytes=64 * 1024) as pool:
        out["capabilities"] = sorted(next(iter(pool.workers.values())).capabilities)
        out["big"] = (await pool.execute("echo", {"v": big}))["echoed"]["v"] == big
        out["fits"] = (await pool.execute("echo", {"v": fits}))["echoed"]["v"] == fits
    async with Pool("python", pool_size=1, max_frame_bytes=4 << 20) as pool:
        try:
            await pool.execute("echo", {"v": big})
        except ValidationError as exc:
            out["error"] = exc.message
    out["left"] = sorted(os.listdir("/dev/shm/snakepit-%d" % os.getuid()))
    print(json.dumps(out))

asyncio.run(main())
"""


def test_a_full_dev_shm_sends_values_through_the_pipe_or_says_so(tmp_path: Path) -> None:
    """/dev/shm of 4 MiB (a private mount namespace): an 8 MiB value finds no room at the
    pool nor at the worker and goes through the pipe both ways; 1 MiB fits; where the pipe
    cannot take it either, a ValidationError says that /dev/shm is full. Never a SIGBUS."""
    import json

    from raw_worker import on_small_tmpfs

    script = tmp_path / "full_shm.py"
    script.write_text(FULL_SHM_SCENARIO)
    done = subprocess.run(
        on_small_tmpfs(Path("/dev/shm"), "4m", [sys.executable, str(script)]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "shm" in out["capabilities"]
    assert out["big"] is True and out["fits"] is True
    assert "over the maximum frame size of 4194304 bytes" in out["error"]
    assert "shared memory had no room for its biggest values: is /dev/shm full?" in out["error"]
    assert len(out["left"]) == 1  # this run's directory, emptied at exit by the next start
