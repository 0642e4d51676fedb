"""Release hygiene: one version everywhere (pyproject, package, CLI, CHANGELOG)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import anytrain
from anytrain.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_consistent(capsys):
    # (a regex, not tomllib: Python 3.10 is supported)
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert m is not None
    version = m.group(1)
    assert anytrain.__version__ == version
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"anytrain {version}"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    heads = re.findall(r"^## \[([^\]]+)\]", changelog, re.M)
    first = heads[1] if heads and heads[0] == "Unreleased" else (heads[0] if heads else None)
    assert first == version, "CHANGELOG.md must start with the current version (below an Unreleased section)"


def test_readme_python_examples_run():
    """The README's Python snippets are executed as written (they must not rot)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_readme_quick_start_is_two_commands():
    """CI (.ci/run) executes these two lines; keep them exactly two, install first."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    cmds = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert len(cmds) == 2 and all("\n" not in c for c in cmds)
    assert cmds[0].startswith("pip install -c constraints.txt -e . && anytrain train")
    assert cmds[1].startswith('pip install -c constraints.txt -e ".[dev]" && python -m pytest')
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci and "QS[0]" in ci and "QS[1]" in ci  # CI reads them from here, not a copy
