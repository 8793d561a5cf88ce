"""Binary values in frames, without base64 (docs/PROTOCOL.md, *Binary values*).

A frame that carries binary values has a body of ``0x00``, a 4-byte length ``J``, ``J`` bytes
of JSON (the envelope, with ``null`` where each binary value belongs and a ``"$binary"`` list
saying where each goes) and then the values' bytes, back to back. Long strings may travel the
same way as their UTF-8 (*text attachments*: no JSON escaping or scanning), and big values of
either kind in shared-memory segments instead of the frame (:mod:`.shm`). Finding these values
costs nothing extra: :func:`~snakepit_core.json_values.check_arguments` records them while it
checks the arguments, and only frames that carry some pay for the rest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .errors import ProtocolError, ValidationError

if TYPE_CHECKING:
    from .protocol import Codec

#: The first byte of a binary frame's body (no JSON text starts with it).
BINARY_MARK = b"\x00"
#: The frame's length prefix, as in every frame.
_LENGTH_BYTES = 4

#: The envelope key that lists the binary values.
BINARY_KEY = "$binary"
_PREFIX = 1 + 4

#: Strings this long (in characters) or longer travel as text attachments to workers that take
#: them: below it, JSON's escaping costs less than a separate value. Workers are told it in
#: ``SNAKEPIT_TEXT_THRESHOLD``.
TEXT_THRESHOLD = 32768

#: Where a binary value is (keys and indexes from the envelope's root), and its bytes.
Path = tuple[str | int, ...]
Binary = tuple[Path, memoryview]


def binary_view(value: Any) -> memoryview | None:
    """``value``'s bytes as a flat view if it is binary (bytes, bytearray, memoryview, or any
    object exporting a contiguous buffer, such as a numpy array); else None.

    Raises ``ValueError`` for a buffer that is not contiguous (a strided numpy slice): it has
    no single run of bytes to send.
    """
    try:
        view = memoryview(value)
    except TypeError:
        return None
    if not view.c_contiguous:
        raise ValueError(
            "is a buffer that is not contiguous (copy it first, e.g. numpy.ascontiguousarray)"
        )
    if view.ndim == 1 and view.format == "B":
        return view
    # An empty array (a zero in its shape) cannot be cast: its bytes are none.
    return view.cast("B") if view.nbytes else memoryview(b"")


def _detached(message: dict[str, Any], attachments: Sequence[Attachment]) -> dict[str, Any]:
    """``message`` with ``None`` at every binary value's place, copying only the containers on
    the way there (the caller's own objects are left as they were)."""
    #: The copy of each container met (by the id of the original and of the copy itself).
    copies: dict[int, Any] = {}

    def own(container: Any) -> Any:
        copied = copies.get(id(container))
        if copied is None:
            copied = dict(container) if isinstance(container, dict) else list(container)
            copies[id(container)] = copies[id(copied)] = copied
        return copied

    root: dict[str, Any] = own(message)
    for attachment in attachments:
        path = attachment.path
        container: Any = root
        for key in path[:-1]:
            child = own(container[key])
            container[key] = child
            container = child
        container[path[-1]] = None
    return root


class Attachment(NamedTuple):
    """A value that travels beside the envelope: binary, or the UTF-8 of a long string."""

    path: Path
    data: memoryview
    #: The bytes are a string's UTF-8 (a text attachment, capability ``text``).
    text: bool = False
    #: The shared-memory segment that holds the bytes (then they are not in the frame).
    segment: str | None = None


class SegmentReader(Protocol):
    """Where the shared-memory segments a worker names are read (:class:`.shm.Segments`)."""

    def read(self, name: str, size: int) -> bytes: ...

    def take(self, name: str, size: int) -> int: ...


#: The key under which :func:`decode_binary_body` leaves the values it did not read.
DEFERRED_KEY = "$deferred"


class Deferred(NamedTuple):
    """A value in shared memory left to be read off the event loop: its segment is open (and
    already deleted), ``fd`` is all that is left of it."""

    path: list[Any]
    fd: int
    size: int
    text: bool
    name: str


def read_deferred(deferred: Sequence[Deferred]) -> list[bytes | str]:
    """The values of ``deferred``, read (on any thread), each descriptor closed."""
    from .shm import read_taken

    values: list[bytes | str] = []
    try:
        for value in deferred:
            data = read_taken(value.fd, value.size, value.name)  # closes it, come what may
            values.append(_text(data, value.path) if value.text else data)
    except BaseException:
        close_deferred(deferred[len(values) + 1 :])
        raise
    return values


def place_deferred(
    message: dict[str, Any], deferred: Sequence[Deferred], values: Sequence[bytes | str]
) -> None:
    """Put the values :func:`read_deferred` read where they belong in ``message``."""
    for value, data in zip(deferred, values, strict=True):
        _place(message, value.path, data)


def close_deferred(deferred: Sequence[Deferred]) -> None:
    """Drop values that will not be read (their segments are gone with the descriptors)."""
    for value in deferred:
        os.close(value.fd)


def check_payload(size: int, max_payload_bytes: int, what: str = "request") -> None:
    """``ValidationError`` if a message of ``size`` bytes in all is over the payload limit."""
    if size > max_payload_bytes:
        raise ValidationError(
            f"{what} is {size} bytes with its binary values, over the maximum payload of "
            f"{max_payload_bytes} bytes (max_payload_bytes)"
        )


def encode_binary_frame(
    message: dict[str, Any],
    attachments: Sequence[Attachment | Binary],
    max_frame_bytes: int,
    codec: Codec,
    exact: bool = False,
    max_payload_bytes: int | None = None,
) -> bytes:
    """One frame of ``message`` whose ``attachments`` (paths from its root) travel as bytes
    after the envelope, or in their segments; ``ValidationError`` if it is too big. A plain
    ``(path, view)`` pair is an inline binary value."""
    parts = [a if isinstance(a, Attachment) else Attachment(a[0], a[1]) for a in attachments]
    envelope = _detached(message, parts)
    envelope[BINARY_KEY] = [_entry_of(attachment) for attachment in parts]
    try:
        head = codec.encode(envelope, exact)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValidationError(f"arguments are not valid JSON: {exc}") from None
    inline = [a.data for a in parts if a.segment is None]
    size = _PREFIX + len(head) + sum(data.nbytes for data in inline)
    if size > max_frame_bytes:
        raise ValidationError(
            f"request is {size} bytes, over the maximum frame size of {max_frame_bytes} bytes"
        )
    if max_payload_bytes is not None:
        check_payload(_PREFIX + len(head) + sum(a.data.nbytes for a in parts), max_payload_bytes)
    header = [size.to_bytes(_LENGTH_BYTES, "big"), BINARY_MARK, len(head).to_bytes(4, "big")]
    return b"".join([*header, head, *inline])


def _entry_of(attachment: Attachment) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": list(attachment.path), "size": attachment.data.nbytes}
    if attachment.text:
        entry["text"] = True
    if attachment.segment is not None:
        entry["shm"] = attachment.segment
    return entry


def decode_binary_body(
    body: bytes | bytearray,
    codec: Codec,
    segments: SegmentReader | None = None,
    max_payload_bytes: int | None = None,
    defer_from: int | None = None,
) -> Any:
    """The message of a binary frame's ``body``, each binary value in its place as ``bytes``
    and each text attachment as ``str``; values in shared memory are read from ``segments``
    (a frame naming one without ``segments`` is refused). When they add up to ``defer_from``
    bytes or more they are not read here: their segments are opened and listed under
    :data:`DEFERRED_KEY` (:func:`read_deferred` reads them, on a thread).

    Anything that does not add up (the lengths, the paths, the ``$binary`` list, the payload
    limit) is a ``ProtocolError``, found before any segment is read; nothing beyond the body
    or a segment is ever read.
    """
    if len(body) < _PREFIX:
        raise ProtocolError("binary frame is shorter than its header", cause="bad_binary")
    end = _PREFIX + int.from_bytes(body[1:_PREFIX], "big")
    if end > len(body):
        raise ProtocolError(
            f"binary frame's envelope of {end - _PREFIX} bytes overruns the frame of {len(body)}",
            cause="bad_binary",
        )
    try:
        message = codec.decode(body[_PREFIX:end])
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(
            f"binary frame's envelope is not valid UTF-8 JSON ({exc})", cause="invalid_json"
        ) from None
    if not isinstance(message, dict):
        raise ProtocolError("binary frame's envelope is not an object", cause="not_an_object")
    raw_entries = message.pop(BINARY_KEY, None)
    if not isinstance(raw_entries, list):
        raise ProtocolError("binary frame has no '$binary' list", cause="bad_binary")
    entries = [_entry(entry, segments) for entry in raw_entries]
    inline = sum(size for _, size, _, segment in entries if segment is None)
    if end + inline > len(body):
        raise ProtocolError(
            f"binary frame's values of {inline} bytes overrun the {len(body) - end} bytes "
            "after its envelope",
            cause="bad_binary",
        )
    if end + inline < len(body):
        raise ProtocolError(
            f"binary frame has {len(body) - end - inline} bytes beyond its values",
            cause="bad_binary",
        )
    if max_payload_bytes is not None:
        total = len(body) + sum(size for _, size, _, segment in entries if segment is not None)
        if total > max_payload_bytes:
            raise ProtocolError(
                f"message of {total} bytes with its values is over the maximum payload of "
                f"{max_payload_bytes} bytes",
                cause="oversized_payload",
            )
    shared = sum(size for _, size, _, segment in entries if segment is not None)
    defer = defer_from is not None and shared >= defer_from
    offset = end
    view = memoryview(body)
    deferred: list[Deferred] = []
    try:
        for path, size, text, segment in entries:
            if segment is None:
                data: bytes | memoryview = view[offset : offset + size]
                offset += size
            elif defer:
                assert segments is not None
                deferred.append(Deferred(path, segments.take(segment, size), size, text, segment))
                continue
            else:
                assert segments is not None
                data = segments.read(segment, size)
            _place(message, path, _text(data, path) if text else bytes(data))  # one copy
    except BaseException:
        close_deferred(deferred)
        raise
    if deferred:
        message[DEFERRED_KEY] = deferred
    return message


def _text(data: bytes | memoryview, path: list[Any]) -> str:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            f"text value at {path} is not UTF-8 ({exc.reason} at byte {exc.start})",
            cause="bad_binary",
        ) from None


def _entry(entry: Any, segments: SegmentReader | None) -> tuple[list[Any], int, bool, str | None]:
    """A ``$binary`` entry's path, size, whether it is text, and its segment (or None)."""
    if not isinstance(entry, dict):
        raise ProtocolError(f"'$binary' entry {entry!r} is not an object", cause="bad_binary")
    path, size = entry.get("path"), entry.get("size")
    if not isinstance(path, list) or not path or type(size) is not int or size < 0:
        raise ProtocolError(
            f"'$binary' entry needs a non-empty 'path' and a 'size' >= 0: {entry!r}"[:300],
            cause="bad_binary",
        )
    segment = entry.get("shm")
    if segment is not None:
        if segments is None:
            raise ProtocolError(
                "'$binary' entry names a shared-memory segment, which this pool did not offer",
                cause="bad_segment",
            )
        if type(segment) is not str:
            raise ProtocolError(
                f"'$binary' entry's 'shm' is not a name: {entry!r}"[:300], cause="bad_segment"
            )
    return path, size, entry.get("text") is True, segment


def _place(message: dict[str, Any], path: list[Any], value: bytes | str) -> None:
    """Put ``value`` where ``path`` leads; that place must hold ``null``."""
    container: Any = message
    for key in path[:-1]:
        container = _step(container, key, path)
    last = path[-1]
    if _step(container, last, path) is not None:
        raise ProtocolError(f"binary value's path {path} does not lead to null", cause="bad_binary")
    container[last] = value


def _step(container: Any, key: Any, path: list[Any]) -> Any:
    if isinstance(container, dict) and type(key) is str and key in container:
        return container[key]
    if isinstance(container, list) and type(key) is int and 0 <= key < len(container):
        return container[key]
    raise ProtocolError(f"binary value's path {path} leads nowhere", cause="bad_binary")
