"""The bundled bridges' shared contract at the frame level, once for every runtime.

Each runtime's own file (test_bridge_python/node/ruby.py) keeps what only that runtime has:
its library, custom workers, stdout protection, its exit paths and extra commands. What every
bundled bridge must do identically (docs/PROTOCOL.md) is checked here, parametrized, so a
fourth runtime gets it by adding its name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from snakepit_core.plugins import get_plugin_manager

from raw_worker import RawWorker

RUNTIMES = ["python", "node", "ruby"]
#: VmRSS growth allowed over 10,000 requests after a 1,000-request warm-up: a per-request leak
#: of 2 KiB would exceed it; the runtimes' own allocators settle well within it.
LEAK_TOLERANCE = 20 * 1024 * 1024


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def bridge(runtime: str) -> Iterator[RawWorker]:
    adapter = get_plugin_manager().get_adapter(runtime)
    with RawWorker(adapter.command_line(), env=adapter.env) as worker:
        worker.handshake()
        yield worker


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_handshake_shape(runtime: str) -> None:
    adapter = get_plugin_manager().get_adapter(runtime)
    with RawWorker(adapter.command_line(), env=adapter.env) as worker:
        response = worker.handshake("w-7")
        assert set(response) <= {"id", "success", "result", "timestamp"}
        ping = response["result"]
        assert set(ping) == {
            "status", "uptime", "requests_handled", "worker_id", "runtime", "capabilities", "pid",
        }  # fmt: skip
        assert ping["status"] == "ok" and ping["worker_id"] == "w-7"
        assert ping["runtime"] == runtime and ping["capabilities"] == ["cancel"]
        assert ping["pid"] == worker.proc.pid
        assert isinstance(ping["uptime"], float) and ping["uptime"] >= 0
        assert ping["requests_handled"] == 1  # counts the request being answered
        assert worker.result("ping")["requests_handled"] == 2


def test_info_shape(bridge: RawWorker, runtime: str) -> None:
    info = bridge.result("info")
    assert set(info) >= {
        "runtime", "runtime_version", "bridge_version", "platform", "arch", "pid", "worker_id",
        "uptime", "requests_handled", "memory", "commands",
    }  # fmt: skip
    assert info["runtime"] == runtime and info["pid"] == bridge.proc.pid
    assert info["worker_id"] == "raw-1" and info["requests_handled"] == 2
    assert all(isinstance(info[key], str) and info[key] for key in ("runtime_version", "arch"))
    assert isinstance(info["memory"]["rss_bytes"], int) and info["memory"]["rss_bytes"] > 0
    commands = get_plugin_manager().get_adapter(runtime).commands
    assert commands is not None and info["commands"] == sorted(commands)


def test_echo_returns_args_as_received(bridge: RawWorker) -> None:
    args = {"text": "héllo", "nested": {"list": [1, 2.5, None, True]}, "session_id": "s"}
    assert bridge.result("echo", args) == {"echoed": args}


def test_sleep(bridge: RawWorker) -> None:
    started = time.monotonic()
    assert bridge.result("sleep", {"seconds": 0.2}) == {"slept": 0.2}
    assert 0.19 <= time.monotonic() - started < 1
    for bad in (-1, 3601, "1"):
        message = bridge.error("sleep", {"seconds": bad})
        assert message.startswith("sleep: 'seconds' must be a number from 0 to 3600")


def test_session_state(bridge: RawWorker) -> None:
    stored = bridge.result("store", {"session_id": "s1", "key": "k", "value": {"x": [1]}})
    assert stored == {"stored": True, "session_id": "s1", "key": "k"}
    bridge.result("store", {"session_id": "s1", "key": "n", "value": None})
    assert bridge.result("retrieve", {"session_id": "s1", "key": "k"}) == {
        "found": True, "session_id": "s1", "key": "k", "value": {"x": [1]},
    }  # fmt: skip
    assert bridge.result("retrieve", {"session_id": "s1", "key": "n"})["found"] is True
    assert bridge.result("retrieve", {"session_id": "s2", "key": "k"}) == {
        "found": False, "session_id": "s2", "key": "k", "value": None,
    }  # fmt: skip
    cleared = bridge.result("clear_session", {"session_id": "s1"})
    assert cleared == {"cleared": True, "session_id": "s1", "keys": 2}
    assert bridge.result("retrieve", {"session_id": "s1", "key": "k"})["found"] is False
    again = bridge.result("clear_session", {"session_id": "s1"})
    assert again == {"cleared": False, "session_id": "s1", "keys": 0}


def test_unknown_command_lists_the_supported_ones(bridge: RawWorker) -> None:
    message = bridge.error("nope", {})
    assert message.startswith("unknown command 'nope' (supported: ")
    assert "compute" in message and "ping" in message


def test_exit_0_on_end_of_input(bridge: RawWorker) -> None:
    bridge.close_stdin()
    assert bridge.wait(10) == 0
    assert bridge.stderr_text() == ""


def test_cancel_for_an_id_not_running_is_ignored(bridge: RawWorker) -> None:
    bridge.send("$cancel", id=424242)
    assert bridge.result("ping")["status"] == "ok"  # a stray answer would arrive first
    request_id = bridge.send("sleep", {"seconds": 0.3})
    time.sleep(0.1)
    bridge.send("$cancel", id=424242)
    assert bridge.receive() == {"id": request_id, "success": True, "result": {"slept": 0.3}}


def test_memory_stays_flat_over_10000_requests(bridge: RawWorker) -> None:
    """ping, echo, compute and failures: VmRSS grows by less than LEAK_TOLERANCE."""
    requests: list[tuple[str, dict[str, Any]]] = [
        ("ping", {}),
        ("echo", {"payload": "x" * 200, "n": [1, 2, 3]}),
        ("compute", {"operation": "divide", "a": 7, "b": 2}),
        ("compute", {"operation": "divide", "a": 1, "b": 0}),
        ("nope", {}),
    ]

    def run(count: int) -> None:
        for index in range(count):
            bridge.call(*requests[index % len(requests)])

    run(1000)
    before = rss_bytes(bridge.proc.pid)
    run(10_000)
    assert rss_bytes(bridge.proc.pid) - before < LEAK_TOLERANCE
