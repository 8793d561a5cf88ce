"""The suite's fixtures: the adapter under test, pools of it, and workers driven frame by frame.

Fixtures live here, not in the plugin, so that they exist only for the suite's own modules and
never in another project's tests (the plugin is loaded in every pytest run).

Every pool the suite creates comes from :func:`new_pool`. With ``--worker-concurrency N``
each has ``worker_concurrency=N`` and every frame-level worker past its handshake was offered
``max_in_flight`` N, as such a pool offers it; without, pools have the default and handshakes
are a protocol-1 pool's (no ``max_in_flight``). The protocol-2 cases ask for at least
:data:`~snakepit_core.conformance.levels.PROTOCOL_2_IN_FLIGHT` whatever the option says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Unpack

import pytest

from snakepit_core.adapter import Adapter
from snakepit_core.config import PoolOptions
from snakepit_core.conformance.aio import PoolFactory
from snakepit_core.conformance.levels import protocol_2_in_flight
from snakepit_core.conformance.targets import Target
from snakepit_core.conformance.wire import WireWorker, protocol_of
from snakepit_core.pool import Pool


@pytest.fixture
def adapter(request: pytest.FixtureRequest) -> Adapter:
    """The adapter under test (the plugin parametrizes it from ``--adapter``)."""
    target: Target = request.param
    return target.adapter


@pytest.fixture
def worker_concurrency(request: pytest.FixtureRequest) -> int | None:
    """``--worker-concurrency``: the ``worker_concurrency`` of the suite's pools (None: the
    default)."""
    value: int | None = request.config.getoption("worker_concurrency")
    return value


@pytest.fixture
def protocol_2_concurrency(worker_concurrency: int | None) -> int:
    """The ``worker_concurrency`` of the protocol-2 cases: at least 8."""
    return protocol_2_in_flight(worker_concurrency or 1)


@pytest.fixture
def new_pool(adapter: Adapter, worker_concurrency: int | None) -> PoolFactory:
    """A factory of pools of the adapter under test, with ``--worker-concurrency`` unless the
    options say otherwise; the test starts and stops them (``async with``)."""

    def make(**options: Unpack[PoolOptions]) -> Pool:
        if worker_concurrency is not None:
            options.setdefault("worker_concurrency", worker_concurrency)
        return Pool(adapter, **options)

    return make


@pytest.fixture
def pool(new_pool: PoolFactory) -> Pool:
    """A pool of two workers, created here and started in the test's own event loop by
    :func:`~snakepit_core.conformance.aio.in_loop`."""
    return new_pool(pool_size=2)


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
def worker(spawn: Callable[[], WireWorker], worker_concurrency: int | None) -> WireWorker:
    """One worker, past the handshake of a pool of ``--worker-concurrency`` (without it, a
    protocol-1 pool's)."""
    started = spawn()
    started.handshake(max_in_flight=worker_concurrency)
    return started


@pytest.fixture
def concurrent_worker(spawn: Callable[[], WireWorker], protocol_2_concurrency: int) -> WireWorker:
    """One worker past a handshake that asked for protocol 2 (at least 8 in flight) and got
    it; its ``capacity`` says how many requests it takes at once."""
    started = spawn()
    answer = started.handshake(max_in_flight=protocol_2_concurrency)
    assert protocol_of(answer) == 2, answer.data
    offered = answer.data["result"].get("max_concurrency")
    assert type(offered) is int and offered >= 1, f"max_concurrency {offered!r}: {answer.data}"
    return started
