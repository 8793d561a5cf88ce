"""The conformance suite for adapters whose bridges follow the bundled bridges' contract.

Every bundled adapter (python, node, ruby) passes it; a third-party adapter built with a
snakepit bridge library and the shared commands can prove the same with one command::

    snakepit conformance mine      # or: pytest --pyargs snakepit_core.conformance --adapter mine

It checks every shared command and its result shape, validation, unknown commands, timeouts,
a worker killed mid-request, queue saturation, concurrent callers, cancellation, sessions and
a clean shutdown that leaves no process behind.
"""

from __future__ import annotations

from pathlib import Path

SUITE = Path(__file__).resolve().parent / "test_conformance.py"


def run(adapters: list[str], extra_args: list[str] | None = None) -> int:
    """Run the suite against ``adapters`` (all installed ones if empty); pytest's exit code."""
    import pytest

    args = [str(SUITE), "-q"]
    for name in adapters:
        args += ["--adapter", name]
    return int(pytest.main([*args, *(extra_args or [])]))
