"""Configuration from files and the environment, with the documented precedence:
keyword > environment > snakepit.toml > [tool.snakepit] in pyproject.toml > defaults."""

from __future__ import annotations

import pytest

from snakepit_core import Pool, PoolConfig
from snakepit_core.config_sources import load_config
from snakepit_core.errors import ConfigError


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.startswith("SNAKEPIT_") and name[9:].lower() in PoolConfig.__dataclass_fields__:
            monkeypatch.delenv(name)
    return tmp_path


def test_defaults_without_any_source(project):
    assert load_config() == PoolConfig()


def test_pyproject_table(project):
    (project / "pyproject.toml").write_text(
        "[tool.snakepit]\npool_size = 3\npool_queue_timeout = 1.5\n"
    )
    config = load_config()
    assert (config.pool_size, config.pool_queue_timeout) == (3, 1.5)


def test_precedence_of_every_source(project, monkeypatch):
    (project / "pyproject.toml").write_text(
        "[tool.snakepit]\npool_size = 3\npool_queue_timeout = 1.5\nworker_init_timeout = 7\n"
        "pool_max_queue_size = 11\n"
    )
    (project / "snakepit.toml").write_text(
        "pool_size = 4\npool_queue_timeout = 2.5\nworker_init_timeout = 8\n"
    )
    monkeypatch.setenv("SNAKEPIT_POOL_SIZE", "5")
    monkeypatch.setenv("SNAKEPIT_POOL_QUEUE_TIMEOUT", "3.5")
    config = load_config(overrides={"pool_size": 6})
    assert config.pool_size == 6  # keyword
    assert config.pool_queue_timeout == 3.5  # environment
    assert config.worker_init_timeout == 8  # snakepit.toml
    assert config.pool_max_queue_size == 11  # pyproject
    assert config.worker_shutdown_grace_period == 2.0  # default


def test_snakepit_toml_may_use_a_table(project):
    (project / "snakepit.toml").write_text("[snakepit]\nsession_affinity = 'strict'\n")
    assert load_config().session_affinity == "strict"


def test_pool_reads_the_sources(project, monkeypatch):
    monkeypatch.setenv("SNAKEPIT_POOL_SIZE", "3")
    assert Pool("python").config.pool_size == 3
    assert Pool("python", pool_size=1).config.pool_size == 1


def test_an_explicit_config_object_skips_files_and_environment(project, monkeypatch):
    monkeypatch.setenv("SNAKEPIT_POOL_SIZE", "3")
    assert Pool("python", config=PoolConfig(pool_size=2)).config.pool_size == 2


@pytest.mark.parametrize(
    ("where", "content", "key", "source"),
    [
        ("pyproject.toml", "[tool.snakepit]\npool_size = -1\n", "pool_size", "[tool.snakepit]"),
        ("pyproject.toml", "[tool.snakepit]\npool_sizee = 2\n", "pool_sizee", "[tool.snakepit]"),
        ("snakepit.toml", "pool_queue_timeout = 'soon'\n", "pool_queue_timeout", "snakepit.toml"),
        ("snakepit.toml", "session_affinity = 'sticky'\n", "session_affinity", "snakepit.toml"),
    ],
)
def test_nonsense_in_files_names_key_and_source(project, where, content, key, source):
    (project / where).write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config()
    assert repr(key) in str(info.value) and source in str(info.value)
    assert info.value.key == key


def test_invalid_toml_is_a_config_error(project):
    (project / "snakepit.toml").write_text("pool_size = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config()


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("SNAKEPIT_POOL_SIZE", "many", "pool_size"),
        ("SNAKEPIT_POOL_SIZE", "0", "pool_size"),
        ("SNAKEPIT_POOL_QUEUE_TIMOUT", "1", "pool_queue_timout"),
    ],
)
def test_nonsense_in_the_environment_names_the_variable(project, monkeypatch, variable, value, key):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_config()
    assert repr(key) in str(info.value) and variable in str(info.value)


def test_optional_memory_limit_from_the_environment(project, monkeypatch):
    monkeypatch.setenv("SNAKEPIT_MAX_WORKER_MEMORY_MB", "512")
    assert load_config().max_worker_memory_mb == 512.0
    monkeypatch.setenv("SNAKEPIT_MAX_WORKER_MEMORY_MB", "none")
    assert load_config().max_worker_memory_mb is None
