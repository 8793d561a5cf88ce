"""The seed's README examples, run with the seed's exact arguments.

The seed is the Elixir library Snakepit v0.1.2 (README.md at the tag ``v0.1.2``, commit
5fe9cd3). Each test below names the README section it comes from, translates the example to
this library's Python API (``Snakepit.execute`` -> ``snakepit.execute``, maps -> dicts,
milliseconds -> seconds) and runs it on the runtime the seed ran it on: the default
``GenericPython`` adapter unless the section configures ``GenericJavaScript`` (node) or a Ruby
adapter. Where the README shows or describes a result, the test asserts it.

No equivalent here, so no test: the placeholder commands of "With timeout"
(``long_running_task``), "Session-Based Execution" (``initialize``, ``get_recommendations``,
``get_history``) and "Parallel Processing" (``process_item``), which no seed bridge implements
(the seed's own GenericPython refuses them); the Ruby bridge script (third-party code; the
bundled Ruby bridge stands in for it); BEAM introspection (``:erlang.trace``, ``:sys.trace``,
``:sys.get_state``, ``:ets.info``, ``ProcessRegistry.get_stats``); ``Logger.configure`` (plain
``logging`` here); Mix and Hex set-up.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import snakepit_core as snakepit
from snakepit_core import PoolConfig, ScriptAdapter, SnakepitError, SyncPool, hookimpl
from snakepit_core.errors import (
    CommandError,
    PoolSaturated,
    UnknownCommand,
    ValidationError,
    WorkerTimeout,
)
from snakepit_core.plugins import get_plugin_manager
from snakepit_core.schemas import shared_command_schemas
from snakepit_core.sync import get_pool

#: The keys the README's "Pool Statistics" shows ``Snakepit.get_stats()`` returning.
SEED_STATS = {
    "workers",
    "available",
    "busy",
    "requests",
    "queued",
    "errors",
    "queue_timeouts",
    "pool_saturated",
}


@pytest.fixture(scope="module")
def default_pool():
    """Quick Start: ``pooling_enabled``, ``Snakepit.Adapters.GenericPython``, ``pool_size: 4``,
    ``Application.ensure_all_started(:snakepit)``: the module-level default pool."""
    pool = snakepit.start(adapter="python", pool_size=4)
    yield pool
    snakepit.stop()


# -- Quick Start ------------------------------------------------------------------------------


# README "Quick Start": {:ok, result} = Snakepit.execute("ping", %{test: true})
def test_quick_start_ping_with_test_true(default_pool):
    result = snakepit.execute("ping", {"test": True})
    assert result["status"] == "ok" and result["runtime"] == "python"


# README "Quick Start": Snakepit.execute("compute", %{operation: "add", a: 5, b: 3}), and
# "Usage Examples > Basic Stateless Execution", which shows {:ok, %{"result" => 8}}.
def test_compute_add_gives_8(default_pool):
    result = snakepit.execute("compute", {"operation": "add", "a": 5, "b": 3})
    assert result["result"] == 8


# README "Quick Start": Snakepit.execute_in_session("user_123", "echo", %{message: "hello"})
# ("Session-based execution (maintains state)"; execute_in_session adds session_id to args).
def test_quick_start_echo_in_session(default_pool):
    result = snakepit.execute_in_session("user_123", "echo", {"message": "hello"})
    assert result == {"echoed": {"message": "hello", "session_id": "user_123"}}
    session = get_pool().sessions.get_session("user_123")
    assert session.last_worker_id in get_pool().pool.workers  # affinity for the next call


# -- Configuration ----------------------------------------------------------------------------


# README "Configuration > Basic Configuration": pool_config: %{pool_size: 8}, with the comment
# "Default: System.schedulers_online() * 2".
def test_basic_configuration():
    assert PoolConfig().pool_size == (os.cpu_count() or 1) * 2
    with SyncPool("python", config=PoolConfig(pool_size=8)) as pool:
        stats = pool.stats()
        assert stats["workers"] == 8 and stats["available"] == 8


# README "Configuration > Advanced Configuration": pool_size 16, adapter_module
# MyApp.CustomAdapter and the timeouts in milliseconds (here seconds), all the seed's defaults.
def test_advanced_configuration():
    from snakepit_python.plugin import BRIDGE_PATH

    config = PoolConfig(
        pool_size=16,
        pool_startup_timeout=10.0,  # 10_000 ms
        pool_queue_timeout=5.0,  # 5_000 ms
        worker_init_timeout=20.0,  # 20_000 ms
        worker_health_check_interval=30.0,  # 30_000 ms
        worker_shutdown_grace_period=2.0,  # 2_000 ms
        cleanup_retry_interval=0.1,  # 100 ms
        cleanup_max_retries=10,
        pool_max_queue_size=1000,
    )
    assert config == PoolConfig(pool_size=16), "the example's values are the defaults"
    custom = ScriptAdapter(
        "my_app_custom",
        sys.executable,
        BRIDGE_PATH,
        commands=shared_command_schemas().keys(),
        schemas=shared_command_schemas(),
    )
    with SyncPool(custom, config=config) as pool:
        assert pool.config == config and pool.stats()["workers"] == 16
        assert pool.execute("ping", {})["status"] == "ok"


# README "Configuration > Runtime Configuration": put_env(:adapter_module, GenericJavaScript),
# Application.stop(:snakepit), Application.start(:snakepit).
def test_runtime_configuration(default_pool):
    assert snakepit.execute("ping", {})["runtime"] == "python"
    try:
        snakepit.stop()
        snakepit.start(adapter="node", pool_size=4)
        assert snakepit.execute("ping", {})["runtime"] == "node"
    finally:  # back to the Quick Start's pool for the tests that follow
        snakepit.start(adapter="python", pool_size=4)
    assert snakepit.execute("ping", {})["runtime"] == "python"


# -- Usage Examples ---------------------------------------------------------------------------


# README "Usage Examples > Basic Stateless Execution", "Error handling":
#   case Snakepit.execute("risky_operation", %{}) do {:error, :worker_timeout} -> ...
#   {:error, :pool_saturated} -> ...; {:error, reason} -> handle_error(reason) end
# The seed's GenericPython refuses the command ("unsupported command 'risky_operation'"), so
# the last branch runs; here too, with an UnknownCommand that lists the supported commands.
def test_error_handling_branches(default_pool):
    try:
        snakepit.execute("risky_operation", {})
        branch, reason = "ok", None
    except WorkerTimeout as exc:
        branch, reason = "timeout", exc
    except PoolSaturated as exc:
        branch, reason = "overload", exc
    except SnakepitError as exc:
        branch, reason = "error", exc
    assert branch == "error" and isinstance(reason, UnknownCommand)
    assert "risky_operation" in str(reason) and "ping" in str(reason)


# README "Usage Examples > ML/AI Workflow Example": SessionHelpers.execute_program_command(
#   "ml_session_123", "create_program", %{signature: "question -> answer",
#   model: "gpt-3.5-turbo", temperature: 0.7}); program_id = response["program_id"]
def test_ml_workflow_create_program(default_pool):
    response = snakepit.execute_program_command(
        "ml_session_123",
        "create_program",
        {"signature": "question -> answer", "model": "gpt-3.5-turbo", "temperature": 0.7},
    )
    program_id = response["program_id"]
    assert isinstance(program_id, str) and program_id
    assert response["config"] == {"model": "gpt-3.5-turbo", "temperature": 0.7}
    stored = get_pool().sessions.get_program("ml_session_123", program_id)
    assert stored["signature"] == "question -> answer"


# README "Usage Examples > ML/AI Workflow Example": "Execute the program multiple times":
#   execute_program_command("ml_session_123", "execute_program",
#   %{program_id: program_id, input: %{question: "What is the capital of France?"}})
def test_ml_workflow_execute_program(default_pool):
    program_id = snakepit.execute_program_command(
        "ml_session_france",
        "create_program",
        {"signature": "question -> answer", "model": "gpt-3.5-turbo", "temperature": 0.7},
    )["program_id"]
    for count in (1, 2):
        result = snakepit.execute_program_command(
            "ml_session_france",
            "execute_program",
            {"program_id": program_id, "input": {"question": "What is the capital of France?"}},
        )
        assert result["program_id"] == program_id
        assert result["outputs"] == {"answer": "answer(question=What is the capital of France?)"}
        stored = get_pool().sessions.get_program("ml_session_france", program_id)
        assert stored["execution_count"] == count


# -- Built-in Adapters ------------------------------------------------------------------------


# README "Built-in Adapters > Python Adapter": "Available commands" ping, echo, compute, info.
def test_python_adapter_commands(default_pool):
    assert snakepit.execute("ping", {})["status"] == "ok"
    assert snakepit.execute("echo", {"message": "hello"}) == {"echoed": {"message": "hello"}}
    product = snakepit.execute("compute", {"operation": "multiply", "a": 10, "b": 5})
    assert product["result"] == 50
    info = snakepit.execute("info", {})
    assert info["runtime"] == "python"
    assert {"ping", "echo", "compute", "info"} <= set(info["commands"])


# README "Built-in Adapters > JavaScript/Node.js Adapter": "Additional commands" random and
# compute sqrt, after Application.put_env(:snakepit, :adapter_module, GenericJavaScript).
def test_javascript_adapter_commands():
    with SyncPool("node", pool_size=1) as pool:
        drawn = pool.execute("random", {"type": "uniform", "min": 0, "max": 100})
        assert drawn["type"] == "uniform" and 0 <= drawn["value"] <= 100
        root = pool.execute("compute", {"operation": "sqrt", "a": 16})
        assert root["result"] == 4


# -- Creating Custom Adapters -----------------------------------------------------------------


class MyAppRubyAdapter:
    """README "Creating Custom Adapters > Elixir Adapter Implementation": the callbacks that
    are behaviour (validate_command, prepare_args, process_response) as hooks for one adapter;
    the rest (executable_path, script_path, script_args, supported_commands, command_timeout)
    is the adapter's data below."""

    name = "my_app_ruby"

    @hookimpl
    def snakepit_validate_command(self, adapter: Any, command: str, args: dict) -> None:
        if adapter.name == self.name and command == "process_data" and "data" not in args:
            raise ValidationError("Missing required field: data")

    @hookimpl
    def snakepit_prepare_args(self, adapter: Any, command: str, args: dict) -> dict | None:
        if adapter.name == self.name and command == "process_data":
            data = args.get("data")
            return {**args, "data": data.strip() if isinstance(data, str) else ""}
        return None

    @hookimpl
    def snakepit_process_response(self, adapter: Any, command: str, response: Any) -> Any:
        if adapter.name == self.name and command == "generate_report":
            return {**response, "processed_at": datetime.now(UTC).isoformat()}
        return None


# README "Creating Custom Adapters": MyApp.RubyAdapter (ruby, the bridge, ["--mode",
# "pool-worker"], ping/process_data/generate_report, generate_report 120 s, else 30 s). The
# README makes no call with it; the arguments below are ours. The bridge is the bundled Ruby
# bridge, which implements the same three commands.
def test_custom_ruby_adapter():
    from snakepit_ruby.plugin import BRIDGE, ruby_adapter

    adapter = ruby_adapter(
        MyAppRubyAdapter.name,
        BRIDGE,
        args=["--mode", "pool-worker"],
        commands=["ping", "process_data", "generate_report"],
        timeouts={"generate_report": 120.0},
        default_timeout=30.0,
    )
    assert Path(adapter.script).exists() and adapter.resolve_executable()
    assert (adapter.timeout_for("generate_report"), adapter.timeout_for("ping")) == (120, 30)
    manager = get_plugin_manager()
    registered = manager.register(MyAppRubyAdapter(), name="my-app-ruby-adapter")
    try:
        with SyncPool(adapter, pool_size=1) as pool:
            assert pool.execute("ping", {})["status"] == "ok"
            processed = pool.execute("process_data", {"data": "  hello  "})
            assert (processed["processed"], processed["length"]) == ("HELLO", 5)
            with pytest.raises(ValidationError, match="Missing required field: data"):
                pool.execute("process_data", {})
            with pytest.raises(UnknownCommand, match="compute"):
                pool.execute("compute", {"operation": "add", "a": 1, "b": 2})
            report = pool.execute("generate_report", {"title": "Report", "data": {"q": 3}})
            assert report["title"] == "Report" and report["data"] == {"q": 3}
            assert datetime.fromisoformat(report["processed_at"]).tzinfo is not None
    finally:
        manager.unregister(registered)


# -- Session Management -----------------------------------------------------------------------


# README "Session Management > Session Store API", call by call on the pool's SessionStore.
def test_session_store_api(default_pool):
    store = get_pool().sessions
    session = store.create_session("session_123", ttl=7200)
    assert session.id == "session_123" and session.ttl == 7200
    store.store_program("session_123", "prog_1", {"model": "gpt-4", "temperature": 0.8})
    assert store.get_session("session_123").id == "session_123"
    assert store.get_program("session_123", "prog_1") == {"model": "gpt-4", "temperature": 0.8}

    def touch(session):
        session.metadata["last_activity"] = datetime.now(UTC)

    updated = store.update_session("session_123", touch)
    assert isinstance(updated.metadata["last_activity"], datetime)
    assert store.session_exists("session_123") is True
    assert "session_123" in store.list_sessions()
    store.delete_session("session_123")
    assert store.session_exists("session_123") is False
    stats = store.get_stats()
    assert stats["sessions_created"] >= 1 and stats["sessions_deleted"] >= 1


# README "Session Management > Global Program Storage".
def test_global_program_storage(default_pool):
    store = get_pool().sessions
    template = {"type": "qa_template", "prompt": "Answer the following question: {question}"}
    store.store_global_program("template_1", template)
    assert store.get_global_program("template_1") == template


# -- Monitoring & Telemetry -------------------------------------------------------------------


class MyAppMetrics:
    """README "Monitoring & Telemetry > Setting Up Monitoring": the handler of
    [:snakepit, :worker, :request] (duration, result) and [:snakepit, :worker, :initialized]
    (initialization_time, worker_id), as the telemetry hooks."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, float, str]] = []
        self.initialized: list[tuple[str, float]] = []
        self.slow: list[float] = []

    @hookimpl
    def snakepit_request_finished(self, command: str, duration: float, error: Any) -> None:
        if duration > 5.0:  # "Log slow requests": measurements.duration > 5000 (ms)
            self.slow.append(duration)
        self.requests.append((command, duration, "ok" if error is None else "error"))

    @hookimpl
    def snakepit_worker_started(self, worker_id: str, startup_time: float) -> None:
        self.initialized.append((worker_id, startup_time))


# README "Monitoring & Telemetry > Available Events" and "Setting Up Monitoring".
def test_telemetry_events():
    metrics = MyAppMetrics()
    manager = get_plugin_manager()
    registered = manager.register(metrics, name="my-app-metrics")
    try:
        with SyncPool("python", pool_size=2) as pool:
            pool.execute("ping", {})
            with pytest.raises(CommandError):
                pool.execute("compute", {"operation": "divide", "a": 1, "b": 0})
            workers = set(pool.pool.workers)
    finally:
        manager.unregister(registered)
    assert [(c, r) for c, _, r in metrics.requests] == [("ping", "ok"), ("compute", "error")]
    assert all(0 <= d < 5 for _, d, _ in metrics.requests) and not metrics.slow
    assert {worker_id for worker_id, _ in metrics.initialized} == workers
    assert all(0 < seconds < 20 for _, seconds in metrics.initialized)


# README "Monitoring & Telemetry > Pool Statistics": stats = Snakepit.get_stats() returns
# workers, available, busy, requests, queued, errors, queue_timeouts, pool_saturated.
def test_pool_statistics(default_pool):
    snakepit.execute("ping", {})
    stats = snakepit.stats()
    assert set(stats) >= SEED_STATS
    assert all(isinstance(stats[key], int) and stats[key] >= 0 for key in SEED_STATS)
    assert stats["workers"] == 4 and stats["available"] + stats["busy"] == 4
    assert stats["requests"] >= 1


# -- Troubleshooting --------------------------------------------------------------------------


# README "Troubleshooting > Workers Not Starting": adapter.executable_path() "should return
# valid path"; File.exists?(adapter.script_path()) "should return true".
def test_workers_not_starting_checks(default_pool):
    adapter = get_pool().adapter
    assert os.access(adapter.resolve_executable(), os.X_OK)
    assert adapter.script is not None and Path(adapter.script).exists()


# README "Troubleshooting > Memory Leaks": "Force cleanup":
# Snakepit.Bridge.SessionStore.cleanup_expired_sessions()
def test_force_cleanup_of_expired_sessions(default_pool):
    store = get_pool().sessions
    store.create_session("left_behind", ttl=0.01)
    time.sleep(0.05)  # expired: its TTL has passed five times over on the monotonic clock
    assert store.cleanup_expired_sessions() >= 1
    assert store.session_exists("left_behind") is False
