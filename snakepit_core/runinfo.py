"""Identity of this process's run: the id every worker carries in ``SNAKEPIT_RUN_ID``."""

from __future__ import annotations

import itertools
import uuid

#: One id per Python process: the registry and the reaper tell runs apart by it.
RUN_ID = uuid.uuid4().hex[:16]

_worker_numbers = itertools.count(1)


def next_worker_id(adapter_name: str) -> str:
    """A worker id unique within this process, e.g. ``python-7``."""
    return f"{adapter_name}-{next(_worker_numbers)}"
