"""Bridges someone else wrote to the wire protocol run unchanged behind a ScriptAdapter."""

from __future__ import annotations

import shutil
import sys
import textwrap

import pytest

from snakepit_core import Pool, ScriptAdapter
from snakepit_core.errors import CommandError, UnknownCommand

from conftest import BRIDGES

PLAIN_PYTHON_BRIDGE = textwrap.dedent(
    """
    import json, struct, sys
    read, write = sys.stdin.buffer.read, sys.stdout.buffer.write
    while True:
        header = read(4)
        if len(header) < 4:
            break
        req = json.loads(read(struct.unpack(">I", header)[0]))
        if req["command"] == "ping":
            res = {"id": req["id"], "success": True, "result": {"status": "ok"}}
        elif req["command"] == "shout":
            res = {"id": req["id"], "success": True, "result": req["args"]["text"].upper()}
        else:
            res = {"id": req["id"], "success": False, "error": "no such command"}
        body = json.dumps(res).encode()
        write(struct.pack(">I", len(body)) + body)
        sys.stdout.buffer.flush()
    """
)


async def test_a_plain_python_bridge_without_snakepit(tmp_path):
    script = tmp_path / "bridge.py"
    script.write_text(PLAIN_PYTHON_BRIDGE)
    adapter = ScriptAdapter("plain", sys.executable, script, commands=["ping", "shout"])
    async with Pool(adapter, pool_size=2) as pool:
        assert await pool.execute("shout", {"text": "hello"}) == "HELLO"
        with pytest.raises(UnknownCommand):
            await pool.execute("whisper", {"text": "x"})
        assert (await pool.execute("ping", {}))["status"] == "ok"


async def test_a_perl_bridge():
    perl = shutil.which("perl")
    assert perl, "perl is required for this test (the CI machine has it)"
    adapter = ScriptAdapter(
        "perl",
        perl,
        BRIDGES / "third_party.pl",
        schemas={
            "add": {
                "type": "object",
                "required": ["a", "b"],
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            }
        },
    )
    async with Pool(adapter, pool_size=2) as pool:
        assert await pool.execute("reverse", {"text": "snakepit"}) == {"text": "tipekans"}
        assert await pool.execute("add", {"a": 2, "b": 40}) == 42
        with pytest.raises(CommandError, match="unknown command nope"):
            await pool.execute("nope", {})
        # the meta field (trace context) is ignored by a bridge that does not know it
        assert (await pool.execute("ping", {}))["runtime"] == "perl"
