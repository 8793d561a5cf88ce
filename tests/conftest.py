"""Shared fixtures. Tests start real worker processes; nothing here mocks them."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Test helpers (raw_worker, ...) live beside the tests; importlib mode needs them on the path.
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

# A process registry of this run's own (the tests' subprocesses inherit it): the background
# bugs some tests cause on purpose never reach another run's `snakepit doctor`, nor the
# developer's, and theirs never reach these tests.
os.environ.setdefault("SNAKEPIT_REGISTRY_DIR", tempfile.mkdtemp(prefix="snakepit-registry-"))

from redis_server import RedisServer  # noqa: E402

from snakepit_core import Adapter, ScriptAdapter  # noqa: E402

# The one polling helper (and its blocking twin) of every test: ``from conftest import
# eventually``. Defined with the conformance suite, which ships without this directory.
from snakepit_core.conformance.polling import eventually, eventually_sync  # noqa: E402

__all__ = ["BRIDGES", "eventually", "eventually_sync", "pids_of_run"]

BRIDGES = TESTS / "bridges"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real ``redis-server`` of the test's own, on a free loopback port (stopped after)."""
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A private 0700 directory on /dev/shm, as a pool's segment directory is (bridge tests)."""
    from raw_worker import private_shm_dir

    with private_shm_dir() as directory:
        yield directory


@pytest.fixture
def misbehaving() -> Callable[..., Adapter]:
    """An adapter for tests/bridges/misbehave.py in a given mode (a third-party-style bridge)."""

    def make(mode: str = "normal", **options: object) -> Adapter:
        return ScriptAdapter(
            f"misbehave-{mode}",
            sys.executable,
            BRIDGES / "misbehave.py",
            args=[mode],
            **options,  # type: ignore[arg-type]
        )

    return make


def pids_of_run(run_id: str) -> list[int]:
    """Live processes carrying ``run_id`` in their environment (what 'no orphans' checks)."""
    from snakepit_core.registry import processes_of_run

    return [pid for pid in processes_of_run(run_id) if pid != os.getpid()]
