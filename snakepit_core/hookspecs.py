"""Hook specifications of snakepit (pluggy project ``snakepit``).

Adapter plugins (entry-point group ``snakepit.adapters``) contribute adapters through
:func:`snakepit_adapters` and may shape requests to their own adapters; cross-cutting plugins
(group ``snakepit.plugins``) implement the same hooks for every adapter. A plugin answers only
for the adapters it cares about (compare ``adapter.name``) and returns ``None`` otherwise.

All hooks are called with keyword arguments. The plugin that provides an adapter is consulted
before general plugins for ``firstresult`` hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .adapter import Adapter

PROJECT_NAME = "snakepit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -------------------------------------------------------------------------
# Adapters
# -------------------------------------------------------------------------


@hookspec
def snakepit_adapters() -> list[Adapter]:  # type: ignore[empty-body]
    """Return the adapters this plugin provides.

    Called once, when snakepit first looks an adapter up. Each plugin returns a list (possibly
    empty); the results of all plugins are merged and an adapter name may appear only once.

    Example::

        @hookimpl
        def snakepit_adapters():
            return [ScriptAdapter("mine", "python3", HERE / "bridge.py")]
    """


# -------------------------------------------------------------------------
# Requests
# -------------------------------------------------------------------------


@hookspec
def snakepit_validate_command(adapter: Adapter, command: str, args: dict[str, Any]) -> None:
    """Check ``args`` of ``command`` before it is sent to a worker of ``adapter``.

    Every implementation runs; one that objects raises
    :class:`snakepit_core.ValidationError` (or :class:`~snakepit_core.UnknownCommand`), which
    reaches the caller unchanged. The core's own implementation checks the command against
    ``adapter.commands`` and ``args`` against the command's JSON Schema.

    Example::

        @hookimpl
        def snakepit_validate_command(adapter, command, args):
            if adapter.name == "mine" and command == "shout" and not args.get("text"):
                raise ValidationError("shout: 'text' must not be empty")
    """


@hookspec(firstresult=True)
def snakepit_prepare_args(
    adapter: Adapter, command: str, args: dict[str, Any]
) -> dict[str, Any] | None:
    """Return the arguments to send instead of ``args``, or ``None`` to leave them alone.

    ``firstresult``: the first non-``None`` answer wins; the adapter's own plugin is asked
    first. Runs after validation.

    Example::

        @hookimpl
        def snakepit_prepare_args(adapter, command, args):
            if adapter.name == "mine" and command == "shout":
                return {**args, "text": args["text"].strip()}
    """


@hookspec(firstresult=True)
def snakepit_process_response(adapter: Adapter, command: str, response: Any) -> Any | None:
    """Return a replacement for the worker's ``result``, or ``None`` to keep it.

    ``firstresult``: the first non-``None`` answer wins; the adapter's own plugin is asked
    first.

    Example::

        @hookimpl
        def snakepit_process_response(adapter, command, response):
            if adapter.name == "mine" and command == "shout":
                return {**response, "text": response["text"].upper()}
    """


@hookspec(firstresult=True)
def snakepit_command_timeout(adapter: Adapter, command: str, args: dict[str, Any]) -> float | None:
    """Return the execution timeout (seconds) for this call, or ``None`` for the default.

    Consulted only when the caller passed no ``timeout=``. ``firstresult``.

    Example::

        @hookimpl
        def snakepit_command_timeout(adapter, command, args):
            if command == "train":
                return 600.0
    """


# -------------------------------------------------------------------------
# Telemetry
# -------------------------------------------------------------------------


@hookspec
def snakepit_request_started(
    adapter: Adapter, command: str, request_id: int, worker_id: str, session_id: str | None
) -> None:
    """A request was handed to worker ``worker_id`` (after any queueing).

    Example::

        @hookimpl
        def snakepit_request_started(adapter, command, request_id, worker_id, session_id):
            statsd.increment(f"snakepit.{adapter.name}.{command}.started")
    """


@hookspec
def snakepit_request_finished(
    adapter: Adapter,
    command: str,
    request_id: int,
    worker_id: str | None,
    session_id: str | None,
    duration: float,
    queue_wait: float,
    error: BaseException | None,
) -> None:
    """A request ended, successfully (``error is None``) or not. Durations in seconds.

    Example::

        @hookimpl
        def snakepit_request_finished(adapter, command, duration, error, **_):
            histogram.observe(duration, tags={"command": command, "ok": error is None})
    """


@hookspec
def snakepit_worker_started(
    adapter: Adapter, worker_id: str, pid: int, startup_time: float
) -> None:
    """A worker finished its handshake and is ready (``startup_time`` in seconds).

    Example::

        @hookimpl
        def snakepit_worker_started(adapter, worker_id, pid, startup_time):
            log.info("worker %s (pid %d) ready in %.3fs", worker_id, pid, startup_time)
    """


@hookspec
def snakepit_worker_exited(
    adapter: Adapter, worker_id: str, pid: int, exit_code: int | None, reason: str
) -> None:
    """A worker's process ended. ``exit_code`` is negative for a signal (as in subprocess);
    ``reason`` is one of ``stopped``, ``crashed``, ``killed``, ``recycled``, ``startup_failed``.

    Example::

        @hookimpl
        def snakepit_worker_exited(adapter, worker_id, pid, exit_code, reason):
            if reason == "crashed":
                alert(f"{adapter.name} worker {worker_id} died with {exit_code}")
    """
