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


__all__ = ["plot_path", "support_path"]
