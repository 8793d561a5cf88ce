"""Every ```python block of README.md and of the plugins' READMEs runs as written.

A block right after ``<!-- file: PATH -->`` (in any language) is a file the other blocks use: a
worker script, a plugin's module, its ``pyproject.toml``. Each runnable block runs in a fresh
interpreter, in a fresh directory holding every ``file:`` block of its README, so a worker
script is run the way it is meant to be: as a worker, by the block that pools it. A block right
after ``<!-- not run: REASON -->`` is only compiled. Any other python block runs.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted(ROOT.glob("plugins/*/README.md"))]

FENCE = re.compile(r"^```(?P<language>[\w-]*)\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
MARK = re.compile(r"<!--\s*(?P<kind>file|not run):\s*(?P<value>.*?)\s*-->")
#: Seconds for one block: start a pool, run a few calls, stop it.
BLOCK_TIMEOUT = 60


@dataclass(frozen=True)
class Block:
    document: Path
    line: int
    language: str
    code: str
    kind: str | None  # "file", "not run" or None (run it)
    value: str  # the file's path, or why it is not run

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def blocks(document: Path) -> list[Block]:
    """The fenced blocks of ``document``, each with the mark on the line just before it."""
    text = document.read_text(encoding="utf-8")
    found = []
    for fence in FENCE.finditer(text):
        before = text[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.fullmatch(before.strip())
        found.append(
            Block(
                document=document,
                line=text.count("\n", 0, fence.start()) + 1,
                language=fence["language"],
                code=fence["code"],
                kind=mark["kind"] if mark else None,
                value=mark["value"] if mark else "",
            )
        )
    return found


ALL_BLOCKS = [block for document in DOCUMENTS for block in blocks(document)]
PYTHON_BLOCKS = [block for block in ALL_BLOCKS if block.language == "python"]
RUNNABLE = [block for block in PYTHON_BLOCKS if block.kind is None]


def write_files(document: Path, directory: Path) -> list[Path]:
    """Every ``file:`` block of ``document`` at its path under ``directory``."""
    written = []
    for block in blocks(document):
        if block.kind != "file":
            continue
        path = (directory / block.value).resolve()
        assert path.is_relative_to(directory.resolve()), f"{block.name}: {block.value} escapes"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.code, encoding="utf-8")
        written.append(path)
    return written


def test_the_readmes_have_python_blocks_to_run():
    assert len(RUNNABLE) >= 7, [block.name for block in RUNNABLE]
    for document in DOCUMENTS:
        assert any(block.document == document for block in RUNNABLE), document


@pytest.mark.timeout(BLOCK_TIMEOUT + 10)
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda block: block.name)
def test_python_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    write_files(block.document, tmp_path)
    snippet = tmp_path / "readme_snippet.py"
    snippet.write_text(block.code, encoding="utf-8")
    done = subprocess.run(
        # a name that left the top level in 0.2 warns: a snippet must not use one
        [sys.executable, "-W", "error:snakepit_core.:DeprecationWarning", str(snippet)],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{block.name}\n{block.code}\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize(
    "block",
    [block for block in PYTHON_BLOCKS if block.kind is not None],
    ids=lambda block: block.name,
)
def test_python_files_and_blocks_not_run_compile(block: Block) -> None:
    compile(block.code, block.name, "exec")
    assert block.value, f"{block.name}: a {block.kind!r} mark needs a path or a reason"


def test_every_file_block_is_used_by_a_block_that_runs():
    """A file no runnable block uses would not be checked by running anything."""
    for document in DOCUMENTS:
        document_blocks = blocks(document)
        runnable = "\n".join(block.code for block in document_blocks if block.kind is None)
        for block in document_blocks:
            if block.kind != "file" or block.language != "python":
                continue
            # a script by its path, a package's module by the package's name
            top = block.value.split("/")[0].removesuffix(".py")
            used = block.value in runnable or top in runnable
            assert used, f"{block.name}: no runnable block of {document.name} uses {block.value}"


@pytest.mark.timeout(120)
@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="needs setuptools")
def test_the_readmes_plugin_example_is_a_package_that_ships_its_bridge_and_schemas(tmp_path):
    """README's snakepit-mine builds into a wheel with its entry point, bridge and schema."""
    source = tmp_path / "snakepit-mine"
    written = write_files(ROOT / "README.md", source)
    assert source / "pyproject.toml" in written
    wheels = tmp_path / "wheels"
    build = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)]
    done = subprocess.run(
        [sys.executable, "-m", *build, str(source)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = wheels.glob("snakepit_mine-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = (name for name in names if name.endswith("entry_points.txt"))
        declared = archive.read(entry_points).decode()
    assert {
        "snakepit_mine/__init__.py",
        "snakepit_mine/plugin.py",
        "snakepit_mine/bridge.py",
        "snakepit_mine/schemas/shout.json",
    } <= names
    assert "[snakepit.adapters]\nmine = snakepit_mine.plugin" in declared
