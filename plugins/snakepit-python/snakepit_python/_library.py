"""The bridge library: everything a Python worker needs except its handlers.

It implements docs/PROTOCOL.md: length-prefixed JSON frames on private copies of stdin/stdout,
the ``ping`` handshake (protocol 1, and protocol 2 when the pool asks for it), ``$cancel``,
deadlines, error mapping and stdout protection. Workers import this module at start-up, so it
uses only cheap standard-library modules; ``asyncio`` is imported on the first async handler
call, ``threading`` only by a concurrent worker and ``inspect``/``traceback`` only on rare paths.

One request at a time (protocol 1, or ``max_in_flight`` 1) shapes the serving loop for speed: it
reads on the main thread with blocking ``os.read``, looks the handler up in a dict, calls sync
handlers inline and answers with one ``os.write``. Cancellation costs nothing while idle: only
while a cancellable handler runs is the input fd switched to non-blocking + ``O_ASYNC``, so a
``SIGIO`` handler can read a ``$cancel`` and raise into the handler (or cancel the async task).

With ``max_in_flight`` N > 1 (protocol 2) :class:`_ConcurrentServer` takes over after the
handshake: the main thread keeps reading and dispatching every frame of a read, runs the quick
handlers (``ping`` among them) inline and writes their replies with one write once the read is
served; sync handlers run on up to ``min(N, 32)`` daemon threads, async handlers as tasks on an
event loop in a thread of its own. Each thread writes the replies it made without blocking; a
writer thread writes what the output does not take at once.

Generator and async generator handlers stream (docs/PROTOCOL.md, *Streaming*): asked for a
stream (``meta.stream.window`` W), each item goes out as an item frame, and the generator is
not resumed while W items are unacknowledged (``$credit`` acknowledges them), so the producer
is never more than W items ahead of the consumer. Sync generators run where sync handlers run;
async generators on the loop, where the items of one burst (those produced until the generator
waits) leave with one write. One request at a time, the reading thread is the main thread:
while a stream waits for credit, it reads the frames that bring it (see :meth:`_Worker.
_await_credit`). Called without ``meta.stream``, a generator answers the list of its items.

Binary values (docs/PROTOCOL.md, *Binary values*; inline, capability ``binary`` at protocol 2): a
frame whose body starts with ``0x00`` is decoded with a read-only ``memoryview`` of the frame's
own bytes at each place its ``$binary`` list names (no copy), and anything in it that does not
add up is an undecodable frame. A result or item holding ``bytes``, ``bytearray``,
``memoryview`` or any object exporting a contiguous buffer, however deep, goes out as a binary
frame. Finding them costs plain results nothing: the encoder's ``default`` hook, which only
sees what JSON cannot write, stops the encoding at the first buffer (:class:`_HasBinary`), and
only then does a walk copy the containers on the way to each one and list its path. Large
values are written from where they are (``writev``), not copied into the frame, when nothing
can change them before they are written: immutable ones (``bytes``, the request's own values)
always, others only where the frame is written before the handler runs again (one request at a
time, a result or a sync generator's item); anywhere else they are copied into the frame.

Text attachments and shared memory (docs/PROTOCOL.md, *Text attachments*, *Shared memory*,
*Limits*; capabilities ``text`` at protocol 2, and ``shm`` when ``SNAKEPIT_SHM_DIR`` is set).
What handlers get and give: a request's text entry reaches the handler as an ordinary ``str``
(decoded from the frame, or straight from its segment's mapping, which is not kept); a binary
value from a segment is a read-only ``memoryview`` of an ``mmap`` of that file (zero-copy:
``numpy.frombuffer(view, dtype)`` works on it), valid for as long as the handler keeps it,
also after the pool has deleted the file (copy it, ``bytes(view)``, only to keep it small:
a view keeps its whole mapping alive, as an inline one keeps its frame). Handlers return
values as before: with ``SNAKEPIT_TEXT_THRESHOLD`` set, every string of a result or item at
least that many code points long goes out as a text attachment (a string with lone
surrogates, which has no UTF-8, stays in the JSON), and every value (binary, or a text
attachment's UTF-8) of at least ``SNAKEPIT_SHM_THRESHOLD`` bytes goes into a new segment
``<SNAKEPIT_SHM_PREFIX><n>`` (created exclusively, mode 0600, its size reserved with
``posix_fallocate``, written with ``os.write``, never mapped), or inline if the segment cannot
be made or filled (a full ``/dev/shm``). Finding long strings costs little: the C encoder
(made once, for results as for items) writes every string through a hook that compares its
length first (some 60 ns a string), and the walk that takes values out of a result runs only
once the hook (or a buffer) has stopped the encoding, so a long string is never escaped.
A response whose envelope and values add up beyond ``SNAKEPIT_MAX_PAYLOAD_BYTES`` (1 GiB by
default) is answered with a failure before any segment is made.

Callbacks (docs/PROTOCOL.md, *Callbacks*; capability ``callbacks`` at protocol 2): a handler
calls a function of the host with ``ctx.call_sync(name, args)`` (sync) or ``await
ctx.call(name, args)`` (async). The call goes out as ``{"id", "call", "name", "args"}`` (a
binary frame when ``args`` holds binary values or long strings, lanes included, as a result
does), into one table of pending calls keyed by its ``call`` number, and the ``$callback``
frame with that number settles it: its ``result``, or :class:`CallbackError` with its ``code``
and ``error``; one for a call not pending is ignored. Who reads the answer: one request at a
time, sync handlers still run inline on the main thread (the hot path pays nothing), and
``call_sync`` turns SIGIO off and reads the input itself, as a stream waiting for credit does
(``$cancel`` and ``$credit`` act at once, other requests wait); an async handler's call is
settled by the SIGIO handler, which takes ``$callback`` frames out of the input as it takes
``$cancel`` ones (the whole of a large one) and wakes the loop. Only the handler's thread may
call then. At concurrency > 1 the reading thread settles calls: a handler thread waits on a
lock, a task on a future, and a quick handler on the reading thread reads until its answer
comes. ``call_sync`` on the bridge's event loop raises ``RuntimeError`` (it would deadlock).
A ``$cancel`` fails the request's pending calls with code ``cancelled``, and any call it makes
afterwards at once (an async handler's ``CancelledError`` at the ``await`` becomes that error,
the task's cancellation withdrawn); a handler that lets it propagate is answered
``cancelled``. Calls a request leaves pending when it ends fail the same way: nobody answers
them.
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import itertools
import json
import os
import signal
import stat
import sys
import time
import warnings
from types import AsyncGeneratorType, CoroutineType, GeneratorType

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    import contextvars
    import select
    from collections.abc import AsyncGenerator, Callable, Coroutine, Generator, Iterable
    from types import FrameType
    from typing import Any, NoReturn, TypeAlias, TypeVar, overload

    Handler = Callable[..., Any]
    H = TypeVar("H", bound=Handler)
    #: What a handler may return besides its result: the coroutine of a sync wrapper around
    #: an async function, or a generator to drive.
    Producer = Coroutine[Any, Any, Any] | Generator[Any, Any, Any] | AsyncGenerator[Any, Any]
    AsyncProducer = Coroutine[Any, Any, Any] | AsyncGenerator[Any, Any]
    #: Sends one item of a stream (or collects it).
    Send = Callable[[Any], None]
    #: A frame to write: its bytes, or its pieces (see :class:`_Parts`).
    Frame: TypeAlias = "bytes | _Parts"
    #: Values found in a result or item: each one's path, its bytes, and whether it is text.
    Found = list[tuple[list[Any], memoryview, bool]]
else:

    def overload(func):  # typing.overload without typing's ~5 ms import at worker start-up
        return func


__all__ = ["CallbackError", "CommandError", "Context", "command", "run", "status"]

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
CANCEL_COMMAND = "$cancel"
CREDIT_COMMAND = "$credit"
CALLBACK_COMMAND = "$callback"
#: The frames of the protocol itself, never answered.
_CONTROL_COMMANDS = frozenset({CANCEL_COMMAND, CREDIT_COMMAND, CALLBACK_COMMAND})
CAPABILITIES = ("cancel",)
#: What a protocol-2 handshake answers (docs/PROTOCOL.md, *Protocol 2*), and what it adds when
#: the pool offers shared memory (``SNAKEPIT_SHM_DIR``).
PROTOCOL_2_CAPABILITIES = ("cancel", "deadline", "stream", "binary", "text", "callbacks")
SHM_CAPABILITY = "shm"
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024 * 1024
MAX_CONCURRENCY = 4096
RUNTIME = "python"
EXIT_PROTOCOL_FAULT = 3
EXIT_BAD_START = 2

_READ_SIZE = 65536
#: While a handler runs, stop reading ahead once this much input is buffered (the pool sends
#: nothing but ``$cancel`` then; the rest can wait in the pipe for the serving loop).
_SCAN_LIMIT = 1024 * 1024
_CO_VARARGS = 0x04
_CO_COROUTINE = 0x80
_CO_ASYNC_GENERATOR = 0x200
_ASYNC_FLAGS = _CO_COROUTINE | _CO_ASYNC_GENERATOR
#: An async generator that never waits gives the loop a turn after this many items, so its
#: items leave in writes of a bounded size and other tasks (and a ``$cancel``) get their turn.
_ITEMS_PER_TURN = 1024
#: The credit of a generator called without ``meta.stream``: its items are collected.
_UNLIMITED = sys.maxsize
# Linux: direct SIGIO at one thread (F_SETOWN_EX, F_OWNER_TID); the main thread's id is the pid.
_F_SETOWN_EX = 15
_F_OWNER_TID = 0
#: Sync handlers of a concurrent worker run on at most this many threads (fewer if N is less);
#: more requests wait in a queue, where a ``$cancel`` can still drop them.
_MAX_HANDLER_THREADS = 32
#: Linux: ``os.pwritev`` with this flag writes only what the output takes at once, so a
#: concurrent worker's reading thread can write replies itself and never block on a pool that
#: is not reading (0 where it does not exist: the writer thread writes every reply).
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
#: The first byte of a binary frame's body (no JSON text starts with it), the envelope key that
#: lists its values, and the bytes before its envelope (the mark and the envelope's length).
BINARY_MARK = b"\x00"
BINARY_KEY = "$binary"
_BINARY_PREFIX = 1 + 4
#: Binary values this large are written from where they are, when they can be, not copied
#: into their frame.
_DIRECT_BYTES = 16 * 1024
#: At most this many buffers per ``writev`` (Linux's ``IOV_MAX``).
_IOV_MAX = 1024
#: A threshold that is never reached: the lane it guards is off.
_NEVER = sys.maxsize
_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
#: How a request segment is opened (non-blocking: a FIFO put there must not hang the worker)
#: and how a response segment is created (docs/PROTOCOL.md, *Shared memory*).
_OPEN_SEGMENT = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC
_NEW_SEGMENT = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC


class CommandError(Exception):
    """An expected failure: the message is sent as ``"<command>: <message>"``, nothing is logged.

    Any other exception is answered the same way, with its traceback logged to stderr.
    """


class CallbackError(Exception):
    """A callback call that failed (docs/PROTOCOL.md, *Callbacks*): ``code`` says why, as the
    host's answer does (``callback_failed``, ``unknown_callback``, ``invalid_arguments``,
    ``timeout``, ``cancelled``, ...), and the message is the answer's ``error``.

    ``code`` is ``cancelled`` when the calling request was cancelled (or had ended) before the
    answer came: a handler that lets it propagate is answered ``cancelled``.
    """

    def __init__(self, message: str, code: str = "callback_failed") -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.code)


class _Cancelled(BaseException):
    """Raised into a sync handler whose request was cancelled.

    A ``BaseException`` so that a handler's ``except Exception`` does not swallow it.
    """


class _StreamError(Exception):
    """The input stream cannot be trusted any more (PROTOCOL.md: exit with status 3)."""


class _OutputLost(Exception):
    """A concurrent worker's writer cannot write replies any more: stop reading requests."""


class _Refused(Exception):
    """A request that is answered with a failure before any handler runs (a bad envelope)."""

    def __init__(self, request_id: int, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.message = message


class _HasBinary(Exception):
    """Raised by the encoder's ``default`` hook at protocol 2: the value holds a binary value,
    so it goes out as a binary frame (:meth:`_Worker._binary_answer`)."""


class _Parts(list["bytes | memoryview"]):
    """A frame in pieces, written with one ``writev``: ``bytes`` and flat byte views of large
    binary values, written from where they are instead of being copied into the frame."""


class _FrameBuffer(bytearray):
    """A frame read into a buffer of its own (:meth:`_Worker._read_rest`); nothing changes it
    once read, so views of it are as immutable as ``bytes``."""


#: What a view's bytes may belong to for the view to be written later, from another thread:
#: nothing can change them meanwhile (a ``bytes`` object, a frame of the input, and once one
#: has been mapped, a request segment: see :func:`_map_segment`).
_IMMUTABLE: set[type] = {bytes, _FrameBuffer}


class Context:
    """What a handler may want to know about its request besides ``args``.

    ``deadline`` is the caller's time budget left *now*, in seconds (it may go negative), or
    ``None`` without one; it is counted from when the bridge received the request, on the
    monotonic clock, because the pool sends ``deadline_ms`` as the budget left at sending time.
    """

    __slots__ = (
        "_bridge", "_expires", "deadline_ms", "request_id", "traceparent", "tracestate",
        "worker_id",
    )  # fmt: skip
    _FIELDS = ("request_id", "worker_id", "traceparent", "tracestate", "deadline_ms", "deadline")

    def __init__(
        self,
        request_id: int,
        worker_id: str,
        traceparent: str | None = None,
        tracestate: str | None = None,
        deadline_ms: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.worker_id = worker_id
        self.traceparent = traceparent
        self.tracestate = tracestate
        self.deadline_ms = deadline_ms
        self._expires: float | None = None
        if isinstance(deadline_ms, (int, float)) and not isinstance(deadline_ms, bool):
            self._expires = time.monotonic() + deadline_ms / 1000  # a string is no deadline
        #: What sends this request's callback calls: the serving worker at protocol 2.
        self._bridge: Any = None

    @property
    def deadline(self) -> float | None:
        """Seconds left of the caller's budget, or ``None`` if the request has no deadline."""
        expires = self._expires
        return None if expires is None else expires - time.monotonic()

    def call_sync(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Call the host's callback ``name`` with ``args`` (a dict, binary values included) and
        wait for its result, in a sync handler (docs/PROTOCOL.md, *Callbacks*).

        Raises :class:`CallbackError` if the call fails (its ``code`` says why: ``cancelled``
        at once if the request was cancelled, ``unsupported`` at protocol 1, where the pool
        cannot answer); ``TypeError`` if ``args`` cannot be sent. Any
        thread that runs a sync handler may call it; one request at a time (``max_in_flight``
        1) only the handler's own thread, which reads the answer itself. On the bridge's event
        loop it raises ``RuntimeError``: waiting there would deadlock (use ``await ctx.call``
        in an async handler).
        """
        bridge = self._bridge
        if bridge is None:
            raise CallbackError(_NO_CALLBACKS, "unsupported")
        return bridge.call_sync(self.request_id, name, _call_args(name, args))

    async def call(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Call the host's callback ``name`` with ``args`` and return its result, in an async
        handler: :meth:`call_sync`'s twin. Several calls may be in flight at once
        (``asyncio.gather``); a ``$cancel`` of the request makes a pending one raise
        :class:`CallbackError` with code ``cancelled`` where the task's cancellation would
        have raised ``CancelledError``.
        """
        bridge = self._bridge
        if bridge is None:
            raise CallbackError(_NO_CALLBACKS, "unsupported")
        return await bridge.call(self.request_id, name, _call_args(name, args))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"Context({fields})"


_NO_CALLBACKS = (
    "callbacks need a worker serving a protocol-2 pool (capability 'callbacks'); this context "
    "has none (protocol 1, or a Context made outside run())"
)
_ON_LOOP = (
    "ctx.call_sync() on the bridge's event loop thread would deadlock (the loop must read the "
    "answer): use 'await ctx.call(...)' in an async handler"
)


def _call_args(name: object, args: object) -> dict[str, Any]:
    """A callback call's arguments, checked before anything is sent."""
    if type(name) is not str or not name:
        raise TypeError(f"callback name must be a non-empty string, not {name!r}")
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise TypeError(f"callback {name!r}: args must be a dict, not {type(args).__name__}")
    return args


# -------------------------------------------------------------------------
# Registration
# -------------------------------------------------------------------------

#: name -> (handler, wants_ctx, is_async, cancellable); a tuple so the hot path unpacks it.
_COMMANDS: dict[str, tuple[Handler, bool, bool, bool]] = {}
_RESERVED = frozenset({"ping", CANCEL_COMMAND})
#: Registrations refused so far; :func:`run` reports them and exits with status 2, the same
#: start-up failure every bundled bridge gives (docs/PROTOCOL.md, *One bridge contract*).
_REFUSED: list[str] = []


@overload
def command(name: H, /) -> H: ...


@overload
def command(  # noqa: F811 - ruff does not see the overload shim as typing.overload
    name: str | None = None, /, *, cancellable: bool = True
) -> Callable[[H], H]: ...


def command(  # noqa: F811
    name: str | Handler | None = None, /, *, cancellable: bool = True
) -> Any:
    """Register a handler as a command: ``@command``, ``@command("name")`` or
    ``@command(cancellable=False)``. Returns the function unchanged.

    A handler takes ``(args)`` or ``(args, ctx)`` and may be ``async``. A generator or async
    generator function streams its items (``yield``; a sync generator's ``return`` value, unless
    ``None``, is the last item); called with ``execute``, it answers their list.

    Binary values of a request reach the handler as read-only ``memoryview`` objects (views of
    the request's frame: copy what you keep, ``bytes(view)``); its result and items may hold
    ``bytes``, ``bytearray``, ``memoryview`` or any object exporting a contiguous buffer (a
    numpy array) anywhere, sent as binary values to a protocol-2 pool.

    ``cancellable=False`` marks a sync handler that always finishes quickly: one request at a
    time, it skips the two ``fcntl`` calls per request that make ``$cancel`` able to interrupt
    it; in a concurrent worker it runs on the reading thread, in arrival order, without a hop
    to a handler thread (a generator it returns goes on to a handler thread).

    A name registered twice, a name starting with ``$``, ``ping`` or a function that cannot
    take ``(args)`` is not raised here but makes :func:`run` exit with status 2 before it
    reads a request, with a message naming the command, as every bundled bridge does.
    """
    if callable(name):
        _register(name.__name__, name, cancellable)
        return name

    def decorate(func: H) -> H:
        _register(name if name is not None else func.__name__, func, cancellable)
        return func

    return decorate


def _register(name: str, func: Handler, cancellable: bool) -> None:
    problem = _registration_problem(name)
    if problem is None:
        try:
            wants_ctx, is_async = _describe(func)
        except (TypeError, ValueError) as exc:  # ValueError: inspect found no signature
            problem = f"command {name!r}: {exc}"
        else:
            _COMMANDS[name] = (func, wants_ctx, is_async, cancellable)
            return
    _REFUSED.append(problem)


def _registration_problem(name: object) -> str | None:
    """Why ``name`` cannot be registered, or ``None`` if it can."""
    if not isinstance(name, str) or not name:
        return f"command name {name!r} is invalid (a non-empty string is required)"
    if name.startswith("$"):
        return f"command {name!r} is invalid: names starting with '$' belong to the protocol"
    if name in _RESERVED:
        return f"command {name!r} is provided by the library"
    if name in _COMMANDS:
        return f"command {name!r} is registered twice"
    return None


def _describe(func: Handler) -> tuple[bool, bool]:
    """``(wants_ctx, is_async)`` read from the code object, to keep ``inspect`` out of start-up.

    ``is_async`` says the handler runs on the event loop: an ``async def`` coroutine or async
    generator function."""
    code = getattr(getattr(func, "__func__", func), "__code__", None)
    if code is None:  # functools.partial, callable objects, builtins
        return _describe_with_inspect(func)
    positional = code.co_argcount - (1 if hasattr(func, "__self__") else 0)
    takes_varargs = bool(code.co_flags & _CO_VARARGS)
    if positional < 1 and not takes_varargs:
        raise TypeError(f"handler {func!r} must accept (args) or (args, ctx)")
    return positional >= 2 or takes_varargs, bool(code.co_flags & _ASYNC_FLAGS)


def _describe_with_inspect(func: Handler) -> tuple[bool, bool]:
    import inspect

    kinds = [param.kind for param in inspect.signature(func).parameters.values()]
    positional = sum(kind <= inspect.Parameter.POSITIONAL_OR_KEYWORD for kind in kinds)
    takes_varargs = inspect.Parameter.VAR_POSITIONAL in kinds
    if positional < 1 and not takes_varargs:
        raise TypeError(f"handler {func!r} must accept (args) or (args, ctx)")
    call = getattr(func, "__call__", None)  # noqa: B004 - the callable object's own method
    is_async = any(
        inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in (func, call)
    )
    return positional >= 2 or takes_varargs, is_async


# -------------------------------------------------------------------------
# Start-up
# -------------------------------------------------------------------------


def _log(message: str) -> None:
    sys.stderr.write(f"snakepit-python[{os.getpid()}]: {message}\n")
    sys.stderr.flush()


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


class _BadStart(Exception):
    """The worker cannot start as configured (exit status 2, before reading a frame)."""


def _max_frame_bytes() -> int:
    """The frame limit from ``SNAKEPIT_MAX_FRAME_BYTES`` (unset or empty: the default).

    A value that is not a positive integer is refused rather than ignored: the pool and the
    worker would otherwise disagree about which frames are too large.
    """
    raw = os.environ.get("SNAKEPIT_MAX_FRAME_BYTES", "")
    if not raw:
        return DEFAULT_MAX_FRAME_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise _BadStart(f"SNAKEPIT_MAX_FRAME_BYTES={raw!r} is not a positive integer")
    return value


class _Lanes:
    """How values travel besides inline, as the pool's environment says (docs/PROTOCOL.md,
    *Text attachments*, *Shared memory*, *Limits*).

    ``text_threshold`` is ``None`` without ``SNAKEPIT_TEXT_THRESHOLD`` (no string goes out as
    text); ``shm_dir`` is ``None`` unless the pool offered shared memory; response segments are
    made only with a prefix and a threshold too (``shm_threshold`` is ``None`` otherwise).
    """

    __slots__ = ("max_payload", "shm_dir", "shm_prefix", "shm_threshold", "text_threshold")

    def __init__(
        self,
        max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES,
        text_threshold: int | None = None,
        shm_dir: str | None = None,
        shm_prefix: str = "",
        shm_threshold: int | None = None,
    ) -> None:
        self.max_payload = max_payload
        self.text_threshold = text_threshold
        self.shm_dir = shm_dir
        self.shm_prefix = shm_prefix
        self.shm_threshold = shm_threshold if shm_dir and shm_prefix else None


def _lanes() -> _Lanes:
    """The lanes from the environment; ``_BadStart`` for a value that is not what the pool
    gives (a number that is no integer, a prefix that is no file name)."""
    prefix = os.environ.get("SNAKEPIT_SHM_PREFIX", "")
    if "/" in prefix or prefix in (".", ".."):
        raise _BadStart(f"SNAKEPIT_SHM_PREFIX={prefix!r} cannot begin a file name")
    return _Lanes(
        _integer_setting("SNAKEPIT_MAX_PAYLOAD_BYTES", 1) or DEFAULT_MAX_PAYLOAD_BYTES,
        _integer_setting("SNAKEPIT_TEXT_THRESHOLD", 0),
        os.environ.get("SNAKEPIT_SHM_DIR") or None,
        prefix,
        _integer_setting("SNAKEPIT_SHM_THRESHOLD", 0),
    )


def _integer_setting(name: str, minimum: int) -> int | None:
    """An integer from the environment (unset or empty: ``None``); ``_BadStart`` if it is not
    one of at least ``minimum``."""
    raw = os.environ.get(name, "")
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise _BadStart(f"{name}={raw!r} is not an integer >= {minimum}")
    return value


def _check_registrations() -> None:
    if _REFUSED:
        raise _BadStart("; ".join(_REFUSED))


def _protect_stdio() -> tuple[int, int]:
    """Move the protocol channels to private fds; return ``(input_fd, output_fd)``.

    fd 1 becomes stderr and fd 0 /dev/null, so ``print()``, ``os.write(1, ...)`` and child
    processes write to stderr and cannot read request bytes. ``os.dup`` gives non-inheritable
    fds, so children do not hold the protocol pipes open either.
    """
    input_fd, output_fd = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.close(null_fd)
    if sys.stdout is not None:
        sys.stdout.flush()  # output printed before run() now goes to stderr
    sys.stdout = sys.stderr
    return input_fd, output_fd


class _JSONText(str):
    """A result that is already JSON text (``ping``'s answer): it goes into the envelope as is."""


_json_string = json.encoder.encode_basestring_ascii  # how the encoder writes a string
_CAPABILITIES_JSON = json.dumps(list(CAPABILITIES))


def _item_encoder(encoder: json.JSONEncoder, long: int = _NEVER) -> Callable[[Any], str]:
    """What ``encoder.encode`` does, several times faster per value: its C encoder made once,
    not per call. Without the check for circular references (its state would be shared by
    threads): a cycle fails as a ``RecursionError``, as a too deeply nested value does.

    With ``long`` (the text threshold), a string of at least ``long`` code points stops the
    encoding with ``_HasBinary`` (it may go out as a text attachment): the C encoder hands each
    string, dict keys too, to a hook that compares its length before escaping it."""
    make = json.encoder.c_make_encoder  # type: ignore[attr-defined]
    if make is None:  # the pure-Python json: the length of the text tells instead
        if long == _NEVER:
            return encoder.encode

        def encode_checked(value: Any) -> str:
            text = encoder.encode(value)
            if len(text) >= long:
                raise _HasBinary
            return text

        return encode_checked
    string = _json_string if long == _NEVER else _long_string_hook(long)
    chunks = make(None, encoder.default, string, None, ": ", ", ", False, False, False)
    return lambda value: "".join(chunks(value, 0))


def _long_string_hook(long: int) -> Callable[[str], str]:
    """How the encoder writes a string, unless it is at least ``long`` code points long."""

    def string(text: str, len: Any = len, long: int = long, escape: Any = _json_string) -> str:
        if len(text) >= long:  # locals, not globals: this runs for every string
            raise _HasBinary
        return escape(text)  # type: ignore[no-any-return]

    return string


def _frame(body: bytes | bytearray) -> bytes:
    return len(body).to_bytes(4, "big") + body


def _write_all(fd: int, data: Frame) -> None:
    try:
        written = os.write(fd, data)  # type: ignore[arg-type]
    except TypeError:  # a frame in pieces (checked only here: plain frames pay nothing)
        if type(data) is not _Parts:
            raise
        return _writev_all(fd, data)
    if written < len(data):
        view = memoryview(data)[written:]  # type: ignore[arg-type]
        while view:
            view = view[os.write(fd, view) :]


def _writev_all(fd: int, parts: list[bytes | memoryview]) -> None:
    while parts:
        parts = _rest(parts, os.writev(fd, parts[:_IOV_MAX]))


def _rest(parts: list[bytes | memoryview], written: int) -> _Parts:
    """What of ``parts`` (bytes and flat byte views) is left once ``written`` bytes went out."""
    for index, part in enumerate(parts):
        size = len(part)
        if written < size:
            rest = _Parts(parts[index:])
            if written:
                rest[0] = memoryview(part)[written:]
            return rest
        written -= size
    return _Parts()


def _joined(frames: list[Frame]) -> Frame:
    """Frames to write together as one buffer, or as pieces if a frame among them is."""
    if len(frames) == 1:
        return frames[0]
    try:
        return b"".join(frames)  # type: ignore[arg-type]  # a frame in pieces raises
    except TypeError:  # a frame in pieces is no buffer
        return _flat(frames)


def _flat(frames: list[Frame]) -> _Parts:
    """The pieces of ``frames`` in order, each run of small ones joined into one."""
    parts = _Parts()
    run: list[bytes | memoryview] = []
    for frame in frames:
        if isinstance(frame, bytes):
            run.append(frame)
            continue
        for piece in frame:
            if type(piece) is memoryview:
                if run:
                    parts.append(b"".join(run))
                    run = []
                parts.append(piece)
            else:
                run.append(piece)
    if run:
        parts.append(b"".join(run))
    return parts


def _size(data: Frame) -> int:
    if isinstance(data, bytes):
        return len(data)
    return sum(len(piece) for piece in data)


def _concat(first: Frame, second: Frame) -> Frame:
    """Two frames as one, to write together."""
    if type(first) is bytes and type(second) is bytes:
        return first + second
    return _flat([first, second])


# -------------------------------------------------------------------------
# Binary values (PROTOCOL.md, *Binary values*)
# -------------------------------------------------------------------------


def _binary_default(value: Any) -> NoReturn:
    """The ``default`` hook of a protocol-2 encoder: any object exporting a buffer is a binary
    value (the encoding stops, to go on as a binary frame); anything else is refused as the
    standard encoder refuses it."""
    try:
        memoryview(value)
    except TypeError:
        name = type(value).__name__
        raise TypeError(f"Object of type {name} is not JSON serializable") from None
    raise _HasBinary


#: Values the walk of :func:`_detached` does not look into; with text attachments on, strings
#: are looked at too.
_LEAVES = frozenset({str, int, float, bool, type(None)})
_SCALARS = frozenset({int, float, bool, type(None)})


def _detached(
    value: Any, path: list[Any], found: Found, around: set[int], long: int = _NEVER
) -> Any:
    """``value`` with ``None`` in the place of each binary value in it, and of each string of
    at least ``long`` code points that has a UTF-8 form (a text attachment), those values
    appended to ``found`` with their paths (``path`` is ``value``'s; keys as the encoder writes
    them).

    The walk goes where the JSON encoder goes (dicts, lists and tuples), and copies only the
    containers on the way to a value taken out: the handler's own objects are left as they
    were. ``around`` holds the containers being walked: one met again is a cycle, refused as
    the encoder refuses it. A buffer that is not contiguous has no run of bytes to send.
    """
    if isinstance(value, (dict, list, tuple)):
        return _detached_container(value, path, found, around, long)
    if isinstance(value, str):
        if len(value) < long:
            return value
        try:
            data = str.encode(value)  # its text, whatever a subclass's encode says
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8, so it stays in the JSON
            return value
        found.append((path.copy(), memoryview(data), True))
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        view = memoryview(value)
    except TypeError:
        return value  # not binary: the encoder says why it cannot be sent
    if not view.c_contiguous:
        raise ValueError(
            f"the value at {_shown(path)} is a buffer that is not contiguous "
            "(copy it first, e.g. with numpy.ascontiguousarray)"
        )
    found.append((path.copy(), view, False))
    return None


def _detached_container(
    value: dict[Any, Any] | list[Any] | tuple[Any, ...],
    path: list[Any],
    found: Found,
    around: set[int],
    long: int,
) -> Any:
    """:func:`_detached` of a dict, list or tuple: its children walked, a copy made (a dict
    or a list, as the encoder writes it) only if one of them changed."""
    ident = id(value)
    if ident in around:
        raise ValueError("Circular reference detected")
    around.add(ident)
    is_dict = isinstance(value, dict)
    entries: Iterable[tuple[Any, Any]] = (
        value.items() if isinstance(value, dict) else enumerate(value)
    )
    copy: Any = None
    leaves = _LEAVES if long == _NEVER else _SCALARS
    for key, child in entries:
        if type(child) in leaves:
            continue
        path.append(key if not is_dict or type(key) is str else _json_key(key))
        out = _detached(child, path, found, around, long)
        path.pop()
        if out is not child:
            if copy is None:
                copy = dict(value) if is_dict else list(value)
            copy[key] = out
    around.discard(ident)
    return value if copy is None else copy


def _json_key(key: object) -> str:
    """A dict key as the JSON encoder writes it (its path step is that string)."""
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return int.__repr__(key)
    if isinstance(key, float):
        return float.__repr__(key)
    if isinstance(key, str):
        return str.__str__(key)  # its text, whatever a subclass's __str__ says
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _direct(view: memoryview, keep: bool) -> memoryview | None:
    """A binary value's bytes as a flat view to write from where they are, or ``None`` to copy
    them into the frame: a small value, one whose bytes may change before the frame is written
    (unless ``keep``: it is written before the handler runs again), one in an unusual format."""
    if view.nbytes < _DIRECT_BYTES or not (keep or type(view.obj) in _IMMUTABLE):
        return None
    if view.ndim == 1 and view.format == "B":
        return view
    try:
        return view.cast("B")
    except (TypeError, ValueError):  # a format that is not a native single character
        return None


def _place(message: dict[str, Any], path: list[Any], value: memoryview | str) -> None:
    """Put a binary (or text) value where its ``path`` leads; that place must hold ``null``."""
    container: Any = message
    for key in path[:-1]:
        container = _step(container, key, path)
    last = path[-1]
    if _step(container, last, path) is not None:
        raise _StreamError(f"binary value's path {_shown(path)} does not lead to null")
    container[last] = value


def _step(container: Any, key: Any, path: list[Any]) -> Any:
    if type(container) is dict and type(key) is str and key in container:
        return container[key]
    if type(container) is list and type(key) is int and 0 <= key < len(container):
        return container[key]
    raise _StreamError(f"binary value's path {_shown(path)} leads nowhere")


def _binary_entry(entry: object, shared: bool) -> tuple[list[Any], int, str | None, bool]:
    """The path, size, segment name (``None``: inline) and text flag of a ``$binary`` entry;
    ``_StreamError`` unless it is well formed (a segment only where shared memory was
    offered, ``shared``, and named by a file name of the segment directory)."""
    if type(entry) is not dict:
        raise _StreamError(f"'$binary' entry {_shown(entry)} is not an object")
    path, size = entry.get("path"), entry.get("size")
    if type(path) is not list or not path or type(size) is not int or size < 0:
        raise _StreamError(
            f"'$binary' entry needs a non-empty 'path' and a 'size' >= 0: {_shown(entry)}"
        )
    text = entry.get("text", False)
    if type(text) is not bool:
        raise _StreamError(f"'$binary' entry's 'text' is not a boolean: {_shown(entry)}")
    segment = entry.get("shm")
    if segment is None:
        return path, size, None, text
    if not shared:
        raise _StreamError(
            "'$binary' entry names a shared-memory segment, which this worker did not offer"
        )
    if type(segment) is not str or not segment or segment in (".", "..") or "/" in segment:
        raise _StreamError(
            f"'$binary' entry's 'shm' is not a file name in the segment directory: {_shown(entry)}"
        )
    return path, size, segment, text


def _text_of(data: memoryview, path: list[Any]) -> str:
    """A text entry's string; ``_StreamError`` if its bytes are not UTF-8."""
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise _StreamError(f"text value at {_shown(path)} is not valid UTF-8 ({exc})") from None


# -------------------------------------------------------------------------
# Shared-memory segments (PROTOCOL.md, *Shared memory*)
# -------------------------------------------------------------------------

#: ``mmap.mmap``'s subclass for request segments, made on the first one (``mmap`` stays out
#: of start-up); the keyword arguments of every mapping.
_Segment: Any = None
_MAP_OPTIONS: dict[str, Any] = {}


def _segment_class() -> Any:
    """The type of request segments' mappings: nothing writes to them (the pool does not
    change a segment during its request), so a view of one is as immutable as ``bytes``."""
    global _Segment
    if _Segment is None:
        import mmap

        class _RequestSegment(mmap.mmap):
            """A request segment mapped read-only (no copy of its bytes)."""

        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # no fault per page
        _MAP_OPTIONS.update(flags=flags, prot=mmap.PROT_READ)
        if sys.version_info >= (3, 13):
            _MAP_OPTIONS["trackfd"] = False  # the mapping needs no descriptor of its own
        _IMMUTABLE.add(_RequestSegment)
        _Segment = _RequestSegment
    return _Segment


def _map_segment(
    directory: str, name: str, size: int, text: bool, path: list[Any]
) -> memoryview | str:
    """A request segment's first ``size`` bytes: a read-only view of its mapping, or with
    ``text`` the string they are (decoded from the mapping, which is then dropped).

    The file is opened read-only with ``O_NOFOLLOW`` (a symlink is refused) and must be a
    regular file of at least ``size`` bytes; anything else is a ``_StreamError``. The
    descriptor is closed at once: the mapping stays valid after the pool deletes the file and
    is unmapped only when nothing refers to it any more (never closed under a handler's view).
    """
    cls = _segment_class()
    try:
        fd = os.open(os.path.join(directory, name), _OPEN_SEGMENT)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise _StreamError(f"shared-memory segment {name!r} cannot be opened ({exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _StreamError(f"shared-memory segment {name!r} is not a regular file")
        if info.st_size < size:
            raise _StreamError(
                f"shared-memory segment {name!r} has {info.st_size} bytes, "
                f"fewer than its size of {size}"
            )
        if size == 0:  # nothing to map (mmap refuses a length of 0)
            return "" if text else memoryview(b"")
        mapping = cls(fd, size, **_MAP_OPTIONS)
    except OSError as exc:
        raise _StreamError(f"shared-memory segment {name!r} cannot be mapped ({exc})") from None
    finally:
        os.close(fd)
    if not text:
        return memoryview(mapping)
    try:
        with memoryview(mapping) as view:
            return _text_of(view, path)
    finally:
        mapping.close()


def _write_segment(path: str, data: memoryview) -> bool:
    """Create the response segment ``path`` holding ``data`` (flat bytes): ``O_CREAT|O_EXCL|
    O_NOFOLLOW``, mode 0600, its size reserved first (``posix_fallocate``, so a full tmpfs
    says ``ENOSPC`` here rather than a write coming up short), written with ``os.write``
    (never mapped: a full tmpfs would raise SIGBUS), closed. False, leaving nothing behind,
    if any of it fails: the value then goes inline."""
    try:
        fd = os.open(path, _NEW_SEGMENT, 0o600)
    except OSError:  # ENOSPC, EMFILE, EEXIST, ...: nothing was made
        return False
    try:
        try:
            size = len(data)
            if size and _FALLOCATE is not None:
                _FALLOCATE(fd, 0, size)
            written = 0
            while written < size:
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)
    except BaseException as exc:  # a full disk, or SIGTERM's SystemExit on the way out
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(exc, OSError):
            return False
        raise
    return True


_FALLOCATE: Callable[[int, int, int], None] | None = getattr(os, "posix_fallocate", None)


def _flat_bytes(view: memoryview) -> memoryview:
    """A contiguous buffer's bytes as a flat view (a copy only for a format ``cast`` refuses)."""
    if view.ndim == 1 and view.format == "B":
        return view
    try:
        return view.cast("B")
    except (TypeError, ValueError):
        return memoryview(view.tobytes())


class _OverLimit(Exception):
    """A response or item too large for the frame or payload limit."""

    def __init__(self, size: int, kind: str, limit: int) -> None:
        super().__init__(f"{size} bytes exceeds the {kind} limit of {limit} bytes")


def _shown(value: object) -> str:
    """A value of a frame, or a path, as JSON, for a message (cut short)."""
    return json.dumps(value)[:300]


def _request_id(request: dict[str, Any]) -> int:
    """A request's id; without an integer one it cannot be answered: the stream is broken."""
    request_id = request.get("id")
    if type(request_id) is not int:
        raise _unanswerable(request)
    return request_id


def _unanswerable(request: dict[str, Any]) -> _StreamError:
    return _StreamError(f"request without an integer 'id': {str(request)[:200]}")


def _stream_window(request_id: int, name: str, spec: object) -> int:
    """``meta.stream.window`` of a stream request; ``_Refused`` unless an integer >= 1."""
    window = spec.get("window") if type(spec) is dict else None
    if type(window) is not int or window < 1:
        raise _Refused(request_id, f"{name}: meta.stream.window must be an integer >= 1")
    return window


# -------------------------------------------------------------------------
# Streams: driving a generator, the same in both servers
# -------------------------------------------------------------------------

#: What a handler returns when it streams.
_GENERATORS = (GeneratorType, AsyncGeneratorType)
#: What a sync handler returns when it is not done: a sync wrapper's coroutine or a generator.
_PRODUCERS = (CoroutineType, GeneratorType, AsyncGeneratorType)


class _Stream:
    """The producer's side of one generator handler's run: its credit and its cancel.

    ``granted - sent`` is the credit: the items it may send before ``$credit`` grants more
    (:data:`_UNLIMITED` when its items are collected for ``execute``). Each counter has one
    writer thread, so a handler thread can read the credit without the server's lock: a stale
    ``granted`` only makes it look for credit under the lock. ``waiter`` is the future an
    async generator's driver awaits credit on (loop thread only).
    """

    __slots__ = ("cancelled", "granted", "sent", "waiter")

    def __init__(self, window: int) -> None:
        self.granted = window
        self.sent = 0
        self.cancelled = False
        self.waiter: asyncio.Future[None] | None = None


#: What a burst returns when its stream has no credit left (never a generator's own value).
_NEEDS_CREDIT = object()


def _sync_burst(
    gen: Generator[Any, Any, Any],
    stream: _Stream,
    step: Callable[[Generator[Any, Any, Any]], Any],
    send: Send,
) -> Any:
    """Take a generator's items with ``step`` (``next``, or a cancellable ``next``) while the
    stream has credit, handing each to ``send``: the generator's return value once it is done,
    else :data:`_NEEDS_CREDIT`. It is never resumed without credit, nor once cancelled (then
    ``_Cancelled``; an item made while the cancel came is dropped); the caller closes it when
    this raises."""
    while not stream.cancelled:
        if stream.sent >= stream.granted:
            return _NEEDS_CREDIT
        try:
            item = step(gen)
        except StopIteration as stop:
            return stop.value
        if stream.cancelled:
            break
        stream.sent += 1
        send(item)
    raise _Cancelled


async def _async_burst(agen: AsyncGenerator[Any, Any], stream: _Stream, send: Send) -> Any:
    """:func:`_sync_burst` for an async generator: ``None`` once it is done (an async generator
    returns nothing), else :data:`_NEEDS_CREDIT`. Items it produces without waiting stay in one
    task step, so the loop writes them together; every :data:`_ITEMS_PER_TURN` items the loop
    gets a turn. A cancel found between items raises ``CancelledError``, also when the
    generator swallowed the task's cancellation."""
    import asyncio

    anext_item = agen.__anext__
    in_turn = 0
    while not stream.cancelled:
        if stream.sent >= stream.granted:
            return _NEEDS_CREDIT
        try:
            item = await anext_item()
        except StopAsyncIteration:
            return None
        if stream.cancelled:
            break
        stream.sent += 1
        send(item)
        in_turn += 1
        if in_turn == _ITEMS_PER_TURN:
            in_turn = 0
            await asyncio.sleep(0)
    raise asyncio.CancelledError


def _collect(gen: Generator[Any, Any, Any], stream: _Stream) -> list[Any]:
    """A generator called without ``meta.stream``: the list of its items, and its return value
    unless ``None``. The generator is closed (its ``finally`` runs) if this raises."""
    items: list[Any] = []
    try:
        value = _sync_burst(gen, stream, next, items.append)
    except BaseException:
        gen.close()
        raise
    if value is not None:
        items.append(value)
    return items


async def _collect_async(agen: AsyncGenerator[Any, Any], stream: _Stream) -> list[Any]:
    """:func:`_collect` for an async generator."""
    items: list[Any] = []
    try:
        await _async_burst(agen, stream, items.append)
    except BaseException:
        await agen.aclose()
        raise
    return items


def _returned(value: Any) -> Any:
    """The handler of a request whose handler already ran: a concurrent worker's reading thread
    hands the generator a quick handler returned to a handler thread with it."""
    return value


# -------------------------------------------------------------------------
# Callbacks: calls to the host and their answers, the same in both servers
# -------------------------------------------------------------------------


class _Call:
    """A callback call waiting for its answer, in the worker's table of pending calls
    (``call`` number -> call). Whoever takes it out of the table settles it, once: the
    ``$callback`` answer, a ``$cancel`` of its request, or the request's end.

    A thread waits on ``lock`` (held from the start, released by :meth:`settle`); the thread
    that reads the input itself (one request at a time, or a quick handler on a concurrent
    worker's reading thread) has none and reads until ``settled``.
    """

    __slots__ = ("error", "lock", "name", "request_id", "result", "settled")

    def __init__(self, request_id: int, name: str, lock: Any = None) -> None:
        self.request_id = request_id
        self.name = name
        self.lock = lock
        self.settled = False
        self.result: Any = None
        self.error: CallbackError | None = None

    def settle(self, result: Any, error: CallbackError | None) -> None:
        self.result, self.error = result, error
        self.settled = True
        if self.lock is not None:
            self.lock.release()

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class _LoopCall(_Call):
    """A call an async handler awaits: settled on its loop, from any thread (also from the
    SIGIO handler, which interrupts the loop's own thread one request at a time)."""

    __slots__ = ("future", "loop")

    def __init__(self, request_id: int, name: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(request_id, name)
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()

    def settle(self, result: Any, error: CallbackError | None) -> None:
        self.settled = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody awaits it any more
            self.loop.call_soon_threadsafe(_settle_future, self.future, result, error)


def _settle_future(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _answer_call(calls: dict[int, _Call], request_id: object, args: object) -> None:
    """A ``$callback`` frame: settle the call it answers. One for a call that is not pending
    (or not of that request) is ignored."""
    if type(args) is not dict:
        return
    number = args.get("call")
    if type(number) is not int:
        return
    call = calls.get(number)
    if call is None or call.request_id != request_id or calls.pop(number, None) is not call:
        return
    if args.get("success") is True:
        return call.settle(args.get("result"), None)
    message, code = args.get("error"), args.get("code")
    call.settle(
        None,
        CallbackError(
            message if type(message) is str else f"callback {call.name!r} failed",
            code if type(code) is str else "callback_failed",
        ),
    )


def _fail_calls(calls: dict[int, _Call], request_id: int | None, why: str) -> None:
    """Settle the pending calls of ``request_id`` (``None``: of every request) with
    :class:`CallbackError` code ``cancelled``: no answer will come for them (or nobody waits
    for it)."""
    for number, call in list(calls.items()):
        if request_id is not None and call.request_id != request_id:
            continue
        if calls.pop(number, None) is call:
            call.settle(None, _cancelled_error(call.name, call.request_id, why))


def _cancelled_error(name: str, request_id: int, why: str) -> CallbackError:
    reasons = {
        "cancelled": f"request {request_id} was cancelled",
        "ended": f"request {request_id} has ended",
        "input": "the input ended",
    }
    return CallbackError(f"callback {name!r} cancelled: {reasons[why]}", "cancelled")


def _raising(fault: _StreamError) -> Callable[[int, int], bytes]:
    """A read that fails with ``fault``: the input broke where a handler read it (while it
    waited for a callback's answer), so the serving loop exits with status 3 on its next read."""

    def read(fd: int, size: int) -> bytes:
        raise fault

    return read


# -------------------------------------------------------------------------
# The worker: one request at a time
# -------------------------------------------------------------------------


class _Worker:
    """Serves requests on the protocol fds until end of input.

    It answers the handshake itself and then serves one request at a time, unless the
    handshake asked for more (``max_in_flight`` > 1): then :class:`_ConcurrentServer` serves
    the rest, with this object's framing, routing and envelopes.
    """

    def __init__(
        self, input_fd: int, output_fd: int, max_frame: int, lanes: _Lanes | None = None
    ) -> None:
        self.input_fd = input_fd
        self.output_fd = output_fd
        self.max_frame = max_frame
        lanes = lanes or _Lanes()
        self.lanes = lanes
        self.max_payload = lanes.max_payload
        #: A plain JSON answer at most this long needs no look at which limit it is over.
        self._plain_limit = min(max_frame, lanes.max_payload)
        #: Strings at least this long go out as text attachments (from the protocol-2
        #: handshake on, when the pool set a text threshold); values at least ``_shm_out``
        #: bytes long go out in response segments, named with the counter's numbers.
        self._long = _NEVER
        self._shm_out = _NEVER if lanes.shm_threshold is None else lanes.shm_threshold
        self._segment_numbers = itertools.count()
        capabilities: tuple[str, ...] = PROTOCOL_2_CAPABILITIES
        if lanes.shm_dir is not None:
            capabilities += (SHM_CAPABILITY,)
        self._protocol_2_capabilities = json.dumps(list(capabilities))
        self.worker_id = os.environ.get("SNAKEPIT_WORKER_ID", "")
        self.pid = os.getpid()
        self.started = time.monotonic()
        #: Requests answered; a concurrent worker counts under its lock.
        self.handled = 0
        #: Set by the handshake: 1 for protocol 1, else what a protocol-2 pool asked for.
        self.max_in_flight = 1
        self.protocol = 1
        self.commands: dict[str, tuple[Handler, bool, bool, bool]] = {
            "ping": (self.ping, False, False, False),
            **_COMMANDS,
        }
        self._decoder = json.JSONDecoder(parse_constant=_refuse_constant)
        #: The decoder's C scanner: one call decodes a frame that is nothing but its value.
        self._scan: Callable[[str, int], tuple[Any, int]]
        self._scan = self._decoder.scan_once  # type: ignore[attr-defined]
        self._encoder = json.JSONEncoder(allow_nan=False)
        #: What encodes results and items: at protocol 2 (capability ``binary``) one whose
        #: ``default`` stops at a binary value (:func:`_binary_default`), and with a text
        #: threshold at a long string too; ``_result_encoder`` is the same with the check for
        #: cycles, which says why a value that failed with ``RecursionError`` cannot be sent.
        self._result_encoder = self._encoder
        self._encode_value = _item_encoder(self._encoder)
        self._buf: bytes | bytearray = b""  # input read but not yet served
        #: How the serving loop reads: ``os.read``, or the concurrent server's, which also
        #: wakes when no reply can be written any more.
        self._read: Callable[[int, int], bytes] = os.read
        # Cancellation state, shared with the SIGIO handler.
        self._armed = False
        #: Set while a sync generator's item is sent: a cancel then only marks its stream.
        self._holding = False
        self._scanning = False
        self._missed = False
        self._running_id = -1
        self._scan_pos = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        #: The generator handler running, if one is: what a ``$cancel`` read by SIGIO marks.
        self._stream: _Stream | None = None
        #: Requests read while a stream waited for credit, served once it has ended.
        self._deferred: list[bytes | bytearray] = []
        #: An async generator's item frames of this loop turn, and a write that failed.
        self._items_out: list[Frame] = []
        self._items_error: OSError | None = None
        #: Callbacks (protocol 2): what sends a Context's calls (this worker one request at a
        #: time, the concurrent server otherwise; ``None`` at protocol 1), the pending calls by
        #: number, the request being handled (or the last one) and the last one whose
        #: ``$cancel`` came while it ran (ids are unique: neither needs resetting).
        self._bridge: Any = None
        self._calls: dict[int, _Call] = {}
        self._call_numbers = itertools.count()
        self._handling = -1
        self._cancelled_id: int | None = None
        self._ident = _thread.get_ident()  # the main thread: the one that runs handlers here
        self._setup_signals()

    # -- start-up ---------------------------------------------------------

    def _setup_signals(self) -> None:
        flags = fcntl.fcntl(self.input_fd, fcntl.F_GETFL) & ~(os.O_ASYNC | os.O_NONBLOCK)
        fcntl.fcntl(self.input_fd, fcntl.F_SETFL, flags)  # the serving loop blocks on reads
        self._idle_flags = flags
        self._armed_flags = flags | os.O_ASYNC | os.O_NONBLOCK
        signal.signal(signal.SIGIO, self._on_sigio)
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        self._direct_sigio_here()

    def _direct_sigio_here(self) -> None:
        """Send the input's SIGIO to this process, on Linux to its main thread: a signal taken
        by another thread would not interrupt a main thread blocked in ``time.sleep``."""
        if sys.platform != "linux":
            fcntl.fcntl(self.input_fd, fcntl.F_SETOWN, self.pid)
            return
        owner = _F_OWNER_TID.to_bytes(4, sys.byteorder) + self.pid.to_bytes(4, sys.byteorder)
        fcntl.fcntl(self.input_fd, _F_SETOWN_EX, owner)

    # -- the serving loop -------------------------------------------------

    def serve(self) -> int:
        """Answer requests until end of input; return the exit status.

        The first request is the handshake, which may ask for protocol 2 with several requests
        in flight: only then does the concurrent server (and ``threading``) come in.
        """
        try:
            body = self._next_frame()
            if body is None:
                return 0
            self._handle(self._decode(body))
            if self.max_in_flight > 1:
                return _ConcurrentServer(self, self.max_in_flight).serve()
            while True:
                body = self._next_frame()
                if body is None:
                    return 0
                self._handle(self._decode(body))
                if self._calls:  # an async handler's calls nobody awaited: no answer comes
                    _fail_calls(self._calls, self._handling, "ended")
        except _StreamError as fault:
            _log(f"{fault}; exiting with status {EXIT_PROTOCOL_FAULT}")
            return EXIT_PROTOCOL_FAULT
        except BrokenPipeError:
            return 0  # the pool stopped reading: the same as end of input
        finally:
            if self._loop is not None:
                self._loop.close()

    def _next_frame(self) -> bytes | bytearray | None:
        """The next request body, reading as needed; ``None`` at a clean end of input."""
        buf = self._buf
        while True:
            size = len(buf)
            if size >= 4:
                length = int.from_bytes(buf[:4], "big")
                if length > self.max_frame:
                    raise _StreamError(
                        f"frame of {length} bytes exceeds the limit of {self.max_frame} bytes"
                    )
                end = 4 + length
                if size >= end:
                    self._buf = buf[end:]
                    return buf[4:end]
                self._buf = b""
                return self._read_rest(buf, end)
            data = self._read(self.input_fd, _READ_SIZE)
            if not data:
                if buf:
                    raise _StreamError(f"input ended inside a frame ({size} bytes pending)")
                return None
            buf = buf + data if buf else data

    def _next_frames(self) -> list[bytes | bytearray] | None:
        """Every complete frame buffered, reading once if there is none; ``None`` at a clean
        end of input.

        A concurrent worker serves a whole read at once: its frames are sliced from the chunk
        once each, instead of the rest of the chunk being copied after every frame. A frame
        over the limit or not complete yet stays buffered for the next call.
        """
        first = self._next_frame()
        if first is None:
            return None
        frames = [first]
        buf, limit = self._buf, self.max_frame
        pos, size = 0, len(buf)
        while size - pos >= 4:
            length = int.from_bytes(buf[pos : pos + 4], "big")
            end = pos + 4 + length
            if length > limit or end > size:
                break
            frames.append(buf[pos + 4 : end])
            pos = end
        if pos:
            self._buf = buf[pos:]
        return frames

    def _read_rest(self, head: bytes | bytearray, end: int) -> bytearray:
        """Read exactly the rest of a frame into one buffer (no quadratic concatenation)."""
        frame = _FrameBuffer(end)
        frame[: len(head)] = head
        got = len(head)
        with memoryview(frame) as view:
            while got < end:
                count = os.readv(self.input_fd, [view[got:]])
                if count == 0:
                    raise _StreamError(f"input ended inside a frame ({got} of {end} bytes)")
                got += count
        del frame[:4]  # the header; cheap at the front of a bytearray
        return frame

    def _decode(self, body: bytes | bytearray) -> dict[str, Any]:
        """The request a frame holds. The scanner alone decodes a frame without whitespace
        around its value (every frame a pool writes); ``decode`` takes any other, and gives
        the reason a bad frame is refused. A binary frame starts with ``0x00``."""
        if body and not body[0]:
            return self._decode_binary(body)
        try:
            text = body.decode()
            try:
                request, end = self._scan(text, 0)
            except StopIteration:  # leading whitespace, or no JSON value at all
                end = -1
            if end != len(text):
                request = self._decoder.decode(text)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise _StreamError(f"undecodable frame: {exc}") from None
        if type(request) is not dict:
            raise _StreamError(f"frame is not a JSON object but {type(request).__name__}")
        return request

    def _decode_binary(self, body: bytes | bytearray) -> dict[str, Any]:
        """The request of a binary frame: ``0x00``, the envelope's length J, J bytes of JSON,
        then the inline values, each put where the ``$binary`` list says as a read-only view
        of ``body`` (nothing is copied), a text entry as its string. A segment's value is a
        view of its mapping (:func:`_map_segment`). Anything that does not add up is a
        ``_StreamError``, and nothing beyond the body (or a segment's ``size``) is read."""
        size = len(body)
        if size < _BINARY_PREFIX:
            raise _StreamError("binary frame is shorter than its header")
        end = _BINARY_PREFIX + int.from_bytes(body[1:_BINARY_PREFIX], "big")
        if end > size:
            raise _StreamError(
                f"binary frame's envelope of {end - _BINARY_PREFIX} bytes overruns the frame "
                f"of {size} bytes"
            )
        view = memoryview(body).toreadonly()
        try:
            text = str(view[_BINARY_PREFIX:end], "utf-8")
        except UnicodeDecodeError as exc:
            raise _StreamError(f"binary frame's envelope is not valid UTF-8 ({exc})") from None
        try:
            message = self._decoder.decode(text)
        except (ValueError, RecursionError) as exc:
            raise _StreamError(f"binary frame's envelope is not valid JSON ({exc})") from None
        if type(message) is not dict:
            kind = type(message).__name__
            raise _StreamError(f"binary frame's envelope is not a JSON object but {kind}")
        entries = message.pop(BINARY_KEY, None)
        if type(entries) is not list:
            raise _StreamError(f"binary frame has no {BINARY_KEY!r} list")
        offset = end
        directory = self.lanes.shm_dir
        for entry in entries:
            path, count, segment, is_text = _binary_entry(entry, directory is not None)
            value: memoryview | str
            if segment is not None:
                assert directory is not None
                value = _map_segment(directory, segment, count, is_text, path)
            elif count > size - offset:
                raise _StreamError(
                    f"binary value at {_shown(path)} of {count} bytes overruns the frame"
                )
            else:
                value = view[offset : offset + count]
                offset += count
                if is_text:
                    value = _text_of(value, path)
            _place(message, path, value)
        if offset != size:
            raise _StreamError(f"binary frame has {size - offset} bytes beyond its values")
        return message

    def _handle(self, request: dict[str, Any]) -> None:
        """Answer one request (``$cancel`` and ``$credit`` are never answered)."""
        try:
            request_id, name, entry, call_args, window = self._route(request)
        except _Refused as refusal:
            return self._write(self._failure_frame(refusal.request_id, refusal.message))
        if entry is None:  # nothing runs, so a $cancel, $credit or $callback names none: ignore
            if name == CREDIT_COMMAND:
                self._credit_items(request_id, request)  # a malformed one is still logged
            return None
        self._handling = request_id
        try:
            result = self._invoke(entry, call_args, request_id)
            if type(result) in _GENERATORS:
                result = self._generate(request_id, result, window, entry[3])
                window = None  # its items have gone out: the result is the end's
        except _Cancelled:
            self._disarm()  # a cancel may land before the disarm in _call_armed ran
            return self._write(self._failure_frame(request_id, "cancelled"))
        except Exception as exc:
            return self._write(self._exception_frame(request_id, name, exc))
        # Written before the next request is read: a large binary value leaves from where it is.
        if window is None:
            return self._write(self._success_frame(request_id, name, result, True))
        return self._write(self._one_item_frames(request_id, name, result, True))

    def _route(
        self, request: dict[str, Any]
    ) -> tuple[int, str, tuple[Handler, bool, bool, bool] | None, tuple[Any, ...], int | None]:
        """``(id, command, handler entry, call arguments, stream window)``; the entry is
        ``None`` for a ``$cancel`` or ``$credit``, the window ``None`` unless ``meta.stream``
        asks for a stream. Raises ``_Refused`` for a request answered with a failure at once."""
        request_id = request.get("id")
        name = request.get("command")
        if type(request_id) is not int:
            raise _unanswerable(request)
        if type(name) is not str:
            raise _Refused(request_id, "request 'command' must be a string")
        entry = self.commands.get(name)
        if entry is None:
            if name in _CONTROL_COMMANDS:
                return request_id, name, None, (), None
            raise _Refused(request_id, self._unknown(name))
        args = request.get("args")
        if args is None:
            args = {}
        elif type(args) is not dict:
            raise _Refused(request_id, f"{name}: args must be a JSON object")
        meta = request.get("meta")
        if type(meta) is not dict:
            meta, window = None, None
        else:
            spec = meta.get("stream")
            window = None if spec is None else _stream_window(request_id, name, spec)
        if entry[1]:  # wants_ctx
            return request_id, name, entry, (args, self._context(request_id, meta)), window
        return request_id, name, entry, (args,), window

    def _unknown(self, name: str) -> str:
        supported = ", ".join(sorted(self.commands))
        return f"unknown command {name!r} (supported: {supported})"

    def _invoke(
        self, entry: tuple[Handler, bool, bool, bool], call_args: tuple[Any, ...], request_id: int
    ) -> Any:
        func, _, is_async, cancellable = entry
        if is_async:
            coro = func(*call_args)
            if type(coro) is AsyncGeneratorType:
                return coro  # driven by _generate
            return self._run_async(coro, request_id)
        if not cancellable:
            result = func(*call_args)
        else:
            result = self._call_armed(func, call_args, request_id)
        if type(result) is CoroutineType:  # a sync wrapper around an async function
            return self._run_async(result, request_id)
        return result

    def _context(self, request_id: int, meta: dict[str, Any] | None) -> Context:
        if meta is None:
            ctx = Context(request_id, self.worker_id)
        else:
            ctx = Context(
                request_id,
                self.worker_id,
                meta.get("traceparent"),
                meta.get("tracestate"),
                meta.get("deadline_ms"),
            )
        ctx._bridge = self._bridge
        return ctx

    # -- envelopes (thread-safe: they only read configuration) -------------

    def _success_frame(self, request_id: int, name: str, result: Any, keep: bool = False) -> Frame:
        """The answer of a result (a binary frame if it holds binary values or long strings;
        ``keep``: see :func:`_direct`)."""
        try:
            try:
                text = result if type(result) is _JSONText else self._encode_value(result)
            except RecursionError:  # a cycle or a value nested too deep: the check says which
                text = self._result_encoder.encode(result)
        except _HasBinary:
            return self._binary_answer(request_id, name, result, keep)
        except (TypeError, ValueError, RecursionError) as exc:
            return self._unsendable(request_id, name, exc)
        return self._plain_answer(request_id, name, text)

    def _plain_answer(self, request_id: int, name: str, text: str) -> bytes:
        """The answer of a result that is JSON ``text``, unless it is over a limit."""
        data = f'{{"id": {request_id}, "success": true, "result": {text}}}'.encode()
        if len(data) > self._plain_limit:
            return self._too_large(request_id, name, self._over(len(data)))
        return _frame(data)

    def _over(self, size: int) -> _OverLimit:
        """The limit a message of ``size`` bytes, all in one frame, is over (the payload's
        first: with it, no frame could carry the message)."""
        if size > self.max_payload:
            return _OverLimit(size, "payload", self.max_payload)
        return _OverLimit(size, "frame", self.max_frame)

    def _too_large(self, request_id: int, name: str, over: _OverLimit) -> bytes:
        return self._failure_frame(request_id, f"{name}: response of {over}")

    def _unsendable(self, request_id: int, name: str, exc: Exception) -> bytes:
        return self._failure_frame(request_id, f"{name}: result cannot be sent as JSON ({exc})")

    def _binary_answer(self, request_id: int, name: str, result: Any, keep: bool) -> Frame:
        """The answer of a result holding binary values or long strings, as a binary frame
        (a plain one if no value is taken out after all: a long string that stays in the JSON,
        lone surrogates, or a long dict key)."""
        found: Found = []
        try:
            detached = _detached(result, ["result"], found, set(), self._long)
            if not found:
                return self._plain_answer(request_id, name, self._result_encoder.encode(result))
            envelope = {"id": request_id, "success": True, "result": detached}
            return self._binary_frame(envelope, found, keep)
        except _OverLimit as over:
            return self._too_large(request_id, name, over)
        except (TypeError, ValueError, RecursionError) as exc:
            return self._unsendable(request_id, name, exc)

    def _binary_frame(self, envelope: dict[str, Any], found: Found, keep: bool) -> Frame:
        """A binary frame of ``envelope`` (``None`` at the places of the values ``found``).

        Values of at least ``SNAKEPIT_SHM_THRESHOLD`` bytes go into new response segments
        (inline where one cannot be made or filled); the others follow the envelope, large
        ones as pieces of their own where :func:`_direct` says so, the rest copied into the
        frame. ``_OverLimit`` if the envelope and all the values are over the payload limit
        (checked before any segment is made; the size counted is the frame's as if every
        value were inline), or what goes into the frame is over the frame limit (then the
        segments made are deleted).
        """
        entries: list[dict[str, Any]] = []
        total = shared_bytes = 0
        shm_out = self._shm_out
        for path, view, text in found:
            size = view.nbytes
            total += size
            entry: dict[str, Any] = {"path": path, "size": size}
            if text:
                entry["text"] = True
            if size >= shm_out:
                entry["shm"] = f"{self.lanes.shm_prefix}{next(self._segment_numbers)}"
                shared_bytes += size
            entries.append(entry)
        envelope[BINARY_KEY] = entries
        head = self._encoder.encode(envelope).encode()
        payload = _BINARY_PREFIX + len(head) + total
        if payload > self.max_payload:
            raise _OverLimit(payload, "payload", self.max_payload)
        size = payload - shared_bytes
        if size > self.max_frame:  # even with every segment made
            raise _OverLimit(size, "frame", self.max_frame)
        if shared_bytes:
            head, size = self._write_segments(envelope, entries, found, head, size)
        run: list[bytes | memoryview] = [
            size.to_bytes(4, "big"), BINARY_MARK, len(head).to_bytes(4, "big"), head,
        ]  # fmt: skip
        parts = _Parts()
        for (_, view, _), entry in zip(found, entries, strict=True):
            if "shm" in entry:
                continue
            direct = _direct(view, keep)
            if direct is None:
                run.append(view)
            else:
                parts += (b"".join(run), direct)
                run = []
        if not parts:
            return b"".join(run)
        if run:
            parts.append(b"".join(run))
        return parts

    def _write_segments(
        self,
        envelope: dict[str, Any],
        entries: list[dict[str, Any]],
        found: Found,
        head: bytes,
        size: int,
    ) -> tuple[bytes, int]:
        """Write the values whose entries name a segment, each into its segment; an entry
        whose segment could not be made loses its name (the value goes inline). Returns the
        envelope's JSON and the frame's size after that; ``_OverLimit`` if the values that
        went inline make the frame too large, once the segments made are deleted again."""
        directory = self.lanes.shm_dir
        assert directory is not None
        made: list[str] = []
        inline = False
        for (_, view, _), entry in zip(found, entries, strict=True):
            name = entry.get("shm")
            if name is None:
                continue
            if _write_segment(os.path.join(directory, name), _flat_bytes(view)):
                made.append(name)
            else:
                del entry["shm"]
                size += view.nbytes
                inline = True
        if not inline:
            return head, size
        old, head = len(head), self._encoder.encode(envelope).encode()
        size += len(head) - old
        if size > self.max_frame:
            for name in made:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
            raise _OverLimit(size, "frame", self.max_frame)
        return head, size

    def _one_item_frames(
        self, request_id: int, name: str, result: Any, keep: bool = False
    ) -> Frame:
        """The answer of a plain handler called as a stream (``meta.stream``): its result as
        the stream's one item, then the end."""
        try:
            item = self._item_frame(request_id, result, keep)
        except CommandError as exc:
            return self._failure_frame(request_id, f"{name}: {exc}")
        return _concat(item, self._success_frame(request_id, name, None))

    def _item_frame(self, request_id: int, item: Any, keep: bool = False) -> Frame:
        """An item frame, ``{"id": ..., "item": ...}``; ``CommandError`` if the item cannot be
        sent, which ends the stream with that failure."""
        try:
            try:
                text = item if type(item) is _JSONText else self._encode_value(item)
            except RecursionError:  # a cycle or a value nested too deep: the check says which
                text = self._result_encoder.encode(item)
        except _HasBinary:
            return self._binary_item(request_id, item, keep)
        except (TypeError, ValueError, RecursionError) as exc:
            raise CommandError(f"item cannot be sent as JSON ({exc})") from None
        return self._plain_item(request_id, text)

    def _plain_item(self, request_id: int, text: str) -> bytes:
        body = f'{{"id": {request_id}, "item": {text}}}'.encode()
        size = len(body)
        if size > self._plain_limit:
            raise CommandError(f"item of {self._over(size)}")
        return size.to_bytes(4, "big") + body

    def _binary_item(self, request_id: int, item: Any, keep: bool) -> Frame:
        """An item frame of an item holding binary values or long strings, as a binary frame
        (a plain one if none is taken out after all)."""
        found: Found = []
        try:
            detached = _detached(item, ["item"], found, set(), self._long)
            if not found:
                return self._plain_item(request_id, self._result_encoder.encode(item))
            return self._binary_frame({"id": request_id, "item": detached}, found, keep)
        except _OverLimit as over:
            raise CommandError(f"item of {over}") from None
        except (TypeError, ValueError, RecursionError) as exc:
            raise CommandError(f"item cannot be sent as JSON ({exc})") from None

    def _credit_items(self, request_id: int, request: dict[str, Any]) -> int:
        """The items a ``$credit`` grants; 0, with a log line, if it is not an integer >= 1."""
        args = request.get("args")
        items = args.get("items") if type(args) is dict else None
        if type(items) is int and items >= 1:
            return items
        shown = self._encoder.encode(items)
        _log(f"ignoring $credit for request {request_id}: items={shown} is not an integer >= 1")
        return 0

    def _failure_frame(self, request_id: int, message: str) -> bytes:
        body = {"id": request_id, "success": False, "error": message}
        return _frame(self._encoder.encode(body).encode())

    def _exception_frame(self, request_id: int, name: str, exc: BaseException) -> bytes:
        """The failure for a handler's exception; an unexpected one logs its traceback. A
        callback cancelled with its request (:class:`CallbackError` code ``cancelled``) ends
        the request as ``cancelled``; another failed callback needs no traceback either."""
        if isinstance(exc, CallbackError):
            if exc.code == "cancelled":
                return self._failure_frame(request_id, "cancelled")
            return self._failure_frame(request_id, f"{name}: {exc}")
        if isinstance(exc, CommandError):
            return self._failure_frame(request_id, f"{name}: {exc}")
        _log_traceback(name, exc)
        return self._failure_frame(request_id, f"{name}: {_describe_exception(exc)}")

    def _write(self, frame: Frame) -> None:
        """Write one frame; counts the request as handled."""
        _write_all(self.output_fd, frame)
        self.handled += 1

    # -- built-in: the handshake -------------------------------------------

    def ping(self, args: dict[str, Any]) -> _JSONText:
        """The handshake and liveness check; records the worker id the pool assigns.

        A first ping (the handshake) with ``max_in_flight`` comes from a protocol-2 pool: the
        answer says protocol 2 and how many requests this worker takes, and the worker then
        serves that many at once. A ping without it (a protocol-1 handshake, the pool's health
        check) gets protocol 1's answer, key for key, as docs/PROTOCOL.md lists them.

        The pool pings often, so the answer is written as JSON text here, exactly as the
        encoder would write the same object, instead of being built as a dict and encoded.
        """
        worker_id = args.get("worker_id")
        if isinstance(worker_id, str):
            self.worker_id = worker_id
        asks = "max_in_flight" in args
        if asks and self.handled == 0:
            self._negotiate(args["max_in_flight"])
        protocol_2 = asks and self.protocol == 2
        capabilities = self._protocol_2_capabilities if protocol_2 else _CAPABILITIES_JSON
        # requests_handled counts this request too, as every bundled bridge does.
        text = (
            f'{{"status": "ok", "uptime": {time.monotonic() - self.started!r}, '
            f'"requests_handled": {self.handled + 1}, '
            f'"worker_id": {_json_string(self.worker_id)}, "runtime": "{RUNTIME}", '
            f'"capabilities": {capabilities}, "pid": {self.pid}'
        )
        if protocol_2:
            text += f', "protocol": 2, "max_concurrency": {MAX_CONCURRENCY}'
        return _JSONText(text + "}")

    def _negotiate(self, max_in_flight: object) -> None:
        if type(max_in_flight) is not int or max_in_flight < 1:
            _log(f"ignoring max_in_flight={max_in_flight!r} (not an integer >= 1): protocol 1")
            return
        self.protocol = 2
        self.max_in_flight = min(max_in_flight, MAX_CONCURRENCY)
        self._bridge = self  # capability callbacks (the concurrent server takes it over)
        # capability binary: results and items holding binary values go out as binary frames,
        # and with a text threshold from the pool, so do those holding long strings
        encoder = json.JSONEncoder(allow_nan=False, default=_binary_default)
        self._result_encoder = encoder
        if self.lanes.text_threshold is not None:
            self._long = self.lanes.text_threshold
        self._encode_value = _item_encoder(encoder, self._long)

    def status(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "pid": self.pid,
            "uptime": time.monotonic() - self.started,
            "requests_handled": self.handled + 1,
            "commands": sorted(self.commands),
        }

    # -- streams, one request at a time ----------------------------------

    def _generate(
        self,
        request_id: int,
        producer: Generator[Any, Any, Any] | AsyncGenerator[Any, Any],
        window: int | None,
        cancellable: bool,
    ) -> Any:
        """Run a generator handler to its end, on this thread: stream its items as item frames
        (``window``), or collect them for ``execute``. Returns the result to answer. ``$cancel``
        stops it as it stops a sync or async handler, and a cancel it swallowed stops it before
        its next item."""
        self._stream = stream = _Stream(_UNLIMITED if window is None else window)
        try:
            if type(producer) is GeneratorType:
                if window is None:
                    if not cancellable:
                        return _collect(producer, stream)
                    return self._call_armed(_collect, (producer, stream), request_id)
                return self._stream_sync(request_id, producer, stream, cancellable)
            agen: AsyncGenerator[Any, Any] = producer  # type: ignore[assignment]
            if window is None:
                return self._run_async(_collect_async(agen, stream), request_id)
            return self._stream_async(request_id, agen, stream)
        finally:
            self._stream = None
            self._serve_deferred()

    def _stream_sync(
        self, request_id: int, gen: Generator[Any, Any, Any], stream: _Stream, cancellable: bool
    ) -> Any:
        """Stream a sync generator's items, each written as it comes (its next one may take
        any time); its return value. Its ``next()`` is cancellable as a sync handler is, unless
        the handler is registered ``cancellable=False``."""

        def send(item: Any) -> None:  # written before the generator is resumed
            _write_all(self.output_fd, self._item_frame(request_id, item, True))

        try:
            while True:
                if cancellable:
                    value = self._armed_burst(request_id, gen, stream, send)
                else:
                    value = _sync_burst(gen, stream, next, send)
                if value is not _NEEDS_CREDIT:
                    return value
                self._await_credit(request_id, stream)
        except BaseException:
            gen.close()
            raise

    def _armed_burst(
        self, request_id: int, gen: Generator[Any, Any, Any], stream: _Stream, send: Send
    ) -> Any:
        """A burst of a sync generator armed once, not per item. ``$cancel`` raises into its
        ``next()`` only: while an item is written it marks the stream, so that no frame is
        cut short, and the burst stops before the next item."""
        self._holding = True
        try:
            self._arm(request_id)
            return _sync_burst(gen, stream, self._next_unheld, send)
        finally:
            self._disarm()
            self._holding = False

    def _next_unheld(self, gen: Generator[Any, Any, Any]) -> Any:
        """``next(gen)`` with a ``$cancel`` able to raise into it."""
        self._holding = False
        try:
            return next(gen)
        finally:
            self._holding = True

    def _stream_async(
        self, request_id: int, agen: AsyncGenerator[Any, Any], stream: _Stream
    ) -> None:
        """Stream an async generator's items: the loop runs it while it has credit (one task
        per burst, all in one context, so its context variables live on), and writes the items
        of a loop turn together; without credit, this thread reads the frames that bring more."""
        import contextvars

        context = contextvars.copy_context()

        def send(item: Any) -> None:
            self._send_soon(self._item_frame(request_id, item))

        try:
            while self._async_burst_here(agen, stream, send, request_id, context):
                self._await_credit(request_id, stream)
        except BaseException:
            assert self._loop is not None  # the first burst made it
            self._loop.run_until_complete(agen.aclose())
            raise

    def _async_burst_here(
        self,
        agen: AsyncGenerator[Any, Any],
        stream: _Stream,
        send: Send,
        request_id: int,
        context: contextvars.Context,
    ) -> bool:
        """Run one burst of an async generator on the loop; whether it needs more credit.
        The items it made are written before this returns or raises."""
        try:
            return self._run_async(_async_burst(agen, stream, send), request_id, context) is (
                _NEEDS_CREDIT
            )
        finally:
            self._write_items()
            error, self._items_error = self._items_error, None
            if error is not None:
                raise error

    def _send_soon(self, frame: Frame) -> None:
        """On the loop: an item frame, written at the end of this loop turn with the others."""
        if not self._items_out:
            assert self._loop is not None
            self._loop.call_soon(self._write_items)
        self._items_out.append(frame)

    def _write_items(self) -> None:
        """Write the item frames waiting. On the loop, a failed write is kept for the main
        thread (:meth:`_async_burst_here`), since the loop would only log it; frames after it
        are dropped."""
        frames, self._items_out = self._items_out, []
        if not frames or self._items_error is not None:
            return
        try:
            _write_all(self.output_fd, _joined(frames))
        except OSError as exc:
            self._items_error = exc

    def _await_credit(self, request_id: int, stream: _Stream) -> None:
        """The window is full: read frames until a ``$credit`` gives the stream more.

        One request at a time, this thread reads every frame, so it reads the credit itself,
        with the input blocking (and SIGIO off) as between requests. The stream's ``$cancel``,
        or the end of input (no credit can come), raises ``_Cancelled``; any other request
        waits until the stream has ended (:meth:`_serve_deferred`). A ``$cancel`` that SIGIO
        read as the burst ended has only marked the stream.
        """
        while stream.sent >= stream.granted:
            if stream.cancelled:
                raise _Cancelled
            body = self._next_frame()
            if body is None:
                raise _Cancelled
            self._take_frame(self._decode(body), body)  # the stream's $cancel marks it

    def _take_frame(self, request: dict[str, Any], body: bytes | bytearray) -> None:
        """A frame read while the request being handled waits (for credit, or for a callback's
        answer): the protocol's frames act at once, any other request is served once this one
        has ended (:meth:`_serve_deferred`). Its ``$cancel`` marks its stream and fails its
        pending calls (:meth:`_cancel_running`)."""
        name = request.get("command")
        if name == CALLBACK_COMMAND:
            _answer_call(self._calls, _request_id(request), request.get("args"))
        elif name == CREDIT_COMMAND:
            target = _request_id(request)
            items = self._credit_items(target, request)
            if target == self._handling and self._stream is not None:
                self._stream.granted += items
        elif name == CANCEL_COMMAND:
            if _request_id(request) == self._handling:
                self._cancel_running()
        else:
            self._deferred.append(body)

    def _cancel_running(self) -> None:
        """The request being handled is cancelled: its stream stops before its next item, its
        pending calls fail with code ``cancelled``, and so does any call it makes from now."""
        self._cancelled_id = self._handling
        if self._stream is not None:
            self._stream.cancelled = True
        if self._calls:
            _fail_calls(self._calls, self._handling, "cancelled")

    def _serve_deferred(self) -> None:
        """Put the requests read during a stream back in front of the input, in order."""
        if self._deferred:
            self._buf = b"".join(_frame(body) for body in self._deferred) + self._buf
            self._deferred = []

    # -- callbacks, one request at a time -----------------------------------

    def call_sync(self, request_id: int, name: str, args: dict[str, Any]) -> Any:
        """``ctx.call_sync`` one request at a time: send the call, then read the input on this
        thread until its answer comes, with SIGIO off (the reading is this thread's, as while a
        stream waits for credit); a ``$cancel`` of the request fails the call."""
        if _thread.get_ident() != self._ident:
            raise RuntimeError(
                "ctx.call_sync(): one request at a time (max_in_flight 1) only the handler's "
                "own thread can call, as it reads the answer (for several calls at once, use "
                "an async handler and asyncio.gather)"
            )
        loop = self._loop
        if loop is not None and loop.is_running():
            raise RuntimeError(_ON_LOOP)
        number = next(self._call_numbers)
        call = self._calls[number] = _Call(request_id, name)
        armed = self._armed
        if armed:
            self._disarm()  # from here on, a $cancel is this thread's to read
        try:
            refusal = self._refusal(request_id)
            if refusal is not None:
                raise _cancelled_error(name, request_id, refusal)
            _write_all(self.output_fd, self._call_frame(request_id, number, name, args, True))
            self._read_for(call)
        finally:
            self._calls.pop(number, None)
            self._serve_deferred()  # read again by the next wait, served once the request ends
            if armed:
                self._arm(request_id)
        return call.outcome()

    async def call(self, request_id: int, name: str, args: dict[str, Any]) -> Any:
        """``await ctx.call`` one request at a time: the loop runs on this thread with SIGIO
        armed, and :meth:`_check_input` settles the call when its answer comes. A ``$cancel``
        cancels the task, and the ``CancelledError`` it raises here becomes the call's
        :class:`CallbackError` code ``cancelled``."""
        import asyncio

        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError(
                "await ctx.call(): one request at a time (max_in_flight 1) only async handlers "
                "(on the bridge's event loop) can await a callback"
            )
        number = next(self._call_numbers)
        call = _LoopCall(request_id, name, loop)
        self._calls[number] = call  # before the check: a $cancel read by SIGIO then fails it
        try:
            refusal = self._refusal(request_id)
            if refusal is not None:
                raise _cancelled_error(name, request_id, refusal)
            frame = self._call_frame(request_id, number, name, args, True)
            if self._items_out:  # the items made before the call leave before it
                self._write_items()
            _write_all(self.output_fd, frame)
            return await call.future
        except asyncio.CancelledError:
            if self._cancelled_id != request_id:
                raise
            _uncancel()
            raise _cancelled_error(name, request_id, "cancelled") from None
        finally:
            self._calls.pop(number, None)

    def _refusal(self, request_id: int) -> str | None:
        """Why a call of ``request_id`` fails at once: its request was cancelled or has ended
        (a task it left behind), else ``None``."""
        if request_id != self._handling:
            return "ended"
        if request_id == self._cancelled_id:
            return "cancelled"
        return None

    def _read_for(self, call: _Call) -> None:
        """Read frames on this thread until ``call`` is settled (one request at a time): the
        protocol's frames act at once, other requests wait (:meth:`_take_frame`). The end of
        the input fails the call; so does a frame that cannot be decoded, and the serving
        loop then exits with status 3 (:func:`_raising`)."""
        while not call.settled:
            try:
                body = self._next_frame()
                if body is None:
                    return _fail_calls(self._calls, None, "input")
                self._take_frame(self._decode(body), body)
            except _StreamError as fault:
                self._buf, self._read = b"", _raising(fault)
                return _fail_calls(self._calls, None, "input")

    def _call_frame(
        self, request_id: int, number: int, name: str, args: dict[str, Any], keep: bool
    ) -> Frame:
        """The frame of a callback call, ``{"id", "call", "name", "args"}``: a binary frame
        if ``args`` holds binary values or long strings (``keep``: see :func:`_direct`).
        ``TypeError`` or ``ValueError`` if the arguments cannot be sent."""
        try:
            try:
                text = self._encode_value(args)
            except RecursionError:  # a cycle or a value nested too deep: the check says which
                text = self._result_encoder.encode(args)
        except _HasBinary:
            return self._binary_call(request_id, number, name, args, keep)
        except (TypeError, ValueError, RecursionError) as exc:
            raise _unsendable_args(name, exc) from None
        body = (
            f'{{"id": {request_id}, "call": {number}, "name": {_json_string(name)}, '
            f'"args": {text}}}'
        ).encode()
        if len(body) > self._plain_limit:
            raise ValueError(f"callback {name!r}: a call of {self._over(len(body))}")
        return _frame(body)

    def _binary_call(
        self, request_id: int, number: int, name: str, args: dict[str, Any], keep: bool
    ) -> Frame:
        found: Found = []
        try:
            detached = _detached(args, ["args"], found, set(), self._long)
            envelope = {"id": request_id, "call": number, "name": name, "args": detached}
            if not found:
                envelope["args"] = args
                body = self._result_encoder.encode(envelope).encode()
                if len(body) > self._plain_limit:
                    raise _OverLimit(len(body), "frame", self._plain_limit)
                return _frame(body)
            return self._binary_frame(envelope, found, keep)
        except _OverLimit as over:
            raise ValueError(f"callback {name!r}: a call of {over}") from None
        except (TypeError, ValueError, RecursionError) as exc:
            raise _unsendable_args(name, exc) from None

    # -- cancellation -----------------------------------------------------

    def _call_armed(self, func: Handler, call_args: tuple[Any, ...], request_id: int) -> Any:
        """Call a sync handler with ``$cancel`` able to raise ``_Cancelled`` into it."""
        try:
            self._arm(request_id)
            return func(*call_args)
        finally:
            self._disarm()

    def _run_async(
        self,
        coro: Coroutine[Any, Any, Any],
        request_id: int,
        context: contextvars.Context | None = None,
    ) -> Any:
        """Run a coroutine on the persistent loop, as a task in ``context`` (by default a copy
        of the current one); ``$cancel`` cancels its task."""
        import asyncio

        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
        task = self._task = loop.create_task(coro, context=context)
        # SIGTERM's SystemExit leaves the task pending: say nothing of it at exit, as
        # run_until_complete does for a task it creates itself.
        task._log_destroy_pending = False  # type: ignore[attr-defined]
        try:
            self._arm(request_id)
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            raise _Cancelled from None
        finally:
            self._disarm()
            self._task = None

    def _arm(self, request_id: int) -> None:
        self._running_id = request_id
        self._scan_pos = 0
        self._armed = True
        fcntl.fcntl(self.input_fd, fcntl.F_SETFL, self._armed_flags)
        self._check_input()  # input that arrived before O_ASYNC was set raises no SIGIO

    def _disarm(self) -> None:
        self._armed = False
        fcntl.fcntl(self.input_fd, fcntl.F_SETFL, self._idle_flags)

    def _on_sigio(self, signum: int, frame: FrameType | None) -> None:
        if self._armed:
            self._check_input()

    def _check_input(self) -> None:
        """Buffer pending input; stop the running request if its ``$cancel`` is there.

        Python may run a SIGIO handler inside another (or inside the call from ``_arm``), so
        a nested call only flags ``_missed`` and the outer one reads again: the reads and the
        buffer updates of two calls never interleave. ``_missed`` is cleared before
        ``_scanning`` is set, so a signal between the two runs a complete check itself.
        """
        if self._scanning:
            self._missed = True
            return
        found = False
        while True:
            self._missed = False
            self._scanning = True
            self._read_pending()
            found = self._take_cancel() or found
            self._scanning = False
            if not self._missed:
                break
        if found and self._armed:
            self._armed = False
            self._cancel_running()  # a generator that swallows the cancel stops anyway
            if self._task is not None:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._task.cancel)
            elif not self._holding:
                raise _Cancelled

    def _read_pending(self) -> None:
        """Buffer what the input holds, up to :data:`_SCAN_LIMIT`; while callbacks wait for
        their answers, which may be large, up to a whole frame beyond it. The buffer grows in
        place (a ``bytearray``), so a large answer read piece by piece is not copied anew for
        every piece."""
        limit = _SCAN_LIMIT if not self._calls else _SCAN_LIMIT + 4 + self.max_frame
        buf = self._buf
        while len(buf) < limit:
            try:
                data = os.read(self.input_fd, _READ_SIZE)
            except BlockingIOError:
                return
            if not data:
                return
            if type(buf) is not bytearray:
                buf = bytearray(buf)
            buf += data
            self._buf = buf

    def _take_cancel(self) -> bool:
        """Remove complete ``$cancel`` frames from the buffer; True if one names the running id.
        While calls are pending, remove their ``$callback`` answers too, and settle the calls.

        Other frames stay for the serving loop, which also reports any undecodable one.
        """
        buf, pos, found = self._buf, self._scan_pos, False
        while len(buf) - pos >= 4:
            length = int.from_bytes(buf[pos : pos + 4], "big")
            end = pos + 4 + length
            if length > self.max_frame or end > len(buf):
                break
            request_id = self._cancel_target(buf, pos + 4, end)
            if request_id is None:
                if not (self._calls and self._take_answer(buf, pos + 4, end)):
                    pos = end
                    continue
            else:
                found = found or request_id == self._running_id
            buf = buf[:pos] + buf[end:]
        self._buf, self._scan_pos = buf, pos
        return found

    def _cancel_target(self, buf: bytes | bytearray, start: int, end: int) -> object:
        """The id the ``$cancel`` frame ``buf[start:end]`` names, or ``None`` if it is
        another frame."""
        if not buf[start] or buf.find(b'"$cancel"', start, end) < 0:  # binary, or no $cancel
            return None
        try:
            request = self._decoder.decode(buf[start:end].decode())
        except (ValueError, RecursionError):
            return None
        if type(request) is not dict or request.get("command") != CANCEL_COMMAND:
            return None
        return request.get("id")

    def _take_answer(self, buf: bytes | bytearray, start: int, end: int) -> bool:
        """Settle the call the ``$callback`` frame ``buf[start:end]`` answers (binary values
        included); False if it is another frame, or one the serving loop will refuse."""
        if buf[start]:
            if buf.find(b'"$callback"', start, end) < 0:
                return False
        else:  # a binary frame: look in its envelope only
            envelope_end = (
                start + _BINARY_PREFIX + int.from_bytes(buf[start + 1 : start + 5], "big")
            )
            if buf.find(b'"$callback"', start + _BINARY_PREFIX, min(envelope_end, end)) < 0:
                return False
        try:
            message = self._decode(buf[start:end])
        except _StreamError:
            return False
        request_id = message.get("id")
        if message.get("command") != CALLBACK_COMMAND or type(request_id) is not int:
            return False
        _answer_call(self._calls, request_id, message.get("args"))
        return True


def _unsendable_args(name: str, exc: BaseException) -> Exception:
    kind = TypeError if isinstance(exc, TypeError) else ValueError
    return kind(f"callback {name!r}: args cannot be sent as JSON ({exc})")


def _uncancel() -> None:
    """The current task's cancellation became a :class:`CallbackError`: it is no longer being
    cancelled (``asyncio.timeout`` and task groups count cancellations)."""
    import asyncio

    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _describe_exception(exc: BaseException) -> str:
    """The message of an unexpected exception; a KeyError's bare ``'key'`` gets its type name."""
    text = str(exc)
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, LookupError) else text


def _log_traceback(name: str, exc: BaseException) -> None:
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    _log(f"command {name!r} failed:\n{text}")


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # A handler's coroutine that SIGTERM catches before it became a task (the first async
    # request still creating the loop) is dropped on the way out: say nothing of it, as of a
    # task left pending.
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
    raise SystemExit(0)


# -------------------------------------------------------------------------
# The concurrent worker (protocol 2, max_in_flight > 1)
# -------------------------------------------------------------------------

_QUEUED, _RUNNING, _ASYNC = "queued", "running", "async"


class _Request:
    """A request in flight in a concurrent worker.

    ``state`` says what a ``$cancel`` can do: drop it (``queued``), nothing (``running`` on a
    handler thread, which cannot be interrupted, except a generator between its items) or
    cancel its task (``async``). ``window`` is the stream window asked for, ``stream`` the
    generator's run once one drives it (what ``$credit`` reaches). The server's lock guards
    ``state``, ``task``, ``stream`` and ``cancel_requested``.
    """

    __slots__ = (
        "call_args", "cancel_requested", "func", "id", "name", "state", "stream", "task", "window",
    )  # fmt: skip

    def __init__(
        self,
        request_id: int,
        name: str,
        func: Handler,
        call_args: tuple[Any, ...],
        window: int | None,
    ) -> None:
        self.id = request_id
        self.name = name
        self.func = func
        self.call_args = call_args
        self.window = window
        self.state = _QUEUED
        self.task: asyncio.Task[Any] | None = None
        self.stream: _Stream | None = None
        self.cancel_requested = False


class _ConcurrentServer:
    """Serves up to ``max_in_flight`` requests at once, answering each when it is done.

    Threads, and who owns what:

    - the main thread reads and dispatches frames, runs ``ping`` and the other quick
      (``cancellable=False``) sync handlers inline, so a health check never waits behind a
      long handler, and handles ``$cancel``;
    - sync handlers run on up to ``min(N, 32)`` daemon handler threads, started as needed,
      taking requests from a queue in arrival order;
    - async handlers run as tasks on an event loop in a daemon thread of its own, created with
      the first one (a worker with only sync handlers never imports ``asyncio``);
    - generators run where the handler ran, sync ones on a handler thread (also those of a
      quick handler: the reading thread never waits for a stream's credit), async ones as a
      task; the reading thread hands them the ``$credit`` it reads, and a stream holds its
      handler thread or task until it ends;
    - whoever finishes a request appends its frame to the outbox, and everything there leaves
      with one write, made by the thread that made the replies when it can write without
      blocking (:meth:`_write_ready`): waking another thread costs more than the write. The
      main thread writes the replies of a read once it has served the read; the loop writes
      the replies of one loop turn together. What the output does not take at once, and every
      reply where non-blocking writes do not exist, is written by a daemon writer thread,
      which takes everything there when it wakes. One thread at a time writes (``_writing``).

    One lock guards the requests in flight, the queue, the outbox, ``_writing``, the
    ``handled`` counter and the credit of the streams on handler threads.
    """

    def __init__(self, worker: _Worker, max_in_flight: int) -> None:
        import threading
        from collections import deque

        self.worker = worker
        self.max_threads = min(max_in_flight, _MAX_HANDLER_THREADS)
        self._threading = threading
        self._lock = lock = threading.Lock()
        self._work = threading.Condition(lock)  # handler threads wait for requests
        self._output = threading.Condition(lock)  # the writer waits for replies
        self._settled = threading.Condition(lock)  # end of input waits for the last reply
        self._credited = threading.Condition(lock)  # streams on handler threads wait for credit
        self._inflight: dict[int, _Request] = {}
        self._queue: deque[_Request] = deque()
        self._threads = 0
        self._idle_threads = 0
        self._outbox: list[Frame] = []
        self._writing = False
        #: Whether threads write the replies they make themselves (until the output refuses a
        #: non-blocking write other than by being full).
        self._nowait = bool(_RWF_NOWAIT)
        self._loop_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: This loop turn's frames (answers and items, in order), and the requests answered.
        self._loop_frames: list[Frame] = []
        self._loop_done: list[_Request] = []
        #: The async requests and the credit for async streams of the read being served, for
        #: the loop (reading thread only).
        self._to_start: list[tuple[_Request, AsyncProducer | None]] = []
        self._to_credit: list[tuple[_Stream, int]] = []
        #: Set once the input has ended: a stream without credit can get none any more.
        self._input_ended = False
        #: The exit status once the writer has lost the output (None while it can write).
        self._lost: int | None = None
        self._wake_reader, self._wake_writer_end = os.pipe()
        self._poll = _poll_for_reading(worker.input_fd, self._wake_reader)
        #: Callbacks: the worker's table of pending calls, the reading thread (a quick handler
        #: that calls waits there by reading) and the last quick handler's request whose
        #: ``$cancel`` came while it waited (ids are unique: it needs no resetting).
        self._calls = worker._calls
        self._reader = _thread.get_ident()
        self._inline_cancelled: int | None = None
        worker._bridge = self
        threading.Thread(target=self._write_replies, name="snakepit-writer", daemon=True).start()

    # -- the reading thread -----------------------------------------------

    def serve(self) -> int:
        """Read and dispatch until end of input, then wait for every reply to be written."""
        worker = self.worker
        worker._read = self._read
        try:
            while True:
                frames = worker._next_frames()
                if frames is None:
                    return self._drain()
                self._serve_read(frames)
        except _OutputLost:
            return self._lost or 0

    def _serve_read(self, frames: list[bytes | bytearray]) -> None:
        """Dispatch the frames of one read, then start its tasks and write the replies that
        are ready, also when a frame cannot be decoded (the replies to the frames before it)."""
        try:
            for body in frames:
                self._dispatch(self.worker._decode(body))
        finally:
            if self._to_start or self._to_credit:
                self._start_read_tasks()
            if self._nowait and self._outbox:
                self._write_ready()

    def _read(self, fd: int, size: int) -> bytes:
        """``os.read`` that also returns (raising ``_OutputLost``) when the writer gives up.

        A pipe, not a signal, wakes this thread: on CPython 3.11 a signal sent from another
        thread while this one runs Python code can stay unhandled until input arrives, as
        another thread's GIL hand-off may reset the interpreter's pending-signal flag.
        """
        self._poll.poll()
        if self._lost is not None:  # set before the writer wakes this thread
            raise _OutputLost
        return os.read(fd, size)

    def _dispatch(self, request: dict[str, Any]) -> None:
        worker = self.worker
        try:
            request_id, name, entry, call_args, window = worker._route(request)
        except _Refused as refusal:
            return self._reply_here(
                None, worker._failure_frame(refusal.request_id, refusal.message)
            )
        if entry is None:
            if name == CANCEL_COMMAND:
                return self._cancel(request_id)
            if name == CALLBACK_COMMAND:
                return _answer_call(self._calls, request_id, request.get("args"))
            return self._credit(request_id, request)
        func, _, is_async, cancellable = entry
        if is_async:
            return self._start_async_later(
                _Request(request_id, name, func, call_args, window), None
            )
        if cancellable:
            return self._enqueue(_Request(request_id, name, func, call_args, window))
        return self._run_inline(request_id, name, func, call_args, window)

    def _drain(self) -> int:
        """End of input: answer what is in flight or queued, write it all, then exit 0.

        A stream waiting for credit can get none any more: it is cancelled (and so is one that
        runs out of credit later); so are the pending callback calls."""
        with self._lock:
            self._input_ended = True
            self._credited.notify_all()
            _fail_calls(self._calls, None, "input")
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake_streams)
        with self._lock:
            while (self._inflight or self._outbox or self._writing) and self._lost is None:
                self._settled.wait()
            return self._lost or 0

    # -- cancel -----------------------------------------------------------

    def _cancel(self, request_id: int) -> None:
        """Protocol 2 cancel: never answer ``cancelled`` while the handler still runs.

        A queued request is dropped and answered at once; a task is cancelled and answered
        when it has finished (:meth:`_task_done`); a handler running on a thread finishes and
        answers its real outcome, except a generator, which is stopped before its next item,
        closed and then answered ``cancelled``. An id not in flight is ignored. The request's
        pending callback calls fail with :class:`CallbackError` code ``cancelled``, so that a
        handler waiting for one can stop (a task's own is turned into it: see :meth:`call`).
        """
        with self._lock:
            request = self._inflight.get(request_id)
            if request is None:
                return
            request.cancel_requested = True
            if self._calls:
                _fail_calls(self._calls, request_id, "cancelled")
            if request.stream is not None:  # stopped before its next item
                request.stream.cancelled = True
                self._credited.notify_all()
            if request.state == _QUEUED:
                self._queue.remove(request)
                self._post(request, self.worker._failure_frame(request_id, "cancelled"))
                if not self._nowait:
                    self._output.notify()
                return
            if request.state != _ASYNC or self._loop is None:
                return
            loop = self._loop
        loop.call_soon_threadsafe(self._cancel_task, request)

    def _credit(self, request_id: int, request: dict[str, Any]) -> None:
        """``$credit``: a stream may send more items. A stream on a handler thread gets it at
        once; an async stream's goes to the loop with the read's other work. A credit for an
        id that is not streaming is ignored."""
        items = self.worker._credit_items(request_id, request)
        if not items:
            return
        with self._lock:
            target = self._inflight.get(request_id)
            if target is None or target.stream is None:
                return
            if target.state != _ASYNC:
                target.stream.granted += items
                self._credited.notify_all()
                return
        self._to_credit.append((target.stream, items))

    # -- sync handlers ----------------------------------------------------

    def _enqueue(self, request: _Request) -> None:
        """Queue a sync request for the handler threads, starting one if none is free."""
        start = False
        with self._lock:
            self._inflight[request.id] = request
            self._queue.append(request)
            if self._idle_threads >= len(self._queue):
                self._work.notify()
            elif self._threads < self.max_threads:
                self._threads += 1
                start = True
        if start:
            name = f"snakepit-handler-{self._threads}"
            self._threading.Thread(target=self._handler_thread, name=name, daemon=True).start()

    def _handler_thread(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._idle_threads += 1
                    try:
                        self._work.wait()
                    finally:
                        self._idle_threads -= 1
                request = self._queue.popleft()
                request.state = _RUNNING
            try:
                self._run_queued(request)
            except BaseException as exc:  # SystemExit and the like: a thread must still answer
                self._answer(request, self.worker._exception_frame(request.id, request.name, exc))

    def _run_queued(self, request: _Request) -> None:
        """On a handler thread: run a queued request and answer it."""
        outcome = self._call_sync(
            request.id, request.name, request.func, request.call_args, request.window
        )
        if type(outcome) is GeneratorType:
            outcome = self._generate(request, outcome)
        elif type(outcome) is not bytes and type(outcome) is not _Parts:
            return self._start_async(request, outcome)  # type: ignore[arg-type]
        self._answer(request, outcome)

    def _run_inline(
        self,
        request_id: int,
        name: str,
        func: Handler,
        call_args: tuple[Any, ...],
        window: int | None,
    ) -> None:
        """On the reading thread: run a quick (``cancellable=False``) handler and answer it.

        No ``$cancel`` can reach it (this thread reads them), so it needs no :class:`_Request`
        in flight, unless it returns a coroutine or a generator: a sync generator goes on to a
        handler thread, as this thread must not wait for a stream's credit.
        """
        outcome = self._call_sync(request_id, name, func, call_args, window)
        if type(outcome) is bytes or type(outcome) is _Parts:
            return self._reply_here(None, outcome)
        if type(outcome) is GeneratorType:
            return self._enqueue(_Request(request_id, name, _returned, (outcome,), window))
        request = _Request(request_id, name, func, call_args, window)
        self._start_async_later(request, outcome)  # type: ignore[arg-type]

    def _call_sync(
        self,
        request_id: int,
        name: str,
        func: Handler,
        call_args: tuple[Any, ...],
        window: int | None,
    ) -> Frame | Producer:
        """Call a sync handler: its answer, or what it returned to continue with: a generator
        to drive, or the coroutine (or async generator) of a sync wrapper around an async
        function, which continues as a task.

        Only ``Exception`` is answered here: on the main thread, SIGTERM's ``SystemExit`` must
        end the worker.
        """
        worker = self.worker
        try:
            result = func(*call_args)
        except Exception as exc:
            return worker._exception_frame(request_id, name, exc)
        if type(result) in _PRODUCERS:
            return result  # type: ignore[no-any-return]
        if window is None:
            return worker._success_frame(request_id, name, result)
        return worker._one_item_frames(request_id, name, result)

    # -- sync generators --------------------------------------------------

    def _generate(self, request: _Request, gen: Generator[Any, Any, Any]) -> Frame:
        """On a handler thread: drive a sync generator to its answer, streaming its items or,
        without ``meta.stream``, collecting them. A cancel stops it between items (not inside
        a ``next()``, which a thread cannot interrupt): it is closed, then answered."""
        worker = self.worker
        window = request.window
        stream = self._track(request, window)
        try:
            if window is None:
                result = _collect(gen, stream)
            else:
                result = self._stream_on_thread(request.id, gen, stream)
        except _Cancelled:
            return worker._failure_frame(request.id, "cancelled")
        except Exception as exc:
            return worker._exception_frame(request.id, request.name, exc)
        return worker._success_frame(request.id, request.name, result)

    def _track(self, request: _Request, window: int | None) -> _Stream:
        """The run of a generator starting: a ``$credit`` or ``$cancel`` reaches it from now
        on, and a cancel that came first is not lost."""
        stream = _Stream(_UNLIMITED if window is None else window)
        with self._lock:
            request.stream = stream
            stream.cancelled = request.cancel_requested
        return stream

    def _stream_on_thread(
        self, request_id: int, gen: Generator[Any, Any, Any], stream: _Stream
    ) -> Any:
        """Stream a sync generator's items, each written as it comes (its next one may take
        any time); its return value."""
        item_frame, emit = self.worker._item_frame, self._emit

        def send(item: Any) -> None:
            emit(item_frame(request_id, item))

        try:
            while True:
                value = _sync_burst(gen, stream, next, send)
                if value is not _NEEDS_CREDIT:
                    return value
                self._wait_for_credit(stream)
        except BaseException:
            gen.close()
            raise

    def _wait_for_credit(self, stream: _Stream) -> None:
        """On a handler thread: wait until the reading thread grants credit; ``_Cancelled``
        once the stream is cancelled or the input has ended."""
        with self._lock:
            while stream.sent >= stream.granted and not stream.cancelled:
                if self._input_ended:
                    raise _Cancelled
                self._credited.wait()

    def _emit(self, frame: Frame) -> None:
        """A handler thread's item frame: written at once, as an answer is (:meth:`_answer`),
        but the request stays in flight."""
        nowait = self._nowait
        with self._lock:
            self._outbox.append(frame)
            if not nowait:
                self._output.notify()
        if nowait:
            self._write_ready()

    # -- async handlers ---------------------------------------------------

    def _start_async(self, request: _Request, coro: AsyncProducer | None) -> None:
        """From a handler thread: hand a request to the event loop at once; ``coro`` is
        ``None`` to call an async handler."""
        self._as_task(request).call_soon_threadsafe(self._start_task, request, coro)

    def _start_async_later(self, request: _Request, coro: AsyncProducer | None) -> None:
        """On the reading thread: the request is in flight at once (a ``$cancel`` later in the
        read finds it), and goes to the loop with the read's other ones once the read is
        served (:meth:`_start_read_tasks`)."""
        self._as_task(request)
        self._to_start.append((request, coro))

    def _as_task(self, request: _Request) -> asyncio.AbstractEventLoop:
        """Put a request in flight as a task to come; the loop that will run it."""
        loop = self._event_loop()
        with self._lock:
            request.state = _ASYNC
            self._inflight[request.id] = request
        return loop

    def _start_read_tasks(self) -> None:
        """On the reading thread: hand the async requests and the async streams' credit of a
        read to the loop with one ``call_soon_threadsafe`` (one wake-up of the loop, not one
        per request)."""
        starts, self._to_start = self._to_start, []
        credits, self._to_credit = self._to_credit, []
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._start_tasks, starts, credits)

    def _start_tasks(
        self,
        starts: list[tuple[_Request, AsyncProducer | None]],
        credits: list[tuple[_Stream, int]],
    ) -> None:
        for request, coro in starts:
            self._start_task(request, coro)
        for stream, items in credits:
            stream.granted += items
            self._wake(stream)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None:
            return loop
        with self._loop_lock:
            if self._loop is None:
                import asyncio

                loop = asyncio.new_event_loop()
                name = "snakepit-asyncio"
                self._threading.Thread(
                    target=_run_loop, args=(loop,), name=name, daemon=True
                ).start()
                self._loop = loop
            return self._loop

    def _start_task(self, request: _Request, coro: AsyncProducer | None) -> None:
        """On the loop: create the request's task (cancelled at once if a cancel came first);
        an async generator's task drives it."""
        loop = self._loop
        assert loop is not None
        try:
            if coro is None:
                coro = request.func(*request.call_args)
            if type(coro) is AsyncGeneratorType:
                if request.window is None:
                    coro = _collect_async(coro, self._track(request, None))
                else:
                    coro = self._stream_on_loop(request, coro)
            task = loop.create_task(coro)  # type: ignore[arg-type]
        except Exception as exc:  # an async callable object that fails before its coroutine
            return self._batch(request, self.worker._exception_frame(request.id, request.name, exc))
        with self._lock:
            request.task = task
            cancel = request.cancel_requested
        if cancel:
            task.cancel()
        task.add_done_callback(lambda done: self._task_done(request, done))

    def _cancel_task(self, request: _Request) -> None:
        """On the loop: cancel the request's task; it is answered when it has finished."""
        if request.task is not None:
            request.task.cancel()

    def _task_done(self, request: _Request, task: asyncio.Task[Any]) -> None:
        """On the loop: the task has finished, so its answer is its true outcome: a handler
        that swallowed the cancel and returned is answered with its result."""
        worker = self.worker
        frame: Frame
        if task.cancelled():
            frame = worker._failure_frame(request.id, "cancelled")
        elif (exc := task.exception()) is not None:
            frame = worker._exception_frame(request.id, request.name, exc)
        elif request.window is not None and request.stream is None:  # a plain handler
            frame = worker._one_item_frames(request.id, request.name, task.result())
        else:  # a result, or the end of a generator's run
            frame = worker._success_frame(request.id, request.name, task.result())
        self._batch(request, frame)

    def _batch(self, request: _Request, frame: Frame) -> None:
        """On the loop: an answer of this turn; one callback posts the turn's frames together."""
        self._batch_item(frame)
        self._loop_done.append(request)

    def _batch_item(self, frame: Frame) -> None:
        """On the loop: a frame of this turn (an item, or an answer via :meth:`_batch`)."""
        if not self._loop_frames:
            assert self._loop is not None
            self._loop.call_soon(self._flush_batch)
        self._loop_frames.append(frame)

    def _flush_batch(self) -> None:
        frames, self._loop_frames = self._loop_frames, []
        done, self._loop_done = self._loop_done, []
        nowait = self._nowait
        with self._lock:
            for request in done:
                self._finish(request)
            self._outbox += frames
            if not nowait:
                self._output.notify()
        if nowait:
            self._write_ready()

    # -- async generators -------------------------------------------------

    async def _stream_on_loop(self, request: _Request, agen: AsyncGenerator[Any, Any]) -> None:
        """Stream an async generator's items as a task; those of one loop turn leave together."""
        stream = self._track(request, request.window)
        request_id, item_frame, batch_item = request.id, self.worker._item_frame, self._batch_item

        def send(item: Any) -> None:
            batch_item(item_frame(request_id, item))

        try:
            while await _async_burst(agen, stream, send) is _NEEDS_CREDIT:
                await self._credit_on_loop(stream)
        except BaseException:
            await agen.aclose()
            raise

    async def _credit_on_loop(self, stream: _Stream) -> None:
        """Wait for the credit the reading thread hands the loop (:meth:`_start_tasks`); a
        cancel cancels the task, and the end of input raises ``CancelledError``."""
        loop = self._loop
        assert loop is not None
        while stream.sent >= stream.granted and not stream.cancelled:
            if self._input_ended:
                import asyncio

                raise asyncio.CancelledError
            stream.waiter = loop.create_future()
            try:
                await stream.waiter
            finally:
                stream.waiter = None

    def _wake(self, stream: _Stream) -> None:
        """On the loop: a stream waiting for credit looks again."""
        waiter = stream.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_streams(self) -> None:
        """On the loop, at the end of input: every async stream waiting for credit stops."""
        with self._lock:
            streams = [r.stream for r in self._inflight.values() if r.stream is not None]
        for stream in streams:
            self._wake(stream)

    # -- replies ----------------------------------------------------------

    def _answer(self, request: _Request | None, frame: Frame) -> None:
        """A handler thread's reply: it writes it itself if it can without blocking, else
        the writer thread does."""
        nowait = self._nowait
        with self._lock:
            self._post(request, frame)
            if not nowait:
                self._output.notify()
        if nowait:
            self._write_ready()

    def _reply_here(self, request: _Request | None, frame: Frame) -> None:
        """A reply made on the reading thread. It leaves with the other replies of the read
        being served, once that read is served (:meth:`_serve_read`); the handlers run here
        are quick by their contract. Without non-blocking writes, the writer thread writes
        it."""
        with self._lock:
            self._post(request, frame)
            if not self._nowait:
                self._output.notify()

    def _post(self, request: _Request | None, frame: Frame) -> None:
        """With the lock held: ``request`` is no longer in flight; its reply goes to the outbox."""
        self._finish(request)
        self._outbox.append(frame)

    def _finish(self, request: _Request | None) -> None:
        """With the lock held: ``request`` (``None``: a refused one) has been answered; the
        calls it left pending (a task's nobody awaited, a thread's it started) get no answer."""
        if request is not None and self._inflight.get(request.id) is request:
            del self._inflight[request.id]
            if self._calls:
                _fail_calls(self._calls, request.id, "ended")
        self.worker.handled += 1

    def _write_ready(self) -> None:
        """Write what the outbox holds without blocking, on the thread that made the replies:
        waking the writer thread costs more than the write.

        While another thread writes, this does nothing: that one also writes what came
        meanwhile. What the output does not take at once is left to the writer thread, which
        also reports a broken output; an output that refuses ``RWF_NOWAIT`` (an older kernel)
        leaves every later reply to it too.
        """
        frames = self._claim_output()
        while frames:
            data = _joined(frames)
            frames = self._after_write(data, self._write_nowait(data))

    def _claim_output(self) -> list[Frame]:
        """The replies in the outbox, for the caller to write, unless another thread writes."""
        with self._lock:
            if self._writing or not self._outbox:
                return []
            self._writing = True
            frames, self._outbox = self._outbox, []
            return frames

    def _write_nowait(self, data: Frame) -> int:
        """How much of ``data`` the output took without blocking."""
        buffers = [data] if isinstance(data, bytes) else data[:_IOV_MAX]
        try:
            return os.pwritev(self.worker.output_fd, buffers, -1, _RWF_NOWAIT)
        except BlockingIOError:  # the pipe is full: the pool reads it soon, or never
            return 0
        except OSError:
            self._nowait = False
            return 0

    def _after_write(self, data: Frame, written: int) -> list[Frame]:
        """The replies that came during a write, to write next; none when the outbox is
        empty, or when the output did not take all of ``data``: the rest goes back to the
        writer thread."""
        size = _size(data)
        with self._lock:
            if written == size and self._outbox:
                frames, self._outbox = self._outbox, []
                return frames
            self._writing = False
            if written < size:
                rest = data[written:] if type(data) is bytes else _rest(data, written)  # type: ignore[arg-type]
                self._outbox.insert(0, rest)
                self._output.notify()
            else:
                self._settled.notify_all()  # end of input may wait for the last reply
            return []

    def _write_replies(self) -> None:
        """The writer thread: everything in the outbox goes out with one write."""
        fd = self.worker.output_fd
        while True:
            frames = self._take_replies()
            try:
                _write_all(fd, _joined(frames))
            except OSError as exc:
                return self._output_lost(exc)
            with self._lock:
                self._writing = False

    def _take_replies(self) -> list[Frame]:
        """The writer thread: wait until the outbox holds replies and no other thread writes,
        then take them."""
        with self._lock:
            while not self._outbox or self._writing:
                if not self._writing:
                    self._settled.notify_all()  # idle: end of input may wait for this
                self._output.wait()
            frames, self._outbox = self._outbox, []
            self._writing = True
            return frames

    def _output_lost(self, exc: OSError) -> None:
        """No reply can arrive any more, so the worker exits instead of finishing handlers
        nobody waits for: status 0 if the pool stopped reading (as one request at a time
        does), 1 with a log line if the output broke otherwise."""
        status = 0
        if not isinstance(exc, BrokenPipeError):
            _log(f"cannot write replies: {exc}; exiting with status 1")
            status = 1
        with self._lock:
            self._lost = status
            self._settled.notify_all()
        os.write(self._wake_writer_end, b"x")

    # -- callbacks --------------------------------------------------------

    def call_sync(self, request_id: int, name: str, args: dict[str, Any]) -> Any:
        """``ctx.call_sync`` at concurrency > 1: send the call, then wait for the reading
        thread to settle it; on the reading thread itself (a quick handler), read until its
        answer comes. On the event loop's thread it would deadlock: ``RuntimeError``."""
        loop = self._loop
        if loop is not None:
            import asyncio

            if asyncio.events._get_running_loop() is loop:
                raise RuntimeError(_ON_LOOP)
        reading = _thread.get_ident() == self._reader
        number = next(self.worker._call_numbers)
        call = _Call(request_id, name, None if reading else self._threading.Lock())
        if call.lock is not None:
            call.lock.acquire()
        self._calls[number] = call  # before the check: a $cancel coming meanwhile fails it
        try:
            refusal = self._refusal(request_id, reading)
            if refusal is not None:
                raise _cancelled_error(name, request_id, refusal)
            self._emit(self.worker._call_frame(request_id, number, name, args, True))
            if reading:
                self._read_for(call)
            else:
                call.lock.acquire()
        finally:
            self._calls.pop(number, None)
        return call.outcome()

    async def call(self, request_id: int, name: str, args: dict[str, Any]) -> Any:
        """``await ctx.call`` at concurrency > 1: the call frame leaves with the other frames
        of this loop turn; the reading thread settles the call. A ``$cancel`` of the request
        cancels the task and fails the call; the ``CancelledError`` this raises then becomes
        :class:`CallbackError` code ``cancelled`` (with the task's cancellation withdrawn)."""
        import asyncio

        loop = asyncio.get_running_loop()
        number = next(self.worker._call_numbers)
        call = _LoopCall(request_id, name, loop)
        self._calls[number] = call  # before the check: a $cancel coming meanwhile fails it
        try:
            refusal = self._refusal(request_id, False)
            if refusal is not None:
                raise _cancelled_error(name, request_id, refusal)
            frame = self.worker._call_frame(request_id, number, name, args, False)
            if loop is self._loop:
                self._batch_item(frame)
            else:  # a loop of the handler's own, on one of its threads
                self._emit(frame)
            return await call.future
        except asyncio.CancelledError:
            if self._refusal(request_id, False) != "cancelled":
                raise
            _uncancel()
            raise _cancelled_error(name, request_id, "cancelled") from None
        finally:
            self._calls.pop(number, None)

    def _refusal(self, request_id: int, reading: bool) -> str | None:
        """Why a call of ``request_id`` fails at once (``None``: it does not). A request not
        in flight has ended, unless the call comes from the reading thread: the quick handler
        running there, which is never in flight."""
        request = self._inflight.get(request_id)
        if request is None:
            if reading:
                return "cancelled" if request_id == self._inline_cancelled else None
            return "ended"
        return "cancelled" if request.cancel_requested else None

    def _read_for(self, call: _Call) -> None:
        """On the reading thread, in a quick handler's ``ctx.call_sync``: read and serve the
        protocol's frames until ``call`` is settled. Requests wait until the handler has
        returned (they are put back in front of the input, after the rest of the read being
        served), as they do behind any quick handler; credit and the tasks of the frames read
        go out at once."""
        worker = self.worker
        try:
            while not call.settled:
                try:
                    body = worker._next_frame()
                    if body is None:
                        _fail_calls(self._calls, call.request_id, "input")
                        break
                    request = worker._decode(body)
                    name = request.get("command")
                    if name == CALLBACK_COMMAND:
                        _answer_call(self._calls, _request_id(request), request.get("args"))
                    elif name == CANCEL_COMMAND:
                        target = _request_id(request)
                        if target == call.request_id:
                            self._inline_cancelled = target
                            _fail_calls(self._calls, target, "cancelled")
                        else:
                            self._cancel(target)
                    elif name == CREDIT_COMMAND:
                        self._credit(_request_id(request), request)
                    else:
                        worker._deferred.append(body)
                except _StreamError as fault:
                    worker._buf, worker._read = b"", _raising(fault)
                    _fail_calls(self._calls, call.request_id, "input")
                    break
                if self._to_start or self._to_credit:
                    self._start_read_tasks()
                if self._nowait and self._outbox:
                    self._write_ready()
        finally:
            worker._serve_deferred()


def _poll_for_reading(*fds: int) -> select.poll:
    """A poll object for ``fds`` (``poll``, not ``select``: it takes fds beyond 1024)."""
    import select

    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return poller


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    import asyncio

    asyncio.set_event_loop(loop)
    loop.run_forever()


# -------------------------------------------------------------------------
# Entry points
# -------------------------------------------------------------------------

_WORKER: _Worker | None = None


def run() -> NoReturn:
    """Serve the registered commands on stdin/stdout until end of input, then exit.

    Exits 0 on end of input or SIGTERM, 3 on a frame that cannot be decoded, and 2 before
    reading anything if a command could not be registered, ``SNAKEPIT_MAX_FRAME_BYTES`` is
    not a positive integer, or ``SNAKEPIT_MAX_PAYLOAD_BYTES``, ``SNAKEPIT_TEXT_THRESHOLD``,
    ``SNAKEPIT_SHM_THRESHOLD`` or ``SNAKEPIT_SHM_PREFIX`` is not what the pool gives. Output
    from before this call is flushed to stderr if it is still buffered; with unbuffered stdout
    (``PYTHONUNBUFFERED``) it has already reached the pool, so print nothing at import time.
    """
    global _WORKER
    try:
        _check_registrations()
        max_frame = _max_frame_bytes()
        lanes = _lanes()
    except _BadStart as problem:
        _log(f"{problem}; exiting with status {EXIT_BAD_START}")
        sys.exit(EXIT_BAD_START)
    input_fd, output_fd = _protect_stdio()
    _WORKER = _Worker(input_fd, output_fd, max_frame, lanes)
    sys.exit(_WORKER.serve())


def status() -> dict[str, Any]:
    """``worker_id``, ``pid``, ``uptime`` (s), ``requests_handled`` and sorted ``commands``
    of the running worker, for handlers that report on it (the bundled ``info``)."""
    if _WORKER is None:
        raise RuntimeError("status() is only available while run() serves requests")
    return _WORKER.status()
