"""A minimal blocking driver for one worker process, for tests of bridges at the frame level.

It speaks the wire protocol directly (no pool), so bridge tests can check exact frames, exit
codes and what reaches stdout/stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

#: The segment-name prefix tests give a worker (PROTOCOL.md, *Shared memory*).
SHM_PREFIX = "w0123456789abcdef-"
#: What every bundled bridge declares at protocol 2 (plus ``shm`` when offered it).
PROTOCOL_2_CAPABILITIES = ["cancel", "deadline", "stream", "binary", "text", "callbacks"]


def frame(message: bytes | Mapping[str, Any]) -> bytes:
    """One wire frame: a message (JSON-encoded here) or a body exactly as given."""
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


def binary_body(envelope: Any, attachments: bytes = b"") -> bytes:
    """A binary frame's body (PROTOCOL.md, *Binary values*): 0x00, the envelope's length, the
    envelope (JSON-encoded here, or bytes exactly as given), the attachments."""
    head = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
    return b"\x00" + struct.pack(">I", len(head)) + head + attachments


def split_binary_body(body: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """A binary frame's body taken apart: its envelope (``$binary`` included) and its inline
    attachments in order (an entry with ``shm`` takes none)."""
    assert body[:1] == b"\x00", body[:40]
    (length,) = struct.unpack(">I", body[1:5])
    envelope: dict[str, Any] = json.loads(body[5 : 5 + length])
    attachments, offset = [], 5 + length
    for entry in envelope["$binary"]:
        if "shm" not in entry:
            attachments.append(body[offset : offset + entry["size"]])
            offset += entry["size"]
    assert offset == len(body), f"{len(body) - offset} bytes beyond the attachments"
    return envelope, attachments


@contextlib.contextmanager
def private_shm_dir() -> Iterator[Path]:
    """A fresh 0700 directory on /dev/shm, as a pool's run directory is, removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="snakepit-test-", dir="/dev/shm"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def shm_env(
    directory: Path,
    threshold: int,
    *,
    prefix: str = SHM_PREFIX,
    text_threshold: int | None = None,
    max_payload_bytes: int | None = None,
) -> dict[str, str]:
    """The environment a pool gives a worker to which it offers shared memory."""
    env = {
        "SNAKEPIT_SHM_DIR": str(directory),
        "SNAKEPIT_SHM_PREFIX": prefix,
        "SNAKEPIT_SHM_THRESHOLD": str(threshold),
    }
    if text_threshold is not None:
        env["SNAKEPIT_TEXT_THRESHOLD"] = str(text_threshold)
    if max_payload_bytes is not None:
        env["SNAKEPIT_MAX_PAYLOAD_BYTES"] = str(max_payload_bytes)
    return env


def on_small_tmpfs(directory: Path, size: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run with a tmpfs of ``size`` (``"1m"``) mounted over ``directory``, in a
    private mount namespace (``unshare -rm``: no root needed, nothing outside sees it), so
    that segments beyond ``size`` fail with ENOSPC as on a full /dev/shm."""
    script = 'mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, "sh", size, str(directory), *argv]


def write_syscalls(pid: int) -> int:
    """The write system calls ``pid`` has made so far (Linux ``/proc/<pid>/io``)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError("no syscw in /proc/<pid>/io")


class RawWorker:
    """One worker process driven frame by frame."""

    #: The result of its handshake, once :meth:`shake_hands` ran.
    handshake_answer: dict[str, Any]

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            start_new_session=True,
        )
        self._next_id = 0

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        id: int | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> int:
        if id is None:
            self._next_id += 1
            id = self._next_id
        message: dict[str, Any] = {"id": id, "command": command, "args": dict(args or {})}
        if meta is not None:
            message["meta"] = dict(meta)
        self.send_raw(frame(message))
        return id

    def _read_exactly(self, n: int, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        chunks = b""
        while len(chunks) < n:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                raise TimeoutError(f"no frame within {timeout}s (got {len(chunks)} of {n} bytes)")
            chunk = os.read(fd, n - len(chunks))
            if not chunk:
                raise EOFError(f"worker closed stdout after {len(chunks)} of {n} bytes")
            chunks += chunk
        return chunks

    def receive(self, timeout: float = 10.0) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(self.receive_body(timeout))
        return frame

    def receive_body(self, timeout: float = 10.0) -> bytes:
        """The next frame's body, exactly as sent (a binary frame's too)."""
        (length,) = struct.unpack(">I", self._read_exactly(4, timeout))
        return self._read_exactly(length, timeout)

    def call(
        self, command: str, args: Mapping[str, Any] | None = None, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Send one request and return its response frame (asserting the id matches)."""
        request_id = self.send(command, args)
        frame = self.receive(timeout)
        assert frame["id"] == request_id, frame
        return frame

    def result(self, command: str, args: Mapping[str, Any] | None = None) -> Any:
        """The result of a call that must succeed."""
        response = self.call(command, args)
        assert response["success"] is True, response
        return response["result"]

    def error(self, command: str, args: Mapping[str, Any] | None = None) -> str:
        """The error message of a call that must fail (a failure carries nothing else)."""
        response = self.call(command, args)
        assert response["success"] is False, response
        assert set(response) <= {"id", "success", "error", "timestamp"}, response
        message: str = response["error"]
        return message

    def handshake(self, worker_id: str = "raw-1") -> dict[str, Any]:
        frame = self.call("ping", {"worker_id": worker_id, "initialization": True})
        assert frame["success"] is True and frame["result"]["status"] == "ok", frame
        return frame

    def shake_hands(self, max_in_flight: int | None, worker_id: str = "raw-1") -> dict[str, Any]:
        """The handshake a pool sends: a protocol-2 pool's with ``max_in_flight``, a
        protocol-1 pool's with None. Its result is kept as :attr:`handshake_answer`."""
        args: dict[str, Any] = {"worker_id": worker_id, "initialization": True}
        if max_in_flight is not None:
            args["max_in_flight"] = max_in_flight
        response = self.call("ping", args)
        assert response["success"] is True, response
        self.handshake_answer = response["result"]
        return self.handshake_answer

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stderr_text(self) -> str:
        """All of stderr; only call after the process has exited."""
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def __enter__(self) -> RawWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
