"""Callbacks in the Ruby bridge library (``ctx.call``), with raw frames against real ruby processes.

These tests play the pool (PROTOCOL.md, *Callbacks*): they send a request to a worker written
with the library whose handler calls callbacks, read the call frames
``{"id", "call", "name", "args"}``, answer them with ``$callback`` frames and check what the
handler made of the answers. Most cases run at ``max_in_flight`` 1, where the handler runs on
the main thread and the calling thread reads its answer itself, and at 4, where handlers run on
pool threads and the main thread reads every answer.

Cancellation in Ruby keeps the library's design: a ``$cancel`` raises ``Snakepit::Cancelled``
into the handler's thread, so a handler blocked in ``ctx.call`` there sees ``Cancelled``; the
request's other waiting calls (on other threads, or in a handler that masked ``Cancelled``) and
any call made afterwards fail with ``CallbackError`` code ``cancelled``.
"""

from __future__ import annotations

import json
import select
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from snakepit_ruby.plugin import ruby_adapter

from raw_worker import SHM_PREFIX, RawWorker, binary_body, frame, shm_env, split_binary_body

WORKER = r"""
require "json"
require "snakepit"

def report(path, value)
  File.write("#{path}.tmp", JSON.generate(value))
  File.rename("#{path}.tmp", path) # a reader never sees it half written
end

def failure(error)
  { "class" => error.class.name, "code" => error.code, "message" => error.message }
end

Snakepit.run do |s|
  # One call: its result, or what CallbackError said.
  s.command("ask") do |args, ctx|
    { "result" => ctx.call(args["name"], args.fetch("args", {})) }
  rescue Snakepit::CallbackError => e
    { "error" => failure(e) }
  end

  # Several calls at once, from threads of one handler: their results in order.
  s.command("fan_out") do |args, ctx|
    threads = Array.new(args["n"]) do |i|
      Thread.new do
        ctx.call("square", { "i" => i })
      rescue Snakepit::CallbackError => e
        failure(e)
      end
    end
    threads.map(&:value)
  end

  # Binary values both ways.
  s.command("blob") do |args, ctx|
    got = ctx.call("transform", { "data" => args["data"], "note" => "text" })["image"]
    { "image" => got, "encoding" => got.encoding.name, "size" => got.bytesize }
  end

  # A call between items.
  s.command("feed", stream: true) do |args, ctx|
    args["n"].times { |i| ctx.emit(ctx.call("next", { "i" => i })) }
    nil
  end

  # Waits in a call until cancelled; reports what it saw, and what a call made afterwards did.
  s.command("wait") do |args, ctx|
    ctx.call("forever", {})
    "answered"
  rescue Exception => e # rubocop:disable Lint/RescueException: Cancelled is an Exception
    seen = e.class.name
    raise
  ensure
    after = begin
      ctx.call("after", {})
    rescue Snakepit::CallbackError => e
      failure(e)
    end
    report(args["report"], { "seen" => seen, "after" => after })
  end

  # Its calls wait on threads of their own while the handler joins them.
  s.command("wait_threads") do |args, ctx|
    outcomes = Thread::Queue.new
    threads = Array.new(2) do |i|
      Thread.new do
        outcomes << ctx.call("forever", { "i" => i })
      rescue Snakepit::CallbackError => e
        outcomes << failure(e)
      end
    end
    threads.each(&:join)
    "joined"
  ensure
    threads&.each(&:join) # they end: a $cancel fails their calls
    report(args["report"], Array.new(outcomes.size) { outcomes.pop })
  end

  # Masks Cancelled around its call: the call's failure wakes it.
  s.command("masked") do |args, ctx|
    Thread.handle_interrupt(Snakepit::Cancelled => :never) do
      ctx.call("forever", {})
    rescue Snakepit::CallbackError => e
      report(args["report"], failure(e))
    end
    "finished"
  end

  # Leaves a thread behind that waits in a call, and ends once `gate` exists.
  s.command("leave_behind") do |args, ctx|
    Thread.new do
      ctx.call("late", {})
      report(args["report"], "answered")
    rescue Snakepit::CallbackError => e
      report(args["report"], failure(e))
    end
    sleep(0.005) until File.exist?(args["gate"])
    "left"
  end

  # Args that JSON cannot carry.
  s.command("nan") { |_args, ctx| ctx.call("f", { "x" => Float::NAN }) }
  s.command("big") { |args, ctx| ctx.call("f", { "big" => "x" * args["n"] }) }

  # How many calls the library has pending (white box: none may leak).
  s.command("pending") do
    ObjectSpace.each_object(Snakepit::Calls).sum { |calls| calls.instance_variable_get(:@pending).size }
  end
end
"""

#: Generous: a 2-core CI machine may run other tests at the same time.
TIMEOUT = 10.0
QUIET = 0.1
CALL_KEYS = {"id", "call", "name", "args"}

Start = Callable[..., RawWorker]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Starts the worker above and shakes hands with ``max_in_flight``."""
    workers: list[RawWorker] = []
    script = tmp_path / "callbacks.rb"
    script.write_text(WORKER)

    def start(max_in_flight: int | None, env: dict[str, str] | None = None) -> RawWorker:
        adapter = ruby_adapter("callbacks", script)
        worker = RawWorker(adapter.command_line(), env={**adapter.env, **(env or {})})
        workers.append(worker)
        worker.shake_hands(max_in_flight, "raw-cb")
        return worker

    yield start
    for worker in workers:
        worker.kill()


def expect_call(worker: RawWorker, request_id: int, name: str) -> dict[str, Any]:
    """The next frame, which must be a call of ``name`` from request ``request_id``."""
    call = worker.receive(TIMEOUT)
    assert set(call) == CALL_KEYS, call
    assert call["id"] == request_id and call["name"] == name, call
    assert isinstance(call["call"], int) and call["call"] >= 0, call
    return call


def answer(worker: RawWorker, call: dict[str, Any], result: Any) -> None:
    worker.send(
        "$callback", {"call": call["call"], "success": True, "result": result}, id=call["id"]
    )


def refuse(worker: RawWorker, call: dict[str, Any], code: str, error: str) -> None:
    args = {"call": call["call"], "success": False, "error": error, "code": code}
    worker.send("$callback", args, id=call["id"])


def expect_result(worker: RawWorker, request_id: int) -> Any:
    response = worker.receive(TIMEOUT)
    assert response["id"] == request_id and response["success"] is True, response
    return response["result"]


def assert_nothing_more(worker: RawWorker, wait: float = QUIET) -> None:
    assert worker.proc.stdout is not None
    ready, _, _ = select.select([worker.proc.stdout.fileno()], [], [], wait)
    assert not ready, f"an unexpected frame: {worker.receive(1)}"


def read_report(path: Path) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert time.monotonic() < deadline, f"no report at {path}"
        time.sleep(0.005)
    return json.loads(path.read_text())


def pending_calls(worker: RawWorker) -> int:
    count: int = worker.result("pending")
    return count


BOTH = pytest.mark.parametrize("max_in_flight", [1, 4])


# -------------------------------------------------------------------------------------------
# The capability
# -------------------------------------------------------------------------------------------


@BOTH
def test_protocol_2_declares_callbacks(start: Start, max_in_flight: int) -> None:
    answer = start(max_in_flight).handshake_answer
    assert answer["capabilities"] == ["cancel", "deadline", "stream", "binary", "text", "callbacks"]


def test_at_protocol_1_a_call_fails_at_once_without_a_frame(start: Start) -> None:
    worker = start(None)
    assert worker.handshake_answer["capabilities"] == ["cancel"]
    result = worker.result("ask", {"name": "lookup"})
    assert result == {
        "error": {
            "class": "Snakepit::CallbackError",
            "code": "unsupported",
            "message": "callback 'lookup': callbacks need protocol 2 (the pool did not ask for "
            "it in the handshake)",
        }
    }
    assert_nothing_more(worker)


# -------------------------------------------------------------------------------------------
# Round trips
# -------------------------------------------------------------------------------------------


@BOTH
def test_a_call_round_trip(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    request = worker.send("ask", {"name": "lookup", "args": {"key": "user-42"}})
    call = expect_call(worker, request, "lookup")
    assert call["args"] == {"key": "user-42"}
    assert_nothing_more(worker)  # the handler waits for the answer
    answer(worker, call, {"name": "Ada", "tags": [1, 2.5, None]})
    assert expect_result(worker, request) == {"result": {"name": "Ada", "tags": [1, 2.5, None]}}
    assert_nothing_more(worker)  # the $callback itself gets no answer
    assert pending_calls(worker) == 0


@BOTH
def test_a_failed_call_raises_callback_error_with_code_and_message(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    request = worker.send("ask", {"name": "lookup", "args": {}})
    call = expect_call(worker, request, "lookup")
    refuse(worker, call, "callback_failed", "callback 'lookup' failed: KeyError: 'user-42'")
    assert expect_result(worker, request) == {
        "error": {
            "class": "Snakepit::CallbackError",
            "code": "callback_failed",
            "message": "callback 'lookup' failed: KeyError: 'user-42'",
        }
    }
    request = worker.send("ask", {"name": "nope"})
    refuse(worker, expect_call(worker, request, "nope"), "unknown_callback", "unknown 'nope'")
    assert expect_result(worker, request)["error"]["code"] == "unknown_callback"


@BOTH
def test_each_call_has_its_own_number(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    numbers = []
    for _ in range(3):
        request = worker.send("ask", {"name": "f"})
        call = expect_call(worker, request, "f")
        numbers.append(call["call"])
        answer(worker, call, call["call"])
        assert expect_result(worker, request) == {"result": call["call"]}
    assert len(set(numbers)) == 3


@BOTH
def test_concurrent_calls_of_one_handler_answered_out_of_order(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    request = worker.send("fan_out", {"n": 4})
    calls = {}
    for _ in range(4):
        call = expect_call(worker, request, "square")
        calls[call["args"]["i"]] = call
    assert len({call["call"] for call in calls.values()}) == 4
    answer(worker, calls[3], 9)
    refuse(worker, calls[1], "timeout", "callback 'square': the request's deadline passed")
    answer(worker, calls[0], 0)
    assert_nothing_more(worker)  # one call still waits
    answer(worker, calls[2], 4)
    assert expect_result(worker, request) == [
        0,
        {
            "class": "Snakepit::CallbackError",
            "code": "timeout",
            "message": "callback 'square': the request's deadline passed",
        },
        4,
        9,
    ]
    assert pending_calls(worker) == 0


def test_calls_of_several_concurrent_requests(start: Start) -> None:
    worker = start(4)
    requests = [worker.send("ask", {"name": "whoami", "args": {"n": n}}) for n in range(3)]
    calls = [worker.receive(TIMEOUT) for _ in requests]
    assert sorted(call["id"] for call in calls) == requests
    assert len({call["call"] for call in calls}) == 3
    for call in reversed(calls):
        assert set(call) == CALL_KEYS and call["name"] == "whoami"
        answer(worker, call, {"request": call["id"], "n": call["args"]["n"]})
    results = {}
    for _ in requests:
        response = worker.receive(TIMEOUT)
        assert response["success"] is True, response
        results[response["id"]] = response["result"]["result"]
    assert results == {r: {"request": r, "n": n} for n, r in enumerate(requests)}


@BOTH
def test_a_callback_for_an_unknown_call_is_ignored(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    request = worker.send("ask", {"name": "f"})
    call = expect_call(worker, request, "f")
    answer(worker, {"id": request, "call": call["call"] + 1000}, "unknown call")
    answer(worker, {"id": request + 1000, "call": call["call"]}, "another request's id")
    worker.send("$callback", {"call": "one"}, id=request)  # malformed: logged, ignored
    worker.send_raw(frame({"id": request, "command": "$callback", "args": ["a", "list"]}))
    assert_nothing_more(worker)
    answer(worker, call, "the answer")
    assert expect_result(worker, request) == {"result": "the answer"}
    answer(worker, call, "twice")  # answered already: unknown now
    assert worker.result("ping")["status"] == "ok"
    worker.close_stdin()
    assert worker.wait() == 0
    assert 'args.call must be an integer, got "one"' in worker.stderr_text()


def test_a_call_that_cannot_be_sent_fails_the_request_and_sends_nothing(start: Start) -> None:
    worker = start(4, env={"SNAKEPIT_MAX_FRAME_BYTES": "4096"})
    assert worker.error("ask", {"name": 5}) == (
        "ask: ctx.call: the callback's name must be a non-empty String or Symbol, got 5"
    )
    assert worker.error("ask", {"name": ""}).startswith("ask: ctx.call: the callback's name")
    assert worker.error("ask", {"name": "f", "args": [1]}) == (
        "ask: ctx.call('f'): args must be a Hash, got Array"
    )
    assert worker.error("nan") == (
        "nan: ctx.call('f'): args cannot be sent (cannot be encoded as JSON (NaN not allowed "
        "in JSON))"
    )
    message = worker.error("big", {"n": 5000})
    assert message.startswith("big: ctx.call('f'): args cannot be sent (call of "), message
    assert message.endswith(" bytes exceeds the frame limit 4096)"), message
    assert pending_calls(worker) == 0
    assert_nothing_more(worker)


# -------------------------------------------------------------------------------------------
# Binary values and text attachments
# -------------------------------------------------------------------------------------------


@BOTH
def test_binary_values_in_a_calls_args_and_in_its_answer(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    data = bytes([0, 1, 2, 255, 128])
    envelope = {"id": 5, "command": "blob", "args": {"data": None}}
    envelope["$binary"] = [{"path": ["args", "data"], "size": len(data)}]
    worker.send_raw(frame(binary_body(envelope, data)))

    call, attachments = split_binary_body(worker.receive_body(TIMEOUT))
    binary = call.pop("$binary")
    assert set(call) == CALL_KEYS and call["id"] == 5 and call["name"] == "transform", call
    assert call["args"] == {"data": None, "note": "text"}
    assert binary == [{"path": ["args", "data"], "size": len(data)}]
    assert attachments == [data]

    image = b"\xfe\xfd\x00\x80"
    reply = {"id": 5, "command": "$callback"}
    reply["args"] = {"call": call["call"], "success": True, "result": {"image": None}}
    reply["$binary"] = [{"path": ["args", "result", "image"], "size": len(image)}]
    worker.send_raw(frame(binary_body(reply, image)))

    response, attachments = split_binary_body(worker.receive_body(TIMEOUT))
    assert response["result"] == {"image": None, "encoding": "ASCII-8BIT", "size": len(image)}
    assert response["$binary"] == [{"path": ["result", "image"], "size": len(image)}]
    assert attachments == [image]


def test_long_strings_travel_as_text_attachments_both_ways(start: Start) -> None:
    worker = start(4, env={"SNAKEPIT_TEXT_THRESHOLD": "16"})
    text = "déjà vu " * 4  # 36 bytes of UTF-8
    request = worker.send("ask", {"name": "echo", "args": {"text": text, "short": "é"}})
    call, attachments = split_binary_body(worker.receive_body(TIMEOUT))
    assert call["args"] == {"text": None, "short": "é"}
    size = len(text.encode())
    assert call["$binary"] == [{"path": ["args", "text"], "size": size, "text": True}]
    assert attachments == [text.encode()]

    reply = {"id": request, "command": "$callback"}
    reply["args"] = {"call": call["call"], "success": True, "result": None}
    reply["$binary"] = [{"path": ["args", "result"], "size": size, "text": True}]
    worker.send_raw(frame(binary_body(reply, text.encode())))
    response, attachments = split_binary_body(worker.receive_body(TIMEOUT))
    assert response["result"] == {"result": None}  # a String, long: a text attachment again
    assert response["$binary"] == [{"path": ["result", "result"], "size": size, "text": True}]
    assert attachments == [text.encode()]


def test_big_values_travel_in_shared_memory_both_ways(start: Start, shm_dir: Path) -> None:
    worker = start(4, env=shm_env(shm_dir, 1000))
    assert worker.handshake_answer["capabilities"][-1] == "shm"
    data = bytes(range(256)) * 8  # 2048 bytes: over the threshold
    envelope = {"id": 5, "command": "blob", "args": {"data": None}}
    envelope["$binary"] = [{"path": ["args", "data"], "size": len(data)}]
    worker.send_raw(frame(binary_body(envelope, data)))

    call, attachments = split_binary_body(worker.receive_body(TIMEOUT))
    (entry,) = call["$binary"]
    assert attachments == [] and entry["path"] == ["args", "data"] and entry["size"] == len(data)
    assert entry["shm"].startswith(SHM_PREFIX), entry
    segment = shm_dir / entry["shm"]
    assert segment.read_bytes() == data
    segment.unlink()  # the pool's now

    image = b"\x07" * 1500
    (shm_dir / "pool-answer").write_bytes(image)
    reply = {"id": 5, "command": "$callback"}
    reply["args"] = {"call": call["call"], "success": True, "result": {"image": None}}
    reply["$binary"] = [
        {"path": ["args", "result", "image"], "size": len(image), "shm": "pool-answer"}
    ]
    worker.send_raw(frame(binary_body(reply)))

    response, attachments = split_binary_body(worker.receive_body(TIMEOUT))
    assert response["result"] == {"image": None, "encoding": "ASCII-8BIT", "size": len(image)}
    (entry,) = response["$binary"]
    assert attachments == [] and entry["shm"].startswith(SHM_PREFIX), entry
    assert (shm_dir / entry["shm"]).read_bytes() == image


# -------------------------------------------------------------------------------------------
# Streams
# -------------------------------------------------------------------------------------------


@BOTH
def test_a_streaming_handler_calls_between_items(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    request = worker.send("feed", {"n": 3}, meta={"stream": {"window": 2}})
    for i in range(3):
        call = expect_call(worker, request, "next")
        assert call["args"] == {"i": i}
        assert_nothing_more(worker, 0.05)  # no item before its call is answered
        answer(worker, call, {"item": i * 10})
        assert worker.receive(TIMEOUT) == {"id": request, "item": {"item": i * 10}}
        if i == 1:  # the window of 2 is full: the next call waits for credit
            assert_nothing_more(worker, 0.05)
            worker.send("$credit", {"items": 2}, id=request)
    assert worker.receive(TIMEOUT) == {"id": request, "success": True, "result": None}


# -------------------------------------------------------------------------------------------
# Cancel, the end of a request, the end of input
# -------------------------------------------------------------------------------------------


@BOTH
def test_cancel_while_a_call_waits_stops_the_handler(
    start: Start, max_in_flight: int, tmp_path: Path
) -> None:
    worker = start(max_in_flight)
    report = tmp_path / "report.json"
    request = worker.send("wait", {"report": str(report)})
    expect_call(worker, request, "forever")
    worker.send("$cancel", id=request)
    assert worker.receive(TIMEOUT) == {"id": request, "success": False, "error": "cancelled"}
    assert read_report(report) == {
        "seen": "Snakepit::Cancelled",  # the handler's own thread: the library's cancel
        "after": {  # a call made after the cancel fails at once, and sends nothing
            "class": "Snakepit::CallbackError",
            "code": "cancelled",
            "message": "callback 'after': the request was cancelled",
        },
    }
    assert_nothing_more(worker)
    assert pending_calls(worker) == 0


@BOTH
def test_cancel_fails_the_calls_waiting_on_other_threads(
    start: Start, max_in_flight: int, tmp_path: Path
) -> None:
    worker = start(max_in_flight)
    report = tmp_path / "report.json"
    request = worker.send("wait_threads", {"report": str(report)})
    calls = [expect_call(worker, request, "forever") for _ in range(2)]
    worker.send("$cancel", id=request)
    assert worker.receive(TIMEOUT) == {"id": request, "success": False, "error": "cancelled"}
    failure = {
        "class": "Snakepit::CallbackError",
        "code": "cancelled",
        "message": "callback 'forever': the request was cancelled",
    }
    assert read_report(report) == [failure, failure]
    for call in calls:  # the pool's late answers are for calls no longer pending: ignored
        refuse(worker, call, "cancelled", "callback 'forever': cancelled")
    assert pending_calls(worker) == 0


@BOTH
def test_a_handler_that_masks_cancelled_is_woken_by_the_calls_failure(
    start: Start, max_in_flight: int, tmp_path: Path
) -> None:
    worker = start(max_in_flight)
    report = tmp_path / "report.json"
    request = worker.send("masked", {"report": str(report)})
    expect_call(worker, request, "forever")
    worker.send("$cancel", id=request)
    # Cancelled reaches it as its mask ends: the request is cancelled all the same.
    assert worker.receive(TIMEOUT) == {"id": request, "success": False, "error": "cancelled"}
    assert read_report(report) == {
        "class": "Snakepit::CallbackError",
        "code": "cancelled",
        "message": "callback 'forever': the request was cancelled",
    }
    assert pending_calls(worker) == 0


def test_a_cancel_touches_no_other_requests_calls(start: Start, tmp_path: Path) -> None:
    worker = start(4)
    report = tmp_path / "report.json"
    waiting = worker.send("wait", {"report": str(report)})
    expect_call(worker, waiting, "forever")
    other = worker.send("ask", {"name": "f"})
    call = expect_call(worker, other, "f")
    worker.send("$cancel", id=waiting)
    assert worker.receive(TIMEOUT) == {"id": waiting, "success": False, "error": "cancelled"}
    answer(worker, call, "still here")
    assert expect_result(worker, other) == {"result": "still here"}


@BOTH
def test_the_calls_a_request_leaves_behind_are_dropped_when_it_ends(
    start: Start, max_in_flight: int, tmp_path: Path
) -> None:
    worker = start(max_in_flight)
    report, gate = tmp_path / "report.json", tmp_path / "gate"
    request = worker.send("leave_behind", {"report": str(report), "gate": str(gate)})
    call = expect_call(worker, request, "late")
    gate.touch()
    assert expect_result(worker, request) == "left"
    assert read_report(report) == {
        "class": "Snakepit::CallbackError",
        "code": "cancelled",
        "message": "callback 'late': the request has ended",
    }
    answer(worker, call, "too late")  # ignored
    assert pending_calls(worker) == 0


@BOTH
def test_the_end_of_input_fails_a_waiting_call_and_the_worker_exits_0(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    request = worker.send("ask", {"name": "f"})
    expect_call(worker, request, "f")
    worker.close_stdin()
    assert expect_result(worker, request) == {
        "error": {
            "class": "Snakepit::CallbackError",
            "code": "cancelled",
            "message": "callback 'f': the input ended",
        }
    }
    assert worker.wait() == 0
