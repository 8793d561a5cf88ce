"""The pool's parts talk through their interfaces (issue 14, item 6): the supervisor and the
dispatcher never touch another object's private attributes, and the supervisor's per-worker
records are its own, not fields of ``Worker``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import snakepit_core
from snakepit_core.config import PoolConfig

CORE = Path(snakepit_core.__file__).parent


def foreign_private_attributes(module: str) -> list[str]:
    """``x._name`` in ``module`` where ``x`` is not ``self``: lines and expressions."""
    tree = ast.parse((CORE / module).read_text())
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("module", ["supervisor.py", "dispatch.py", "deadlines.py", "tasks.py"])
def test_no_private_attribute_of_another_object_is_used(module):
    assert foreign_private_attributes(module) == []


async def test_the_supervisors_per_worker_fields_are_not_on_worker():
    from snakepit_core.adapter import Adapter
    from snakepit_core.worker import Worker

    worker = Worker(
        Adapter(name="x", executable="true"),
        "x-1",
        PoolConfig(),
        run_id="run",
        on_answer=lambda _w: None,
        on_stuck=lambda _w: None,
        on_exit=lambda _w: None,
        watch_deadline=lambda _when: None,
    )
    fields = set(vars(worker))
    for name in ("health_ping", "health_misses", "next_memory_check", "recycling"):
        assert name not in fields
