"""Callbacks on the host's side (docs/PROTOCOL.md, *Callbacks*), against a third-party-style
bridge that calls whatever the test asks (tests/bridges/callback_bridge.py): registration and
its errors, the context, failures as codes, bad frames answered without harm, the pending
bound, deadlines and cancellation, nested calls and the deadlock they could cause, binary
results, plugins' callbacks, spans, metrics and stats.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from snakepit_core import Callback, CallbackContext, Pool, ScriptAdapter, SyncPool, hookimpl
from snakepit_core.errors import PluginError, WorkerTimeout
from snakepit_core.plugins import get_plugin_manager

from conftest import BRIDGES, eventually


def adapter(name: str = "callback-bridge") -> ScriptAdapter:
    return ScriptAdapter(name, sys.executable, BRIDGES / "callback_bridge.py")


def call(*calls: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"calls": [list(c) for c in calls]}


def ok(number: int, result: Any) -> dict[str, Any]:
    return {"call": number, "success": True, "result": result}


async def test_sync_and_async_callbacks_answer_with_the_request_context() -> None:
    seen: list[CallbackContext] = []
    async with Pool(adapter(), pool_size=1) as pool:

        @pool.register_callback("lookup")
        def lookup(args: dict[str, Any], ctx: CallbackContext) -> Any:
            seen.append(ctx)
            return {"name": {"u1": "Ada"}[args["key"]]}

        async def double(args: dict[str, Any], ctx: CallbackContext) -> int:
            await asyncio.sleep(0)
            return args["n"] * 2

        pool.register_callback("double", double)
        answers = await pool.execute_in_session(
            "s-1", "call", call(("lookup", {"key": "u1"}), ("double", {"n": 21})), timeout=20
        )
        assert answers == [ok(0, {"name": "Ada"}), ok(1, 42)]
        (ctx,) = seen
        assert (ctx.command, ctx.session_id, ctx.pool) == ("call", "s-1", pool)
        assert ctx.worker_id in pool.workers and ctx.request_id >= 1
        assert 15 < ctx.deadline <= 20
        stats = pool.stats()
        assert stats["callbacks"] == 2 and stats["callback_errors"] == 0


async def test_failures_come_back_as_codes_and_messages_naming_the_callback() -> None:
    async with Pool(adapter(), pool_size=1) as pool:
        pool.register_callback("boom", lambda args, ctx: {}[args["key"]])
        pool.register_callback(
            "typed",
            lambda args, ctx: args["n"],
            schema={"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}},
        )
        pool.register_callback("not_json", lambda args, ctx: {"when": object()})
        answers = await pool.execute(
            "call",
            call(
                ("boom", {"key": "k"}),
                ("nope", {}),
                ("typed", {"n": "three"}),
                ("typed", {}),
                ("not_json", {}),
            ),
        )
    codes = [(a["call"], a["success"], a["code"]) for a in answers]
    assert codes == [
        (0, False, "callback_failed"),
        (1, False, "unknown_callback"),
        (2, False, "invalid_arguments"),
        (3, False, "invalid_arguments"),
        (4, False, "callback_failed"),
    ]
    errors = [a["error"] for a in answers]
    assert errors[0] == "callback 'boom' failed: KeyError: 'k'"
    assert errors[1] == "unknown callback 'nope' (registered: boom, not_json, typed)"
    assert "args.n" in errors[2] and "callback 'typed'" in errors[2]
    assert "args.n is required" in errors[3]
    assert "callback 'not_json' returned what cannot be sent" in errors[4]


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        ({"id": "$id", "call": "one", "name": "echo", "args": {}}, "'call' must be an integer"),
        ({"id": "$id", "call": -1, "name": "echo", "args": {}}, "'call' must be an integer"),
        ({"id": "$id", "call": 0, "name": 7, "args": {}}, "'name' must be a string"),
        ({"id": "$id", "call": 0, "name": "echo", "args": [1]}, "'args' must be an object"),
    ],
)
async def test_a_bad_call_frame_is_answered_and_breaks_nothing(
    frame: dict[str, Any], problem: str
) -> None:
    async with Pool(adapter(), pool_size=1) as pool:
        pool.register_callback("echo", lambda args, ctx: args)
        (answer,) = await pool.execute("raw", {"frames": [frame], "answers": 1})
        assert answer["success"] is False and answer["code"] == "bad_callback"
        assert problem in answer["error"]
        assert await pool.execute("call", call(("echo", {"x": 1}))) == [ok(0, {"x": 1})]
        assert pool.stats()["restarts"] == 0


async def test_a_call_for_a_request_not_in_flight_or_already_pending_is_refused() -> None:
    async with Pool(adapter(), pool_size=1) as pool:
        gate = asyncio.Event()

        async def slow(args: dict[str, Any], ctx: CallbackContext) -> str:
            await gate.wait()
            return "done"

        pool.register_callback("slow", slow)
        pool.register_callback("echo", lambda args, ctx: args)
        frames = [
            {"id": 999, "call": 0, "name": "echo", "args": {}},
            {"id": "$id", "call": 1, "name": "slow", "args": {}},
            {"id": "$id", "call": 1, "name": "slow", "args": {}},
        ]
        task = asyncio.ensure_future(pool.execute("raw", {"frames": frames, "answers": 2}))
        await eventually(lambda: pool.stats()["callback_errors"] >= 2)
        gate.set()
        answers = await task
        # The call to id 999 was answered on id 999, which this bridge ignores.
        assert [a.get("code") for a in answers] == ["bad_callback", None]
        assert "call 1 is already pending" in answers[0]["error"]
        assert answers[1] == ok(1, "done")


async def test_a_flood_of_calls_is_bounded_per_worker() -> None:
    release = asyncio.Event()

    async def wait(args: dict[str, Any], ctx: CallbackContext) -> int:
        await release.wait()
        return args["i"]

    async with Pool(adapter(), pool_size=1, max_pending_callbacks=8) as pool:
        pool.register_callback("wait", wait)
        task = asyncio.ensure_future(
            pool.execute("call", call(*(("wait", {"i": i}) for i in range(40))), timeout=30)
        )
        await eventually(lambda: pool.stats()["callback_errors"] == 32)
        release.set()
        answers = await task
        assert [a["result"] for a in answers if a["success"]] == list(range(8))
        refused = [a for a in answers if not a["success"]]
        assert {a["code"] for a in refused} == {"too_many_callbacks"}
        assert "already has 8 callbacks running (max_pending_callbacks)" in refused[0]["error"]
        assert await pool.execute("call", call(("wait", {"i": 1}))) == [ok(0, 1)]


async def test_cancelling_or_timing_out_the_request_cancels_its_callbacks() -> None:
    cancelled: list[int] = []

    async def forever(args: dict[str, Any], ctx: CallbackContext) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(args["n"])
            raise

    async with Pool(adapter(), pool_size=1) as pool:
        pool.register_callback("forever", forever)
        with pytest.raises(WorkerTimeout):
            await pool.execute("call", call(("forever", {"n": 1})), timeout=0.5)
        await eventually(lambda: cancelled == [1])
        task = asyncio.ensure_future(pool.execute("call", call(("forever", {"n": 2}))))
        await eventually(lambda: pool.stats()["callbacks"] == 2)
        task.cancel()
        await eventually(lambda: cancelled == [1, 2])
        await eventually(lambda: pool.stats()["available"] == 1)
        assert pool.stats()["restarts"] == 0


async def test_a_callback_may_call_the_pool_and_a_call_that_could_never_run_fails_at_once() -> None:
    async with Pool(adapter(), pool_size=2) as pool:
        both_waiting = asyncio.Event()
        waiting = 0

        async def nested(args: dict[str, Any], ctx: CallbackContext) -> Any:
            nonlocal waiting
            if args.get("together"):  # both slots held by requests waiting for this callback
                waiting += 1
                if waiting == 2:
                    both_waiting.set()
                await both_waiting.wait()
            return await ctx.pool.execute("sleep", {"seconds": 0})

        pool.register_callback("nested", nested)
        assert await pool.execute("call", call(("nested", {}))) == [ok(0, None)]
        started = time.monotonic()
        both = await asyncio.gather(
            pool.execute("call", call(("nested", {"together": True})), timeout=30),
            pool.execute("call", call(("nested", {"together": True})), timeout=30),
        )
        assert time.monotonic() - started < 10  # at once, not after the 30 s timeout
        for (answer,) in both:
            assert answer["success"] is False and answer["code"] == "callback_deadlock"
            assert "called from a callback while all 2 slot(s)" in answer["error"]
        assert await pool.execute("call", call(("nested", {}))) == [ok(0, None)]


async def test_binary_results_reach_the_worker_as_binary() -> None:
    async with Pool(adapter(), pool_size=1) as pool:
        pool.register_callback("blob", lambda args, ctx: {"data": bytes(range(5))})
        (answer,) = await pool.execute("call", call(("blob", {})))
    assert answer == ok(0, {"data": {"$bytes": "0001020304"}})


class CallbackPlugin:
    def __init__(self, adapter_name: str, *callbacks: Callback) -> None:
        self.adapter_name = adapter_name
        self.callbacks = list(callbacks)

    @hookimpl
    def snakepit_callbacks(self, adapter: Any) -> list[Callback] | None:
        return self.callbacks if adapter.name == self.adapter_name else None


async def test_plugins_contribute_callbacks_and_a_name_given_twice_names_both() -> None:
    manager = get_plugin_manager()
    plugin = CallbackPlugin("callback-plugin", Callback("hello", lambda args, ctx: "hi"))
    manager.register(plugin, name="callbacks-for-test")
    try:
        async with Pool(adapter("callback-plugin"), pool_size=1) as pool:
            assert await pool.execute("call", call(("hello", {}))) == [ok(0, "hi")]
            with pytest.raises(ValueError, match="'hello' is registered twice: by plugin "):
                pool.register_callback("hello", lambda args, ctx: "again")
        clash = Pool(adapter("callback-plugin"), pool_size=1)
        clash.register_callback("hello", lambda args, ctx: "mine")
        with pytest.raises(ValueError, match="by register_callback and by plugin 'callbacks-for"):
            await clash.start()
        await clash.stop()
    finally:
        manager.unregister(name="callbacks-for-test")
    broken = CallbackPlugin("callback-plugin", "not a callback")  # type: ignore[arg-type]
    manager.register(broken, name="broken-callbacks")
    try:
        with pytest.raises(PluginError, match="must return a list of Callback"):
            async with Pool(adapter("callback-plugin"), pool_size=1):
                pass
    finally:
        manager.unregister(name="broken-callbacks")


async def test_a_callback_is_a_server_span_under_the_request_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with Pool(adapter(), pool_size=1, tracer_provider=provider) as pool:
        pool.register_callback("echo", lambda args, ctx: args)
        pool.register_callback("boom", lambda args, ctx: 1 / 0)
        await pool.execute("call", call(("echo", {}), ("boom", {})))
    spans = {span.name: span for span in exporter.get_finished_spans()}
    request = spans["callback-bridge/_OTHER"]
    echo, boom = spans["callback-bridge/callback/echo"], spans["callback-bridge/callback/boom"]
    for span in (echo, boom):
        assert span.kind == SpanKind.SERVER
        assert span.parent is not None and span.parent.span_id == request.context.span_id
        assert span.attributes["snakepit.callback.name"] in ("echo", "boom")
    assert boom.attributes["error.type"] == "ZeroDivisionError"
    assert not boom.status.is_ok and echo.status.is_ok


def test_the_blocking_pool_registers_callbacks_too() -> None:
    with SyncPool(adapter(), pool_size=1) as pool:

        @pool.register_callback("add")
        def add(args: dict[str, Any], ctx: CallbackContext) -> int:
            return args["a"] + args["b"]

        assert pool.execute("call", call(("add", {"a": 2, "b": 3}))) == [ok(0, 5)]


async def test_callbacks_are_counted_in_metrics_by_name_and_error() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    async with Pool(adapter(), pool_size=1, meter_provider=MeterProvider([reader])) as pool:
        pool.register_callback("echo", lambda args, ctx: args)
        pool.register_callback("boom", lambda args, ctx: 1 / 0)
        await pool.execute("call", call(("echo", {}), ("echo", {}), ("boom", {})))
    data = reader.get_metrics_data()
    points = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "snakepit.callback.calls"
        for point in metric.data.data_points
    ]
    counted = {
        (p.attributes["snakepit.callback.name"], p.attributes.get("error.type")): p.value
        for p in points
    }
    assert counted == {("echo", None): 2, ("boom", "ZeroDivisionError"): 1}
