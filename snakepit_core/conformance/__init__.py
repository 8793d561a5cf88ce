"""The adapter conformance suite: proof that an adapter's workers do what snakepit expects.

Install it with ``pip install 'snakepit-core[conformance]'`` (pytest; the suite needs no
pytest-asyncio and runs the same with or without it). Then, for an installed adapter::

    snakepit conformance mine
    pytest --pyargs snakepit_core.conformance --adapter mine        # the same tests

and for an adapter that is not packaged as a plugin, a reference to the ``Adapter`` (or to a
function of no arguments returning one), e.g. a ``ScriptAdapter`` in a file or a module::

    snakepit conformance path/to/adapters.py:ADAPTER
    pytest --pyargs snakepit_core.conformance --adapter mypackage.adapters:make_adapter

Two levels (see :mod:`snakepit_core.conformance.levels` and docs/PROTOCOL.md):

* **protocol** — any adapter, whatever its commands: framing (frames in pieces, several in
  one write, lengths in bytes), the ``ping`` handshake and health check, unknown commands,
  frames of megabytes, exit status 0 on stdin EOF, a stdout that carries only frames (fd 0
  and fd 1 moved aside), ``$cancel`` semantics if the worker declares ``cancel``, and a pool
  that serves and stops without leaving a process behind.
* **bundled** — the shared commands (ping, echo, compute, info, sleep, store, retrieve,
  clear_session, create_program, execute_program, stream) with the exact results of the bundled
  bridges, their key order and number format; timeouts, cancellation, a worker killed
  mid-request, saturation, concurrent callers, sessions and programs.

Protocol 2 (many requests in flight per worker, answered by id) has cases at both levels
(``test_protocol2.py``): frame-level ones with ``ping`` at the protocol level, ones with
``sleep`` at the bundled level. Streaming (``test_streams.py``): at the protocol level, a plain
command streamed gives its result as the one item; at the bundled level, for workers that also
declare the ``stream`` capability, the ``stream`` command's items, backpressure, errors and
early stops. Binary values (``test_binary.py``): at the bundled level, for workers declaring
``binary``, bytes echoed back as the same bytes.

Which level applies follows from what the adapter declares: the bundled level if its
``commands`` include every shared command, the ``cancel`` tests if its workers' handshake lists
the capability, the protocol-2 cases if its workers answer a handshake offering
``max_in_flight`` 8 with ``"protocol": 2``. What does not apply is deselected, not skipped, and
the collection report says why (``snakepit conformance: mine: 8 protocol, 0 bundled level tests
selected; 43 deselected (bundled level not applicable: ...); 1 deselected (the worker does not
declare the 'cancel' capability); 4 deselected (the worker does not answer the handshake with
"protocol": 2)``). ``--conformance-level protocol`` runs the protocol level only;
``--conformance-level bundled`` demands both levels of every adapter, so an adapter meant to
follow the bundled contract fails on a missing command (or capability, or protocol 2) instead
of being let off. (The ``snakepit conformance`` command uses the automatic choice; pass the
option to pytest.)

``--worker-concurrency N`` runs the suite as pools of ``worker_concurrency=N`` run: every pool
it creates has that setting and every frame-level handshake offers ``max_in_flight`` N (a
protocol-1 bridge must pass unchanged, being sent one request at a time); the protocol-2 cases
ask for at least 8 in any case.

pytest finds the suite's options through the ``pytest11`` entry point of snakepit-core; from a
source checkout without installed metadata, add ``-p snakepit_core.conformance.plugin``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

#: The suite: this package's directory (its ``test_*.py`` modules are the two levels).
SUITE = Path(__file__).resolve().parent
#: The suite's pytest plugin, by the name its ``pytest11`` entry point registers.
PLUGIN = "snakepit_core.conformance.plugin"
INSTALL_HINT = "pip install 'snakepit-core[conformance]'"


def missing_requirement() -> str | None:
    """What keeps the suite from running in this environment, with the fix; None if nothing."""
    if importlib.util.find_spec("pytest") is None:
        return f"the conformance suite needs pytest, which is not installed: {INSTALL_HINT}"
    return None


def pytest_args(adapters: list[str], extra_args: list[str] | None = None) -> list[str]:
    """The arguments of one run of the suite against ``adapters`` (all installed if empty).

    The run writes nothing beside the installed suite (no cache directory in site-packages),
    and where pytest-asyncio is installed its loop scope is set, as its deprecation warning
    asks of a configuration that leaves it unset (the suite itself does not use it).
    """
    args = [str(SUITE), "-p", PLUGIN, "-p", "no:cacheprovider", "-q"]
    if importlib.util.find_spec("pytest_asyncio") is not None:
        args += ["-o", "asyncio_default_fixture_loop_scope=function"]
    for name in adapters:
        args += ["--adapter", name]
    return [*args, *(extra_args or [])]


def run(adapters: list[str], extra_args: list[str] | None = None) -> int:
    """Run the suite against ``adapters`` (names or references); pytest's exit code.

    pytest runs in a fresh interpreter, not in the caller's: it rewrites the asserts of the
    packages that provide pytest plugins (snakepit_core is one) and warns about each that is
    already imported, as snakepit_core is in the ``snakepit`` command.
    """
    argv = [sys.executable, "-m", "pytest", *pytest_args(adapters, extra_args)]
    return subprocess.run(argv, check=False).returncode
