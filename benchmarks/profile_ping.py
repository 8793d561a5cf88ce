"""Where the parent's time goes per request: pyinstrument over a 4-worker Python ping run.

Profiles the event-loop thread (``async_mode="disabled"``: every frame, the loop's own included)
while ``--callers`` coroutines drive ``--requests`` pings, then prints the functions with the
most self time and the inclusive time of the hot-path functions, both as a share of the
profiled time and of the non-idle time (idle = the loop waiting in ``epoll``)::

    python benchmarks/profile_ping.py [--requests 20000] [--html profile.html]
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
from pyinstrument import Profiler
from pyinstrument.frame import Frame
from rich.console import Console
from rich.table import Table

from snakepit_core import Pool
from snakepit_core.bench import CALLERS, PEER_WORKERS, drive, loop_factory, pool_config

#: Self time here is the loop waiting for the workers. Under ``--uvloop`` the loop is C code:
#: its time (epoll and timers included) shows as self time of the Python frame that entered it.
IDLE_FUNCTIONS = {"epoll.poll"}
#: The hot path whose inclusive cost is reported (function names, as pyinstrument shows them).
HOT_PATH = (
    "execute",
    "_execute",
    "_acquire",
    "_release",
    "retire_if_due",
    "tracing",
    "metering",
    "validate_command",
    "snakepit_validate_command",
    "send",
    "encode_frame",
    "call_later",
    "cancel",
    "write",
    "_read_ready",
    "_on_stdout",
    "feed",
    "_decode",
    "_on_message",
    "check_response",
    "_clear_pending",
    "set_result",
    "record_latency",
    "_run_once",
)


async def profile_pings(requests: int, callers: int, workers: int) -> Profiler:
    """Run the pings under the profiler, after a warm-up outside it."""
    async with Pool("python", config=pool_config(workers)) as pool:

        def ping(_: int) -> Any:
            return pool.execute("ping", {})

        await drive(ping, callers, callers)
        profiler = Profiler(interval=0.0002, async_mode="disabled")
        profiler.start()
        rps = await drive(ping, requests, callers)
        profiler.stop()
    Console().print(
        f"{requests} pings, {callers} callers, {workers} workers: {rps:,.0f} req/s "
        "(slowed by the profiler)"
    )
    return profiler


def real_frames(frame: Frame) -> Iterator[tuple[Frame, frozenset[str]]]:
    """Every non-synthetic frame with the names of the functions above it (for recursion)."""
    stack: list[tuple[Frame, frozenset[str]]] = [(frame, frozenset())]
    while stack:
        node, above = stack.pop()
        if node.is_synthetic:
            continue
        yield node, above
        below = above | {node.function}
        stack.extend((child, below) for child in node.children)


def key(frame: Frame) -> str:
    return f"{frame.function} ({frame.file_path_short}:{frame.line_no})"


def tally(root: Frame) -> tuple[dict[str, float], dict[str, float]]:
    """Self time per function, and inclusive time per function name (recursion counted once)."""
    own: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for frame, above in real_frames(root):
        own[key(frame)] += frame.total_self_time
        if frame.function not in above:
            by_name[frame.function] += frame.time
    return own, by_name


def share_table(title: str, rows: Sequence[tuple[str, float]], total: float, busy: float) -> Table:
    table = Table(title=title)
    for column in ("function", "s", "% of all", "% of non-idle"):
        table.add_column(column, justify="left" if column == "function" else "right")
    for name, seconds in rows:
        table.add_row(name, f"{seconds:.3f}", f"{seconds / total:.1%}", f"{seconds / busy:.1%}")
    return table


@click.command()
@click.option("--requests", default=20000, show_default=True)
@click.option("--callers", default=CALLERS, show_default=True)
@click.option("--workers", default=PEER_WORKERS, show_default=True)
@click.option("--top", default=25, show_default=True, help="Functions listed by self time.")
@click.option(
    "--html",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write pyinstrument's HTML report here.",
)
@click.option("--uvloop/--no-uvloop", default=False, show_default=True)
def main(
    requests: int, callers: int, workers: int, top: int, html: Path | None, uvloop: bool
) -> None:
    """Profile the parent process of a Python ping run and print its top costs."""
    with asyncio.Runner(loop_factory=loop_factory(uvloop)) as runner:
        profiler = runner.run(profile_pings(requests, callers, workers))
    session = profiler.last_session
    assert session is not None
    root = session.root_frame()
    assert root is not None
    own, by_name = tally(root)
    total = root.time
    idle = sum(seconds for name, seconds in own.items() if name.split(" ")[0] in IDLE_FUNCTIONS)
    busy = max(total - idle, 1e-9)
    console = Console()
    console.print(
        f"profiled {total:.2f}s, idle in epoll {idle:.2f}s ({idle / total:.0%}); "
        f"per request {busy / requests * 1e6:.1f} us of parent time (profiled)"
    )
    console.print(
        share_table(
            "top self time",
            sorted(own.items(), key=lambda item: item[1], reverse=True)[:top],
            total,
            busy,
        )
    )
    hot = [(name, by_name[name]) for name in HOT_PATH if name in by_name]
    console.print(share_table("hot path, inclusive (by function name)", hot, total, busy))
    if html is not None:
        html.write_text(profiler.output_html(), encoding="utf-8")
        console.print(f"HTML report: {html}")


if __name__ == "__main__":
    main()
