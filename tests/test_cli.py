"""The command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from snakepit_core import ScriptAdapter
from snakepit_core.runtimes import check_runtime, parse_version

#: A word said twice in a row ("the the"), across a line break too.
DOUBLED_WORD = re.compile(r"\b([A-Za-z]+)\s+\1\b", re.IGNORECASE)


def snakepit(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snakepit_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


def fake_runtime(directory: Path, name: str, version_line: str) -> str:
    """An executable that prints ``version_line`` for ``--version``, as a runtime does."""
    path = directory / name
    path.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    path.chmod(0o755)
    return str(path)


def test_exec_prints_the_result_as_json():
    done = snakepit("exec", "python", "compute", '{"operation":"multiply","a":10,"b":5}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == 50


def test_exec_failure_exits_non_zero_with_code_and_message_on_stderr():
    done = snakepit("exec", "python", "compute", '{"operation":"divide","a":1,"b":0}')
    assert done.returncode == 1
    assert done.stderr.startswith("command_error:") and "division by zero" in done.stderr
    done = snakepit("exec", "python", "compute", '{"operation":"add","a":1}')
    assert done.returncode == 1 and done.stderr.startswith("validation_error:")
    done = snakepit("exec", "cobol", "ping")
    assert done.returncode == 1 and done.stderr.startswith("unknown_adapter:")


def test_adapters_lists_distribution_version_and_runtime():
    done = snakepit("adapters")
    assert done.returncode == 0, done.stderr
    for name in ("python", "node", "ruby", "snakepit-python", "snakepit-node", "snakepit-ruby"):
        assert name in done.stdout


def test_demo_runs_the_seeds_examples_on_every_adapter():
    done = snakepit("demo", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for expected in (
        "adapter python",
        "adapter node",
        "adapter ruby",
        "compute add",
        "1000 concurrent pings",
        "program create/execute",
        "stats:",
    ):
        assert expected in done.stdout


def test_doctor_names_the_remedy_for_a_runtime_that_is_too_old(tmp_path):
    old_ruby = "ruby 2.7.4p191 (2021-07-07 revision a21a3b7d23) [x86_64-linux-gnu]"
    env = {
        "SNAKEPIT_NODE_EXECUTABLE": fake_runtime(tmp_path, "node", "v16.20.2"),
        "SNAKEPIT_RUBY_EXECUTABLE": fake_runtime(tmp_path, "ruby", old_ruby),
        "COLUMNS": "300",  # one line per message, so that each can be matched whole
    }
    done = snakepit("doctor", env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    node = lines.index(
        f"adapter node: v16.20.2 is too old: needs 18 or newer (snakepit-node {version('snakepit-node')})"
    )
    assert lines[node + 1].startswith(
        "  remedy: install version 18 or newer (apt-get install -y nodejs"
    )
    assert lines[node + 1].endswith("or set SNAKEPIT_NODE_EXECUTABLE to its path")
    # rich markup would eat "[x86_64-linux-gnu]"
    ruby = lines.index(
        f"adapter ruby: {old_ruby} is too old: needs 3 or newer (snakepit-ruby {version('snakepit-ruby')})"
    )
    assert "apt-get install -y ruby" in lines[ruby + 1]
    assert lines[ruby + 1].endswith("or set SNAKEPIT_RUBY_EXECUTABLE to its path")
    assert any(line.startswith("adapter python: ok ") for line in lines)
    assert not DOUBLED_WORD.search(done.stdout)


def test_doctor_names_the_remedy_for_a_missing_runtime(tmp_path):
    done = snakepit(
        "doctor", env={"SNAKEPIT_NODE_EXECUTABLE": str(tmp_path / "no-node"), "COLUMNS": "300"}
    )
    assert done.returncode == 1
    assert f"adapter node: '{tmp_path / 'no-node'}' not found on PATH" in done.stdout
    assert "apt-get install -y nodejs" in done.stdout


def test_a_healthy_doctor_exits_0_and_keeps_every_bracket():
    done = snakepit("doctor", env={"COLUMNS": "300"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "remedy:" not in done.stdout
    assert f"shared memory: ok /dev/shm/snakepit-{os.getuid()} (" in done.stdout
    if importlib.util.find_spec("uvloop") is None:
        assert "pip install 'snakepit-core[fast]' adds uvloop and orjson" in done.stdout


def test_any_adapter_declares_its_runtime_minimum_and_remedy(tmp_path):
    """No plugin needed: the core knows no runtime, the adapter says what it needs."""
    declared = {
        "min_runtime_version": "2.1",
        "install_hint": "apt-get install -y mine",
        "executable_env": "MINE_EXECUTABLE",
    }
    old = ScriptAdapter("mine", fake_runtime(tmp_path, "mine", "mine 2.0.9 [beta]"), **declared)
    status = check_runtime(old)
    assert status.problem == "mine 2.0.9 [beta] is too old: needs 2.1 or newer"
    assert status.remedy == (
        "install version 2.1 or newer (apt-get install -y mine), or set MINE_EXECUTABLE to its path"
    )
    assert (
        check_runtime(ScriptAdapter("mine", old.executable, min_runtime_version="2")).problem
        is None
    )
    bare = ScriptAdapter("mine", str(tmp_path / "absent"))
    assert check_runtime(bare).remedy == f"install it as {bare.executable!r} on PATH"
    assert parse_version("v20.1.0") == (20, 1, 0) and parse_version("none") is None


def test_doctor_does_not_import_the_cli():
    code = "import sys, snakepit_core.doctor; print('snakepit_core.cli' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_version_lists_every_adapter_distribution():
    done = snakepit("--version")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"snakepit-core {version('snakepit-core')}"
    for dist, adapter in (
        ("snakepit-node", "node"),
        ("snakepit-python", "python"),
        ("snakepit-ruby", "ruby"),
    ):
        assert f"{dist} {version(dist)} (adapter {adapter})" in lines


@pytest.mark.parametrize(
    "args",
    [
        ("doctor",),
        ("adapters",),
        ("--help",),
        *(
            (command, "--help")
            for command in ("adapters", "bench", "conformance", "demo", "doctor", "exec", "reap")
        ),
    ],
    ids=" ".join,
)
def test_no_word_is_doubled_in_the_output(args):
    done = snakepit(*args)
    output = done.stdout + done.stderr
    assert output.strip()
    assert not [match.group(0) for match in DOUBLED_WORD.finditer(output)], output
