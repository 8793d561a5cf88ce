"""The conformance suite's pytest plugin: which adapters the tests run on, at which levels.

pytest loads it through the ``pytest11`` entry point of snakepit-core, so the suite's options
exist however it is collected: by path (``snakepit conformance``, the repository's testpaths)
or as installed (``pytest --pyargs snakepit_core.conformance``). The entry point is named after
this module, so ``-p snakepit_core.conformance.plugin`` (a source checkout with no entry points)
and the entry point are one plugin, never registered twice.

Loaded in every pytest run of an environment that has snakepit-core, it stays out of the way
of other test suites: it resolves no adapter and starts no process unless ``--adapter`` is
given or a test carrying a conformance level is collected, and it parametrizes, deselects and
reports only such tests. ``-p no:snakepit_core.conformance.plugin`` turns it off.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from .levels import (
    AUTO,
    BUNDLED,
    CAPABILITY_MARK,
    CHOICES,
    LEVEL_MARK,
    PROTOCOL,
    PROTOCOL_MARK,
    bundled_level_excluded,
    protocol_2_in_flight,
)
from .targets import Declared, Target, TargetError, installed, probe_handshake, resolve

_targets = pytest.StashKey[list[Target]]()
#: What a target's worker declares in its handshake, or the error that kept it from being known.
_declared = pytest.StashKey[dict[Target, Declared | Exception]]()
_report = pytest.StashKey[list[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("snakepit conformance")
    group.addoption(
        "--adapter",
        action="append",
        default=[],
        metavar="ADAPTER",
        help="adapter to check: an installed adapter's name, or module:NAME or "
        "path/to/file.py:NAME naming an Adapter (repeatable; default: every installed adapter)",
    )
    group.addoption(
        "--conformance-level",
        choices=CHOICES,
        default=AUTO,
        help="auto (default): the protocol level, and the bundled level for adapters that "
        "declare every shared command; protocol: only that level; bundled: both, for every "
        "adapter",
    )
    group.addoption(
        "--worker-concurrency",
        type=_positive_int,
        default=None,
        metavar="N",
        help="run as pools of worker_concurrency N do: every pool the suite creates has it, "
        "and frame-level handshakes offer max_in_flight N (default: the pool's default, and "
        "a protocol-1 handshake); the protocol-2 cases ask for at least 8",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{LEVEL_MARK}(level): a snakepit conformance test of that level"
    )
    config.addinivalue_line(
        "markers",
        f"{CAPABILITY_MARK}(name): applies only to workers declaring that capability",
    )
    config.addinivalue_line(
        "markers",
        f"{PROTOCOL_MARK}(version): applies only to workers whose handshake answers that protocol",
    )
    if config.getoption("adapter"):
        targets(config)  # a wrong --adapter is a usage error before anything is collected


def targets(config: pytest.Config) -> list[Target]:
    """The adapters under test, resolved once per run."""
    if _targets not in config.stash:
        specs: list[str] = config.getoption("adapter")
        try:
            base = Path(config.invocation_params.dir)
            found = [resolve(spec, base) for spec in specs] if specs else installed()
        except TargetError as exc:
            raise pytest.UsageError(str(exc)) from None
        if not found:
            raise pytest.UsageError("no adapter is installed: name one with --adapter")
        config.stash[_targets] = found
    return config.stash[_targets]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker(LEVEL_MARK) is None:
        return
    if "adapter" in metafunc.fixturenames:
        found = targets(metafunc.config)
        metafunc.parametrize("adapter", found, ids=[t.id for t in found], indirect=True)


def _declared_by(config: pytest.Config, target: Target) -> Declared | Exception:
    """What ``target``'s worker declares when asked for as many requests in flight as the
    protocol-2 cases ask: one handshake per target and run, at collection."""
    known = config.stash.setdefault(_declared, {})
    if target not in known:
        wanted = protocol_2_in_flight(config.getoption("worker_concurrency") or 1)
        try:
            known[target] = probe_handshake(target.adapter, wanted)
        except Exception as exc:  # the handshake test will fail and say why
            known[target] = exc
    return known[target]


def _excluded(item: pytest.Item, target: Target, chosen: str) -> str | None:
    """Why ``item`` does not apply to ``target`` (None: it does)."""
    if chosen == BUNDLED:
        return None  # demanded: every test runs
    mark = item.get_closest_marker(LEVEL_MARK)
    if mark is not None and mark.args and mark.args[0] == BUNDLED:
        reason = bundled_level_excluded(target.adapter, chosen)
        if reason:
            return f"bundled level not applicable: {reason}"
    for needed in item.iter_markers(PROTOCOL_MARK):
        declared = _declared_by(item.config, target)
        if isinstance(declared, Declared) and declared.protocol != needed.args[0]:
            return f'the worker does not answer the handshake with "protocol": {needed.args[0]}'
    for needed in item.iter_markers(CAPABILITY_MARK):
        declared = _declared_by(item.config, target)
        if isinstance(declared, Declared) and needed.args[0] not in declared.capabilities:
            return f"the worker does not declare the {needed.args[0]!r} capability"
    return None


def _level_of(item: pytest.Item) -> str:
    mark = item.get_closest_marker(LEVEL_MARK)
    return str(mark.args[0]) if mark is not None and mark.args else PROTOCOL


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the tests that do not apply to their adapter, and say so."""
    chosen: str = config.getoption("conformance_level")
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    selected: dict[str, Counter[str]] = defaultdict(Counter)
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    for item in items:
        callspec = getattr(item, "callspec", None)
        target = callspec.params.get("adapter") if callspec is not None else None
        if not isinstance(target, Target) or item.get_closest_marker(LEVEL_MARK) is None:
            kept.append(item)
            continue
        reason = _excluded(item, target, chosen)
        if reason is None:
            kept.append(item)
            selected[target.id][_level_of(item)] += 1
        else:
            dropped.append(item)
            reasons[target.id][reason] += 1
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    config.stash[_report] = [
        _summary(name, selected[name], reasons[name]) for name in {**selected, **reasons}
    ]
    concurrency = config.getoption("worker_concurrency")
    if concurrency is not None and config.stash[_report]:
        config.stash[_report].append(
            f"snakepit conformance: pools run with worker_concurrency={concurrency}"
        )


def _summary(name: str, selected: Counter[str], reasons: Counter[str]) -> str:
    levels = ", ".join(f"{selected[level]} {level}" for level in (PROTOCOL, BUNDLED))
    line = f"snakepit conformance: {name}: {levels} level tests selected"
    for reason, count in reasons.items():
        line += f"; {count} deselected ({reason})"
    return line


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    return config.stash.get(_report, [])
