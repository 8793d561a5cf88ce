"""The suite's two levels, and which of them apply to an adapter.

* **protocol** (``test_protocol.py``): what any worker must do to be run by a pool, whatever
  its commands: framing, the handshake, unknown commands, large frames, exit on EOF, a stdout
  that carries only frames, and ``$cancel`` when the worker declares the ``cancel``
  capability. Every adapter gets it.
* **bundled** (``test_bundled.py``): the shared commands (ping, echo, compute, info, sleep,
  sessions, programs) with the exact results, key order and number format of the bundled
  bridges. It applies to an adapter that declares every shared command.

The protocol-2 cases (``test_protocol2.py``: many requests in flight on one worker, answered
by id; deadlines in ``meta``; cancellation among requests in flight) belong to these two levels
(frame-level ones with ``ping`` at the protocol level, ones with ``sleep`` at the bundled level)
and apply only to an adapter whose worker answers the handshake with ``"protocol": 2`` when
asked for :data:`PROTOCOL_2_IN_FLIGHT` requests in flight.

A level or a test that does not apply to an adapter is *deselected* at collection, with the
reason in the report (``snakepit conformance: ...`` lines), never skipped at run time: a skip
would read as "could not check", where the truth is "not claimed". ``--conformance-level``
overrides the choice: ``protocol`` checks only that level; ``bundled`` demands both, so an
adapter meant to follow the contract that forgot a command fails instead of being let off
(and so does one without the ``cancel`` capability or protocol 2, which the bundled bridges
have).
"""

from __future__ import annotations

import pytest

from ..adapter import Adapter
from .contract import SHARED_COMMANDS

PROTOCOL = "protocol"
BUNDLED = "bundled"
AUTO = "auto"
CHOICES = (AUTO, PROTOCOL, BUNDLED)

#: ``snakepit_conformance(level)``: the level of every test of a module (its ``pytestmark``).
LEVEL_MARK = "snakepit_conformance"
#: ``snakepit_needs_capability(name)``: the test applies only to workers that declare ``name``.
CAPABILITY_MARK = "snakepit_needs_capability"
#: ``snakepit_needs_protocol(version)``: the test applies only to workers whose handshake
#: answers with that ``protocol``.
PROTOCOL_MARK = "snakepit_needs_protocol"
#: The requests in flight per worker the protocol-2 cases ask for, at least (8 one-second
#: calls on one worker finish in one second, not eight).
PROTOCOL_2_IN_FLIGHT = 8


def level(name: str) -> pytest.MarkDecorator:
    """The mark of a module's tests: ``pytestmark = level(PROTOCOL)``."""
    mark: pytest.MarkDecorator = getattr(pytest.mark, LEVEL_MARK)
    return mark(name)


def needs_capability(name: str) -> pytest.MarkDecorator:
    """The mark of a test that applies only to workers declaring capability ``name``."""
    mark: pytest.MarkDecorator = getattr(pytest.mark, CAPABILITY_MARK)
    return mark(name)


def needs_protocol(version: int) -> pytest.MarkDecorator:
    """The mark of a test that applies only to workers answering the handshake with
    ``"protocol": version``."""
    mark: pytest.MarkDecorator = getattr(pytest.mark, PROTOCOL_MARK)
    return mark(version)


def protocol_2_in_flight(worker_concurrency: int) -> int:
    """The ``worker_concurrency`` of the protocol-2 cases' pools (and ``max_in_flight`` of their
    handshakes): what ``--worker-concurrency`` says, and at least :data:`PROTOCOL_2_IN_FLIGHT`."""
    return max(PROTOCOL_2_IN_FLIGHT, worker_concurrency)


def bundled_level_excluded(adapter: Adapter, chosen: str) -> str | None:
    """Why the bundled level does not apply to ``adapter`` (None: it applies)."""
    if chosen == BUNDLED:
        return None
    if chosen == PROTOCOL:
        return "--conformance-level protocol"
    if adapter.commands is None:
        return "the adapter declares no commands (commands=None)"
    missing = SHARED_COMMANDS - adapter.commands
    if missing:
        return f"the adapter does not declare {', '.join(sorted(missing))}"
    return None
