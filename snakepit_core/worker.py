"""One worker process: spawn, handshake, the requests in flight on it, stderr, stop.

The worker runs in its own process group so that stopping it also stops anything it started.
stdout carries frames only; stderr is forwarded line by line, prefixed with the worker id, to
the parent's stderr (so a ``print`` in a handler is visible by default) or to ``logging``
(``worker_output``), and its recent lines are kept (bounded) for error messages. All reads go
through one asyncio subprocess protocol, so a worker costs no task of its own.

A protocol-2 bridge (it answers the handshake with ``"protocol": 2``) takes up to
``capacity`` requests at once, answered in any order and matched by id; frames produced in one
loop iteration are written with one system call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from .adapter import Adapter
from .binary import (
    DEFERRED_KEY,
    TEXT_THRESHOLD,
    Attachment,
    Deferred,
    check_payload,
    close_deferred,
    encode_binary_frame,
    place_deferred,
    read_deferred,
)
from .config import PoolConfig
from .errors import (
    ProtocolError,
    SnakepitError,
    StartupError,
    ValidationError,
    WorkerCrashed,
    WorkerTimeout,
)
from .json_values import PLAIN, CheckedArguments, check_arguments, format_path
from .launcher import launch_argv
from .protocol import FrameDecoder, check_response, encode_frame, get_codec
from .registry import get_registry
from .shm import SHM_ROOT, STAGE_BYTES, Segments, get_shared_memory
from .watchdog import get_watchdog

if TYPE_CHECKING:
    from .streams import StreamItems

log = logging.getLogger("snakepit.worker")
stderr_log = logging.getLogger("snakepit.worker.stderr")

STDERR_TAIL_LINES = 200
#: A stderr line longer than this is logged in pieces, so one huge line cannot stall anything.
STDERR_MAX_LINE = 64 * 1024
#: How long to wait for the pipes to drain after the process exited (a grandchild may hold them).
DRAIN_AFTER_EXIT = 0.2


def describe_exit(exit_code: int | None) -> str:
    """``exit code 3`` or ``signal SIGKILL`` for a subprocess return code."""
    if exit_code is None:
        return "unknown exit status"
    if exit_code < 0:
        try:
            return f"signal {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"signal {-exit_code}"
    return f"exit code {exit_code}"


def terminate_process_groups(pids: list[int], grace: float) -> None:
    """Synchronously SIGTERM the process groups led by ``pids``, then SIGKILL what remains."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    remaining = list(pids)
    while remaining and time.monotonic() < deadline:
        remaining = [pid for pid in remaining if _group_alive(pid)]
        time.sleep(0.01)
    for pid in remaining:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def offered_environment(
    worker_id: str, run_id: str, config: PoolConfig, segments: Segments | None
) -> dict[str, str]:
    """What the pool tells a worker in its environment (docs/PROTOCOL.md)."""
    offered = {
        "SNAKEPIT_WORKER_ID": worker_id,
        "SNAKEPIT_RUN_ID": run_id,
        "SNAKEPIT_MAX_FRAME_BYTES": str(config.max_frame_bytes),
        "SNAKEPIT_MAX_PAYLOAD_BYTES": str(config.max_payload_bytes),
        "SNAKEPIT_TEXT_THRESHOLD": str(TEXT_THRESHOLD),
    }
    if segments is not None:
        offered.update(segments.environment())
    return offered


class _WorkerProtocol(asyncio.SubprocessProtocol):
    """Routes the subprocess's events to its :class:`Worker`."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Runs before any other callback of the process (even process_exited of a worker that
        # exits at once), and before subprocess_exec returns to Worker.start.
        self.worker._on_connected(transport)  # type: ignore[arg-type]

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.worker._on_stdout(data)
        else:
            self.worker._on_stderr(data)

    def process_exited(self) -> None:
        self.worker._on_process_exited()

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker._finish()


class _DirectStdout(asyncio.Protocol):
    """The stdout pipe's protocol: each read reaches the worker in the read's own callback.

    asyncio's subprocess transport defers every read by a loop iteration (``call_soon``),
    one iteration per answer at one request in flight; the rest of the pipe's events still go
    to asyncio's own pipe protocol, which tracks the pipe for the transport.
    """

    def __init__(self, worker: Worker, inner: asyncio.BaseProtocol) -> None:
        self.worker = worker
        self.inner = inner

    def data_received(self, data: bytes) -> None:
        self.worker._on_stdout(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def _read_stdout_directly(worker: Worker, transport: asyncio.SubprocessTransport) -> None:
    """Give ``transport``'s stdout pipe a :class:`_DirectStdout`. Called from the subprocess
    protocol's ``connection_made``, which runs before any read of the pipe is delivered, so
    no read can overtake one still deferred. A loop whose pipes cannot change protocol keeps
    its own delivery."""
    pipe = transport.get_pipe_transport(1)
    if not isinstance(pipe, asyncio.ReadTransport):
        return
    with contextlib.suppress(AttributeError, NotImplementedError):
        pipe.set_protocol(_DirectStdout(worker, pipe.get_protocol()))


class Worker:
    """A started (or starting) worker process. Created and driven by the pool."""

    def __init__(
        self,
        adapter: Adapter,
        worker_id: str,
        config: PoolConfig,
        *,
        run_id: str,
        slot: str = "0",
        on_answer: Callable[[Worker], None],
        on_stuck: Callable[[Worker], None],
        on_exit: Callable[[Worker], None],
        watch_deadline: Callable[[float], None],
        on_callback: Callable[[Worker, Any, dict[str, Any]], None] | None = None,
    ) -> None:
        self.adapter = adapter
        self.id = worker_id
        self.config = config
        self.run_id = run_id
        #: Position in the pool; a replacement takes the slot of the worker it replaces.
        self.slot = slot
        self._on_answer = on_answer
        self._on_stuck = on_stuck
        self._on_exit_callback = on_exit
        self._watch_deadline = watch_deadline
        #: Hears of callback calls (PROTOCOL.md, *Callbacks*): the worker, the calling
        #: request's ``caller`` (None if it is not in flight) and the frame.
        self._on_callback = on_callback
        #: Requests it takes at once (set by the handshake) and slots the dispatcher has taken.
        self.capacity = 1
        self.reserved = 0
        self.protocol = 1
        #: Abandoned requests that the bridge did not let go of within ``cancel_grace_period``.
        self.stuck = 0
        #: new -> starting -> ready, then toward dead: ``stopping`` (a graceful stop),
        #: ``killing`` (SIGKILL sent by the pool) or ``exiting`` (the process exited by itself;
        #: its pipes are draining). ``dead`` once the process and its pipes are gone.
        self.state = "new"
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.exit_reason: str | None = None
        self.capabilities: frozenset[str] = frozenset()
        self.started_at = 0.0
        self.ready_at = 0.0
        self.requests = 0
        #: Requests answered after the handshake (the crash-loop breaker and recycling use it).
        self.completed = 0
        self.errors = 0
        #: Takes no new requests; leaves service once the ones in flight are answered.
        self.retiring = False
        #: The id of the request :meth:`send` sent last (for telemetry hooks).
        self.last_request_id = 0
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._codec = get_codec(config.json_codec)
        #: Its view of the shared-memory segments, when the pool offers them.
        self._segments: Segments | None = None
        if config.shm_threshold is not None:
            shared = get_shared_memory()
            if shared is not None:
                self._segments = Segments(shared, config.shm_threshold)
        self._decoder = FrameDecoder(
            config.max_frame_bytes,
            self._codec,
            self._segments,
            config.max_payload_bytes,
            defer_from=STAGE_BYTES,
        )
        self._stderr_partial = b""
        self._forward_stderr = config.worker_output == "stderr"
        self._next_id = 0
        self._requests: dict[int, _Request] = {}
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        #: Handling a read of its answers (see :meth:`_queue_frame`).
        self._reading = False
        self._drain_timer: asyncio.TimerHandle | None = None
        self._protocol_error: ProtocolError | None = None

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """At least one request in flight."""
        return bool(self._requests)

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    @property
    def commands_in_flight(self) -> list[str]:
        """The commands of the requests in flight, oldest first."""
        return [request.command for request in self._requests.values()]

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "ready")

    async def start(self) -> None:
        """Spawn the process and complete the handshake, or raise ``StartupError``."""
        self.state = "starting"
        self.started_at = time.monotonic()
        argv = launch_argv(self.adapter.command_line())
        env = self.adapter.worker_env(
            offered_environment(self.id, self.run_id, self.config, self._segments)
        )
        try:
            transport, _ = await self._loop.subprocess_exec(
                lambda: _WorkerProtocol(self),
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=self.adapter.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            self.state = "dead"
            self.exited.set_result(None)
            raise StartupError(
                f"adapter {self.adapter.name!r}: cannot start {argv[0]!r}: {exc}",
                adapter=self.adapter.name,
                worker_id=self.id,
                executable=argv[0],
                cause="spawn",
                errno=exc.errno,
            ) from None
        self._stdin = transport.get_pipe_transport(0)  # type: ignore[assignment]
        if self.exited.done():  # it exited before the handshake could even be sent
            await self._fail_startup(WorkerCrashed(f"worker {self.id} exited at once"))
        await self._handshake()

    def _on_connected(self, transport: asyncio.SubprocessTransport) -> None:
        self._transport = transport
        self.pid = transport.get_pid()
        _read_stdout_directly(self, transport)
        # Recorded before the handshake, so no moment exists where a parent's death leaves it.
        get_registry().add(self.pid, self.run_id, self.id)
        get_watchdog().watch(self.pid)

    async def _handshake(self) -> None:
        wanted = self.config.worker_concurrency
        args = {"worker_id": self.id, "initialization": True, "max_in_flight": wanted}
        try:
            future = self.send("ping", args, timeout=self.config.worker_init_timeout)
            result = await future
        except SnakepitError as exc:
            await self._fail_startup(exc)
        if not isinstance(result, dict) or result.get("status") != "ok":
            await self._fail_startup(
                ProtocolError(f"handshake ping answered {result!r}, not status 'ok'")
            )
        capabilities = result.get("capabilities")
        if isinstance(capabilities, list):
            self.capabilities = frozenset(c for c in capabilities if isinstance(c, str))
        self._negotiate(result, wanted)
        self.state = "ready"
        self.ready_at = time.monotonic()

    def _negotiate(self, answer: dict[str, Any], wanted: int) -> None:
        """Protocol 2 when the bridge says so: ``min(wanted, max_concurrency)`` in flight."""
        offered = answer.get("max_concurrency")
        if answer.get("protocol") != 2 or type(offered) is not int or offered < 1:
            return
        self.protocol = 2
        self.capacity = min(wanted, offered)
        if offered < wanted and self.adapter.name not in _warned_concurrency:
            _warned_concurrency.add(self.adapter.name)
            log.warning(
                "adapter %s: its workers take %d requests at once, not the %d asked for "
                "(worker_concurrency)",
                self.adapter.name,
                offered,
                wanted,
            )

    async def _fail_startup(self, cause: SnakepitError) -> NoReturn:
        self.kill("startup_failed")
        await asyncio.shield(self.exited)
        if isinstance(cause, WorkerTimeout):
            kind, what = (
                "timeout",
                f"did not become ready within {self.config.worker_init_timeout}s",
            )
        elif isinstance(cause, WorkerCrashed):
            kind, what = "exited", f"exited during its handshake ({describe_exit(self.exit_code)})"
        else:
            kind, what = "handshake", f"failed its handshake: {cause.message}"
        command_line = " ".join(self.adapter.command_line())
        raise StartupError(
            f"adapter {self.adapter.name!r}: worker {self.id} ({command_line}) {what}"
            f"{self.stderr_excerpt(all_lines=True)}",
            adapter=self.adapter.name,
            worker_id=self.id,
            exit_code=self.exit_code,
            stderr_tail=list(self.stderr_tail),
            cause=kind,
        ) from None

    # -- requests -----------------------------------------------------------------------------

    def send(
        self,
        command: str,
        args: dict[str, Any],
        *,
        timeout: float,
        meta: dict[str, Any] | None = None,
        checked: CheckedArguments = PLAIN,
        future: asyncio.Future[Any] | None = None,
        stream: StreamItems | None = None,
        staged: dict[tuple[Any, ...], str] | None = None,
        caller: Any = None,
    ) -> asyncio.Future[Any]:
        """Send one request; the future (``future``, or a new one) gets the result or a
        ``SnakepitError``. Its id is :attr:`last_request_id` afterwards. With ``stream``, a
        worker that can stream sends its items there (else its result is the one item).

        Raises ``ValidationError`` (and sends nothing) if the request cannot be encoded, or
        carries binary values and the worker does not take them. ``checked`` is what
        :func:`~snakepit_core.json_values.check_arguments` found (the exact encoder needed,
        binary values). ``meta`` gains ``deadline_ms``, the time budget. ``staged`` holds
        segments the pool already wrote for big values (by path from the envelope's root);
        those this worker takes are removed from it, the rest stay the caller's. Everything
        that can fail happens before the request is registered, so a failed send leaves no
        trace. ``caller`` is the pool's own record of the call, handed back with its
        callback calls.
        """
        request_id = self._next_id + 1
        budget = max(1, round(timeout * 1000))
        meta = {**meta, "deadline_ms": budget} if meta else {"deadline_ms": budget}
        if stream is not None:
            stream.streaming = "stream" in self.capabilities
            if stream.streaming:
                meta["stream"] = {"window": stream.window}
            else:
                stream = None
        message = {"id": request_id, "command": command, "args": args, "meta": meta}
        segments: list[str] = []
        if checked.binary or (checked.texts and "text" in self.capabilities):
            frame = self._binary_frame(command, message, checked, segments, staged)
        else:
            frame = encode_frame(message, self.config.max_frame_bytes, self._codec, checked.exact)
        loop = self._loop
        if future is None:
            future = loop.create_future()
        deadline = loop.time() + timeout
        self._queue_frame(frame)
        self._next_id = self.last_request_id = request_id
        request = _Request(command, deadline, timeout, future, stream)
        request.caller = caller
        if segments:
            request.segments = segments
            request.shared = self._segments
        self._requests[request_id] = request
        self._watch_deadline(deadline)
        self.requests += 1
        return future

    def _binary_frame(
        self,
        command: str,
        message: dict[str, Any],
        checked: CheckedArguments,
        segments: list[str],
        staged: dict[tuple[Any, ...], str] | None,
    ) -> bytes:
        """The frame of a request with binary values or long strings; the shared-memory
        segments it names are appended to ``segments`` (deleted again if it cannot be sent)."""
        if checked.binary and "binary" not in self.capabilities:
            path, _ = checked.binary[0]
            field = format_path(path)
            raise ValidationError(
                f"adapter {self.adapter.name!r}: {command}: {field} is binary, and worker "
                f"{self.id} does not take binary values (it does not declare the capability "
                "'binary')",
                adapter=self.adapter.name,
                command=command,
                field=field,
                rule="binary",
            )
        attachments = [Attachment(("args", *path), view) for path, view in checked.binary]
        if "text" in self.capabilities:
            attachments.extend(_text_attachments(checked.texts))
        if not attachments:  # only strings that cannot be UTF-8: plain JSON
            return encode_frame(message, self.config.max_frame_bytes, self._codec, checked.exact)
        config = self.config
        check_payload(sum(a.data.nbytes for a in attachments), config.max_payload_bytes)
        no_room = self._into_segments(attachments, segments, staged)
        try:
            return encode_binary_frame(
                message,
                attachments,
                config.max_frame_bytes,
                self._codec,
                checked.exact,
                config.max_payload_bytes,
            )
        except ValidationError as exc:
            if self._segments is not None:
                self._segments.shared.delete(segments)
            if no_room:
                raise ValidationError(
                    f"{exc.message} (shared memory had no room for its biggest values: is "
                    f"{SHM_ROOT} full?)"
                ) from None
            raise

    def _into_segments(
        self,
        attachments: list[Attachment],
        segments: list[str],
        staged: dict[tuple[Any, ...], str] | None,
    ) -> bool:
        """Move the values at or above the threshold into segments (their names appended to
        ``segments``): those ``staged`` by the pool, else new ones; True if some found no
        room and stay inline."""
        shared = self._segments
        if shared is None or "shm" not in self.capabilities:
            return False
        no_room = False
        for index, attachment in enumerate(attachments):
            if attachment.data.nbytes < shared.threshold:
                continue
            name = staged.pop(attachment.path, None) if staged else None
            try:
                if name is None:
                    name = shared.shared.write(attachment.data)
            except BaseException:
                shared.shared.delete(segments)
                raise
            if name is None:
                no_room = True
                continue
            segments.append(name)
            attachments[index] = attachment._replace(segment=name)
        return no_room

    def _queue_frame(self, frame: bytes) -> None:
        """Frames queued in one loop iteration leave in one write (one system call).

        While a read of this worker's answers is handled, the slots those answers free send
        the next requests here too: they are written once the read is handled, without a
        trip through the loop.
        """
        self._out.append(frame)
        if self._flush_handle is None and not self._reading:
            self._flush_handle = self._loop.call_soon(self._flush_soon)

    def grant(self, request_id: int, items: int) -> None:
        """The consumer of stream ``request_id`` took ``items`` more: the worker may send as
        many more (``$credit``)."""
        request = self._requests.get(request_id)
        if request is None or request.abandoned or not self.alive:
            return
        self._queue_frame(
            encode_frame(
                {"id": request_id, "command": "$credit", "args": {"items": items}},
                self.config.max_frame_bytes,
                self._codec,
            )
        )

    def _flush_soon(self) -> None:
        self._flush_handle = None
        self._flush()

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.write(data)

    @property
    def deadline(self) -> float | None:
        """The earliest deadline of a request still waiting for its answer."""
        deadlines = [r.deadline for r in self._requests.values() if not r.abandoned]
        return min(deadlines) if deadlines else None

    def expire_due(self, now: float) -> float | None:
        """Time out every request whose deadline passed; the next deadline (or None).

        Runs only when the pool's one timer fires, not per request.
        """
        following: float | None = None
        for request_id, request in list(self._requests.items()):
            if request.abandoned:
                continue
            if request.deadline <= now:
                self._time_out(request_id, request)
            elif following is None or request.deadline < following:
                following = request.deadline
        return following

    def _time_out(self, request_id: int, request: _Request) -> None:
        if not request.future.done():
            self.errors += 1
            request.future.set_exception(
                WorkerTimeout(
                    f"adapter {self.adapter.name!r}: worker {self.id} (pid {self.pid}) did not "
                    f"answer {request.command!r} within {request.timeout}s; the request is "
                    "cancelled on the worker, which is replaced if it does not let go",
                    adapter=self.adapter.name,
                    worker_id=self.id,
                    command=request.command,
                    timeout=request.timeout,
                )
            )
        self.abandon(request_id)

    def abandon(self, request_id: int) -> None:
        """The caller of ``request_id`` gave up (cancelled or timed out).

        A worker that can cancel is sent ``$cancel`` and given ``cancel_grace_period`` to
        answer that id; otherwise, or if it does not, the request is *stuck*: the pool retires
        the worker (no new requests; the others finish), and it leaves once only stuck
        requests remain. The slot stays taken until the worker answers.
        """
        request = self._requests.get(request_id)
        if request is None or request.abandoned or not self.alive:
            return
        request.abandoned = True
        if "cancel" in self.capabilities:
            self._queue_frame(
                encode_frame(
                    {"id": request_id, "command": "$cancel"},
                    self.config.max_frame_bytes,
                    self._codec,
                )
            )
            request.cancel_timer = self._loop.call_later(
                self.config.cancel_grace_period, self._stick, request_id
            )
        else:
            self._stick(request_id)

    def _stick(self, request_id: int) -> None:
        request = self._requests.get(request_id)
        if request is None or request.stuck:
            return
        request.cancel_timer = None
        request.stuck = True
        self.stuck += 1
        self._on_stuck(self)

    def _in_flight_commands(self) -> str:
        commands = sorted({r.command for r in self._requests.values()})
        return ", ".join(repr(c) for c in commands[:5]) + (" ..." if len(commands) > 5 else "")

    def _on_stdout(self, data: bytes) -> None:
        if self._protocol_error is not None:
            return
        self._reading = True
        try:
            messages = self._decoder.feed(data)
            for message in messages:
                self._on_message(message)
        except ProtocolError as exc:
            self._on_protocol_error(exc)
        except Exception as exc:  # a bug must not leave the caller waiting for its timeout
            log.exception("worker %s: cannot handle its output", self.id)
            self._on_protocol_error(
                ProtocolError(f"its output could not be handled ({exc!r})", cause="internal")
            )
        finally:
            self._reading = False
        if self._out and self._flush_handle is None:
            self._flush()

    def _on_message(self, message: dict[str, Any]) -> None:
        deferred: list[Deferred] | None = message.pop(DEFERRED_KEY, None)
        if "success" not in message and "call" in message and "item" not in message:
            if deferred is not None:
                place_deferred(message, deferred, read_deferred(deferred))
            self._on_call(message)
            return
        if "item" in message and "success" not in message:
            if deferred is not None:  # items keep their order: read here
                place_deferred(message, deferred, read_deferred(deferred))
            self._on_item(message)
            return
        try:
            request_id, success, payload = check_response(message)
            request = self._requests.pop(request_id, None)
            if request is None:
                raise ProtocolError(
                    f"response id {request_id} does not match the request in flight "
                    f"({', '.join(map(str, list(self._requests)[:5])) or 'none'})",
                    cause="wrong_id",
                )
        except ProtocolError as exc:
            if deferred is not None:
                close_deferred(deferred)
            self._on_protocol_error(exc)
            return
        request.settle()
        if request.stuck:
            self.stuck -= 1
        if deferred is not None:
            self._answer_later(request.future, message, deferred)
        else:
            self._answer(request.future, success, payload)
        if self.state == "ready":
            self.completed += 1
            self._on_answer(self)

    def _on_call(self, message: dict[str, Any]) -> None:
        """A callback call: the pool runs it (or answers why not)."""
        request_id = message.get("id")
        request = self._requests.get(request_id) if type(request_id) is int else None
        caller = None if request is None or request.abandoned else request.caller
        if self._on_callback is not None:
            self._on_callback(self, caller, message)

    def answer_callback(self, request_id: Any, answer: dict[str, Any]) -> None:
        """Send the answer of a callback call (``$callback``) while its request is in flight;
        ``ValidationError`` if the result cannot be sent (not JSON)."""
        request = self._requests.get(request_id) if type(request_id) is int else None
        if request is None or not self.alive:
            return
        message = {"id": request_id, "command": "$callback", "args": answer}
        checked = check_arguments(answer, adapter=self.adapter.name, command="$callback")
        segments: list[str] = []
        if checked.binary or (checked.texts and "text" in self.capabilities):
            frame = self._binary_frame("$callback", message, checked, segments, None)
        else:
            frame = encode_frame(message, self.config.max_frame_bytes, self._codec, checked.exact)
        if segments:  # deleted with the request's own
            request.segments = [*request.segments, *segments]
            request.shared = self._segments
        self._queue_frame(frame)

    def time_left(self, request_id: int) -> float | None:
        """Seconds before request ``request_id``'s deadline (None if it is not in flight)."""
        request = self._requests.get(request_id)
        return None if request is None else request.deadline - self._loop.time()

    def _answer(self, future: asyncio.Future[Any], success: bool, payload: Any) -> None:
        if future.done():
            return
        if success:
            future.set_result(payload)
        else:
            self.errors += 1
            future.set_exception(_CommandFailure(payload))

    def _answer_later(
        self, future: asyncio.Future[Any], message: dict[str, Any], deferred: list[Deferred]
    ) -> None:
        """Answer once the big values in shared memory are read, on a thread: copying them
        on the event loop would stall every other caller. The slot is free already."""

        def read() -> None:
            place_deferred(message, deferred, read_deferred(deferred))

        def done(reading: asyncio.Future[None]) -> None:
            problem = reading.exception()
            if problem is None:
                success = message["success"] is True
                self._answer(future, success, message["result" if success else "error"])
                return
            fault = (
                problem
                if isinstance(problem, ProtocolError)
                else ProtocolError(f"its answer could not be read ({problem!r})", cause="internal")
            )
            if self.alive and self._protocol_error is None:
                self._on_protocol_error(fault)
            if not future.done():
                self.errors += 1
                future.set_exception(self._protocol_error or fault)

        self._loop.run_in_executor(None, read).add_done_callback(done)

    def _on_item(self, message: dict[str, Any]) -> None:
        """An item of a stream in flight (dropped if its consumer gave up)."""
        request_id = message.get("id")
        request = self._requests.get(request_id) if type(request_id) is int else None
        if request is None or request.stream is None:
            self._on_protocol_error(
                ProtocolError(
                    f"item for id {request_id!r}, which is not a stream in flight",
                    cause="wrong_id",
                )
            )
        elif not request.abandoned and not request.stream.put(message["item"]):
            self._on_protocol_error(
                ProtocolError(
                    f"stream {request_id} sent more items than its window of "
                    f"{request.stream.window} allows before credit",
                    cause="stream_credit",
                )
            )

    def _on_protocol_error(self, exc: ProtocolError) -> None:
        during = f" during {self._in_flight_commands()}" if self._requests else ""
        message = (
            f"adapter {self.adapter.name!r}: worker {self.id} (pid {self.pid}) broke the "
            f"protocol{during}: {exc.message}; the worker is being replaced"
        )
        commands = {r.command for r in self._requests.values()}
        self._protocol_error = ProtocolError(
            message,
            adapter=self.adapter.name,
            worker_id=self.id,
            command=commands.pop() if len(commands) == 1 else None,
            **exc.context,
        )
        log.warning("%s", message)
        self.errors += 1
        for request in self._requests.values():
            if not request.future.done():
                request.future.set_exception(self._protocol_error)
        self.kill("protocol_error")

    # -- stderr -------------------------------------------------------------------------------

    def _on_stderr(self, data: bytes) -> None:
        data = self._stderr_partial + data
        lines = data.split(b"\n")
        partial = lines.pop()
        if len(partial) > STDERR_MAX_LINE:
            lines.append(partial)
            partial = b""
        self._stderr_partial = partial
        self._stderr_lines(lines)

    def _stderr_lines(self, lines: list[bytes]) -> None:
        texts = []
        for line in lines:
            text = line.decode("utf-8", "replace").rstrip("\r")
            if len(text) > 2000:
                text = f"{text[:2000]}... [{len(text) - 2000} more characters]"
            texts.append(text)
        self.stderr_tail.extend(texts)
        if self._forward_stderr:
            prefix = f"[{self.id}] "
            sys.stderr.write("".join(f"{prefix}{text}\n" for text in texts))
            sys.stderr.flush()
        elif stderr_log.isEnabledFor(logging.INFO):
            for text in texts:
                stderr_log.info("[%s] %s", self.id, text)

    def stderr_excerpt(self, *, all_lines: bool = False, lines: int = 20) -> str:
        """The worker's last stderr lines, formatted to end an error message."""
        tail = list(self.stderr_tail) if all_lines else list(self.stderr_tail)[-lines:]
        if not tail:
            return "; stderr was empty"
        return "; last stderr lines:\n  " + "\n  ".join(tail)

    # -- exit ---------------------------------------------------------------------------------

    def _on_process_exited(self) -> None:
        assert self._transport is not None
        self.exit_code = self._transport.get_returncode()
        if self.state != "stopping":
            self.state = "exiting"
        # Kill what the worker left in its group; then give the pipes a moment to drain.
        self._signal_group(signal.SIGKILL)
        self._drain_timer = self._loop.call_later(DRAIN_AFTER_EXIT, self._finish)

    def _finish(self) -> None:
        if self.exited.done():
            return
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self._stderr_partial:
            self._stderr_lines([self._stderr_partial])
            self._stderr_partial = b""
        if self.exit_reason is None:
            self.exit_reason = "stopped" if self.state == "stopping" else "crashed"
        requests = list(self._requests.values())
        self._requests.clear()
        for request in requests:
            request.settle()
            if not request.future.done():
                self.errors += 1
                request.future.set_exception(self._crash_error(request.command))
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self.state = "dead"
        if self._segments is not None:
            self._segments.clean_up()
        if self.pid is not None:
            get_registry().remove(self.pid)
            get_watchdog().forget(self.pid)
        if self._transport is not None:
            self._transport.close()
        self.exited.set_result(None)
        self._on_exit_callback(self)

    def _crash_error(self, command: str) -> SnakepitError:
        if self._protocol_error is not None:
            return self._protocol_error
        truncated = ""
        if self._decoder.pending_bytes:
            truncated = f" (with a truncated frame of {self._decoder.pending_bytes} bytes)"
        return WorkerCrashed(
            f"adapter {self.adapter.name!r}: worker {self.id} (pid {self.pid}) died during "
            f"{command!r} ({describe_exit(self.exit_code)}){truncated}"
            f"{self.stderr_excerpt()}",
            adapter=self.adapter.name,
            worker_id=self.id,
            command=command,
            exit_code=self.exit_code,
            stderr_tail=list(self.stderr_tail)[-20:],
        )

    def _signal_group(self, signum: int) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def kill(self, reason: str = "killed") -> None:
        """SIGKILL the worker's process group at once; ``exited`` resolves when it is gone."""
        if self.exit_reason is None:
            self.exit_reason = reason
        if self.state in ("dead", "new"):
            return
        if self.state not in ("exiting",):
            self.state = "stopping" if reason == "stopped" else "killing"
        self._signal_group(signal.SIGKILL)

    def abort(self) -> None:
        """Kill and release the process's pipes now (a start that failed or was cancelled)."""
        self.kill("startup_failed")
        if self._transport is not None:
            self._transport.close()

    async def stop(self, grace: float) -> None:
        """Close stdin, wait ``grace``, then SIGTERM and finally SIGKILL the process group."""
        if self.state in ("dead", "new"):
            return
        if self.exit_reason is None:
            self.exit_reason = "stopped"
        if self.state in ("starting", "ready"):
            self.state = "stopping"
        self._flush()
        if self._stdin is not None:
            self._stdin.close()
        for signum in (None, signal.SIGTERM, signal.SIGKILL):
            if signum is not None:
                self._signal_group(signum)
            wait = grace if signum is None else max(grace, self.config.cleanup_retry_interval)
            if signum == signal.SIGKILL:
                wait = self.config.cleanup_retry_interval * self.config.cleanup_max_retries
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), wait)
                return
        log.error("worker %s (pid %s) did not exit after SIGKILL", self.id, self.pid)

    def rss_bytes(self) -> int | None:
        """The worker's resident memory (Linux /proc), or None where unknown."""
        try:
            with open(f"/proc/{self.pid}/statm", "rb") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def __repr__(self) -> str:
        return f"<Worker {self.id} pid={self.pid} state={self.state}>"


#: Adapters whose workers offered less concurrency than asked (warned about once).
_warned_concurrency: set[str] = set()


class _Request:
    """One request in flight: what the caller waits on, and what its cancellation did."""

    __slots__ = (
        "abandoned",
        "caller",
        "cancel_timer",
        "command",
        "deadline",
        "future",
        "segments",
        "shared",
        "stream",
        "stuck",
        "timeout",
    )

    def __init__(
        self,
        command: str,
        deadline: float,
        timeout: float,
        future: asyncio.Future[Any],
        stream: StreamItems | None = None,
    ) -> None:
        self.command = command
        self.deadline = deadline
        self.timeout = timeout
        self.future = future
        #: Where the items of a streaming request go.
        self.stream = stream
        #: The caller gave up; ``cancel_timer`` bounds how long the worker may take to let go.
        self.abandoned = False
        self.cancel_timer: asyncio.TimerHandle | None = None
        self.stuck = False
        #: The pool's record of the call, handed back with its callback calls.
        self.caller: Any = None
        #: The shared-memory segments of its values (the pool's: deleted when it ends).
        self.segments: list[str] = _NO_SEGMENTS
        self.shared: Segments | None = None

    def settle(self) -> None:
        """The worker answered (or died): no cancel deadline is pending any more, and the
        request's segments are deleted (a mapping the worker still holds stays valid)."""
        if self.cancel_timer is not None:
            self.cancel_timer.cancel()
            self.cancel_timer = None
        if self.shared is not None:
            self.shared.shared.delete(self.segments)
            self.shared = None


_NO_SEGMENTS: list[str] = []


def _text_attachments(texts: Sequence[tuple[tuple[str | int, ...], str]]) -> list[Attachment]:
    """Long strings as UTF-8 attachments; one that is not UTF-8 (a lone surrogate) stays in
    the JSON, which escapes it."""
    attachments = []
    for path, text in texts:
        try:
            data = text.encode()
        except UnicodeEncodeError:
            continue
        attachments.append(Attachment(("args", *path), memoryview(data), True))
    return attachments


class _CommandFailure(Exception):
    """Internal: the worker answered ``success: false``; the pool turns it into CommandError."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error
