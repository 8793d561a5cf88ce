"""Run the benchmark suite from a checkout: ``python benchmarks/bench.py --quick``.

Exactly ``snakepit bench`` (same options: ``--requests``, ``--rounds``, ``--adapter``,
``--json``, ``--quick``, ``--uvloop``), for tox's ``bench`` environment.
"""

from snakepit_core.cli import bench

if __name__ == "__main__":
    bench()
