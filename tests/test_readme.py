"""The README is the front page: short, its two commands real, its examples runnable, its links live.

What it used to hold (the capability and error tables) is generated on the
documentation site now and checked by tests/test_docs.py.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]+\]\(([^)\s]+)\)")
COMMANDS = [
    'pip install -e ".[bench]" && mlxdist-bench',
    'pip install -e ".[test]" && python -m pytest',
]
# A Python block that says how to launch it runs as written on the size-1 world.
RUNNABLE = re.compile(r"^# \S+\.py -- run with: python -m mlxdist\.launch -n \d+ -- python \S+\.py$", re.MULTILINE)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(TEXT) if lang == language]


def test_the_readme_is_short():
    assert len(TEXT.splitlines()) <= 150


@pytest.mark.parametrize("command", COMMANDS)
def test_the_two_commands(command: str):
    assert any(command in line for body in blocks("sh") for line in body.splitlines()), command
    extra = re.search(r'"\.\[(\w+)\]"', command).group(1)
    assert extra in importlib.metadata.metadata("mlxdist").get_all("Provides-Extra"), extra


def test_mlxdist_bench_is_an_installed_command():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("mlxdist-bench") == "mlxdist.bench.__main__:main"


def _slug(heading: str) -> str:
    # Python-Markdown's toc slugify, which MkDocs uses for anchors.
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_every_relative_link_resolves():
    links = [link for link in LINK.findall(TEXT) if not re.match(r"^[a-z]+://", link)]
    assert len(links) >= 10
    for link in links:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.is_file(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.MULTILINE)
            assert anchor in {_slug(h) for h in headings}, link


def test_the_python_examples_compile():
    assert len(blocks("python")) == 4
    for body in blocks("python"):
        compile(body, "README.md", "exec")


def test_the_launchable_examples_run(tmp_path: Path):
    runnable = [body for body in blocks("python") if RUNNABLE.search(body)]
    assert len(runnable) == 2  # collectives, TP layers
    for i, body in enumerate(runnable):
        script = tmp_path / f"example{i}.py"
        script.write_text(body + "\nprint('EXAMPLE DONE')\n")
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert run.returncode == 0 and "EXAMPLE DONE" in run.stdout, run.stderr[-2000:]


def _command_lines(program: str) -> list[list[str]]:
    lines = [line for body in blocks("sh") for line in body.splitlines() if line.startswith(program + " ")]
    return [shlex.split(line.split("#", 1)[0]) for line in lines]


@pytest.mark.parametrize(
    ("program", "parser"),
    [("mlxdist-serve", "mlxdist.serve.cli:build_parser"), ("mlxdist-generate", "mlxdist.lm.cli:build_parser")],
)
def test_the_command_lines_parse(program: str, parser: str):
    module, _, function = parser.partition(":")
    build = getattr(__import__(module, fromlist=[function]), function)
    lines = _command_lines(program)
    assert lines, program
    for words in lines:
        build().parse_args(words[1:])  # exits (SystemExit) on an unknown option or a bad value
