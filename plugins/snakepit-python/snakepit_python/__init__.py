"""Python workers for snakepit: write handlers, call :func:`run`.

>>> from snakepit_python import command, run
>>> @command
... def shout(args, ctx):
...     return {"text": args["text"].upper()}

Workers import this package at start-up, so it uses the standard library only and never
imports ``snakepit_core`` (the pool side lives in :mod:`snakepit_python.plugin`).
"""

from __future__ import annotations

from ._library import CallbackError, CommandError, Context, command, run

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a worker's start-up ~2 ms and nothing here needs it at runtime
    from typing import Any

__all__ = [
    "CallbackError",
    "CommandError",
    "Context",
    "__version__",
    "command",
    "python_adapter",
    "run",
]


def __getattr__(name: str) -> Any:
    # Looked up on first use: a worker's start-up pays for neither the package metadata nor
    # the pool side (``python_adapter`` lives in the plugin, which imports snakepit_core).
    if name == "__version__":
        from importlib.metadata import version

        globals()["__version__"] = found = version("snakepit-python")
        return found
    if name == "python_adapter":
        from .plugin import python_adapter

        return python_adapter
    raise AttributeError(f"module 'snakepit_python' has no attribute {name!r}")
