"""Counters and a latency window for ``Pool.stats()``."""

from __future__ import annotations

from collections import deque
from typing import Any


class PoolCounters:
    """Totals since start plus the durations of the most recent requests."""

    __slots__ = (
        "_latencies",
        "callback_errors",
        "callbacks",
        "errors",
        "pool_saturated",
        "queue_timeouts",
        "requests",
        "stream_items",
        "streams",
    )

    def __init__(self, window: int) -> None:
        self.requests = 0
        #: Streaming calls started (counted in ``requests`` too) and the items they delivered.
        self.streams = 0
        self.stream_items = 0
        #: Callbacks workers called (and how many of them failed).
        self.callbacks = 0
        self.callback_errors = 0
        self.errors = 0
        self.queue_timeouts = 0
        self.pool_saturated = 0
        self._latencies: deque[float] = deque(maxlen=window)

    def record_latency(self, seconds: float) -> None:
        self._latencies.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        ordered = sorted(self._latencies)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "queue_timeouts": self.queue_timeouts,
            "pool_saturated": self.pool_saturated,
            "streams": self.streams,
            "stream_items": self.stream_items,
            "callbacks": self.callbacks,
            "callback_errors": self.callback_errors,
            "latency_p50": _percentile(ordered, 0.50),
            "latency_p99": _percentile(ordered, 0.99),
        }


def _percentile(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]
