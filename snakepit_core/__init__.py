"""snakepit: a pool of long-lived external worker processes behind one async/sync API.

>>> import snakepit_core as snakepit
>>> async with snakepit.Pool("my-adapter", pool_size=4) as pool:    # doctest: +SKIP
...     await pool.execute("compute", {"operation": "add", "a": 5, "b": 3})
"""

from .adapter import Adapter, ScriptAdapter
from .config import PoolConfig
from .config_sources import load_config
from .errors import (
    AdapterUnavailable,
    AffinityBusy,
    CommandError,
    ConfigError,
    PoolSaturated,
    PoolStopped,
    ProtocolError,
    QueueTimeout,
    SessionExists,
    SessionLost,
    SessionNotFound,
    SnakepitError,
    StartupError,
    UnknownAdapter,
    UnknownCommand,
    ValidationError,
    WorkerCrashed,
    WorkerTimeout,
)
from .hookspecs import hookimpl
from .plugins import get_plugin_manager
from .pool import Pool
from .schemas import load_schema_dir, shared_command_schemas
from .sessions import (
    InMemoryBackend,
    Session,
    SessionBackend,
    SessionHelpers,
    SessionStore,
)
from .sync import (
    SyncPool,
    SyncSessionStore,
    execute,
    execute_in_session,
    execute_program_command,
    get_pool,
    start,
    stats,
    stop,
)

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterUnavailable",
    "AffinityBusy",
    "CommandError",
    "ConfigError",
    "InMemoryBackend",
    "Pool",
    "PoolConfig",
    "PoolSaturated",
    "PoolStopped",
    "ProtocolError",
    "QueueTimeout",
    "ScriptAdapter",
    "Session",
    "SessionBackend",
    "SessionExists",
    "SessionHelpers",
    "SessionLost",
    "SessionNotFound",
    "SessionStore",
    "SnakepitError",
    "StartupError",
    "SyncPool",
    "SyncSessionStore",
    "UnknownAdapter",
    "UnknownCommand",
    "ValidationError",
    "WorkerCrashed",
    "WorkerTimeout",
    "__version__",
    "execute",
    "execute_in_session",
    "execute_program_command",
    "get_plugin_manager",
    "get_pool",
    "hookimpl",
    "load_config",
    "load_schema_dir",
    "shared_command_schemas",
    "start",
    "stats",
    "stop",
]
