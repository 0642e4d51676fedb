"""Benchmarks write only where they are told: an output option whose default lies under ``runs/benchmarks/``
(ignored by git), never into the source tree; the committed results and figures are refreshed on purpose."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
TREE_PATHS = ("benchmarks/results", "benchmarks/claims", "docs/figures")  # the committed copies
WRITES = ("write_text(", "savefig(", "json.dump(", ".write(")


def code_strings(path: Path) -> list[str]:
    """The string constants of a module's code, its docstrings (usage text) left out."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


def test_there_are_benchmarks_to_check() -> None:
    assert len(BENCHMARKS) >= 10 and any(p.name == "deep_linear.py" for p in BENCHMARKS)


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_no_benchmark_writes_into_the_source_tree_by_default(path: Path) -> None:
    strings = code_strings(path)
    into_tree = [s for s in strings if any(t in s for t in TREE_PATHS) or s in ("results", "figures")]
    assert not into_tree, f"{path.name} names the committed folders in its code: {into_tree}"
    text = path.read_text()
    if any(w in text for w in WRITES):  # it writes files: by default under runs/benchmarks (or a temp dir)
        assert "default_out" in text or '"runs"' in text or "tempfile" in text, path.name


def _git_status() -> str | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    p = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout if p.returncode == 0 else None


@pytest.mark.slow
def test_deep_linear_smoke_run_writes_only_its_output_folder(tmp_path: Path) -> None:
    before = _git_status()
    out = tmp_path / "out"
    env = dict(
        os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    )
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "deep_linear.py"), "--smoke", "--out-dir", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(f.name for f in out.iterdir()) == [
        "deep_linear_smoke.json",
        "deeplinear_alpha_sweep.png",
        "deeplinear_loss_balance.png",
        "deeplinear_modes.png",
    ]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]  # nothing beside it, in the working directory
    if before is not None:
        assert _git_status() == before  # the checkout is as it was (committed figures and results untouched)
