"""Hooks and plugin discovery: throwaway plugins registered in-process, fake distributions."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pluggy
import pytest

from snakepit_core import Pool, ScriptAdapter, hookimpl, hookspecs
from snakepit_core.errors import (
    CommandError,
    PluginError,
    UnknownAdapter,
    UnknownCommand,
    ValidationError,
    WorkerTimeout,
)
from snakepit_core.plugins import PluginManager, get_plugin_manager

from conftest import BRIDGES

ROOT = Path(__file__).resolve().parent.parent


class PluginWith:
    """A plugin whose ``snakepit_<hook>`` is ``implementation``."""

    def __init__(self, hook: str, implementation) -> None:
        setattr(self, f"snakepit_{hook}", hookimpl(implementation))


@pytest.fixture
def register():
    """``register(plugin, name)`` into the process-wide manager, unregistered after the test."""
    manager = get_plugin_manager()
    names: list[str] = []

    def register(plugin: object, name: str) -> None:
        names.append(manager.register(plugin, name=name))

    yield register
    for name in reversed(names):
        manager.unregister(name)


class Recorder:
    """Collects (plugin, hook, kwargs) in call order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict]] = []

    def names(self, hook: str) -> list[str]:
        return [plugin for plugin, name, _ in self.calls if name == hook]


def make_owner(recorder: Recorder):
    """An adapter plugin providing the adapter 'toy' and answering every hook for it."""

    class Owner:
        @hookimpl
        def snakepit_adapters(self):
            return [
                ScriptAdapter(
                    "toy",
                    sys.executable,
                    BRIDGES / "misbehave.py",
                    args=["normal"],
                    timeouts={"echo": 7.0},
                )
            ]

        @hookimpl
        def snakepit_validate_command(self, adapter, command, args):
            recorder.calls.append(("owner", "validate", dict(args)))
            if args.get("forbidden"):
                raise ValidationError("toy: args.forbidden is not allowed here")

        @hookimpl
        def snakepit_prepare_args(self, adapter, command, args):
            recorder.calls.append(("owner", "prepare", dict(args)))
            return {**args, "prepared_by": "owner"} if adapter.name == "toy" else None

        @hookimpl
        def snakepit_process_response(self, adapter, command, response):
            recorder.calls.append(("owner", "process", response))
            return {"wrapped_by": "owner", "inner": response} if adapter.name == "toy" else None

        @hookimpl
        def snakepit_command_timeout(self, adapter, command, args):
            recorder.calls.append(("owner", "timeout", dict(args)))
            return 4.5 if command == "echo" else None

        @hookimpl
        def snakepit_request_started(self, adapter, command, request_id, worker_id, session_id):
            recorder.calls.append(
                (
                    "owner",
                    "started",
                    {"command": command, "worker_id": worker_id, "session_id": session_id},
                )
            )

        @hookimpl
        def snakepit_request_finished(
            self, adapter, command, request_id, worker_id, session_id, duration, queue_wait, error
        ):
            recorder.calls.append(
                (
                    "owner",
                    "finished",
                    {
                        "command": command,
                        "error": error,
                        "duration": duration,
                        "queue_wait": queue_wait,
                    },
                )
            )

        @hookimpl
        def snakepit_worker_started(self, adapter, worker_id, pid, startup_time):
            recorder.calls.append(
                ("owner", "worker_started", {"pid": pid, "startup_time": startup_time})
            )

        @hookimpl
        def snakepit_worker_exited(self, adapter, worker_id, pid, exit_code, reason):
            recorder.calls.append(
                ("owner", "worker_exited", {"pid": pid, "reason": reason, "exit_code": exit_code})
            )

    return Owner()


def make_general(recorder: Recorder):
    """A cross-cutting plugin, registered after the owner (pluggy would call it first)."""

    class General:
        @hookimpl
        def snakepit_validate_command(self, adapter, command, args):
            recorder.calls.append(("general", "validate", dict(args)))

        @hookimpl
        def snakepit_prepare_args(self, adapter, command, args):
            recorder.calls.append(("general", "prepare", dict(args)))
            return {**args, "prepared_by": "general"}

        @hookimpl
        def snakepit_process_response(self, adapter, command, response):
            recorder.calls.append(("general", "process", response))
            return {"wrapped_by": "general"}

        @hookimpl
        def snakepit_request_started(self, adapter, command, request_id, worker_id, session_id):
            recorder.calls.append(("general", "started", {}))

    return General()


@pytest.fixture
def plugins():
    manager = get_plugin_manager()
    recorder = Recorder()
    manager.register(make_owner(recorder), name="toy-owner")
    manager.register(make_general(recorder), name="toy-general")
    yield recorder
    manager.unregister("toy-owner")
    manager.unregister("toy-general")


async def test_every_hook_called_with_its_arguments_owner_first(plugins):
    async with Pool("toy", pool_size=1) as pool:
        result = await pool.execute("echo", {"x": 1})
        pid = next(iter(pool.workers.values())).pid
    # prepare_args and process_response are firstresult: the owner's answer wins
    assert result == {"wrapped_by": "owner", "inner": {"x": 1, "prepared_by": "owner"}}
    assert plugins.names("validate") == ["owner", "general"]
    assert plugins.names("prepare") == ["owner"]
    assert plugins.names("process") == ["owner"]
    assert plugins.names("started") == ["owner", "general"]
    order = [name for _, name, _ in plugins.calls if name != "worker_started"]
    assert order[:5] == ["validate", "validate", "prepare", "timeout", "started"]
    assert order[-3:] == ["process", "finished", "worker_exited"]
    by_hook = {name: data for _, name, data in plugins.calls}
    assert by_hook["timeout"] == {"x": 1, "prepared_by": "owner"}
    assert by_hook["started"] == {}  # the general plugin's record comes last
    assert by_hook["finished"]["error"] is None and by_hook["finished"]["duration"] > 0
    assert by_hook["worker_started"]["pid"] == pid
    assert by_hook["worker_exited"] == {"pid": pid, "reason": "stopped", "exit_code": 0}


async def test_validation_error_from_a_plugin_reaches_the_caller(plugins):
    async with Pool("toy", pool_size=1) as pool:
        with pytest.raises(ValidationError, match="forbidden is not allowed"):
            await pool.execute("echo", {"forbidden": True})
        assert plugins.names("prepare") == []


async def test_an_adapter_plugin_is_not_asked_about_other_adapters(plugins):
    async with Pool("python", pool_size=1) as pool:
        await pool.execute("echo", {"x": 1})
    assert {plugin for plugin, _, _ in plugins.calls} == {"general"}


# -- pluggy calls the shaping hooks: wrappers, firstresult, tracing ----------------------------


async def test_a_wrapper_runs_around_prepare_args_and_changes_args_and_result(register):
    class Inner:
        @hookimpl
        def snakepit_prepare_args(self, adapter, command, args):
            return {**args, "inner_saw": sorted(args)}

    class Wrapper:
        @hookimpl(wrapper=True)
        def snakepit_prepare_args(self, adapter, command, args):
            args["before"] = "wrapper"
            prepared = yield
            return {**prepared, "after": "wrapper"}

    register(Inner(), "inner")
    register(Wrapper(), "wrapper")
    async with Pool("python", pool_size=1) as pool:
        result = await pool.execute("echo", {"x": 1})
    assert result["echoed"] == {
        "x": 1,
        "before": "wrapper",
        "inner_saw": ["before", "x"],
        "after": "wrapper",
    }


@pytest.mark.parametrize("hook", ["command_timeout", "process_response"])
def test_firstresult_stops_at_the_first_answer(register, hook):
    """pluggy calls the last registered plugin first; the first answer ends the call."""
    asked: list[str] = []

    def answering(name: str, answer: float | None) -> PluginWith:
        def implementation(adapter, command):
            asked.append(name)
            return answer

        return PluginWith(hook, implementation)

    for name, answer in [("silent", None), ("first", 1.5), ("second", 2.5), ("quiet", None)]:
        register(answering(name, answer), name)
    manager = get_plugin_manager()
    hooks = manager.hooks_for(manager.get_adapter("python"))
    if hook == "command_timeout":
        assert hooks.command_timeout("echo", {}) == 2.5
    else:
        assert hooks.process_response("echo", {}) == 2.5
    assert asked == ["quiet", "second"]


async def test_pluggy_tracing_shows_the_hook_calls(register):
    class Observer:
        @hookimpl
        def snakepit_request_finished(self, adapter, command, error):
            pass

    register(Observer(), "observer")
    pm = get_plugin_manager().pm
    lines: list[str] = []
    pm.trace.root.setwriter(lines.append)
    undo = pm.enable_tracing()
    try:
        async with Pool("python", pool_size=1) as pool:
            await pool.execute("ping", {})
    finally:
        undo()
        pm.trace.root.setwriter(None)
    trace = "".join(lines)
    for hook in ("snakepit_validate_command", "snakepit_request_finished"):
        assert f"{hook} [hook]" in trace
    assert re.search(r"command: '?ping'?\n", trace)  # the arguments, quoted or not by version


# -- a plugin that raises ----------------------------------------------------------------------

SHAPING_HOOKS = ["validate_command", "prepare_args", "process_response", "command_timeout"]


def raising(hook: str, exception: Exception) -> PluginWith:
    """A plugin whose ``hook`` raises ``exception`` for ``echo`` and answers nothing else."""

    def implementation(adapter, command):
        if command == "echo":
            raise exception

    return PluginWith(hook, implementation)


@pytest.mark.parametrize("hook", SHAPING_HOOKS)
async def test_a_raising_shaping_hook_fails_the_call_with_plugin_error(register, hook):
    register(raising(hook, RuntimeError("plugin bug")), "buggy")
    async with Pool("python", pool_size=1) as pool:
        worker = next(iter(pool.workers.values()))
        with pytest.raises(PluginError, match="plugin 'buggy' raised") as info:
            await pool.execute("echo", {"x": 1})
        error = info.value
        assert error.code == "plugin_error"
        assert (error.plugin, error.hook) == ("buggy", f"snakepit_{hook}")
        assert isinstance(error.__cause__, RuntimeError)
        assert pool.stats()["hook_errors"] == 1
        # nothing half-shaped was sent: only a response can be processed
        assert worker.completed == (1 if hook == "process_response" else 0)
        assert (await pool.execute("ping", {}))["status"] == "ok"
        assert pool.workers == {worker.id: worker}


def test_the_plugin_is_named_when_a_wrapper_reraises_and_when_the_wrapper_raises(register):
    class Buggy:
        @hookimpl
        def snakepit_prepare_args(self, adapter, command, args):
            raise KeyError("inner bug")

    class Wrapper:
        @hookimpl(wrapper=True)
        def snakepit_prepare_args(self, adapter, command, args):
            try:
                return (yield)
            except KeyError:
                if args.get("wrapper_fails"):
                    raise ValueError("wrapper bug") from None
                raise

    register(Buggy(), "buggy")
    register(Wrapper(), "wrapper")
    manager = get_plugin_manager()
    hooks = manager.hooks_for(manager.get_adapter("python"))
    with pytest.raises(PluginError) as info:
        hooks.prepare_args("echo", {})
    assert info.value.plugin == "buggy" and isinstance(info.value.__cause__, KeyError)
    with pytest.raises(PluginError) as info:
        hooks.prepare_args("echo", {"wrapper_fails": True})
    assert info.value.plugin == "wrapper" and isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("hook", SHAPING_HOOKS)
async def test_a_snakepit_error_from_a_shaping_hook_passes_unchanged(register, hook):
    refusal = ValidationError(f"{hook} refuses")
    register(raising(hook, refusal), "strict")
    async with Pool("python", pool_size=1) as pool:
        with pytest.raises(ValidationError) as info:
            await pool.execute("echo", {})
        assert info.value is refusal and info.value.__cause__ is None
        with pytest.raises(UnknownCommand):
            await pool.execute("no_such_command", {})
        assert pool.stats()["hook_errors"] == 0


async def test_a_raising_observer_is_logged_counted_and_hides_nothing(register, caplog):
    heard: list[str] = []

    class Listener:
        @hookimpl
        def snakepit_request_started(self, adapter, command):
            heard.append("started")

        @hookimpl
        def snakepit_request_finished(self, adapter, command, error):
            heard.append(f"finished error={error}")

    class Broken:
        @hookimpl
        def snakepit_request_started(self, adapter, command):
            raise KeyError("observer bug")

        @hookimpl
        def snakepit_request_finished(self, adapter, command, error):
            raise KeyError("another observer bug")

    register(Listener(), "listener")
    register(Broken(), "broken-observer")  # registered last: called first
    async with Pool("python", pool_size=1) as pool:
        result = await pool.execute("compute", {"operation": "add", "a": 2, "b": 2})
        assert result["result"] == 4
        assert pool.stats()["hook_errors"] == 2
    assert heard == ["started", "finished error=None"]
    assert "observer bug" in caplog.text and "broken-observer" in caplog.text


async def test_command_timeout_hook_applies_without_a_caller_timeout(register):
    class Quick:
        @hookimpl
        def snakepit_command_timeout(self, adapter, command, args):
            return 0.2 if command == "sleep" else None

    register(Quick(), "quick-timeouts")
    async with Pool("python", pool_size=1) as pool:
        with pytest.raises(WorkerTimeout, match="within 0.2s"):
            await pool.execute("sleep", {"seconds": 5})
        assert (await pool.execute("sleep", {"seconds": 0.01}, timeout=3))["slept"] == 0.01


async def test_command_error_is_not_a_hook_error():
    async with Pool("python", pool_size=1) as pool:
        with pytest.raises(CommandError):
            await pool.execute("compute", {"operation": "divide", "a": 1, "b": 0})
        assert pool.stats()["hook_errors"] == 0


def test_a_misspelled_hook_fails_loudly():
    class Typo:
        @hookimpl
        def snakepit_adaptors(self):
            return []

    with pytest.raises(pluggy.PluginValidationError, match="snakepit_adaptors"):
        get_plugin_manager().register(Typo(), name="typo")
    assert not get_plugin_manager().pm.has_plugin("typo")


# -- the hooks' documentation ------------------------------------------------------------------

HOOKSPECS = sorted(
    name for name, value in vars(hookspecs).items() if hasattr(value, "snakepit_spec")
)


@pytest.fixture(scope="module")
def documented_hooks() -> dict[str, str]:
    """``{hook: parameters}`` from the README's headings such as ``#### `hook(a, b)` ``."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n### Hooks\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^#### `(\w+)\(([^)]*)\)`$", section, flags=re.MULTILINE))


@pytest.mark.parametrize("hook", HOOKSPECS)
def test_every_hook_is_documented_with_its_signature(documented_hooks, hook):
    spec = getattr(hookspecs, hook)
    assert documented_hooks.get(hook) == ", ".join(inspect.signature(spec).parameters)
    assert spec.__doc__ and "Example::" in spec.__doc__, f"{hook} has no example"


def test_the_readme_documents_no_other_hooks(documented_hooks):
    assert sorted(documented_hooks) == HOOKSPECS


# -- discovery ---------------------------------------------------------------------------------


def fake_distribution(site: Path, name: str, entry_points: str, modules: dict[str, str]) -> Path:
    """An installed distribution ``name`` 0.1 in ``site``: its entry points and modules."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    return site


def broken_distribution(root: Path) -> Path:
    """A distribution whose adapter entry point fails to import."""
    return fake_distribution(
        root / "site",
        "snakepit-broken",
        "[snakepit.adapters]\nbroken = snakepit_broken_plugin\n",
        {
            "snakepit_broken_plugin": (
                "raise ImportError('snakepit_broken_plugin needs a module that is not installed')"
            )
        },
    )


def duplicate_distributions(root: Path) -> Path:
    """Two distributions that both provide an adapter called ``dup``."""
    site = root / "site"
    for letter in "ab":
        fake_distribution(
            site,
            f"snakepit-dup-{letter}",
            f"[snakepit.adapters]\ndup-{letter} = snakepit_dup_{letter}\n",
            {
                f"snakepit_dup_{letter}": """
                import sys
                from snakepit_core import ScriptAdapter, hookimpl

                @hookimpl
                def snakepit_adapters():
                    return [ScriptAdapter("dup", sys.executable, "bridge.py")]
                """
            },
        )
    return site


def test_a_plugin_that_fails_to_import_breaks_nothing_else(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(broken_distribution(tmp_path)))
    manager = PluginManager()
    adapters = manager.adapters()
    assert {"python", "node", "ruby"} <= set(adapters)
    assert [f.name for f in manager.failures] == ["broken"]
    assert "needs a module that is not installed" in manager.failures[0].error
    with pytest.raises(UnknownAdapter, match="failed to load"):
        manager.get_adapter("broken")


def test_two_plugins_providing_one_adapter_name_is_an_error_naming_both(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(duplicate_distributions(tmp_path)))
    manager = PluginManager()
    adapters = manager.adapters()
    assert "dup" not in adapters and {"python", "node", "ruby"} <= set(adapters)
    [failure] = manager.failures
    assert failure.name == "dup-a, dup-b"
    assert "snakepit-dup-a 0.1" in failure.error and "snakepit-dup-b 0.1" in failure.error
    with pytest.raises(
        PluginError, match="provided by plugin 'dup-a' .* and plugin 'dup-b'"
    ) as info:
        manager.get_adapter("dup")
    assert info.value.hook == "snakepit_adapters" and info.value.plugins == ["dup-a", "dup-b"]


def test_an_unhashable_plugin_is_refused_as_pluggy_requires(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="must be hashable"):
        get_plugin_manager().register(types.SimpleNamespace(), name="unhashable")
    site = fake_distribution(
        tmp_path / "site",
        "snakepit-unhashable",
        "[snakepit.plugins]\nunhashable = snakepit_unhashable:plugin\n",
        {"snakepit_unhashable": "import types\nplugin = types.SimpleNamespace()\n"},
    )
    monkeypatch.syspath_prepend(str(site))
    manager = PluginManager()
    assert {"python", "node", "ruby"} <= set(manager.adapters())
    assert [(f.name, f.error) for f in manager.failures] == [
        ("unhashable", "the plugin must be hashable, as pluggy requires")
    ]


@pytest.mark.parametrize(
    ("site", "reported"),
    [(broken_distribution, "broken"), (duplicate_distributions, "dup-a, dup-b")],
    ids=["broken", "duplicate"],
)
def test_snakepit_adapters_exits_1_and_shows_the_broken_plugin(tmp_path, site, reported):
    done = subprocess.run(
        [sys.executable, "-m", "snakepit_core.cli", "adapters"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(site(tmp_path)), "COLUMNS": "200"},
    )
    assert done.returncode == 1, done.stderr
    assert f"broken plugin {reported}" in done.stdout
    assert "python" in done.stdout and "node" in done.stdout


async def test_cross_cutting_plugin_group_is_loaded(tmp_path, monkeypatch):
    site = fake_distribution(
        tmp_path / "site",
        "snakepit-upper",
        "[snakepit.plugins]\nupper = snakepit_upper\n",
        {
            "snakepit_upper": """
            from snakepit_core import hookimpl

            @hookimpl
            def snakepit_process_response(adapter, command, response):
                if command == "echo":
                    return {"shouted": True, **response}
            """
        },
    )
    monkeypatch.syspath_prepend(str(site))
    manager = PluginManager()
    manager.load()
    assert manager.pm.has_plugin("upper")
    assert manager.distribution_of("upper") == ("snakepit-upper", "0.1")
