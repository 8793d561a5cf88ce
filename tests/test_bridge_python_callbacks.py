"""Callbacks in the Python bridge library: handlers that call the host and wait for the answer.

Raw frames to real worker processes, the test playing the pool (PROTOCOL.md, "Callbacks"): the
worker sends ``{"id", "call", "name", "args"}`` frames, the test answers each with a
``$callback`` frame on the request's id, and checks what the handler made of it. Most cases run
at ``max_in_flight`` 1, where the main thread runs the handler and reads the answer itself (a
sync handler in ``ctx.call_sync``, an async one through SIGIO while the loop waits), and at 16,
where the reading thread hands answers to handler threads and to the event loop.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from snakepit_python import CallbackError

from raw_worker import (
    PROTOCOL_2_CAPABILITIES,
    SHM_PREFIX,
    RawWorker,
    binary_body,
    frame,
    shm_env,
    split_binary_body,
)

CUSTOM_WORKER = r"""
import asyncio
import concurrent.futures
import time

from snakepit_python import CallbackError, command, run

KEPT = {}


def report(exc):
    return {"caught": type(exc).__name__, "code": getattr(exc, "code", None), "message": str(exc)}


@command
def sync_call(args, ctx):
    try:
        return {"result": ctx.call_sync(args["name"], args.get("args"))}
    except CallbackError as exc:
        return report(exc)


@command(cancellable=False)
def quick_call(args, ctx):  # runs on the reading thread of a concurrent worker
    try:
        return {"result": ctx.call_sync(args["name"], args.get("args"))}
    except CallbackError as exc:
        return report(exc)


@command
async def async_call(args, ctx):
    try:
        return {"result": await ctx.call(args["name"], args.get("args"))}
    except CallbackError as exc:
        return report(exc)


@command
async def gather_calls(args, ctx):
    calls = [ctx.call("lookup", {"key": key}) for key in args["keys"]]
    results = await asyncio.gather(*calls, return_exceptions=True)
    return [report(r) if isinstance(r, Exception) else r for r in results]


@command
def thread_calls(args, ctx):  # several calls at once from threads of one sync handler
    with concurrent.futures.ThreadPoolExecutor(len(args["keys"])) as pool:
        futures = [pool.submit(ctx.call_sync, "lookup", {"key": k}) for k in args["keys"]]
        return [f.result() for f in futures]


@command
def sync_blob(args, ctx):
    answer = ctx.call_sync("blob", {"data": b"\x00\x01\xff", "list": [bytearray(b"ba"), "text"]})
    return {"type": type(answer["data"]).__name__, "data": bytes(answer["data"]) + b"!"}


@command
async def async_blob(args, ctx):
    answer = await ctx.call("blob", {"data": memoryview(b"mv" * args.get("size", 1))})
    return {"type": type(answer["data"]).__name__, "size": len(answer["data"]),
            "head": bytes(answer["data"][:4]).hex()}


@command
def sync_lanes(args, ctx):
    answer = ctx.call_sync("lanes", {"text": "t" * args["text"], "big": b"b" * args["big"]})
    return {"type": type(answer["data"]).__name__, "size": len(answer["data"]),
            "text": answer["text"][:3], "text_size": len(answer["text"])}


@command
def sync_cancelled(args, ctx):
    try:
        ctx.call_sync("slow", {})
    except CallbackError as exc:
        first = report(exc)
        if args.get("reraise"):
            raise
    try:
        ctx.call_sync("again", {})
    except CallbackError as exc:
        return {"first": first, "second": report(exc)}
    return {"first": first, "second": "not refused"}


@command
async def async_cancelled(args, ctx):
    try:
        await ctx.call("slow", {})
    except CallbackError as exc:
        first = report(exc)
        if args.get("reraise"):
            raise
    try:
        await ctx.call("again", {})
    except CallbackError as exc:
        return {"first": first, "second": report(exc), "task_cancelling": asyncio.current_task().cancelling()}
    return {"first": first, "second": "not refused"}


@command(cancellable=False)
def quick_cancelled(args, ctx):
    return sync_cancelled(args, ctx)


@command
async def loop_call_sync(args, ctx):  # a sync wait on the bridge's loop: refused
    try:
        ctx.call_sync("never", {})
    except RuntimeError as exc:
        return {"caught": "RuntimeError", "message": str(exc)}
    return "not refused"


@command
def keep_context(args, ctx):
    KEPT["ctx"] = ctx
    return "kept"


@command
def stale_call(args):  # a call with the context of a request that has ended
    try:
        KEPT["ctx"].call_sync("late", {})
    except CallbackError as exc:
        return report(exc)
    return "not refused"


@command
async def leave_a_call(args, ctx):  # a call nobody awaits when the request ends
    KEPT["task"] = asyncio.ensure_future(ctx.call("orphan", {}))
    await asyncio.sleep(0)
    return "left"


@command
async def orphan_outcome(args):
    try:
        await KEPT["task"]
    except CallbackError as exc:
        return report(exc)
    return "answered"


@command
def bad_args(args, ctx):
    try:
        ctx.call_sync("x", {"a set": {1, 2}})
    except TypeError as exc:
        return {"caught": "TypeError", "message": str(exc)}
    return "sent"


@command
def sync_items(args, ctx):
    for i in range(args["n"]):
        yield {"i": i, "answer": ctx.call_sync("item", {"i": i})}


@command
async def async_items(args, ctx):
    for i in range(args["n"]):
        yield {"i": i, "answer": await ctx.call("item", {"i": i})}


if __name__ == "__main__":
    run()
"""

#: Generous: a 2-core CI machine may run other tests at the same time.
TIMEOUT = 10.0
QUIET = 0.2
META = {"deadline_ms": 30000}

Start = Callable[..., RawWorker]
both_modes = pytest.mark.parametrize("max_in_flight", [1, 16])


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Starts the custom worker and shakes hands with ``max_in_flight`` (``None``: protocol 1)."""
    workers: list[RawWorker] = []
    script = tmp_path / "callback_worker.py"
    script.write_text(CUSTOM_WORKER)

    def start(max_in_flight: int | None, **env: str) -> RawWorker:
        worker = RawWorker([sys.executable, str(script)], env=env)
        workers.append(worker)
        worker.shake_hands(max_in_flight, "raw-cb")
        return worker

    yield start
    for worker in workers:
        worker.kill()


def request(worker: RawWorker, command: str, args: dict[str, Any] | None = None, **kw: Any) -> int:
    return worker.send(command, args or {}, meta={**META, **kw})


def next_call(worker: RawWorker, request_id: int, name: str) -> dict[str, Any]:
    """The next frame, which must be a plain call frame of ``request_id`` to ``name``."""
    call = worker.receive(TIMEOUT)
    assert list(call) == ["id", "call", "name", "args"], call
    assert (call["id"], call["name"]) == (request_id, name), call
    assert type(call["call"]) is int and call["call"] >= 0, call
    return call


def answer(worker: RawWorker, call: dict[str, Any], result: Any = None) -> None:
    args = {"call": call["call"], "success": True, "result": result}
    worker.send("$callback", args, id=call["id"])


def refuse(worker: RawWorker, call: dict[str, Any], error: str, code: str) -> None:
    args = {"call": call["call"], "success": False, "error": error, "code": code}
    worker.send("$callback", args, id=call["id"])


def cancel(worker: RawWorker, request_id: int) -> None:
    worker.send("$cancel", id=request_id)


def response(worker: RawWorker, request_id: int) -> dict[str, Any]:
    reply = worker.receive(TIMEOUT)
    assert reply["id"] == request_id and "success" in reply, reply
    return reply


def result_of(worker: RawWorker, request_id: int) -> Any:
    reply = response(worker, request_id)
    assert reply["success"] is True, reply
    return reply["result"]


def assert_nothing_more(worker: RawWorker, wait: float = QUIET) -> None:
    assert worker.proc.stdout is not None
    ready, _, _ = select.select([worker.proc.stdout.fileno()], [], [], wait)
    assert not ready, f"an unexpected frame: {worker.receive()}"


def caught(code: str, message: str) -> dict[str, Any]:
    return {"caught": "CallbackError", "code": code, "message": message}


# -------------------------------------------------------------------------------------------
# Handshake and the library's API
# -------------------------------------------------------------------------------------------


@both_modes
def test_the_protocol_2_handshake_declares_callbacks(start: Start, max_in_flight: int) -> None:
    answer = start(max_in_flight).handshake_answer
    assert answer["capabilities"] == PROTOCOL_2_CAPABILITIES
    assert answer["capabilities"][-1] == "callbacks"


def test_at_protocol_1_a_call_raises_callback_error_unsupported(start: Start) -> None:
    worker = start(None)
    assert worker.handshake_answer["capabilities"] == ["cancel"]
    result = worker.result("sync_call", {"name": "lookup"})
    assert result["caught"] == "CallbackError" and result["code"] == "unsupported", result
    assert "protocol-2" in result["message"]


def test_callback_error_carries_code_and_message() -> None:
    import pickle

    error = CallbackError("callback 'x' failed: boom", "callback_failed")
    assert isinstance(error, Exception) and error.code == "callback_failed"
    assert str(error) == "callback 'x' failed: boom"
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.code) == (str(error), error.code)


# -------------------------------------------------------------------------------------------
# Round trips, failures
# -------------------------------------------------------------------------------------------


@both_modes
@pytest.mark.parametrize("command", ["sync_call", "async_call", "quick_call"])
def test_a_round_trip(start: Start, max_in_flight: int, command: str) -> None:
    worker = start(max_in_flight)
    args = {"key": "user-42", "nested": [1, {"x": None}], "text": "h\u00e9"}
    request_id = request(worker, command, {"name": "lookup", "args": args})
    call = next_call(worker, request_id, "lookup")
    assert call["args"] == args
    assert_nothing_more(worker, 0.05)  # the handler waits for the answer
    answer(worker, call, {"name": "Ada"})
    assert result_of(worker, request_id) == {"result": {"name": "Ada"}}
    # the worker goes on serving, and numbers its next call afresh
    request_id = request(worker, command, {"name": "again"})
    second = next_call(worker, request_id, "again")
    assert second["args"] == {} and second["call"] != call["call"]
    answer(worker, second, None)
    assert result_of(worker, request_id) == {"result": None}
    assert worker.result("ping")["status"] == "ok"


@both_modes
@pytest.mark.parametrize("command", ["sync_call", "async_call", "quick_call"])
def test_a_failure_answer_raises_callback_error_with_code_and_message(
    start: Start, max_in_flight: int, command: str
) -> None:
    worker = start(max_in_flight)
    request_id = request(worker, command, {"name": "lookup", "args": {"key": "user-42"}})
    call = next_call(worker, request_id, "lookup")
    message = "callback 'lookup' failed: KeyError: 'user-42'"
    refuse(worker, call, message, "callback_failed")
    assert result_of(worker, request_id) == caught("callback_failed", message)


@both_modes
def test_a_callback_error_the_handler_lets_go_fails_the_request_with_its_message(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    request_id = request(worker, "sync_items", {"n": 1})  # it does not catch CallbackError
    call = next_call(worker, request_id, "item")
    refuse(worker, call, "no callback named 'item' (registered: none)", "unknown_callback")
    reply = response(worker, request_id)
    assert reply == {
        "id": request_id,
        "success": False,
        "error": "sync_items: no callback named 'item' (registered: none)",
    }


@both_modes
def test_a_callback_for_an_unknown_call_is_ignored(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    worker.send("$callback", {"call": 5, "success": True, "result": 1}, id=99)  # nothing runs
    assert_nothing_more(worker, 0.05)
    request_id = request(worker, "sync_call", {"name": "lookup"})
    call = next_call(worker, request_id, "lookup")
    stray = {"success": True, "result": "stray"}
    worker.send("$callback", {"call": call["call"] + 1000, **stray}, id=request_id)
    worker.send("$callback", {"call": call["call"], **stray}, id=request_id + 1)  # another id
    worker.send("$callback", {"call": "x", **stray}, id=request_id)
    worker.send_raw(frame({"id": request_id, "command": "$callback", "args": ["no", "object"]}))
    assert_nothing_more(worker, 0.1)  # none of them is answered, and the call still waits
    answer(worker, call, "right")
    assert result_of(worker, request_id) == {"result": "right"}
    answer(worker, call, "twice")  # answered already: unknown now
    assert_nothing_more(worker, 0.05)
    assert worker.result("ping")["status"] == "ok"


# -------------------------------------------------------------------------------------------
# Several calls at once
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_in_flight", "command"),
    [(1, "gather_calls"), (16, "gather_calls"), (16, "thread_calls")],  # threads: see below
)
def test_several_calls_of_one_handler_answered_out_of_order(
    start: Start, max_in_flight: int, command: str
) -> None:
    worker = start(max_in_flight)
    keys = ["a", "b", "c", "d"]
    request_id = request(worker, command, {"keys": keys})
    calls = [next_call(worker, request_id, "lookup") for _ in keys]
    assert sorted(c["args"]["key"] for c in calls) == keys
    assert len({c["call"] for c in calls}) == len(keys)  # unique among the pending ones
    for call in reversed(calls):
        if call["args"]["key"] == "c":
            refuse(worker, call, "callback 'lookup' failed: no c", "callback_failed")
        else:
            answer(worker, call, call["args"]["key"].upper())
    if command == "gather_calls":
        expected: list[Any] = [
            "A",
            "B",
            caught("callback_failed", "callback 'lookup' failed: no c"),
            "D",
        ]
        assert result_of(worker, request_id) == expected
    else:  # the failure reaches the handler, which does not catch it
        reply = response(worker, request_id)
        assert reply["error"] == "thread_calls: callback 'lookup' failed: no c", reply


def test_at_concurrency_1_only_the_handler_thread_calls(start: Start) -> None:
    worker = start(1)
    request_id = request(worker, "thread_calls", {"keys": ["a"]})
    reply = response(worker, request_id)
    assert reply["success"] is False, reply
    assert "only the handler's own thread can call" in reply["error"], reply


@pytest.mark.parametrize("command", ["sync_call", "async_call"])
def test_calls_from_several_concurrent_requests(start: Start, command: str) -> None:
    worker = start(16)
    ids = [request(worker, command, {"name": "lookup", "args": {"n": n}}) for n in range(5)]
    calls = {}
    for _ in ids:
        call = worker.receive(TIMEOUT)
        calls[call["id"]] = call
    assert sorted(calls) == ids and len({c["call"] for c in calls.values()}) == len(ids)
    for request_id in reversed(ids):
        answer(worker, calls[request_id], calls[request_id]["args"]["n"] * 10)
    results = {}
    for _ in ids:
        reply = worker.receive(TIMEOUT)
        results[reply["id"]] = reply["result"]
    assert results == {request_id: {"result": n * 10} for n, request_id in enumerate(ids)}


def test_a_quick_handler_waiting_on_the_reading_thread_holds_later_requests(
    start: Start,
) -> None:
    worker = start(16)
    quick = request(worker, "quick_call", {"name": "lookup"})
    call = next_call(worker, quick, "lookup")
    later = worker.send("ping", {})  # read while the quick handler waits, served after it
    assert_nothing_more(worker, 0.1)
    answer(worker, call, 7)
    assert result_of(worker, quick) == {"result": 7}
    assert result_of(worker, later)["status"] == "ok"


# -------------------------------------------------------------------------------------------
# Binary values, text and shared memory
# -------------------------------------------------------------------------------------------


@both_modes
def test_binary_values_in_the_args_and_in_the_answer(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    request_id = request(worker, "sync_blob")
    envelope, attachments = split_binary_body(worker.receive_body(TIMEOUT))
    assert envelope["id"] == request_id and envelope["name"] == "blob"
    assert envelope["args"] == {"data": None, "list": [None, "text"]}
    assert [e["path"] for e in envelope["$binary"]] == [["args", "data"], ["args", "list", 0]]
    assert attachments == [b"\x00\x01\xff", b"ba"]
    number = envelope["call"]
    head = {
        "id": request_id,
        "command": "$callback",
        "args": {"call": number, "success": True, "result": {"data": None}},
        "$binary": [{"path": ["args", "result", "data"], "size": 5}],
    }
    worker.send_raw(frame(binary_body(head, b"bytes")))
    reply, values = split_binary_body(worker.receive_body(TIMEOUT))
    assert reply["result"] == {"type": "memoryview", "data": None}, reply
    assert values == [b"bytes!"]


@both_modes
def test_an_async_handler_gets_a_large_binary_answer(start: Start, max_in_flight: int) -> None:
    """Beyond the 1 MiB one request at a time reads ahead while a handler runs: the SIGIO
    reader reads the whole answer for the loop."""
    worker = start(max_in_flight)
    request_id = request(worker, "async_blob", {"size": 100_000})
    envelope, attachments = split_binary_body(worker.receive_body(TIMEOUT))
    assert envelope["args"] == {"data": None} and attachments == [b"mv" * 100_000]
    data = os.urandom(3 * 1024 * 1024)
    head = {
        "id": request_id,
        "command": "$callback",
        "args": {"call": envelope["call"], "success": True, "result": {"data": None}},
        "$binary": [{"path": ["args", "result", "data"], "size": len(data)}],
    }
    worker.send_raw(frame(binary_body(head, data)))
    assert result_of(worker, request_id) == {
        "type": "memoryview", "size": len(data), "head": data[:4].hex(),
    }  # fmt: skip


@both_modes
def test_text_and_shared_memory_lanes_both_ways(
    start: Start, max_in_flight: int, shm_dir: Path
) -> None:
    env = shm_env(shm_dir, 4096, text_threshold=100)
    worker = start(max_in_flight, **env)
    assert worker.handshake_answer["capabilities"] == [*PROTOCOL_2_CAPABILITIES, "shm"]
    request_id = request(worker, "sync_lanes", {"text": 200, "big": 10_000})
    envelope, attachments = split_binary_body(worker.receive_body(TIMEOUT))
    entries = {tuple(e["path"]): e for e in envelope["$binary"]}
    assert entries[("args", "text")] == {"path": ["args", "text"], "size": 200, "text": True}
    big = entries[("args", "big")]
    assert big["size"] == 10_000 and big["shm"].startswith(SHM_PREFIX)
    assert (shm_dir / big["shm"]).read_bytes() == b"b" * 10_000  # the pool's now
    assert attachments == [b"t" * 200]
    segment = shm_dir / "pool-segment"
    segment.write_bytes(b"s" * 8192)
    head = {
        "id": request_id,
        "command": "$callback",
        "args": {"call": envelope["call"], "success": True,
                 "result": {"data": None, "text": None}},
        "$binary": [
            {"path": ["args", "result", "data"], "size": 8192, "shm": segment.name},
            {"path": ["args", "result", "text"], "size": 300, "text": True},
        ],
    }  # fmt: skip
    worker.send_raw(frame(binary_body(head, "\u00e9".encode() * 150)))
    reply = result_of(worker, request_id)
    assert reply == {"type": "memoryview", "size": 8192, "text": "\u00e9" * 3, "text_size": 150}


# -------------------------------------------------------------------------------------------
# Cancel, the end of a request
# -------------------------------------------------------------------------------------------


@both_modes
@pytest.mark.parametrize("command", ["sync_cancelled", "async_cancelled", "quick_cancelled"])
def test_a_cancel_fails_the_pending_call_and_later_ones_at_once(
    start: Start, max_in_flight: int, command: str
) -> None:
    worker = start(max_in_flight)
    request_id = request(worker, command)
    call = next_call(worker, request_id, "slow")
    cancel(worker, request_id)
    result = result_of(worker, request_id)  # the handler chose to answer with its own result
    first = f"callback 'slow' cancelled: request {request_id} was cancelled"
    second = f"callback 'again' cancelled: request {request_id} was cancelled"
    assert result["first"] == caught("cancelled", first)
    assert result["second"] == caught("cancelled", second)  # never sent
    if command == "async_cancelled":
        assert result["task_cancelling"] == 0  # the task's cancellation became the error
    answer(worker, call, "too late")  # the call is no longer pending: ignored
    assert_nothing_more(worker, 0.05)
    assert worker.result("ping")["status"] == "ok"


@both_modes
@pytest.mark.parametrize("command", ["sync_cancelled", "async_cancelled", "quick_cancelled"])
def test_a_cancelled_call_the_handler_lets_go_answers_cancelled(
    start: Start, max_in_flight: int, command: str
) -> None:
    worker = start(max_in_flight)
    request_id = request(worker, command, {"reraise": True})
    next_call(worker, request_id, "slow")
    cancel(worker, request_id)
    assert response(worker, request_id) == {
        "id": request_id,
        "success": False,
        "error": "cancelled",
    }
    assert worker.result("ping")["status"] == "ok"
    worker.close_stdin()
    assert worker.wait(TIMEOUT) == 0
    assert "Traceback" not in worker.stderr_text()


@both_modes
def test_a_cancel_of_another_request_leaves_the_call_waiting(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    request_id = request(worker, "sync_call", {"name": "lookup"})
    call = next_call(worker, request_id, "lookup")
    cancel(worker, request_id + 100)
    assert_nothing_more(worker, 0.1)
    answer(worker, call, "fine")
    assert result_of(worker, request_id) == {"result": "fine"}


@both_modes
def test_a_call_with_the_context_of_an_ended_request_fails_at_once(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    kept = worker.send("keep_context", {})
    assert result_of(worker, kept) == "kept"
    request_id = worker.send("stale_call", {})
    assert result_of(worker, request_id) == caught(
        "cancelled", f"callback 'late' cancelled: request {kept} has ended"
    )


@both_modes
def test_a_call_left_pending_fails_when_its_request_ends(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    request_id = request(worker, "leave_a_call")
    call = next_call(worker, request_id, "orphan")
    assert result_of(worker, request_id) == "left"
    answer(worker, call, "too late")  # ignored: the call was dropped with its request
    outcome = worker.send("orphan_outcome", {})
    assert result_of(worker, outcome) == caught(
        "cancelled", f"callback 'orphan' cancelled: request {request_id} has ended"
    )


@both_modes
def test_end_of_input_fails_a_pending_call_and_the_worker_exits_0(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    request_id = request(worker, "sync_call", {"name": "lookup"})
    next_call(worker, request_id, "lookup")
    worker.close_stdin()
    assert result_of(worker, request_id) == caught(
        "cancelled", "callback 'lookup' cancelled: the input ended"
    )
    assert worker.wait(TIMEOUT) == 0


# -------------------------------------------------------------------------------------------
# Where a call may wait
# -------------------------------------------------------------------------------------------


@both_modes
def test_call_sync_on_the_event_loop_raises_runtime_error(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight)
    result = worker.result("loop_call_sync")
    assert result["caught"] == "RuntimeError", result
    assert "would deadlock" in result["message"] and "await ctx.call" in result["message"]
    assert_nothing_more(worker, 0.05)  # nothing was sent


@both_modes
def test_args_that_cannot_be_sent_raise_type_error_and_send_nothing(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    result = worker.result("bad_args")
    assert result["caught"] == "TypeError" and "not JSON serializable" in result["message"]
    assert_nothing_more(worker, 0.05)


# -------------------------------------------------------------------------------------------
# Streams
# -------------------------------------------------------------------------------------------


@both_modes
@pytest.mark.parametrize("command", ["sync_items", "async_items"])
def test_a_streaming_handler_calls_between_items(
    start: Start, max_in_flight: int, command: str
) -> None:
    worker = start(max_in_flight)
    request_id = request(worker, command, {"n": 3}, stream={"window": 2})
    for i in range(3):
        call = next_call(worker, request_id, "item")
        assert call["args"] == {"i": i}
        answer(worker, call, f"answer {i}")
        item = worker.receive(TIMEOUT)
        assert item == {"id": request_id, "item": {"i": i, "answer": f"answer {i}"}}
        if i == 1:  # the window is full: the generator is not resumed, so it calls no more
            assert_nothing_more(worker, 0.1)
            worker.send("$credit", {"items": 2}, id=request_id)
    assert response(worker, request_id) == {"id": request_id, "success": True, "result": None}


@both_modes
@pytest.mark.parametrize("command", ["sync_items", "async_items"])
def test_a_cancel_while_a_stream_waits_for_a_callback(
    start: Start, max_in_flight: int, command: str
) -> None:
    worker = start(max_in_flight)
    request_id = request(worker, command, {"n": 5}, stream={"window": 8})
    answer(worker, next_call(worker, request_id, "item"), 0)
    assert worker.receive(TIMEOUT)["item"] == {"i": 0, "answer": 0}
    next_call(worker, request_id, "item")
    cancel(worker, request_id)
    assert response(worker, request_id) == {
        "id": request_id,
        "success": False,
        "error": "cancelled",
    }
    assert worker.result("ping")["status"] == "ok"


def test_a_sync_call_costs_little(start: Start) -> None:
    """A round trip at concurrency 1: about as dear as a request (no thread, no polling)."""
    worker = start(1)
    started = time.perf_counter()
    for _ in range(200):
        request_id = request(worker, "sync_call", {"name": "lookup"})
        answer(worker, next_call(worker, request_id, "lookup"), 1)
        result_of(worker, request_id)
    assert time.perf_counter() - started < 5
