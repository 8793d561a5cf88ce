"""Text attachments, shared-memory segments and the payload limit in the Python bridge.

Raw frames to real worker processes (the bundled bridge and a worker written with the library),
built and taken apart with :mod:`raw_worker`, playing the pool (PROTOCOL.md, *Binary values*:
*Text attachments*, *Shared memory*, *Limits*): the protocol-2 handshake lists ``text``, and
``shm`` only with ``SNAKEPIT_SHM_DIR``; values of at least ``SNAKEPIT_SHM_THRESHOLD`` bytes come
from request segments, reach handlers as read-only views of a mapping (zero-copy, alive after
the file is deleted, numpy-ready) and go out in new response segments (prefixed, regular, 0600,
complete), smaller ones inline; text entries reach handlers as strings, and long strings go out
as text attachments only with ``SNAKEPIT_TEXT_THRESHOLD``; a full tmpfs sends the value inline
and leaves no segment; the payload limit refuses a response or item and leaves no segment;
every bad request segment makes the worker exit 3 saying why; streams carry items in segments.
Most cases run at ``max_in_flight`` 1 (one request at a time) and 4 (the concurrent server).
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from snakepit_python import plugin
from test_bridge_python_binary import assert_quiet, raw_frame

from raw_worker import (
    PROTOCOL_2_CAPABILITIES,
    SHM_PREFIX,
    RawWorker,
    binary_body,
    frame,
    on_small_tmpfs,
    shm_env,
    split_binary_body,
)

KiB = 1 << 10
MiB = 1 << 20
#: The shared-memory threshold of most tests: values of 64 KiB and more go in segments.
THRESHOLD = 64 * KiB
TIMEOUT = 30.0

WORKER = r"""
import mmap
import os

from snakepit_python import command, run


def look(value):
    # What a handler got: each view's kind (mapped: a view of a segment's mapping), whether
    # read-only, its size and first byte; each string's length and first characters.
    if isinstance(value, memoryview):
        kind = "mapped" if isinstance(value.obj, mmap.mmap) else "inline"
        return {"view": kind, "readonly": value.readonly, "nbytes": value.nbytes,
                "first": value[0] if value.nbytes else None}
    if isinstance(value, str):
        return {"str": len(value), "head": value[:3]}
    if isinstance(value, dict):
        return {key: look(item) for key, item in value.items()}
    if isinstance(value, list):
        return [look(item) for item in value]
    return value


@command
def shape(args):
    return look(args)


@command
def echo(args):
    return args


KEPT = []


@command
def keep(args):  # a view kept beyond its request
    KEPT.append(args["v"])
    return len(KEPT)


@command
def kept(args):  # the kept view, given back as it is, and its bytes summed
    view = KEPT.pop()
    return {"sum": sum(view), "view": view}


@command
def frombuffer(args):
    import numpy

    array = numpy.frombuffer(args["v"], numpy.uint32)
    return {"n": int(array.size), "sum": int(array.sum(dtype=numpy.uint64)),
            "writeable": bool(array.flags.writeable), "doubled": array * 2}


@command
def sized(args):
    return b"x" * args["n"]


@command
def pair(args):
    return [b"a" * args["a"], b"b" * args["b"], "t" * args.get("t", 0)]


@command
def text(args):
    return args.get("char", "y") * args["n"]


@command
def lone(args):
    return "\ud800" + "y" * args["n"]


@command
def long_key(args):
    return {"k" * args["n"]: 1}


@command
def plain(args):
    return list(range(args["n"]))


@command
def mix(args):
    return {
        "big": bytes([1]) * args["big"],
        "small": b"small",
        "list": [bytearray([2]) * args["big"], "short", "t" * args["text"],
                 {"deep": "\u00e9" * args["text"]}],
        "n": 1,
    }


@command
def chunks(args):
    for i in range(args["n"]):
        yield {"i": i, "data": bytes([i]) * args["size"]}


@command
async def async_chunks(args):
    for i in range(args["n"]):
        yield {"i": i, "data": bytearray([i]) * args["size"], "text": "s" * args.get("text", 0)}


@command
def listing(args):
    return sorted(os.listdir(os.environ["SNAKEPIT_SHM_DIR"]))


run()
"""

BRIDGE = [sys.executable, str(plugin.BRIDGE_PATH)]
Start = Callable[..., RawWorker]


@pytest.fixture
def start(tmp_path: Path, shm_dir: Path) -> Iterator[Start]:
    """Starts the bundled bridge or (``custom``) the worker above, handshaken with
    ``max_in_flight`` (None: a protocol-1 pool), offered shared memory in ``shm_dir`` unless
    ``shm`` is False; ``wrap`` turns its argv into another (a small tmpfs). Kills what is left."""
    script = tmp_path / "shm_worker.py"
    script.write_text(WORKER)
    workers: list[RawWorker] = []

    def start(
        max_in_flight: int | None = 4,
        *,
        custom: bool = False,
        shm: bool = True,
        threshold: int = THRESHOLD,
        text_threshold: int | None = None,
        max_payload_bytes: int | None = None,
        env: dict[str, str] | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> RawWorker:
        argv = [sys.executable, str(script)] if custom else list(BRIDGE)
        full_env: dict[str, str] = {}
        if shm:
            full_env.update(shm_env(shm_dir, threshold))
        if text_threshold is not None:
            full_env["SNAKEPIT_TEXT_THRESHOLD"] = str(text_threshold)
        if max_payload_bytes is not None:
            full_env["SNAKEPIT_MAX_PAYLOAD_BYTES"] = str(max_payload_bytes)
        full_env.update(env or {})
        worker = RawWorker(wrap(argv) if wrap else argv, env=full_env)
        workers.append(worker)
        worker.shake_hands(max_in_flight)
        return worker

    yield start
    for worker in workers:
        worker.kill()


both_modes = pytest.mark.parametrize("max_in_flight", [1, 4])


# -------------------------------------------------------------------------------------------
# Playing the pool: requests with values inline and in segments, answers taken apart
# -------------------------------------------------------------------------------------------


class Value:
    """A value of a request: its path, bytes, whether it is text, and its segment's name
    (None: inline). A segment is written into the directory when the request is built."""

    def __init__(
        self, path: Sequence[Any], data: bytes, *, text: bool = False, shm: str | None = None
    ) -> None:
        self.path, self.data, self.text, self.shm = list(path), data, text, shm


def request(
    directory: Path,
    request_id: int,
    command: str,
    args: dict[str, Any],
    values: Sequence[Value],
    meta: dict[str, Any] | None = None,
) -> bytes:
    """A binary request frame (``args`` holds None where each value goes)."""
    entries, inline = [], b""
    for value in values:
        entry: dict[str, Any] = {"path": ["args", *value.path], "size": len(value.data)}
        if value.text:
            entry["text"] = True
        if value.shm is None:
            inline += value.data
        else:
            entry["shm"] = value.shm
            (directory / value.shm).write_bytes(value.data)
        entries.append(entry)
    message: dict[str, Any] = {"id": request_id, "command": command, "args": args}
    if meta is not None:
        message["meta"] = meta
    message["$binary"] = entries
    return frame(binary_body(message, inline))


class Answer:
    """A frame from the worker taken apart: its envelope, each ``$binary`` entry with its
    bytes (read from the frame, or from its segment, which is checked and then deleted as the
    pool deletes it), and the message as the pool decodes it (``message``)."""

    def __init__(self, body: bytes, directory: Path) -> None:
        self.values: list[tuple[dict[str, Any], bytes]] = []
        if body[:1] != b"\x00":
            self.envelope: dict[str, Any] = json.loads(body)
            self.message = self.envelope
            return
        self.envelope, attachments = split_binary_body(body)
        inline = iter(attachments)
        for entry in self.envelope["$binary"]:
            if "shm" in entry:
                data = read_segment(directory, entry["shm"], entry["size"])
            else:
                data = next(inline)
            self.values.append((entry, data))
        self.message = json.loads(json.dumps(self.envelope))
        del self.message["$binary"]
        for entry, data in self.values:
            place(self.message, entry["path"], data.decode() if entry.get("text") else data)

    def lanes(self) -> list[tuple[list[Any], str, int]]:
        """Each value's path, lane (``shm``, ``inline``, ``text-shm``, ``text-inline``) and
        size."""
        return [
            (
                entry["path"],
                ("text-" if entry.get("text") else "") + ("shm" if "shm" in entry else "inline"),
                entry["size"],
            )
            for entry, _ in self.values
        ]


def read_segment(directory: Path, name: str, size: int) -> bytes:
    """A response segment, checked as the pool checks it, then deleted."""
    assert name.startswith(SHM_PREFIX) and "/" not in name, name
    path = directory / name
    info = path.lstat()
    assert stat.S_ISREG(info.st_mode), name
    assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
    assert info.st_uid == os.getuid()
    assert info.st_size == size, (info.st_size, size)
    data = path.read_bytes()
    path.unlink()
    return data


def place(message: Any, path: list[Any], value: Any) -> None:
    for key in path[:-1]:
        message = message[key]
    assert message[path[-1]] is None
    message[path[-1]] = value


def answer(worker: RawWorker, directory: Path) -> Answer:
    return Answer(raw_frame(worker)[4:], directory)


def call(worker: RawWorker, directory: Path, command: str, args: dict[str, Any]) -> Answer:
    request_id = worker.send(command, args)
    got = answer(worker, directory)
    assert got.envelope["id"] == request_id, got.envelope
    return got


def ok(request_id: int, result: Any) -> dict[str, Any]:
    return {"id": request_id, "success": True, "result": result}


def segments(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def stream_meta(window: int) -> dict[str, Any]:
    return {"deadline_ms": 30_000, "stream": {"window": window}}


# -------------------------------------------------------------------------------------------
# Handshake and start-up
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_in_flight", [1, 8])
def test_the_handshake_lists_text_and_shm_only_when_offered(
    start: Start, max_in_flight: int
) -> None:
    assert start(max_in_flight).handshake_answer["capabilities"] == [
        *PROTOCOL_2_CAPABILITIES,
        "shm",
    ]
    alone = start(max_in_flight, shm=False, text_threshold=100)
    assert alone.handshake_answer["capabilities"] == PROTOCOL_2_CAPABILITIES
    assert alone.result("ping")["capabilities"] == ["cancel"]  # the health check: protocol 1
    assert start(None).handshake_answer["capabilities"] == ["cancel"]  # a protocol-1 pool


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SNAKEPIT_MAX_PAYLOAD_BYTES", "0"),
        ("SNAKEPIT_TEXT_THRESHOLD", "many"),
        ("SNAKEPIT_SHM_THRESHOLD", "-1"),
        ("SNAKEPIT_SHM_PREFIX", "w/x-"),
    ],
)
def test_a_setting_the_pool_would_not_give_is_a_bad_start(
    shm_dir: Path, name: str, value: str
) -> None:
    worker = RawWorker(BRIDGE, env={**shm_env(shm_dir, THRESHOLD), name: value})
    try:
        assert worker.wait(TIMEOUT) == 2
        assert f"{name}={value!r}" in worker.stderr_text()
    finally:
        worker.kill()


# -------------------------------------------------------------------------------------------
# Bytes through segments
# -------------------------------------------------------------------------------------------


@both_modes
def test_echo_of_a_request_segment_answers_through_a_response_segment(
    start: Start, shm_dir: Path, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    data = os.urandom(3 * MiB + 5)
    worker.send_raw(request(shm_dir, 7, "echo", {"d": None}, [Value(["d"], data, shm="p1")]))
    raw = raw_frame(worker)
    got = Answer(raw[4:], shm_dir)
    assert got.envelope == {
        "id": 7, "success": True, "result": {"echoed": {"d": None}},
        "$binary": [{"path": ["result", "echoed", "d"], "size": len(data),
                     "shm": SHM_PREFIX + "0"}],
    }  # fmt: skip
    assert len(raw) < 300  # no bytes of the value in the frame
    assert got.message == ok(7, {"echoed": {"d": data}})
    # The request segment is the pool's: left as it was, and the worker made nothing else.
    assert (shm_dir / "p1").read_bytes() == data
    assert segments(shm_dir) == ["p1"]


@both_modes
def test_values_below_the_threshold_stay_inline_whichever_lane_they_came_by(
    start: Start, shm_dir: Path, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    small, at = os.urandom(THRESHOLD - 1), os.urandom(THRESHOLD)
    values = [Value(["small"], small, shm="p1"), Value(["inline"], small), Value(["at"], at)]
    args = {"small": None, "inline": None, "at": None}
    worker.send_raw(request(shm_dir, 2, "echo", args, values))
    got = answer(worker, shm_dir)
    assert got.lanes() == [
        (["result", "echoed", "small"], "inline", THRESHOLD - 1),
        (["result", "echoed", "inline"], "inline", THRESHOLD - 1),
        (["result", "echoed", "at"], "shm", THRESHOLD),  # came inline, leaves in a segment
    ]
    assert got.message == ok(2, {"echoed": {"small": small, "inline": small, "at": at}})
    assert segments(shm_dir) == ["p1"]


@both_modes
def test_handlers_get_read_only_views_of_the_mapping_of_exactly_size_bytes(
    start: Start, shm_dir: Path, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True)
    longer = b"\x05" * (THRESHOLD + 100)  # the file may be longer than the value
    (shm_dir / "p1").write_bytes(longer)
    message = {"id": 1, "command": "shape", "args": {"s": None, "i": None, "e": None},
               "$binary": [{"path": ["args", "s"], "size": THRESHOLD, "shm": "p1"},
                           {"path": ["args", "i"], "size": 2},
                           {"path": ["args", "e"], "size": 0, "shm": "p1"}]}  # fmt: skip
    worker.send_raw(frame(binary_body(message, b"\x09\x08")))
    assert answer(worker, shm_dir).message == ok(
        1,
        {
            "s": {"view": "mapped", "readonly": True, "nbytes": THRESHOLD, "first": 5},
            "i": {"view": "inline", "readonly": True, "nbytes": 2, "first": 9},
            "e": {"view": "inline", "readonly": True, "nbytes": 0, "first": None},
        },
    )


@both_modes
def test_a_kept_view_outlives_its_deleted_segment_and_echoes_from_the_mapping(
    start: Start, shm_dir: Path, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True)
    data = os.urandom(2 * MiB)
    worker.send_raw(request(shm_dir, 1, "keep", {"v": None}, [Value(["v"], data, shm="p1")]))
    assert answer(worker, shm_dir).message == ok(1, 1)
    (shm_dir / "p1").unlink()  # the request has ended: the pool deletes its segment
    got = call(worker, shm_dir, "kept", {})
    assert got.lanes() == [(["result", "view"], "shm", len(data))]
    assert got.message["result"] == {"sum": sum(data), "view": data}
    assert segments(shm_dir) == []


def test_numpy_frombuffer_works_on_a_mapped_value(start: Start, shm_dir: Path) -> None:
    worker = start(4, custom=True)
    numbers = list(range(100_000))
    data = b"".join(n.to_bytes(4, sys.byteorder) for n in numbers)
    worker.send_raw(request(shm_dir, 1, "frombuffer", {"v": None}, [Value(["v"], data, shm="p")]))
    got = answer(worker, shm_dir)
    assert got.lanes() == [(["result", "doubled"], "shm", len(data))]  # a numpy array out
    doubled = b"".join((2 * n).to_bytes(4, sys.byteorder) for n in numbers)
    assert got.message == ok(
        1, {"n": 100_000, "sum": sum(numbers), "writeable": False, "doubled": doubled}
    )


# -------------------------------------------------------------------------------------------
# Text attachments
# -------------------------------------------------------------------------------------------


@both_modes
def test_text_entries_reach_the_handler_as_strings(
    start: Start, shm_dir: Path, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True)
    long = "é€😀" * 30_000  # 270,000 UTF-8 bytes: a segment
    values = [
        Value(["inline"], "añb".encode(), text=True),
        Value(["shared"], long.encode(), text=True, shm="p1"),
        Value(["list", 0], b"", text=True),
        Value(["bytes"], b"\xff"),
    ]
    args = {"inline": None, "shared": None, "list": [None], "bytes": None}
    worker.send_raw(request(shm_dir, 4, "shape", args, values))
    assert answer(worker, shm_dir).message == ok(
        4,
        {
            "inline": {"str": 3, "head": "añb"},
            "shared": {"str": 90_000, "head": "é€😀"},
            "list": [{"str": 0, "head": ""}],
            "bytes": {"view": "inline", "readonly": True, "nbytes": 1, "first": 255},
        },
    )
    worker.send_raw(request(shm_dir, 5, "echo", {"t": None}, [Value(["t"], b"abc", text=True)]))
    plain = answer(worker, shm_dir)  # a string in, a string out: no text attachment asked for
    assert plain.envelope == ok(5, {"t": "abc"})


@both_modes
def test_long_strings_go_out_as_text_only_with_a_text_threshold(
    start: Start, shm_dir: Path, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True, text_threshold=1000)
    got = call(worker, shm_dir, "text", {"n": 1000})
    assert got.lanes() == [(["result"], "text-inline", 1000)]
    assert got.message["result"] == "y" * 1000
    assert call(worker, shm_dir, "text", {"n": 999}).envelope["result"] == "y" * 999  # JSON
    # The threshold counts code points; the size and the segment threshold count UTF-8 bytes.
    got = call(worker, shm_dir, "text", {"n": 20_000, "char": "😀"})
    assert got.lanes() == [(["result"], "text-shm", 80_000)]
    assert got.message["result"] == "😀" * 20_000
    # A string with a lone surrogate has no UTF-8: it stays in the JSON.
    got = call(worker, shm_dir, "lone", {"n": 2000})
    assert got.values == [] and got.envelope["result"] == "\ud800" + "y" * 2000
    # A long key is no value: the result is plain JSON.
    assert call(worker, shm_dir, "long_key", {"n": 2000}).envelope["result"] == {"k" * 2000: 1}
    assert segments(shm_dir) == []

    without = start(max_in_flight, custom=True)  # no SNAKEPIT_TEXT_THRESHOLD: never text
    without.send("text", {"n": 200_000}, id=2)
    body = raw_frame(without)[4:]
    assert body[:1] == b"{" and json.loads(body) == ok(2, "y" * 200_000)


@both_modes
def test_echo_of_a_long_string_in_a_segment_is_a_text_attachment_back(
    start: Start, shm_dir: Path, max_in_flight: int
) -> None:
    worker = start(max_in_flight, text_threshold=32768)
    long = "ü" * 100_000
    values = [Value(["s"], long.encode(), text=True, shm="p1")]
    worker.send_raw(request(shm_dir, 3, "echo", {"s": None, "n": 1}, values))
    got = answer(worker, shm_dir)
    assert got.lanes() == [(["result", "echoed", "s"], "text-shm", 200_000)]
    assert got.message == ok(3, {"echoed": {"s": long, "n": 1}})


# -------------------------------------------------------------------------------------------
# Several values, nested, mixed
# -------------------------------------------------------------------------------------------


@both_modes
def test_nested_values_take_the_lane_of_their_size(
    start: Start, shm_dir: Path, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True, text_threshold=500)
    got = call(worker, shm_dir, "mix", {"big": 100_000, "text": 40_000})
    assert got.lanes() == [
        (["result", "big"], "shm", 100_000),
        (["result", "small"], "inline", 5),
        (["result", "list", 0], "shm", 100_000),
        (["result", "list", 2], "text-inline", 40_000),
        (["result", "list", 3, "deep"], "text-shm", 80_000),
    ]
    assert got.message["result"] == {
        "big": b"\x01" * 100_000,
        "small": b"small",
        "list": [b"\x02" * 100_000, "short", "t" * 40_000, {"deep": "é" * 40_000}],
        "n": 1,
    }
    names = [entry["shm"] for entry, _ in got.values if "shm" in entry]
    assert len(set(names)) == 3 and segments(shm_dir) == []


@both_modes
def test_an_echo_of_many_values_from_both_lanes(
    start: Start, shm_dir: Path, max_in_flight: int
) -> None:
    worker = start(max_in_flight, text_threshold=THRESHOLD)
    blobs = [os.urandom(n) for n in (THRESHOLD, 10, 200_000, 0, THRESHOLD - 1)]
    text = "Ω" * THRESHOLD  # as long as the text threshold, twice the shm threshold in bytes
    args = {"a": [None, {"b": None}], "c": {"d": [1, None]}, "e": None, "f": None, "g": None,
            "h": "stays", "t": None}  # fmt: skip
    values = [
        Value(["a", 0], blobs[0], shm="p1"),
        Value(["a", 1, "b"], blobs[1]),
        Value(["c", "d", 1], blobs[2], shm="p2"),
        Value(["e"], blobs[3]),
        Value(["f"], blobs[4]),
        Value(["t"], text.encode(), text=True, shm="p3"),
        Value(["g"], blobs[0]),  # the same bytes again, inline this time
    ]
    worker.send_raw(request(shm_dir, 9, "echo", args, values))
    got = answer(worker, shm_dir)
    # In the order of the result's keys.
    assert [lane for _, lane, _ in got.lanes()] == [
        "shm", "inline", "shm", "inline", "inline", "shm", "text-shm",
    ]  # fmt: skip
    assert got.message == ok(
        9,
        {
            "echoed": {
                "a": [blobs[0], {"b": blobs[1]}], "c": {"d": [1, blobs[2]]}, "e": b"",
                "f": blobs[4], "g": blobs[0], "h": "stays", "t": text,
            }
        },
    )  # fmt: skip
    assert segments(shm_dir) == ["p1", "p2", "p3"]


# -------------------------------------------------------------------------------------------
# A full tmpfs: inline instead
# -------------------------------------------------------------------------------------------


def test_a_full_tmpfs_sends_the_value_inline_and_leaves_no_segment(
    start: Start, shm_dir: Path
) -> None:
    worker = start(4, custom=True, text_threshold=1000,
                   wrap=lambda argv: on_small_tmpfs(shm_dir, "1m", argv))  # fmt: skip
    inside = Path(f"/proc/{worker.proc.pid}/root") / shm_dir.relative_to("/")  # its tmpfs
    got = call(worker, inside, "pair", {"a": 2 * MiB, "b": 200_000, "t": 3 * MiB})
    assert got.lanes() == [
        (["result", 0], "inline", 2 * MiB),  # no room
        (["result", 1], "shm", 200_000),  # room enough
        (["result", 2], "text-inline", 3 * MiB),
    ]
    assert got.message["result"] == [b"a" * 2 * MiB, b"b" * 200_000, "t" * 3 * MiB]
    assert segments(inside) == []  # what could not be filled was deleted; the rest was read
    assert call(worker, inside, "listing", {}).envelope["result"] == []


def test_a_full_tmpfs_and_a_small_frame_limit_refuse_the_response(
    start: Start, shm_dir: Path
) -> None:
    worker = start(1, custom=True, env={"SNAKEPIT_MAX_FRAME_BYTES": str(MiB + MiB // 2)},
                   wrap=lambda argv: on_small_tmpfs(shm_dir, "1m", argv))  # fmt: skip
    message = worker.error("pair", {"a": 2 * MiB, "b": 300_000})
    assert re.fullmatch(
        r"pair: response of \d+ bytes exceeds the frame limit of 1572864 bytes", message
    ), message
    assert worker.result("listing") == []  # the segment that was made is gone again


# -------------------------------------------------------------------------------------------
# The payload limit
# -------------------------------------------------------------------------------------------


@both_modes
def test_a_response_over_the_payload_limit_fails_and_leaves_no_segment(
    start: Start, shm_dir: Path, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True, max_payload_bytes=500_000)
    message = worker.error("sized", {"n": 600_000})
    match = re.fullmatch(
        r"sized: response of (\d+) bytes exceeds the payload limit of 500000 bytes", message
    )
    assert match and 600_000 < int(match[1]) < 600_200, message
    message = worker.error("pair", {"a": 300_000, "b": 300_000})  # together too much
    assert "exceeds the payload limit of 500000 bytes" in message
    assert segments(shm_dir) == []
    assert call(worker, shm_dir, "sized", {"n": 400_000}).message["result"] == b"x" * 400_000
    # Plain JSON counts too.
    envelope = json.dumps(ok(4, list(range(100_000))))
    worker.send("plain", {"n": 100_000}, id=4)
    assert worker.receive()["error"] == (
        f"plain: response of {len(envelope)} bytes exceeds the payload limit of 500000 bytes"
    )


def test_the_payload_limit_counts_the_envelope_and_every_value(start: Start, shm_dir: Path) -> None:
    """N is the frame's size as if every value were inline: the 5 bytes before the envelope,
    the envelope as sent (segment names included) and all the values."""
    measured = start(1, custom=True)
    measured.send("pair", {"a": 100_000, "b": 10}, id=1)
    body = raw_frame(measured)[4:]
    got = Answer(body, shm_dir)
    size = len(body) + 100_000  # the 100,000 bytes went in a segment
    assert got.lanes()[0][1] == "shm"
    fits = start(1, custom=True, max_payload_bytes=size)
    fits.send("pair", {"a": 100_000, "b": 10}, id=1)
    assert Answer(raw_frame(fits)[4:], shm_dir).message == got.message
    over = start(1, custom=True, max_payload_bytes=size - 1)
    assert over.error("pair", {"a": 100_000, "b": 10}) == (
        f"pair: response of {size} bytes exceeds the payload limit of {size - 1} bytes"
    )
    assert segments(shm_dir) == []


@both_modes
def test_an_item_over_the_payload_limit_ends_the_stream(
    start: Start, shm_dir: Path, max_in_flight: int
) -> None:
    worker = start(max_in_flight, custom=True, max_payload_bytes=300_000)
    worker.send("chunks", {"n": 3, "size": 200_000}, id=5, meta=stream_meta(8))
    for _ in range(3):  # each item fits, though the stream carries more than the limit
        assert answer(worker, shm_dir).lanes() == [(["item", "data"], "shm", 200_000)]
    assert worker.receive() == ok(5, None)
    worker.send("async_chunks", {"n": 2, "size": 200_000, "text": 0}, id=6, meta=stream_meta(8))
    assert answer(worker, shm_dir).lanes() == [(["item", "data"], "shm", 200_000)]
    assert answer(worker, shm_dir).lanes() == [(["item", "data"], "shm", 200_000)]
    assert worker.receive() == ok(6, None)
    worker.send("chunks", {"n": 2, "size": 400_000}, id=7, meta=stream_meta(8))
    failure = worker.receive()
    assert failure["id"] == 7 and failure["success"] is False
    assert re.fullmatch(
        r"chunks: item of \d+ bytes exceeds the payload limit of 300000 bytes", failure["error"]
    ), failure
    assert segments(shm_dir) == []


# -------------------------------------------------------------------------------------------
# Streams carrying segments
# -------------------------------------------------------------------------------------------


@both_modes
@pytest.mark.parametrize("command", ["chunks", "async_chunks"])
def test_a_stream_of_items_in_segments_keeps_its_window(
    start: Start, shm_dir: Path, max_in_flight: int, command: str
) -> None:
    worker = start(max_in_flight, custom=True, text_threshold=1000)
    size = 100_000
    worker.send(command, {"n": 5, "size": size, "text": 2000}, id=9, meta=stream_meta(2))
    items = [answer(worker, shm_dir) for _ in range(2)]
    assert_quiet(worker, 0.1)  # two items unacknowledged: the generator waits
    worker.send("$credit", {"items": 4}, id=9)
    items += [answer(worker, shm_dir) for _ in range(3)]
    for i, item in enumerate(items):
        assert item.lanes()[0] == (["item", "data"], "shm", size)
        expected: dict[str, Any] = {"i": i, "data": bytes([i]) * size}
        if command == "async_chunks":
            expected["text"] = "s" * 2000
            assert item.lanes()[1] == (["item", "text"], "text-inline", 2000)
        assert item.message == {"id": 9, "item": expected}
    assert worker.receive() == ok(9, None)
    names = {entry["shm"] for item in items for entry, _ in item.values if "shm" in entry}
    assert len(names) == 5 and segments(shm_dir) == []


# -------------------------------------------------------------------------------------------
# Bad request segments: the stream cannot be trusted, exit 3
# -------------------------------------------------------------------------------------------


def prepare(directory: Path) -> None:
    (directory / "ok").write_bytes(b"abcdef")
    (directory / "short").write_bytes(b"abc")
    (directory / "link").symlink_to(directory / "ok")
    (directory / "dir").mkdir()
    os.mkfifo(directory / "fifo")
    (directory / "bad-utf8").write_bytes(b"ab\xff\xfe")


BAD_SEGMENTS = {
    "missing": ({"shm": "nope", "size": 3}, "shared-memory segment 'nope' cannot be opened"),
    "shorter than size": (
        {"shm": "short", "size": 6},
        "shared-memory segment 'short' has 3 bytes, fewer than its size of 6",
    ),
    "a name with a slash": ({"shm": "dir/ok", "size": 1}, "is not a file name in the segment"),
    "a path up": ({"shm": "../ok", "size": 1}, "is not a file name in the segment"),
    "dot": ({"shm": ".", "size": 1}, "is not a file name in the segment"),
    "dot dot": ({"shm": "..", "size": 1}, "is not a file name in the segment"),
    "empty name": ({"shm": "", "size": 1}, "is not a file name in the segment"),
    "not a string": ({"shm": 7, "size": 1}, "is not a file name in the segment"),
    "a symlink": (
        {"shm": "link", "size": 1},
        "shared-memory segment 'link' cannot be opened ([Errno 40]",
    ),
    "a directory": ({"shm": "dir", "size": 1}, "shared-memory segment 'dir' is not a regular"),
    "a FIFO": ({"shm": "fifo", "size": 1}, "shared-memory segment 'fifo' is not a regular file"),
    "text not UTF-8": (
        {"shm": "bad-utf8", "size": 4, "text": True},
        'text value at ["args", "a"] is not valid UTF-8',
    ),
    "text flag not a boolean": ({"shm": "ok", "size": 1, "text": 1}, "'text' is not a boolean"),
}


@pytest.mark.parametrize(("entry", "reason"), BAD_SEGMENTS.values(), ids=BAD_SEGMENTS.keys())
def test_a_bad_request_segment_exits_3_saying_why(
    start: Start, shm_dir: Path, entry: dict[str, Any], reason: str
) -> None:
    prepare(shm_dir)
    worker = start(4)
    message = {"id": 1, "command": "echo", "args": {"a": None},
               "$binary": [{"path": ["args", "a"], **entry}]}  # fmt: skip
    worker.send_raw(frame(binary_body(message)))
    assert worker.wait(TIMEOUT) == 3
    stderr = worker.stderr_text()
    assert reason in stderr and stderr.rstrip().endswith("exiting with status 3"), stderr
    assert (shm_dir / "ok").read_bytes() == b"abcdef"  # nothing of the pool's was changed


def test_inline_text_that_is_not_utf8_exits_3(start: Start) -> None:
    worker = start(1, shm=False)
    message = {"id": 1, "command": "echo", "args": {"a": None},
               "$binary": [{"path": ["args", "a"], "size": 2, "text": True}]}  # fmt: skip
    worker.send_raw(frame(binary_body(message, b"\xc3(")))
    assert worker.wait(TIMEOUT) == 3
    assert 'text value at ["args", "a"] is not valid UTF-8' in worker.stderr_text()


def test_a_segment_named_to_a_worker_not_offered_shared_memory_exits_3(start: Start) -> None:
    worker = start(4, shm=False)
    message = {"id": 1, "command": "echo", "args": {"a": None},
               "$binary": [{"path": ["args", "a"], "size": 1, "shm": "p1"}]}  # fmt: skip
    worker.send_raw(frame(binary_body(message)))
    assert worker.wait(TIMEOUT) == 3
    assert "names a shared-memory segment, which this worker did not offer" in (
        worker.stderr_text()
    )
