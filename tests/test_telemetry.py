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
    assert attributes[Attr.RPC_SYSTEM] == "snakepit"
    assert attributes[Attr.RPC_SERVICE] == "python"
    assert attributes[Attr.RPC_METHOD] == "compute"
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
    assert span.attributes[Attr.RPC_METHOD] == "_OTHER"
    assert span.attributes[Attr.COMMAND] == "user_specific_command_1234"


async def test_failures_set_error_status_type_and_record_the_exception(spans, misbehaving):
    provider, exporter = spans
    async with Pool("python", pool_size=1, tracer_provider=provider) as pool:
        with pytest.raises(CommandError):
            await pool.execute("compute", {"operation": "divide", "a": 1, "b": 0})
    (span,) = client_spans(exporter)
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes[Attr.ERROR_TYPE] == "command_error"
    assert [event.name for event in span.events] == ["exception"]
    assert "division by zero" in span.events[0].attributes["exception.message"]


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
    by_method = {p.attributes[Attr.RPC_METHOD]: p.value for p in points["snakepit.requests"]}
    assert by_method == {"ping": 10, "compute": 1}
    (error,) = points["snakepit.errors"]
    assert error.attributes[Attr.ERROR_TYPE] == "command_error" and error.value == 1
    assert sum(p.value for p in points["snakepit.worker.restarts"]) == 1
    for gauge in (
        "snakepit.pool.queue_depth",
        "snakepit.pool.busy_workers",
        "snakepit.pool.available_workers",
    ):
        assert gauge in points


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
