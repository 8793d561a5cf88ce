"""Text attachments, shared-memory segments and the payload limit in the Node.js bridge.

Raw frames to real ``node`` processes (the bundled bridge and a worker written with the
library), built and taken apart with the helpers of :mod:`raw_worker` only: the handshake lists
``text``, and ``shm`` only with ``SNAKEPIT_SHM_DIR``; values of at least
``SNAKEPIT_SHM_THRESHOLD`` bytes come from request segments and go out in response segments
(prefixed, regular, 0600, complete), smaller ones inline; text entries reach handlers as strings
and long strings go out as text attachments only with ``SNAKEPIT_TEXT_THRESHOLD``; a full
tmpfs sends the value inline and leaves no segment; the payload limit refuses a response and
leaves no segment; every bad request segment makes the worker exit 3 saying why; streams carry
items in segments.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from snakepit_node.plugin import node_adapter, snakepit_adapters

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

WORKER = r"""
const fs = require("fs");
const { run } = require("snakepit");

/** What the handler got: each Buffer as {buffer: length, first: its first byte}, each string
 * as {string: length, head: its first characters}. */
function kinds(value) {
  if (Buffer.isBuffer(value)) {
    return { buffer: value.length, first: value.length ? value[0] : null };
  }
  if (typeof value === "string") return { string: value.length, head: value.slice(0, 3) };
  if (Array.isArray(value)) return value.map(kinds);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, kinds(v)]));
  }
  return value;
}

run({
  kinds: (args) => kinds(args),
  sized: (args) => Buffer.alloc(args.n, 120),
  text: (args) => (args.char ?? "y").repeat(args.n),
  lone: (args) => "\ud800" + "y".repeat(args.n),
  boxed: (args) => ({ s: new String("z".repeat(args.n)) }),
  mix: (args) => ({
    big: Buffer.alloc(args.big, 1),
    small: Buffer.from("small"),
    list: [
      Buffer.alloc(args.big, 2),
      "short",
      "t".repeat(args.text),
      { deep: "é".repeat(args.text) },
    ],
    n: 1,
  }),
  chunks: async function* (args) {
    for (let i = 0; i < args.n; i++) yield { i, data: Buffer.alloc(args.size, i) };
    return "end";
  },
  segments: () => fs.readdirSync(process.env.SNAKEPIT_SHM_DIR).sort(),
});
"""

Spawn = Callable[..., RawWorker]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Starts the bundled bridge (``"bridge"``) or the library worker (``"worker"``) with
    ``env``, ``wrap`` around its command line, handshaken at protocol 2 unless
    ``max_in_flight`` is None; kills what is left."""
    script = tmp_path / "shm_worker.js"
    script.write_text(WORKER)
    workers: list[RawWorker] = []

    def start(
        what: str = "bridge",
        env: Mapping[str, str] | None = None,
        *,
        wrap: Callable[[list[str]], list[str]] = list,
        max_in_flight: int | None = 4,
    ) -> RawWorker:
        if what == "bridge":
            (adapter,) = snakepit_adapters()
        else:
            adapter = node_adapter("custom", script)
        argv = wrap(list(adapter.command_line()))
        worker = RawWorker(argv, {**(adapter.env or {}), **(env or {})})
        workers.append(worker)
        if max_in_flight is not None:
            worker.shake_hands(max_in_flight)
        return worker

    yield start
    for worker in workers:
        worker.kill()


# -------------------------------------------------------------------------------------------
# Helpers: requests with segments, responses taken apart
# -------------------------------------------------------------------------------------------

Value = tuple[Sequence[Any], bytes | str, bool]  # (path, bytes or text, in a segment)


def request(
    request_id: int,
    command: str,
    args: dict[str, Any],
    values: Sequence[Value],
    directory: Path | None = None,
    meta: dict[str, Any] | None = None,
) -> bytes:
    """A request frame whose ``args`` hold null where each value goes: inline values follow
    the envelope, the others are written to request segments ``req-<id>-<i>`` in
    ``directory`` (left there, as the pool leaves them until the answer)."""
    entries, attachments = [], b""
    for i, (path, value, shared) in enumerate(values):
        data = value.encode() if isinstance(value, str) else value
        entry: dict[str, Any] = {"path": ["args", *path], "size": len(data)}
        if isinstance(value, str):
            entry["text"] = True
        if shared:
            assert directory is not None
            entry["shm"] = f"req-{request_id}-{i}"
            write_segment(directory / entry["shm"], data)
        else:
            attachments += data
        entries.append(entry)
    message: dict[str, Any] = {"id": request_id, "command": command, "args": args}
    if meta is not None:
        message["meta"] = meta
    message["$binary"] = entries
    return frame(binary_body(message, attachments))


def write_segment(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def take_segment(directory: Path, entry: Mapping[str, Any]) -> bytes:
    """A response segment's bytes, checked as the pool checks it, then deleted (the pool owns
    it once the frame names it)."""
    name = entry["shm"]
    assert name.startswith(SHM_PREFIX) and "/" not in name, name
    path = directory / name
    info = path.lstat()
    assert stat.S_ISREG(info.st_mode), info
    assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
    assert info.st_uid == os.getuid()
    assert info.st_size == entry["size"], (info.st_size, entry)
    data = path.read_bytes()
    path.unlink()
    return data


def place(message: Any, path: Sequence[Any], value: Any) -> None:
    container = message
    for key in path[:-1]:
        container = container[key]
    assert container[path[-1]] is None
    container[path[-1]] = value


def decode(body: bytes, directory: Path | None = None) -> tuple[dict[str, Any], list[Any]]:
    """A response or item frame's body as the caller gets it (binary values as bytes, text as
    str, segments read and deleted), and its ``$binary`` entries (empty for a JSON frame)."""
    if body[:1] != b"\x00":
        return json.loads(body), []
    envelope, attachments = split_binary_body(body)
    entries = envelope.pop("$binary")
    inline = iter(attachments)
    for entry in entries:
        assert set(entry) <= {"path", "size", "text", "shm"}, entry
        if "shm" in entry:
            assert directory is not None, "a segment from a worker offered no shared memory"
            data = take_segment(directory, entry)
        else:
            data = next(inline)
        assert len(data) == entry["size"]
        if entry.get("text") is True:
            place(envelope, entry["path"], data.decode("utf-8"))  # strict: no lone surrogate
        else:
            assert "text" not in entry, entry
            place(envelope, entry["path"], data)
    return envelope, entries


def receive(worker: RawWorker, directory: Path | None = None) -> tuple[dict[str, Any], list[Any]]:
    return decode(worker.receive_body(), directory)


def where(entries: Sequence[Mapping[str, Any]]) -> list[tuple[list[Any], str]]:
    """Each entry's path and lane: "shm", "inline", "shm text" or "inline text"."""
    return [
        (e["path"], ("shm" if "shm" in e else "inline") + (" text" if e.get("text") else ""))
        for e in entries
    ]


def ok(request_id: int, result: Any) -> dict[str, Any]:
    return {"id": request_id, "success": True, "result": result}


def failure(worker: RawWorker, request_id: int) -> str:
    answer = worker.receive()
    assert answer["id"] == request_id and answer["success"] is False, answer
    assert set(answer) == {"id", "success", "error"}, answer
    message: str = answer["error"]
    return message


def stream_meta(window: int) -> dict[str, Any]:
    return {"deadline_ms": 30_000, "stream": {"window": window}}


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -------------------------------------------------------------------------------------------
# Handshake and settings
# -------------------------------------------------------------------------------------------


def test_the_handshake_lists_text_and_shm_only_when_offered(spawn: Spawn, shm_dir: Path) -> None:
    assert spawn().handshake_answer["capabilities"] == PROTOCOL_2_CAPABILITIES
    with_shm = spawn(env=shm_env(shm_dir, THRESHOLD))
    assert with_shm.handshake_answer["capabilities"] == [*PROTOCOL_2_CAPABILITIES, "shm"]
    # The health check and a protocol-1 handshake keep the protocol-1 answer.
    assert with_shm.result("ping")["capabilities"] == ["cancel"]
    assert spawn(env=shm_env(shm_dir, 0), max_in_flight=None).handshake()["result"][
        "capabilities"
    ] == ["cancel"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"SNAKEPIT_TEXT_THRESHOLD": "-1"},
            'SNAKEPIT_TEXT_THRESHOLD must be an integer >= 0, got "-1"',
        ),
        (
            {"SNAKEPIT_MAX_PAYLOAD_BYTES": "0"},
            "SNAKEPIT_MAX_PAYLOAD_BYTES must be a positive integer",
        ),
        (
            {"SNAKEPIT_SHM_THRESHOLD": "1k"},
            'SNAKEPIT_SHM_THRESHOLD must be an integer >= 0, got "1k"',
        ),
        (
            {"SNAKEPIT_SHM_THRESHOLD": ""},
            "SNAKEPIT_SHM_THRESHOLD must be set with SNAKEPIT_SHM_DIR",
        ),
        (
            {"SNAKEPIT_SHM_PREFIX": "a/b"},
            "SNAKEPIT_SHM_PREFIX must be a non-empty file name prefix",
        ),
        ({"SNAKEPIT_SHM_PREFIX": ""}, "SNAKEPIT_SHM_PREFIX must be a non-empty file name prefix"),
    ],
)
def test_a_bad_setting_exits_2_naming_it(
    spawn: Spawn, shm_dir: Path, env: dict[str, str], message: str
) -> None:
    worker = spawn(env={**shm_env(shm_dir, THRESHOLD), **env}, max_in_flight=None)
    assert worker.wait() == 2
    assert message in worker.stderr_text()


# -------------------------------------------------------------------------------------------
# Shared memory: segments in, segments out
# -------------------------------------------------------------------------------------------


def test_echo_from_a_request_segment_into_a_response_segment(spawn: Spawn, shm_dir: Path) -> None:
    worker = spawn(env=shm_env(shm_dir, THRESHOLD))
    data = os.urandom(MiB + 3)
    worker.send_raw(request(7, "echo", {"data": None}, [(["data"], data, True)], shm_dir))
    body = worker.receive_body()
    envelope, attachments = split_binary_body(body)
    (entry,) = envelope["$binary"]
    assert attachments == [] and len(body) == 5 + len(json.dumps(envelope, separators=(",", ":")))
    assert entry["path"] == ["result", "echoed", "data"] and entry["size"] == len(data)
    assert re.fullmatch(re.escape(SHM_PREFIX) + r"\S+", entry["shm"]), entry
    assert decode(body, shm_dir) == (ok(7, {"echoed": {"data": data}}), [entry])
    # The request segment is the pool's: left in place, unchanged; nothing else is there.
    assert files(shm_dir) == ["req-7-0"]
    assert (shm_dir / "req-7-0").read_bytes() == data
    # The next segment gets another name.
    worker.send_raw(request(8, "echo", {"d": None}, [(["d"], data[:THRESHOLD], False)]))
    message, (second,) = receive(worker, shm_dir)
    assert message == ok(8, {"echoed": {"d": data[:THRESHOLD]}})
    assert second["shm"] != entry["shm"] and second["shm"].startswith(SHM_PREFIX)


def test_values_below_the_threshold_stay_inline(spawn: Spawn, shm_dir: Path) -> None:
    worker = spawn(env=shm_env(shm_dir, THRESHOLD))
    small, edge = os.urandom(THRESHOLD - 1), os.urandom(THRESHOLD)
    values: list[Value] = [(["small"], small, False), (["edge"], edge, True)]
    worker.send_raw(request(1, "echo", {"small": None, "edge": None}, values, shm_dir))
    message, entries = receive(worker, shm_dir)
    assert message == ok(1, {"echoed": {"small": small, "edge": edge}})
    # At least the threshold: a segment; one byte less: inline.
    assert where(entries) == [
        (["result", "echoed", "small"], "inline"),
        (["result", "echoed", "edge"], "shm"),
    ]
    assert files(shm_dir) == ["req-1-1"]


def test_a_request_segment_reaches_the_handler_as_a_buffer(spawn: Spawn, shm_dir: Path) -> None:
    worker = spawn("worker", shm_env(shm_dir, THRESHOLD))
    values: list[Value] = [(["a"], b"\x05" * 100_000, True), (["b", 0], b"\x06", False)]
    worker.send_raw(request(1, "kinds", {"a": None, "b": [None, 2]}, values, shm_dir))
    assert receive(worker, shm_dir)[0] == ok(
        1, {"a": {"buffer": 100_000, "first": 5}, "b": [{"buffer": 1, "first": 6}, 2]}
    )


def test_shared_memory_is_not_bounded_by_the_frame_limit(spawn: Spawn, shm_dir: Path) -> None:
    worker = spawn("worker", {**shm_env(shm_dir, 1024), "SNAKEPIT_MAX_FRAME_BYTES": "4096"})
    worker.send("sized", {"n": MiB}, id=1)
    message, entries = receive(worker, shm_dir)
    assert message == ok(1, b"x" * MiB) and where(entries) == [(["result"], "shm")]


def test_nested_and_several_values_mixed_inline_and_shared(spawn: Spawn, shm_dir: Path) -> None:
    worker = spawn("worker", shm_env(shm_dir, THRESHOLD, text_threshold=1000))
    worker.send("mix", {"big": 200_000, "text": 40_000}, id=3)
    message, entries = receive(worker, shm_dir)
    assert message == ok(
        3,
        {
            "big": b"\x01" * 200_000,
            "small": b"small",
            "list": [b"\x02" * 200_000, "short", "t" * 40_000, {"deep": "é" * 40_000}],
            "n": 1,
        },
    )
    assert where(entries) == [
        (["result", "big"], "shm"),
        (["result", "small"], "inline"),
        (["result", "list", 0], "shm"),
        (["result", "list", 2], "inline text"),  # 40,000 bytes: under 64 KiB
        (["result", "list", 3, "deep"], "shm text"),  # 80,000 bytes of UTF-8
    ]
    assert files(shm_dir) == []
    # Through the bundled bridge's echo: the same lanes back.
    bridge = spawn(env=shm_env(shm_dir, THRESHOLD, text_threshold=1000))
    big, text = os.urandom(300_000), "ü" * 50_000
    values: list[Value] = [
        (["x", 0], big, True),
        (["x", 1, "y"], b"tiny", False),
        (["t"], text, True),
        (["u"], "short text", False),
    ]
    args = {"x": [None, {"y": None, "z": 5}], "t": None, "u": None, "v": "json"}
    bridge.send_raw(request(4, "echo", args, values, shm_dir))
    message, entries = receive(bridge, shm_dir)
    expected = {"x": [big, {"y": b"tiny", "z": 5}], "t": text, "u": "short text", "v": "json"}
    assert message == ok(4, {"echoed": expected})
    assert [lane for _, lane in where(entries)] == ["shm", "inline", "shm text"]
    assert files(shm_dir) == ["req-4-0", "req-4-2"]


def test_a_file_already_there_is_never_overwritten_nor_deleted(spawn: Spawn, shm_dir: Path) -> None:
    sentinels = {f"{SHM_PREFIX}{n}": f"not yours {n}".encode() for n in range(100)}
    for name, data in sentinels.items():
        (shm_dir / name).write_bytes(data)
    worker = spawn("worker", shm_env(shm_dir, 1024))
    worker.send("sized", {"n": 5000}, id=1)
    body = worker.receive_body()
    envelope, _ = split_binary_body(body)
    (entry,) = envelope["$binary"]
    assert entry.get("shm") not in sentinels  # inline (O_EXCL refused the name) or another
    assert {p.name: p.read_bytes() for p in shm_dir.iterdir() if p.name in sentinels} == sentinels
    assert decode(body, shm_dir)[0] == ok(1, b"x" * 5000)


# -------------------------------------------------------------------------------------------
# Text attachments
# -------------------------------------------------------------------------------------------


def test_text_entries_reach_the_handler_as_strings(spawn: Spawn, shm_dir: Path) -> None:
    worker = spawn("worker", shm_env(shm_dir, THRESHOLD))
    shared, inline = "\ufeffé" * 40_000, "日本語😀"  # a BOM is kept; 😀 is 2 UTF-16 units
    values: list[Value] = [(["s"], shared, True), (["i"], inline, False), (["e"], "", False)]
    worker.send_raw(request(1, "kinds", {"s": None, "i": None, "e": None}, values, shm_dir))
    assert receive(worker, shm_dir) == (
        ok(
            1,
            {
                "s": {"string": 80_000, "head": "\ufeffé\ufeff"},
                "i": {"string": 5, "head": "日本語"},
                "e": {"string": 0, "head": ""},
            },
        ),
        [],  # short strings stay in the JSON: no SNAKEPIT_TEXT_THRESHOLD
    )


def test_long_strings_go_as_text_attachments_only_with_the_threshold(spawn: Spawn) -> None:
    text = "ab" * 50_000
    plain = spawn()
    plain.send("echo", {"s": text}, id=1)
    assert receive(plain) == (ok(1, {"echoed": {"s": text}}), [])
    worker = spawn(env={"SNAKEPIT_TEXT_THRESHOLD": "100000"})
    args = {"s": text, "shorter": text[:-1], "l": [text[:-1], text], "n": 1}
    worker.send("echo", args, id=2)
    message, entries = receive(worker)
    assert message == ok(2, {"echoed": args})
    assert entries == [
        {"path": ["result", "echoed", "s"], "size": 100_000, "text": True},
        {"path": ["result", "echoed", "l", 1], "size": 100_000, "text": True},
    ]


def test_the_text_threshold_counts_utf16_units(spawn: Spawn) -> None:
    worker = spawn("worker", {"SNAKEPIT_TEXT_THRESHOLD": "10"})
    for request_id, (char, n, lane) in enumerate(
        [("é", 10, "inline text"), ("😀", 5, "inline text"), ("é", 9, None), ("😀", 4, None)]
    ):
        worker.send("text", {"char": char, "n": n}, id=request_id)
        message, entries = receive(worker)
        assert message == ok(request_id, char * n)
        assert where(entries) == ([(["result"], lane)] if lane else []), (char, n)


def test_a_string_with_a_lone_surrogate_stays_in_the_json(spawn: Spawn) -> None:
    worker = spawn("worker", {"SNAKEPIT_TEXT_THRESHOLD": "10"})
    worker.send("lone", {"n": 100}, id=1)
    body = worker.receive_body()
    assert body[:1] == b"{" and b'"\\ud800yyy' in body
    worker.send("boxed", {"n": 100}, id=2)  # a String object is its string, as text
    assert receive(worker) == (
        ok(2, {"s": "z" * 100}),
        [{"path": ["result", "s"], "size": 100, "text": True}],
    )


def test_protocol_1_never_sends_text_attachments(spawn: Spawn) -> None:
    worker = spawn(env={"SNAKEPIT_TEXT_THRESHOLD": "10"}, max_in_flight=None)
    worker.handshake()
    assert worker.result("echo", {"s": "x" * 100}) == {"echoed": {"s": "x" * 100}}


# -------------------------------------------------------------------------------------------
# A full /dev/shm: inline instead
# -------------------------------------------------------------------------------------------


def test_a_full_tmpfs_sends_the_value_inline_and_leaves_no_segment(
    spawn: Spawn, shm_dir: Path
) -> None:
    def small(argv: list[str]) -> list[str]:
        return on_small_tmpfs(shm_dir, "1m", argv)

    worker = spawn("worker", shm_env(shm_dir, THRESHOLD, text_threshold=1000), wrap=small)
    worker.send("sized", {"n": 2 * MiB}, id=1)
    message, entries = receive(worker, shm_dir)
    assert message == ok(1, b"x" * (2 * MiB)) and where(entries) == [(["result"], "inline")]
    worker.send("segments", id=2)
    assert receive(worker) == (ok(2, []), [])  # the half-written segment is gone
    # Text falls back too, and what fits still goes through the (private) tmpfs.
    worker.send("text", {"n": 2 * MiB}, id=3)
    message, entries = receive(worker, shm_dir)
    assert message == ok(3, "y" * (2 * MiB)) and where(entries) == [(["result"], "inline text")]
    worker.send("sized", {"n": 100_000}, id=4)
    message, entries = receive(worker, Path(f"/proc/{worker.proc.pid}/root{shm_dir}"))
    assert message == ok(4, b"x" * 100_000) and where(entries) == [(["result"], "shm")]
    worker.send("segments", id=5)
    assert receive(worker) == (ok(5, []), [])
    worker.close_stdin()
    assert worker.wait() == 0
    stderr = worker.stderr_text()
    # Said once, not per value.
    assert stderr.count("sending the value inline") == 1 and "ENOSPC" in stderr, stderr


def test_inline_after_a_full_tmpfs_is_still_bounded_by_the_frame_limit(
    spawn: Spawn, shm_dir: Path
) -> None:
    def small(argv: list[str]) -> list[str]:
        return on_small_tmpfs(shm_dir, "1m", argv)

    env = {**shm_env(shm_dir, THRESHOLD), "SNAKEPIT_MAX_FRAME_BYTES": "500000"}
    worker = spawn("worker", env, wrap=small)
    # Two values of 600 KB: the first fits in the tmpfs, the second does not, and inline it is
    # over the frame limit.
    worker.send("mix", {"big": 600_000, "text": 1}, id=1)
    assert re.fullmatch(
        r"mix: response of \d+ bytes exceeds the frame limit of 500000 bytes", failure(worker, 1)
    )
    worker.send("segments", id=2)
    assert receive(worker) == (ok(2, []), [])  # the segment that was written is gone too


# -------------------------------------------------------------------------------------------
# The payload limit
# -------------------------------------------------------------------------------------------


def test_a_response_over_the_payload_limit_is_refused(spawn: Spawn, shm_dir: Path) -> None:
    worker = spawn("worker", shm_env(shm_dir, 1024, max_payload_bytes=100_000))
    worker.send("sized", {"n": 99_000}, id=1)
    message, entries = receive(worker, shm_dir)
    assert message == ok(1, b"x" * 99_000) and where(entries) == [(["result"], "shm")]
    worker.send("sized", {"n": 100_000}, id=2)
    error = failure(worker, 2)
    match = re.fullmatch(
        r"sized: response of (\d+) bytes exceeds the payload limit of 100000 bytes", error
    )
    assert match and 100_000 < int(match[1]) < 100_200, error
    assert files(shm_dir) == []  # no segment made
    # A plain JSON response is bounded too, with the same wording.
    worker.send("text", {"n": 100_000}, id=3)
    size = len(json.dumps(ok(3, "y" * 100_000), separators=(",", ":")))
    assert failure(worker, 3) == (
        f"text: response of {size} bytes exceeds the payload limit of 100000 bytes"
    )
    assert worker.result("ping")["status"] == "ok"


def test_a_stream_item_over_the_payload_limit_ends_the_stream(spawn: Spawn, shm_dir: Path) -> None:
    worker = spawn("worker", shm_env(shm_dir, 1024, max_payload_bytes=100_000))
    worker.send("chunks", {"n": 3, "size": 200_000}, id=1, meta=stream_meta(8))
    assert re.fullmatch(
        r"chunks: item of \d+ bytes exceeds the payload limit of 100000 bytes", failure(worker, 1)
    )
    assert files(shm_dir) == []


# -------------------------------------------------------------------------------------------
# Streams
# -------------------------------------------------------------------------------------------


def test_stream_items_travel_in_segments(spawn: Spawn, shm_dir: Path) -> None:
    worker = spawn("worker", shm_env(shm_dir, THRESHOLD))
    size = 100_000
    worker.send("chunks", {"n": 3, "size": size}, id=9, meta=stream_meta(2))
    for i in range(2):
        item, entries = receive(worker, shm_dir)
        assert item == {"id": 9, "item": {"i": i, "data": bytes([i]) * size}}
        assert where(entries) == [(["item", "data"], "shm")]
    worker.send("$credit", {"items": 2}, id=9)
    item, entries = receive(worker, shm_dir)
    assert item == {"id": 9, "item": {"i": 2, "data": b"\x02" * size}}
    assert receive(worker, shm_dir) == (ok(9, "end"), [])
    assert files(shm_dir) == []
    # A plain echo asked for a stream: its one item in a segment.
    data = os.urandom(size)
    meta = stream_meta(4)
    worker = spawn(env=shm_env(shm_dir, THRESHOLD))
    worker.send_raw(request(2, "echo", {"b": None}, [(["b"], data, True)], shm_dir, meta))
    item, entries = receive(worker, shm_dir)
    assert item == {"id": 2, "item": {"echoed": {"b": data}}}
    assert where(entries) == [(["item", "echoed", "b"], "shm")]
    assert receive(worker) == (ok(2, None), [])


# -------------------------------------------------------------------------------------------
# Bad request segments: the stream cannot be trusted, exit 3
# -------------------------------------------------------------------------------------------


def entry_frame(entry: dict[str, Any], attachments: bytes = b"") -> bytes:
    message = {"id": 1, "command": "echo", "args": {"a": None}, "$binary": [entry]}
    return frame(binary_body(message, attachments))


def shm_entry(name: Any, size: int = 3, **extra: Any) -> dict[str, Any]:
    return {"path": ["args", "a"], "size": size, "shm": name, **extra}


def make_symlink(directory: Path) -> None:
    (directory / "target").write_bytes(b"abcdef")
    (directory / "link").symlink_to(directory / "target")


BAD_SEGMENTS: dict[str, tuple[Callable[[Path], Any], dict[str, Any], str]] = {
    "missing": (
        lambda d: None,
        shm_entry("gone"),
        'shared-memory segment \'gone\' (value at ["args","a"]) cannot be opened',
    ),
    "shorter than its size": (
        lambda d: (d / "short").write_bytes(b"ab"),
        shm_entry("short"),
        'segment \'short\' (value at ["args","a"]) has 2 bytes, fewer than its size of 3',
    ),
    "a name with a slash": (
        lambda d: (d / "sub").mkdir() or (d / "sub" / "x").write_bytes(b"abc"),
        shm_entry("sub/x"),
        "'$binary' entry's 'shm' is not a segment's file name",
    ),
    "dot": (lambda d: None, shm_entry("."), "'shm' is not a segment's file name"),
    "dot dot": (lambda d: None, shm_entry(".."), "'shm' is not a segment's file name"),
    "empty name": (lambda d: None, shm_entry(""), "'shm' is not a segment's file name"),
    "not a string": (lambda d: None, shm_entry(7), "'shm' is not a segment's file name"),
    "a symlink": (make_symlink, shm_entry("link"), "cannot be opened: it is a symbolic link"),
    "a directory": (
        lambda d: (d / "dir").mkdir(),
        shm_entry("dir"),
        'segment \'dir\' (value at ["args","a"]) is not a regular file',
    ),
    "a fifo": (lambda d: os.mkfifo(d / "fifo"), shm_entry("fifo"), "is not a regular file"),
    "not UTF-8 text": (
        lambda d: (d / "bad").write_bytes(b"a\xffb"),
        shm_entry("bad", text=True),
        'text value at ["args","a"] is not valid UTF-8',
    ),
    "a surrogate as text": (
        lambda d: (d / "sur").write_bytes("\ud800".encode("utf-8", "surrogatepass")),
        shm_entry("sur", text=True),
        "is not valid UTF-8",
    ),
    "text neither true nor false": (
        lambda d: (d / "t").write_bytes(b"abc"),
        shm_entry("t", text=1),
        "'$binary' entry's 'text' is neither true nor false",
    ),
}


@pytest.mark.parametrize(
    ("prepare", "entry", "reason"), BAD_SEGMENTS.values(), ids=BAD_SEGMENTS.keys()
)
def test_a_bad_request_segment_exits_3_saying_why(
    spawn: Spawn,
    shm_dir: Path,
    prepare: Callable[[Path], Any],
    entry: dict[str, Any],
    reason: str,
) -> None:
    prepare(shm_dir)
    worker = spawn(env=shm_env(shm_dir, THRESHOLD))
    worker.send_raw(entry_frame(entry))
    assert worker.wait() == 3
    stderr = worker.stderr_text()
    assert "protocol error: " in stderr and reason in stderr, stderr
    assert stderr.rstrip().endswith("exiting"), stderr


def test_inline_text_that_is_not_utf8_exits_3(spawn: Spawn) -> None:
    worker = spawn()
    worker.send_raw(entry_frame({"path": ["args", "a"], "size": 2, "text": True}, b"\xc3("))
    assert worker.wait() == 3
    assert 'text value at ["args","a"] is not valid UTF-8' in worker.stderr_text()


def test_a_segment_without_shared_memory_offered_exits_3(spawn: Spawn, shm_dir: Path) -> None:
    (shm_dir / "seg").write_bytes(b"abc")
    worker = spawn()
    worker.send_raw(entry_frame(shm_entry("seg")))
    assert worker.wait() == 3
    assert "names a shared-memory segment, which this worker did not offer" in worker.stderr_text()


def test_a_segment_longer_than_its_size_gives_its_first_bytes(spawn: Spawn, shm_dir: Path) -> None:
    (shm_dir / "long").write_bytes(b"abcdef")
    worker = spawn(env=shm_env(shm_dir, THRESHOLD))
    worker.send_raw(entry_frame(shm_entry("long", 4)))
    message, entries = receive(worker, shm_dir)
    assert message == ok(1, {"echoed": {"a": b"abcd"}})
    assert where(entries) == [(["result", "echoed", "a"], "inline")]
    assert (shm_dir / "long").read_bytes() == b"abcdef"
