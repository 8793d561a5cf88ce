"""The adapters the suite checks: what ``--adapter`` names, and what each one declares.

``--adapter`` takes either an installed adapter's name or a reference to an
:class:`~snakepit_core.adapter.Adapter` defined in Python, so that an adapter built with
``ScriptAdapter`` (no plugin, no packaging) can be checked as it is:

* ``package.module:NAME`` — imported from ``sys.path``;
* ``path/to/file.py:NAME`` — loaded from that file (relative to the current directory).

``NAME`` is an ``Adapter`` or a function of no arguments that returns one. A reference is told
apart from a name by its colon.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..adapter import Adapter

_loaded = itertools.count(1)


class TargetError(ValueError):
    """An ``--adapter`` value that names no adapter; the message says why."""


@dataclass(frozen=True, eq=False)
class Target:
    """One adapter under test, and how it was asked for (for messages)."""

    spec: str
    adapter: Adapter

    @property
    def id(self) -> str:
        """The test id suffix: the adapter's name."""
        return self.adapter.name


def _load_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise TargetError(f"no such file: {path}")
    name = f"_snakepit_conformance_target_{next(_loaded)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by name
    spec.loader.exec_module(module)
    return module


def _load_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise TargetError(f"cannot import {name}: {exc}") from None


def from_reference(spec: str, base: Path) -> Adapter:
    """The adapter a ``module:NAME`` or ``file.py:NAME`` reference points at."""
    where, _, attribute = spec.rpartition(":")
    if not where or not attribute.isidentifier():
        raise TargetError("a reference is module:NAME or path/to/file.py:NAME")
    is_file = where.endswith(".py") or "/" in where
    module = _load_file(base / where) if is_file else _load_module(where)
    try:
        found: object = getattr(module, attribute)
    except AttributeError:
        raise TargetError(f"{where} defines no {attribute}") from None
    if callable(found) and not isinstance(found, Adapter):
        factory: Callable[[], object] = found
        found = factory()
    if not isinstance(found, Adapter):
        raise TargetError(f"{attribute} is a {type(found).__name__}, not an Adapter")
    return found


def resolve(spec: str, base: Path) -> Target:
    """The target ``--adapter spec`` asks for; :class:`TargetError` if there is none."""
    from ..errors import SnakepitError
    from ..plugins import get_plugin_manager

    try:
        if ":" in spec:
            return Target(spec, from_reference(spec, base))
        return Target(spec, get_plugin_manager().get_adapter(spec))
    except (SnakepitError, TargetError) as exc:
        raise TargetError(f"--adapter {spec}: {exc}") from None


def installed() -> list[Target]:
    """Every installed adapter, by name (the suite's default)."""
    from ..plugins import get_plugin_manager

    adapters = get_plugin_manager().adapters()
    return [Target(name, adapters[name]) for name in sorted(adapters)]


@dataclass(frozen=True)
class Declared:
    """What one worker of an adapter declares in its handshake answer."""

    capabilities: frozenset[str]
    #: 2 if the answer says ``"protocol": 2``, else 1.
    protocol: int


def probe_handshake(adapter: Adapter, max_in_flight: int) -> Declared:
    """What one worker of ``adapter`` declares when a pool asks for ``max_in_flight``.

    Capabilities and the protocol are the worker's to declare, not the adapter's, so the only
    way to know them before the tests run is to ask one. Raises what the start or the
    handshake raised.
    """
    from .wire import WireWorker, capabilities_of, protocol_of

    with WireWorker(adapter, worker_id="conformance-probe") as worker:
        answer = worker.handshake(max_in_flight=max_in_flight)
        return Declared(capabilities_of(answer), protocol_of(answer))
