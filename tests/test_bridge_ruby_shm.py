"""Text attachments, shared memory and the payload limit in the Ruby bridge library and bundled
bridge: raw frames, real ruby processes (PROTOCOL.md, "Binary values": *Text attachments*,
*Shared memory*, *Limits*).

These tests play the pool: they create request segments in a private directory on /dev/shm,
read (and delete) the worker's response segments, and check each value's lane (inline or
shared, bytes or text). A tmpfs of 1 MiB mounted over the directory (``on_small_tmpfs``) makes
the worker's segments fail with ENOSPC, as on a full /dev/shm.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from snakepit_ruby.plugin import ruby_adapter, snakepit_adapters

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

CUSTOM_WORKER = r"""
require "snakepit"

Snakepit.run do |s|
  # What the handler got for each argument.
  s.command("kinds") do |args|
    args.transform_values do |value|
      next value.class.name unless value.is_a?(String)

      [value.encoding.name, value.bytesize, value.valid_encoding?, value]
    end
  end
  s.command("blob") { |args| "\xab".b * args["size"] }
  s.command("blobs") { |args| args["sizes"].map { |n| [n % 251].pack("C") * n } }
  s.command("text") { |args| "\u00e9" * args["n"] } # two bytes a character
  s.command("latin1") { |args| ("\xe9".b * args["n"]).force_encoding(Encoding::ISO_8859_1) }
  s.command("invalid") { |args| ("\xff".b * args["n"]).force_encoding(Encoding::UTF_8) }
  s.command("items", stream: true) do |args, ctx|
    args["sizes"].each { |n| ctx.emit({ "n" => n, "b" => "\x07".b * n }) }
    nil
  end
end
"""

#: Generous: a 2-core CI machine may run other tests at the same time.
TIMEOUT = 30.0
#: The shared-memory threshold the tests give workers (bytes).
THRESHOLD = 1000
KIB = 1024

#: A value's lane in a frame: ("inline" or "shm", "bytes" or "text").
Lane = tuple[str, str]


class Worker(RawWorker):
    """A worker, the directory it was offered and the test's request segments."""

    directory: Path
    #: Where the worker's segments are seen from here (through /proc/<pid>/root when it runs
    #: on its own tmpfs).
    segments: Path

    def request(
        self,
        command: str,
        args: dict[str, Any],
        values: dict[tuple[Any, ...], tuple[bytes | str, str]] | None = None,
        **meta: Any,
    ) -> int:
        """Sends `args`, None at each path of `values`: {path: (value, "inline" | "shm")}, a
        str as a text entry; shared ones go to a request segment, as the pool's."""
        self._next_id += 1
        request_id = self._next_id
        entries: list[dict[str, Any]] = []
        attachments = b""
        for number, (path, (value, lane)) in enumerate((values or {}).items()):
            data = value.encode() if isinstance(value, str) else value
            entry: dict[str, Any] = {"path": ["args", *path], "size": len(data)}
            if isinstance(value, str):
                entry["text"] = True
            if lane == "shm":
                entry["shm"] = name = f"pool-{request_id}-{number}"
                (self.directory / name).write_bytes(data)
            else:
                attachments += data
            entries.append(entry)
        message: dict[str, Any] = {"id": request_id, "command": command, "args": args}
        if meta:
            message["meta"] = meta
        if entries:
            message["$binary"] = entries
            self.send_raw(frame(binary_body(message, attachments)))
        else:
            self.send_raw(frame(message))
        return request_id

    def message(self) -> tuple[dict[str, Any], dict[tuple[Any, ...], Lane]]:
        """The next frame with each value in its place (a text entry as a str), and the lane of
        each value by path. Every response segment is checked and deleted, as the pool does."""
        body = self.receive_body(TIMEOUT)
        if body[:1] != b"\x00":
            return json.loads(body), {}
        envelope, attachments = split_binary_body(body)
        inline = iter(attachments)
        lanes: dict[tuple[Any, ...], Lane] = {}
        for entry in envelope.pop("$binary"):
            assert set(entry) <= {"path", "size", "shm", "text"}, entry
            assert entry.get("text", True) is True, entry
            shared = "shm" in entry
            data = self.take_segment(entry["shm"], entry["size"]) if shared else next(inline)
            assert len(data) == entry["size"], entry
            place(envelope, entry["path"], data.decode() if entry.get("text") else data)
            kind = "text" if entry.get("text") else "bytes"
            lanes[tuple(entry["path"])] = ("shm" if shared else "inline", kind)
        return envelope, lanes

    def take_segment(self, name: str, size: int) -> bytes:
        assert name.startswith(SHM_PREFIX) and "/" not in name, name
        path = self.segments / name
        info = os.lstat(path)
        assert stat.S_ISREG(info.st_mode), name
        assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
        assert info.st_uid == os.getuid()
        assert info.st_size == size
        data = path.read_bytes()
        path.unlink()
        return data

    def answer(self, request_id: int) -> tuple[Any, dict[tuple[Any, ...], Lane]]:
        """The result of a request that must succeed, and its values' lanes."""
        message, lanes = self.message()
        assert message["id"] == request_id and message["success"] is True, message
        return message["result"], lanes

    def failure(self, request_id: int) -> str:
        message, lanes = self.message()
        assert message == {"id": request_id, "success": False, "error": message.get("error")}
        assert not lanes
        return str(message["error"])

    def left_behind(self) -> list[str]:
        """The worker's segments in its directory (none once all were taken)."""
        return sorted(
            path.name for path in self.segments.iterdir() if path.name.startswith(SHM_PREFIX)
        )


def place(message: dict[str, Any], path: list[Any], value: Any) -> None:
    target: Any = message
    for key in path[:-1]:
        target = target[key]
    assert target[path[-1]] is None, path
    target[path[-1]] = value


Start = Callable[..., Worker]


@pytest.fixture
def start(tmp_path: Path, shm_dir: Path) -> Iterator[Start]:
    """Starts the bundled bridge (or the custom worker), offered shared memory in `shm_dir`
    unless `shm=False`, and shakes hands with max_in_flight."""
    workers: list[Worker] = []
    script = tmp_path / "custom.rb"
    script.write_text(CUSTOM_WORKER)

    def start(
        max_in_flight: int | None = 4,
        *,
        custom: bool = False,
        shm: bool = True,
        threshold: int = THRESHOLD,
        text_threshold: int | None = None,
        max_payload: int | None = None,
        small_tmpfs: bool = False,
        env: dict[str, str] | None = None,
    ) -> Worker:
        adapter = ruby_adapter("custom", script) if custom else snakepit_adapters()[0]
        environment = {**(adapter.env or {}), **(env or {})}
        if shm:
            environment.update(
                shm_env(
                    shm_dir,
                    threshold,
                    text_threshold=text_threshold,
                    max_payload_bytes=max_payload,
                )
            )
        else:
            if text_threshold is not None:
                environment["SNAKEPIT_TEXT_THRESHOLD"] = str(text_threshold)
            if max_payload is not None:
                environment["SNAKEPIT_MAX_PAYLOAD_BYTES"] = str(max_payload)
        argv = list(adapter.command_line())
        if small_tmpfs:
            argv = on_small_tmpfs(shm_dir, "1m", argv)
        worker = Worker(argv, env=environment)
        workers.append(worker)
        worker.directory = shm_dir
        worker.segments = Path(f"/proc/{worker.proc.pid}/root{shm_dir}") if small_tmpfs else shm_dir
        worker.shake_hands(max_in_flight, "raw-s")
        return worker

    yield start
    for worker in workers:
        worker.kill()


both_modes = pytest.mark.parametrize("max_in_flight", [1, 4])


def pattern(size: int, seed: int = 0) -> bytes:
    return bytes((seed + k * 7) % 256 for k in range(256)) * (size // 256) + b"\x01" * (size % 256)


# -------------------------------------------------------------------------------------------
# Handshake
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_in_flight", [1, 8])
@pytest.mark.parametrize("shm", [True, False], ids=["shm offered", "no shm"])
def test_the_handshake_lists_text_and_shm_only_when_offered(
    start: Start, max_in_flight: int, shm: bool
) -> None:
    worker = start(max_in_flight, shm=shm)
    expected = [*PROTOCOL_2_CAPABILITIES, "shm"] if shm else PROTOCOL_2_CAPABILITIES
    assert worker.handshake_answer["capabilities"] == expected
    assert worker.result("ping")["capabilities"] == ["cancel"]  # a health check: as always


def test_a_protocol_1_handshake_offered_shm_lists_only_cancel(start: Start) -> None:
    assert start(None).handshake_answer["capabilities"] == ["cancel"]


# -------------------------------------------------------------------------------------------
# Shared memory both ways
# -------------------------------------------------------------------------------------------


@both_modes
def test_echo_reads_a_request_segment_and_answers_through_a_response_segment(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight)
    value = pattern(256 * KIB + 3)
    request_id = worker.request("echo", {"b": None}, {("b",): (value, "shm")})
    body = worker.receive_body(TIMEOUT)
    envelope, attachments = split_binary_body(body)
    assert attachments == []
    assert envelope == {
        "id": request_id,
        "success": True,
        "result": {"echoed": {"b": None}},
        "$binary": [
            {"path": ["result", "echoed", "b"], "size": len(value), "shm": SHM_PREFIX + "1"}
        ],
    }
    assert worker.take_segment(SHM_PREFIX + "1", len(value)) == value  # 0600, regular, ours
    # the request segment is the pool's: left as it was
    assert (worker.directory / f"pool-{request_id}-0").read_bytes() == value
    assert worker.left_behind() == []


def test_values_below_the_threshold_stay_inline_and_at_it_go_shared(start: Start) -> None:
    worker = start()
    below, at = pattern(THRESHOLD - 1, 1), pattern(THRESHOLD, 2)
    request_id = worker.request(
        "echo", {"below": None, "at": None}, {("below",): (below, "inline"), ("at",): (at, "shm")}
    )
    result, lanes = worker.answer(request_id)
    assert result == {"echoed": {"below": below, "at": at}}
    assert lanes == {
        ("result", "echoed", "below"): ("inline", "bytes"),
        ("result", "echoed", "at"): ("shm", "bytes"),
    }
    assert worker.left_behind() == []


def test_an_empty_value_can_come_in_a_segment(start: Start) -> None:
    worker = start(custom=True)
    request_id = worker.request("kinds", {"e": None}, {("e",): (b"", "shm")})
    result, _ = worker.answer(request_id)
    assert result == {"e": ["ASCII-8BIT", 0, True, b""]}


@both_modes
def test_nested_and_several_values_mixed_inline_and_shared(
    start: Start, max_in_flight: int
) -> None:
    worker = start(max_in_flight, text_threshold=100)
    big, small = pattern(5000, 3), b"\x00\xff\x10"
    long_text, short_text = "\u00e9t\u00e9 " * 600, "caf\u00e9"  # 3600 bytes; 5 bytes
    args = {
        "list": [None, 1, {"deep": [None, "plain"]}, None],
        "obj": {"big": None, "small": None},
        "json": "stays in the JSON",
    }
    values: dict[tuple[Any, ...], tuple[bytes | str, str]] = {
        ("list", 0): (big, "shm"),
        ("list", 2, "deep", 0): (small, "inline"),
        ("list", 3): (long_text, "shm"),
        ("obj", "big"): (pattern(2000, 4), "inline"),  # the pool's choice: any lane may come
        ("obj", "small"): (short_text, "inline"),
    }
    request_id = worker.request("echo", args, values)
    result, lanes = worker.answer(request_id)
    assert result == {
        "echoed": {
            "list": [big, 1, {"deep": [small, "plain"]}, long_text],
            "obj": {"big": pattern(2000, 4), "small": short_text},
            "json": "stays in the JSON",
        }
    }
    echoed = ("result", "echoed")
    assert lanes == {  # the worker's own choice going out: by size, in the walk's order
        (*echoed, "list", 0): ("shm", "bytes"),
        (*echoed, "list", 2, "deep", 0): ("inline", "bytes"),
        (*echoed, "list", 3): ("shm", "text"),
        (*echoed, "obj", "big"): ("shm", "bytes"),
    }
    assert worker.left_behind() == []


def test_many_requests_in_flight_get_segments_of_their_own(start: Start) -> None:
    worker = start(16)
    sent = {}
    for k in range(24):
        value = pattern(THRESHOLD + k * 100, k)
        sent[worker.request("echo", {"v": None}, {("v",): (value, "shm")})] = value
    got = {}
    for _ in sent:
        message, lanes = worker.message()
        assert lanes == {("result", "echoed", "v"): ("shm", "bytes")}
        got[message["id"]] = message["result"]["echoed"]["v"]
    assert got == sent
    assert worker.left_behind() == []


# -------------------------------------------------------------------------------------------
# Text attachments
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shm", [True, False], ids=["shm offered", "no shm"])
def test_a_text_entry_arrives_in_the_handler_as_a_utf8_string(start: Start, shm: bool) -> None:
    worker = start(custom=True, shm=shm)
    text = "\u65e5\u672c\u8a9e \u00e9 \U0001f40d " * 200
    values: dict[tuple[Any, ...], tuple[bytes | str, str]] = {
        ("inline",): (text, "inline"),
        ("bytes",): (b"\xffab", "inline"),
    }
    if shm:
        values[("shared",)] = (text, "shm")
        values[("shared_bytes",)] = (b"\xfe" * 3000, "shm")
    args = {name: None for (name,) in values} | {"json": "\u00e9"}
    request_id = worker.request("kinds", args, values)
    result, _ = worker.answer(request_id)
    size = len(text.encode())
    expected = {
        "inline": ["UTF-8", size, True, text],
        "bytes": ["ASCII-8BIT", 3, True, b"\xffab"],
        "json": ["UTF-8", 2, True, "\u00e9"],
    }
    if shm:
        expected["shared"] = ["UTF-8", size, True, text]
        expected["shared_bytes"] = ["ASCII-8BIT", 3000, True, b"\xfe" * 3000]
    assert result == expected


@pytest.mark.parametrize("text_threshold", [None, 100])
def test_echo_sends_a_long_string_as_a_text_attachment_only_with_the_threshold(
    start: Start, text_threshold: int | None
) -> None:
    worker = start(text_threshold=text_threshold, threshold=4000)
    long_text = "\u00e9" * 50  # 100 bytes: Ruby counts bytes
    short_text = "\u00e9" * 49 + "x"  # 99 bytes
    shared_text = "\u00e9" * 2000  # 4000 bytes: at the shared-memory threshold
    args = {"long": long_text, "short": short_text, "shared": shared_text}
    request_id = worker.request("echo", args)
    result, lanes = worker.answer(request_id)
    assert result == {"echoed": args}
    if text_threshold is None:
        assert lanes == {}  # a plain JSON frame
    else:
        assert lanes == {
            ("result", "echoed", "long"): ("inline", "text"),
            ("result", "echoed", "shared"): ("shm", "text"),
        }
    assert worker.left_behind() == []


def test_a_text_attachment_goes_out_as_text_without_shared_memory(start: Start) -> None:
    worker = start(shm=False, text_threshold=10, custom=True)
    worker.send("text", {"n": 5}, id=1)
    body = worker.receive_body(TIMEOUT)
    envelope, attachments = split_binary_body(body)
    assert envelope == {
        "id": 1,
        "success": True,
        "result": None,
        "$binary": [{"path": ["result"], "size": 10, "text": True}],
    }
    assert attachments == ["\u00e9\u00e9\u00e9\u00e9\u00e9".encode()]


def test_strings_that_are_not_utf8_stay_in_the_json(start: Start) -> None:
    """An ISO-8859-1 String goes into the JSON, transcoded; invalid UTF-8 is refused there."""
    worker = start(custom=True, text_threshold=10)
    request_id = worker.request("latin1", {"n": 40})
    assert worker.answer(request_id) == ("\u00e9" * 40, {})
    request_id = worker.request("invalid", {"n": 40})
    assert worker.failure(request_id).startswith("invalid: result cannot be encoded as JSON")


# -------------------------------------------------------------------------------------------
# A full /dev/shm: ENOSPC, values inline
# -------------------------------------------------------------------------------------------


def test_a_segment_that_does_not_fit_goes_inline_and_nothing_is_left(start: Start) -> None:
    worker = start(custom=True, small_tmpfs=True)
    sizes = [600 * KIB, 600 * KIB, 10]  # the second finds 424 KiB left: ENOSPC half-way
    request_id = worker.request("blobs", {"sizes": sizes})
    result, lanes = worker.answer(request_id)
    assert result == [bytes([n % 251]) * n for n in sizes]
    assert lanes == {
        ("result", 0): ("shm", "bytes"),
        ("result", 1): ("inline", "bytes"),
        ("result", 2): ("inline", "bytes"),
    }
    assert worker.left_behind() == []  # the half-written one was deleted
    request_id = worker.request("blobs", {"sizes": [2 * KIB * KIB]})  # the tmpfs is empty again
    result, lanes = worker.answer(request_id)
    assert result == [bytes([(2 * KIB * KIB) % 251]) * (2 * KIB * KIB)]
    assert lanes == {("result", 0): ("inline", "bytes")}
    assert worker.left_behind() == []
    worker.close_stdin()
    assert worker.wait(TIMEOUT) == 0
    stderr = worker.stderr_text()
    assert stderr.count("cannot write a shared-memory segment") == 1, stderr
    assert "No space left on device" in stderr


def test_inline_after_enospc_is_still_bounded_by_the_frame_limit(start: Start) -> None:
    worker = start(custom=True, small_tmpfs=True, env={"SNAKEPIT_MAX_FRAME_BYTES": str(KIB * KIB)})
    request_id = worker.request("blobs", {"sizes": [600 * KIB, 2 * KIB * KIB]})
    error = worker.failure(request_id)
    assert re.fullmatch(r"blobs: response of \d+ bytes exceeds the frame limit 1048576", error)
    assert worker.left_behind() == []  # the first value's segment too
    request_id = worker.request("blobs", {"sizes": [600 * KIB]})  # and the worker goes on
    assert worker.answer(request_id)[1] == {("result", 0): ("shm", "bytes")}


# -------------------------------------------------------------------------------------------
# The payload limit
# -------------------------------------------------------------------------------------------


def envelope_size(request_id: int, size: int, name: str) -> int:
    entry = {"path": ["result"], "size": size, "shm": name}
    message = {"id": request_id, "success": True, "result": None, "$binary": [entry]}
    return len(json.dumps(message, separators=(",", ":")))


def test_a_response_over_the_payload_limit_fails_and_leaves_no_segment(start: Start) -> None:
    worker = start(custom=True, max_payload=10_000)
    request_id = worker.request("blob", {"size": 20_000})  # the values alone are over it
    error = worker.failure(request_id)
    assert re.fullmatch(
        r"blob: response of (\d+) bytes exceeds the payload limit of 10000 bytes", error
    )
    assert int(error.split()[3]) > 20_000
    request_id = worker.request("blob", {"size": 9_990})  # the envelope takes it over
    expected = envelope_size(request_id, 9_990, SHM_PREFIX + "1") + 9_990
    assert worker.failure(request_id) == (
        f"blob: response of {expected} bytes exceeds the payload limit of 10000 bytes"
    )
    assert worker.left_behind() == []
    request_id = worker.request("blob", {"size": 9_000})  # under it: answered
    assert worker.answer(request_id) == (b"\xab" * 9_000, {("result",): ("shm", "bytes")})
    request_id = worker.request("text", {"n": 6_000})  # a plain JSON answer is bounded too
    assert re.fullmatch(
        r"text: response of \d+ bytes exceeds the payload limit of 10000 bytes",
        worker.failure(request_id),
    )
    assert worker.left_behind() == []


def test_a_stream_item_over_the_payload_limit_ends_the_stream(start: Start) -> None:
    worker = start(custom=True, max_payload=10_000)
    request_id = worker.request("items", {"sizes": [2000, 20_000, 5]}, stream={"window": 8})
    message, lanes = worker.message()
    assert message == {"id": request_id, "item": {"n": 2000, "b": b"\x07" * 2000}}
    assert lanes == {("item", "b"): ("shm", "bytes")}
    error = worker.failure(request_id)
    assert re.fullmatch(
        r"items: response of \d+ bytes exceeds the payload limit of 10000 bytes", error
    )
    assert worker.left_behind() == []


# -------------------------------------------------------------------------------------------
# Streams
# -------------------------------------------------------------------------------------------


@both_modes
def test_stream_items_carry_values_in_segments(start: Start, max_in_flight: int) -> None:
    worker = start(max_in_flight, custom=True)
    sizes = [10, 5000, 20, 3000]
    request_id = worker.request("items", {"sizes": sizes}, stream={"window": 2})
    items = []
    for _ in sizes:
        message, lanes = worker.message()
        assert message["id"] == request_id, message
        items.append(message["item"])
        shared = message["item"]["n"] >= THRESHOLD
        assert lanes == {("item", "b"): ("shm" if shared else "inline", "bytes")}
        worker.send("$credit", {"items": 1}, id=request_id)
    assert items == [{"n": n, "b": b"\x07" * n} for n in sizes]
    message, _ = worker.message()
    assert message == {"id": request_id, "success": True, "result": None}
    assert worker.left_behind() == []


# -------------------------------------------------------------------------------------------
# Bad request segments: the worker logs why and exits with status 3
# -------------------------------------------------------------------------------------------


def bad_entry(directory: Path, case: str) -> tuple[dict[str, Any], bytes]:
    """The `$binary` entry (for args.v) of a bad request, and its inline bytes; sets up the
    directory for it."""
    entry: dict[str, Any] = {"path": ["args", "v"], "size": 10}
    good = directory / "good"
    good.write_bytes(b"0123456789")
    if case == "missing":
        entry["shm"] = "missing"
    elif case == "shorter than its size":
        (directory / "short").write_bytes(b"012345678")
        entry["shm"] = "short"
    elif case == "a name with a slash":
        (directory / "sub").mkdir()
        (directory / "sub" / "x").write_bytes(b"0123456789")
        entry["shm"] = "sub/x"
    elif case == "a name leading out":
        entry["shm"] = f"../{directory.name}/good"
    elif case in (".", ".."):
        entry["shm"] = case
    elif case == "empty name":
        entry["shm"] = ""
    elif case == "name not a string":
        entry["shm"] = 7
    elif case == "a symlink":
        (directory / "link").symlink_to(good)
        entry["shm"] = "link"
    elif case == "a fifo":
        os.mkfifo(directory / "fifo")
        entry["shm"] = "fifo"
    elif case == "a directory":
        (directory / "dir").mkdir()
        entry["shm"] = "dir"
        entry["size"] = 0
    elif case == "invalid UTF-8 text in a segment":
        (directory / "bad").write_bytes(b"ok \xff\xfe 0123")
        entry.update(shm="bad", text=True)
    elif case == "invalid UTF-8 text inline":
        entry["text"] = True
        return entry, b"\xc3\x28 56789ab"
    elif case == "text not a boolean":
        entry.update(shm="good", text="yes")
    elif case == "not offered":
        entry["shm"] = "good"
    else:
        raise AssertionError(case)
    return entry, b""


BAD = {
    "missing": 'cannot read shared-memory segment "missing" (No such file or directory',
    "shorter than its size": 'segment "short" has 9 bytes, fewer than its size of 10',
    "a name with a slash": "'shm' is not a segment's name",
    "a name leading out": "'shm' is not a segment's name",
    ".": "'shm' is not a segment's name",
    "..": "'shm' is not a segment's name",
    "empty name": "'shm' is not a segment's name",
    "name not a string": "'shm' is not a segment's name",
    "a symlink": 'cannot read shared-memory segment "link" (Too many levels of symbolic links',
    "a fifo": 'shared-memory segment "fifo" is not a regular file',
    "a directory": 'shared-memory segment "dir" is not a regular file',
    "invalid UTF-8 text in a segment": 'text value at ["args", "v"] is not valid UTF-8',
    "invalid UTF-8 text inline": 'text value at ["args", "v"] is not valid UTF-8',
    "text not a boolean": "'text' must be true or false",
    "not offered": "names a shared-memory segment, which this worker was not offered",
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_request_segment_exits_3_with_the_reason(
    start: Start, shm_dir: Path, case: str
) -> None:
    worker = start(4, shm=case != "not offered")
    entry, attachments = bad_entry(shm_dir, case)
    message = {"id": 9, "command": "echo", "args": {"v": None}, "$binary": [entry]}
    started = time.monotonic()
    worker.send_raw(frame(binary_body(message, attachments)))
    assert worker.wait(TIMEOUT) == 3
    assert time.monotonic() - started < 5  # a fifo does not block the worker
    stderr = worker.stderr_text()
    assert "snakepit-ruby: protocol error: " in stderr and "; exiting" in stderr, stderr
    assert BAD[case] in stderr, stderr
    assert (shm_dir / "good").read_bytes() == b"0123456789"  # the pool's segments untouched


def test_a_bad_segment_while_a_handler_runs_exits_3(start: Start, shm_dir: Path) -> None:
    """At one request at a time, the watcher reads while a handler runs: the same rule."""
    worker = start(1)
    worker.send("sleep", {"seconds": 5})
    entry, _ = bad_entry(shm_dir, "missing")
    message = {"id": 9, "command": "echo", "args": {"v": None}, "$binary": [entry]}
    worker.send_raw(frame(binary_body(message)))
    assert worker.wait(TIMEOUT) == 3
    assert 'cannot read shared-memory segment "missing"' in worker.stderr_text()
