"""Where the benchmarks write: a folder given on the command line, by default under ``runs/benchmarks/``
(ignored by git), so running a benchmark never changes the source tree.

The copies committed under ``benchmarks/results/`` and ``docs/figures/`` are refreshed on purpose, by pointing a
benchmark's output option there, for example::

    python benchmarks/deep_linear.py --out-dir benchmarks/results --figures-dir docs/figures
    python benchmarks/bench_osgd_speed.py --out benchmarks/results/osgd_speed.json

then reviewing the diff and committing it with the RESULTS.md text that quotes it.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The default output folder of every benchmark (``runs/`` is in .gitignore).
OUT = ROOT / "runs" / "benchmarks"


def default_out(*parts: str) -> Path:
    """``runs/benchmarks/<parts...>`` in this checkout: a benchmark's default output path."""
    return OUT.joinpath(*parts)
