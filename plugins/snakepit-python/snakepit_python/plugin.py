"""The snakepit adapter plugin for Python (entry point ``python`` in ``snakepit.adapters``).

The ``python`` adapter runs the bundled bridge with the interpreter snakepit itself runs on,
so the worker can import this package; :func:`python_adapter` does the same for a worker
script written with the bridge library.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from snakepit_core import Adapter, ScriptAdapter, hookimpl
from snakepit_core.schemas import shared_command_schemas

BRIDGE_PATH = Path(__file__).resolve().with_name("bridge.py")
#: An empty value re-enables bytecode caching for the bridge even where the host sets
#: PYTHONDONTWRITEBYTECODE (editable installs): compiling the bridge's modules on every start
#: would cost a worker about 20% more start-up time. Wheel installs ship the bytecode anyway.
BRIDGE_ENV = {"PYTHONDONTWRITEBYTECODE": ""}
#: The adapter runs the interpreter snakepit runs on, so its minimum is snakepit's own.
MIN_PYTHON_VERSION = "3.11"
INSTALL_HINT = "then reinstall snakepit with it: the adapter runs snakepit's own interpreter"


@hookimpl
def snakepit_adapters() -> list[Adapter]:
    """The bundled Python bridge; it implements exactly the shared commands."""
    schemas = shared_command_schemas()
    return [
        Adapter(
            name="python",
            executable=sys.executable,
            script=str(BRIDGE_PATH),
            args=(),
            env=BRIDGE_ENV,
            commands=frozenset(schemas),
            schemas=schemas,
            description="Python workers running the bundled bridge (snakepit-python)",
            default_timeout=30.0,
            min_runtime_version=MIN_PYTHON_VERSION,
            install_hint=INSTALL_HINT,
        )
    ]


def python_adapter(name: str, script: str | os.PathLike[str], **kwargs: Any) -> Adapter:
    """An adapter for a worker script written with ``snakepit_python`` (``command``/``run``).

    ``kwargs`` are those of :func:`snakepit_core.ScriptAdapter` (``commands``, ``schemas``,
    ``timeouts``, ``env``, ...).
    """
    kwargs.setdefault("min_runtime_version", MIN_PYTHON_VERSION)
    kwargs.setdefault("install_hint", INSTALL_HINT)
    return ScriptAdapter(name, sys.executable, script, **kwargs)
