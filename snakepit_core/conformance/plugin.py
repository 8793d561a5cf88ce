"""pytest plugin of the conformance suite: chooses the adapters the tests run on."""

from __future__ import annotations

from typing import Any

import pytest

from ..plugins import get_plugin_manager


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--adapter",
        action="append",
        default=[],
        help="adapter to check (repeatable; default: every installed adapter)",
    )


def selected_adapters(config: pytest.Config) -> list[str]:
    chosen: list[str] = config.getoption("--adapter")
    return chosen or sorted(get_plugin_manager().adapters())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "adapter_name" in metafunc.fixturenames:
        names = selected_adapters(metafunc.config)
        metafunc.parametrize("adapter_name", names, ids=names)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "conformance: the adapter conformance suite")


def pytest_report_header(config: pytest.Config) -> Any:
    return f"snakepit conformance adapters: {', '.join(selected_adapters(config))}"
