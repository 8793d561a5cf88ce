"""The three bundled adapters are installed and their runtimes present: a missing runtime
fails here, loudly, instead of being skipped anywhere."""

from __future__ import annotations

import shutil
import subprocess
import sys

from snakepit_core.plugins import get_plugin_manager

REQUIRED = {"python", "node", "ruby"}


def test_the_bundled_adapters_are_installed_with_their_runtimes():
    adapters = get_plugin_manager().adapters()
    assert set(adapters) >= REQUIRED, f"installed adapters: {sorted(adapters)}"
    for name in REQUIRED:
        adapter = adapters[name]
        assert shutil.which(adapter.executable), (
            f"runtime {adapter.executable!r} of adapter {name!r} is not on PATH "
            "(apt-get install -y nodejs ruby)"
        )
        assert adapter.distribution == f"snakepit-{name}"
    assert not get_plugin_manager().failures


def test_the_conformance_suite_covers_every_bundled_adapter():
    from snakepit_core.conformance import SUITE

    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(SUITE),
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
    for name in REQUIRED:
        assert f"[{name}]" in listed.stdout or f"[{name}-" in listed.stdout


def test_core_names_no_language():
    """Nothing in snakepit_core names a runtime: adapters come only from plugins."""
    from pathlib import Path

    import snakepit_core

    root = Path(snakepit_core.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text().lower()
        for word in ("python", "node", "ruby", "javascript"):
            assert f'"{word}"' not in text and f"'{word}'" not in text, (path, word)
