"""Binary frames on the host side (docs/PROTOCOL.md, *Binary values*): what the pool encodes,
what its decoder accepts, and that binary never goes to a worker that cannot take it."""

from __future__ import annotations

import array
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snakepit_core import Pool
from snakepit_core.binary import encode_binary_frame
from snakepit_core.errors import ProtocolError, ValidationError
from snakepit_core.json_values import check_arguments
from snakepit_core.protocol import STDLIB_CODEC, FrameDecoder, get_codec

CODECS = [STDLIB_CODEC, get_codec()]

json_leaves = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
binary_leaves = st.binary(max_size=64) | st.binary(max_size=64).map(bytearray)
values = st.recursive(
    json_leaves | binary_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def as_received(value: Any) -> Any:
    """What the host gets back: every binary value as ``bytes``."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict):
        return {key: as_received(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [as_received(item) for item in value]
    return value


def decode(frame: bytes, codec: Any = STDLIB_CODEC) -> Any:
    (message,) = FrameDecoder(codec=codec).feed(frame)
    return message


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@settings(max_examples=150, deadline=None)
@given(args=st.dictionaries(st.text(max_size=8), values, max_size=5))
def test_what_the_pool_encodes_decodes_to_the_same_values_with_bytes(codec, args):
    checked = check_arguments(args, adapter="a", command="c")
    message = {"id": 1, "command": "c", "args": args}
    binary = [(("args", *path), view) for path, view in checked.binary]
    if not binary:
        return
    before = as_received(args)
    frame = encode_binary_frame(message, binary, 1 << 20, codec, checked.exact)
    assert as_received(args) == before, "the caller's arguments were changed"
    assert decode(frame, codec) == {"id": 1, "command": "c", "args": before}


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=200), envelope=st.one_of(st.none(), values))
def test_the_decoder_refuses_any_bad_binary_frame_with_a_protocol_error(body, envelope):
    """Random bytes after the mark, and well-formed envelopes with random ``$binary`` lists
    and tails: either a message comes out, or a ProtocolError; never anything else."""
    import json

    candidates = [b"\x00" + body]
    if envelope is not None:
        head = json.dumps(
            {"id": 1, "success": True, "result": None, "$binary": as_json(envelope)}
        ).encode()
        candidates.append(b"\x00" + len(head).to_bytes(4, "big") + head + body)
    for candidate in candidates:
        frame = len(candidate).to_bytes(4, "big") + candidate
        try:
            message = decode(frame)
        except ProtocolError:
            continue
        assert isinstance(message, dict)


def as_json(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return len(value)
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_json(item) for item in value]
    return value


def test_check_arguments_finds_every_buffer_with_its_path():
    numbers = array.array("d", [1.5, 2.5])
    args = {"a": b"x", "nested": [{"b": bytearray(b"yz")}, memoryview(b"w")], "n": numbers}
    checked = check_arguments(args, adapter="a", command="c")
    found = {path: bytes(view) for path, view in checked.binary}
    assert found == {
        ("a",): b"x",
        ("nested", 0, "b"): b"yz",
        ("nested", 1): b"w",
        ("n",): numbers.tobytes(),
    }


def test_a_buffer_that_is_not_contiguous_is_refused_naming_its_path():
    strided = memoryview(b"abcdef")[::2]
    with pytest.raises(ValidationError, match=r"args\.x\[0\] is a buffer that is not contig"):
        check_arguments({"x": [strided]}, adapter="a", command="c")


def test_paths_that_lead_nowhere_and_sizes_that_do_not_add_up_are_protocol_errors():
    import json

    def frame(envelope: dict[str, Any], tail: bytes) -> bytes:
        head = json.dumps(envelope).encode()
        body = b"\x00" + len(head).to_bytes(4, "big") + head + tail
        return len(body).to_bytes(4, "big") + body

    answer = {"id": 1, "success": True, "result": {"x": None}}
    cases = {
        "leads nowhere": ({**answer, "$binary": [{"path": ["result", "y"], "size": 1}]}, b"a"),
        "not lead to null": ({**answer, "$binary": [{"path": ["result"], "size": 1}]}, b"a"),
        "overrun": ({**answer, "$binary": [{"path": ["result", "x"], "size": 9}]}, b"a"),
        "beyond its values": ({**answer, "$binary": [{"path": ["result", "x"], "size": 1}]}, b"ab"),
        "no '\\$binary' list": (answer, b""),
        "shared-memory": (
            {**answer, "$binary": [{"path": ["result", "x"], "size": 1, "shm": "x"}]},
            b"",
        ),
    }
    for problem, (envelope, tail) in cases.items():
        with pytest.raises(ProtocolError, match=problem):
            decode(frame(envelope, tail))
    ok = {**answer, "$binary": [{"path": ["result", "x"], "size": 2}]}
    assert decode(frame(ok, b"ab")) == {"id": 1, "success": True, "result": {"x": b"ab"}}


async def test_binary_for_a_worker_without_the_capability_is_refused_before_sending(misbehaving):
    async with Pool(misbehaving(), pool_size=1) as pool:
        (worker,) = pool.workers.values()
        assert "binary" not in worker.capabilities
        sent = worker.requests
        with pytest.raises(ValidationError, match=r"args\.blob\[1\] is binary.*'binary'") as raised:
            await pool.execute("echo", {"blob": [1, b"\x00\x01"]})
        assert raised.value.field == "args.blob[1]"
        assert worker.requests == sent, "something was sent"
        assert await pool.execute("echo", {"ok": 1}) == {"ok": 1}
        assert pool.stats()["in_flight"] == 0


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize("piece", [1, 7, 4096, 65536, 1 << 20])
def test_large_frames_in_pieces_decode_the_same_with_what_follows(codec, piece):
    """A large frame is assembled in a body of its own size as its pieces come; the frames
    before and after it, in the same reads, are decoded as usual."""
    big = bytes(range(256)) * 4096  # 1 MiB: over the large-frame size
    message = {"id": 1, "success": True, "result": {"big": big, "text": "é" * 300_000}}
    checked = check_arguments(message["result"], adapter="a", command="c")
    large = encode_binary_frame(
        message, [(("result", *p), v) for p, v in checked.binary], 1 << 24, codec
    )
    small = len(b'{"id":2,"success":true,"result":null}').to_bytes(4, "big")
    small += b'{"id":2,"success":true,"result":null}'
    stream = small + large + small
    decoder = FrameDecoder(1 << 24, codec)
    messages = []
    for start in range(0, len(stream), piece):
        messages += decoder.feed(stream[start : start + piece])
    assert [m["id"] for m in messages] == [2, 1, 2]
    assert messages[1]["result"] == {"big": big, "text": "é" * 300_000}
    assert type(messages[1]["result"]["big"]) is bytes
    assert decoder.pending_bytes == 0
