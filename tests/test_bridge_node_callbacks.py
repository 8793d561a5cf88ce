"""Callbacks in the Node.js bridge library: handlers call the host with ``await ctx.call``.

Raw frames to real ``node`` processes running a worker written with the library; the test
plays the host (PROTOCOL.md, *Callbacks*): it reads each call frame ``{"id", "call", "name",
"args"}``, checks it, answers with ``$callback`` and checks what the handler made of it. Covered:
the round trip, failures as ``CallbackError`` (code and message), several calls of one handler
and of concurrent requests answered out of order, binary values and text attachments both
ways, ``$cancel`` while a call is pending (and a call made after it), ``$callback`` frames for
no pending call, a call from a streaming handler between items, calls nobody awaits (dropped
when the request ends, their late answers ignored, no unhandled rejection), calls refused
before they are sent, and protocol 1 (no callbacks).
"""

from __future__ import annotations

import json
import select
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from snakepit_node.plugin import node_adapter

from raw_worker import (
    PROTOCOL_2_CAPABILITIES,
    SHM_PREFIX,
    RawWorker,
    binary_body,
    frame,
    shm_env,
    split_binary_body,
)

WORKER = r"""
const { run, CallbackError } = require("snakepit");
const fs = require("fs");
const { setTimeout: delay } = require("timers/promises");

/** What a handler caught, as JSON. */
function caught(err) {
  return {
    name: err.name,
    isCallbackError: err instanceof CallbackError,
    isError: err instanceof Error,
    code: err.code,
    message: err.message,
    callback: err.callback,
  };
}

run({
  // Calls `args.name` with `args.args` (left out when absent) and answers what it got.
  proxy: async (args, ctx) => ({
    got: await (args.args === undefined ? ctx.call(args.name) : ctx.call(args.name, args.args)),
  }),
  // The same, reporting a failure instead of failing.
  guarded: async (args, ctx) => {
    try {
      return { ok: await ctx.call(args.name, args.args) };
    } catch (err) {
      return { caught: caught(err) };
    }
  },
  // `n` calls at once; the results in the order of the calls.
  fan_out: async (args, ctx) => {
    const calls = [];
    for (let i = 0; i < args.n; i++) calls.push(ctx.call("square", { i }));
    return Promise.all(calls);
  },
  // Binary values and a long string made here, and the answer's value types.
  bytes: async (args, ctx) => {
    const got = await ctx.call("bytes", {
      blob: Buffer.from([0, 1, 2, 255]),
      nested: [new Uint8Array([7, 7, 7]), "short"],
      long: "x".repeat(40),
    });
    return {
      isBuffer: Buffer.isBuffer(got.image),
      length: got.image.length,
      image: got.image,
      text: got.text,
    };
  },
  // A big value out in a call, and the answer's value (a request segment of the host) back.
  shm: async (args, ctx) => {
    const blob = Buffer.alloc(args.size, 9);
    const got = await ctx.call("big", { blob, small: Buffer.from("s") });
    const sum = got.data.reduce((a, b) => a + b, 0);
    return { length: got.data.length, isBuffer: Buffer.isBuffer(got.data), sum };
  },
  // Lets the cancellation through, after noting what it saw in `marker`.
  cancel_rethrow: async (args, ctx) => {
    try {
      return await ctx.call("slow", {});
    } catch (err) {
      fs.writeFileSync(args.marker, JSON.stringify(caught(err)));
      throw err;
    }
  },
  // Catches the cancellation, calls again (which fails at once) and answers its own result.
  cancel_own: async (args, ctx) => {
    const seen = {};
    try {
      await ctx.call("slow", {});
    } catch (err) {
      seen.first = caught(err);
    }
    seen.aborted = ctx.signal.aborted;
    try {
      await ctx.call("again", {});
    } catch (err) {
      seen.second = caught(err);
    }
    return seen;
  },
  // Asks the host for each item.
  ask_between: async function* (args, ctx) {
    for (let i = 0; i < args.n; i++) yield await ctx.call("item", { i });
    return "last";
  },
  // Calls and returns without waiting: the call is dropped.
  forget: async (args, ctx) => {
    ctx.call("ignored", { how: "async" });
    return "done";
  },
  forget_sync: (args, ctx) => {
    ctx.call("ignored", { how: "sync" });
    return "sync done";
  },
  // Calls without waiting, then waits on its signal: a cancel rejects a call nobody awaits.
  forget_then_wait: async (args, ctx) => {
    ctx.call("ignored", {});
    await delay(30000, undefined, { signal: ctx.signal });
  },
  // Calls once the request has been answered: refused at once, nothing sent.
  late: (args, ctx) => {
    setTimeout(() => {
      const note = (err) => fs.writeFileSync(args.marker, JSON.stringify(caught(err)));
      ctx.call("late", {}).catch(note);
    }, 20);
    return "answered";
  },
  // Calls refused before anything is sent.
  bad_calls: async (args, ctx) => {
    const attempts = [
      () => ctx.call(42, {}),
      () => ctx.call("x", [1]),
      () => ctx.call("x", null),
      () => ctx.call("x", Buffer.from("b")),
      () => ctx.call("x", { n: 1n }),
      () => ctx.call("x", { toJSON: () => [1] }),
      () => ctx.call("x", { s: "y".repeat(2 << 20) }),
    ];
    const out = [];
    for (const attempt of attempts) {
      try {
        await attempt();
        out.push("sent");
      } catch (err) {
        out.push([err.code, err.message]);
      }
    }
    return out;
  },
});
"""

Spawn = Callable[..., RawWorker]
CALL_KEYS = ["id", "call", "name", "args"]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Starts the custom worker, handshaken with ``max_in_flight`` (None: protocol 1); kills
    what is left."""
    script = tmp_path / "callbacks_worker.js"
    script.write_text(WORKER)
    workers: list[RawWorker] = []

    def start(max_in_flight: int | None = 8, env: Mapping[str, str] | None = None) -> RawWorker:
        adapter = node_adapter("custom", script)
        worker = RawWorker(adapter.command_line(), {**(adapter.env or {}), **(env or {})})
        workers.append(worker)
        worker.shake_hands(max_in_flight)
        return worker

    yield start
    for worker in workers:
        worker.kill()


def receive_call(worker: RawWorker, request_id: int, name: str) -> dict[str, Any]:
    """The next frame, which must be a plain call frame of ``request_id`` calling ``name``."""
    call = worker.receive()
    assert list(call) == CALL_KEYS, call  # the keys in the order written
    assert call["id"] == request_id and call["name"] == name, call
    assert type(call["call"]) is int and call["call"] >= 0, call
    return call


def answer(
    worker: RawWorker,
    request_id: int,
    call: int,
    result: Any = None,
    *,
    error: str | None = None,
    code: str | None = None,
) -> None:
    """Sends the host's ``$callback`` answer to call ``call`` of ``request_id``."""
    args: dict[str, Any] = {"call": call, "success": error is None}
    if error is None:
        args["result"] = result
    else:
        args["error"] = error
        if code is not None:
            args["code"] = code
    worker.send("$callback", args, id=request_id)


def response(worker: RawWorker, request_id: int) -> dict[str, Any]:
    """The next frame, which must be the response to ``request_id``."""
    got = worker.receive()
    assert got["id"] == request_id and "success" in got, got
    return got


def result(worker: RawWorker, request_id: int) -> Any:
    got = response(worker, request_id)
    assert got["success"] is True, got
    return got["result"]


def assert_quiet(worker: RawWorker, seconds: float = 0.3) -> None:
    """Nothing arrives on the worker's stdout for ``seconds``."""
    assert worker.proc.stdout is not None
    ready, _, _ = select.select([worker.proc.stdout.fileno()], [], [], seconds)
    assert not ready, worker.receive()


def still_serving(worker: RawWorker) -> None:
    """The worker answers a health check, then exits 0 on EOF with no error on stderr."""
    assert worker.result("ping")["status"] == "ok"
    worker.close_stdin()
    assert worker.wait() == 0
    stderr = worker.stderr_text()
    assert "Error" not in stderr and "nhandled" not in stderr, stderr


# -------------------------------------------------------------------------------------------
# Capability
# -------------------------------------------------------------------------------------------


def test_callbacks_are_declared_at_protocol_2_only(spawn: Spawn) -> None:
    assert spawn().handshake_answer["capabilities"] == PROTOCOL_2_CAPABILITIES
    assert PROTOCOL_2_CAPABILITIES[-1] == "callbacks"
    assert spawn(None).handshake_answer["capabilities"] == ["cancel"]


def test_protocol_1_refuses_calls_at_once(spawn: Spawn) -> None:
    worker = spawn(None)
    request_id = worker.send("guarded", {"name": "lookup", "args": {}})
    # The answer comes first: no call frame went out.
    got = result(worker, request_id)["caught"]
    assert got["isCallbackError"] is True and got["code"] == "unsupported", got
    assert "protocol 2" in got["message"]
    still_serving(worker)


# -------------------------------------------------------------------------------------------
# Round trips
# -------------------------------------------------------------------------------------------


def test_round_trip(spawn: Spawn) -> None:
    worker = spawn()
    request_id = worker.send("proxy", {"name": "lookup", "args": {"key": "user-42", "n": [1, 2]}})
    call = receive_call(worker, request_id, "lookup")
    assert call["args"] == {"key": "user-42", "n": [1, 2]}
    assert_quiet(worker, 0.1)  # the handler waits for the answer
    answer(worker, request_id, call["call"], {"name": "Ada", "nested": [None, 1.5]})
    assert result(worker, request_id) == {"got": {"name": "Ada", "nested": [None, 1.5]}}
    # Without args the call sends an empty object; a result of null (or none) is null.
    request_id = worker.send("proxy", {"name": "tick"})
    call = receive_call(worker, request_id, "tick")
    assert call["args"] == {}
    worker.send("$callback", {"call": call["call"], "success": True}, id=request_id)
    assert result(worker, request_id) == {"got": None}
    still_serving(worker)


def test_failure_answer_raises_callback_error_with_code_and_message(spawn: Spawn) -> None:
    worker = spawn()
    request_id = worker.send("guarded", {"name": "lookup", "args": {"key": "nobody"}})
    call = receive_call(worker, request_id, "lookup")
    message = "callback 'lookup' failed: KeyError: 'nobody'"
    answer(worker, request_id, call["call"], error=message, code="callback_failed")
    assert result(worker, request_id) == {
        "caught": {
            "name": "CallbackError",
            "isCallbackError": True,
            "isError": True,
            "code": "callback_failed",
            "message": message,
            "callback": "lookup",
        }
    }
    # Any code is passed on as it is.
    request_id = worker.send("guarded", {"name": "nope", "args": {}})
    call = receive_call(worker, request_id, "nope")
    answer(worker, request_id, call["call"], error="no callback 'nope'", code="unknown_callback")
    got = result(worker, request_id)["caught"]
    assert (got["code"], got["message"]) == ("unknown_callback", "no callback 'nope'")


def test_uncaught_callback_error_fails_the_request(spawn: Spawn) -> None:
    worker = spawn()
    request_id = worker.send("proxy", {"name": "check", "args": {}})
    call = receive_call(worker, request_id, "check")
    answer(worker, request_id, call["call"], error="not allowed", code="callback_failed")
    assert response(worker, request_id) == {
        "id": request_id,
        "success": False,
        "error": "proxy: not allowed",
    }
    worker.close_stdin()
    assert worker.wait() == 0
    assert "CallbackError: not allowed" in worker.stderr_text()  # logged like any error


def test_concurrent_calls_of_one_handler_answered_out_of_order(spawn: Spawn) -> None:
    worker = spawn()
    request_id = worker.send("fan_out", {"n": 4})
    calls = [receive_call(worker, request_id, "square") for _ in range(4)]
    assert [c["args"] for c in calls] == [{"i": i} for i in range(4)]
    numbers = [c["call"] for c in calls]
    assert len(set(numbers)) == 4, numbers
    for call in reversed(calls):
        answer(worker, request_id, call["call"], call["args"]["i"] ** 2)
    assert result(worker, request_id) == [0, 1, 4, 9]


def test_calls_of_concurrent_requests(spawn: Spawn) -> None:
    worker = spawn()
    keys = ["a", "b", "c"]
    worker.send_raw(
        b"".join(
            frame({"id": 10 + i, "command": "proxy", "args": {"name": "lookup", "args": {"k": k}}})
            for i, k in enumerate(keys)
        )
    )
    calls = [worker.receive() for _ in keys]
    assert sorted(c["id"] for c in calls) == [10, 11, 12]
    assert len({c["call"] for c in calls}) == 3
    # Answered in another order than asked; each request gets its own call's answer.
    for call in [calls[1], calls[2], calls[0]]:
        answer(worker, call["id"], call["call"], call["args"]["k"].upper())
    responses = {r["id"]: r for r in (worker.receive() for _ in keys)}
    assert {i: r["result"] for i, r in responses.items()} == {
        10: {"got": "A"},
        11: {"got": "B"},
        12: {"got": "C"},
    }


def test_binary_values_both_ways(spawn: Spawn) -> None:
    worker = spawn(env={"SNAKEPIT_TEXT_THRESHOLD": "32"})
    request_id = worker.send("bytes", {})
    envelope, attachments = split_binary_body(worker.receive_body())
    binary = envelope.pop("$binary")
    assert list(envelope) == CALL_KEYS and envelope["name"] == "bytes", envelope
    assert envelope["args"] == {"blob": None, "nested": [None, "short"], "long": None}
    assert binary == [
        {"path": ["args", "blob"], "size": 4},
        {"path": ["args", "nested", 0], "size": 3},
        {"path": ["args", "long"], "size": 40, "text": True},
    ]
    assert attachments == [b"\x00\x01\x02\xff", b"\x07\x07\x07", b"x" * 40]
    image = bytes(range(256)) * 4
    worker.send_raw(
        frame(
            binary_body(
                {
                    "id": request_id,
                    "command": "$callback",
                    "args": {
                        "call": envelope["call"],
                        "success": True,
                        "result": {"image": None, "text": None},
                    },
                    "$binary": [
                        {"path": ["args", "result", "image"], "size": len(image)},
                        {"path": ["args", "result", "text"], "size": 2, "text": True},
                    ],
                },
                image + b"ok",
            )
        )
    )
    envelope, attachments = split_binary_body(worker.receive_body())
    assert envelope == {
        "id": request_id,
        "success": True,
        "result": {"isBuffer": True, "length": 1024, "image": None, "text": "ok"},
        "$binary": [{"path": ["result", "image"], "size": 1024}],
    }
    assert attachments == [image]


def test_binary_request_value_passed_on_in_a_call(spawn: Spawn) -> None:
    worker = spawn()
    blob = b"\x00binary\xff" * 100
    worker.send_raw(
        frame(
            binary_body(
                {
                    "id": 3,
                    "command": "proxy",
                    "args": {"name": "store", "args": {"blob": None}},
                    "$binary": [{"path": ["args", "args", "blob"], "size": len(blob)}],
                },
                blob,
            )
        )
    )
    envelope, attachments = split_binary_body(worker.receive_body())
    assert envelope["args"] == {"blob": None} and attachments == [blob]
    assert envelope["$binary"] == [{"path": ["args", "blob"], "size": len(blob)}]
    answer(worker, 3, envelope["call"], {"stored": True})
    assert result(worker, 3) == {"got": {"stored": True}}


def test_shared_memory_both_ways(spawn: Spawn, shm_dir: Path) -> None:
    worker = spawn(env=shm_env(shm_dir, 4096))
    assert worker.handshake_answer["capabilities"] == [*PROTOCOL_2_CAPABILITIES, "shm"]
    request_id = worker.send("shm", {"size": 10_000})
    envelope, attachments = split_binary_body(worker.receive_body())
    big, small = envelope["$binary"]
    assert envelope["args"] == {"blob": None, "small": None}
    assert big["path"] == ["args", "blob"] and big["size"] == 10_000
    assert big["shm"].startswith(SHM_PREFIX) and "shm" not in small
    assert attachments == [b"s"]  # only the small value is inline
    # The segment is complete when the frame arrives; from then on it is the host's.
    segment = shm_dir / big["shm"]
    assert segment.read_bytes() == b"\x09" * 10_000
    segment.unlink()
    data = bytes(range(7)) * 1000
    (shm_dir / "req-cb-0").write_bytes(data)
    worker.send_raw(
        frame(
            binary_body(
                {
                    "id": request_id,
                    "command": "$callback",
                    "args": {"call": envelope["call"], "success": True, "result": {"data": None}},
                    "$binary": [
                        {"path": ["args", "result", "data"], "size": len(data), "shm": "req-cb-0"}
                    ],
                }
            )
        )
    )
    assert result(worker, request_id) == {"length": 7000, "isBuffer": True, "sum": 21 * 1000}
    assert (shm_dir / "req-cb-0").read_bytes() == data  # left to the host, unchanged


# -------------------------------------------------------------------------------------------
# Cancel
# -------------------------------------------------------------------------------------------


def test_cancel_while_a_call_is_pending(spawn: Spawn, tmp_path: Path) -> None:
    worker = spawn()
    marker = tmp_path / "seen.json"
    request_id = worker.send("cancel_rethrow", {"marker": str(marker)})
    call = receive_call(worker, request_id, "slow")
    worker.send("$cancel", id=request_id)
    assert response(worker, request_id) == {
        "id": request_id,
        "success": False,
        "error": "cancelled",
    }
    seen = json.loads(marker.read_text())
    assert seen["isCallbackError"] is True and seen["code"] == "cancelled", seen
    assert seen["callback"] == "slow" and "cancelled" in seen["message"]
    # The host's answer, coming after all, settles nothing and gets no answer.
    answer(worker, request_id, call["call"], "too late")
    assert_quiet(worker, 0.1)
    still_serving(worker)


def test_cancelled_handler_may_answer_its_own_result_and_calls_after_fail_at_once(
    spawn: Spawn,
) -> None:
    worker = spawn()
    request_id = worker.send("cancel_own", {})
    receive_call(worker, request_id, "slow")
    worker.send("$cancel", id=request_id)
    # The next frame is the answer: the second call was refused without a call frame.
    got = result(worker, request_id)
    assert got["first"]["code"] == "cancelled" and got["first"]["isCallbackError"] is True
    assert got["aborted"] is True
    assert got["second"]["code"] == "cancelled" and got["second"]["callback"] == "again"
    still_serving(worker)


# -------------------------------------------------------------------------------------------
# Answers for no pending call
# -------------------------------------------------------------------------------------------


def test_callback_for_unknown_call_is_ignored(spawn: Spawn) -> None:
    worker = spawn()
    request_id = worker.send("proxy", {"name": "lookup", "args": {}})
    call = receive_call(worker, request_id, "lookup")
    answer(worker, request_id, call["call"] + 1000, "unknown call")
    answer(worker, request_id + 77, call["call"], "another request's")  # not this call's id
    answer(worker, 999, 5, "no such request")
    worker.send("$callback", {"call": "one", "success": True}, id=request_id)  # malformed
    worker.send("$callback", {}, id=request_id)
    assert_quiet(worker, 0.2)
    answer(worker, request_id, call["call"], "the answer")
    assert result(worker, request_id) == {"got": "the answer"}
    # An answer to a call already answered is ignored too.
    answer(worker, request_id, call["call"], "again")
    assert_quiet(worker, 0.1)
    assert worker.result("ping")["requests_handled"] == 3  # $callback frames are not requests
    worker.close_stdin()
    assert worker.wait() == 0
    stderr = worker.stderr_text()
    assert f'ignoring $callback for request {request_id}: call="one" is not' in stderr, stderr


# -------------------------------------------------------------------------------------------
# Streams
# -------------------------------------------------------------------------------------------


def test_streaming_handler_calls_between_items(spawn: Spawn) -> None:
    worker = spawn()
    request_id = worker.send(
        "ask_between", {"n": 3}, meta={"deadline_ms": 30_000, "stream": {"window": 8}}
    )
    for i in range(3):
        call = receive_call(worker, request_id, "item")
        assert call["args"] == {"i": i}
        if i == 1:  # other requests run while the stream waits for its callback
            assert worker.result("ping")["status"] == "ok"
        answer(worker, request_id, call["call"], {"value": i * 10})
        assert worker.receive() == {"id": request_id, "item": {"value": i * 10}}
    assert worker.receive() == {"id": request_id, "success": True, "result": "last"}
    # Called without meta.stream it answers the list of its items.
    request_id = worker.send("ask_between", {"n": 2})
    for i in range(2):
        call = receive_call(worker, request_id, "item")
        answer(worker, request_id, call["call"], i)
    assert result(worker, request_id) == [0, 1, "last"]


def test_cancel_of_a_stream_waiting_for_a_call(spawn: Spawn) -> None:
    worker = spawn()
    request_id = worker.send(
        "ask_between", {"n": 5}, meta={"deadline_ms": 30_000, "stream": {"window": 8}}
    )
    call = receive_call(worker, request_id, "item")
    answer(worker, request_id, call["call"], "zero")
    assert worker.receive() == {"id": request_id, "item": "zero"}
    receive_call(worker, request_id, "item")
    worker.send("$cancel", id=request_id)
    assert response(worker, request_id) == {
        "id": request_id,
        "success": False,
        "error": "cancelled",
    }
    still_serving(worker)


# -------------------------------------------------------------------------------------------
# Calls nobody awaits, calls after the end, refused calls
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "how", "answered"),
    [
        ("forget", "async", "done"),
        ("forget_sync", "sync", "sync done"),
    ],
)
def test_call_not_awaited_is_dropped_when_the_request_ends(
    spawn: Spawn, command: str, how: str, answered: str
) -> None:
    worker = spawn()
    request_id = worker.send(command, {})
    call = receive_call(worker, request_id, "ignored")
    assert call["args"] == {"how": how}
    assert result(worker, request_id) == answered
    # Its answers come later: a success, a failure; neither settles anything nor crashes.
    answer(worker, request_id, call["call"], "late")
    answer(worker, request_id, call["call"], error="late failure", code="callback_failed")
    assert_quiet(worker, 0.2)
    still_serving(worker)


def test_cancel_rejects_a_call_nobody_awaits_without_crashing(spawn: Spawn) -> None:
    worker = spawn()
    request_id = worker.send("forget_then_wait", {})
    call = receive_call(worker, request_id, "ignored")
    worker.send("$cancel", id=request_id)
    assert response(worker, request_id) == {
        "id": request_id,
        "success": False,
        "error": "cancelled",
    }
    answer(worker, request_id, call["call"], "late")
    still_serving(worker)


def test_call_after_the_request_ended_fails_at_once(spawn: Spawn, tmp_path: Path) -> None:
    worker = spawn()
    marker = tmp_path / "late.json"
    request_id = worker.send("late", {"marker": str(marker)})
    assert result(worker, request_id) == "answered"
    assert_quiet(worker, 0.3)  # no call frame for a request that is over
    seen = json.loads(marker.read_text())
    assert seen["code"] == "cancelled" and "has ended" in seen["message"], seen
    still_serving(worker)


def test_calls_refused_before_sending(spawn: Spawn) -> None:
    worker = spawn(env={"SNAKEPIT_MAX_FRAME_BYTES": str(1 << 20)})
    request_id = worker.send("bad_calls", {})
    got = result(worker, request_id)  # first frame: no call frame went out
    assert [g[0] for g in got] == ["bad_callback"] * 7, got
    assert got[0][1] == "callback name must be a string, got 42"
    assert got[1][1] == "callback 'x': args must be an object"
    assert got[2][1] == got[1][1] and got[3][1] == got[1][1]
    assert got[4][1].startswith("callback 'x': args are not JSON-serializable: ")
    assert got[5][1] == "callback 'x': args must serialize to a JSON object"
    assert got[6][1].startswith("callback 'x': call of "), got[6]
    assert got[6][1].endswith("bytes exceeds the frame limit of 1048576 bytes")
    # The call numbers refused were not used up wrongly: the next call still works.
    request_id = worker.send("proxy", {"name": "fine", "args": {}})
    call = receive_call(worker, request_id, "fine")
    answer(worker, request_id, call["call"], 1)
    assert result(worker, request_id) == {"got": 1}
