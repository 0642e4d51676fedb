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
    first = re.search(r"^## \[([^\]]+)\]", changelog, re.M)
    assert first is not None and first.group(1) == version, "CHANGELOG.md must start with the current version"
