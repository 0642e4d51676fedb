"""The Python in README.md and docs/*.md: every ```python block compiles, and ruff formats it as it stands
(CI also runs ``ruff format --check .``, which covers Markdown code blocks)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.M | re.S)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced python block of a Markdown file."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def test_docs_hold_python_blocks() -> None:
    assert sum(len(python_blocks(p)) for p in DOCS) >= 10


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_compile(path: Path) -> None:
    for line, code in python_blocks(path):
        try:
            compile(code, f"{path.name}:{line}", "exec")
        except SyntaxError as e:
            pytest.fail(f"{path.name}, block at line {line}: {e}")


def test_extractor_finds_a_broken_block(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text("text\n\n```python\nx = (1,\n```\n\n```bash\nnot python\n```\n")
    [(line, code)] = python_blocks(md)
    assert line == 4 and code == "x = (1,\n"
    with pytest.raises(SyntaxError):
        compile(code, "x.md", "exec")


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_docs_python_is_ruff_formatted() -> None:
    p = subprocess.run(["ruff", "format", "--check", *map(str, DOCS)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
