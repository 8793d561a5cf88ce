"""Run the benchmark suite from a checkout: ``python benchmarks/bench.py --quick``.

The same code as ``snakepit bench`` (``snakepit_core.bench.run_bench``), plus ``--uvloop``.
"""

from __future__ import annotations

import click
from rich.console import Console

from snakepit_core.bench import run_bench


@click.command()
@click.option("--requests", default=20000, show_default=True, help="Pings per measurement.")
@click.option("--rounds", default=3, show_default=True, help="Rounds; medians are reported.")
@click.option("--adapter", "only", multiple=True, help="Only these adapters (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document, no tables.")
@click.option("--quick", is_flag=True, help="Fewer worker counts and requests (a smoke run).")
@click.option(
    "--uvloop/--no-uvloop",
    default=False,
    show_default=True,
    help="Run the asyncio measurements on uvloop (when installed).",
)
def main(
    requests: int, rounds: int, only: tuple[str, ...], as_json: bool, quick: bool, uvloop: bool
) -> None:
    """Benchmark snakepit against ProcessPoolExecutor and a raw pipe loop, in one run."""
    run_bench(
        requests=requests,
        rounds=rounds,
        adapters=list(only) or None,
        as_json=as_json,
        quick=quick,
        console=Console(),
        use_uvloop=uvloop,
    )


if __name__ == "__main__":
    main()
