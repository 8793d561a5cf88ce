"""The conformance suite's two levels, run as a third-party author runs them.

A Perl adapter with commands of its own (tests/bridges/shout.pl: ``ping`` and ``shout``, no
``cancel``), given to the installed suite by reference, passes the protocol level; the bundled
level and the cancel tests are deselected for it because it does not declare them, and fail
when demanded. A bundled adapter gets both levels, nothing deselected.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import snakepit_core.conformance.test_protocol as protocol_level
from snakepit_core.conformance.levels import CAPABILITY_MARK
from snakepit_core.conformance.targets import TargetError, from_reference, resolve
from snakepit_core.pool import Pool

from conftest import BRIDGES

PERL_ADAPTER = f"{BRIDGES / 'shout_adapter.py'}:ADAPTER"


def suite(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[ET.Element]]:
    """Run the installed suite as ``pytest --pyargs`` from an empty directory (no project
    configuration), without pytest-asyncio (the suite needs none); the run and its test cases."""
    report = tmp_path / "report.xml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--pyargs",
            "snakepit_core.conformance",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:asyncio",
            f"--junit-xml={report}",
            *args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    cases = list(ET.parse(report).getroot().iter("testcase")) if report.exists() else []
    return done, cases


def outcome(case: ET.Element) -> str:
    for kind in ("failure", "error", "skipped"):
        if case.find(kind) is not None:
            return kind
    return "passed"


def protocol_tests() -> tuple[set[str], set[str]]:
    """The protocol level's tests, and those of them that need a capability."""
    tests = {
        name: obj for name, obj in inspect.getmembers(protocol_level) if name.startswith("test_")
    }
    needing = {
        name
        for name, obj in tests.items()
        if any(mark.name == CAPABILITY_MARK for mark in getattr(obj, "pytestmark", []))
    }
    return set(tests), needing


def test_a_perl_adapter_of_its_own_commands_passes_the_protocol_level(tmp_path):
    done, cases = suite(tmp_path, "--adapter", PERL_ADAPTER)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    everything, needing_cancel = protocol_tests()
    ran = {case.get("name", "").removesuffix("[perl-shout]") for case in cases}
    assert ran == everything - needing_cancel, output[-4000:]
    assert needing_cancel, "the protocol level has cancel tests to deselect"
    assert all(case.get("classname", "").endswith("test_protocol") for case in cases)
    assert {outcome(case) for case in cases} == {"passed"}, output[-4000:]
    assert f"{len(ran)} passed" in done.stdout and "skipped" not in done.stdout
    assert "warning" not in done.stdout.lower(), done.stdout[-3000:]
    # Deselected, with the reason, rather than skipped.
    report = next(line for line in done.stdout.splitlines() if "perl-shout:" in line)
    assert f"{len(ran)} protocol, 0 bundled level tests selected" in report
    assert "deselected (bundled level not applicable: the adapter does not declare" in report
    assert f"{len(needing_cancel)} deselected (the worker does not declare the 'cancel'" in report


def test_the_bundled_level_demanded_of_the_perl_adapter_fails(tmp_path):
    done, cases = suite(
        tmp_path,
        "--adapter",
        PERL_ADAPTER,
        "--conformance-level",
        "bundled",
        "-k",
        "test_declares_the_shared_commands or test_echo",
    )
    assert done.returncode == 1, done.stdout[-3000:]
    assert {outcome(case) for case in cases} == {"failure"}
    assert {case.get("name") for case in cases} == {
        "test_declares_the_shared_commands[perl-shout]",
        "test_echo[perl-shout]",
    }


def test_a_bundled_adapter_gets_both_levels(tmp_path):
    from snakepit_core.plugins import get_plugin_manager

    name = sorted(get_plugin_manager().adapters())[0]
    done, _ = suite(tmp_path, "--adapter", name, "--collect-only", "-q")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    listed = done.stdout
    assert "deselected" not in listed, listed[-3000:]
    everything, _ = protocol_tests()
    assert f"{name}: {len(everything)} protocol, " in listed
    assert f"test_bundled.py::test_compute[{name}-add-5-3-8]" in listed


async def test_the_perl_adapter_serves_its_own_command():
    adapter = from_reference(PERL_ADAPTER, Path.cwd())
    async with Pool(adapter, pool_size=1) as pool:
        assert await pool.execute("shout", {"text": "hello é"}) == "HELLO É"


def make_adapter():
    return from_reference(PERL_ADAPTER, Path.cwd())


def test_references_to_adapters_and_what_is_wrong_with_them(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BRIDGES))
    assert resolve("shout_adapter:ADAPTER", tmp_path).adapter.name == "perl-shout"
    assert resolve(f"{__file__}:make_adapter", tmp_path).adapter.name == "perl-shout"
    (tmp_path / "mine.py").write_text("NOT_AN_ADAPTER = 3\n")
    for spec, problem in [
        ("missing.py:ADAPTER", "no such file"),
        ("mine.py:ADAPTER", "mine.py defines no ADAPTER"),
        ("mine.py:NOT_AN_ADAPTER", "NOT_AN_ADAPTER is a int, not an Adapter"),
        ("no_such_module_here:ADAPTER", "cannot import no_such_module_here"),
        ("mine.py:", "a reference is module:NAME or path/to/file.py:NAME"),
        ("cobol", "cobol"),
    ]:
        with pytest.raises(TargetError, match=problem) as raised:
            resolve(spec, tmp_path)
        assert str(raised.value).startswith(f"--adapter {spec}: ")


def test_a_wrong_adapter_is_a_usage_error(tmp_path):
    done, _ = suite(tmp_path, "--adapter", "missing.py:ADAPTER")
    assert done.returncode == 4  # pytest's usage error
    assert "--adapter missing.py:ADAPTER: no such file" in done.stderr


def test_snakepit_conformance_without_pytest_says_what_to_install():
    hide_pytest = (
        "import sys; sys.modules['pytest'] = None; "
        "sys.argv = ['snakepit', 'conformance', 'mine']; "
        "from snakepit_core.cli import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", hide_pytest], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr == (
        "the conformance suite needs pytest, which is not installed: "
        "pip install 'snakepit-core[conformance]'\n"
    )


def test_snakepit_conformance_runs_the_suite_without_a_warning(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "snakepit_core.cli", "conformance", PERL_ADAPTER],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    everything, needing_cancel = protocol_tests()
    assert f"{len(everything - needing_cancel)} passed" in done.stdout, output[-3000:]
    assert "warning" not in output.lower(), output[-3000:]
    assert not list(tmp_path.iterdir()), "the run left files in the current directory"
