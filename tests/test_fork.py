"""fork() after a pool started (gunicorn --preload, Celery prefork, multiprocessing's fork):
the child leaves the parent's pools alone and may start its own (RELIABILITY.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIOS = Path(__file__).resolve().parent / "fork_scenarios.py"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_fork_child_leaves_the_parents_pool_alone(kind):
    done = subprocess.run(
        [sys.executable, str(SCENARIOS), kind], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    child, parent = lines
    assert child["who"] == "child" and parent["who"] == "parent"
    # The child: every call on an inherited pool is refused, naming the parent.
    owner = f"belongs to process {parent['pid']}"
    for what, message in child["refusals"].items():
        assert owner in message and "fork()" in message, (what, message)
    assert child["stop_seconds"] < 1.0  # stop() touched no process
    assert child["run_id"] != child["parent_run_id"]
    assert child["own_echo"] == {"echoed": {"from": "child"}}
    assert child["own_worker_run_id"] == child["run_id"]
    assert child["reaped"] == []
    # The parent: its call in flight and its workers never noticed.
    assert parent["child_status"] == 0
    assert parent["in_flight"] == [{"slept": 1.0}]
    assert parent["after"] == {"echoed": {"after": "fork"}}
    assert parent["pids_after"] == parent["pids_before"]
    assert parent["restarts"] == 0
    if kind == "sync":
        assert parent["module_after"] == {"echoed": {"module": True}}
    assert "ResourceWarning" not in done.stderr
