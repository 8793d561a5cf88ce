"""``snakepit bench``: snakepit's pools against ProcessPoolExecutor and a raw pipe loop.

Figures from separate runs on a small machine drift by 10-20 %, which is more than most of the
effects measured here. So every figure a ratio is built from comes from the same run: each
round runs every measurement once, interleaved, and the median over the rounds is reported.
The two reference peers reproduce the workload and method of the shared peer scripts
(``benchmarks/check_peers.py`` runs both and shows that they agree), so the ratios compare
like with like. Speed is measured here and never asserted in tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import gc
import importlib
import importlib.util
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import PoolConfig
from .config_sources import load_config
from .launcher import pdeathsig_available
from .plugins import get_plugin_manager
from .pool import Pool
from .protocol import get_codec
from .sessions import Session, SessionStore

#: Workers of the reference peers, and the snakepit pool size they are compared with.
PEER_WORKERS = 4
WORKER_COUNTS = (1, 2, 4, 16)
QUICK_WORKER_COUNTS = (1, 4)
STARTUP_WORKERS = 16
QUICK_STARTUP_WORKERS = 4
LATENCY_PINGS = 2000
QUICK_LATENCY_PINGS = 200
QUICK_MAX_REQUESTS = 2000
#: Concurrent caller coroutines, each awaiting its pings one after another.
CALLERS = 128
VALIDATION_CALLS = 20000
#: Above this share of the machine's CPU used by other processes, the report warns.
BUSY_SHARE = 0.1
COMPUTE_ARGS = {"operation": "add", "a": 5, "b": 3}

#: The raw pipe peer's child, byte for byte what the shared peer_pipe.py runs.
RAW_CHILD = r"""
import sys, json, struct
i, o = sys.stdin.buffer, sys.stdout.buffer
while True:
    h = i.read(4)
    if len(h) < 4: break
    req = json.loads(i.read(struct.unpack(">I", h)[0]))
    b = json.dumps({"id": req["id"], "success": True, "result": {"status": "ok"}}).encode()
    o.write(struct.pack(">I", len(b)) + b); o.flush()
"""


# -- settings and samples ---------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What one run measures; ``quick`` shrinks it to a smoke run."""

    requests: int
    rounds: int
    adapters: tuple[str, ...]
    worker_counts: tuple[int, ...]
    startup_workers: int
    latency_pings: int
    callers: int = CALLERS

    @classmethod
    def build(
        cls,
        *,
        requests: int,
        rounds: int,
        adapters: Sequence[str] | None,
        quick: bool,
    ) -> Settings:
        if rounds < 1 or requests < 1:
            raise click.UsageError("--rounds and --requests must be at least 1")
        return cls(
            requests=min(requests, QUICK_MAX_REQUESTS) if quick else requests,
            rounds=rounds,
            adapters=select_adapters(adapters),
            worker_counts=QUICK_WORKER_COUNTS if quick else WORKER_COUNTS,
            startup_workers=QUICK_STARTUP_WORKERS if quick else STARTUP_WORKERS,
            latency_pings=QUICK_LATENCY_PINGS if quick else LATENCY_PINGS,
        )

    @property
    def session_adapter(self) -> str:
        """Sessions and validation are measured on the first adapter: the host's own runtime
        when an installed adapter runs this very interpreter (the peers' runtime)."""
        return self.adapters[0]


def select_adapters(requested: Sequence[str] | None) -> tuple[str, ...]:
    """The requested adapters, or every installed one whose runtime is on PATH, in a fixed order."""
    found = get_plugin_manager().adapters()
    if requested:
        unknown = sorted(set(requested) - set(found))
        if unknown:
            raise click.UsageError(f"unknown adapter(s) {unknown}; installed: {sorted(found)}")
        names = list(dict.fromkeys(requested))
    else:
        names = [name for name, adapter in found.items() if shutil.which(adapter.executable)]
    if not names:
        raise click.UsageError("no adapter to benchmark: pip install snakepit-python")
    host = os.path.realpath(sys.executable)

    def runs_this_interpreter(name: str) -> bool:
        executable = shutil.which(found[name].executable)
        return executable is not None and os.path.realpath(executable) == host

    # The adapter that runs this interpreter first: it is the one the peers compare with.
    return tuple(sorted(names, key=lambda name: (not runs_this_interpreter(name), name)))


class Samples:
    """One value per round for every figure, keyed by a dotted path like ``throughput.python.4``."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def medians(self) -> dict[str, float]:
        return {key: statistics.median(values) for key, values in self.values.items()}


def nest(flat: dict[str, float]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``: the JSON document reads like the tables."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def percentiles_ms(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds, indexed exactly as the peer scripts index them."""
    ordered = sorted(latencies)
    return ordered[len(ordered) // 2] * 1e3, ordered[int(len(ordered) * 0.99)] * 1e3


# -- reference peers (blocking, outside the event loop) ---------------------------------------


@dataclass(frozen=True)
class PeerFigures:
    """What a peer script prints: start-up, throughput and sequential latency."""

    startup_s: float
    throughput: float
    p50_ms: float
    p99_ms: float


def ppe_ping(x: int) -> dict[str, Any]:
    """The peer's trivial task (module level, so ProcessPoolExecutor can pickle it)."""
    return {"status": "ok", "x": x}


def ppe_round(
    requests: int, workers: int = PEER_WORKERS, pings: int = LATENCY_PINGS
) -> PeerFigures:
    """peer_ppe.py in-process: all requests submitted at once, then ``pings`` sequential ones."""
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(workers) as executor:
        list(executor.map(ppe_ping, range(workers)))
        t1 = time.perf_counter()
        futures = [executor.submit(ppe_ping, i) for i in range(requests)]
        for future in futures:
            future.result()
        t2 = time.perf_counter()
        latencies = []
        for i in range(pings):
            started = time.perf_counter()
            executor.submit(ppe_ping, i).result()
            latencies.append(time.perf_counter() - started)
    return PeerFigures(t1 - t0, requests / (t2 - t1), *percentiles_ms(latencies))


class RawChild:
    """A ``python -c`` child speaking the frame protocol over blocking pipes: no pool at all."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", RAW_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin: IO[bytes] = self.process.stdin
        self._stdout: IO[bytes] = self.process.stdout

    def write(self, request_id: int) -> None:
        body = json.dumps({"id": request_id, "command": "ping", "args": {}}).encode()
        self._stdin.write(struct.pack(">I", len(body)) + body)
        self._stdin.flush()

    def read(self) -> Any:
        header = self._stdout.read(4)
        return json.loads(self._stdout.read(struct.unpack(">I", header)[0]))

    def round_trip(self, request_id: int) -> Any:
        self.write(request_id)
        return self.read()

    def close(self) -> None:
        self._stdin.close()
        self.process.wait()
        self._stdout.close()


@contextlib.contextmanager
def raw_children(count: int) -> Iterator[list[RawChild]]:
    """``count`` raw children, closed (stdin EOF, then waited for) however the block ends."""
    children: list[RawChild] = []
    try:
        children.extend(RawChild() for _ in range(count))
        yield children
    finally:
        for child in children:
            child.close()


def pipe_round(
    requests: int, workers: int = PEER_WORKERS, pings: int = LATENCY_PINGS
) -> PeerFigures:
    """peer_pipe.py in-process: round-robin with ``workers`` in flight, then sequential pings."""
    t0 = time.perf_counter()
    with raw_children(workers) as children:
        for child in children:
            child.round_trip(0)
        t1 = time.perf_counter()
        sent = 0
        while sent < requests:
            for child in children:
                child.write(sent)
                sent += 1
            for child in children:
                child.read()
        t2 = time.perf_counter()
        latencies = []
        for i in range(pings):
            started = time.perf_counter()
            children[0].round_trip(i)
            latencies.append(time.perf_counter() - started)
    return PeerFigures(t1 - t0, requests / (t2 - t1), *percentiles_ms(latencies))


def raw_spawn_seconds(count: int) -> float:
    """Spawn ``count`` raw children and get one reply from each: the start-up floor."""
    started = time.perf_counter()
    with raw_children(count) as children:
        for child in children:
            child.round_trip(0)
        return time.perf_counter() - started


# -- snakepit measurements (inside the event loop) --------------------------------------------


async def drive(call: Callable[[int], Awaitable[Any]], total: int, callers: int) -> float:
    """Requests per second of ``total`` calls made by ``callers`` concurrent sequential callers.

    ``call`` gets the caller's index (a session benchmark gives each caller its session).
    """
    share, extra = divmod(total, callers)

    async def caller(index: int, count: int) -> None:
        for _ in range(count):
            await call(index)

    started = time.perf_counter()
    await asyncio.gather(*(caller(i, share + (i < extra)) for i in range(callers)))
    return total / (time.perf_counter() - started)


async def sequential_latency(pool: Pool, pings: int) -> tuple[float, float]:
    """p50/p99 (ms) of ``pings`` single pings, one at a time, like the peers' latency loops."""
    latencies = []
    for _ in range(pings):
        started = time.perf_counter()
        await pool.execute("ping", {})
        latencies.append(time.perf_counter() - started)
    return percentiles_ms(latencies)


def pool_config(size: int) -> PoolConfig:
    """An explicit config, so snakepit.toml or SNAKEPIT_* in the environment cannot skew a run."""
    return PoolConfig(pool_size=size)


async def measure_pool(adapter: str, size: int, settings: Settings, samples: Samples) -> None:
    """Ping throughput of ``size`` workers (and sequential latency at the peers' size)."""
    async with Pool(adapter, config=pool_config(size)) as pool:

        def ping(_: int) -> Awaitable[Any]:
            return pool.execute("ping", {})

        await drive(ping, settings.callers, settings.callers)  # warm-up, like the peers' first map
        rps = await drive(ping, settings.requests, settings.callers)
        samples.add(f"throughput.{adapter}.{size}", rps)
        if size == PEER_WORKERS:
            p50, p99 = await sequential_latency(pool, settings.latency_pings)
            samples.add(f"latency.{adapter}.p50_ms", p50)
            samples.add(f"latency.{adapter}.p99_ms", p99)


async def measure_startup(adapter: str, count: int, samples: Samples) -> None:
    """``count`` workers ready: one ``Pool.start`` vs ``count`` one-worker pools one by one."""
    started = time.perf_counter()
    pool = Pool(adapter, config=pool_config(count))
    try:
        await pool.start()
        samples.add(f"startup.{adapter}.concurrent_s", time.perf_counter() - started)
    finally:
        await pool.stop()
    pools: list[Pool] = []
    started = time.perf_counter()
    try:
        for _ in range(count):
            pools.append(Pool(adapter, config=pool_config(1)))
            await pools[-1].start()
        samples.add(f"startup.{adapter}.sequential_s", time.perf_counter() - started)
    finally:
        await asyncio.gather(*(each.stop() for each in pools))


def _count_hit(session: Session) -> None:
    session.metadata["hits"] = session.metadata.get("hits", 0) + 1


async def session_store_ops(count: int) -> float:
    """Operations per second of create, get, update and delete on ``count`` in-memory sessions."""
    store = SessionStore()
    ids = [f"bench-{i}" for i in range(count)]
    started = time.perf_counter()
    try:
        for session_id in ids:
            await store.create_session(session_id)
        for session_id in ids:
            await store.get_session(session_id)
        for session_id in ids:
            await store.update_session(session_id, _count_hit)
        for session_id in ids:
            await store.delete_session(session_id)
        return 4 * count / (time.perf_counter() - started)
    finally:
        store.close()


def validation_us(pool: Pool, command: str, args: dict[str, Any]) -> float:
    """Microseconds per ``validate_command`` call: what validation adds to every request."""
    validate = pool._hooks.validate_command
    started = time.perf_counter()
    for _ in range(VALIDATION_CALLS):
        validate(command, args)
    return (time.perf_counter() - started) / VALIDATION_CALLS * 1e6


async def side_by_side(
    first: Callable[[int], Awaitable[Any]],
    second: Callable[[int], Awaitable[Any]],
    total: int,
    callers: int,
) -> tuple[float, float]:
    """Throughput of two calls in the order first, second, second, first (half ``total`` each).

    Whichever runs first would otherwise get the colder (or the warmer) machine.
    """
    half = max(1, total // 2)
    elapsed = {first: 0.0, second: 0.0}
    for call in (first, second, second, first):
        elapsed[call] += half / await drive(call, half, callers)
    return 2 * half / elapsed[first], 2 * half / elapsed[second]


async def measure_sessions(adapter: str, settings: Settings, samples: Samples) -> None:
    """Session store ops/s; ``execute`` vs ``execute_in_session`` on 4 workers; validation."""
    samples.add("sessions.store_ops_per_s", await session_store_ops(settings.requests))
    async with Pool(adapter, config=pool_config(PEER_WORKERS)) as pool:

        def plain(_: int) -> Awaitable[Any]:
            return pool.execute("ping", {})

        def in_session(index: int) -> Awaitable[Any]:
            return pool.execute_in_session(f"bench-{index}", "ping", {})

        await drive(in_session, settings.callers, settings.callers)  # warm-up, creates sessions
        plain_rps, session_rps = await side_by_side(
            plain, in_session, settings.requests, settings.callers
        )
        samples.add("sessions.execute_rps", plain_rps)
        samples.add("sessions.execute_in_session_rps", session_rps)
        samples.add("validation.compute_us", validation_us(pool, "compute", COMPUTE_ARGS))
        samples.add("validation.ping_us", validation_us(pool, "ping", {}))


def measure_ppe(settings: Settings, samples: Samples) -> None:
    add_peer(samples, "ppe", ppe_round(settings.requests, PEER_WORKERS, settings.latency_pings))


def measure_pipe(settings: Settings, samples: Samples) -> None:
    add_peer(samples, "pipe", pipe_round(settings.requests, PEER_WORKERS, settings.latency_pings))


def add_peer(samples: Samples, name: str, figures: PeerFigures) -> None:
    for field in ("startup_s", "throughput", "p50_ms", "p99_ms"):
        samples.add(f"peers.{name}.{field}", getattr(figures, field))


def measure_raw_spawn(count: int, samples: Samples) -> None:
    samples.add("startup.raw_spawn_s", raw_spawn_seconds(count))


# -- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One measurement of a round; ``function(*args, samples)`` may be sync or a coroutine."""

    label: str
    function: Callable[..., Any]
    args: tuple[Any, ...]


def plan(settings: Settings) -> list[Step]:
    """The measurements of one round, snakepit and peers interleaved so drift hits all alike."""
    steps = [
        Step(f"{adapter}: ping, {size} workers", measure_pool, (adapter, size, settings))
        for adapter in settings.adapters
        for size in settings.worker_counts
    ]
    steps.append(Step("ProcessPoolExecutor peer", measure_ppe, (settings,)))
    steps.append(Step("raw pipe peer", measure_pipe, (settings,)))
    steps.extend(
        Step(f"{adapter}: start-up", measure_startup, (adapter, settings.startup_workers))
        for adapter in settings.adapters
    )
    steps.append(Step("raw spawn", measure_raw_spawn, (settings.startup_workers,)))
    steps.append(
        Step("sessions, validation", measure_sessions, (settings.session_adapter, settings))
    )
    return steps


def loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``uvloop.new_event_loop`` when asked for and installed; None means asyncio's default."""
    if not use_uvloop or importlib.util.find_spec("uvloop") is None:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = importlib.import_module(
        "uvloop"
    ).new_event_loop
    return factory


def run_steps(
    settings: Settings, runner: asyncio.Runner, advance: Callable[[str], None]
) -> Samples:
    """Every step of every round; ``advance(label)`` is called before each."""
    samples = Samples()
    for round_index in range(settings.rounds):
        for step in plan(settings):
            advance(f"round {round_index + 1}/{settings.rounds}: {step.label}")
            gc.collect()  # garbage of one measurement must not be collected during the next
            outcome = step.function(*step.args, samples)
            if asyncio.iscoroutine(outcome):
                runner.run(outcome)
    return samples


def run_bench(
    *,
    requests: int = 20000,
    rounds: int = 3,
    adapters: Sequence[str] | None = None,
    as_json: bool = False,
    quick: bool = False,
    console: Console | None = None,
    use_uvloop: bool = False,
) -> dict[str, Any]:
    """Run every measurement ``rounds`` times; print a table (or one JSON document) of medians.

    Returns the same document that ``as_json`` prints.
    """
    settings = Settings.build(requests=requests, rounds=rounds, adapters=adapters, quick=quick)
    console = console or Console()
    with asyncio.Runner(loop_factory=loop_factory(use_uvloop)) as runner:
        env = environment(describe_loop(runner.get_loop()))
        meter = OtherLoad()
        if as_json:
            samples = run_steps(settings, runner, lambda _label: None)
        else:
            samples = run_with_progress(settings, runner, console)
    env["other_cpu_share"] = meter.share()
    doc = build_document(settings, samples, env)
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        render(doc, console)
    return doc


def describe_loop(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop (Loop)`` or ``asyncio (_UnixSelectorEventLoop)``."""
    return f"{type(loop).__module__.split('.')[0]} ({type(loop).__name__})"


def run_with_progress(settings: Settings, runner: asyncio.Runner, console: Console) -> Samples:
    """``run_steps`` under a rich progress bar (one tick per measurement)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("starting", total=settings.rounds * len(plan(settings)))
        started = False

        def advance(label: str) -> None:
            nonlocal started
            progress.update(task, description=label, advance=1 if started else 0)
            started = True

        samples = run_steps(settings, runner, advance)
        progress.update(task, advance=1)
    return samples


# -- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ratio:
    """``name = top / bottom`` of two medians (times ``scale``)."""

    name: str
    top: str
    bottom: str
    scale: float = 1.0


def ratios_for(adapter: str) -> tuple[Ratio, ...]:
    """The headline ratios, on ``adapter`` workers and the 4-worker peers."""
    rate = f"throughput.{adapter}.{PEER_WORKERS}"
    return (
        # x4 throughput over each peer's, p99 over PPE's, concurrent start-up over raw spawn
        Ratio("throughput_vs_ppe", rate, "peers.ppe.throughput"),
        Ratio("throughput_vs_pipe", rate, "peers.pipe.throughput"),
        Ratio("p99_vs_ppe", f"latency.{adapter}.p99_ms", "peers.ppe.p99_ms"),
        Ratio("startup_vs_raw", f"startup.{adapter}.concurrent_s", "startup.raw_spawn_s"),
        Ratio("in_session_vs_execute", "sessions.execute_in_session_rps", "sessions.execute_rps"),
        # microseconds over milliseconds, hence the scale
        Ratio(
            "validation_vs_round_trip", "validation.compute_us", f"latency.{adapter}.p50_ms", 1e-3
        ),
    )


#: The ratios of an adapter's figures to the peers' (``peer_ratios`` in the JSON document).
PEER_RATIOS = ("throughput_vs_ppe", "throughput_vs_pipe", "p99_vs_ppe", "startup_vs_raw")


def compute_ratios(medians: dict[str, float], adapter: str) -> dict[str, float]:
    """Every ratio whose two inputs were measured in this run."""
    ratios = {
        ratio.name: medians[ratio.top] / medians[ratio.bottom] * ratio.scale
        for ratio in ratios_for(adapter)
        if ratio.top in medians and ratio.bottom in medians
    }
    throughput = medians.get(f"throughput.{adapter}.{PEER_WORKERS}")
    if throughput and "validation.compute_us" in medians:
        # At full load the parent spends 1/throughput of wall time per request.
        ratios["validation_vs_request"] = medians["validation.compute_us"] * throughput / 1e6
    return ratios


def environment(event_loop: str) -> dict[str, Any]:
    """The machine, its load, and the codec/loop/launcher choices that shape the figures."""
    return {
        "load_before": load_average(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "host_interpreter": platform.python_version(),
        "platform": platform.platform(),
        "json_codec": get_codec(load_config(None, {}).json_codec).name,
        "event_loop": event_loop,
        "mp_start_method": multiprocessing.get_start_method(),
        "pdeathsig_launcher": pdeathsig_available(),
    }


class OtherLoad:
    """The share of the machine's CPU capacity that other processes used during the run.

    Machine-wide busy time (``/proc/stat``, steal included) minus this process's and its
    reaped children's (``getrusage``: every worker is reaped by the end), over wall time times
    CPUs. Linux only; ``share()`` is None elsewhere.
    """

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._machine = machine_busy_seconds()
        self._own = own_cpu_seconds()

    def share(self) -> float | None:
        machine = machine_busy_seconds()
        if machine is None or self._machine is None:
            return None
        others = (machine - self._machine) - (own_cpu_seconds() - self._own)
        capacity = (time.monotonic() - self._started) * (os.cpu_count() or 1)
        return round(max(0.0, others) / capacity, 3)


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes (and the hypervisor's steal) used since boot, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine skews every figure."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def build_document(settings: Settings, samples: Samples, env: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: settings, environment, medians, ratios and raw samples.

    ``ratios`` are the headline ratios on the session adapter's workers; ``peer_ratios`` has
    the ratios against the peers for every adapter measured.
    """
    medians = samples.medians()
    ratios = compute_ratios(medians, settings.session_adapter)
    peer_ratios = {
        adapter: {
            name: value
            for name, value in compute_ratios(medians, adapter).items()
            if name in PEER_RATIOS
        }
        for adapter in settings.adapters
    }
    return {
        "settings": {
            "requests": settings.requests,
            "rounds": settings.rounds,
            "adapters": list(settings.adapters),
            "worker_counts": list(settings.worker_counts),
            "startup_workers": settings.startup_workers,
            "latency_pings": settings.latency_pings,
            "callers": settings.callers,
            "peer_workers": PEER_WORKERS,
            "session_adapter": settings.session_adapter,
            "startup_sequential_method": "one-worker pools started one after another",
        },
        "environment": env,
        "results": nest(medians),
        "ratios": ratios,
        "peer_ratios": peer_ratios,
        "samples": samples.values,
    }


def render(doc: dict[str, Any], console: Console) -> None:
    """What ``snakepit bench`` prints: the figures, and their ratios to the peers' figures
    measured in the same run."""
    env, settings, results = doc["environment"], doc["settings"], doc["results"]
    rounds = settings["rounds"]
    console.print(
        f"[bold]snakepit bench[/bold]: median of {rounds} round{'s' if rounds != 1 else ''}, "
        f"{settings['callers']} concurrent callers; {env['cpus']} CPUs "
        f"({escape(env['cpu_model'])}), host interpreter {env['host_interpreter']}, "
        f"JSON codec {env['json_codec']}, event loop {escape(env['event_loop'])}",
        highlight=False,
    )
    share = env["other_cpu_share"]
    if share is not None:
        note = f"[yellow]over {BUSY_SHARE:.0%}: figures skewed[/yellow]" if busy(env) else "quiet"
        console.print(f"other processes used {share:.1%} of the machine's CPU time ({note})")
    console.print(peers_table(settings, results, doc["peer_ratios"]))
    console.print(throughput_table(settings, results))
    console.print(startup_table(settings, results))
    console.print(sessions_table(settings, results, doc["ratios"]))


def busy(env: dict[str, Any]) -> bool:
    """Other processes took more than ``BUSY_SHARE`` of the machine during the run."""
    share = env.get("other_cpu_share")
    return share is not None and share > BUSY_SHARE


def peers_table(
    settings: dict[str, Any], results: dict[str, Any], peer_ratios: dict[str, dict[str, float]]
) -> Table:
    """Each adapter on the peers' 4 workers, next to ProcessPoolExecutor and the raw pipe
    loop, with the ratios of its figures to theirs."""
    table = Table(
        title=f"ping against the peers, {PEER_WORKERS} workers each",
        caption="PPE = ProcessPoolExecutor, pipe = raw pipe loop; latency in ms",
    )
    table.add_column("", no_wrap=True)
    for column in ("req/s", "/ PPE", "/ pipe", "p50", "p99", "p99 / PPE"):
        table.add_column(column, justify="right", no_wrap=True)
    for adapter in settings["adapters"]:
        rate = results.get("throughput", {}).get(adapter, {}).get(str(PEER_WORKERS))
        latency = results.get("latency", {}).get(adapter, {})
        ratios = peer_ratios.get(adapter, {})
        table.add_row(
            escape(adapter),
            fmt(rate, "{:,.0f}"),
            fmt(ratios.get("throughput_vs_ppe"), "{:.2f}x"),
            fmt(ratios.get("throughput_vs_pipe"), "{:.2f}x"),
            fmt(latency.get("p50_ms"), "{:.3f}"),
            fmt(latency.get("p99_ms"), "{:.3f}"),
            fmt(ratios.get("p99_vs_ppe"), "{:.2f}x"),
        )
    for name in ("ppe", "pipe"):
        figures = results.get("peers", {}).get(name, {})
        table.add_row(
            name.upper() if name == "ppe" else name,
            fmt(figures.get("throughput"), "{:,.0f}"),
            "",
            "",
            fmt(figures.get("p50_ms"), "{:.3f}"),
            fmt(figures.get("p99_ms"), "{:.3f}"),
            "",
        )
    return table


def throughput_table(settings: dict[str, Any], results: dict[str, Any]) -> Table:
    counts = settings["worker_counts"]
    table = Table(title="ping throughput by workers (req/s)")
    table.add_column("")
    for count in counts:
        table.add_column(f"x{count}", justify="right")
    for adapter in settings["adapters"]:
        rates = results.get("throughput", {}).get(adapter, {})
        table.add_row(
            escape(adapter),
            *(fmt(rates.get(str(count)), "{:,.0f}") for count in counts),
        )
    return table


def startup_table(settings: dict[str, Any], results: dict[str, Any]) -> Table:
    count = settings["startup_workers"]
    startup = results.get("startup", {})
    raw = startup.get("raw_spawn_s")
    table = Table(title=f"start-up: {count} workers ready (s); sequential = 1-worker pools")
    for column in ("", "concurrent", "sequential", "speed-up", "/ raw"):
        table.add_column(column, justify="right" if column else "left")
    for adapter in settings["adapters"]:
        figures = startup.get(adapter, {})
        concurrent, sequential = figures.get("concurrent_s"), figures.get("sequential_s")
        table.add_row(
            escape(adapter),
            fmt(concurrent, "{:.3f}"),
            fmt(sequential, "{:.3f}"),
            fmt(quotient(sequential, concurrent), "{:.1f}x"),
            fmt(quotient(concurrent, raw), "{:.2f}x"),
        )
    table.add_row("raw spawn (python -c)", fmt(raw, "{:.3f}"), "", "", "")
    return table


def sessions_table(
    settings: dict[str, Any], results: dict[str, Any], ratios: dict[str, float]
) -> Table:
    sessions, validation = results.get("sessions", {}), results.get("validation", {})
    table = Table(
        title=f"sessions and validation ({PEER_WORKERS} {settings['session_adapter']} workers)"
    )
    table.add_column("")
    table.add_column("value", justify="right")
    rows = (
        ("SessionStore create/get/update/delete, ops/s", sessions.get("store_ops_per_s"), ",.0f"),
        ("execute ping, req/s", sessions.get("execute_rps"), ",.0f"),
        ("execute_in_session ping, req/s", sessions.get("execute_in_session_rps"), ",.0f"),
        ("execute_in_session / execute", ratios.get("in_session_vs_execute"), ".2f"),
        ("validate_command compute, us/call", validation.get("compute_us"), ".2f"),
        ("validate_command ping, us/call", validation.get("ping_us"), ".2f"),
        ("validate compute / sequential ping p50", ratios.get("validation_vs_round_trip"), ".3f"),
        (
            "validate compute / time per request at full load",
            ratios.get("validation_vs_request"),
            ".3f",
        ),
    )
    for label, value, spec in rows:
        table.add_row(label, fmt(value, f"{{:{spec}}}"))
    return table


def quotient(top: float | None, bottom: float | None) -> float | None:
    return None if top is None or not bottom else top / bottom


def fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)
