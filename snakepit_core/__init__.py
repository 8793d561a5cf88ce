"""snakepit: a pool of long-lived external worker processes behind one async/sync API.

>>> import snakepit_core as snakepit
>>> async with snakepit.Pool("my-adapter", pool_size=4) as pool:    # doctest: +SKIP
...     await pool.execute("compute", {"operation": "add", "a": 5, "b": 3})

The top level is the small API most code needs. Errors live in :mod:`snakepit_core.errors`,
sessions in :mod:`snakepit_core.sessions`, helpers for plugin authors in
:mod:`snakepit_core.schemas` and :mod:`snakepit_core.plugins`.
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .adapter import Adapter, ScriptAdapter
from .callbacks import Callback, CallbackContext
from .config import PoolConfig
from .errors import SnakepitError
from .hookspecs import hookimpl
from .pool import Pool
from .sessions import SessionHelpers, SessionStore
from .sync import (
    SyncPool,
    SyncSessionStore,
    execute,
    execute_in_session,
    execute_program_command,
    execute_stream,
    execute_stream_in_session,
    start,
    stats,
    stop,
)

try:
    __version__ = version("snakepit-core")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "Adapter",
    "Callback",
    "CallbackContext",
    "Pool",
    "PoolConfig",
    "ScriptAdapter",
    "SessionHelpers",
    "SessionStore",
    "SnakepitError",
    "SyncPool",
    "SyncSessionStore",
    "__version__",
    "execute",
    "execute_in_session",
    "execute_program_command",
    "execute_stream",
    "execute_stream_in_session",
    "hookimpl",
    "start",
    "stats",
    "stop",
]

#: Names that left the top level in 0.2, and the module each lives in now. They keep working
#: for one release, with a ``DeprecationWarning``.
_MOVED = {
    **dict.fromkeys(
        [
            "AdapterUnavailable",
            "AffinityBusy",
            "CommandError",
            "ConfigError",
            "PoolSaturated",
            "PoolStopped",
            "ProtocolError",
            "QueueTimeout",
            "SessionExists",
            "SessionLost",
            "SessionNotFound",
            "StartupError",
            "UnknownAdapter",
            "UnknownCommand",
            "ValidationError",
            "WorkerCrashed",
            "WorkerTimeout",
        ],
        "snakepit_core.errors",
    ),
    "InMemoryBackend": "snakepit_core.sessions",
    "Session": "snakepit_core.sessions",
    "SessionBackend": "snakepit_core.sessions",
    "get_plugin_manager": "snakepit_core.plugins",
    "get_pool": "snakepit_core.sync",
    "load_config": "snakepit_core.config_sources",
    "load_schema_dir": "snakepit_core.schemas",
    "shared_command_schemas": "snakepit_core.schemas",
}


def __getattr__(name: str) -> Any:
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module 'snakepit_core' has no attribute {name!r}")
    warnings.warn(
        f"snakepit_core.{name} is deprecated and will be removed in 0.3; import it from {home}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(home), name)
