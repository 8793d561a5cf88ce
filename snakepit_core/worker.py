"""One worker process: spawn, handshake, one request in flight, stderr, stop.

The worker runs in its own process group so that stopping it also stops anything it started.
stdout carries frames only; stderr is forwarded line by line, prefixed with the worker id, to
the parent's stderr (so a ``print`` in a handler is visible by default) or to ``logging``
(``worker_output``), and its recent lines are kept (bounded) for error messages. All reads go
through one asyncio subprocess protocol, so a worker costs no task of its own.
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
from collections.abc import Callable
from typing import Any, NoReturn

from .adapter import Adapter
from .config import PoolConfig
from .errors import (
    ProtocolError,
    SnakepitError,
    StartupError,
    WorkerCrashed,
    WorkerTimeout,
)
from .launcher import launch_argv
from .protocol import FrameDecoder, check_response, encode_frame, get_codec
from .registry import get_registry
from .watchdog import get_watchdog

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
        on_idle: Callable[[Worker], None],
        on_exit: Callable[[Worker], None],
        watch_deadline: Callable[[float], None],
    ) -> None:
        self.adapter = adapter
        self.id = worker_id
        self.config = config
        self.run_id = run_id
        #: Position in the pool; a replacement takes the slot of the worker it replaces.
        self.slot = slot
        self._on_idle_callback = on_idle
        self._on_exit_callback = on_exit
        self._watch_deadline = watch_deadline
        #: Loop time by which the request in flight must be answered (None: nothing pending).
        self.deadline: float | None = None
        self._timeout = 0.0
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
        self.health_ping: asyncio.Future[Any] | None = None
        self.health_misses = 0
        self.retiring = False
        self.next_memory_check = 0.0
        self.retire_now = False
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._codec = get_codec(config.json_codec)
        self._decoder = FrameDecoder(config.max_frame_bytes, self._codec)
        self._stderr_partial = b""
        self._forward_stderr = config.worker_output == "stderr"
        self._next_id = 0
        self._pending_id: int | None = None
        self._pending: asyncio.Future[Any] | None = None
        self._pending_command = ""
        self._cancel_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._protocol_error: ProtocolError | None = None

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._pending_id is not None

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "ready")

    async def start(self) -> None:
        """Spawn the process and complete the handshake, or raise ``StartupError``."""
        self.state = "starting"
        self.started_at = time.monotonic()
        argv = launch_argv(self.adapter.command_line())
        env = self.adapter.worker_env(
            {
                "SNAKEPIT_WORKER_ID": self.id,
                "SNAKEPIT_RUN_ID": self.run_id,
                "SNAKEPIT_MAX_FRAME_BYTES": str(self.config.max_frame_bytes),
            }
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
        # Recorded before the handshake, so no moment exists where a parent's death leaves it.
        get_registry().add(self.pid, self.run_id, self.id)
        get_watchdog().watch(self.pid)

    async def _handshake(self) -> None:
        args = {"worker_id": self.id, "initialization": True}
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
        self.state = "ready"
        self.ready_at = time.monotonic()

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
        exact: bool = False,
    ) -> asyncio.Future[Any]:
        """Write one request; the returned future gets the result or a ``SnakepitError``.

        Raises ``ValidationError`` (and sends nothing) if the request cannot be encoded.
        ``exact`` asks for the stdlib encoder (see :func:`~snakepit_core.json_values.
        check_arguments`). Everything that can fail happens before the worker is marked busy,
        so a failed send leaves it free.
        """
        assert self._pending_id is None, f"worker {self.id} already has a request in flight"
        request_id = self._next_id + 1
        message: dict[str, Any] = {"id": request_id, "command": command, "args": args}
        if meta:
            message["meta"] = meta
        frame = encode_frame(message, self.config.max_frame_bytes, self._codec, exact)
        deadline = self._loop.time() + timeout
        future: asyncio.Future[Any] = self._loop.create_future()
        assert self._stdin is not None
        self._stdin.write(frame)
        self._next_id = request_id
        self._pending_id = request_id
        self._pending = future
        self._pending_command = command
        self._timeout = timeout
        self.deadline = deadline
        self._watch_deadline(deadline)
        self.requests += 1
        return future

    @property
    def pending_request_id(self) -> int | None:
        return self._pending_id

    def abandon(self) -> None:
        """The caller gave up on the request in flight (cancelled or timed out).

        A worker that can cancel is sent ``$cancel`` and given ``cancel_grace_period`` to
        answer; otherwise, or if it does not answer in time, it is killed and replaced.
        """
        if self._pending_id is None or not self.alive:
            return
        self.deadline = None
        if "cancel" in self.capabilities and self._cancel_timer is None:
            self._write({"id": self._pending_id, "command": "$cancel"})
            self._cancel_timer = self._loop.call_later(
                self.config.cancel_grace_period, self.kill, "killed"
            )
        else:
            self.kill("killed")

    def _write(self, message: dict[str, Any]) -> None:
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.write(encode_frame(message, self.config.max_frame_bytes, self._codec))

    def expire(self) -> None:
        """The deadline of the request in flight passed: fail it, then cancel or kill."""
        self.deadline = None
        timeout = self._timeout
        future = self._pending
        if future is not None and not future.done():
            self.errors += 1
            future.set_exception(
                WorkerTimeout(
                    f"adapter {self.adapter.name!r}: worker {self.id} (pid {self.pid}) did not "
                    f"answer {self._pending_command!r} within {timeout}s; the request is "
                    "cancelled on the worker, which is replaced if it does not let go",
                    adapter=self.adapter.name,
                    worker_id=self.id,
                    command=self._pending_command,
                    timeout=timeout,
                )
            )
        self.abandon()

    def _on_stdout(self, data: bytes) -> None:
        if self._protocol_error is not None:
            return
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

    def _on_message(self, message: dict[str, Any]) -> None:
        try:
            request_id, success, payload = check_response(message)
            if request_id != self._pending_id:
                raise ProtocolError(
                    f"response id {request_id} does not match the request in flight "
                    f"({self._pending_id})",
                    cause="wrong_id",
                )
        except ProtocolError as exc:
            self._on_protocol_error(exc)
            return
        future = self._pending
        self._clear_pending()
        if future is not None and not future.done():
            if success:
                future.set_result(payload)
            else:
                self.errors += 1
                future.set_exception(_CommandFailure(payload))
        if self.state == "ready":
            self.completed += 1
            self._on_idle_callback(self)

    def _clear_pending(self) -> None:
        self._pending_id = None
        self._pending = None
        self.deadline = None
        if self._cancel_timer is not None:
            self._cancel_timer.cancel()
            self._cancel_timer = None

    def _on_protocol_error(self, exc: ProtocolError) -> None:
        message = (
            f"adapter {self.adapter.name!r}: worker {self.id} (pid {self.pid}) broke the "
            f"protocol{f' during {self._pending_command!r}' if self._pending_id else ''}: "
            f"{exc.message}; the worker is being replaced"
        )
        self._protocol_error = ProtocolError(
            message,
            adapter=self.adapter.name,
            worker_id=self.id,
            command=self._pending_command,
            **exc.context,
        )
        log.warning("%s", message)
        self.errors += 1
        future = self._pending
        if future is not None and not future.done():
            future.set_exception(self._protocol_error)
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
        future = self._pending
        self._clear_pending()
        if future is not None and not future.done():
            self.errors += 1
            future.set_exception(self._crash_error())
        self.state = "dead"
        if self.pid is not None:
            get_registry().remove(self.pid)
            get_watchdog().forget(self.pid)
        if self._transport is not None:
            self._transport.close()
        self.exited.set_result(None)
        self._on_exit_callback(self)

    def _crash_error(self) -> SnakepitError:
        if self._protocol_error is not None:
            return self._protocol_error
        truncated = ""
        if self._decoder.pending_bytes:
            truncated = f" (with a truncated frame of {self._decoder.pending_bytes} bytes)"
        return WorkerCrashed(
            f"adapter {self.adapter.name!r}: worker {self.id} (pid {self.pid}) died during "
            f"{self._pending_command!r} ({describe_exit(self.exit_code)}){truncated}"
            f"{self.stderr_excerpt()}",
            adapter=self.adapter.name,
            worker_id=self.id,
            command=self._pending_command,
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


class _CommandFailure(Exception):
    """Internal: the worker answered ``success: false``; the pool turns it into CommandError."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error
