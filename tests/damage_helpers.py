"""Helpers of tests/test_damage.py: sizes, figures, /proc probes, and a pool parent to kill.

Run as a script (``python tests/damage_helpers.py KIND SPINNERS [--daemon]``), this module is
the *parent* of the parent-SIGKILL tests: it starts a pool, gives one worker a grandchild (and
with ``--daemon`` one that leaves the worker's process group), sets ``SPINNERS`` workers
spinning in CPU loops that never read stdin, keeps the rest busy with echoes, prints one JSON
line describing the run, and waits to be killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import eventually

TESTS = Path(__file__).resolve().parent
BRIDGES = TESTS / "bridges"

#: Full sizes run on Python; node and ruby run the smaller default (both settable).
FIGURES_ENV = "SNAKEPIT_TEST_FIGURES"


def size(variable: str, python_default: int, other_default: int, adapter: str = "python") -> int:
    """A test's size: ``$variable`` sets the Python size; node and ruby scale with it.

    Node and ruby run ``other_default / python_default`` of the Python size (their workers are
    slower to start and the whole file must stay within about three minutes).
    """
    value = os.environ.get(variable)
    wanted = python_default if value is None else int(value)
    if adapter == "python":
        return wanted
    return max(1, round(wanted * other_default / python_default))


def report(capsys: Any, name: str, **figures: Any) -> None:
    """Show a test's figures whatever the capture mode, and keep them for RELIABILITY.md.

    The line goes to the captured output (so it shows in a failure report and with ``-rP``),
    to the terminal directly (``capsys.disabled()``: visible without ``-s``), and, when
    ``$SNAKEPIT_TEST_FIGURES`` names a file, as one JSON line into it.
    """
    text = f"FIGURES {name}: " + ", ".join(f"{key}={value}" for key, value in figures.items())
    print(text)
    with capsys.disabled():
        sys.stdout.write(f"\n{text}\n")
        sys.stdout.flush()
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"test": name, **figures}) + "\n")


# -- /proc probes --------------------------------------------------------------------------


def process_state(pid: int) -> str | None:
    """The kernel's state letter of ``pid`` (``R``, ``S``, ``Z``...), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie runs nothing and holds nothing)."""
    return process_state(pid) not in (None, "Z", "X")


def live_pids_of_run(run_id: str) -> list[int]:
    """Processes of ``run_id`` that still run (zombies count as dead)."""
    from conftest import pids_of_run

    return [pid for pid in pids_of_run(run_id) if alive(pid)]


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of ``pid`` in clock ticks (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def status_field(name: str) -> int:
    """An integer field of /proc/self/status (``VmRSS`` in KiB, ``Threads``)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


def read_line(process: subprocess.Popen[bytes], within: float) -> bytes:
    """The next line of ``process``'s stdout, or ``TimeoutError`` (never blocks longer)."""
    assert process.stdout is not None
    deadline = time.monotonic() + within
    line = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise TimeoutError(f"no line from pid {process.pid} within {within}s: {line!r}")
            chunk = os.read(process.stdout.fileno(), 1)
            if not chunk:
                raise EOFError(f"pid {process.pid} closed stdout (exit {process.poll()}): {line!r}")
            line += chunk
    return line


# -- workers with a CPU loop and a grandchild --------------------------------------------------


def spin_adapter(kind: str) -> Any:
    """An adapter whose workers answer ``echo``, ``spin`` (a CPU loop) and ``grandchild``.

    python: the third-party-style tests/bridges/misbehave.py; python-library, node and ruby:
    small workers written with their bridge libraries (tests/bridges/spin_worker.py, .js, .rb),
    which also answer ``daemon`` (a ``sleep`` that leaves the worker's process group).
    """
    from snakepit_core import ScriptAdapter

    if kind == "python":
        return ScriptAdapter(
            "spin-python", sys.executable, BRIDGES / "misbehave.py", args=["normal"]
        )
    if kind == "python-library":
        return ScriptAdapter("spin-python-library", sys.executable, BRIDGES / "spin_worker.py")
    if kind == "node":
        from snakepit_node.plugin import node_adapter

        return node_adapter("spin-node", BRIDGES / "spin_worker.js")
    if kind == "ruby":
        from snakepit_ruby.plugin import ruby_adapter

        return ruby_adapter("spin-ruby", BRIDGES / "spin_worker.rb")
    raise ValueError(kind)


async def _parent(kind: str, spinners: int, daemon: bool) -> None:
    from snakepit_core import Pool
    from snakepit_core.launcher import pdeathsig_available
    from snakepit_core.runinfo import RUN_ID
    from snakepit_core.watchdog import get_watchdog

    pool = Pool(spin_adapter(kind), pool_size=spinners + 1, pool_queue_timeout=3600)
    await pool.start()
    grandchild = (await pool.execute("grandchild", {}))["pid"]
    daemon_pid = (await pool.execute("daemon", {}))["pid"] if daemon else None
    spins = [asyncio.ensure_future(pool.execute("spin", {}, timeout=3600)) for _ in range(spinners)]

    async def load() -> None:
        while True:
            await pool.execute("echo", {"load": True}, timeout=3600)

    loaders = [asyncio.ensure_future(load()) for _ in range(4)]
    await eventually(lambda: sum(w.busy for w in pool.workers.values()) == spinners + 1, 30)
    spinning = [w.pid for w in pool.workers.values() if w.commands_in_flight == ["spin"]]
    # Proof that they spin: each burns CPU time while the parent is still alive.
    before = {pid: cpu_ticks(pid) for pid in spinning}
    await eventually(lambda: all(cpu_ticks(pid) > before[pid] for pid in spinning), 30)
    description = {
        "run_id": RUN_ID,
        "parent_pid": os.getpid(),
        "watchdog_pid": get_watchdog().pid,
        "workers": [w.pid for w in pool.workers.values()],
        "spinning": spinning,
        "grandchild": grandchild,
        "daemon": daemon_pid,
        "pdeathsig": pdeathsig_available(),
    }
    sys.stdout.write(json.dumps(description) + "\n")
    sys.stdout.flush()
    await asyncio.gather(*spins, *loaders)  # until SIGKILL


if __name__ == "__main__":
    sys.path.insert(0, str(TESTS))
    asyncio.run(_parent(sys.argv[1], int(sys.argv[2]), "--daemon" in sys.argv[3:]))
