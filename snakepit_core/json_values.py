"""What may be sent to a worker: exactly the values the standard library's ``json`` encodes.

Arguments are checked here, before a worker is taken, so that what a pool accepts never depends
on the JSON codec installed (orjson encodes UUIDs, datetimes and dataclasses, writes NaN as
``null`` and stops at 64-bit integers; the stdlib codec refuses the first three and encodes big
integers exactly) and so that a bad value is refused with the path of the value at fault instead
of failing somewhere inside a codec. The walk is iterative, so arguments nested deeper than the
interpreter's recursion limit are refused with a clear message rather than a ``RecursionError``.

The check also tells the codec whether orjson can encode the value exactly: it cannot for
integers beyond 64 bits, non-string keys (which ``json`` turns into strings its own way),
subclasses of the JSON types, and nesting deeper than orjson's limit. Binary values (bytes,
bytearray, memoryview, any contiguous buffer such as a numpy array) are accepted anywhere and
listed with their paths, for the binary frame (:mod:`.binary`), and so are long strings (text
attachments).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, NoReturn

from .binary import TEXT_THRESHOLD, Binary, binary_view
from .errors import ValidationError

#: Arguments nested deeper than this are refused (every bundled bridge decodes this depth).
MAX_NESTING = 512
#: orjson refuses to encode values nested this deep or deeper; the stdlib encoder takes over.
ORJSON_MAX_NESTING = 254
#: orjson encodes integers in [-2**63, 2**64) exactly; others need the stdlib encoder.
_ORJSON_MIN_INT = -(2**63)
_ORJSON_MAX_INT = 2**64 - 1

_KEY_TYPES = (str, int, float)  # bool is an int; None is checked on its own


class CheckedArguments(NamedTuple):
    """What :func:`check_arguments` found out about arguments it accepted."""

    #: orjson cannot encode them exactly: the stdlib encoder must.
    exact: bool
    #: Their binary values (bytes, buffers), each with its path from ``args``, in the order
    #: met; empty for plain JSON.
    binary: Sequence[Binary]
    #: Their strings of :data:`~.binary.TEXT_THRESHOLD` characters or more, with their
    #: paths: a worker that takes text attachments gets them as UTF-8, not JSON.
    texts: Sequence[tuple[tuple[str | int, ...], str]] = ()


#: What empty arguments are.
PLAIN = CheckedArguments(False, ())


def check_arguments(args: dict[str, Any], *, adapter: str, command: str) -> CheckedArguments:
    """Refuse anything stdlib ``json`` would not encode, binary values apart.

    Raises :class:`ValidationError` with ``field`` set to the path of the offending value
    (``args.items[3].when``) and ``rule`` ``"json"``. A binary value is not walked (its size
    does not matter here).
    """
    needs_stdlib = False
    binary: list[Binary] = []
    texts: list[tuple[tuple[str | int, ...], str]] = []
    # Only containers go on the stack; scalars are checked where they are met.
    stack: list[tuple[Any, tuple[Any, ...]]] = [(args, ())]
    while stack:
        container, path = stack.pop()
        depth = len(path) + 1
        if depth > MAX_NESTING:
            _refuse(
                adapter,
                command,
                path,
                f"is nested more than {MAX_NESTING} levels deep (a circular reference?)",
            )
        if depth >= ORJSON_MAX_NESTING:
            needs_stdlib = True
        if isinstance(container, dict):
            entries: Iterable[tuple[Any, Any]] = container.items()
            for key in container:
                if type(key) is not str:
                    _check_key(key, adapter, command, path)
                    needs_stdlib = True
        else:
            entries = enumerate(container)
        for key, value in entries:
            kind = type(value)
            if kind is str:
                if len(value) >= TEXT_THRESHOLD:
                    texts.append(((*path, key), value))
                continue
            if kind is bool or value is None:
                continue
            if kind is int:
                if not _ORJSON_MIN_INT <= value <= _ORJSON_MAX_INT:
                    needs_stdlib = True
            elif kind is float:
                if not math.isfinite(value):
                    _refuse(adapter, command, (*path, key), f"is {value!r}, not a finite number")
            elif kind is dict or kind is list or kind is tuple:
                stack.append((value, (*path, key)))
            elif isinstance(value, str | int | float | dict | list | tuple):
                # A subclass (IntEnum, a str subclass, a namedtuple): json encodes it as its
                # base type, orjson not always the same way.
                needs_stdlib = True
                if isinstance(value, float) and not math.isfinite(value):
                    _refuse(adapter, command, (*path, key), f"is {value!r}, not a finite number")
                if isinstance(value, dict | list | tuple):
                    stack.append((value, (*path, key)))
            else:
                view = _binary(value, adapter, command, (*path, key))
                if view is None:
                    _refuse(
                        adapter,
                        command,
                        (*path, key),
                        f"is a {_type_name(kind)}, which is not JSON "
                        "(send a str, number, bool, None, list, dict or bytes)",
                    )
                binary.append(((*path, key), view))
    return CheckedArguments(needs_stdlib, binary, texts)


def _binary(value: Any, adapter: str, command: str, path: tuple[Any, ...]) -> memoryview | None:
    try:
        return binary_view(value)
    except ValueError as problem:
        _refuse(adapter, command, path, str(problem))


def _check_key(key: Any, adapter: str, command: str, path: tuple[Any, ...]) -> None:
    """json turns int, float, bool and None keys into strings; any other key is refused."""
    if key is None or isinstance(key, _KEY_TYPES):
        if isinstance(key, float) and not math.isfinite(key):
            _refuse(adapter, command, path, f"has the key {key!r}, not a finite number")
        return
    _refuse(
        adapter,
        command,
        path,
        f"has a key of type {type(key).__qualname__} ({key!r}); object keys must be strings",
    )


def format_path(path: tuple[Any, ...]) -> str:
    """``args.items[3].when`` for ``("items", 3, "when")``."""
    text = "args"
    for part in path:
        text += f"[{part}]" if isinstance(part, int) and not isinstance(part, bool) else f".{part}"
    return text


def _type_name(kind: type) -> str:
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _refuse(adapter: str, command: str, path: tuple[Any, ...], problem: str) -> NoReturn:
    field = format_path(path)
    shown = field if len(field) <= 100 else f"{field[:60]}...{field[-30:]}"
    raise ValidationError(
        f"adapter {adapter!r}: {command}: {shown} {problem} (rule: json)",
        adapter=adapter,
        command=command,
        field=field,
        rule="json",
    )
