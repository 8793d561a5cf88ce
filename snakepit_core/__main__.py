"""``python -m snakepit_core``: the ``snakepit`` command line."""

from .cli import main

main()
