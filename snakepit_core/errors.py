"""The errors snakepit raises.

Every error carries a stable ``code`` so that callers (and other processes reading logs or
OpenTelemetry spans) can branch on the kind of failure without parsing messages. Messages name
the adapter, worker, command and cause wherever those are known.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SnakepitError(Exception):
    """Base class of every snakepit error; ``code`` is stable across releases.

    Facts about the failure are typed attributes (``err.worker_id``, ``err.exit_code``); each
    class declares the ones it may carry, ``None`` when unknown. ``context`` has those that are
    set, for logs, spans and pickling.
    """

    code: ClassVar[str] = "snakepit_error"
    _facts: ClassVar[tuple[str, ...]] = ("adapter", "worker_id", "command", "session_id")
    adapter: str | None = None
    worker_id: str | None = None
    command: str | None = None
    session_id: str | None = None

    def __init__(self, message: str, **facts: Any) -> None:
        super().__init__(message)
        self.message = message
        known = _facts_of(type(self))
        for name, value in facts.items():
            if name not in known:
                raise TypeError(
                    f"{type(self).__name__} carries no fact {name!r} (it has: "
                    f"{', '.join(sorted(known))})"
                )
            setattr(self, name, value)

    @property
    def context(self) -> dict[str, Any]:
        """The facts that are known: ``{"adapter": "mine", "exit_code": -9, ...}``."""
        return {
            name: getattr(self, name)
            for name in sorted(_facts_of(type(self)))
            if getattr(self, name) is not None
        }

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.context))


def _facts_of(cls: type[SnakepitError]) -> frozenset[str]:
    return frozenset(name for klass in cls.__mro__ for name in vars(klass).get("_facts", ()))


def _rebuild(cls: type[SnakepitError], message: str, context: dict[str, Any]) -> SnakepitError:
    return cls(message, **context)


class SnakepitTimeout(SnakepitError, TimeoutError):
    """Something did not happen in time (``WorkerTimeout``, ``QueueTimeout``).

    Also a ``TimeoutError``, so ``except TimeoutError`` (and ``asyncio.TimeoutError``) catch it.
    """

    code = "timeout"


class ValidationError(SnakepitError):
    """Arguments refused before they reach a worker; the message names the field and rule."""

    code = "validation_error"
    _facts = ("field", "rule")
    #: The argument or option at fault (``args.items[3].when``, ``timeout``).
    field: str | None = None
    #: The rule it broke (a JSON Schema keyword, ``json``).
    rule: str | None = None


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
    _facts = ("plugin", "hook", "plugins")
    plugin: str | None = None
    hook: str | None = None
    #: For an adapter name provided twice: both plugins and their distributions.
    plugins: list[str] | None = None


class UnknownAdapter(SnakepitError):
    """No installed adapter has this name; the message lists the installed ones."""

    code = "unknown_adapter"


class ConfigError(SnakepitError):
    """A configuration value makes no sense; the message names the key and its source."""

    code = "config_error"
    _facts = ("key", "source")
    key: str | None = None
    #: Where the value came from (``arguments``, ``SNAKEPIT_POOL_SIZE``, a file).
    source: str | None = None


class StartupError(SnakepitError):
    """No worker could be started (missing executable, bridge dying in its handshake...)."""

    code = "startup_failed"
    _facts = ("exit_code", "stderr_tail", "executable", "cause", "errno")
    exit_code: int | None = None
    stderr_tail: list[str] | None = None
    executable: str | None = None
    #: How the start failed: ``spawn``, ``exited``, ``timeout`` or ``handshake``.
    cause: str | None = None
    #: The OS error number when the process could not be spawned.
    errno: int | None = None


class PoolSaturated(SnakepitError):
    """Every worker is busy and the wait queue is full: refused at once (back-pressure)."""

    code = "pool_saturated"
    _facts = ("queued",)
    queued: int | None = None


class QueueTimeout(SnakepitTimeout):
    """The request waited ``pool_queue_timeout`` seconds for a worker and left the queue."""

    code = "queue_timeout"


class WorkerTimeout(SnakepitTimeout):
    """The worker did not answer in time; it was killed and is being replaced."""

    code = "worker_timeout"
    _facts = ("timeout",)
    timeout: float | None = None


class WorkerCrashed(SnakepitError):
    """The worker died while serving the request; carries exit code/signal and stderr tail."""

    code = "worker_crashed"
    _facts = ("exit_code", "stderr_tail")
    #: The exit code, or minus the signal number (-9: SIGKILL).
    exit_code: int | None = None
    stderr_tail: list[str] | None = None


class ProtocolError(SnakepitError):
    """A frame broke the wire protocol; the worker that sent it is replaced."""

    code = "protocol_error"
    _facts = ("cause",)
    #: What was wrong: ``invalid_json``, ``wrong_id``, ``oversized_frame``, ...
    cause: str | None = None


class CommandError(SnakepitError):
    """The worker ran the command and answered ``success: false``."""

    code = "command_error"
    _facts = ("error",)
    #: The worker's error message.
    error: str | None = None


class AdapterUnavailable(SnakepitError):
    """The adapter's workers keep dying early: the crash-loop breaker is open."""

    code = "adapter_unavailable"


class PoolStopped(SnakepitError):
    """The pool is stopping or stopped and takes no new requests."""

    code = "pool_stopped"
    _facts = ("owner_pid",)
    #: In a fork child: the pid of the process the pool belongs to.
    owner_pid: int | None = None


class SessionNotFound(SnakepitError):
    """No session with this id (it never existed, was deleted or expired)."""

    code = "session_not_found"


class SessionExists(SnakepitError):
    """A session with this id already exists."""

    code = "session_exists"


class SessionLost(SnakepitError):
    """The worker a strictly bound session lived on died; the next call rebinds."""

    code = "session_lost"


class SessionElsewhere(SnakepitError):
    """Strict affinity on the wrong node: the session's worker-side state lives in the pool
    of another host, whose heartbeat is live. ``node_id`` names that node, so that the
    caller's router can send the call there."""

    code = "session_elsewhere"
    _facts = ("node_id",)
    #: The node that holds the session.
    node_id: str | None = None


class AffinityBusy(SnakepitError):
    """Strict fail-fast affinity: the session's worker is busy right now."""

    code = "affinity_busy"


class CallbackDeadlock(SnakepitError):
    """A callback called the pool while every slot was held by a request waiting for a
    callback: no slot could ever free, so the call fails at once instead of timing out."""

    code = "callback_deadlock"


class SessionBackendUnavailable(SnakepitError):
    """The shared session backend (Redis) cannot be reached; plain ``execute`` still works,
    and sessions resume once it is back."""

    code = "session_backend_unavailable"
