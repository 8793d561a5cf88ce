"""Loads the conformance plugin wherever the suite is collected from."""

from snakepit_core.conformance.plugin import (
    pytest_addoption,
    pytest_configure,
    pytest_generate_tests,
    pytest_report_header,
)

__all__ = [
    "pytest_addoption",
    "pytest_configure",
    "pytest_generate_tests",
    "pytest_report_header",
]
