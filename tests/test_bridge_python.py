"""The Python bridge and its library, driven frame by frame as real worker processes.

Covers docs/PROTOCOL.md for the bundled bridge (handshake, every built-in command, the Numbers
rules, error mapping, exit statuses, stdout protection, ``$cancel``, trace context, memory) and
for a worker written with ``snakepit_python`` (``command``/``run``).
"""

from __future__ import annotations

import os
import re
import signal
import struct
import sys
import time
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import snakepit_python
from snakepit_python import plugin

from snakepit_core.schemas import shared_command_schemas

from raw_worker import RawWorker, frame

BRIDGE = [sys.executable, str(plugin.BRIDGE_PATH)]
BUILTINS = sorted(shared_command_schemas())
#: How quickly a cancelled request must be answered (PROTOCOL.md asks for "promptly"; the pool
#: kills a worker that does not answer after a short bound).
CANCEL_BOUND = 2.0  # seconds to the "cancelled" answer, generous for a busy 2-core machine

CUSTOM_WORKER = """
import asyncio, functools, os, subprocess, time
from snakepit_python import CommandError, command, run

print("printed-before-run")


@command
def shout(args, ctx):
    return {"text": args["text"].upper()}


@command("slow_add")
async def slow_add(args, ctx):
    await asyncio.sleep(args.get("delay", 0))
    return args["a"] + args["b"]


@command
def nap(args):
    time.sleep(args["seconds"])
    return "woke"


@command
def trace(args, ctx):
    return {"request_id": ctx.request_id, "worker_id": ctx.worker_id,
            "traceparent": ctx.traceparent, "tracestate": ctx.tracestate,
            "deadline_ms": ctx.deadline_ms, "deadline": ctx.deadline}


@command
def boom(args):
    raise RuntimeError("it broke")


@command
def refuse(args):
    raise CommandError("not today")


@command
def lookup(args):
    return args["missing"]


@command
def not_json(args):
    return {"values": {1, 2}}


@command
def not_finite(args):
    return float("nan")


@command
def noisy(args):
    print("printed-by-handler")
    os.write(1, b"written-to-fd-1\\n")
    subprocess.run(["sh", "-c", "echo echoed-by-child"], check=True)
    return "quiet"


@command
def read_stdin(args):
    child = subprocess.run(["sh", "-c", "cat"], stdout=subprocess.PIPE, timeout=5, check=True)
    return {"bytes_read": len(child.stdout)}


def logged(func):
    @functools.wraps(func)
    def wrapper(args):
        return func(args)
    return wrapper


@command
@logged
async def wrapped(args):
    await asyncio.sleep(0)
    return "awaited"


class Doubler:
    def __call__(self, args):
        return args["n"] * 2


command("double")(Doubler())
command("scaled")(functools.partial(lambda factor, args: args["n"] * factor, 3))

if __name__ == "__main__":
    run()
"""


def compute(worker: RawWorker, operation: str, a: Any, b: Any) -> dict[str, Any]:
    return worker.call("compute", {"operation": operation, "a": a, "b": b})


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


@pytest.fixture
def bridge() -> Iterator[RawWorker]:
    with RawWorker(BRIDGE) as worker:
        worker.handshake("py-1")
        yield worker


@pytest.fixture
def custom(tmp_path: Path) -> Iterator[RawWorker]:
    """A worker written with the library. Its stdout is buffered, the default for a pipe:
    output printed before run() is still in the buffer when run() moves the protocol aside."""
    script = tmp_path / "custom_worker.py"
    script.write_text(CUSTOM_WORKER)
    with RawWorker([sys.executable, str(script)], env={"PYTHONUNBUFFERED": ""}) as worker:
        worker.handshake("custom-1")
        yield worker


def finish(worker: RawWorker) -> tuple[int, str]:
    """Close stdin; return the exit status and all of stderr."""
    worker.close_stdin()
    status = worker.wait()
    return status, worker.stderr_text()


# -------------------------------------------------------------------------
# The plugin
# -------------------------------------------------------------------------


def test_plugin_is_registered_and_describes_the_bundled_bridge() -> None:
    names = {ep.name: ep.value for ep in entry_points(group="snakepit.adapters")}
    assert names["python"] == "snakepit_python.plugin"
    (adapter,) = plugin.snakepit_adapters()
    assert adapter.name == "python"
    assert adapter.executable == sys.executable
    assert Path(adapter.script or "").is_file()
    assert sorted(adapter.commands or ()) == BUILTINS
    assert set(adapter.schemas) == set(BUILTINS)


def test_python_adapter_runs_a_library_worker_with_this_interpreter(tmp_path: Path) -> None:
    adapter = plugin.python_adapter("mine", tmp_path / "w.py", commands=["ping", "shout"])
    assert adapter.command_line() == [sys.executable, str(tmp_path / "w.py")]
    assert adapter.commands == frozenset({"ping", "shout"})


# -------------------------------------------------------------------------
# Handshake and built-in commands
# -------------------------------------------------------------------------


def test_info_python_specifics(bridge: RawWorker) -> None:
    info = bridge.result("info")
    assert info["runtime_version"] == ".".join(map(str, sys.version_info[:3]))
    assert info["bridge_version"] == snakepit_python.__version__
    assert info["platform"] == sys.platform
    assert info["arch"] == os.uname().machine


@pytest.mark.parametrize(
    ("operation", "a", "b", "expected"),
    [
        ("add", 5, 3, 8),
        ("subtract", 5, 8, -3),
        ("multiply", 4, 2.5, 10),
        ("divide", 7, 2, 3.5),
        ("divide", 6, 2, 3),
        ("divide", 6.0, 2, 3),
        ("add", 2.5, 0.5, 3),
        ("add", 0.1, 0.2, 0.30000000000000004),
        ("add", 2**60, 1, 2**60 + 1),
        ("multiply", 2**64, 2**64, 2**128),
        ("divide", 2**60 + 2, 2, 2**59 + 1),
        ("multiply", 1e20, 10, 1e21),
    ],
)
def test_compute_numbers(bridge: RawWorker, operation: str, a: Any, b: Any, expected: Any) -> None:
    response = compute(bridge, operation, a, b)
    assert response["success"] is True, response
    result = response["result"]
    assert result == {"operation": operation, "inputs": {"a": a, "b": b}, "result": expected}
    assert type(result["result"]) is type(expected)


@pytest.mark.parametrize(
    ("operation", "a", "b", "error"),
    [
        ("multiply", 1e308, 10, "compute: result is not a finite number"),
        ("divide", 2**2000, 3, "compute: result is not a finite number"),
        ("divide", 1, 0, "compute: division by zero"),
        ("divide", 1.5, 0.0, "compute: division by zero"),
        (
            "power",
            2,
            3,
            "compute: unknown operation 'power' (supported: add, divide, multiply, subtract)",
        ),
        ("add", "1", 2, "compute: 'a' must be a number"),
        ("add", 1, True, "compute: 'b' must be a number"),
    ],
)
def test_compute_refusals(bridge: RawWorker, operation: str, a: Any, b: Any, error: str) -> None:
    response = compute(bridge, operation, a, b)
    assert response == {"id": response["id"], "success": False, "error": error}


@pytest.mark.parametrize("command", ["store", "retrieve"])
def test_session_commands_need_a_session(bridge: RawWorker, command: str) -> None:
    error = bridge.error(command, {"key": "k", "value": 1})
    assert error == f"{command}: session_id is required (use execute_in_session)"


def test_create_program(bridge: RawWorker) -> None:
    args = {"signature": " question , context -> answer ", "temperature": 0.2, "session_id": "s"}
    program = bridge.result("create_program", args)
    assert re.fullmatch(r"prog_[0-9a-f]{16}", program["program_id"])
    assert program == {
        "program_id": program["program_id"],
        "signature": args["signature"],
        "inputs": ["question", "context"],
        "outputs": ["answer"],
        "config": {"temperature": 0.2},
    }
    named = bridge.result("create_program", {"signature": "a -> b", "program_id": "mine"})
    assert named["program_id"] == "mine"
    assert named["config"] == {}


@pytest.mark.parametrize("signature", ["a b", "-> out", "in ->", "a, -> b", "a -> b -> c"])
def test_create_program_refuses_a_bad_signature(bridge: RawWorker, signature: str) -> None:
    error = bridge.error("create_program", {"signature": signature})
    assert error.startswith(f"create_program: invalid signature {signature!r}")


def test_execute_program(bridge: RawWorker) -> None:
    program = bridge.result("create_program", {"signature": "q, ctx -> answer, why"})
    inputs = {"ctx": {"k": [1, 2.0, "é"]}, "q": "what?"}
    result = bridge.result("execute_program", {"program": program, "inputs": inputs})
    assert result == {
        "program_id": program["program_id"],
        "outputs": {
            "answer": 'answer(q=what?, ctx={"k":[1,2,"é"]})',
            "why": 'why(q=what?, ctx={"k":[1,2,"é"]})',
        },
    }
    anonymous = {"program": {"signature": "x -> y"}, "inputs": {"x": 5}}
    assert bridge.result("execute_program", anonymous) == {
        "program_id": None,
        "outputs": {"y": "y(x=5)"},
    }
    missing = {"program": program, "inputs": {"q": 1}}
    assert bridge.error("execute_program", missing) == "execute_program: missing input 'ctx'"


def test_bad_envelopes_fail_cleanly(bridge: RawWorker) -> None:
    bridge.send_raw(frame({"id": 50, "command": "echo", "args": [1]}))
    assert bridge.receive() == {
        "id": 50,
        "success": False,
        "error": "echo: args must be a JSON object",
    }
    bridge.send_raw(frame({"id": 51, "command": 7}))
    assert bridge.receive()["error"] == "request 'command' must be a string"
    assert bridge.result("echo", {"still": "alive"}) == {"echoed": {"still": "alive"}}


def test_large_frames_both_ways(bridge: RawWorker) -> None:
    payload = "x" * (3 * 1024 * 1024)
    assert bridge.result("echo", {"payload": payload}) == {"echoed": {"payload": payload}}


def test_response_over_the_frame_limit_is_refused() -> None:
    with RawWorker(BRIDGE, env={"SNAKEPIT_MAX_FRAME_BYTES": "300"}) as worker:
        worker.handshake()
        error = worker.error("info")
        assert re.fullmatch(
            r"info: response of \d+ bytes exceeds the frame limit of 300 bytes", error
        )


# -------------------------------------------------------------------------
# Process behaviour
# -------------------------------------------------------------------------


@pytest.mark.parametrize("busy", [False, True])
def test_exit_0_on_sigterm(bridge: RawWorker, busy: bool) -> None:
    if busy:
        bridge.send("sleep", {"seconds": 30})
    time.sleep(0.1)
    os.kill(bridge.proc.pid, signal.SIGTERM)
    assert bridge.wait(5) == 0
    assert bridge.stderr_text() == ""  # not even asyncio's note of a task left pending


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x00\x00\x05notjs", "undecodable frame"),
        (b"\x00\x00\x00\x02\xff\xfe", "undecodable frame"),
        (b"\x00\x00\x00\x03NaN", "undecodable frame"),
        (b"\x00\x00\x00\x06[1, 2]", "not a JSON object"),
        (frame({"command": "ping"}), "without an integer 'id'"),
        (struct.pack(">I", 64 * 1024 * 1024 + 1), "exceeds the limit of 67108864 bytes"),
        (b"\x00\x00\x00\x10{}", "input ended inside a frame"),
    ],
)
def test_exit_3_on_an_undecodable_frame(data: bytes, reason: str) -> None:
    with RawWorker(BRIDGE) as worker:
        worker.handshake()
        worker.send_raw(data)
        worker.close_stdin()
        assert worker.wait() == 3
        assert reason in worker.stderr_text()


def test_frame_limit_comes_from_the_environment() -> None:
    with RawWorker(BRIDGE, env={"SNAKEPIT_MAX_FRAME_BYTES": "200"}) as worker:
        worker.handshake()
        worker.send("echo", {"text": "z" * 300})
        assert worker.wait() == 3
        assert "exceeds the limit of 200 bytes" in worker.stderr_text()


def test_user_output_cannot_corrupt_the_protocol(custom: RawWorker) -> None:
    assert custom.result("noisy") == "quiet"
    assert custom.result("shout", {"text": "still framed"}) == {"text": "STILL FRAMED"}
    status, stderr = finish(custom)
    assert status == 0
    for line in ("printed-before-run", "printed-by-handler", "written-to-fd-1", "echoed-by-child"):
        assert line in stderr


def test_child_processes_cannot_steal_request_bytes(custom: RawWorker) -> None:
    first = custom.send("read_stdin")
    second = custom.send("shout", {"text": "behind the reader"})
    assert custom.receive() == {"id": first, "success": True, "result": {"bytes_read": 0}}
    assert custom.receive() == {
        "id": second,
        "success": True,
        "result": {"text": "BEHIND THE READER"},
    }


# -------------------------------------------------------------------------
# The start-up contract every bundled bridge shares (exit 2, a message naming the culprit)
# -------------------------------------------------------------------------

REGISTRATIONS = {
    "twice": (
        "@command\ndef shout(args):\n    return 1\n\n"
        "@command('shout')\ndef again(args):\n    return 2\n",
        "command 'shout' is registered twice",
    ),
    "dollar": (
        "@command('$shout')\ndef shout(args):\n    return 1\n",
        "command '$shout' is invalid: names starting with '$' belong to the protocol",
    ),
    "ping": (
        "@command\ndef ping(args):\n    return 1\n",
        "command 'ping' is provided by the library",
    ),
    "builtin": (
        "import snakepit_python.builtin_commands\n\n@command\ndef echo(args):\n    return 1\n",
        "command 'echo' is registered twice",
    ),
}


@pytest.mark.parametrize("case", sorted(REGISTRATIONS))
def test_a_bad_registration_exits_2_naming_the_command(tmp_path: Path, case: str) -> None:
    source, message = REGISTRATIONS[case]
    script = tmp_path / "worker.py"
    script.write_text(f"from snakepit_python import command, run\n\n{source}\nrun()\n")
    with RawWorker([sys.executable, str(script)]) as worker:
        assert worker.wait() == 2  # before reading a frame: nothing was sent
        assert f"{message}; exiting with status 2" in worker.stderr_text()
        assert worker.proc.stdout is not None and worker.proc.stdout.read() == b""


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5"])
def test_an_invalid_frame_limit_exits_2_naming_it(value: str) -> None:
    with RawWorker(BRIDGE, env={"SNAKEPIT_MAX_FRAME_BYTES": value}) as worker:
        assert worker.wait() == 2
        expected = f"SNAKEPIT_MAX_FRAME_BYTES={value!r} is not a positive integer"
        assert expected in worker.stderr_text()


# -------------------------------------------------------------------------
# The library: handlers, errors, context
# -------------------------------------------------------------------------


def test_library_handlers(custom: RawWorker) -> None:
    assert custom.result("shout", {"text": "hi"}) == {"text": "HI"}
    assert custom.result("slow_add", {"a": 2, "b": 3}) == 5
    assert custom.result("double", {"n": 4}) == 8
    assert custom.result("scaled", {"n": 4}) == 12
    assert custom.result("wrapped") == "awaited"  # a sync wrapper returning a coroutine
    supported = ", ".join(
        sorted(
            [
                "boom",
                "double",
                "lookup",
                "nap",
                "noisy",
                "not_finite",
                "not_json",
                "ping",
                "read_stdin",
                "refuse",
                "scaled",
                "shout",
                "slow_add",
                "trace",
                "wrapped",
            ]
        )
    )
    assert custom.error("echo") == f"unknown command 'echo' (supported: {supported})"


def test_handler_exceptions_become_failures(custom: RawWorker) -> None:
    assert custom.error("boom") == "boom: it broke"
    assert custom.error("refuse") == "refuse: not today"
    assert custom.error("lookup") == "lookup: KeyError: 'missing'"
    assert custom.error("shout", {"text": 5}) == ("shout: 'int' object has no attribute 'upper'")
    assert custom.error("not_json").startswith("not_json: result cannot be sent as JSON")
    assert custom.error("not_finite").startswith("not_finite: result cannot be sent as JSON")
    assert custom.result("shout", {"text": "ok"}) == {"text": "OK"}
    _, stderr = finish(custom)
    assert "RuntimeError: it broke" in stderr  # unexpected errors log their traceback
    assert "not today" not in stderr  # a CommandError is expected: nothing logged


def test_trace_context_reaches_the_handler(custom: RawWorker) -> None:
    meta = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=1",
        "deadline_ms": 2500,
    }
    request_id = custom.send("trace", meta=meta)
    response = custom.receive()
    deadline = response["result"].pop("deadline")
    assert response == {
        "id": request_id,
        "success": True,
        "result": {"request_id": request_id, "worker_id": "custom-1", **meta},
    }
    assert 1.5 < deadline <= 2.5  # seconds left of the 2500 ms budget, counted from receipt
    custom.send("trace", meta={"deadline_ms": 0})
    assert custom.receive()["result"]["deadline"] <= 0  # it may go negative
    bare = custom.result("trace")
    assert (bare["traceparent"], bare["tracestate"], bare["deadline_ms"]) == (None, None, None)
    assert bare["deadline"] is None


# -------------------------------------------------------------------------
# $cancel
# -------------------------------------------------------------------------


def assert_cancels(worker: RawWorker, command: str, args: dict[str, Any]) -> None:
    request_id = worker.send(command, args)
    time.sleep(0.2)  # let the handler start
    started = time.monotonic()
    worker.send("$cancel", id=request_id)
    assert worker.receive(timeout=5) == {"id": request_id, "success": False, "error": "cancelled"}
    assert time.monotonic() - started < CANCEL_BOUND


def test_cancel_builtin_sleep(bridge: RawWorker) -> None:
    assert_cancels(bridge, "sleep", {"seconds": 30})
    assert bridge.result("sleep", {"seconds": 0}) == {"slept": 0}


def test_cancel_async_handler(custom: RawWorker) -> None:
    assert_cancels(custom, "slow_add", {"a": 1, "b": 2, "delay": 30})
    assert custom.result("slow_add", {"a": 1, "b": 2, "delay": 0.01}) == 3


def test_cancel_sync_handler_in_time_sleep(custom: RawWorker) -> None:
    assert_cancels(custom, "nap", {"seconds": 30})
    assert custom.result("nap", {"seconds": 0}) == "woke"
    assert_cancels(custom, "nap", {"seconds": 30})  # and again: the set-up is restored


# -------------------------------------------------------------------------
# Memory
# -------------------------------------------------------------------------
