"""A blocking frame-level client for one worker process: what the suite sees on the wire.

The pool hides the wire (it decodes frames into dicts, matches ids, retries start-up); the
protocol level needs the bytes themselves: a frame split across writes, a frame of megabytes,
what is left on stdout after EOF, the exact text of each number and the order of the keys.
This client speaks the protocol directly, with no snakepit code between the test and the
process, and keeps each frame's raw body next to its decoded form.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import struct
import subprocess
import tempfile
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..adapter import Adapter
from ..config import PoolConfig
from ..shm import Segments, get_shared_memory
from ..worker import offered_environment

#: Envelope keys a response may carry (``timestamp`` is optional).
SUCCESS_KEYS = frozenset({"id", "success", "result", "timestamp"})
FAILURE_KEYS = frozenset({"id", "success", "error", "timestamp"})


class NotAFrame(AssertionError):
    """stdout carried bytes that are not a frame of the protocol."""


@dataclass
class Frame:
    """One frame from the worker: its raw body, the decoded object, each float's own text."""

    body: bytes
    data: dict[str, Any]
    float_texts: list[str] = field(default_factory=list)

    @property
    def id(self) -> Any:
        return self.data.get("id")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict in the order its keys were written; a key written twice is an
    error (a dict would silently keep the last one)."""
    built: dict[str, Any] = {}
    for key, value in pairs:
        if key in built:
            raise NotAFrame(f"key {key!r} appears twice in one object")
        built[key] = value
    return built


def decode_body(body: bytes) -> Frame:
    """Decode one frame body, or raise :class:`NotAFrame` saying what is wrong with it."""
    floats: list[str] = []

    def keep_text(text: str) -> float:
        floats.append(text)
        return float(text)

    try:
        data = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_object_without_duplicates,
            parse_float=keep_text,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise NotAFrame(f"frame body is not UTF-8 JSON ({exc}): {body[:200]!r}") from None
    if not isinstance(data, dict):
        raise NotAFrame(f"frame body is not a JSON object: {body[:200]!r}")
    return Frame(body, data, floats)


def capabilities_of(handshake: Frame) -> frozenset[str]:
    """The capabilities a handshake answer declares (none if it lists none), as the pool reads
    them."""
    found = handshake.data.get("result", {}).get("capabilities")
    if not isinstance(found, list):
        return frozenset()
    return frozenset(c for c in found if isinstance(c, str))


def protocol_of(handshake: Frame) -> int:
    """The protocol a handshake answer declares: 2 if it says ``"protocol": 2``, else 1."""
    result = handshake.data.get("result")
    return 2 if isinstance(result, dict) and result.get("protocol") == 2 else 1


def encode(message: Mapping[str, Any]) -> bytes:
    """One frame: a 4-byte big-endian length, then compact UTF-8 JSON."""
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


class WireWorker:
    """One worker process of ``adapter``, started as the pool starts it, driven frame by frame.

    stderr goes to a temporary file (a worker that logs a lot never blocks on a full pipe);
    :meth:`stderr_text` reads it for failure messages.
    """

    def __init__(self, adapter: Adapter, worker_id: str = "conformance-1") -> None:
        self.adapter = adapter
        self.worker_id = worker_id
        config = PoolConfig()
        self.max_frame_bytes = config.max_frame_bytes
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by kill()
        shared = get_shared_memory()
        segments = None
        if shared is not None and config.shm_threshold is not None:
            segments = Segments(shared, config.shm_threshold)
        run_id = f"conformance-{os.getpid()}"
        env = adapter.worker_env(offered_environment(worker_id, run_id, config, segments))
        self.proc = subprocess.Popen(
            adapter.command_line(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            cwd=adapter.cwd,
            start_new_session=True,
        )
        self._next_id = 0
        #: Requests it takes at once, as a pool negotiates it: 1 unless :meth:`handshake`
        #: offered ``max_in_flight`` N and the answer was protocol 2 with ``max_concurrency`` M
        #: (then ``min(N, M)``).
        self.capacity = 1

    # -- sending ----------------------------------------------------------------------------

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def request(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        id: int | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> tuple[int, bytes]:
        """``(id, frame bytes)`` of a request, not sent (to send it in pieces or with others)."""
        request_id = self.next_id() if id is None else id
        message: dict[str, Any] = {"id": request_id, "command": command, "args": dict(args or {})}
        if meta is not None:
            message["meta"] = dict(meta)
        return request_id, encode(message)

    def send(self, command: str, args: Mapping[str, Any] | None = None, **kw: Any) -> int:
        request_id, frame = self.request(command, args, **kw)
        self.send_raw(frame)
        return request_id

    def cancel(self, request_id: int) -> None:
        """The ``$cancel`` frame exactly as the pool writes it."""
        self.send_raw(encode({"id": request_id, "command": "$cancel"}))

    # -- receiving --------------------------------------------------------------------------

    def _read(self, n: int, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        chunks = bytearray()
        deadline = time.monotonic() + timeout
        while len(chunks) < n:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(
                    f"no complete frame within {timeout}s (got {len(chunks)} of {n} bytes)"
                    f"{self._stderr_hint()}"
                )
            chunk = os.read(fd, min(n - len(chunks), 1 << 20))
            if not chunk:
                raise EOFError(
                    f"worker closed stdout after {len(chunks)} of {n} bytes"
                    f" (exit status {self.proc.poll()}){self._stderr_hint()}"
                )
            chunks += chunk
        return bytes(chunks)

    def receive(self, timeout: float = 10.0) -> Frame:
        header = self._read(4, timeout)
        (length,) = struct.unpack(">I", header)
        if length > self.max_frame_bytes:
            raise NotAFrame(
                f"stdout carried a length of {length} bytes, over the frame limit: not a frame"
                f" (first bytes {header!r}: output that is not the protocol's?)"
            )
        return decode_body(self._read(length, timeout))

    def call(
        self, command: str, args: Mapping[str, Any] | None = None, timeout: float = 10.0
    ) -> Frame:
        """Send one request and return its response, which must answer that request's id."""
        request_id = self.send(command, args)
        frame = self.receive(timeout)
        assert frame.id == request_id, f"answered id {frame.id!r}, not {request_id}: {frame.data}"
        return frame

    def result(self, command: str, args: Mapping[str, Any] | None = None) -> Any:
        """The result of a call that must succeed, with a well-formed success envelope."""
        data = self.call(command, args).data
        assert data.get("success") is True, data
        assert set(data) <= SUCCESS_KEYS and "result" in data, data
        return data["result"]

    def handshake(self, max_in_flight: int | None = None) -> Frame:
        """The pool's first request; the answer must have ``status: "ok"``.

        With ``max_in_flight`` it is the handshake of a pool of that ``worker_concurrency``
        (protocol 2 offered); without, that of a protocol-1 pool, which every bridge accepts.
        """
        args: dict[str, Any] = {"worker_id": self.worker_id, "initialization": True}
        if max_in_flight is not None:
            args["max_in_flight"] = max_in_flight
        frame = self.call("ping", args)
        result = frame.data.get("result")
        assert frame.data.get("success") is True, frame.data
        assert isinstance(result, dict) and result.get("status") == "ok", frame.data
        offered = result.get("max_concurrency")
        if max_in_flight is not None and protocol_of(frame) == 2 and type(offered) is int:
            self.capacity = max(1, min(max_in_flight, offered))
        return frame

    def receive_answers(self, ids: Collection[int], timeout: float = 10.0) -> dict[int, Frame]:
        """One answer to each of ``ids``, in the order they came (any order is allowed): an
        answer to an id not asked, or to one already answered, fails."""
        answers: dict[int, Frame] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(ids):
            frame = self.receive(max(deadline - time.monotonic(), 0.01))
            assert frame.id in ids, f"answered id {frame.id!r}, not in flight: {frame.data}"
            assert frame.id not in answers, f"id {frame.id} answered twice: {frame.data}"
            answers[frame.id] = frame
        return answers

    def silent_for(self, seconds: float) -> bool:
        """Whether stdout stays silent (no byte at all) for ``seconds``."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout.fileno()], [], [], seconds)
        return not ready

    def rest_of_stdout(self, timeout: float = 10.0) -> bytes:
        """Everything the worker still writes until it closes stdout."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        rest = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                break
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return bytes(rest)
            rest += chunk
        raise TimeoutError(f"stdout still open after {timeout}s{self._stderr_hint()}")

    # -- the process ------------------------------------------------------------------------

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _stderr_hint(self) -> str:
        tail = self.stderr_text()[-1000:].strip()
        return f"; stderr: {tail}" if tail else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def __enter__(self) -> WireWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
