"""``PoolConfig``: every tunable of a pool, with the seed's defaults, validated on creation.

All durations are seconds (floats). Nonsense raises :class:`ConfigError` naming the key and,
when the value came from a file or the environment, its source.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, fields
from typing import Any, TypedDict
from urllib.parse import urlsplit

from .errors import ConfigError
from .protocol import DEFAULT_MAX_FRAME_BYTES, get_codec
from .urls import redacted

#: Values of this many bytes or more go through shared memory: the break-even point measured
#: on the 2-core machine (BENCHMARKS.md, "Large payloads": the pipe wins at 32 KiB, shared memory at
#: 64 KiB).
DEFAULT_SHM_THRESHOLD = 64 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30

AFFINITY_MODES: tuple[str, ...] = ("prefer", "strict", "strict_fail_fast")
SESSION_BACKENDS: tuple[str, ...] = ("memory", "redis")
#: What ``redis_key_prefix`` may contain.
KEY_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9:_.\-]*")
#: What ``node_id`` may be: the same characters, 1 to 200 of them.
NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9:_.\-]{1,200}")
JSON_CODECS: tuple[str, ...] = ("auto", "orjson", "json")
WORKER_OUTPUTS: tuple[str, ...] = ("stderr", "logging")


def _default_pool_size() -> int:
    return (os.cpu_count() or 1) * 2


@dataclass(frozen=True)
class PoolConfig:
    """Configuration of one pool. Build with keywords; ``replace()`` for variants."""

    pool_size: int = dataclasses.field(default_factory=_default_pool_size)
    pool_startup_timeout: float = 10.0
    pool_queue_timeout: float = 5.0
    pool_max_queue_size: int = 1000
    worker_init_timeout: float = 20.0
    worker_health_check_interval: float = 30.0
    worker_health_check_misses: int = 3
    worker_shutdown_grace_period: float = 2.0
    cleanup_retry_interval: float = 0.1
    cleanup_max_retries: int = 10
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    #: Binary values and long strings of this many bytes or more travel through shared memory
    #: (tmpfs) instead of the pipe, where workers take it; None keeps everything on the pipe.
    #: The default is lowered to ``max_frame_bytes`` where that is smaller.
    shm_threshold_bytes: int | None = DEFAULT_SHM_THRESHOLD
    #: Bounds one request or response with all its values, shared memory included.
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    #: Callbacks one worker may have running in the host at once; more are refused.
    max_pending_callbacks: int = 64
    #: Requests in flight per worker (protocol 2 bridges; protocol-1 bridges take one).
    worker_concurrency: int = 1
    #: Items a worker may stream ahead of the consumer (``execute_stream``'s backpressure).
    stream_window: int = 64
    #: ``auto`` (orjson when installed), ``orjson`` or ``json``; both accept the same values.
    json_codec: str = "auto"
    #: Where workers' stderr goes: ``stderr`` (the parent's, each line prefixed ``[worker-id]``)
    #: or ``logging`` (logger ``snakepit.worker.stderr``, INFO). Crash errors carry the last
    #: lines either way.
    worker_output: str = "stderr"
    #: How long a worker may take to answer ``$cancel`` before it is killed and replaced.
    cancel_grace_period: float = 0.5
    #: Recycling: 0 / None means off.
    max_requests_per_worker: int = 0
    max_worker_memory_mb: float | None = None
    #: Crash-loop breaker: this many early deaths in a row open it; probes every interval.
    crash_loop_threshold: int = 5
    crash_loop_probe_interval: float = 5.0
    restart_backoff_initial: float = 0.1
    restart_backoff_max: float = 5.0
    #: Sessions: ``memory`` (this process) or ``redis`` (shared by every host using the same
    #: ``redis_url``, keys under ``redis_key_prefix``; ``pip install 'snakepit-core[redis]'``).
    session_backend: str = "memory"
    #: Not in ``repr``: it may hold a password.
    redis_url: str = dataclasses.field(default="redis://127.0.0.1:6379/0", repr=False)
    redis_key_prefix: str = "snakepit:"
    session_affinity: str = "prefer"
    session_ttl: float = 3600.0
    session_cleanup_interval: float = 60.0
    global_program_ttl: float = 3600.0
    #: This pool's name among the hosts sharing sessions; None: ``<hostname>-<pid>``, taken
    #: when the pool starts (so a fork child's pool gets its own).
    node_id: str | None = None
    #: How often the pool renews its heartbeat (and reads its ``clear_session`` inbox), and
    #: how long the heartbeat lasts: a node silent for ``node_ttl`` loses its sessions.
    node_heartbeat_interval: float = 5.0
    node_ttl: float = 15.0
    #: Window of recent requests used for p50/p99 in ``stats()``.
    latency_window: int = 1024

    def __post_init__(self) -> None:
        validate_config(self, source="arguments")

    @property
    def shm_threshold(self) -> int | None:
        """The threshold in force: ``shm_threshold_bytes``, at most ``max_frame_bytes``."""
        threshold = self.shm_threshold_bytes
        return None if threshold is None else min(threshold, self.max_frame_bytes)

    def replace(self, **changes: Any) -> PoolConfig:
        """A copy with ``changes`` applied (unknown keys raise ``ConfigError``)."""
        check_keys(changes, source="arguments")
        return dataclasses.replace(self, **changes)


class PoolOptions(TypedDict, total=False):
    """The keyword overrides ``Pool(adapter, **options)`` accepts: every ``PoolConfig`` field.

    With ``Unpack[PoolOptions]`` a type checker rejects a misspelled key (``pool_sise=2``);
    a test keeps this in step with ``PoolConfig``.
    """

    pool_size: int
    pool_startup_timeout: float
    pool_queue_timeout: float
    pool_max_queue_size: int
    worker_init_timeout: float
    worker_health_check_interval: float
    worker_health_check_misses: int
    worker_shutdown_grace_period: float
    cleanup_retry_interval: float
    cleanup_max_retries: int
    max_frame_bytes: int
    shm_threshold_bytes: int | None
    max_payload_bytes: int
    max_pending_callbacks: int
    worker_concurrency: int
    stream_window: int
    json_codec: str
    worker_output: str
    cancel_grace_period: float
    max_requests_per_worker: int
    max_worker_memory_mb: float | None
    crash_loop_threshold: int
    crash_loop_probe_interval: float
    restart_backoff_initial: float
    restart_backoff_max: float
    session_backend: str
    redis_url: str
    redis_key_prefix: str
    session_affinity: str
    session_ttl: float
    session_cleanup_interval: float
    global_program_ttl: float
    node_id: str | None
    node_heartbeat_interval: float
    node_ttl: float
    latency_window: int


FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(PoolConfig)}

_POSITIVE_INTS = (
    "pool_size",
    "worker_concurrency",
    "stream_window",
    "cleanup_max_retries",
    "worker_health_check_misses",
    "crash_loop_threshold",
    "latency_window",
    "max_frame_bytes",
    "max_payload_bytes",
    "max_pending_callbacks",
)
_NON_NEGATIVE_INTS = ("pool_max_queue_size", "max_requests_per_worker")
_POSITIVE_FLOATS = (
    "pool_startup_timeout",
    "pool_queue_timeout",
    "worker_init_timeout",
    "worker_health_check_interval",
    "cleanup_retry_interval",
    "cancel_grace_period",
    "crash_loop_probe_interval",
    "restart_backoff_initial",
    "restart_backoff_max",
    "session_ttl",
    "session_cleanup_interval",
    "global_program_ttl",
    "node_heartbeat_interval",
    "node_ttl",
)
_NON_NEGATIVE_FLOATS = ("worker_shutdown_grace_period",)


def check_keys(values: dict[str, Any], *, source: str) -> None:
    """Refuse keys that are not ``PoolConfig`` fields, suggesting the valid ones."""
    unknown = sorted(set(values) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(
            f"unknown configuration key {unknown[0]!r} (from {source}); "
            f"valid keys: {', '.join(sorted(FIELD_TYPES))}",
            key=unknown[0],
            source=source,
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_config(config: PoolConfig, *, source: str) -> None:
    """Raise ``ConfigError`` for the first nonsensical value, naming key and source."""

    def fail(key: str, rule: str) -> None:
        value = getattr(config, key)
        raise ConfigError(
            f"configuration key {key!r} = {value!r} (from {source}): {rule}",
            key=key,
            source=source,
        )

    for key in _POSITIVE_INTS:
        if not _is_int(getattr(config, key)) or getattr(config, key) < 1:
            fail(key, "must be an integer >= 1")
    for key in _NON_NEGATIVE_INTS:
        if not _is_int(getattr(config, key)) or getattr(config, key) < 0:
            fail(key, "must be an integer >= 0")
    for key in _POSITIVE_FLOATS:
        if not _is_number(getattr(config, key)) or not getattr(config, key) > 0:
            fail(key, "must be a number of seconds > 0")
    for key in _NON_NEGATIVE_FLOATS:
        if not _is_number(getattr(config, key)) or getattr(config, key) < 0:
            fail(key, "must be a number of seconds >= 0")
    memory = config.max_worker_memory_mb
    if memory is not None and (not _is_number(memory) or memory <= 0):
        fail("max_worker_memory_mb", "must be a number of MiB > 0, or None for no limit")
    threshold = config.shm_threshold_bytes
    if threshold is not None and (
        not _is_int(threshold)
        or threshold < 1
        or (threshold > config.max_frame_bytes and threshold != DEFAULT_SHM_THRESHOLD)
    ):
        fail(
            "shm_threshold_bytes",
            f"must be an integer from 1 to max_frame_bytes ({config.max_frame_bytes}), or None"
            " for no shared memory",
        )
    if config.max_payload_bytes < config.max_frame_bytes:
        fail(
            "max_payload_bytes",
            f"must be at least max_frame_bytes ({config.max_frame_bytes}): a payload is one"
            " frame and its values in shared memory",
        )
    if config.session_backend not in SESSION_BACKENDS:
        fail("session_backend", f"must be one of {', '.join(SESSION_BACKENDS)}")
    if not isinstance(config.redis_key_prefix, str) or not KEY_PREFIX_PATTERN.fullmatch(
        config.redis_key_prefix
    ):
        fail("redis_key_prefix", "only letters, digits and ':_.-' are allowed")
    if not isinstance(config.redis_url, str) or urlsplit(config.redis_url).scheme not in (
        "redis",
        "rediss",
        "unix",
    ):
        raise ConfigError(
            f"configuration key 'redis_url' = {redacted(str(config.redis_url))!r} (from "
            f"{source}): must be a redis://, rediss:// or unix:// URL",
            key="redis_url",
            source=source,
        )
    if config.node_id is not None and (
        not isinstance(config.node_id, str) or not NODE_ID_PATTERN.fullmatch(config.node_id)
    ):
        fail("node_id", "must be 1 to 200 letters, digits and ':_.-', or None for <hostname>-<pid>")
    if config.node_ttl <= config.node_heartbeat_interval:
        fail(
            "node_ttl",
            f"must be longer than node_heartbeat_interval ({config.node_heartbeat_interval}),"
            " or a node would go silent between two heartbeats",
        )
    if config.session_affinity not in AFFINITY_MODES:
        fail("session_affinity", f"must be one of {', '.join(AFFINITY_MODES)}")
    if config.worker_output not in WORKER_OUTPUTS:
        fail("worker_output", f"must be one of {', '.join(WORKER_OUTPUTS)}")
    if config.json_codec not in JSON_CODECS:
        fail("json_codec", f"must be one of {', '.join(JSON_CODECS)}")
    try:
        get_codec(config.json_codec)
    except ValueError as exc:
        fail("json_codec", f"{exc} (pip install 'snakepit-core[fast]')")
