"""Python workers for snakepit: write handlers, call :func:`run`.

>>> from snakepit_python import command, run
>>> @command
... def shout(args, ctx):
...     return {"text": args["text"].upper()}

Workers import this package at start-up, so it uses the standard library only and never
imports ``snakepit_core`` (the pool side lives in :mod:`snakepit_python.plugin`).
"""

from ._library import CommandError, Context, command, run

__version__ = "0.1.0"

__all__ = ["CommandError", "Context", "__version__", "command", "run"]
