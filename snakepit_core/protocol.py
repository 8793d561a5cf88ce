"""The wire protocol: 4-byte big-endian length, then a UTF-8 JSON object.

Requests are ``{"id", "command", "args"[, "meta"]}``; responses ``{"id", "success", "result"}``
or ``{"id", "success": false, "error"}``. Everything a worker sends that breaks these rules
becomes a :class:`ProtocolError` naming what was wrong, so that worker can be replaced.
orjson is used when installed (``snakepit-core[fast]``); the stdlib codec otherwise, or when
``SNAKEPIT_JSON=stdlib`` asks for it (to measure the difference).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

from .errors import ProtocolError, ValidationError

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
HEADER_BYTES = 4

try:  # pragma: no cover - which branch runs depends on the environment
    if os.environ.get("SNAKEPIT_JSON") == "stdlib":
        raise ImportError("the stdlib JSON codec was asked for")
    import orjson

    _orjson_dumps = orjson.dumps
    _loads: Callable[[bytes], Any] = orjson.loads
    JSON_CODEC = "orjson"

    def _dumps(obj: Any) -> bytes:
        body: bytes = _orjson_dumps(obj)
        # orjson writes NaN and Infinity as null; the stdlib codec refuses them, as we must.
        if b"null" in body:
            json.dumps(obj, allow_nan=False)
        return body

except ImportError:  # pragma: no cover
    _stdlib_encoder = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    _loads = json.loads
    JSON_CODEC = "json"

    def _dumps(obj: Any) -> bytes:
        return _stdlib_encoder.encode(obj).encode("utf-8")


def encode_frame(message: dict[str, Any], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Serialize ``message`` into one frame; ``ValidationError`` if it cannot or is too big."""
    try:
        body = _dumps(message)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"arguments are not valid JSON: {exc}") from None
    if len(body) > max_frame_bytes:
        raise ValidationError(
            f"request is {len(body)} bytes, over the maximum frame size of {max_frame_bytes} bytes"
        )
    return len(body).to_bytes(HEADER_BYTES, "big") + body


def _describe(data: bytes | bytearray) -> str:
    preview = bytes(data[:40])
    return f"{preview!r}{'...' if len(data) > 40 else ''}"


class FrameDecoder:
    """Turns a byte stream into decoded JSON objects, incrementally.

    ``feed`` returns the complete messages in the bytes so far. The common case, one whole
    frame per read, is decoded without copying into the buffer.
    """

    __slots__ = ("_buffer", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()

    @property
    def pending_bytes(self) -> int:
        """Bytes received that do not form a whole frame yet (a truncated frame at EOF)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Any]:
        if not self._buffer:
            size = len(data)
            if size >= HEADER_BYTES:
                length = int.from_bytes(data[:HEADER_BYTES], "big")
                if size == length + HEADER_BYTES and length <= self.max_frame_bytes:
                    return [self._decode(data[HEADER_BYTES:])]
        self._buffer += data
        return self._drain()

    def _drain(self) -> list[Any]:
        buffer = self._buffer
        messages = []
        while len(buffer) >= HEADER_BYTES:
            length = int.from_bytes(buffer[:HEADER_BYTES], "big")
            if length > self.max_frame_bytes:
                raise ProtocolError(
                    f"frame length {length} is over the maximum of {self.max_frame_bytes} bytes "
                    f"(stream starts {_describe(buffer)}: is something printing to stdout?)",
                    cause="oversized_frame",
                )
            end = HEADER_BYTES + length
            if len(buffer) < end:
                break
            body = bytes(buffer[HEADER_BYTES:end])
            del buffer[:end]
            messages.append(self._decode(body))
        return messages

    @staticmethod
    def _decode(body: bytes) -> Any:
        try:
            message = _loads(body)
        except (ValueError, RecursionError) as exc:  # every codec's errors, deep nesting
            raise ProtocolError(
                f"frame is not valid UTF-8 JSON ({exc}): {_describe(body)}", cause="invalid_json"
            ) from None
        if not isinstance(message, dict):
            raise ProtocolError(
                f"frame is JSON but not an object: {_describe(body)}", cause="not_an_object"
            )
        return message


def check_response(message: dict[str, Any]) -> tuple[int, bool, Any]:
    """Return ``(id, success, result_or_error)`` of a response, or raise ``ProtocolError``."""
    request_id = message.get("id")
    if type(request_id) is not int:
        raise ProtocolError(f"response has no integer 'id': {_short(message)}", cause="missing_id")
    success = message.get("success")
    if success is True:
        if "result" not in message:
            raise ProtocolError(
                f"success response has no 'result': {_short(message)}", cause="bad_envelope"
            )
        return request_id, True, message["result"]
    if success is False:
        error = message.get("error")
        if not isinstance(error, str):
            error = json.dumps(error) if error is not None else "worker reported failure"
        return request_id, False, error
    raise ProtocolError(
        f"response 'success' must be true or false: {_short(message)}", cause="bad_envelope"
    )


def _short(message: Any) -> str:
    text = repr(message)
    return text if len(text) <= 200 else text[:200] + "..."


def is_finite_number(value: Any) -> bool:
    """JSON numbers only: NaN and Infinity are not JSON."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
