"""Finding plugins (stevedore) and calling their hooks (pluggy), behind a typed facade.

Discovery is lazy and happens once per process: the first adapter look-up imports every entry
point of ``snakepit.adapters`` and ``snakepit.plugins``. A plugin that fails to import is
recorded by name (``snakepit adapters`` shows it) and never breaks the host.

Request-time hooks are called per implementation, in a fixed order (the plugin that provides
the adapter first, then the others in pluggy's order), so that one plugin raising is logged and
counted without stopping the others or the request. The ordered implementation lists are cached
per adapter and rebuilt when a plugin is registered or unregistered.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pluggy
from stevedore import ExtensionManager

from . import hookspecs
from .adapter import Adapter
from .errors import UnknownAdapter, ValidationError

log = logging.getLogger("snakepit.plugins")

ADAPTER_GROUP = "snakepit.adapters"
PLUGIN_GROUP = "snakepit.plugins"
CORE_PLUGIN_NAME = "snakepit.core"

REQUEST_HOOKS = (
    "snakepit_validate_command",
    "snakepit_prepare_args",
    "snakepit_process_response",
    "snakepit_command_timeout",
    "snakepit_request_started",
    "snakepit_request_finished",
    "snakepit_worker_started",
    "snakepit_worker_exited",
)


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded: its entry-point name, group and the error."""

    name: str
    group: str
    error: str


@dataclass(frozen=True)
class _Impl:
    plugin_name: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]

    def call(self, kwargs: dict[str, Any]) -> Any:
        return self.function(*[kwargs[name] for name in self.argnames])


class AdapterHooks:
    """The hooks as they apply to one adapter: ordered implementations, isolated calls.

    Attributes ``has_<hook>`` let the hot path skip hooks that nobody implements.
    """

    def __init__(
        self,
        manager: PluginManager,
        adapter: Adapter,
        version: int,
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self.adapter = adapter
        self._on_error = on_error
        self.version = version
        owner = manager.owner_of(adapter.name)
        self._impls: dict[str, tuple[_Impl, ...]] = {
            name: tuple(manager.ordered_impls(name, first=owner)) for name in REQUEST_HOOKS
        }
        self.has_prepare = bool(self._impls["snakepit_prepare_args"])
        self.has_process = bool(self._impls["snakepit_process_response"])
        self.has_timeout = bool(self._impls["snakepit_command_timeout"])
        self.has_request_telemetry = bool(
            self._impls["snakepit_request_started"] or self._impls["snakepit_request_finished"]
        )

    def _isolated(self, hook: str, impl: _Impl, kwargs: dict[str, Any]) -> Any:
        try:
            return impl.call(kwargs)
        except Exception:
            self._record_error(hook, impl.plugin_name)
            return None

    def _record_error(self, hook: str, plugin_name: str) -> None:
        log.exception("snakepit plugin %r raised in %s; the request goes on", plugin_name, hook)
        if self._on_error is not None:
            self._on_error(hook, plugin_name)

    def _first(self, hook: str, kwargs: dict[str, Any]) -> Any:
        for impl in self._impls[hook]:
            result = self._isolated(hook, impl, kwargs)
            if result is not None:
                return result
        return None

    def _all(self, hook: str, kwargs: dict[str, Any]) -> None:
        for impl in self._impls[hook]:
            self._isolated(hook, impl, kwargs)

    def validate_command(self, command: str, args: dict[str, Any]) -> None:
        """Run every validator; ``ValidationError`` (and subclasses) reach the caller."""
        kwargs = {"adapter": self.adapter, "command": command, "args": args}
        for impl in self._impls["snakepit_validate_command"]:
            try:
                impl.call(kwargs)
            except ValidationError:
                raise
            except Exception:
                self._record_error("snakepit_validate_command", impl.plugin_name)

    def prepare_args(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        kwargs = {"adapter": self.adapter, "command": command, "args": args}
        prepared = self._first("snakepit_prepare_args", kwargs)
        return args if prepared is None else prepared

    def process_response(self, command: str, response: Any) -> Any:
        kwargs = {"adapter": self.adapter, "command": command, "response": response}
        processed = self._first("snakepit_process_response", kwargs)
        return response if processed is None else processed

    def command_timeout(self, command: str, args: dict[str, Any]) -> float | None:
        kwargs = {"adapter": self.adapter, "command": command, "args": args}
        result = self._first("snakepit_command_timeout", kwargs)
        return None if result is None else float(result)

    def request_started(self, **data: Any) -> None:
        self._all("snakepit_request_started", {"adapter": self.adapter, **data})

    def request_finished(self, **data: Any) -> None:
        self._all("snakepit_request_finished", {"adapter": self.adapter, **data})

    def worker_started(self, **data: Any) -> None:
        self._all("snakepit_worker_started", {"adapter": self.adapter, **data})

    def worker_exited(self, **data: Any) -> None:
        self._all("snakepit_worker_exited", {"adapter": self.adapter, **data})


class PluginManager:
    """The process-wide registry of plugins and adapters (see :func:`get_plugin_manager`)."""

    def __init__(self, *, discover: bool = True) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._discover = discover
        self._loaded = False
        self._lock = threading.RLock()
        self._version = 0
        self._adapters: dict[str, Adapter] | None = None
        self._owners: dict[str, str] = {}
        self._distributions: dict[str, tuple[str | None, str | None]] = {}
        self.failures: list[PluginFailure] = []
        from .validation import SchemaValidation

        self._pm.register(SchemaValidation(), name=CORE_PLUGIN_NAME)

    @property
    def version(self) -> int:
        """Bumped whenever the set of plugins changes, so cached hook lists are rebuilt."""
        return self._version

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        """Import every entry-point plugin, once. Broken ones are recorded, not raised."""
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            if self._discover:
                for group in (ADAPTER_GROUP, PLUGIN_GROUP):
                    self._load_group(group)
            self._drop_plugins_with_unknown_hooks()
            self._changed()

    def _drop_plugins_with_unknown_hooks(self) -> None:
        """``check_pending`` per installed plugin: a misspelled hook is reported loudly and
        that plugin is dropped, instead of raising into the host."""
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError:
            for name, hook_caller in vars(self._pm.hook).items():
                if hook_caller.spec is not None:
                    continue
                for impl in hook_caller.get_hookimpls():
                    log.warning(
                        "snakepit plugin %r implements unknown hook %r; not loaded",
                        impl.plugin_name,
                        name,
                    )
                    self.failures.append(
                        PluginFailure(
                            impl.plugin_name, "hooks", f"unknown hook {name!r} (misspelled?)"
                        )
                    )
                    if self._pm.has_plugin(impl.plugin_name):
                        self._pm.unregister(name=impl.plugin_name)

    def _load_group(self, group: str) -> None:
        def on_failure(_manager: Any, entry_point: Any, exc: BaseException) -> None:
            name = getattr(entry_point, "name", str(entry_point))
            log.warning("snakepit plugin %r (%s) failed to load: %s", name, group, exc)
            self.failures.append(PluginFailure(name, group, f"{type(exc).__name__}: {exc}"))

        # stevedore memoizes entry points per namespace for the process; a new manager must see
        # what is installed now (a plugin pip-installed since, or a test's fake distribution).
        ExtensionManager.ENTRY_POINT_CACHE.pop(group, None)
        extensions = ExtensionManager(
            namespace=group, invoke_on_load=False, on_load_failure_callback=on_failure
        )
        dists = {
            entry_point.name: entry_point.dist
            for entry_point in importlib.metadata.entry_points(group=group)
        }
        for extension in extensions:
            if self._pm.has_plugin(extension.name):
                self.failures.append(
                    PluginFailure(extension.name, group, "a plugin of that name is already loaded")
                )
                continue
            self._pm.register(extension.plugin, name=extension.name)
            dist = dists.get(extension.name)
            self._distributions[extension.name] = (
                getattr(dist, "name", None),
                getattr(dist, "version", None),
            )

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register an in-process plugin (a module or object with ``@hookimpl`` methods)."""
        self.load()
        with self._lock:
            registered = self._pm.register(plugin, name=name)
            assert registered is not None, f"plugin {name!r} is blocked"
            try:
                self._pm.check_pending()
            except pluggy.PluginValidationError:
                self._pm.unregister(name=registered)
                raise
            self._changed()
            return registered

    def unregister(self, name: str) -> None:
        with self._lock:
            self._pm.unregister(name=name)
            self._changed()

    def _changed(self) -> None:
        self._adapters = None
        self._version += 1

    # -- adapters -----------------------------------------------------------------------------

    def adapters(self) -> dict[str, Adapter]:
        """Every installed adapter by name (discovering plugins on first use)."""
        self.load()
        with self._lock:
            if self._adapters is None:
                self._adapters = self._collect_adapters()
            return dict(self._adapters)

    def _collect_adapters(self) -> dict[str, Adapter]:
        found: dict[str, Adapter] = {}
        self._owners = {}
        for impl in reversed(self._pm.hook.snakepit_adapters.get_hookimpls()):
            try:
                provided: list[Adapter] = list(impl.function() or [])  # type: ignore[call-overload]
            except Exception as exc:  # a broken plugin must not break discovery
                log.warning("plugin %r: snakepit_adapters() raised %s", impl.plugin_name, exc)
                self.failures.append(
                    PluginFailure(
                        impl.plugin_name, "snakepit_adapters", f"{type(exc).__name__}: {exc}"
                    )
                )
                continue
            dist_name, dist_version = self._distributions.get(impl.plugin_name, (None, None))
            for adapter in provided:
                if adapter.name in found:
                    log.warning("adapter %r provided twice; keeping the first", adapter.name)
                    continue
                if adapter.distribution is None and dist_name is not None:
                    adapter = replace(adapter, distribution=dist_name, version=dist_version)
                found[adapter.name] = adapter
                self._owners[adapter.name] = impl.plugin_name
        return found

    def get_adapter(self, name: str) -> Adapter:
        """The adapter called ``name``, or ``UnknownAdapter`` listing the installed ones."""
        adapters = self.adapters()
        try:
            return adapters[name]
        except KeyError:
            installed = ", ".join(sorted(adapters)) or "none"
            broken = "".join(
                f"; plugin {f.name!r} failed to load: {f.error}" for f in self.failures
            )
            raise UnknownAdapter(
                f"unknown adapter {name!r} (installed: {installed}){broken}", adapter=name
            ) from None

    def owner_of(self, adapter_name: str) -> str | None:
        """The name of the plugin that provides ``adapter_name`` (None for code-built ones)."""
        self.adapters()
        return self._owners.get(adapter_name)

    # -- hooks --------------------------------------------------------------------------------

    def ordered_impls(self, hook: str, *, first: str | None) -> Iterator[_Impl]:
        """Implementations of ``hook`` in call order, the plugin named ``first`` leading."""
        impls = [
            _Impl(impl.plugin_name, impl.function, tuple(impl.argnames))
            for impl in reversed(getattr(self._pm.hook, hook).get_hookimpls())
            if not (impl.hookwrapper or impl.wrapper)
        ]
        impls.sort(key=lambda impl: impl.plugin_name != first)
        return iter(impls)

    def hooks_for(
        self, adapter: Adapter, on_error: Callable[[str, str], None] | None = None
    ) -> AdapterHooks:
        """The hooks for ``adapter``; ``on_error(hook, plugin)`` hears of raising hooks."""
        self.load()
        return AdapterHooks(self, adapter, self._version, on_error)

    def distribution_of(self, plugin_name: str) -> tuple[str | None, str | None]:
        return self._distributions.get(plugin_name, (None, None))


_manager: PluginManager | None = None
_manager_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, created on first use."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = PluginManager()
        return _manager


def resolve_adapter(adapter: str | Adapter) -> Adapter:
    """An ``Adapter`` from a name (looked up among installed plugins) or as given."""
    if isinstance(adapter, Adapter):
        return adapter
    if not isinstance(adapter, str):
        raise UnknownAdapter(f"adapter must be a name or an Adapter, not {type(adapter).__name__}")
    return get_plugin_manager().get_adapter(adapter)


__all__ = [
    "ADAPTER_GROUP",
    "PLUGIN_GROUP",
    "AdapterHooks",
    "PluginFailure",
    "PluginManager",
    "get_plugin_manager",
    "resolve_adapter",
]
