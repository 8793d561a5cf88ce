"""The Perl ``shout`` bridge (shout.pl beside this file) as an adapter defined in Python.

No plugin and no packaging: the conformance suite takes it by reference, as a third-party
author would check their own adapter::

    snakepit conformance tests/bridges/shout_adapter.py:ADAPTER
    pytest --pyargs snakepit_core.conformance --adapter tests/bridges/shout_adapter.py:ADAPTER
"""

from __future__ import annotations

from pathlib import Path

from snakepit_core.adapter import ScriptAdapter

ADAPTER = ScriptAdapter(
    "perl-shout",
    "perl",
    Path(__file__).with_name("shout.pl"),
    commands=["ping", "shout"],
    schemas={
        "shout": {
            "type": "object",
            "required": ["text"],
            "properties": {"text": {"type": "string"}},
        }
    },
)
