"""Figures of a run directory: test accuracy vs average multiply-adds (each exit, and budgeted early exit with
thresholds fitted on validation), training curves (loss; validation accuracy), and any per-epoch optimizer/rule
series (for example DessiLBI's regularization path). Uses matplotlib's non-interactive Agg backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anytrain.registry import ConfigError


def _read(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def plot_run(run_dir: str | Path, metrics: dict | None = None) -> list[Path]:
    """Write the figures of a run directory; ``metrics`` stands in for its metrics.json (the trainer plots
    before it writes metrics.json, which marks the run as finished)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    written: list[Path] = []
    mpath, hpath = run / "metrics.json", run / "history.json"
    if metrics is None and not mpath.is_file() and not hpath.is_file():
        raise ConfigError(f"{run} holds no metrics.json or history.json: not a run directory")

    def save(fig: object, name: str) -> None:
        p = run / name
        tmp = run / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
        plt.close(fig)  # type: ignore[arg-type]
        tmp.replace(p)
        written.append(p)

    if metrics is not None or mpath.is_file():
        m = metrics if metrics is not None else _read(mpath)
        assert isinstance(m, dict)
        flops = [e["flops"] for e in m["exits"]]
        acc = [e["accuracy"] for e in m["exits"]]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(flops, acc, "o-", label="anytime (each exit)")
        for e in m["exits"]:
            ax.annotate(str(e["index"]), (e["flops"], e["accuracy"]), textcoords="offset points", xytext=(4, -10))
        if m.get("budgeted"):
            ax.plot(
                [p["test"]["mean_flops"] for p in m["budgeted"]],
                [p["test"]["accuracy"] for p in m["budgeted"]],
                "s--",
                alpha=0.7,
                label="budgeted (thresholds fitted on validation)",
            )
        ax.set_xlabel("average multiply-adds per sample")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{m['model']} · {m['rule']} · {m['optimizer']} (AUC {m.get('auc', 0):.3f})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "accuracy_vs_flops.png")

    if hpath.is_file():
        h = _read(hpath)
        assert isinstance(h, list)
        if h:
            save(training_curves(h), "training_curves.png")
            extra = sorted({k for r in h for k in r if "/" in k})
            if extra:
                fig, ax = plt.subplots(figsize=(6, 3.5))
                for key in extra:
                    ax.plot([r["epoch"] for r in h if key in r], [r[key] for r in h if key in r], label=key)
                ax.set_xlabel("epoch")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=6, ncol=2)
                ax.set_title("optimizer / rule series per epoch", fontsize=9)
                save(fig, "epoch_series.png")
            if any(k.startswith("opt/support/") for k in extra):  # DessiLBI: Γ's regularization path
                from anytrain.sparsity.path import plot_path, support_path

                tmp = run / ".sparsity_path.tmp.png"
                plot_path(support_path(h), tmp)
                tmp.replace(run / "sparsity_path.png")
                written.append(run / "sparsity_path.png")
    return written


def training_curves(history: list[dict[str, Any]]) -> Any:
    """The figure of ``training_curves.png`` (a matplotlib ``Figure``): each exit's training loss (left) and
    validation accuracy (right). When every record has ``step_loss`` (the trainer's log points), both are drawn
    against the optimisation step: the loss at every log point, the validation accuracy at each epoch's end
    (markers), so a one-epoch run has a curve too. Histories without it (runs written before it existed,
    ``anytrain dgl-parallel``) are drawn per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = len(history[0]["train_loss"])
    per_step = all("step_loss" in r for r in history)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5), sharex=True)  # accuracy at the loss curve's steps
    if per_step:
        points = [p for r in history for p in r["step_loss"]]
        x, where, unit = [p[0] for p in points], [r["step"] for r in history], "step"
        for k in range(K):
            a1.plot(x, [p[2][k] for p in points], "-" if len(x) > 1 else "o", label=f"exit {k}")
    else:
        x = where = [r["epoch"] for r in history]
        unit = "epoch"
        for k in range(K):
            a1.plot(x, [r["train_loss"][k] for r in history], "o-", label=f"exit {k}")
    if all("val_acc" in r for r in history):
        for k in range(K):
            a2.plot(where, [r["val_acc"][k] for r in history], "o-", label=f"exit {k}")
    a1.set_ylabel("train loss" + (" (at each log step)" if per_step else " (epoch mean)"))
    a1.set_yscale("log")
    a2.set_ylabel("validation accuracy" + (" (at each epoch's end)" if per_step else ""))
    for a in (a1, a2):
        a.set_xlabel(unit)
        a.grid(alpha=0.3)
        if a.lines:
            a.legend(fontsize=7)
    return fig
