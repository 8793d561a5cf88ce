"""The built-in commands of docs/PROTOCOL.md, registered with the bridge library on import.

The bundled bridge (``bridge.py``) serves them; a custom worker may import this module to offer
them beside its own commands. The pool validates ``args`` against the shared JSON Schemas
first, but every handler still refuses bad input with a ``CommandError``, so a caller that
bypasses validation gets ``success: false``, never a dead worker. Quick handlers are
registered with ``cancellable=False``: one request at a time they skip the per-request cancel
set-up, and in a concurrent worker (protocol 2) they run on the reading thread, in arrival
order, so the session commands never race each other over ``_SESSIONS``.
"""

from __future__ import annotations

import json
import math
import operator
import os
import sys

import snakepit_python

from . import CallbackError, CommandError, Context, command
from ._library import status

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of the worker's start-up
    from collections.abc import AsyncIterator, Callable
    from typing import Any, TypeGuard

#: Floats below this magnitude that are integral are sent as JSON integers, as JavaScript's
#: JSON.stringify writes them; from 1e21 on JavaScript switches to exponent notation.
_JS_EXPONENT_THRESHOLD = 1e21
_ARITHMETIC = {"add": operator.add, "subtract": operator.sub, "multiply": operator.mul}
_OPERATIONS = sorted([*_ARITHMETIC, "divide"])
_MAX_SLEEP = 3600
_MAX_STREAM_COUNT = 1_000_000
#: How often ``stream``'s ``wait_for`` looks for its file.
_POLL_SECONDS = 0.01
_SESSIONS: dict[str, dict[str, Any]] = {}


@command(cancellable=False)
def echo(args: dict[str, Any]) -> dict[str, Any]:
    """Return the arguments unchanged."""
    return {"echoed": args}


# -------------------------------------------------------------------------
# compute: the Numbers rules of PROTOCOL.md
# -------------------------------------------------------------------------


@command(cancellable=False)
def compute(args: dict[str, Any]) -> dict[str, Any]:
    """Exact integer arithmetic, true division, integral results as JSON integers."""
    operation = args.get("operation")
    a, b = _number(args, "a"), _number(args, "b")
    if operation == "divide":
        result = _divide(a, b)
    elif operation in _ARITHMETIC:
        result = _apply(_ARITHMETIC[operation], a, b)
    else:
        raise CommandError(f"unknown operation {operation!r} (supported: {', '.join(_OPERATIONS)})")
    return {"operation": operation, "inputs": {"a": a, "b": b}, "result": _json_number(result)}


def _number(args: dict[str, Any], key: str) -> int | float:
    value = args.get(key)
    if not _is_number(value):
        raise CommandError(f"'{key}' must be a number")
    return value


def _is_number(value: object) -> TypeGuard[int | float]:
    """A JSON number: an int or a float, not a bool."""
    return type(value) is int or type(value) is float


def _divide(a: int | float, b: int | float) -> int | float:
    """True division; two integers that divide evenly stay exact, even beyond 2**53."""
    if b == 0:
        raise CommandError("division by zero")
    if type(a) is int and type(b) is int and a % b == 0:
        return a // b
    return _apply(operator.truediv, a, b)


def _apply(op: Callable[[Any, Any], Any], a: int | float, b: int | float) -> int | float:
    """``op(a, b)``; an overflow (an integer too large to become a float) is not finite."""
    try:
        result: int | float = op(a, b)
    except OverflowError:
        raise CommandError("result is not a finite number") from None
    return result


def _json_number(value: int | float) -> int | float:
    if isinstance(value, int):
        return value
    if not math.isfinite(value):
        raise CommandError("result is not a finite number")
    if value.is_integer() and abs(value) < _JS_EXPONENT_THRESHOLD:
        return int(value)
    return value


# -------------------------------------------------------------------------
# info, sleep
# -------------------------------------------------------------------------


@command(cancellable=False)
def info(args: dict[str, Any]) -> dict[str, Any]:
    """Bridge, runtime and process facts."""
    state = status()
    return {
        "runtime": "python",
        "runtime_version": ".".join(map(str, sys.version_info[:3])),
        "bridge_version": snakepit_python.__version__,
        "platform": sys.platform,
        "arch": os.uname().machine,
        "pid": state["pid"],
        "worker_id": state["worker_id"],
        "uptime": state["uptime"],
        "requests_handled": state["requests_handled"],
        "memory": {"rss_bytes": _rss_bytes()},
        "commands": state["commands"],
    }


def _rss_bytes() -> int:
    """Current resident set size; without /proc, the peak from getrusage (bytes on macOS)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@command
async def sleep(args: dict[str, Any]) -> dict[str, Any]:
    """Sleep, as a task: a ``$cancel`` stops it however many requests are in flight (a sync
    handler on a concurrent worker's thread could not be stopped), and sleeping requests hold
    no thread. ``asyncio`` is imported on the first call, not at the worker's start-up."""
    import asyncio

    seconds = args.get("seconds")
    if not _is_number(seconds) or not 0 <= seconds <= _MAX_SLEEP:
        raise CommandError(f"'seconds' must be a number from 0 to {_MAX_SLEEP}")
    await asyncio.sleep(seconds)
    return {"slept": seconds}


# -------------------------------------------------------------------------
# call_host: PROTOCOL.md, The call_host command
# -------------------------------------------------------------------------

_MAX_HOST_CALLS = 100_000


@command
async def call_host(args: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Call the host's callback ``name`` with ``args``, ``times`` times (one after another,
    or at once with ``parallel``): ``{"results": [...]}`` in call order. A ``CallbackError``
    fails the command with ``"<code>: <message>"``."""
    import asyncio

    name, call_args, times = args.get("name"), args.get("args", {}), args.get("times", 1)
    if not isinstance(name, str) or not name:
        raise CommandError("'name' must be a non-empty string")
    if not isinstance(call_args, dict):
        raise CommandError("'args' must be an object")
    if type(times) is not int or not 1 <= times <= _MAX_HOST_CALLS:
        raise CommandError(f"'times' must be an integer from 1 to {_MAX_HOST_CALLS}")
    try:
        if args.get("parallel") is True:
            calls = [ctx.call(name, call_args) for _ in range(times)]
            return {"results": list(await asyncio.gather(*calls))}
        return {"results": [await ctx.call(name, call_args) for _ in range(times)]}
    except CallbackError as error:
        if error.code == "cancelled":
            raise  # the request answers "cancelled"
        raise CommandError(f"{error.code}: {error}") from None


# -------------------------------------------------------------------------
# stream: PROTOCOL.md, The stream command
# -------------------------------------------------------------------------


@command
async def stream(args: dict[str, Any]) -> AsyncIterator[Any]:
    """Yield ``{"i": 0}`` ... ``{"i": count - 1}``, then ``final`` unless it is null: a producer
    for tests of streaming, backpressure and cancellation. Before item i: the ``delay``, then
    the ``fail_at`` check, then ``progress`` = i + 1.

    An async generator, so that its ``delay`` and ``wait_for`` are cancellable at any
    concurrency. An async generator cannot return a value, so ``final`` is yielded as the last
    item instead of being the end's result: the same last item to every caller, and the same
    list for ``execute``. Its arguments are checked on the first step, before any item.
    """
    import asyncio

    count, delay, fail_at, wait_for, progress = _stream_args(args)
    for i in range(count):
        if delay:
            await asyncio.sleep(delay)
        if i == fail_at:
            raise CommandError(f"failed at item {i}")
        if progress is not None:
            _write_atomically(progress, str(i + 1))
        yield {"i": i}
        # Resumed only when the driver asks for item 1, so item 0 is already on its way out.
        if i == 0 and wait_for is not None and count > 1:
            while not os.path.exists(wait_for):
                await asyncio.sleep(_POLL_SECONDS)
    final = args.get("final")
    if final is not None:
        yield final


def _stream_args(
    args: dict[str, Any],
) -> tuple[int, int | float, int | None, str | None, str | None]:
    """``stream``'s checked ``(count, delay, fail_at, wait_for, progress)``; a null optional
    argument is as good as none."""
    count = args.get("count")
    if type(count) is not int or not 0 <= count <= _MAX_STREAM_COUNT:
        raise CommandError(f"'count' must be an integer from 0 to {_MAX_STREAM_COUNT}")
    delay = args.get("delay")
    if delay is None:
        delay = 0
    elif not _is_number(delay) or not 0 <= delay <= _MAX_SLEEP:
        raise CommandError(f"'delay' must be a number from 0 to {_MAX_SLEEP}")
    fail_at = args.get("fail_at")
    if fail_at is not None and type(fail_at) is not int:
        raise CommandError("'fail_at' must be an integer")
    return count, delay, fail_at, _path(args, "wait_for"), _path(args, "progress")


def _path(args: dict[str, Any], key: str) -> str | None:
    path = args.get(key)
    if path is not None and (not isinstance(path, str) or not path):
        raise CommandError(f"'{key}' must be a non-empty string (a file path)")
    return path


def _write_atomically(path: str, text: str) -> None:
    """A reader of ``path`` sees the old text or the new, never half of it: replace is atomic."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as file:
        file.write(text)
    os.replace(temporary, path)


# -------------------------------------------------------------------------
# Worker-side session state
# -------------------------------------------------------------------------


def _session_id(args: dict[str, Any]) -> str:
    session_id = args.get("session_id")
    if not isinstance(session_id, str) or not session_id:
        raise CommandError("session_id is required (use execute_in_session)")
    return session_id


def _key(args: dict[str, Any]) -> str:
    key = args.get("key")
    if not isinstance(key, str):
        raise CommandError("'key' must be a string")
    return key


@command(cancellable=False)
def store(args: dict[str, Any]) -> dict[str, Any]:
    """Keep ``value`` in this worker's memory under ``(session_id, key)``."""
    session_id, key = _session_id(args), _key(args)
    if "value" not in args:
        raise CommandError("'value' is required")
    _SESSIONS.setdefault(session_id, {})[key] = _owned(args["value"])
    return {"stored": True, "session_id": session_id, "key": key}


def _owned(value: Any) -> Any:
    """``value`` with each binary value (a view of its request's frame) copied into ``bytes``
    of its own: a value kept for the session must not keep the whole frame alive."""
    if type(value) is memoryview:
        return value.tobytes()
    if type(value) is dict:
        return {key: _owned(item) for key, item in value.items()}
    if type(value) is list:
        return [_owned(item) for item in value]
    return value


@command(cancellable=False)
def retrieve(args: dict[str, Any]) -> dict[str, Any]:
    """Read a value kept by ``store``; ``found`` says whether there was one."""
    session_id, key = _session_id(args), _key(args)
    values = _SESSIONS.get(session_id, {})
    return {"found": key in values, "session_id": session_id, "key": key, "value": values.get(key)}


@command(cancellable=False)
def clear_session(args: dict[str, Any]) -> dict[str, Any]:
    """Forget a session's values; ``cleared`` says whether it had any state."""
    session_id = _session_id(args)
    values = _SESSIONS.pop(session_id, None)
    return {
        "cleared": values is not None,
        "session_id": session_id,
        "keys": len(values) if values is not None else 0,
    }


# -------------------------------------------------------------------------
# Programs: deterministic, no model, no network
# -------------------------------------------------------------------------

_PROGRAM_FIELDS = frozenset({"signature", "program_id", "session_id"})


@command(cancellable=False)
def create_program(args: dict[str, Any]) -> dict[str, Any]:
    """Parse the signature; every other argument becomes the program's ``config``."""
    signature = args.get("signature")
    inputs, outputs = _parse_signature(signature)
    return {
        "program_id": args.get("program_id") or "prog_" + os.urandom(8).hex(),
        "signature": signature,
        "inputs": inputs,
        "outputs": outputs,
        "config": {key: value for key, value in args.items() if key not in _PROGRAM_FIELDS},
    }


@command(cancellable=False)
def execute_program(args: dict[str, Any]) -> dict[str, Any]:
    """Render each output as ``out(in1=v1, in2=v2)`` from the given inputs."""
    program, given = args.get("program"), args.get("inputs")
    if not isinstance(program, dict):
        raise CommandError("'program' must be an object with a 'signature'")
    if not isinstance(given, dict):
        raise CommandError("'inputs' must be an object")
    inputs, outputs = _parse_signature(program.get("signature"))
    for name in inputs:
        if name not in given:
            raise CommandError(f"missing input '{name}'")
    rendered = ", ".join(f"{name}={_render(given[name])}" for name in inputs)
    return {
        "program_id": program.get("program_id"),
        "outputs": {name: f"{name}({rendered})" for name in outputs},
    }


def _parse_signature(signature: object) -> tuple[list[str], list[str]]:
    """``"in1, in2 -> out1"`` -> ``(["in1", "in2"], ["out1"])``; every name non-empty."""
    if not isinstance(signature, str):
        raise CommandError("'signature' must be a string like 'in1, in2 -> out1'")
    left, arrow, right = signature.partition("->")
    inputs = [name.strip() for name in left.split(",")]
    outputs = [name.strip() for name in right.split(",")]
    if not arrow or "->" in right or "" in inputs or "" in outputs:
        raise CommandError(f"invalid signature {signature!r} (expected 'in1, in2 -> out1, out2')")
    return inputs, outputs


def _render(value: Any) -> str:
    """A string as is, anything else as compact JSON written as JavaScript would write it."""
    if isinstance(value, str):
        return value
    return json.dumps(_js_numbers(value), separators=(",", ":"), ensure_ascii=False)


def _js_numbers(value: Any) -> Any:
    """Integral floats as integers throughout, so ``1.0`` renders ``1`` on every runtime."""
    if type(value) is float:
        return _json_number(value)
    if isinstance(value, dict):
        return {key: _js_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_js_numbers(item) for item in value]
    return value
