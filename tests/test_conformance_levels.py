"""The conformance suite's two levels, run as a third-party author runs them.

A Perl adapter with commands of its own (tests/bridges/shout.pl: ``ping`` and ``shout``, no
``cancel``), given to the installed suite by reference, passes the protocol level; the bundled
level and the cancel tests are deselected for it because it does not declare them, and fail
when demanded. A bundled adapter gets both levels, nothing deselected.

Protocol 2: the four protocol-1 bridges (the Perl one and tests/bridges/v1_*: Python in the
seed's manner, Node, Ruby) pass the protocol level unchanged when every pool asks for
``worker_concurrency=8`` (``--worker-concurrency 8``), the protocol-2 cases deselected for
them; the bundled python, node and ruby adapters pass every protocol-2 case.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import snakepit_core.conformance.test_protocol as protocol_level
import snakepit_core.conformance.test_protocol2 as protocol_2_cases
import snakepit_core.conformance.test_streams as stream_cases
from snakepit_core.conformance.levels import (
    BUNDLED,
    CAPABILITY_MARK,
    LEVEL_MARK,
    PROTOCOL,
    PROTOCOL_MARK,
)
from snakepit_core.conformance.targets import TargetError, from_reference, resolve
from snakepit_core.pool import Pool

from conftest import BRIDGES

PERL_ADAPTER = f"{BRIDGES / 'shout_adapter.py'}:ADAPTER"
V1_ADAPTERS = f"{BRIDGES / 'v1_adapters.py'}"
#: The protocol-1 bridges: the Perl one and the v1_* ones, each by reference.
PROTOCOL_1_BRIDGES = {
    "perl-shout": PERL_ADAPTER,
    "v1-python-seed": f"{V1_ADAPTERS}:PYTHON_SEED",
    "v1-node-reverse": f"{V1_ADAPTERS}:NODE_REVERSE",
    "v1-ruby-count": f"{V1_ADAPTERS}:RUBY_COUNT",
}
PROTOCOL_2_DESELECTED = 'deselected (the worker does not answer the handshake with "protocol": 2)'


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


def marks_of(module: object) -> dict[str, dict[str, object]]:
    """Each test function of a suite module: the first argument of each of its marks by name
    (its own marks first, then the module's)."""
    found: dict[str, dict[str, object]] = {}
    module_marks = getattr(module, "pytestmark", [])
    module_marks = module_marks if isinstance(module_marks, list) else [module_marks]
    for name, obj in inspect.getmembers(module):
        if name.startswith("test_") and callable(obj):
            marks: dict[str, object] = {}
            for mark in [*getattr(obj, "pytestmark", []), *module_marks]:
                marks.setdefault(mark.name, mark.args[0] if mark.args else None)
            found[name] = marks
    return found


def protocol_tests() -> tuple[set[str], set[str]]:
    """The protocol level's tests for any worker (test_protocol.py, and the protocol-level case
    of test_streams.py), and those of them that need a capability."""
    tests = {
        **marks_of(protocol_level),
        **{
            name: marks
            for name, marks in marks_of(stream_cases).items()
            if marks[LEVEL_MARK] == PROTOCOL and PROTOCOL_MARK not in marks
        },
    }
    return set(tests), {name for name, marks in tests.items() if CAPABILITY_MARK in marks}


def protocol_2_tests() -> dict[str, set[str]]:
    """The protocol-2 cases (test_protocol2.py) by level."""
    by_level: dict[str, set[str]] = {PROTOCOL: set(), BUNDLED: set()}
    for name, marks in marks_of(protocol_2_cases).items():
        assert marks.get(PROTOCOL_MARK) == 2, name
        by_level[str(marks[LEVEL_MARK])].add(name)
    return by_level


def test_a_perl_adapter_of_its_own_commands_passes_the_protocol_level(tmp_path):
    done, cases = suite(tmp_path, "--adapter", PERL_ADAPTER)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    everything, needing_cancel = protocol_tests()
    ran = {case.get("name", "").removesuffix("[perl-shout]") for case in cases}
    assert ran == everything - needing_cancel, output[-4000:]
    assert needing_cancel, "the protocol level has cancel tests to deselect"
    assert all(
        case.get("classname", "").endswith(("test_protocol", "test_streams")) for case in cases
    )
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
    protocol_2 = protocol_2_tests()
    assert f"{name}: {len(everything) + len(protocol_2[PROTOCOL])} protocol, " in listed
    assert f"test_bundled.py::test_compute[{name}-add-5-3-8]" in listed
    for case in protocol_2[PROTOCOL] | protocol_2[BUNDLED]:
        assert f"test_protocol2.py::{case}[{name}]" in listed


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


# -- protocol 2 ---------------------------------------------------------------------------------


def test_protocol_1_bridges_pass_the_protocol_level_at_worker_concurrency_8(tmp_path):
    """Pools asking for 8 requests in flight send a protocol-1 bridge one at a time: the four
    pass the protocol level unchanged, and the protocol-2 cases are deselected, with the reason,
    for each."""
    args = [arg for ref in PROTOCOL_1_BRIDGES.values() for arg in ("--adapter", ref)]
    done, cases = suite(tmp_path, *args, "--worker-concurrency", "8")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    everything, needing_cancel = protocol_tests()
    protocol_2 = protocol_2_tests()
    expected = everything - needing_cancel
    for name in PROTOCOL_1_BRIDGES:
        ran = {
            case.get("name", "").removesuffix(f"[{name}]")
            for case in cases
            if case.get("name", "").endswith(f"[{name}]")
        }
        assert ran == expected, (name, output[-4000:])
        report = next(line for line in done.stdout.splitlines() if f" {name}:" in line)
        assert f"{len(expected)} protocol, 0 bundled level tests selected" in report, report
        assert f"; {len(protocol_2[PROTOCOL])} {PROTOCOL_2_DESELECTED}" in report, report
    assert all(
        case.get("classname", "").endswith(("test_protocol", "test_streams")) for case in cases
    )
    assert {outcome(case) for case in cases} == {"passed"}, output[-4000:]
    assert f"{len(expected) * len(PROTOCOL_1_BRIDGES)} passed" in done.stdout
    assert "skipped" not in done.stdout, done.stdout[-3000:]


def count_words(text):
    return {"words": len(text.split()), "chars": len(text), "bytes": len(text.encode())}


#: Each v1 bridge's own command: the bridge, the command, and eight (args, result) pairs.
OWN_COMMANDS = [
    (
        "v1-python-seed",
        "divide",
        [({"a": i, "b": 4}, {"status": "ok", "quotient": i / 4}) for i in range(8)],
    ),
    ("v1-node-reverse", "reverse", [({"text": f"ab{i} é🐍"}, f"🐍é {i}ba") for i in range(8)]),
    (
        "v1-ruby-count",
        "count",
        [({"text": f"one {'x ' * i}é"}, count_words(f"one {'x ' * i}é")) for i in range(8)],
    ),
]


@pytest.mark.parametrize(
    ("name", "command", "calls"), OWN_COMMANDS, ids=[c[0] for c in OWN_COMMANDS]
)
async def test_a_protocol_1_bridge_serves_its_own_command_one_at_a_time(name, command, calls):
    """Through a pool that asks for 8 in flight per worker: the worker negotiated protocol 1
    and one slot, and eight concurrent calls each get their own answer."""
    adapter = from_reference(PROTOCOL_1_BRIDGES[name], Path.cwd())
    async with Pool(adapter, pool_size=1, worker_concurrency=8) as pool:
        (figures,) = pool.stats()["per_worker"].values()
        assert (figures["protocol"], figures["capacity"]) == (1, 1), figures
        results = await asyncio.gather(*(pool.execute(command, args) for args, _ in calls))
        for (args, expected), result in zip(calls, results, strict=True):
            if isinstance(result, dict):
                result = {k: v for k, v in result.items() if k != "timestamp"}
            assert result == expected, args
        assert pool.stats()["errors"] == 0


async def test_the_seed_style_bridge_answers_its_failures_as_results():
    """As the Elixir Snakepit v0.1.2 Python bridge did: ``success: true`` and a result saying
    ``"status": "error"``, which the caller gets as a result (an unknown command is still
    ``success: false``, as the protocol level checks)."""
    adapter = from_reference(PROTOCOL_1_BRIDGES["v1-python-seed"], Path.cwd())
    async with Pool(adapter, pool_size=1, worker_concurrency=8) as pool:
        refused = await pool.execute("divide", {"a": 1, "b": 0})
        assert refused["status"] == "error" and refused["error"] == "Division by zero"
        assert isinstance(refused["timestamp"], float)


@pytest.mark.parametrize("name", ["node", "python", "ruby"])
def test_the_protocol_2_cases_pass_on_a_bundled_adapter(tmp_path, name):
    """Every protocol-2 case, at both levels, selected for a bundled adapter and passed."""
    report = tmp_path / "report.xml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--pyargs",
            "snakepit_core.conformance.test_protocol2",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:asyncio",
            f"--junit-xml={report}",
            "--adapter",
            name,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    cases = list(ET.parse(report).getroot().iter("testcase")) if report.exists() else []
    protocol_2 = protocol_2_tests()
    every_case = protocol_2[PROTOCOL] | protocol_2[BUNDLED]
    assert {case.get("name", "").removesuffix(f"[{name}]") for case in cases} == every_case, output[
        -4000:
    ]
    failed = {case.get("name"): outcome(case) for case in cases if outcome(case) != "passed"}
    assert not failed and done.returncode == 0, (failed, output[-4000:])
    assert "deselected" not in done.stdout, done.stdout[-3000:]
    assert (
        f"{name}: {len(protocol_2[PROTOCOL])} protocol, {len(protocol_2[BUNDLED])} bundled level"
        in done.stdout
    )


def test_snakepit_conformance_passes_worker_concurrency_on():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakepit_core.cli",
            "conformance",
            "--worker-concurrency=8",
            PERL_ADAPTER,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "pools run with worker_concurrency=8" in done.stdout
    assert " passed" in done.stdout and "failed" not in done.stdout
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakepit_core.cli",
            "conformance",
            "--worker-concurrency=0",
            PERL_ADAPTER,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "--worker-concurrency" in refused.stderr
