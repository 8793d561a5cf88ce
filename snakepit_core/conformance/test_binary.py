"""Binary values (docs/PROTOCOL.md, *Binary values*), for workers declaring ``binary``.

Bundled level, through ``echo``: bytes of every size class (empty, one byte, 1 MiB) come back
as the same bytes, nested in lists and objects, several in one request, beside text that stays
text; a binary value streamed through ``execute_stream`` of ``echo`` is its one item. Long
strings come back as the same strings (capability ``text``), and values around and above the
shared-memory threshold come back the same, also mixed with small ones and streamed
(capability ``shm``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import pytest

from snakepit_core.conformance.aio import PoolFactory, in_loop
from snakepit_core.conformance.levels import BUNDLED, level, needs_capability
from snakepit_core.pool import Pool

F = TypeVar("F", bound=Callable[..., None])


def binary_case(test: F) -> F:
    """A bundled-level case, for workers that declare the ``binary`` capability."""
    for mark in (level(BUNDLED), needs_capability("binary")):
        test = mark(test)
    return test


@binary_case
@pytest.mark.parametrize("size", [0, 1, 255, 1 << 20])
@in_loop
async def test_bytes_come_back_as_the_same_bytes(pool: Pool, size: int) -> None:
    data = os.urandom(size)
    assert await pool.execute("echo", {"data": data}) == {"echoed": {"data": data}}


@binary_case
@in_loop
async def test_binary_values_nested_and_beside_text(pool: Pool) -> None:
    args = {
        "text": "stays text",
        "list": [b"\x00", "x", [b"", b"\xff" * 10]],
        "object": {"inner": {"bytes": b"\x01\x02"}, "n": 3},
        "buffer": bytearray(b"from a bytearray"),
        "view": memoryview(b"from a memoryview"),
    }
    expected = {
        **args,
        "buffer": b"from a bytearray",
        "view": b"from a memoryview",
    }
    echoed = await pool.execute("echo", args)
    assert echoed == {"echoed": expected}
    assert type(echoed["echoed"]["buffer"]) is bytes and type(echoed["echoed"]["text"]) is str


@binary_case
@in_loop
async def test_a_binary_result_streams_as_its_one_item(pool: Pool) -> None:
    items = [item async for item in pool.execute_stream("echo", {"b": b"\x00\x01"})]
    assert items == [{"echoed": {"b": b"\x00\x01"}}]


def text_case(test: F) -> F:
    """A bundled-level case, for workers that declare the ``text`` capability."""
    for mark in (level(BUNDLED), needs_capability("text")):
        test = mark(test)
    return test


def shm_case(test: F) -> F:
    """A bundled-level case, for workers that declare ``shm`` (given a segment directory)."""
    for mark in (level(BUNDLED), needs_capability("binary"), needs_capability("shm")):
        test = mark(test)
    return test


#: A threshold the cases' big values are above and their small ones below.
SHM_THRESHOLD = 64 * 1024


@text_case
@in_loop
async def test_long_strings_come_back_as_the_same_strings(pool: Pool) -> None:
    """From 32768 characters strings travel as text attachments, in both directions."""
    args = {"ascii": "x" * 40000, "wide": "é🐍" * 20000, "short": "é🐍", "list": ["a" * 70000]}
    echoed = await pool.execute("echo", args)
    assert echoed == {"echoed": args}
    assert all(type(value) is str for value in echoed["echoed"].values() if value != args["list"])


@shm_case
@pytest.mark.parametrize("size", [SHM_THRESHOLD - 1, SHM_THRESHOLD, 3 << 20])
@in_loop
async def test_bytes_around_the_shm_threshold_come_back_the_same(
    new_pool: PoolFactory, size: int
) -> None:
    data = os.urandom(size)
    async with new_pool(pool_size=1, shm_threshold_bytes=SHM_THRESHOLD) as pool:
        assert await pool.execute("echo", {"data": data}) == {"echoed": {"data": data}}


@shm_case
@in_loop
async def test_big_values_mixed_with_small_ones_through_shared_memory(
    new_pool: PoolFactory,
) -> None:
    big, text = os.urandom(1 << 20), "ü" * 100_000
    args = {"big": big, "nested": [{"small": b"\x00"}, text, [big]], "n": 1}
    async with new_pool(pool_size=1, shm_threshold_bytes=SHM_THRESHOLD) as pool:
        assert await pool.execute("echo", args) == {"echoed": args}
        items = [item async for item in pool.execute_stream("echo", {"big": big})]
        assert items == [{"echoed": {"big": big}}]
