"""Hook specifications of snakepit (pluggy project ``snakepit``).

Adapter plugins (entry-point group ``snakepit.adapters``) contribute adapters through
:func:`snakepit_adapters`, and their other hooks are called for their own adapters' requests
only. General plugins (group ``snakepit.plugins``, or registered in-process with
``get_plugin_manager().register``) are called for every adapter: one answers for the adapters
it cares about (compare ``adapter.name``) and returns ``None`` otherwise.

Every hook is called through pluggy with keyword arguments, so ``firstresult``,
``@hookimpl(wrapper=True)``, ``tryfirst``/``trylast`` and ``enable_tracing()`` work. An
adapter's own plugin is asked before the general plugins, which pluggy orders as usual: the
last registered first.

The shaping hooks (``validate_command``, ``prepare_args``, ``process_response``,
``command_timeout``) are one pluggy call per request. A ``SnakepitError`` they raise (such as
``ValidationError``) reaches the caller unchanged; any other exception reaches it as
``PluginError`` naming the plugin and the hook, and the request goes no further.

The observer hooks (``request_*``, ``worker_*``) are called one plugin at a time: a plugin that
raises is logged and counted (``stats()["hook_errors"]``), the other plugins still hear of the
event and the request is not affected. A wrapper there wraps its own plugin's implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .adapter import Adapter
    from .callbacks import Callback

PROJECT_NAME = "snakepit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -------------------------------------------------------------------------
# Adapters
# -------------------------------------------------------------------------


@hookspec
def snakepit_adapters() -> list[Adapter]:  # type: ignore[empty-body]
    """Return the adapters this plugin provides.

    Called for each plugin when snakepit first looks an adapter up, and again after a plugin is
    registered or unregistered, so return the same adapters every time. An adapter name belongs
    to one plugin: if two provide it, neither gets it, ``snakepit adapters`` reports both and
    using the name raises ``PluginError``. A plugin whose implementation raises is reported the
    same way and provides nothing.

    Example::

        @hookimpl
        def snakepit_adapters():
            return [ScriptAdapter("mine", "python3", HERE / "bridge.py")]
    """


@hookspec
def snakepit_callbacks(adapter: Adapter) -> list[Callback] | None:
    """Return the host functions that workers of ``adapter`` may call, or ``None``.

    Called when a pool of ``adapter`` starts; each :class:`~snakepit_core.Callback` is
    registered on it as with ``pool.register_callback`` (workers call them with
    ``ctx.call(name, args)``, docs/PROTOCOL.md, *Callbacks*). A name given twice, by two plugins
    or by a plugin and ``register_callback``, is an error naming both.

    Example::

        @hookimpl
        def snakepit_callbacks(adapter):
            if adapter.name == "agents":
                return [Callback("lookup", lambda args, ctx: DB[args["key"]])]
    """


# -------------------------------------------------------------------------
# Requests
# -------------------------------------------------------------------------


@hookspec
def snakepit_validate_command(adapter: Adapter, command: str, args: dict[str, Any]) -> None:
    """Check ``args`` of ``command`` before it is sent to a worker of ``adapter``.

    Implementations run in turn until one raises. One that objects raises
    :class:`~snakepit_core.errors.ValidationError` (or
    :class:`~snakepit_core.errors.UnknownCommand`), which reaches the caller unchanged; any
    other exception reaches it as ``PluginError``. Either way nothing is sent. The core's own
    implementation (plugin ``snakepit.core``, registered first and so called last) checks the
    command against ``adapter.commands`` and ``args`` against the command's JSON Schema.

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

    Called after validation; for a call in a session, ``args`` includes ``session_id``.
    ``firstresult``: the first non-``None`` answer wins and the rest are not asked (the
    adapter's own plugin is asked first). A wrapper receives that answer, ``None`` if there
    was none, and may return something else.

    Example::

        @hookimpl
        def snakepit_prepare_args(adapter, command, args):
            if adapter.name == "mine" and command == "shout":
                return {**args, "text": args["text"].strip()}
    """


@hookspec(firstresult=True)
def snakepit_process_response(adapter: Adapter, command: str, response: Any) -> Any | None:
    """Return a replacement for the worker's ``result``, or ``None`` to keep it.

    Called after a success only (not for a ``CommandError``, a timeout or a crash).
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
    """Return the execution timeout (seconds) for this call, or ``None`` for the adapter's.

    Called only when the caller passed no ``timeout=``, after :func:`snakepit_prepare_args`,
    with the arguments as prepared. ``firstresult``: the first non-``None`` answer wins.

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
    """A request was sent to worker ``worker_id`` (after any queueing) as ``request_id``.

    Not called for a request that was never sent (refused by validation or a ``PluginError``,
    saturation, queue timeout); :func:`snakepit_request_finished` is.

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
    """A request ended: successfully (``error is None``) or with ``error``, the exception its
    caller gets. Called for every request, refused or not.

    ``worker_id`` is ``None`` and ``request_id`` 0 if it never got a worker (refused by
    validation or a ``PluginError``, saturation, queue timeout). ``duration`` runs from the call
    to the end and ``queue_wait`` is the part spent waiting for a worker, both in seconds.

    Example::

        @hookimpl
        def snakepit_request_finished(adapter, command, duration, error, **_):
            histogram.observe(duration, tags={"command": command, "ok": error is None})
    """


@hookspec
def snakepit_worker_started(
    adapter: Adapter, worker_id: str, pid: int, startup_time: float
) -> None:
    """A worker finished its handshake and entered service, at start-up or as a replacement;
    ``startup_time`` runs from spawn to ready, in seconds.

    Example::

        @hookimpl
        def snakepit_worker_started(adapter, worker_id, pid, startup_time):
            log.info("worker %s (pid %d) ready in %.3fs", worker_id, pid, startup_time)
    """


@hookspec
def snakepit_worker_exited(
    adapter: Adapter, worker_id: str, pid: int, exit_code: int | None, reason: str
) -> None:
    """A worker that was in service ended (one that failed to start was never started).

    ``exit_code`` is negative for a signal (as in subprocess), ``None`` if unknown. ``reason``
    is ``stopped`` (the pool stopped it), ``recycled`` (retired after its requests or memory
    limit), ``crashed`` (it died on its own), ``killed`` (it held on to a timed-out or cancelled
    request), ``unhealthy`` (it missed health checks) or ``protocol_error`` (it broke the wire
    protocol).

    Example::

        @hookimpl
        def snakepit_worker_exited(adapter, worker_id, pid, exit_code, reason):
            if reason == "crashed":
                alert(f"{adapter.name} worker {worker_id} died with {exit_code}")
    """
