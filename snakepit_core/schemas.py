"""Loading JSON Schemas: the core's shared ones and a plugin's own.

``schemas/`` at the repository root is the source of truth; it ships inside the core wheel as
``snakepit_core/schema_files``. A command schema is a file ``commands/<command>.json`` that
describes the command's ``args`` object.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_ROOT = Path(__file__).resolve().parent / "schema_files"


def load_schema_dir(directory: str | Path) -> dict[str, dict[str, Any]]:
    """Read every ``<command>.json`` in ``directory`` into ``{command: schema}``."""
    return {
        path.stem: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(Path(directory).glob("*.json"))
    }


@cache
def _shared() -> dict[str, dict[str, Any]]:
    return load_schema_dir(SCHEMA_ROOT / "commands")


def shared_command_schemas() -> dict[str, dict[str, Any]]:
    """The schemas of the commands every bundled bridge shares (ping, echo, compute, ...).

    Returns a fresh dict so a plugin can add or replace commands without affecting others.
    """
    return dict(_shared())


@cache
def envelope_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of a wire envelope: ``kind`` is ``request`` or ``response``."""
    path = SCHEMA_ROOT / "envelope" / f"{kind}.json"
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result
