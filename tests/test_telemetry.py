"""OpenTelemetry: spans, metrics and trace context into workers, with the SDK's in-memory
exporters passed in through ``tracer_provider=`` / ``meter_provider=``."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from snakepit_core import Pool, ScriptAdapter, hookimpl
from snakepit_core.errors import CommandError, WorkerCrashed
from snakepit_core.plugins import get_plugin_manager
from snakepit_core.telemetry import Attr

from conftest import eventually


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def meter():
    reader = InMemoryMetricReader()
    return MeterProvider(metric_readers=[reader]), reader


def client_spans(exporter):
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]


async def test_a_client_span_per_execute_with_rpc_attributes(spans):
    provider, exporter = spans
    async with Pool("python", pool_size=2, tracer_provider=provider) as pool:
        await pool.execute("compute", {"operation": "add", "a": 1, "b": 2})
        await pool.execute_in_session("sess-1", "ping", {})
        pids = {w.id: w.pid for w in pool.workers.values()}
    compute, ping = client_spans(exporter)
    assert compute.name == "python/compute" and ping.name == "python/ping"
    attributes = compute.attributes
    assert attributes[Attr.RPC_SYSTEM_NAME] == "snakepit"
    assert attributes[Attr.RPC_METHOD] == "python/compute"
    assert Attr.ERROR_TYPE not in attributes and Attr.RPC_RESPONSE_STATUS_CODE not in attributes
    assert attributes[Attr.ADAPTER] == "python"
    assert attributes[Attr.WORKER_PID] == pids[attributes[Attr.WORKER_ID]]
    assert attributes[Attr.QUEUE_WAIT] >= 0 and attributes[Attr.EXECUTION_TIME] > 0
    assert compute.status.status_code == StatusCode.UNSET
    assert ping.attributes[Attr.SESSION_ID] == "sess-1"


async def test_undeclared_commands_are_named_other(spans, misbehaving):
    provider, exporter = spans
    async with Pool(misbehaving(), pool_size=1, tracer_provider=provider) as pool:
        await pool.execute("user_specific_command_1234", {})
    (span,) = client_spans(exporter)
    assert span.name == "misbehave-normal/_OTHER"
    assert span.attributes[Attr.RPC_METHOD] == "misbehave-normal/_OTHER"
    assert (
        span.attributes[Attr.RPC_METHOD_ORIGINAL] == "misbehave-normal/user_specific_command_1234"
    )
    assert span.attributes[Attr.COMMAND] == "user_specific_command_1234"


async def test_failures_set_error_status_type_and_record_the_exception(spans, misbehaving):
    provider, exporter = spans
    async with Pool("python", pool_size=1, tracer_provider=provider) as pool:
        with pytest.raises(CommandError):
            await pool.execute("compute", {"operation": "divide", "a": 1, "b": 0})
    (span,) = client_spans(exporter)
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes[Attr.ERROR_TYPE] == "command_error"
    assert span.attributes[Attr.RPC_RESPONSE_STATUS_CODE] == "command_error"
    assert [event.name for event in span.events] == ["exception"]
    assert "division by zero" in span.events[0].attributes["exception.message"]
    assert str(span.events[0].attributes[Attr.EXCEPTION_ESCAPED]) == "True"  # the SDK stores a str


async def test_worker_start_restart_and_exit_spans(spans, misbehaving):
    provider, exporter = spans
    async with Pool(misbehaving(), pool_size=1, tracer_provider=provider) as pool:
        first_pid = next(iter(pool.workers.values())).pid
        with pytest.raises(WorkerCrashed):
            await pool.execute("die", {"code": 5})
        await eventually(
            lambda: pool.stats()["restarts"] == 1 and pool.stats()["available"] == 1,
            message=lambda: f"not replaced: {pool.stats()}",
        )
    names = [s.name for s in exporter.get_finished_spans()]
    assert names.count("snakepit.worker.start") == 2
    assert "snakepit.worker.restart" in names
    exits = [s for s in exporter.get_finished_spans() if s.name == "snakepit.worker.exit"]
    crashed = [s for s in exits if s.attributes[Attr.PROCESS_PID] == first_pid]
    assert crashed[0].attributes[Attr.PROCESS_EXIT_CODE] == 5
    assert crashed[0].attributes[Attr.EXIT_REASON] == "crashed"


WORKER_WITH_SDK = textwrap.dedent(
    """
    import json, sys
    from opentelemetry import trace
    from opentelemetry.propagate import extract
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    from snakepit_python import command, run

    OUT = sys.argv[1]

    class FileExporter(SpanExporter):
        def export(self, spans):
            with open(OUT, "a") as out:
                for span in spans:
                    out.write(json.dumps({
                        "name": span.name,
                        "trace_id": format(span.context.trace_id, "032x"),
                        "parent_span_id": format(span.parent.span_id, "016x") if span.parent else None,
                    }) + "\\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    tracer = provider.get_tracer("worker")

    @command
    def predict(args, ctx):
        parent = extract({"traceparent": ctx.traceparent, "tracestate": ctx.tracestate or ""})
        with tracer.start_as_current_span("worker.predict", context=parent):
            return {"traceparent": ctx.traceparent}

    run()
    """
)


async def test_a_span_inside_a_python_worker_joins_the_callers_trace(spans, tmp_path):
    provider, exporter = spans
    script = tmp_path / "traced_worker.py"
    script.write_text(WORKER_WITH_SDK)
    out = tmp_path / "worker_spans.jsonl"
    adapter = ScriptAdapter("traced", sys.executable, script, args=[str(out)])
    async with Pool(adapter, pool_size=1, tracer_provider=provider) as pool:
        result = await pool.execute("predict", {})
    (client,) = client_spans(exporter)
    trace_id = format(client.context.trace_id, "032x")
    span_id = format(client.context.span_id, "016x")
    assert result["traceparent"].startswith(f"00-{trace_id}-{span_id}-")
    (worker_span,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert worker_span == {
        "name": "worker.predict",
        "trace_id": trace_id,
        "parent_span_id": span_id,
    }


async def test_a_callers_span_is_the_parent_of_the_client_span(spans):
    provider, exporter = spans
    tracer = provider.get_tracer("service")
    async with Pool("python", pool_size=1, tracer_provider=provider) as pool:
        with tracer.start_as_current_span("handle-http-request") as outer:
            await pool.execute("ping", {})
    (client,) = client_spans(exporter)
    assert client.parent.span_id == outer.get_span_context().span_id
    assert client.context.trace_id == outer.get_span_context().trace_id


def metric_points(reader):
    found = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found[metric.name] = list(metric.data.data_points)
    return found


async def test_metrics(meter, misbehaving):
    provider, reader = meter
    async with Pool("python", pool_size=2, meter_provider=provider) as pool:
        await asyncio.gather(*(pool.execute("ping", {}) for _ in range(10)))
        with pytest.raises(CommandError):
            await pool.execute("compute", {"operation": "divide", "a": 1, "b": 0})
        worker = next(iter(pool.workers.values()))
        worker.kill("crashed")
        await eventually(
            lambda: pool.stats()["restarts"] == 1 and pool.stats()["available"] == 2,
            message=lambda: f"not replaced: {pool.stats()}",
        )
        points = metric_points(reader)
    duration = points["rpc.client.call.duration"]
    assert sum(p.count for p in duration) == 11
    by_outcome = {
        (p.attributes[Attr.RPC_METHOD], p.attributes.get(Attr.ERROR_TYPE)): p.count
        for p in duration
    }
    assert by_outcome == {("python/ping", None): 10, ("python/compute", "command_error"): 1}
    assert all(p.attributes[Attr.RPC_SYSTEM_NAME] == "snakepit" for p in duration)
    # Buckets in seconds: a ping lands in a sub-millisecond bucket, not the first of all.
    (pings,) = [p for p in duration if p.attributes[Attr.RPC_METHOD] == "python/ping"]
    assert pings.explicit_bounds[0] <= 0.0001 and 300 in pings.explicit_bounds
    assert pings.bucket_counts[-1] == 0 and max(pings.bucket_counts[:8]) > 0
    assert "snakepit.requests" not in points and "snakepit.errors" not in points
    assert sum(p.value for p in points["snakepit.worker.restarts"]) == 1
    for gauge in (
        "snakepit.pool.queue_depth",
        "snakepit.pool.busy_workers",
        "snakepit.pool.available_workers",
    ):
        assert gauge in points


def metric_descriptions(reader):
    return {
        metric.name: metric.description
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


async def test_every_instrument_has_a_description_and_the_scope_names_its_version(meter, spans):
    from importlib.metadata import version

    provider, reader = meter
    tracer_provider, exporter = spans
    async with Pool(
        "python", pool_size=1, meter_provider=provider, tracer_provider=tracer_provider
    ) as pool:
        await pool.execute("ping", {})
        next(iter(pool.workers.values())).kill("crashed")
        await eventually(lambda: pool.stats()["restarts"] == 1)
        descriptions = metric_descriptions(reader)
    assert set(descriptions) >= {"rpc.client.call.duration", "snakepit.worker.restarts"}
    assert all(descriptions.values()), descriptions
    (span,) = client_spans(exporter)
    assert span.instrumentation_scope.version == version("snakepit-core")
    assert span.instrumentation_scope.schema_url.endswith("/1.40.0")


async def test_spans_made_in_hooks_nest_under_the_request_span(spans):
    from opentelemetry import trace

    provider, exporter = spans
    tracer = provider.get_tracer("a-plugin")

    class Instrumented:
        @hookimpl
        def snakepit_prepare_args(self, adapter, command, args):
            with tracer.start_as_current_span("prepare-in-hook"):
                return None

        @hookimpl
        def snakepit_process_response(self, adapter, command, response):
            with tracer.start_as_current_span("process-in-hook"):
                current = trace.get_current_span().get_span_context()
                assert current.is_valid
                return None

    manager = get_plugin_manager()
    name = manager.register(Instrumented(), "instrumented")
    try:
        async with Pool("python", pool_size=1, tracer_provider=provider) as pool:
            await pool.execute("echo", {"n": 1})
    finally:
        manager.unregister(name)
    finished = {span.name: span for span in exporter.get_finished_spans()}
    request = finished["python/echo"]
    for child in ("prepare-in-hook", "process-in-hook"):
        assert finished[child].parent is not None, child
        assert finished[child].parent.span_id == request.context.span_id, child
    assert trace.get_current_span() is trace.INVALID_SPAN  # detached again


async def test_no_sdk_means_no_spans_created():
    async with Pool("python", pool_size=1) as pool:
        assert pool.telemetry.tracing is False
        await pool.execute("ping", {})


async def test_telemetry_hooks_carry_the_same_data(spans):
    provider, exporter = spans
    seen = []

    class Forwarder:
        @hookimpl
        def snakepit_request_finished(
            self, adapter, command, request_id, worker_id, session_id, duration, queue_wait, error
        ):
            seen.append((command, worker_id, session_id, error))

    get_plugin_manager().register(Forwarder(), name="forwarder")
    try:
        async with Pool("python", pool_size=1, tracer_provider=provider) as pool:
            await pool.execute_in_session("hooked", "ping", {})
    finally:
        get_plugin_manager().unregister("forwarder")
    (client,) = client_spans(exporter)
    assert seen == [("ping", client.attributes[Attr.WORKER_ID], "hooked", None)]


async def test_stats_has_latency_percentiles_and_restarts():
    async with Pool("python", pool_size=2) as pool:
        for _ in range(20):
            await pool.execute("ping", {})
        stats = pool.stats()
        assert 0 < stats["latency_p50"] <= stats["latency_p99"]
        assert stats["restarts"] == 0 and len(stats["per_worker"]) == 2


async def test_a_streams_span_covers_it_whole_with_its_items_and_first_item_time(spans):
    from test_streams import stream_adapter

    provider, exporter = spans
    async with Pool(
        stream_adapter(), pool_size=1, worker_concurrency=4, tracer_provider=provider
    ) as pool:
        async with pool.execute_stream("count", {"n": 5}) as items:
            received = [await anext(items)]
            assert not client_spans(exporter), "the span ended before the stream did"
            received += [item async for item in items]
        stream = pool.execute_stream("count", {"n": 1000})
        await anext(stream)
        await stream.aclose()
        with pytest.raises(CommandError):
            async for _ in pool.execute_stream("count", {"n": 5, "fail_at": 2}):
                pass
    assert len(received) == 6
    whole, early, failed = client_spans(exporter)
    assert whole.attributes[Attr.STREAM_ITEMS] == 6
    assert whole.attributes[Attr.STREAM_FIRST_ITEM] >= 0
    assert whole.status.status_code == StatusCode.UNSET
    assert early.attributes[Attr.STREAM_ITEMS] == 1
    assert early.status.status_code == StatusCode.UNSET  # stopping early is not an error
    assert failed.attributes[Attr.STREAM_ITEMS] == 2
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes[Attr.ERROR_TYPE] == "command_error"
