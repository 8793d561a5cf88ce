"""snakepit adapter plugin for Ruby workers: the bundled bridge and the `snakepit` library."""

from .plugin import BRIDGE, LIBRARY_DIR, VERSION, ruby_adapter

__version__ = VERSION

__all__ = ["BRIDGE", "LIBRARY_DIR", "__version__", "ruby_adapter"]
