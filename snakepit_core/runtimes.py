"""The runtime an adapter runs on: is its executable there, which version, what to do if not.

Used by ``snakepit doctor`` and ``snakepit adapters``. What the runtime is, how old it may be
and how to install it come from the adapter (``min_runtime_version``, ``install_hint``,
``executable_env``, set by its plugin): this module knows no runtime by name.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from .adapter import Adapter

#: The first version number in ``--version`` output: ``v20.1.0``, ``ruby 3.1.2p20``, ``X 3.11``.
VERSION_NUMBER = re.compile(r"\d+(?:\.\d+)*")


@dataclass(frozen=True)
class RuntimeStatus:
    """What ``<executable> --version`` told about an adapter's runtime.

    ``version`` is the first line it printed, or what went wrong; ``problem`` is ``None`` when
    the runtime is usable, else a sentence, and ``remedy`` then says what to do.
    """

    path: str | None
    version: str
    problem: str | None = None
    remedy: str | None = None


def runtime_version(adapter: Adapter) -> tuple[str | None, str]:
    """``(path, version or what is wrong)`` of the adapter's executable."""
    path = shutil.which(adapter.executable)
    if path is None:
        return None, f"missing: {adapter.executable!r} not found on PATH"
    try:
        completed = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return path, f"cannot run: {exc}"
    text = (completed.stdout or completed.stderr).strip().splitlines()
    return path, text[0].strip() if text else f"exit code {completed.returncode}"


def parse_version(text: str) -> tuple[int, ...] | None:
    """``(20, 1, 0)`` from ``"v20.1.0"``; ``None`` if ``text`` holds no version number."""
    match = VERSION_NUMBER.search(text)
    return None if match is None else tuple(int(part) for part in match.group().split("."))


def at_least(found: tuple[int, ...], minimum: tuple[int, ...]) -> bool:
    """``found >= minimum``, missing parts counting as 0 (``(18,)`` is ``(18, 0, 0)``)."""
    width = max(len(found), len(minimum))
    return found + (0,) * (width - len(found)) >= minimum + (0,) * (width - len(minimum))


def check_runtime(adapter: Adapter) -> RuntimeStatus:
    """Whether the adapter's executable is on PATH, runs and is recent enough."""
    path, version = runtime_version(adapter)
    if path is None:
        problem = f"{adapter.executable!r} not found on PATH"
        return RuntimeStatus(None, version, problem, remedy(adapter))
    if version.startswith("cannot run:"):
        return RuntimeStatus(path, version, version, remedy(adapter))
    if adapter.min_runtime_version is None:
        return RuntimeStatus(path, version)
    minimum = parse_version(adapter.min_runtime_version)
    found = parse_version(version)
    if minimum is None:
        return RuntimeStatus(path, version)  # nothing comparable was declared
    if found is None:
        problem = f"no version number in {version!r}: needs {adapter.min_runtime_version} or newer"
        return RuntimeStatus(path, version, problem, remedy(adapter))
    if not at_least(found, minimum):
        problem = f"{version} is too old: needs {adapter.min_runtime_version} or newer"
        return RuntimeStatus(path, version, problem, remedy(adapter))
    return RuntimeStatus(path, version)


def remedy(adapter: Adapter) -> str:
    """What to do about a missing or unusable runtime, from what the adapter declares:
    ``install version 18 or newer (<install_hint>), or set <executable_env> to its path``."""
    minimum = adapter.min_runtime_version
    wanted = f"version {minimum} or newer" if minimum else "it"
    install = f"install {wanted}"
    if adapter.install_hint:
        install += f" ({adapter.install_hint})"
    elif not adapter.executable_env:
        install += f" as {adapter.executable!r} on PATH"
    if adapter.executable_env:
        return f"{install}, or set {adapter.executable_env} to its path"
    return install
