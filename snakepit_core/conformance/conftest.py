"""The suite's fixtures: the adapter under test, a pool of it, and workers driven frame by frame.

Fixtures live here, not in the plugin, so that they exist only for the suite's own modules and
never in another project's tests (the plugin is loaded in every pytest run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from snakepit_core.adapter import Adapter
from snakepit_core.conformance.targets import Target
from snakepit_core.conformance.wire import WireWorker
from snakepit_core.pool import Pool


@pytest.fixture
def adapter(request: pytest.FixtureRequest) -> Adapter:
    """The adapter under test (the plugin parametrizes it from ``--adapter``)."""
    target: Target = request.param
    return target.adapter


@pytest.fixture
def pool(adapter: Adapter) -> Pool:
    """A pool of two workers, created here and started in the test's own event loop by
    :func:`~snakepit_core.conformance.aio.in_loop`."""
    return Pool(adapter, pool_size=2)


@pytest.fixture
def spawn(adapter: Adapter) -> Iterator[Callable[[], WireWorker]]:
    """Start workers of the adapter as the pool would, for frame-level tests; each is killed at
    the end of the test if it still runs."""
    started: list[WireWorker] = []

    def start() -> WireWorker:
        worker = WireWorker(adapter, worker_id=f"conformance-{len(started) + 1}")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture
def worker(spawn: Callable[[], WireWorker]) -> WireWorker:
    """One worker, past its handshake."""
    started = spawn()
    started.handshake()
    return started
