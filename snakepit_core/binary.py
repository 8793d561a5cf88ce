"""Binary values in frames, without base64 (docs/PROTOCOL.md, *Binary values*).

A frame that carries binary values has a body of ``0x00``, a 4-byte length ``J``, ``J`` bytes
of JSON (the envelope, with ``null`` where each binary value belongs and a ``"$binary"`` list
saying where each goes) and then the values' bytes, back to back. Finding where binary values
are costs nothing extra: :func:`~snakepit_core.json_values.check_arguments` records them while
it checks the arguments, and only frames that carry some pay for the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


def _detached(message: dict[str, Any], binary: Sequence[Binary]) -> dict[str, Any]:
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
    for path, _ in binary:
        container: Any = root
        for key in path[:-1]:
            child = own(container[key])
            container[key] = child
            container = child
        container[path[-1]] = None
    return root


def encode_binary_frame(
    message: dict[str, Any],
    binary: Sequence[Binary],
    max_frame_bytes: int,
    codec: Codec,
    exact: bool = False,
) -> bytes:
    """One frame of ``message`` whose ``binary`` values (paths from its root) travel as bytes
    after the envelope; ``ValidationError`` if it is too big."""
    envelope = _detached(message, binary)
    envelope[BINARY_KEY] = [{"path": list(path), "size": view.nbytes} for path, view in binary]
    try:
        head = codec.encode(envelope, exact)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValidationError(f"arguments are not valid JSON: {exc}") from None
    size = _PREFIX + len(head) + sum(view.nbytes for _, view in binary)
    if size > max_frame_bytes:
        raise ValidationError(
            f"request is {size} bytes, over the maximum frame size of {max_frame_bytes} bytes"
        )
    return b"".join(
        [
            size.to_bytes(_LENGTH_BYTES, "big"),
            BINARY_MARK,
            len(head).to_bytes(4, "big"),
            head,
            *(view for _, view in binary),
        ]
    )


def decode_binary_body(body: bytes | bytearray, codec: Codec) -> Any:
    """The message of a binary frame's ``body``, each binary value in its place as ``bytes``.

    Anything that does not add up (the lengths, the paths, the ``$binary`` list) is a
    ``ProtocolError``; nothing beyond the body is ever read.
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
    entries = message.pop(BINARY_KEY, None)
    if not isinstance(entries, list):
        raise ProtocolError("binary frame has no '$binary' list", cause="bad_binary")
    offset = end
    view = memoryview(body)
    for entry in entries:
        path, size = _entry(entry)
        if offset + size > len(body):
            raise ProtocolError(
                f"binary value at {path} of {size} bytes overruns the frame", cause="bad_binary"
            )
        _place(message, path, bytes(view[offset : offset + size]))  # one copy, as bytes
        offset += size
    if offset != len(body):
        raise ProtocolError(
            f"binary frame has {len(body) - offset} bytes beyond its values", cause="bad_binary"
        )
    return message


def _entry(entry: Any) -> tuple[list[Any], int]:
    if not isinstance(entry, dict):
        raise ProtocolError(f"'$binary' entry {entry!r} is not an object", cause="bad_binary")
    path, size = entry.get("path"), entry.get("size")
    if not isinstance(path, list) or not path or type(size) is not int or size < 0:
        raise ProtocolError(
            f"'$binary' entry needs a non-empty 'path' and a 'size' >= 0: {entry!r}"[:300],
            cause="bad_binary",
        )
    if "shm" in entry:
        raise ProtocolError(
            "'$binary' entry names a shared-memory segment, which this pool did not offer",
            cause="bad_binary",
        )
    return path, size


def _place(message: dict[str, Any], path: list[Any], value: bytes) -> None:
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
