"""The command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys


def snakepit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snakepit_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


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
