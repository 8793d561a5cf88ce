"""The errors snakepit raises.

Every error carries a stable ``code`` so that callers (and other processes reading logs or
OpenTelemetry spans) can branch on the kind of failure without parsing messages. Messages name
the adapter, worker, command and cause wherever those are known.
"""

from __future__ import annotations

from typing import Any


class SnakepitError(Exception):
    """Base class of every snakepit error; ``code`` is stable across releases."""

    code: str = "snakepit_error"

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        #: Structured facts about the failure (adapter, worker_id, command, exit_code, ...).
        self.context: dict[str, Any] = context

    def __getattr__(self, name: str) -> Any:
        # Lets callers write ``err.exit_code`` or ``err.stderr_tail`` for context facts.
        context = self.__dict__.get("context", {})
        if name in context:
            return context[name]
        raise AttributeError(name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.context))


def _rebuild(cls: type[SnakepitError], message: str, context: dict[str, Any]) -> SnakepitError:
    return cls(message, **context)


class ValidationError(SnakepitError):
    """Arguments refused before they reach a worker; the message names the field and rule."""

    code = "validation_error"


class UnknownCommand(ValidationError):
    """The adapter declares its commands and this is not one of them."""

    code = "unknown_command"


class PluginError(SnakepitError):
    """A plugin broke: a hook raised while shaping a request (the original exception is the
    ``__cause__``), or two plugins provide the same adapter name.

    ``hook`` names the hook and ``plugin`` the plugin: ``None`` when no implementation is on
    the traceback (pluggy itself refused a wrapper that yielded twice), and for an adapter name
    provided twice, where ``plugins`` names both.
    """

    code = "plugin_error"
    plugin: str | None
    hook: str

    def __init__(self, message: str, *, plugin: str | None, hook: str, **context: Any) -> None:
        super().__init__(message, plugin=plugin, hook=hook, **context)


class UnknownAdapter(SnakepitError):
    """No installed adapter has this name; the message lists the installed ones."""

    code = "unknown_adapter"


class ConfigError(SnakepitError):
    """A configuration value makes no sense; the message names the key and its source."""

    code = "config_error"


class StartupError(SnakepitError):
    """No worker could be started (missing executable, bridge dying in its handshake...)."""

    code = "startup_failed"


class PoolSaturated(SnakepitError):
    """Every worker is busy and the wait queue is full: refused at once (back-pressure)."""

    code = "pool_saturated"


class QueueTimeout(SnakepitError):
    """The request waited ``pool_queue_timeout`` seconds for a worker and left the queue."""

    code = "queue_timeout"


class WorkerTimeout(SnakepitError):
    """The worker did not answer in time; it was killed and is being replaced."""

    code = "worker_timeout"


class WorkerCrashed(SnakepitError):
    """The worker died while serving the request; carries exit code/signal and stderr tail."""

    code = "worker_crashed"


class ProtocolError(SnakepitError):
    """A frame broke the wire protocol; the worker that sent it is replaced."""

    code = "protocol_error"


class CommandError(SnakepitError):
    """The worker ran the command and answered ``success: false``."""

    code = "command_error"


class AdapterUnavailable(SnakepitError):
    """The adapter's workers keep dying early: the crash-loop breaker is open."""

    code = "adapter_unavailable"


class PoolStopped(SnakepitError):
    """The pool is stopping or stopped and takes no new requests."""

    code = "pool_stopped"


class SessionNotFound(SnakepitError):
    """No session with this id (it never existed, was deleted or expired)."""

    code = "session_not_found"


class SessionExists(SnakepitError):
    """A session with this id already exists."""

    code = "session_exists"


class SessionLost(SnakepitError):
    """The worker a strictly bound session lived on died; the next call rebinds."""

    code = "session_lost"


class AffinityBusy(SnakepitError):
    """Strict fail-fast affinity: the session's worker is busy right now."""

    code = "affinity_busy"
