"""The regularization path: Γ's support per layer, epoch by epoch.

``SLBI.epoch_metrics()`` reports ``support/<layer>`` (the fraction of non-zero groups of ``Γ``) and
``support/all``; the trainer stores them in ``history.json`` under ``opt/support/...``. ``support_path``
pulls them out of a history and ``plot_path`` draws them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def support_path(history: Sequence[dict[str, Any]], prefix: str = "opt/support/") -> dict[str, list[float]]:
    """``{layer: [fraction of non-zero groups at epoch 0, 1, ...]}`` from a list of per-epoch metric dicts
    (flat ``{"opt/support/<layer>": value}`` entries, possibly nested under a ``"metrics"`` key)."""
    out: dict[str, list[float]] = {}
    for row in history:
        flat = row.get("metrics", row) if isinstance(row.get("metrics", None), dict) else row
        for k, v in flat.items():
            if k.startswith(prefix):
                out.setdefault(k[len(prefix) :], []).append(float(v))
    return out


def plot_path(path: dict[str, list[float]], file: str | Path, accuracy: Sequence[float] | None = None) -> Path:
    """Plot each layer's support fraction against the epoch (and the W* accuracy if given) into ``file``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in path.items():
        ax.plot(range(1, len(ys) + 1), ys, lw=2.5 if name == "all" else 1, label=name if name == "all" else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of non-zero groups of Γ")
    if accuracy is not None:
        ax2 = ax.twinx()
        ax2.plot(range(1, len(accuracy) + 1), accuracy, "k--", label="W* accuracy")
        ax2.set_ylabel("accuracy")
    ax.legend(loc="lower right")
    fig.tight_layout()
    file = Path(file)
    fig.savefig(file)
    plt.close(fig)
    return file


def stopping_point(
    points: Sequence[dict[str, Any]], target: float, *, removed: str = "removed", score: str = "wstar_val_acc"
) -> dict[str, Any]:
    """The early-stopping point of a recorded path, chosen on validation only.

    ``points`` are path records in time order, each with the fraction of prunable channels its ``W*`` removes
    (``removed``) and a *validation* score (``score``, default ``W*``'s validation accuracy; never a test
    figure). Among the points that remove at least ``target``, the one removing the fewest (the largest
    support, where the path first reaches the target) wins, ties broken by the higher validation score; when
    none reaches ``target``, the sparsest point. Raises ``ValueError`` on an empty path.
    """
    if not points:
        raise ValueError("empty regularization path: no stopping point")
    ok = [p for p in points if p[removed] >= target]
    if not ok:
        return max(points, key=lambda p: (p[removed], p[score]))
    return min(ok, key=lambda p: (p[removed], -p[score]))


__all__ = ["plot_path", "stopping_point", "support_path"]
