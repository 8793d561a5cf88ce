"""The ``node`` adapter plugin: the bundled Node.js bridge and custom Node workers.

Found by snakepit through the entry point ``snakepit.adapters: node``. The bridge and the
bridge library are plain JavaScript files shipped inside this package (Node's standard library
only), so ``pip install snakepit-node`` plus a ``node`` (18 or newer) on PATH is all it takes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

from snakepit_core import Adapter, ScriptAdapter, hookimpl
from snakepit_core.schemas import load_schema_dir, shared_command_schemas

HERE = Path(__file__).resolve().parent
#: Put on NODE_PATH so that a worker's ``require("snakepit")`` finds the bridge library.
LIBRARY_DIR = HERE / "js"
#: The bundled bridge: the built-in commands, written with the library.
BRIDGE = LIBRARY_DIR / "bridge.js"
VERSION = version("snakepit-node")
#: The variable that names another Node.js executable.
EXECUTABLE_ENV = "SNAKEPIT_NODE_EXECUTABLE"
#: The oldest Node.js the bridge library supports, and how to get one (``snakepit doctor``).
MIN_NODE_VERSION = "18"
INSTALL_HINT = "apt-get install -y nodejs on Debian 12, Ubuntu 24.04 and later; else nodejs.org"


def node_executable() -> str:
    """The Node.js executable: ``$SNAKEPIT_NODE_EXECUTABLE``, else ``node`` on PATH."""
    return os.environ.get(EXECUTABLE_ENV, "node")


def node_schemas() -> dict[str, dict[str, Any]]:
    """The shared command schemas, with node's own (compute with power/sqrt, random) on top."""
    return {**shared_command_schemas(), **load_schema_dir(HERE / "schemas")}


@hookimpl
def snakepit_adapters() -> list[Adapter]:
    schemas = node_schemas()
    return [
        Adapter(
            name="node",
            executable=node_executable(),
            script=str(BRIDGE),
            commands=frozenset(schemas),
            schemas=schemas,
            description="Node.js bridge: the shared built-ins, compute with power and sqrt, "
            "and random",
            min_runtime_version=MIN_NODE_VERSION,
            install_hint=INSTALL_HINT,
            executable_env=EXECUTABLE_ENV,
            version=VERSION,
        )
    ]


def node_adapter(
    name: str,
    script: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    executable: str | None = None,
    **kwargs: Any,
) -> Adapter:
    """An adapter for a worker written with the Node bridge library.

    The script can ``require("snakepit")``: ``LIBRARY_DIR`` is put first on ``NODE_PATH``
    (keeping any ``NODE_PATH`` from ``env`` or the environment). Other keyword arguments go to
    :func:`snakepit_core.ScriptAdapter` (``commands``, ``schemas``, ``timeouts``, ...).

    >>> node_adapter("shouter", "shout.js", commands=["ping", "shout"])  # doctest: +SKIP
    """
    merged = dict(env or {})
    inherited = merged.get("NODE_PATH", os.environ.get("NODE_PATH", ""))
    merged["NODE_PATH"] = os.pathsep.join(p for p in (str(LIBRARY_DIR), inherited) if p)
    kwargs.setdefault("min_runtime_version", MIN_NODE_VERSION)
    kwargs.setdefault("install_hint", INSTALL_HINT)
    if executable is None:
        kwargs.setdefault("executable_env", EXECUTABLE_ENV)
    return ScriptAdapter(name, executable or node_executable(), script, env=merged, **kwargs)
