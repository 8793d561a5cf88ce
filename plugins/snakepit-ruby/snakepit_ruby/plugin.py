"""The ``ruby`` adapter: the bundled Ruby bridge, and :func:`ruby_adapter` for your own workers.

A worker of your own uses the bridge library (``require "snakepit"``), which
:func:`ruby_adapter` puts on ``RUBYLIB``::

    # shout.rb
    require "snakepit"
    Snakepit.run({ "shout" => ->(args) { { "text" => args["text"].upcase } } })

    adapter = ruby_adapter("shout", "shout.rb", commands=["ping", "shout"])
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

from snakepit_core import Adapter, ScriptAdapter, hookimpl
from snakepit_core.schemas import load_schema_dir, shared_command_schemas

HERE = Path(__file__).resolve().parent
#: The directory of the Ruby bridge library: ``require "snakepit"`` finds it on ``RUBYLIB``.
LIBRARY_DIR = HERE / "ruby"
BRIDGE = LIBRARY_DIR / "bridge.rb"
EXECUTABLE_ENV = "SNAKEPIT_RUBY_EXECUTABLE"
#: The oldest Ruby the bridge library supports, and how to get one (``snakepit doctor``).
MIN_RUBY_VERSION = "3"
INSTALL_HINT = "apt-get install -y ruby on Debian 12, Ubuntu 22.04 and later"
VERSION = version("snakepit-ruby")


def ruby_executable() -> str:
    """The Ruby interpreter to run: ``$SNAKEPIT_RUBY_EXECUTABLE``, else ``ruby`` on PATH."""
    return os.environ.get(EXECUTABLE_ENV, "ruby")


def command_schemas() -> dict[str, dict[str, Any]]:
    """The shared commands' schemas plus the Ruby bridge's own (process_data, generate_report)."""
    return {**shared_command_schemas(), **load_schema_dir(HERE / "schemas")}


@hookimpl
def snakepit_adapters() -> list[Adapter]:
    schemas = command_schemas()
    return [
        Adapter(
            name="ruby",
            executable=ruby_executable(),
            script=str(BRIDGE),
            args=(),
            commands=frozenset(schemas),
            schemas=schemas,
            command_timeouts={"generate_report": 120.0},
            default_timeout=30.0,
            description="Ruby workers: built-in commands, process_data and generate_report",
            min_runtime_version=MIN_RUBY_VERSION,
            install_hint=INSTALL_HINT,
            executable_env=EXECUTABLE_ENV,
            version=VERSION,
        )
    ]


def ruby_adapter(
    name: str,
    script: str | os.PathLike[str],
    *,
    executable: str | None = None,
    env: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> Adapter:
    """An adapter for a Ruby worker of your own that does ``require "snakepit"``.

    ``LIBRARY_DIR`` goes first on ``RUBYLIB`` (before any ``RUBYLIB`` in ``env`` or in this
    process's environment); other keyword arguments are those of
    :func:`snakepit_core.ScriptAdapter` (``commands``, ``schemas``, ``timeouts``, ...).
    """
    env = dict(env or {})
    inherited = env.get("RUBYLIB", os.environ.get("RUBYLIB"))
    env["RUBYLIB"] = os.pathsep.join(filter(None, [str(LIBRARY_DIR), inherited]))
    kwargs.setdefault("min_runtime_version", MIN_RUBY_VERSION)
    kwargs.setdefault("install_hint", INSTALL_HINT)
    if executable is None:
        kwargs.setdefault("executable_env", EXECUTABLE_ENV)
    return ScriptAdapter(name, executable or ruby_executable(), script, env=env, **kwargs)
