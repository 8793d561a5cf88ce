"""Finding plugins (stevedore) and calling their hooks (pluggy), behind a typed facade.

Discovery is lazy and happens once per process: the first adapter look-up imports every entry
point of ``snakepit.plugins``, then of ``snakepit.adapters``. A plugin that fails to import, and
an adapter name that two plugins provide, are recorded (``snakepit adapters`` shows them and
exits non-zero) and break none of the other plugins.

Every hook is called through pluggy, so ``firstresult``, wrappers and ``enable_tracing`` work:

* Order: pluggy calls the last registered plugin first, and adapter plugins (those whose
  ``snakepit_adapters`` returned an adapter) are kept registered after the general ones, so an
  adapter's own plugin answers before them. For one adapter, hooks are called through subset
  callers that leave out the *other* adapter plugins: an adapter plugin shapes and observes
  its own adapters' requests only.
* Shaping hooks (validation, arguments, response, timeout) are one pluggy call each (but when
  the core's schema validation is an adapter's only validator and nobody monitors hook calls,
  it is called directly: pluggy's call costs more than validating a ``ping``). A
  ``SnakepitError`` raised by a hook (``ValidationError``...) reaches the caller unchanged; any
  other exception becomes :class:`~snakepit_core.errors.PluginError` naming the plugin and the
  hook, so a request is never sent half-shaped or unvalidated.
* Observer hooks (request and worker events) are one pluggy call per plugin, so a plugin that
  raises is logged and counted without hiding the event from the others or failing a request.

A pool keeps its adapter's callers (:class:`AdapterHooks`) and asks for new ones when a plugin
has been registered or unregistered since.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any

import pluggy
from stevedore import ExtensionManager

from . import hookspecs
from .adapter import Adapter
from .callbacks import Callback
from .errors import PluginError, SnakepitError, UnknownAdapter

log = logging.getLogger("snakepit.plugins")

ADAPTER_GROUP = "snakepit.adapters"
PLUGIN_GROUP = "snakepit.plugins"
CORE_PLUGIN_NAME = "snakepit.core"

#: ``on_error(hook, plugin)``: told of every hook that raised (a pool counts them).
ErrorListener = Callable[[str, str], None]
#: ``(plugin name, caller of that plugin's implementations only)``, in call order.
_PluginCallers = tuple[tuple[str, pluggy.HookCaller], ...]


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used: its name, where it failed (entry-point group or hook)
    and the error."""

    name: str
    group: str
    error: str


def _raising_plugin(error: BaseException, impls: Sequence[pluggy.HookImpl]) -> str | None:
    """The plugin whose implementation raised ``error``: the innermost frame of its traceback
    that runs one of ``impls``. Innermost, so that a wrapper re-raising what an inner
    implementation raised is not blamed for it."""
    culprit = None
    traceback = error.__traceback__
    while traceback is not None:
        for impl in impls:
            if _runs(traceback.tb_frame, impl):
                culprit = impl.plugin_name
        traceback = traceback.tb_next
    return culprit


def _runs(frame: FrameType, impl: pluggy.HookImpl) -> bool:
    """Whether ``frame`` executes ``impl``; for a method, on that plugin's instance (two
    plugins may be instances of one class, sharing its code)."""
    function = impl.function
    if frame.f_code is not getattr(function, "__code__", None):
        return False
    instance = getattr(function, "__self__", None)
    return instance is None or frame.f_locals.get(frame.f_code.co_varnames[0]) is instance


def _plugin_callers(
    pm: pluggy.PluginManager, hook: str, left_out: Collection[object] = ()
) -> _PluginCallers:
    """``(plugin name, caller)`` for each plugin implementing ``hook`` but not in ``left_out``,
    in pluggy's call order: each caller calls that plugin's implementations only."""
    impls = list(reversed(getattr(pm.hook, hook).get_hookimpls()))
    everyone = {impl.plugin for impl in impls}
    # Plugins in the order of their first implementation that is not a wrapper: a plugin that
    # only wraps an observer hook comes last (it has nothing to wrap but its own calls).
    impls.sort(key=lambda impl: impl.wrapper or impl.hookwrapper)
    plugins = {impl.plugin: impl.plugin_name for impl in impls if impl.plugin not in left_out}
    return tuple(
        (name, pm.subset_hook_caller(hook, everyone - {plugin})) for plugin, name in plugins.items()
    )


class _MonitoredPluginManager(pluggy.PluginManager):
    """pluggy's manager, counting the hook-call monitors (``enable_tracing`` is one) and
    telling snakepit when that changes, so that no hook call bypasses pluggy while someone
    watches them."""

    def __init__(self, project_name: str, on_change: Callable[[], None]) -> None:
        super().__init__(project_name)
        self._on_change = on_change
        self.monitors = 0

    def add_hookcall_monitoring(
        self, before: Callable[..., None], after: Callable[..., None]
    ) -> Callable[[], None]:
        undo = super().add_hookcall_monitoring(before, after)
        self.monitors += 1
        self._on_change()

        def undo_and_tell() -> None:
            undo()
            self.monitors -= 1
            self._on_change()

        return undo_and_tell


def _only_core_validator(
    pm: pluggy.PluginManager, caller: pluggy.HookCaller
) -> Callable[..., object] | None:
    """The core's validation function if it is the only ``snakepit_validate_command`` and no
    one monitors the hook calls."""
    if getattr(pm, "monitors", 0):
        return None
    impls = caller.get_hookimpls()
    if len(impls) != 1:
        return None
    impl = impls[0]
    if impl.plugin_name != CORE_PLUGIN_NAME or impl.wrapper or impl.hookwrapper:
        return None
    return impl.function


class AdapterHooks:
    """The hooks as they apply to one adapter, from :meth:`PluginManager.hooks_for`.

    ``has_<hook>`` let the hot path skip hooks that nobody implements; ``version`` is the
    plugin manager's when these were built, so a pool knows when to ask again.
    """

    def __init__(
        self,
        pm: pluggy.PluginManager,
        adapter: Adapter,
        version: int,
        left_out: Collection[object],
        on_error: ErrorListener | None = None,
    ) -> None:
        self.adapter = adapter
        self.version = version
        self._on_error = on_error
        self._validate = pm.subset_hook_caller("snakepit_validate_command", left_out)
        self._core_validator_only = _only_core_validator(pm, self._validate)
        self._prepare = pm.subset_hook_caller("snakepit_prepare_args", left_out)
        self._process = pm.subset_hook_caller("snakepit_process_response", left_out)
        self._timeout = pm.subset_hook_caller("snakepit_command_timeout", left_out)
        self._request_started = _plugin_callers(pm, "snakepit_request_started", left_out)
        self._request_finished = _plugin_callers(pm, "snakepit_request_finished", left_out)
        self._worker_started = _plugin_callers(pm, "snakepit_worker_started", left_out)
        self._worker_exited = _plugin_callers(pm, "snakepit_worker_exited", left_out)
        self.has_prepare = bool(self._prepare.get_hookimpls())
        self.has_process = bool(self._process.get_hookimpls())
        self.has_timeout = bool(self._timeout.get_hookimpls())
        self.has_request_telemetry = bool(self._request_started or self._request_finished)

    # -- shaping: one pluggy call; a plugin that raises stops the request --------------------
    # A SnakepitError is a hook's refusal and passes; anything else is a plugin's bug. Each
    # method has its own ``try`` (free until something raises): no helper call on the hot path.

    def validate_command(self, command: str, args: dict[str, Any]) -> None:
        """Run the validators; the first ``SnakepitError`` one raises reaches the caller.

        When the core's schema validation is the only validator (the common case), it is called
        directly: pluggy's per-call machinery costs more than validating ``ping({})`` itself.
        While hook calls are monitored (``pm.enable_tracing()``) it goes through pluggy.
        """
        try:
            if self._core_validator_only is not None:
                self._core_validator_only(self.adapter, command, args)
                return
            self._validate(adapter=self.adapter, command=command, args=args)
        except SnakepitError:
            raise
        except Exception as error:
            raise self._plugin_error(self._validate, command, error) from error

    def prepare_args(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            prepared = self._prepare(adapter=self.adapter, command=command, args=args)
        except SnakepitError:
            raise
        except Exception as error:
            raise self._plugin_error(self._prepare, command, error) from error
        return args if prepared is None else prepared

    def process_response(self, command: str, response: Any) -> Any:
        try:
            processed = self._process(adapter=self.adapter, command=command, response=response)
        except SnakepitError:
            raise
        except Exception as error:
            raise self._plugin_error(self._process, command, error) from error
        return response if processed is None else processed

    def command_timeout(self, command: str, args: dict[str, Any]) -> float | None:
        try:
            timeout = self._timeout(adapter=self.adapter, command=command, args=args)
        except SnakepitError:
            raise
        except Exception as error:
            raise self._plugin_error(self._timeout, command, error) from error
        return None if timeout is None else float(timeout)

    def _plugin_error(
        self, caller: pluggy.HookCaller, command: str, error: Exception
    ) -> PluginError:
        plugin = _raising_plugin(error, caller.get_hookimpls())
        if self._on_error is not None:
            self._on_error(caller.name, plugin or "?")
        return PluginError(
            f"adapter {self.adapter.name!r}: {command}: plugin {plugin or '?'!r} raised in "
            f"{caller.name}: {type(error).__name__}: {error}",
            plugin=plugin,
            hook=caller.name,
            adapter=self.adapter.name,
            command=command,
        )

    # -- observing: one pluggy call per plugin; a plugin that raises is logged and counted ----

    def _notify(self, callers: _PluginCallers, kwargs: dict[str, Any]) -> None:
        for plugin, caller in callers:
            try:
                caller(**kwargs)
            except Exception:
                log.exception(
                    "snakepit plugin %r raised in %s; the request goes on", plugin, caller.name
                )
                if self._on_error is not None:
                    self._on_error(caller.name, plugin)

    def request_started(
        self, *, command: str, request_id: int, worker_id: str, session_id: str | None
    ) -> None:
        self._notify(
            self._request_started,
            {
                "adapter": self.adapter,
                "command": command,
                "request_id": request_id,
                "worker_id": worker_id,
                "session_id": session_id,
            },
        )

    def request_finished(
        self,
        *,
        command: str,
        request_id: int,
        worker_id: str | None,
        session_id: str | None,
        duration: float,
        queue_wait: float,
        error: BaseException | None,
    ) -> None:
        self._notify(
            self._request_finished,
            {
                "adapter": self.adapter,
                "command": command,
                "request_id": request_id,
                "worker_id": worker_id,
                "session_id": session_id,
                "duration": duration,
                "queue_wait": queue_wait,
                "error": error,
            },
        )

    def worker_started(self, *, worker_id: str, pid: int, startup_time: float) -> None:
        self._notify(
            self._worker_started,
            {
                "adapter": self.adapter,
                "worker_id": worker_id,
                "pid": pid,
                "startup_time": startup_time,
            },
        )

    def worker_exited(
        self, *, worker_id: str, pid: int, exit_code: int | None, reason: str
    ) -> None:
        self._notify(
            self._worker_exited,
            {
                "adapter": self.adapter,
                "worker_id": worker_id,
                "pid": pid,
                "exit_code": exit_code,
                "reason": reason,
            },
        )


class _InstalledExtensions(ExtensionManager[Any]):
    """stevedore's loading, over the entry points installed now, with their distributions.

    stevedore's own listing is memoized per process (a plugin pip-installed since, or a test's
    fake distribution, would go unseen) and rebuilds entry points without ``dist``.
    """

    def list_entry_points(self) -> list[importlib.metadata.EntryPoint]:
        return list(importlib.metadata.entry_points(group=self.namespace))


class PluginManager:
    """The process-wide registry of plugins and adapters (see :func:`get_plugin_manager`)."""

    def __init__(self, *, discover: bool = True) -> None:
        self._pm = _MonitoredPluginManager(hookspecs.PROJECT_NAME, self._monitoring_changed)
        self._pm.add_hookspecs(hookspecs)
        self._discover = discover
        self._loaded = False
        self._lock = threading.RLock()
        self._version = 0
        self._adapters: dict[str, Adapter] | None = None
        self._owners: dict[str, str] = {}
        self._adapter_plugins: dict[str, object] = {}
        self._conflicts: dict[str, list[str]] = {}
        self._distributions: dict[str, tuple[str | None, str | None]] = {}
        self._load_failures: list[PluginFailure] = []
        self._adapter_failures: list[PluginFailure] = []
        from .validation import SchemaValidation

        self._pm.register(SchemaValidation(), name=CORE_PLUGIN_NAME)

    @property
    def version(self) -> int:
        """Bumped whenever the set of plugins changes, so cached hook callers are rebuilt."""
        return self._version

    @property
    def failures(self) -> list[PluginFailure]:
        """Plugins that failed to load, to provide adapters, or that provide a taken name."""
        self.adapters()
        return [*self._load_failures, *self._adapter_failures]

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        """Import every entry-point plugin, once. Broken ones are recorded, not raised.

        General plugins are registered first, so that pluggy, which calls the last registered
        first, asks the adapter plugins before them.
        """
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            if self._discover:
                for group in (PLUGIN_GROUP, ADAPTER_GROUP):
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
                    self._load_failures.append(
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
            self._load_failures.append(PluginFailure(name, group, f"{type(exc).__name__}: {exc}"))

        extensions = _InstalledExtensions(
            namespace=group, invoke_on_load=False, on_load_failure_callback=on_failure
        )
        for extension in extensions:
            dist = extension.entry_point.dist
            distribution = (getattr(dist, "name", None), getattr(dist, "version", None))
            refusal = self._refusal(extension.name, extension.plugin, distribution)
            if refusal is not None:
                self._load_failures.append(PluginFailure(extension.name, group, refusal))
                continue
            self._pm.register(extension.plugin, name=extension.name)
            self._distributions[extension.name] = distribution

    def _refusal(
        self, name: str, plugin: object, distribution: tuple[str | None, str | None]
    ) -> str | None:
        """Why an entry point's plugin cannot be registered, if it cannot."""
        if self._pm.has_plugin(name):
            taken_by = _describe(name, self.distribution_of(name))
            return f"the name is taken by {taken_by}; {_describe(name, distribution)} is not loaded"
        if not isinstance(plugin, Hashable):
            return "the plugin must be hashable, as pluggy requires"
        return None

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register an in-process plugin (a module or object with ``@hookimpl`` methods).

        The plugin must be hashable, as pluggy requires (its subset callers keep plugins in
        sets). Register plugins before starting pools that use them: an adapter plugin may be
        registered again, after the new plugin, to keep the order described above.
        """
        if not isinstance(plugin, Hashable):
            raise TypeError(f"plugin {name or plugin!r} must be hashable, as pluggy requires")
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

    def _monitoring_changed(self) -> None:
        self._version += 1  # hook callers are rebuilt; the plugins are the same

    # -- adapters -----------------------------------------------------------------------------

    def adapters(self) -> dict[str, Adapter]:
        """Every usable adapter by name (discovering plugins on first use)."""
        self.load()
        with self._lock:
            if self._adapters is None:
                self._adapters = self._collect_adapters()
                self._keep_adapter_plugins_last()
            return dict(self._adapters)

    def _collect_adapters(self) -> dict[str, Adapter]:
        """Every plugin's adapters by name; a name two plugins provide is neither's (whichever
        was kept would be a guess)."""
        found: dict[str, Adapter] = {}
        self._owners = {}
        self._conflicts = {}
        for adapter_name, provided_by in self._ask_for_adapters().items():
            if len(provided_by) > 1:
                self._conflicts[adapter_name] = sorted(name for name, _ in provided_by)
                error = self._conflict_error(adapter_name)
                log.warning("snakepit: %s", error)
                self._adapter_failures.append(
                    PluginFailure(", ".join(error.plugins or ()), "snakepit_adapters", str(error))
                )
                continue
            plugin_name, adapter = provided_by[0]
            dist_name, dist_version = self.distribution_of(plugin_name)
            if adapter.distribution is None and dist_name is not None:
                adapter = replace(adapter, distribution=dist_name, version=dist_version)
            found[adapter_name] = adapter
            self._owners[adapter_name] = plugin_name
        return found

    def _ask_for_adapters(self) -> dict[str, list[tuple[str, Adapter]]]:
        """``snakepit_adapters`` of each plugin: ``{adapter name: [(plugin, adapter)]}``."""
        self._adapter_failures = []
        self._adapter_plugins = {}
        providers: dict[str, list[tuple[str, Adapter]]] = {}
        for plugin_name, caller in _plugin_callers(self._pm, "snakepit_adapters"):
            try:
                provided = [adapter for result in caller() for adapter in result or ()]
            except Exception as exc:  # a broken plugin must not break discovery
                log.warning("plugin %r: snakepit_adapters() raised %s", plugin_name, exc)
                self._adapter_failures.append(
                    PluginFailure(plugin_name, "snakepit_adapters", f"{type(exc).__name__}: {exc}")
                )
                continue
            if provided:
                self._adapter_plugins[plugin_name] = self._pm.get_plugin(plugin_name)
            for adapter in provided:
                providers.setdefault(adapter.name, []).append((plugin_name, adapter))
        return providers

    def _conflict_error(self, adapter_name: str) -> PluginError:
        plugins = self._conflicts[adapter_name]
        named = " and ".join(_describe(name, self.distribution_of(name)) for name in plugins)
        return PluginError(
            f"adapter {adapter_name!r} is provided by {named}; uninstall all but one",
            plugin=None,
            hook="snakepit_adapters",
            adapter=adapter_name,
            plugins=plugins,
        )

    def _keep_adapter_plugins_last(self) -> None:
        """Register the adapter plugins again if a general plugin came after them, so pluggy
        (last registered, first called) asks an adapter's own plugin before general ones."""
        names = [name for name, plugin in self._pm.list_name_plugin() if plugin is not None]
        if set(names[len(names) - len(self._adapter_plugins) :]) == set(self._adapter_plugins):
            return
        for name in names:
            if name in self._adapter_plugins:
                self._pm.register(self._pm.unregister(name=name), name=name)

    def get_adapter(self, name: str) -> Adapter:
        """The adapter called ``name``; ``PluginError`` if two plugins provide it,
        ``UnknownAdapter`` listing the installed ones if none does."""
        adapters = self.adapters()
        try:
            return adapters[name]
        except KeyError:
            pass
        if name in self._conflicts:
            raise self._conflict_error(name)
        installed = ", ".join(sorted(adapters)) or "none"
        broken = "".join(f"; plugin {f.name!r} failed to load: {f.error}" for f in self.failures)
        raise UnknownAdapter(
            f"unknown adapter {name!r} (installed: {installed}){broken}", adapter=name
        )

    def distribution_of(self, plugin_name: str) -> tuple[str | None, str | None]:
        """``(name, version)`` of the distribution a plugin came from (None for in-process)."""
        return self._distributions.get(plugin_name, (None, None))

    # -- hooks --------------------------------------------------------------------------------

    def hooks_for(self, adapter: Adapter, on_error: ErrorListener | None = None) -> AdapterHooks:
        """The hooks for ``adapter``: every plugin's but other adapters' plugins';
        ``on_error(hook, plugin)`` hears of hooks that raised."""
        self.adapters()
        with self._lock:
            owner = self._owners.get(adapter.name)
            left_out = [plugin for name, plugin in self._adapter_plugins.items() if name != owner]
            return AdapterHooks(self._pm, adapter, self._version, left_out, on_error)

    def callbacks_for(self, adapter: Adapter) -> list[tuple[Callback, str]]:
        """The callbacks plugins contribute to pools of ``adapter`` (``snakepit_callbacks``),
        each with the plugin it came from; ``PluginError`` naming a plugin whose hook raises
        or returns something else than a list of ``Callback``."""
        self.adapters()
        with self._lock:
            owner = self._owners.get(adapter.name)
            left_out = [plugin for name, plugin in self._adapter_plugins.items() if name != owner]
        contributed: list[tuple[Callback, str]] = []
        for plugin_name, caller in _plugin_callers(self._pm, "snakepit_callbacks", left_out):
            source = _describe(plugin_name, self.distribution_of(plugin_name))
            try:
                results = caller(adapter=adapter)
            except Exception as error:
                raise PluginError(
                    f"{source}: snakepit_callbacks raised {error!r}",
                    plugin=plugin_name,
                    hook="snakepit_callbacks",
                    adapter=adapter.name,
                ) from error
            for result in results:
                if not isinstance(result, list | tuple) or not all(
                    isinstance(callback, Callback) for callback in result
                ):
                    raise PluginError(
                        f"{source}: snakepit_callbacks must return a list of Callback, not "
                        f"{result!r}"[:300],
                        plugin=plugin_name,
                        hook="snakepit_callbacks",
                        adapter=adapter.name,
                    )
                contributed.extend((callback, source) for callback in result)
        return contributed

    @property
    def pm(self) -> pluggy.PluginManager:
        """The pluggy manager itself, for tracing (``pm.enable_tracing()``) and introspection."""
        return self._pm


def _describe(plugin_name: str, distribution: tuple[str | None, str | None]) -> str:
    """A plugin and where it comes from, for messages: ``plugin 'x' (dist 1.0)``."""
    dist_name, dist_version = distribution
    if dist_name is None:
        return f"plugin {plugin_name!r} (registered in-process)"
    return f"plugin {plugin_name!r} ({dist_name} {dist_version})"


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
