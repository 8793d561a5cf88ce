"""The bundled bridges' shared contract as data: the commands and the key order of their results.

One table, read by the bundled level's tests and by the level selection (an adapter that
declares every shared command is checked against the whole contract), and written out in
docs/PROTOCOL.md. The key orders are those the bundled bridges emit, identical on every runtime.
"""

from __future__ import annotations

#: The commands every bundled bridge has, with the same arguments and results.
SHARED_COMMANDS = frozenset(
    {
        "ping",
        "echo",
        "compute",
        "info",
        "sleep",
        "store",
        "retrieve",
        "clear_session",
        "create_program",
        "execute_program",
        "stream",
    }
)

#: The keys of each shared command's result, in the order the bundled bridges write them.
#: ``info`` may carry a runtime's extra keys between them; every other result has exactly these.
RESULT_KEYS: dict[str, tuple[str, ...]] = {
    "ping": (
        "status",
        "uptime",
        "requests_handled",
        "worker_id",
        "runtime",
        "capabilities",
        "pid",
    ),
    "echo": ("echoed",),
    "compute": ("operation", "inputs", "result"),
    "info": (
        "runtime",
        "runtime_version",
        "bridge_version",
        "platform",
        "arch",
        "pid",
        "worker_id",
        "uptime",
        "requests_handled",
        "memory",
        "commands",
    ),
    "sleep": ("slept",),
    "store": ("stored", "session_id", "key"),
    "retrieve": ("found", "session_id", "key", "value"),
    "clear_session": ("cleared", "session_id", "keys"),
    "create_program": ("program_id", "signature", "inputs", "outputs", "config"),
    "execute_program": ("program_id", "outputs"),
}

#: Results that may hold a runtime's extra keys besides (and between) the documented ones.
OPEN_RESULTS = frozenset({"info"})
