"""The Ruby bridge and bridge library (snakepit-ruby), frame by frame against real ruby processes.

A missing ``ruby`` fails these tests (``StartupError`` from the adapter): it never skips them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import snakepit_ruby
from snakepit_ruby.plugin import LIBRARY_DIR, ruby_adapter, snakepit_adapters

from raw_worker import RawWorker, frame

CANCEL_BOUND = 2.0  # seconds to the "cancelled" answer, generous for a busy 2-core machine

CUSTOM_WORKER = """
require "snakepit"

def describe(args, ctx)
  { "args" => args, "ctx" => ctx.to_h }
end

def explode
  raise ZeroDivisionError, "kaput deep down"
end

Snakepit.run({ "args_only" => ->(args) { { "got" => args } } }) do |s|
  s.command("with_ctx", method(:describe))
  s.command("boom") { raise ArgumentError, "kaput" }
  s.command("deep_boom") { explode }
  s.command("refuse") { raise Snakepit::CommandError, "not today" }
  s.command("nap") { |args| sleep(args["seconds"]); { "napped" => true } }
  s.command("stubborn") do
    sleep(30)
  rescue => e # a handler's own rescue must not swallow the cancel
    { "swallowed" => e.class.name }
  end
  s.command("spin") { x = 0; x += 1 while true }
  s.command("nan") { { "x" => Float::NAN } }
  s.command("chatter") do
    puts "puts-line"
    $stdout.write("stdout-write\\n")
    STDOUT.print("STDOUT-print\\n")
    system("echo child-echo")
    { "child_read" => `cat`, "child_fds" => IO.popen(["ls", "/proc/self/fd"], &:read).split }
  end
end
"""


def bridge_argv() -> list[str]:
    """The bundled bridge's command line, as the plugin builds it (fails if ruby is missing)."""
    (adapter,) = snakepit_adapters()
    return adapter.command_line()


@pytest.fixture
def bridge() -> Iterator[RawWorker]:
    with RawWorker(bridge_argv()) as worker:
        worker.handshake()
        yield worker


def start_custom(tmp_path: Path) -> RawWorker:
    """A worker written with the library, started the way ``ruby_adapter`` says."""
    script = tmp_path / "custom.rb"
    script.write_text(CUSTOM_WORKER)
    adapter = ruby_adapter("custom", script)
    return RawWorker(adapter.command_line(), env=adapter.env)


@pytest.fixture
def custom(tmp_path: Path) -> Iterator[RawWorker]:
    with start_custom(tmp_path) as worker:
        worker.handshake()
        yield worker


def assert_cancels(worker: RawWorker, command: str, args: dict[str, Any]) -> None:
    request_id = worker.send(command, args)
    time.sleep(0.2)  # let the handler start
    started = time.monotonic()
    worker.send("$cancel", id=request_id)
    assert worker.receive() == {"id": request_id, "success": False, "error": "cancelled"}
    assert time.monotonic() - started < CANCEL_BOUND
    assert worker.result("ping")["status"] == "ok"


def exit_after(worker: RawWorker, data: bytes) -> tuple[int, str]:
    worker.send_raw(data)
    return worker.wait(), worker.stderr_text()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -------------------------------------------------------------------------------------------
# The plugin
# -------------------------------------------------------------------------------------------


def test_the_entry_point_provides_the_ruby_adapter() -> None:
    (entry_point,) = entry_points(group="snakepit.adapters", name="ruby")
    (adapter,) = entry_point.load().snakepit_adapters()
    assert adapter.name == "ruby"
    assert {"ping", "compute", "process_data", "generate_report"} <= adapter.commands
    assert adapter.schemas["process_data"]["required"] == ["data"]
    assert adapter.schemas["generate_report"]["required"] == ["title"]
    assert adapter.timeout_for("generate_report") == 120.0
    assert adapter.timeout_for("echo") == 30.0


def test_ruby_adapter_puts_the_library_on_rubylib() -> None:
    adapter = ruby_adapter("mine", "mine.rb", env={"RUBYLIB": "/opt/lib"}, commands=["ping"])
    assert adapter.env is not None
    assert adapter.env["RUBYLIB"] == f"{LIBRARY_DIR}{os.pathsep}/opt/lib"
    assert adapter.commands == frozenset({"ping"})


# -------------------------------------------------------------------------------------------
# Built-in commands
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "a", "b", "expected"),
    [
        ("add", 5, 3, 8),
        ("subtract", 5, 8, -3),
        ("multiply", 4, 2.5, 10),
        ("divide", 7, 2, 3.5),
        ("divide", 6, 2, 3),
        ("add", 2.5, 0.5, 3),
        ("add", 0.1, 0.2, 0.1 + 0.2),
        ("add", 2**60, 1, 2**60 + 1),
        ("multiply", 2**60, 2**60, 2**120),
        ("divide", 2**61 + 2, 2, 2**60 + 1),
    ],
)
def test_compute_numbers(bridge: RawWorker, operation: str, a: Any, b: Any, expected: Any) -> None:
    computed = bridge.result("compute", {"operation": operation, "a": a, "b": b})
    assert computed == {"operation": operation, "inputs": {"a": a, "b": b}, "result": expected}
    # An integral result is a JSON integer, a fractional one a float; never floored.
    assert type(computed["result"]) is type(expected)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"operation": "multiply", "a": 1e308, "b": 10}, "compute: result is not a finite number"),
        ({"operation": "divide", "a": 1, "b": 0}, "compute: division by zero"),
        ({"operation": "divide", "a": 1.5, "b": 0.0}, "compute: division by zero"),
        ({"operation": "add", "a": "1", "b": 2}, "compute: 'a' must be a number, got \"1\""),
        ({"operation": "power", "a": 1, "b": 2}, 'compute: unknown operation "power"'),
    ],
)
def test_compute_refusals(bridge: RawWorker, args: dict[str, Any], message: str) -> None:
    assert bridge.error("compute", args).startswith(message)


def test_info_ruby_specifics(bridge: RawWorker) -> None:
    info = bridge.result("info")
    assert info["runtime_version"].count(".") == 2
    assert info["bridge_version"] == snakepit_ruby.__version__
    assert info["platform"] == "linux"
    assert info["arch"] == os.uname().machine
    assert info["memory"]["rss_bytes"] == pytest.approx(rss_bytes(bridge.proc.pid), rel=0.5)


def test_programs(bridge: RawWorker) -> None:
    created = bridge.result(
        "create_program",
        {"signature": " question , context -> answer", "temperature": 0.2, "session_id": "s"},
    )
    assert created["program_id"].startswith("prog_") and len(created["program_id"]) == 21
    assert created["inputs"] == ["question", "context"]
    assert created["outputs"] == ["answer"]
    assert created["config"] == {"temperature": 0.2}
    named = bridge.result("create_program", {"signature": "a -> b", "program_id": "p1"})
    assert named["program_id"] == "p1"

    inputs = {"question": "why?", "context": {"b": [1, "x"], "a": None}}
    executed = bridge.result("execute_program", {"program": created, "inputs": inputs})
    assert executed == {
        "program_id": created["program_id"],
        "outputs": {"answer": 'answer(question=why?, context={"b":[1,"x"],"a":null})'},
    }
    missing = {"program": created, "inputs": {"question": "q"}}
    assert bridge.error("execute_program", missing) == "execute_program: missing input 'context'"
    assert bridge.error("create_program", {"signature": " -> out"}).startswith(
        "create_program: invalid signature"
    )


def test_process_data(bridge: RawWorker) -> None:
    assert bridge.result("process_data", {"data": "abc"}) == {
        "original": "abc",
        "processed": "ABC",
        "length": 3,
    }
    assert bridge.result("process_data", {"data": "grüße"})["length"] == 5


@pytest.mark.parametrize(("data", "items"), [([1, 2, 3], 3), ({"a": 1}, 1), ("text", 0), (None, 0)])
def test_generate_report(bridge: RawWorker, data: Any, items: int) -> None:
    report = bridge.result("generate_report", {"title": "T", "data": data})
    generated_at = datetime.fromisoformat(report.pop("generated_at"))
    assert generated_at.utcoffset() is not None and generated_at.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - generated_at).total_seconds()) < 5
    assert report == {"title": "T", "data": data, "summary": {"items": items}}


def test_cancel_sleep(bridge: RawWorker) -> None:
    assert_cancels(bridge, "sleep", {"seconds": 30})


def test_requests_that_arrive_while_a_handler_runs_are_answered_in_order(
    bridge: RawWorker,
) -> None:
    first = bridge.send("sleep", {"seconds": 0.2})
    second = bridge.send("echo", {"n": 2})
    third = bridge.send("echo", {"n": 3})
    assert [bridge.receive()["id"] for _ in range(3)] == [first, second, third]


def test_a_response_over_the_frame_limit_is_refused() -> None:
    with RawWorker(bridge_argv(), env={"SNAKEPIT_MAX_FRAME_BYTES": "1024"}) as worker:
        worker.handshake()
        # Each output repeats the input: a small request, a large response.
        args = {"program": {"signature": "a -> b, c, d"}, "inputs": {"a": "x" * 400}}
        message = worker.error("execute_program", args)
        assert message.startswith("execute_program: response of ")
        assert message.endswith("bytes exceeds the frame limit 1024")
        assert worker.result("ping")["status"] == "ok"


# -------------------------------------------------------------------------------------------
# The library, through a worker of one's own
# -------------------------------------------------------------------------------------------


def test_handlers_take_args_or_args_and_ctx(custom: RawWorker) -> None:
    assert custom.result("args_only", {"x": 1}) == {"got": {"x": 1}}
    assert custom.result("with_ctx", {"y": 2})["args"] == {"y": 2}


def test_trace_context_reaches_ctx(custom: RawWorker) -> None:
    meta = {
        "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        "tracestate": "k=v",
        "deadline_ms": 1500,
    }
    request_id = custom.send("with_ctx", {}, meta=meta)
    ctx = custom.receive()["result"]["ctx"]
    assert ctx == {"request_id": request_id, "worker_id": "raw-1", **meta}


def test_exceptions_become_failures(custom: RawWorker) -> None:
    assert custom.error("boom") == "boom: kaput"
    assert custom.error("nan").startswith("nan: result cannot be encoded as JSON (NaN")
    assert custom.result("ping")["status"] == "ok"


@pytest.mark.parametrize("max_in_flight", [None, 4])
def test_an_unexpected_exception_logs_its_backtrace(
    tmp_path: Path, max_in_flight: int | None
) -> None:
    """Any exception is answered; one that is not a Snakepit::CommandError is also logged."""
    with start_custom(tmp_path) as custom:
        handshake: dict[str, Any] = {"worker_id": "raw-1", "initialization": True}
        if max_in_flight is not None:
            handshake["max_in_flight"] = max_in_flight
        assert custom.call("ping", handshake)["success"] is True
        assert custom.error("deep_boom") == "deep_boom: kaput deep down"
        assert custom.error("refuse") == "refuse: not today"
        assert custom.result("ping")["status"] == "ok"  # still serving
        custom.close_stdin()
        assert custom.wait() == 0
        stderr = custom.stderr_text()
    assert "snakepit-ruby: command 'deep_boom' failed: " in stderr
    assert "kaput deep down (ZeroDivisionError)" in stderr
    assert re.search(r"custom\.rb:\d+:in `explode'", stderr), stderr  # the stack, innermost first
    assert "not today" not in stderr  # an expected failure, answered but not logged


@pytest.mark.parametrize("command", ["nap", "stubborn", "spin"])
def test_cancel_a_custom_handler(custom: RawWorker, command: str) -> None:
    assert_cancels(custom, command, {"seconds": 30})


def test_user_output_cannot_reach_the_protocol(custom: RawWorker) -> None:
    chatter = custom.result("chatter")
    assert chatter["child_read"] == ""  # a child reading stdin gets /dev/null, not our frames
    # ls sees stdin, stdout, stderr and its own directory: no protocol descriptor leaked into it.
    assert set(chatter["child_fds"]) <= {"0", "1", "2", "3"}
    assert custom.result("ping")["status"] == "ok"
    custom.close_stdin()
    assert custom.wait() == 0
    assert custom.proc.stdout is not None
    assert custom.proc.stdout.read() == b""
    stderr = custom.stderr_text()
    for line in ("puts-line", "stdout-write", "STDOUT-print", "child-echo"):
        assert line in stderr


# -------------------------------------------------------------------------------------------
# Process behaviour
# -------------------------------------------------------------------------------------------


def test_end_of_input_while_a_handler_runs_answers_it_then_exits_0(bridge: RawWorker) -> None:
    request_id = bridge.send("sleep", {"seconds": 0.2})
    bridge.close_stdin()
    assert bridge.receive() == {"id": request_id, "success": True, "result": {"slept": 0.2}}
    assert bridge.wait() == 0


@pytest.mark.parametrize("busy", [False, True])
def test_sigterm_exits_0(bridge: RawWorker, busy: bool) -> None:
    if busy:
        bridge.send("sleep", {"seconds": 30})
        time.sleep(0.1)
    bridge.proc.send_signal(signal.SIGTERM)
    assert bridge.wait(5) == 0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (frame(b"{not json"), "frame is not valid JSON"),
        (frame(b'{"id": 1, "command": "echo", "args": {"t": "\xff"}}'), "not valid UTF-8"),
        (frame(b"[1, 2]"), "frame is not a JSON object"),
        (struct.pack(">I", 64 * 1024 * 1024 + 1), "exceeds the limit of 67108864 bytes"),
        (frame(b'{"command": "ping"}'), "request without an integer id"),
    ],
    ids=["json", "utf8", "not-object", "oversized", "no-id"],
)
def test_an_undecodable_frame_exits_3(bridge: RawWorker, data: bytes, reason: str) -> None:
    status, stderr = exit_after(bridge, data)
    assert status == 3
    assert reason in stderr


def test_an_undecodable_frame_while_a_handler_runs_exits_3(bridge: RawWorker) -> None:
    bridge.send("sleep", {"seconds": 30})
    status, stderr = exit_after(bridge, frame(b"{not json"))
    assert status == 3
    assert "frame is not valid JSON" in stderr


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5", "1_000", " 64", "0x40"])
def test_an_invalid_frame_limit_exits_2_naming_it(value: str) -> None:
    with RawWorker(bridge_argv(), env={"SNAKEPIT_MAX_FRAME_BYTES": value}) as worker:
        assert worker.wait(5) == 2  # at start-up, before reading any frame
        stderr = worker.stderr_text()
        assert stderr == (
            f'snakepit-ruby: SNAKEPIT_MAX_FRAME_BYTES must be a positive integer, got "{value}"\n'
        )
        assert worker.proc.stdout is not None and worker.proc.stdout.read() == b""


SETUP_MISTAKES = {
    "string-and-symbol": (
        'Snakepit.run({ "shout" => ->(a) { a }, shout: ->(a) { a } })',
        """command 'shout' is registered twice (as "shout" and :shout)""",
    ),
    "hash-and-block": (
        'Snakepit.run({ "shout" => ->(a) { a } }) { |s| s.command("shout") { 1 } }',
        "command 'shout' is registered twice",
    ),
    "block-twice": (
        "Snakepit.run { |s| s.command(:shout) { 1 }.command(:shout) { 2 } }",
        "command 'shout' is registered twice",
    ),
    "built-in": (
        'Snakepit.run({ "ping" => ->(a) { a } })',
        "command 'ping' is built into snakepit and cannot be replaced",
    ),
    "dollar": (
        'Snakepit.run { |s| s.command("$cancel") { 1 } }',
        "command '$cancel' cannot be registered: names starting with '$' are the protocol's",
    ),
    "dollar-symbol": (
        "Snakepit.run({ '$shout': ->(a) { a } })",
        "command '$shout' cannot be registered",
    ),
    "not-a-name": ("Snakepit.run({ 7 => ->(a) { a } })", "command name 7 must be a String"),
    "not-callable": ('Snakepit.run({ "shout" => 42 })', "handler of 'shout' must be a callable"),
}


@pytest.mark.parametrize("mistake", SETUP_MISTAKES)
def test_a_setup_mistake_exits_2_naming_the_command(tmp_path: Path, mistake: str) -> None:
    code, message = SETUP_MISTAKES[mistake]
    script = tmp_path / "mistake.rb"
    script.write_text(f'require "snakepit"\n{code}\n')
    adapter = ruby_adapter("mistake", script)
    with RawWorker(adapter.command_line(), env=adapter.env) as worker:
        assert worker.wait(5) == 2  # at start-up, before reading any frame
        stderr = worker.stderr_text()
        assert stderr.startswith(f"snakepit-ruby: {message}"), stderr
        assert stderr.count("\n") == 1, stderr  # one line, no Ruby backtrace
        assert worker.proc.stdout is not None and worker.proc.stdout.read() == b""


def test_the_frame_limit_comes_from_the_environment() -> None:
    with RawWorker(bridge_argv(), env={"SNAKEPIT_MAX_FRAME_BYTES": "300"}) as worker:
        worker.handshake()
        body = json.dumps({"id": 2, "command": "echo", "args": {"t": "x" * 300}}).encode()
        status, stderr = exit_after(worker, frame(body))
        assert status == 3
        assert "exceeds the limit of 300 bytes" in stderr
