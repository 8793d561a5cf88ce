"""The bridge library: everything a Python worker needs except its handlers.

It implements docs/PROTOCOL.md: length-prefixed JSON frames on private copies of stdin/stdout,
the ``ping`` handshake, ``$cancel``, deadlines, error mapping and stdout protection. Workers
import this module at start-up, so it uses only cheap standard-library modules; ``asyncio`` is
imported on the first async handler call and ``inspect``/``traceback`` only on rare paths.

Performance shapes the serving loop: it reads on the main thread with blocking ``os.read``,
looks the handler up in a dict, calls sync handlers inline and answers with one ``os.write``.
Cancellation costs nothing while idle: only while a cancellable handler runs is the input fd
switched to non-blocking + ``O_ASYNC``, so a ``SIGIO`` handler can read a ``$cancel`` and raise
into the handler (or cancel the async task).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from types import CoroutineType

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Coroutine
    from types import FrameType
    from typing import Any, NoReturn, TypeVar, overload

    Handler = Callable[..., Any]
    H = TypeVar("H", bound=Handler)
else:

    def overload(func):  # typing.overload without typing's ~5 ms import at worker start-up
        return func


__all__ = ["CommandError", "Context", "command", "run", "status"]

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
CANCEL_COMMAND = "$cancel"
CAPABILITIES = ("cancel",)
RUNTIME = "python"
EXIT_PROTOCOL_FAULT = 3
EXIT_BAD_START = 2

_READ_SIZE = 65536
#: While a handler runs, stop reading ahead once this much input is buffered (the pool sends
#: nothing but ``$cancel`` then; the rest can wait in the pipe for the serving loop).
_SCAN_LIMIT = 1024 * 1024
_CO_VARARGS = 0x04
_CO_COROUTINE = 0x80
# Linux: direct SIGIO at one thread (F_SETOWN_EX, F_OWNER_TID); the main thread's id is the pid.
_F_SETOWN_EX = 15
_F_OWNER_TID = 0


class CommandError(Exception):
    """An expected failure: the message is sent as ``"<command>: <message>"``, nothing is logged.

    Any other exception is answered the same way, with its traceback logged to stderr.
    """


class _Cancelled(BaseException):
    """Raised into a sync handler whose request was cancelled.

    A ``BaseException`` so that a handler's ``except Exception`` does not swallow it.
    """


class _StreamError(Exception):
    """The input stream cannot be trusted any more (PROTOCOL.md: exit with status 3)."""


class _Refused(Exception):
    """A request that is answered with a failure before any handler runs (a bad envelope)."""

    def __init__(self, request_id: int, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.message = message


class Context:
    """What a handler may want to know about its request besides ``args``.

    ``deadline`` is the caller's time budget left *now*, in seconds (it may go negative), or
    ``None`` without one; it is counted from when the bridge received the request, on the
    monotonic clock, because the pool sends ``deadline_ms`` as the budget left at sending time.
    """

    __slots__ = ("_expires", "deadline_ms", "request_id", "traceparent", "tracestate", "worker_id")
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

    @property
    def deadline(self) -> float | None:
        """Seconds left of the caller's budget, or ``None`` if the request has no deadline."""
        expires = self._expires
        return None if expires is None else expires - time.monotonic()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"Context({fields})"


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

    A handler takes ``(args)`` or ``(args, ctx)`` and may be ``async``. ``cancellable=False``
    marks a sync handler that always finishes quickly: it skips the two ``fcntl`` calls per
    request that make ``$cancel`` able to interrupt it.

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
    """``(wants_ctx, is_async)`` read from the code object, to keep ``inspect`` out of start-up."""
    code = getattr(getattr(func, "__func__", func), "__code__", None)
    if code is None:  # functools.partial, callable objects, builtins
        return _describe_with_inspect(func)
    positional = code.co_argcount - (1 if hasattr(func, "__self__") else 0)
    takes_varargs = bool(code.co_flags & _CO_VARARGS)
    if positional < 1 and not takes_varargs:
        raise TypeError(f"handler {func!r} must accept (args) or (args, ctx)")
    return positional >= 2 or takes_varargs, bool(code.co_flags & _CO_COROUTINE)


def _describe_with_inspect(func: Handler) -> tuple[bool, bool]:
    import inspect

    kinds = [param.kind for param in inspect.signature(func).parameters.values()]
    positional = sum(kind <= inspect.Parameter.POSITIONAL_OR_KEYWORD for kind in kinds)
    takes_varargs = inspect.Parameter.VAR_POSITIONAL in kinds
    if positional < 1 and not takes_varargs:
        raise TypeError(f"handler {func!r} must accept (args) or (args, ctx)")
    call = getattr(func, "__call__", None)  # noqa: B004 - the callable object's own method
    is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(call)
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


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    if written < len(data):
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view) :]


# -------------------------------------------------------------------------
# The worker: one request at a time
# -------------------------------------------------------------------------


class _Worker:
    """Serves requests on the protocol fds until end of input."""

    def __init__(self, input_fd: int, output_fd: int, max_frame: int) -> None:
        self.input_fd = input_fd
        self.output_fd = output_fd
        self.max_frame = max_frame
        self.worker_id = os.environ.get("SNAKEPIT_WORKER_ID", "")
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.handled = 0
        self.commands: dict[str, tuple[Handler, bool, bool, bool]] = {
            "ping": (self.ping, False, False, False),
            **_COMMANDS,
        }
        self._decoder = json.JSONDecoder(parse_constant=_refuse_constant)
        self._encoder = json.JSONEncoder(allow_nan=False)
        self._buf = b""  # input read but not yet served
        # Cancellation state, shared with the SIGIO handler.
        self._armed = False
        self._scanning = False
        self._missed = False
        self._running_id = -1
        self._scan_pos = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
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
        """Answer requests until end of input; return the exit status."""
        try:
            while True:
                body = self._next_frame()
                if body is None:
                    return 0
                self._handle(self._decode(body))
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
            data = os.read(self.input_fd, _READ_SIZE)
            if not data:
                if buf:
                    raise _StreamError(f"input ended inside a frame ({size} bytes pending)")
                return None
            buf = buf + data if buf else data

    def _read_rest(self, head: bytes, end: int) -> bytearray:
        """Read exactly the rest of a frame into one buffer (no quadratic concatenation)."""
        frame = bytearray(end)
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
        try:
            request = self._decoder.decode(body.decode())
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise _StreamError(f"undecodable frame: {exc}") from None
        if type(request) is not dict:
            raise _StreamError(f"frame is not a JSON object but {type(request).__name__}")
        return request

    def _handle(self, request: dict[str, Any]) -> None:
        """Answer one request (``$cancel`` is never answered)."""
        try:
            request_id, name, entry, call_args = self._route(request)
        except _Refused as refusal:
            return self._write(self._failure_frame(refusal.request_id, refusal.message))
        if entry is None:
            return None  # a $cancel, and the request it names is not running: ignore
        try:
            result = self._invoke(entry, call_args, request_id)
        except _Cancelled:
            self._disarm()  # a cancel may land before the disarm in _call_armed ran
            return self._write(self._failure_frame(request_id, "cancelled"))
        except Exception as exc:
            return self._write(self._exception_frame(request_id, name, exc))
        return self._write(self._success_frame(request_id, name, result))

    def _route(
        self, request: dict[str, Any]
    ) -> tuple[int, str, tuple[Handler, bool, bool, bool] | None, tuple[Any, ...]]:
        """``(id, command, handler entry, call arguments)``; the entry is ``None`` for a
        ``$cancel``. Raises ``_Refused`` for a request answered with a failure at once."""
        request_id = request.get("id")
        name = request.get("command")
        if type(request_id) is not int:
            raise _StreamError(f"request without an integer 'id': {str(request)[:200]}")
        if type(name) is not str:
            raise _Refused(request_id, "request 'command' must be a string")
        entry = self.commands.get(name)
        if entry is None:
            if name == CANCEL_COMMAND:
                return request_id, name, None, ()
            raise _Refused(request_id, self._unknown(name))
        args = request.get("args")
        if args is None:
            args = {}
        elif type(args) is not dict:
            raise _Refused(request_id, f"{name}: args must be a JSON object")
        if entry[1]:  # wants_ctx
            return request_id, name, entry, (args, self._context(request_id, request))
        return request_id, name, entry, (args,)

    def _unknown(self, name: str) -> str:
        supported = ", ".join(sorted(self.commands))
        return f"unknown command {name!r} (supported: {supported})"

    def _invoke(
        self, entry: tuple[Handler, bool, bool, bool], call_args: tuple[Any, ...], request_id: int
    ) -> Any:
        func, _, is_async, cancellable = entry
        if is_async:
            return self._run_async(func(*call_args), request_id)
        if not cancellable:
            result = func(*call_args)
        else:
            result = self._call_armed(func, call_args, request_id)
        if type(result) is CoroutineType:  # a sync wrapper around an async function
            return self._run_async(result, request_id)
        return result

    def _context(self, request_id: int, request: dict[str, Any]) -> Context:
        meta = request.get("meta")
        if type(meta) is not dict:
            return Context(request_id, self.worker_id)
        return Context(
            request_id,
            self.worker_id,
            meta.get("traceparent"),
            meta.get("tracestate"),
            meta.get("deadline_ms"),
        )

    # -- envelopes ----------------------------------------------------------

    def _success_frame(self, request_id: int, name: str, result: Any) -> bytes:
        try:
            body = self._encoder.encode({"id": request_id, "success": True, "result": result})
        except (TypeError, ValueError, RecursionError) as exc:
            return self._failure_frame(request_id, f"{name}: result cannot be sent as JSON ({exc})")
        data = body.encode()
        if len(data) > self.max_frame:
            return self._failure_frame(
                request_id,
                f"{name}: response of {len(data)} bytes exceeds the frame limit "
                f"of {self.max_frame} bytes",
            )
        return _frame(data)

    def _failure_frame(self, request_id: int, message: str) -> bytes:
        body = {"id": request_id, "success": False, "error": message}
        return _frame(self._encoder.encode(body).encode())

    def _exception_frame(self, request_id: int, name: str, exc: BaseException) -> bytes:
        """The failure for a handler's exception; an unexpected one logs its traceback."""
        if isinstance(exc, CommandError):
            return self._failure_frame(request_id, f"{name}: {exc}")
        _log_traceback(name, exc)
        return self._failure_frame(request_id, f"{name}: {_describe_exception(exc)}")

    def _write(self, frame: bytes) -> None:
        """Write one frame; counts the request as handled."""
        _write_all(self.output_fd, frame)
        self.handled += 1

    # -- built-in: the handshake -------------------------------------------

    def ping(self, args: dict[str, Any]) -> dict[str, Any]:
        """The handshake and liveness check; records the worker id the pool assigns."""
        worker_id = args.get("worker_id")
        if isinstance(worker_id, str):
            self.worker_id = worker_id
        return {
            "status": "ok",
            "uptime": time.monotonic() - self.started,
            # Counts this request too, as every bundled bridge does.
            "requests_handled": self.handled + 1,
            "worker_id": self.worker_id,
            "runtime": RUNTIME,
            "capabilities": list(CAPABILITIES),
            "pid": self.pid,
        }

    def status(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "pid": self.pid,
            "uptime": time.monotonic() - self.started,
            "requests_handled": self.handled + 1,
            "commands": sorted(self.commands),
        }

    # -- cancellation -----------------------------------------------------

    def _call_armed(self, func: Handler, call_args: tuple[Any, ...], request_id: int) -> Any:
        """Call a sync handler with ``$cancel`` able to raise ``_Cancelled`` into it."""
        try:
            self._arm(request_id)
            return func(*call_args)
        finally:
            self._disarm()

    def _run_async(self, coro: Coroutine[Any, Any, Any], request_id: int) -> Any:
        """Run a coroutine on the persistent loop; ``$cancel`` cancels its task."""
        import asyncio

        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
        task = self._task = loop.create_task(coro)
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
            if self._task is None:
                raise _Cancelled
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._task.cancel)

    def _read_pending(self) -> None:
        while len(self._buf) < _SCAN_LIMIT:
            try:
                data = os.read(self.input_fd, _READ_SIZE)
            except BlockingIOError:
                return
            if not data:
                return
            self._buf += data

    def _take_cancel(self) -> bool:
        """Remove complete ``$cancel`` frames from the buffer; True if one names the running id.

        Other frames stay for the serving loop, which also reports any undecodable one.
        """
        buf, pos, found = self._buf, self._scan_pos, False
        while len(buf) - pos >= 4:
            length = int.from_bytes(buf[pos : pos + 4], "big")
            end = pos + 4 + length
            if length > self.max_frame or end > len(buf):
                break
            request_id = self._cancel_target(buf[pos + 4 : end])
            if request_id is None:
                pos = end
                continue
            buf = buf[:pos] + buf[end:]
            found = found or request_id == self._running_id
        self._buf, self._scan_pos = buf, pos
        return found

    def _cancel_target(self, body: bytes) -> object:
        """The id a ``$cancel`` frame names, or ``None`` if ``body`` is another frame."""
        if b'"$cancel"' not in body:
            return None
        try:
            request = self._decoder.decode(body.decode())
        except (ValueError, RecursionError):
            return None
        if type(request) is not dict or request.get("command") != CANCEL_COMMAND:
            return None
        return request.get("id")


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
    raise SystemExit(0)


# -------------------------------------------------------------------------
# Entry points
# -------------------------------------------------------------------------

_WORKER: _Worker | None = None


def run() -> NoReturn:
    """Serve the registered commands on stdin/stdout until end of input, then exit.

    Exits 0 on end of input or SIGTERM, 3 on a frame that cannot be decoded, and 2 before
    reading anything if a command could not be registered or ``SNAKEPIT_MAX_FRAME_BYTES`` is
    not a positive integer. Output from before this call is flushed to stderr if it is still
    buffered; with unbuffered stdout (``PYTHONUNBUFFERED``) it has already reached the pool, so
    print nothing at import time.
    """
    global _WORKER
    try:
        _check_registrations()
        max_frame = _max_frame_bytes()
    except _BadStart as problem:
        _log(f"{problem}; exiting with status {EXIT_BAD_START}")
        sys.exit(EXIT_BAD_START)
    input_fd, output_fd = _protect_stdio()
    _WORKER = _Worker(input_fd, output_fd, max_frame)
    sys.exit(_WORKER.serve())


def status() -> dict[str, Any]:
    """``worker_id``, ``pid``, ``uptime`` (s), ``requests_handled`` and sorted ``commands``
    of the running worker, for handlers that report on it (the bundled ``info``)."""
    if _WORKER is None:
        raise RuntimeError("status() is only available while run() serves requests")
    return _WORKER.status()
