"""The wire protocol: 4-byte big-endian length, then a UTF-8 JSON object.

Requests are ``{"id", "command", "args"[, "meta"]}``; responses ``{"id", "success", "result"}``
or ``{"id", "success": false, "error"}``. Everything a worker sends that breaks these rules
becomes a :class:`ProtocolError` naming what was wrong, so that worker can be replaced.
orjson is used when installed (``snakepit-core[fast]``), the stdlib codec otherwise or when a
pool's ``json_codec`` asks for it; both accept and produce exactly the same values.
"""

from __future__ import annotations

import json
import math
import reprlib
from typing import Any

from .binary import BINARY_MARK, SegmentReader, decode_binary_body
from .errors import ProtocolError, ValidationError

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
HEADER_BYTES = 4
#: A frame this big that arrives in pieces is assembled in a body of its own size.
LARGE_FRAME_BYTES = 256 * 1024


class Codec:
    """A JSON codec for frames. Both codecs accept and produce the same values.

    ``encode`` takes values already checked by :func:`~snakepit_core.json_values.check_arguments`
    (or built by snakepit itself); ``exact`` asks for the stdlib encoder, for values orjson
    cannot encode exactly. Decoding refuses NaN and Infinity, which are not JSON.
    """

    name = "json"

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)
        self._decoder = json.JSONDecoder(parse_constant=_refuse_constant)

    def encode(self, obj: Any, exact: bool = False) -> bytes:
        return self._encoder.encode(obj).encode("utf-8")

    def decode(self, body: bytes | bytearray) -> Any:
        return self._decoder.decode(body.decode("utf-8"))


class OrjsonCodec(Codec):
    """orjson, with the stdlib codec wherever orjson would give a different answer.

    orjson reads an integer beyond 64 bits as a float: a body with a run of 19 or more digits
    (which is the only way to write one) is decoded by the stdlib codec, exactly. Finding such a
    run costs about a millisecond per megabyte.
    """

    name = "orjson"

    def __init__(self, orjson: Any) -> None:
        super().__init__()
        self._dumps = orjson.dumps
        self._loads = orjson.loads

    def encode(self, obj: Any, exact: bool = False) -> bytes:
        if exact:
            return super().encode(obj)
        try:
            body: bytes = self._dumps(obj)
        except TypeError:  # values snakepit built itself, not checked beforehand
            return super().encode(obj)
        return body

    def decode(self, body: bytes | bytearray) -> Any:
        if _LONG_DIGIT_RUN in body.translate(_DIGIT_MAP):
            return super().decode(body)
        return self._loads(body)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


#: Every digit becomes b"1" and every other byte b"0": a long run of digits is a run of b"1".
_DIGIT_MAP = bytes(49 if 48 <= byte <= 57 else 48 for byte in range(256))
_LONG_DIGIT_RUN = b"1" * 19

STDLIB_CODEC = Codec()
try:  # pragma: no cover - which branch runs depends on the environment
    import orjson as _orjson
except ImportError:  # pragma: no cover
    ORJSON_CODEC: Codec | None = None
else:
    ORJSON_CODEC = OrjsonCodec(_orjson)


def get_codec(name: str = "auto") -> Codec:
    """The codec called ``name``: ``json``, ``orjson``, or ``auto`` (orjson when installed)."""
    if name == "json":
        return STDLIB_CODEC
    if ORJSON_CODEC is not None:
        return ORJSON_CODEC
    if name == "orjson":
        raise ValueError("the orjson codec was asked for but orjson is not installed")
    return STDLIB_CODEC


#: The codec of pools left at ``json_codec = "auto"``.
DEFAULT_CODEC = get_codec()
JSON_CODEC = DEFAULT_CODEC.name


def encode_frame(
    message: dict[str, Any],
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    codec: Codec = DEFAULT_CODEC,
    exact: bool = False,
) -> bytes:
    """Serialize ``message`` into one frame; ``ValidationError`` if it cannot or is too big."""
    try:
        body = codec.encode(message, exact)
    except (TypeError, ValueError, RecursionError) as exc:
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

    __slots__ = (
        "_buffer",
        "_codec",
        "_filled",
        "_large",
        "_segments",
        "defer_from",
        "max_frame_bytes",
        "max_payload_bytes",
    )

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        codec: Codec = DEFAULT_CODEC,
        segments: SegmentReader | None = None,
        max_payload_bytes: int | None = None,
        defer_from: int | None = None,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        #: A message whose values in shared memory add up to this much leaves them unread
        #: (:func:`~snakepit_core.binary.decode_binary_body`); None reads everything.
        self.defer_from = defer_from
        #: Bounds a binary frame with its values in shared memory (None: no bound).
        self.max_payload_bytes = max_payload_bytes
        self._codec = codec
        #: Where the segments named by binary frames are read; None refuses them.
        self._segments = segments
        self._buffer = bytearray()
        #: A large frame's body, allocated at its announced size and filled as reads come.
        self._large: bytearray | None = None
        self._filled = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes received that do not form a whole frame yet (a truncated frame at EOF)."""
        return len(self._buffer) + self._filled

    def feed(self, data: bytes) -> list[Any]:
        if self._large is not None:
            return self._fill(data)
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
                if length >= LARGE_FRAME_BYTES:
                    self._start_large(length)
                break
            body = bytes(buffer[HEADER_BYTES:end])
            del buffer[:end]
            messages.append(self._decode(body))
        return messages

    def _start_large(self, length: int) -> None:
        """The buffer holds the start of a large frame: move it into a body of its full size,
        where the rest is copied as it comes (one copy, instead of appending, slicing and
        copying the whole frame out)."""
        self._large = bytearray(length)
        received = len(self._buffer) - HEADER_BYTES
        self._large[:received] = memoryview(self._buffer)[HEADER_BYTES:]
        self._filled = received
        self._buffer.clear()

    def _fill(self, data: bytes) -> list[Any]:
        body = self._large
        assert body is not None
        taken = min(len(data), len(body) - self._filled)
        body[self._filled : self._filled + taken] = memoryview(data)[:taken]
        self._filled += taken
        if self._filled < len(body):
            return []
        self._large, self._filled = None, 0
        message = self._decode(body)
        rest = data[taken:]
        return [message, *self.feed(rest)] if rest else [message]

    def _decode(self, body: bytes | bytearray) -> Any:
        if body[:1] == BINARY_MARK:
            return decode_binary_body(
                body, self._codec, self._segments, self.max_payload_bytes, self.defer_from
            )
        try:
            message = self._codec.decode(body)
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
            error = _short(error) if error is not None else "worker reported failure"
        return request_id, False, error
    raise ProtocolError(
        f"response 'success' must be true or false: {_short(message)}", cause="bad_envelope"
    )


#: Shows the start of what a worker sent, however deep or big, without recursing.
_preview = reprlib.Repr()
_preview.maxlevel, _preview.maxstring, _preview.maxother, _preview.maxlong = 4, 120, 60, 60


def _short(message: Any) -> str:
    text = _preview.repr(message)
    return text if len(text) <= 200 else text[:200] + "..."


def is_finite_number(value: Any) -> bool:
    """JSON numbers only: NaN and Infinity are not JSON (any int is finite, however big)."""
    kind = type(value)
    if kind is int:
        return True
    if kind is float:
        return math.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)
