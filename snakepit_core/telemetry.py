"""OpenTelemetry spans and metrics for a pool, through the API only.

Attribute names live in :class:`Attr`. When no SDK is configured (and no provider was passed
in) nothing is created per request, so the cost is one check. With an SDK, each execute gets a
CLIENT span named ``<adapter>/<command>`` following the RPC conventions, and its context goes
to the worker in the request's ``meta`` as W3C ``traceparent``/``tracestate``.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .adapter import Adapter

INSTRUMENTATION_NAME = "snakepit"
#: The version of the distribution that holds this module, as OpenTelemetry expects.
INSTRUMENTATION_VERSION = version("snakepit-core")
OTHER_COMMAND = "_OTHER"


class Attr:
    """Every attribute name snakepit emits, in one place."""

    RPC_SYSTEM = "rpc.system"
    RPC_SERVICE = "rpc.service"
    RPC_METHOD = "rpc.method"
    ERROR_TYPE = "error.type"
    ADAPTER = "snakepit.adapter"
    COMMAND = "snakepit.command"
    WORKER_ID = "snakepit.worker.id"
    WORKER_PID = "snakepit.worker.pid"
    SESSION_ID = "snakepit.session.id"
    QUEUE_WAIT = "snakepit.queue_wait"
    EXECUTION_TIME = "snakepit.execution_time"
    PROCESS_PID = "process.pid"
    PROCESS_EXIT_CODE = "process.exit.code"
    EXIT_REASON = "snakepit.worker.exit_reason"
    STARTUP_TIME = "snakepit.worker.startup_time"


RPC_SYSTEM_VALUE = "snakepit"


def _sdk_configured(provider: Any, default_types: tuple[type, ...]) -> bool:
    return not isinstance(provider, default_types)


_DEFAULT_TRACER_PROVIDERS = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
_DEFAULT_METER_PROVIDERS: tuple[type, ...] = (metrics.NoOpMeterProvider,)
try:  # the proxy class is private in the API; tolerate its absence
    from opentelemetry.metrics._internal import _ProxyMeterProvider

    _DEFAULT_METER_PROVIDERS += (_ProxyMeterProvider,)
except ImportError:  # pragma: no cover
    pass


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
            INSTRUMENTATION_NAME, INSTRUMENTATION_VERSION, tracer_provider=tracer_provider
        )
        meter = metrics.get_meter(
            INSTRUMENTATION_NAME, INSTRUMENTATION_VERSION, meter_provider=meter_provider
        )
        self.duration = meter.create_histogram(
            "rpc.client.call.duration", unit="s", description="Duration of snakepit calls"
        )
        self.requests = meter.create_counter(
            "snakepit.requests", unit="{request}", description="Requests by command"
        )
        self.errors = meter.create_counter(
            "snakepit.errors", unit="{error}", description="Failed requests by command and code"
        )
        self.restarts = meter.create_counter(
            "snakepit.worker.restarts", unit="{restart}", description="Worker replacements"
        )
        self._base = {Attr.RPC_SYSTEM: RPC_SYSTEM_VALUE, Attr.ADAPTER: adapter.name}
        self.tracing = False
        self.metering = False
        self.refresh()
        self._gauge_source: Any = None
        meter.create_observable_gauge(
            "snakepit.pool.queue_depth", callbacks=[self._observe("queued")], unit="{request}"
        )
        meter.create_observable_gauge(
            "snakepit.pool.busy_workers", callbacks=[self._observe("busy")], unit="{worker}"
        )
        meter.create_observable_gauge(
            "snakepit.pool.available_workers",
            callbacks=[self._observe("available")],
            unit="{worker}",
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
        self.tracing = self._explicit_tracing or _sdk_configured(
            trace.get_tracer_provider(), _DEFAULT_TRACER_PROVIDERS
        )
        self.metering = self._explicit_metrics or _sdk_configured(
            metrics.get_meter_provider(), _DEFAULT_METER_PROVIDERS
        )

    def method_name(self, command: str) -> str:
        commands = self.adapter.commands
        return command if commands is not None and command in commands else OTHER_COMMAND

    def start_request(self, command: str, session_id: str | None) -> trace.Span:
        method = self.method_name(command)
        attributes: dict[str, Any] = {
            **self._base,
            Attr.RPC_SERVICE: self.adapter.name,
            Attr.RPC_METHOD: method,
            Attr.COMMAND: command,
        }
        if session_id is not None:
            attributes[Attr.SESSION_ID] = session_id
        return self.tracer.start_span(
            f"{self.adapter.name}/{method}", kind=SpanKind.CLIENT, attributes=attributes
        )

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
    def end_request(span: trace.Span, execution_time: float, error: BaseException | None) -> None:
        span.set_attribute(Attr.EXECUTION_TIME, execution_time)
        if error is not None:
            code = getattr(error, "code", type(error).__name__)
            span.set_attribute(Attr.ERROR_TYPE, code)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)[:500]))
        span.end()

    def record_metrics(self, command: str, duration: float, error: BaseException | None) -> None:
        attributes = {**self._base, Attr.RPC_METHOD: self.method_name(command)}
        self.requests.add(1, attributes)
        if error is not None:
            attributes[Attr.ERROR_TYPE] = getattr(error, "code", type(error).__name__)
            self.errors.add(1, attributes)
        self.duration.record(duration, attributes)

    def worker_span(self, name: str, attributes: dict[str, Any]) -> None:
        """A short span for a worker life-cycle event (start, restart, exit)."""
        if not self.tracing:
            return
        span = self.tracer.start_span(name, attributes={**self._base, **attributes})
        span.end()

    def record_restart(self, reason: str) -> None:
        if self.metering:
            self.restarts.add(1, {**self._base, Attr.EXIT_REASON: reason})
