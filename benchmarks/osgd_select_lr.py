"""Pick each (net, rule)'s learning rate on validation, then report test accuracy at that rate once.

Reads result files of ``bench_osgd_accuracy.py`` (one file per learning rate, given as ``LR=FILE``), chooses for
every (net, rule) the rate with the highest validation accuracy (``val_acc``, mean over exits and seeds) and
prints, at that rate only, test mean-exit and earliest-exit accuracy (mean ± std over seeds) and whether OSGD beats
joint beyond one std (OSGD mean − std > joint mean + std). Test accuracy plays no part in the choice.

    python benchmarks/osgd_select_lr.py 0.1=benchmarks/results/osgd_accuracy_val_nested-width_lr0.1.json ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", metavar="LR=FILE")
    ap.add_argument("--epochs", type=int, default=30)
    a = ap.parse_args()
    cells: dict[tuple[str, str], dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for item in a.files:
        lr, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"expected LR=FILE, got {item!r}")
        for r in json.loads(Path(path).read_text())["runs"]:
            if r["epochs"] == a.epochs:
                cells[(r["net"], r["rule"])][float(lr)].append(r)
    print("| net | rule | lr | seeds | val mean exit | test mean exit | test earliest exit |")
    print("|---|---|---|---|---|---|---|")
    chosen: dict[tuple[str, str], list[dict]] = {}
    for (net, rule), by_lr in sorted(cells.items()):
        best = max(by_lr, key=lambda lr: statistics.mean(statistics.mean(r["val_acc"]) for r in by_lr[lr]))
        chosen[(net, rule)] = by_lr[best]
        for lr, rs in sorted(by_lr.items()):
            val = mean_std([100 * statistics.mean(r["val_acc"]) for r in rs])
            shown = "— | —"  # test accuracy is read only at the selected rate
            if lr == best:
                te = mean_std([100 * statistics.mean(r["acc"]) for r in rs])
                t0 = mean_std([100 * r["acc"][0] for r in rs])
                shown = f"{te[0]:.1f} ± {te[1]:.1f} | {t0[0]:.1f} ± {t0[1]:.1f}"
            mark = "**" if lr == best else ""
            print(f"| {net} | {rule} | {mark}{lr:g}{mark} | {len(rs)} | {val[0]:.1f} ± {val[1]:.1f} | {shown} |")
    for net in sorted({n for n, _ in chosen}):
        if (net, "osgd") in chosen and (net, "joint") in chosen:
            for what, f in (("mean exit", statistics.mean), ("earliest exit", lambda acc: acc[0])):
                o = mean_std([100 * f(r["acc"]) for r in chosen[(net, "osgd")]])
                j = mean_std([100 * f(r["acc"]) for r in chosen[(net, "joint")]])
                verdict = ("beats" if o[0] - o[1] > j[0] + j[1] else "does not beat") + " joint beyond one std"
                print(f"{net}: {what} test, osgd {o[0]:.1f} ± {o[1]:.1f} vs joint {j[0]:.1f} ± {j[1]:.1f}: {verdict}")


if __name__ == "__main__":
    main()
