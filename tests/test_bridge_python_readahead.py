"""How the Python bridge reads requests and writes replies, frame by frame on real workers.

A concurrent worker (protocol 2) serves every frame of a read at once, hands its async requests
to the loop together and writes the replies that are ready together with one write; the thread
that made replies writes them itself when it can do so without blocking, else the writer thread
does. A client that writes all its requests before reading a reply must still get every reply,
whichever thread made it. Frames are decoded by the JSON scanner alone when nothing surrounds
the value, and by the full decoder otherwise.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from snakepit_python import plugin

from raw_worker import RawWorker, frame

BRIDGE = [sys.executable, str(plugin.BRIDGE_PATH)]
#: Worker scripts: the bundled bridge as it runs, without ``RWF_NOWAIT`` (the writer thread
#: writes every reply, as on macOS), or on an output that refuses it (an older Linux kernel).
PRELUDES = {
    "bundled": "",
    "no RWF_NOWAIT": "if hasattr(os, 'RWF_NOWAIT'):\n    del os.RWF_NOWAIT\n",
    "RWF_NOWAIT refused": (
        "def refuse(*args):\n"
        "    raise OSError(errno.EOPNOTSUPP, 'Operation not supported')\n"
        "os.pwritev = refuse\n"
    ),
}


def worker_script(tmp_path: Path, prelude: str) -> list[str]:
    """The bundled commands, and ``echo`` as a handler-thread (``echo_sync``) and an async
    (``echo_async``) command."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import errno, os\n"
        f"{prelude}"
        "import snakepit_python.builtin_commands\n"
        "from snakepit_python import command, run\n"
        "\n"
        "@command\n"
        "def echo_sync(args):\n"
        "    return {'echoed': args}\n"
        "\n"
        "@command\n"
        "async def echo_async(args):\n"
        "    return {'echoed': args}\n"
        "\n"
        "run()\n"
    )
    return [sys.executable, str(script)]


def start(argv: list[str], max_in_flight: int = 16) -> RawWorker:
    worker = RawWorker(argv)
    try:
        answer = worker.call("ping", {"worker_id": "r", "max_in_flight": max_in_flight})
        assert answer["result"]["protocol"] == 2, answer
    except BaseException:
        worker.kill()
        raise
    return worker


def writes(worker: RawWorker) -> int:
    """How many write system calls the worker has made (Linux)."""
    for line in Path(f"/proc/{worker.proc.pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError("no syscw in /proc/<pid>/io")


def requests(first_id: int, count: int, command: str, args: dict[str, Any]) -> bytes:
    return b"".join(
        frame({"id": first_id + i, "command": command, "args": args}) for i in range(count)
    )


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/<pid>/io")
@pytest.mark.parametrize("prelude", PRELUDES)
def test_the_replies_of_one_read_leave_in_one_write(tmp_path: Path, prelude: str) -> None:
    with start(worker_script(tmp_path, PRELUDES[prelude])) as worker:
        before = writes(worker)
        worker.send_raw(requests(100, 40, "ping", {}) + requests(140, 24, "echo", {"n": 1}))
        replies = {worker.receive()["id"] for _ in range(64)}
        assert replies == set(range(100, 164))
        assert writes(worker) - before <= 4  # one per read of the 64 frames, not one each


@pytest.mark.parametrize("prelude", PRELUDES)
@pytest.mark.parametrize("command", ["echo", "echo_sync", "echo_async"])
def test_a_client_that_reads_only_after_writing_everything_gets_every_reply(
    tmp_path: Path, prelude: str, command: str
) -> None:
    """The replies (8 MiB) fill the output pipe long before the requests are all written: the
    worker must keep reading while they wait to be written."""
    payload = "x" * (256 * 1024)
    with start(worker_script(tmp_path, PRELUDES[prelude])) as worker:
        data = requests(10, 32, command, {"payload": payload})
        sender = threading.Thread(target=worker.send_raw, args=(data,), daemon=True)
        sender.start()
        sender.join(20)
        assert not sender.is_alive(), "the worker stopped reading while its output was full"
        replies: dict[int, bool] = {}
        for _ in range(32):
            reply = worker.receive()
            replies[reply["id"]] = reply["result"]["echoed"]["payload"] == payload
        assert replies == dict.fromkeys(range(10, 42), True)


def started(max_in_flight: int | None) -> RawWorker:
    """The bundled bridge after a protocol-1 (``None``) or protocol-2 handshake."""
    if max_in_flight is not None:
        return start(BRIDGE, max_in_flight)
    worker = RawWorker(BRIDGE)
    worker.handshake()
    return worker


@pytest.mark.parametrize("max_in_flight", [None, 8])
def test_whitespace_around_a_frame_value_is_accepted(max_in_flight: int | None) -> None:
    bodies = [
        b' {"id": 7, "command": "echo", "args": {"a": 1}}',
        b'{"id": 8, "command": "echo", "args": {"a": 1}}\n ',
        b'\t{"id": 9, "command": "echo", "args": {"a": 1}}\r\n',
    ]
    with started(max_in_flight) as worker:
        for request_id, body in enumerate(bodies, 7):
            worker.send_raw(frame(body))
            assert worker.receive() == {
                "id": request_id,
                "success": True,
                "result": {"echoed": {"a": 1}},
            }


@pytest.mark.parametrize("max_in_flight", [None, 8])
def test_a_frame_with_more_after_its_value_exits_3(max_in_flight: int | None) -> None:
    with started(max_in_flight) as worker:
        worker.send_raw(frame(b'{"id": 7, "command": "echo"} {}'))
        worker.close_stdin()
        assert worker.wait() == 3
        assert "undecodable frame: Extra data" in worker.stderr_text()


def test_the_frames_before_an_undecodable_one_in_the_same_read_are_answered() -> None:
    with start(BRIDGE) as worker:
        worker.send_raw(requests(20, 3, "ping", {}) + frame(b"notjs"))
        assert {worker.receive()["id"] for _ in range(3)} == {20, 21, 22}
        assert worker.wait() == 3
        assert "undecodable frame" in worker.stderr_text()


@pytest.mark.parametrize("prelude", PRELUDES)
def test_a_task_cancelled_in_the_read_that_starts_it_is_answered_cancelled(
    tmp_path: Path, prelude: str
) -> None:
    with start(worker_script(tmp_path, PRELUDES[prelude])) as worker:
        worker.send_raw(
            frame({"id": 5, "command": "sleep", "args": {"seconds": 30}})
            + frame({"id": 5, "command": "$cancel"})
            + frame({"id": 6, "command": "sleep", "args": {"seconds": 0}})
        )
        replies = {reply["id"]: reply for reply in (worker.receive(5), worker.receive(5))}
        assert replies[5] == {"id": 5, "success": False, "error": "cancelled"}
        assert replies[6] == {"id": 6, "success": True, "result": {"slept": 0}}
