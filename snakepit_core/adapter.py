"""Adapters: declarative descriptions of how to start a worker and what it understands.

An adapter is data, not behaviour: which executable runs which bridge script, with which
arguments and environment, which commands it supports, their JSON Schemas and timeouts.
Behaviour that differs per adapter (extra validation, argument preparation, response
post-processing) lives in pluggy hooks, so it composes across plugins.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import StartupError

DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True, eq=False)
class Adapter:
    """How to run one kind of worker.

    ``commands=None`` means "pass any command through" (a bridge that does not declare its
    commands); otherwise an unknown command is refused before it reaches a worker.
    ``schemas`` maps a command to the JSON Schema (draft 2020-12) of its ``args``.
    """

    name: str
    executable: str
    script: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    commands: frozenset[str] | None = None
    schemas: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    command_timeouts: Mapping[str, float] = field(default_factory=dict)
    default_timeout: float = DEFAULT_TIMEOUT
    description: str = ""
    #: The oldest runtime the bridge works with, as in ``"18"`` or ``"3.11"``: ``snakepit
    #: doctor`` compares it with the first version number ``<executable> --version`` prints.
    min_runtime_version: str | None = None
    #: How to install the runtime (``"apt-get install -y <package>"``), for ``snakepit doctor``
    #: to show when the executable is missing or too old.
    install_hint: str | None = None
    #: The environment variable that names another executable, if the plugin reads one.
    executable_env: str | None = None
    #: Filled in by discovery: the distribution that provides the adapter and its version.
    distribution: str | None = None
    version: str | None = None

    def timeout_for(self, command: str) -> float:
        """The execution timeout of ``command`` when the caller gives none."""
        return self.command_timeouts.get(command, self.default_timeout)

    def resolve_executable(self) -> str:
        """The absolute path of the executable, or ``StartupError`` naming what is missing."""
        found = shutil.which(self.executable)
        if found is None:
            raise StartupError(
                f"adapter {self.name!r}: executable {self.executable!r} not found "
                f"(not on PATH and not an executable file)",
                adapter=self.name,
                executable=self.executable,
            )
        return found

    def command_line(self) -> list[str]:
        """The argv that starts one worker."""
        argv = [self.resolve_executable()]
        if self.script is not None:
            argv.append(self.script)
        argv.extend(self.args)
        return argv

    def worker_env(self, extra: Mapping[str, str]) -> dict[str, str]:
        """The worker's environment: ours, the adapter's additions, then snakepit's own."""
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        env.update(extra)
        return env


class ScriptAdapter(Adapter):
    """An :class:`Adapter` for any bridge script, built in code with no plugin at all.

    >>> ScriptAdapter("mine", sys.executable, "bridge.py", commands=["ping", "shout"])
    ... # doctest: +SKIP

    A real subclass, so ``isinstance(adapter, ScriptAdapter)`` works; paths may be
    ``os.PathLike`` and ``timeouts`` maps commands to seconds. The keyword-only parameters
    are the remaining :class:`Adapter` fields, so ``dataclasses.replace`` works on it too.
    """

    def __init__(
        self,
        name: str,
        executable: str,
        script: str | os.PathLike[str] | None = None,
        args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        commands: Iterable[str] | None = None,
        schemas: Mapping[str, Mapping[str, Any]] | None = None,
        timeouts: Mapping[str, float] | None = None,
        default_timeout: float = DEFAULT_TIMEOUT,
        *,
        command_timeouts: Mapping[str, float] | None = None,
        description: str = "",
        min_runtime_version: str | None = None,
        install_hint: str | None = None,
        executable_env: str | None = None,
        distribution: str | None = None,
        version: str | None = None,
    ) -> None:
        super().__init__(
            name=name,
            executable=str(executable),
            script=None if script is None else os.fspath(script),
            args=tuple(args),
            env=dict(env) if env else None,
            cwd=None if cwd is None else os.fspath(cwd),
            commands=None if commands is None else frozenset(commands),
            schemas=dict(schemas or {}),
            command_timeouts=dict(timeouts or command_timeouts or {}),
            default_timeout=default_timeout,
            description=description,
            min_runtime_version=min_runtime_version,
            install_hint=install_hint,
            executable_env=executable_env,
            distribution=distribution,
            version=version,
        )
