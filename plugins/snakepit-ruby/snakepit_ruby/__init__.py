"""snakepit adapter plugin for Ruby workers: the bundled bridge and the `snakepit` library."""

__version__ = "0.1.0"
