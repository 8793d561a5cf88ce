"""OpenTelemetry spans and metrics for a pool, through the API only.

Names follow the OpenTelemetry semantic conventions for RPC, version 1.40.0
(``SEMCONV_VERSION``): each call is a CLIENT span named ``<adapter>/<method>`` with
``rpc.system.name`` ``snakepit``, ``rpc.method`` the fully qualified ``<adapter>/<command>``
(``<adapter>/_OTHER`` for a command the adapter does not declare, with ``rpc.method_original``),
and on failure ``error.type`` and ``rpc.response.status_code`` (the error's ``code``). The
histogram ``rpc.client.call.duration`` (seconds, with bucket boundaries fit for seconds) is the
only per-call metric; count it for request and error rates. The span is the current span while
hooks run and the response is processed, so spans made there nest under it, and its context
goes to the worker in the request's ``meta`` as W3C ``traceparent``/``tracestate``.

When no SDK is configured (and no provider was passed in) nothing is created per request, so
the cost is one check.
"""

from __future__ import annotations

from contextvars import Token
from importlib.metadata import version
from typing import Any

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from .adapter import Adapter

INSTRUMENTATION_NAME = "snakepit"
#: The version of the distribution that holds this module, as OpenTelemetry expects.
INSTRUMENTATION_VERSION = version("snakepit-core")
#: The semantic conventions these names follow.
SEMCONV_VERSION = "1.40.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
OTHER_COMMAND = "_OTHER"
#: ``rpc.client.call.duration`` buckets, in seconds: from a 100 µs ping to a 5-minute job.
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class Attr:
    """Every attribute name snakepit emits, in one place."""

    RPC_SYSTEM_NAME = "rpc.system.name"
    RPC_METHOD = "rpc.method"
    RPC_METHOD_ORIGINAL = "rpc.method_original"
    RPC_RESPONSE_STATUS_CODE = "rpc.response.status_code"
    ERROR_TYPE = "error.type"
    EXCEPTION_ESCAPED = "exception.escaped"
    ADAPTER = "snakepit.adapter"
    COMMAND = "snakepit.command"
    WORKER_ID = "snakepit.worker.id"
    WORKER_PID = "snakepit.worker.pid"
    SESSION_ID = "snakepit.session.id"
    QUEUE_WAIT = "snakepit.queue_wait"
    EXECUTION_TIME = "snakepit.execution_time"
    STREAM_ITEMS = "snakepit.stream.items"
    STREAM_FIRST_ITEM = "snakepit.stream.time_to_first_item"
    PROCESS_PID = "process.pid"
    PROCESS_EXIT_CODE = "process.exit.code"
    EXIT_REASON = "snakepit.worker.exit_reason"
    STARTUP_TIME = "snakepit.worker.startup_time"
    CALLBACK = "snakepit.callback.name"


RPC_SYSTEM_VALUE = "snakepit"


def _sdk_configured(provider: object) -> bool:
    """Whether ``provider`` records anything: the API's own providers (the no-op ones, and the
    proxy that stands in until an SDK is installed) live in the API package; an SDK's do not."""
    module = type(provider).__module__
    return not module.startswith(("opentelemetry.trace", "opentelemetry.metrics"))


class PoolTelemetry:
    """Spans and metrics of one pool."""

    def __init__(
        self,
        adapter: Adapter,
        *,
        tracer_provider: trace.TracerProvider | None,
        meter_provider: metrics.MeterProvider | None,
    ) -> None:
        self.adapter = adapter
        self._explicit_tracing = tracer_provider is not None
        self._explicit_metrics = meter_provider is not None
        self.tracer = trace.get_tracer(
            INSTRUMENTATION_NAME,
            INSTRUMENTATION_VERSION,
            tracer_provider=tracer_provider,
            schema_url=SCHEMA_URL,
        )
        meter = metrics.get_meter(
            INSTRUMENTATION_NAME,
            INSTRUMENTATION_VERSION,
            meter_provider=meter_provider,
            schema_url=SCHEMA_URL,
        )
        self.duration = meter.create_histogram(
            "rpc.client.call.duration",
            unit="s",
            description="Duration of calls to the pool's workers, from execute to the answer",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.callbacks = meter.create_counter(
            "snakepit.callback.calls",
            unit="{call}",
            description="Callbacks workers called in the host, by name and error type",
        )
        self.restarts = meter.create_counter(
            "snakepit.worker.restarts",
            unit="{restart}",
            description="Workers replaced, by the reason the old one left",
        )
        self._base = {Attr.RPC_SYSTEM_NAME: RPC_SYSTEM_VALUE, Attr.ADAPTER: adapter.name}
        self.tracing = False
        self.metering = False
        self.refresh()
        self._gauge_source: Any = None
        meter.create_observable_gauge(
            "snakepit.pool.queue_depth",
            callbacks=[self._observe("queued")],
            unit="{request}",
            description="Calls waiting for a worker",
        )
        meter.create_observable_gauge(
            "snakepit.pool.busy_workers",
            callbacks=[self._observe("busy")],
            unit="{worker}",
            description="Workers with a request in flight",
        )
        meter.create_observable_gauge(
            "snakepit.pool.available_workers",
            callbacks=[self._observe("available")],
            unit="{worker}",
            description="Workers ready for a request",
        )

    def bind_stats(self, source: Any) -> None:
        """Where the observable gauges read their values (the pool's ``stats``)."""
        self._gauge_source = source

    def _observe(self, key: str) -> Any:
        def callback(_options: Any) -> list[metrics.Observation]:
            if self._gauge_source is None:
                return []
            return [metrics.Observation(self._gauge_source()[key], self._base)]

        return callback

    def refresh(self) -> None:
        """Decide whether spans and metrics are recorded at all.

        Called when the pool starts: with neither a provider passed in nor a global SDK
        configured, the hot path skips telemetry entirely (one attribute check per request).
        Configure the global SDK before starting pools, as OpenTelemetry recommends.
        """
        self.tracing = self._explicit_tracing or _sdk_configured(trace.get_tracer_provider())
        self.metering = self._explicit_metrics or _sdk_configured(metrics.get_meter_provider())

    def method_name(self, command: str) -> str:
        """``rpc.method``: ``<adapter>/<command>``, ``<adapter>/_OTHER`` for undeclared ones."""
        commands = self.adapter.commands
        known = commands is not None and command in commands
        return f"{self.adapter.name}/{command if known else OTHER_COMMAND}"

    def start_request(self, command: str, session_id: str | None) -> trace.Span:
        method = self.method_name(command)
        attributes: dict[str, Any] = {**self._base, Attr.RPC_METHOD: method, Attr.COMMAND: command}
        if not method.endswith(command):
            attributes[Attr.RPC_METHOD_ORIGINAL] = f"{self.adapter.name}/{command}"
        if session_id is not None:
            attributes[Attr.SESSION_ID] = session_id
        return self.tracer.start_span(method, kind=SpanKind.CLIENT, attributes=attributes)

    @staticmethod
    def activate(span: trace.Span) -> Token[Context]:
        """Make ``span`` the current span (of this task); :meth:`deactivate` undoes it."""
        return context.attach(trace.set_span_in_context(span))

    @staticmethod
    def deactivate(token: Token[Context]) -> None:
        context.detach(token)

    @staticmethod
    def inject(span: trace.Span) -> dict[str, Any]:
        """W3C trace context of ``span`` for the request's ``meta``."""
        carrier: dict[str, Any] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return carrier

    @staticmethod
    def set_worker(span: trace.Span, worker_id: str, pid: int | None, queue_wait: float) -> None:
        span.set_attribute(Attr.WORKER_ID, worker_id)
        if pid is not None:
            span.set_attribute(Attr.WORKER_PID, pid)
        span.set_attribute(Attr.QUEUE_WAIT, queue_wait)

    @staticmethod
    def set_stream(span: trace.Span, items: int, time_to_first_item: float | None) -> None:
        """A stream's item count, and the seconds from its sending to its first item."""
        span.set_attribute(Attr.STREAM_ITEMS, items)
        if time_to_first_item is not None:
            span.set_attribute(Attr.STREAM_FIRST_ITEM, time_to_first_item)

    @staticmethod
    def end_request(span: trace.Span, execution_time: float, error: BaseException | None) -> None:
        """End the span; a failure gets ``error.type``, the status code and the exception,
        recorded as escaped (it propagates to the caller)."""
        span.set_attribute(Attr.EXECUTION_TIME, execution_time)
        if error is not None:
            code = error_type(error)
            span.set_attribute(Attr.ERROR_TYPE, code)
            span.set_attribute(Attr.RPC_RESPONSE_STATUS_CODE, code)
            span.record_exception(error, escaped=True)
            span.set_status(Status(StatusCode.ERROR, str(error)[:500]))
        span.end()

    def record_metrics(self, command: str, duration: float, error: BaseException | None) -> None:
        attributes = {**self._base, Attr.RPC_METHOD: self.method_name(command)}
        if error is not None:
            attributes[Attr.ERROR_TYPE] = error_type(error)
        self.duration.record(duration, attributes)

    def start_callback(self, name: str, request_span: trace.Span | None) -> trace.Span | None:
        """A SERVER span ``<adapter>/callback/<name>`` under the calling request's span (None
        when not tracing)."""
        if not self.tracing:
            return None
        parent = trace.set_span_in_context(request_span) if request_span is not None else None
        return self.tracer.start_span(
            f"{self.adapter.name}/callback/{name}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={**self._base, Attr.CALLBACK: name},
        )

    def end_callback(self, span: trace.Span | None, name: str, error: BaseException | None) -> None:
        """End a callback's span (errors as for requests) and count it."""
        if span is not None:
            if error is not None:
                code = error_type(error)
                span.set_attribute(Attr.ERROR_TYPE, code)
                span.record_exception(error, escaped=True)
                span.set_status(Status(StatusCode.ERROR, str(error)[:500]))
            span.end()
        if self.metering:
            attributes = {**self._base, Attr.CALLBACK: name}
            if error is not None:
                attributes[Attr.ERROR_TYPE] = error_type(error)
            self.callbacks.add(1, attributes)

    def worker_span(self, name: str, attributes: dict[str, Any]) -> None:
        """A short span for a worker life-cycle event (start, restart, exit)."""
        if not self.tracing:
            return
        span = self.tracer.start_span(name, attributes={**self._base, **attributes})
        span.end()

    def record_restart(self, reason: str) -> None:
        if self.metering:
            self.restarts.add(1, {**self._base, Attr.EXIT_REASON: reason})


def error_type(error: BaseException) -> str:
    """``error.type``: a snakepit error's stable ``code``, else the exception's class name."""
    return str(getattr(error, "code", None) or type(error).__qualname__)
