"""Where configuration comes from, and in which order it wins.

Precedence, highest first: keyword arguments > ``SNAKEPIT_*`` environment variables >
``snakepit.toml`` > ``[tool.snakepit]`` in ``pyproject.toml`` > defaults. Files are looked up in
the current directory. Each value is checked with the source it came from, so a
:class:`ConfigError` names both the key and where it was set.
"""

from __future__ import annotations

import os
import tomllib
import typing
from pathlib import Path
from typing import Any

from .config import FIELD_TYPES, PoolConfig, check_keys, validate_config
from .errors import ConfigError

ENV_PREFIX = "SNAKEPIT_"
#: Environment variables snakepit sets or reads for other purposes, never config keys.
_NOT_CONFIG = {
    "WORKER_ID",
    "RUN_ID",
    "PDEATHSIG",
    "NODE_EXECUTABLE",
    "RUBY_EXECUTABLE",
    "JSON",
    "UVLOOP",
    "REGISTRY_DIR",
}


def _parse_env_value(key: str, raw: str, source: str) -> Any:
    kind = FIELD_TYPES[key]
    text = raw.strip()
    try:
        if text.lower() in ("none", "") and "None" in kind:
            return None
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise ConfigError(
            f"configuration key {key!r} = {raw!r} (from {source}): not a number",
            key=key,
            source=source,
        ) from None
    return text


def from_environment(environ: typing.Mapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        suffix = name[len(ENV_PREFIX) :]
        if suffix in _NOT_CONFIG or suffix.startswith("TEST_"):
            continue
        key = suffix.lower()
        source = f"environment variable {name}"
        check_keys({key: raw}, source=source)
        values[key] = (_parse_env_value(key, raw, source), source)
    return values


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", source=str(path)) from None


def from_files(directory: Path | None = None) -> dict[str, tuple[Any, str]]:
    """Values from ``pyproject.toml`` then ``snakepit.toml`` (the latter wins)."""
    directory = Path.cwd() if directory is None else directory
    values: dict[str, tuple[Any, str]] = {}
    pyproject = directory / "pyproject.toml"
    if pyproject.is_file():
        table = _read_toml(pyproject).get("tool", {}).get("snakepit", {})
        source = f"{pyproject} [tool.snakepit]"
        check_keys(table, source=source)
        values.update({key: (value, source) for key, value in table.items()})
    snakepit_toml = directory / "snakepit.toml"
    if snakepit_toml.is_file():
        table = _read_toml(snakepit_toml)
        table = table.get("snakepit", table)
        source = str(snakepit_toml)
        check_keys(table, source=source)
        values.update({key: (value, source) for key, value in table.items()})
    return values


def load_config(
    base: PoolConfig | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    directory: Path | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> PoolConfig:
    """The effective configuration.

    With an explicit ``base`` config, files and environment are not read (the caller chose);
    keyword ``overrides`` always apply last.
    """
    overrides = dict(overrides or {})
    check_keys(overrides, source="keyword arguments")
    if base is not None:
        layered: dict[str, tuple[Any, str]] = {}
    else:
        layered = {**from_files(directory), **from_environment(environ)}
    layered.update({key: (value, "keyword arguments") for key, value in overrides.items()})
    config = base or PoolConfig()
    for key, (value, _) in layered.items():
        config = _replace_unchecked(config, key, value)
    # Validated once all values are in, so that a rule between two keys (node_ttl beyond
    # node_heartbeat_interval) sees both; the error names the source of the key at fault.
    try:
        validate_config(config, source="keyword arguments")
    except ConfigError as exc:
        source = layered[exc.key][1] if exc.key in layered else "defaults"
        validate_config(config, source=source)
        raise
    return config


def _replace_unchecked(config: PoolConfig, key: str, value: Any) -> PoolConfig:
    clone = object.__new__(PoolConfig)
    for name in FIELD_TYPES:
        object.__setattr__(clone, name, getattr(config, name))
    object.__setattr__(clone, key, value)
    return clone
