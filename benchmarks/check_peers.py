"""Show that the in-process peers of ``snakepit bench`` measure what the shared peer scripts do.

Runs the shared ``peer_ppe.py`` and ``peer_pipe.py`` (as subprocesses, parsing their one line
of output) and ``snakepit_core.bench.ppe_round`` / ``pipe_round`` once each, alternating, with
the same request and worker counts, and prints the figures side by side. On a small machine
one run of either drifts by 10-30 %; ``--rounds N`` prints the medians of N alternating runs::

    python benchmarks/check_peers.py --peers /work/shared/bench [--rounds 5]
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from snakepit_core.bench import PEER_WORKERS, PeerFigures, pipe_round, ppe_round

DEFAULT_PEERS = os.environ.get("SNAKEPIT_PEERS_DIR", "/work/shared/bench")
#: ``ppe startup=0.026s throughput=7828 req/s p50=0.252ms p99=0.444ms``
LINE = re.compile(
    r"startup=(?P<startup>[\d.]+)s throughput=(?P<rate>[\d.]+) req/s "
    r"p50=(?P<p50>[\d.]+)ms p99=(?P<p99>[\d.]+)ms"
)
FIELDS = ("startup_s", "throughput", "p50_ms", "p99_ms")


def run_script(script: Path, requests: int, workers: int) -> PeerFigures:
    """Run one shared peer script and parse the figures it prints."""
    done = subprocess.run(
        [sys.executable, str(script), str(requests), str(workers)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    match = LINE.search(done.stdout)
    if match is None:
        raise click.ClickException(f"{script.name} printed no figures: {done.stdout!r}")
    return PeerFigures(
        float(match["startup"]), float(match["rate"]), float(match["p50"]), float(match["p99"])
    )


def median(figures: list[PeerFigures]) -> PeerFigures:
    return PeerFigures(*(statistics.median(getattr(f, name) for f in figures) for name in FIELDS))


def add_rows(table: Table, name: str, shared: PeerFigures, ours: PeerFigures) -> None:
    labels = ("startup s", "throughput req/s", "p50 ms", "p99 ms")
    patterns = ("{:.3f}", "{:,.0f}", "{:.3f}", "{:.3f}")
    for label, attribute, pattern in zip(labels, FIELDS, patterns, strict=True):
        theirs, mine = getattr(shared, attribute), getattr(ours, attribute)
        table.add_row(
            f"{name} {label}", pattern.format(theirs), pattern.format(mine), f"{mine / theirs:.2f}"
        )


@click.command()
@click.option(
    "--peers",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=DEFAULT_PEERS,
    show_default=True,
    help="Folder of the shared peer scripts.",
)
@click.option("--requests", default=20000, show_default=True)
@click.option("--workers", default=PEER_WORKERS, show_default=True)
@click.option("--rounds", default=1, show_default=True, help="Alternating runs; medians shown.")
def main(peers: Path, requests: int, workers: int, rounds: int) -> None:
    """Shared peer scripts vs snakepit_core.bench's peers, side by side."""
    runs: dict[str, list[PeerFigures]] = {"ppe": [], "ppe_bench": [], "pipe": [], "pipe_bench": []}
    for _ in range(rounds):
        runs["ppe"].append(run_script(peers / "peer_ppe.py", requests, workers))
        runs["ppe_bench"].append(ppe_round(requests, workers))
        runs["pipe"].append(run_script(peers / "peer_pipe.py", requests, workers))
        runs["pipe_bench"].append(pipe_round(requests, workers))
    table = Table(title=f"peers: {requests} requests, {workers} workers, median of {rounds}")
    for column in ("figure", "shared script", "snakepit bench", "bench / script"):
        table.add_column(column, justify="right" if column != "figure" else "left")
    add_rows(table, "PPE", median(runs["ppe"]), median(runs["ppe_bench"]))
    add_rows(table, "pipe", median(runs["pipe"]), median(runs["pipe_bench"]))
    Console().print(table)


if __name__ == "__main__":
    main()
