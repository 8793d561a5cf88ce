"""Protocol-1 bridges of other people's making, as adapters defined in Python (no plugin).

Each bridge beside this file is written from docs/PROTOCOL.md alone, with its runtime's
standard library, and speaks protocol 1 only (no ``protocol`` key, no capabilities), with
commands of its own; the conformance suite takes them by reference::

    pytest --pyargs snakepit_core.conformance --adapter tests/bridges/v1_adapters.py:PYTHON_SEED

* ``PYTHON_SEED`` (v1_seed_bridge.py): ``ping`` and ``divide``; its own failures answered the
  way the Elixir Snakepit v0.1.2 Python bridge answered them, ``success: true`` with
  ``"status": "error"`` in the result.
* ``NODE_REVERSE`` (v1_reverse_bridge.js): ``ping`` and ``reverse``.
* ``RUBY_COUNT`` (v1_count_bridge.rb): ``ping`` and ``count``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from snakepit_core.adapter import ScriptAdapter

HERE = Path(__file__).resolve().parent


def _text_argument(command: str) -> dict[str, dict[str, object]]:
    return {
        command: {
            "type": "object",
            "required": ["text"],
            "properties": {"text": {"type": "string"}},
        }
    }


PYTHON_SEED = ScriptAdapter(
    "v1-python-seed",
    sys.executable,
    HERE / "v1_seed_bridge.py",
    commands=["ping", "divide"],
    schemas={
        "divide": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        }
    },
)

NODE_REVERSE = ScriptAdapter(
    "v1-node-reverse",
    "node",
    HERE / "v1_reverse_bridge.js",
    commands=["ping", "reverse"],
    schemas=_text_argument("reverse"),
)

RUBY_COUNT = ScriptAdapter(
    "v1-ruby-count",
    "ruby",
    HERE / "v1_count_bridge.rb",
    commands=["ping", "count"],
    schemas=_text_argument("count"),
)

#: Every protocol-1 bridge of the repository's tests, the Perl one included, by reference.
REFERENCES = [
    f"{HERE / 'shout_adapter.py'}:ADAPTER",
    f"{HERE / 'v1_adapters.py'}:PYTHON_SEED",
    f"{HERE / 'v1_adapters.py'}:NODE_REVERSE",
    f"{HERE / 'v1_adapters.py'}:RUBY_COUNT",
]
