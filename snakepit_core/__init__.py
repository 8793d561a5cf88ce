"""snakepit: a pool of long-lived external worker processes behind one async/sync API."""
from .adapter import Adapter, ScriptAdapter
from .errors import *  # noqa: F403  (placeholder until the public API is assembled)
from .hookspecs import hookimpl
from .schemas import load_schema_dir, shared_command_schemas
