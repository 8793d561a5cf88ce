"""Hostile calls: bad options and arguments are refused before a worker is taken, the same way
on both JSON codecs, and no call can take a worker out of service (RELIABILITY.md)."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import fractions
import uuid
from collections import namedtuple
from enum import IntEnum

import pytest

from snakepit_core import Pool
from snakepit_core.errors import CommandError, ProtocolError, ValidationError
from snakepit_core.json_values import MAX_NESTING

CODECS = ["json", "orjson"]
BAD_TIMEOUTS = [
    "1",
    decimal.Decimal("1"),
    fractions.Fraction(1),
    float("nan"),
    float("inf"),
    0,
    -1,
    True,
    None,
]


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


async def all_free(pool: Pool) -> None:
    stats = pool.stats()
    assert stats["available"] == stats["workers"] == pool.config.pool_size, stats
    assert stats["busy"] == 0, stats


@pytest.fixture(params=CODECS)
async def pool(request):
    async with Pool("python", pool_size=2, json_codec=request.param) as pool:
        yield pool


async def test_bad_timeouts_are_refused_before_a_worker_is_taken(pool):
    for bad in BAD_TIMEOUTS[:-1]:
        with pytest.raises(ValidationError, match="finite number of seconds") as info:
            await pool.execute("ping", {}, timeout=bad)
        assert info.value.field == "timeout"
    await all_free(pool)
    results = await asyncio.gather(*(pool.execute("echo", {"n": n}) for n in range(20)))
    assert results == [{"echoed": {"n": n}} for n in range(20)]
    assert (await pool.execute("ping", {}, timeout=5))["status"] == "ok"


async def test_arguments_too_deep_are_refused_naming_the_path(pool):
    for depth in (MAX_NESTING + 1, 5000):
        with pytest.raises(ValidationError, match=r"args\.message\[0\]\[0\].*nested more than"):
            await pool.execute("echo", {"message": nested(depth)})
    await all_free(pool)
    # Deep but allowed: past orjson's own limit the stdlib encoder takes over.
    deep = nested(400)
    assert await pool.execute("echo", {"message": deep}) == {"echoed": {"message": deep}}
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValidationError, match="circular"):
        await pool.execute("echo", {"message": circular})
    await all_free(pool)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (datetime.datetime(2026, 12, 1), "datetime.datetime"),
        (decimal.Decimal("1.5"), "decimal.Decimal"),
        (uuid.UUID(int=7), "uuid.UUID"),
        ({1, 2}, "set"),
        (object(), "object"),
    ],
)
async def test_values_json_cannot_encode_are_refused_on_both_codecs(pool, value, type_name):
    with pytest.raises(ValidationError) as info:
        await pool.execute("echo", {"items": [1, {"when": value}]})
    assert info.value.field == "args.items[1].when"
    assert f"is a {type_name}, which is not JSON" in str(info.value)
    await all_free(pool)


async def test_non_finite_floats_are_refused_naming_the_path(pool):
    with pytest.raises(ValidationError, match=r"args\.x\.y is nan, not a finite number"):
        await pool.execute("echo", {"x": {"y": float("nan")}})


async def test_what_json_accepts_is_accepted_the_same_way_on_both_codecs(pool):
    Point = namedtuple("Point", "x y")

    class Level(IntEnum):
        HIGH = 3

    sent = {"keys": {1: "int", 2.5: "float", False: "bool", None: "none"}, "tuple": (1, 2)}
    sent |= {"point": Point(1, 2), "level": Level.HIGH, "big": 2**70, "negative": -(2**64)}
    assert await pool.execute("echo", sent) == {
        "echoed": {
            "keys": {"1": "int", "2.5": "float", "false": "bool", "null": "none"},
            "tuple": [1, 2],
            "point": [1, 2],
            "level": 3,
            "big": 2**70,
            "negative": -(2**64),
        }
    }
    with pytest.raises(ValidationError, match="object keys must be strings"):
        await pool.execute("echo", {"keys": {(1, 2): "tuple"}})


@pytest.mark.parametrize("adapter", ["python", "ruby"])
@pytest.mark.parametrize("codec", CODECS)
async def test_integers_beyond_64_bits_stay_exact_both_ways(adapter, codec):
    async with Pool(adapter, pool_size=1, json_codec=codec) as pool:
        add = {"operation": "add", "a": 2**63, "b": 2**63}
        assert (await pool.execute("compute", add))["result"] == 2**64
        big = {"operation": "multiply", "a": 2**100, "b": 3}
        assert (await pool.execute("compute", big))["result"] == 3 * 2**100


async def test_integers_beyond_1e308_do_not_skip_schema_validation(pool):
    args = {"operation": "teleport", "a": 10**400, "b": 1}
    with pytest.raises(ValidationError) as info:
        await pool.execute("compute", args)
    assert info.value.field == "args.operation"
    result = await pool.execute("compute", {"operation": "add", "a": 10**400, "b": 1})
    assert result["result"] == 10**400 + 1


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("command", ["deep_error", "deep_no_id"])
async def test_a_deep_frame_from_a_worker_fails_the_call_at_once(misbehaving, codec, command):
    """1,000 levels: past the stdlib decoder's recursion limit (a protocol error), within
    orjson's (a deep error value becomes a short message). Either way the call fails at once."""
    expected = CommandError if (codec, command) == ("orjson", "deep_error") else ProtocolError
    async with Pool(misbehaving(), pool_size=1, json_codec=codec) as pool:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(expected) as info:
            await pool.execute(command, {"depth": 1000}, timeout=30)
        assert loop.time() - started < 10, "the call waited for its timeout"
        assert len(str(info.value)) < 1000
        assert await pool.execute("echo", {"after": 1}) == {"after": 1}


async def test_queued_calls_too_big_to_send_fail_alone_and_lose_no_slot():
    """A queued request is sent by the slot that frees for it; one that cannot be encoded
    fails its own caller, and the slot goes on to the next queued request (hundreds of them
    in a row must not nest calls)."""
    async with Pool("python", pool_size=1, max_frame_bytes=4096) as pool:
        holder = asyncio.ensure_future(pool.execute("sleep", {"seconds": 0.3}))
        await asyncio.sleep(0.05)  # the only slot is taken: what follows queues
        too_big = [pool.execute("echo", {"blob": "x" * 5000}) for _ in range(600)]
        fine = [pool.execute("echo", {"n": n}) for n in range(5)]
        results = await asyncio.gather(*too_big, *fine, return_exceptions=True)
        await holder
        refused = results[:600]
        assert all(isinstance(r, ValidationError) for r in refused), {type(r) for r in refused}
        assert "over the maximum frame size" in str(refused[0])
        assert results[600:] == [{"echoed": {"n": n}} for n in range(5)]
        await all_free(pool)
        assert pool.stats()["queued"] == 0
