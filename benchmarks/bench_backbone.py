"""Exits on a backbone trained without them (issue 23, item 6), on Fashion-MNIST.

1. ``plain``: a ResNet-18 (torchvision's layout, small-image stem, base width ``--width``) trained with one exit.
2. Exits attached after layer1..layer3 (``attach_exits``), starting from ``plain/best.pt`` (``model.weights``):
   ``heads``: only the exit heads train (``train.freeze: trunk``); ``ft-joint`` / ``ft-osgd``: everything trains
   with the ``joint`` / ``osgd`` rule.
3. ``vit``: a small ViT with token-feature exits, trained from scratch (``joint``).

Each run is an ordinary anytrain run directory under ``--out``; the script is resumable (a finished run, one
with metrics.json, is skipped; an unfinished one resumes). Nothing is chosen on the test split: ``best.pt`` and
the budgeted thresholds come from the validation split carved from the training set. Prints a markdown table
and writes ``summary.json``.

    python benchmarks/bench_backbone.py --out runs/bench_backbone --num-samples 60000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from anytrain.config import load_config
from anytrain.train import Trainer


def run(out: Path, overrides: list[str]) -> dict[str, Any]:
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    cfg = load_config(None, overrides)
    t0 = time.time()
    tr = Trainer(cfg, out, resume=out.exists())
    metrics = tr.fit()
    print(f"{out.name}: {time.time() - t0:.0f} s", flush=True)
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_backbone"))
    ap.add_argument("--num-samples", type=int, default=60000, help="training images used (val carved from them)")
    ap.add_argument("--width", type=int, default=4, help="ResNet-18 base width (64 in torchvision)")
    ap.add_argument("--epochs-plain", type=int, default=4)
    ap.add_argument("--epochs-ft", type=int, default=2)
    ap.add_argument("--epochs-vit", type=int, default=4)
    ap.add_argument("--vit-width", type=int, default=32)
    ap.add_argument("--vit-depth", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="run only these steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    common = [
        "data.name=fashion-mnist",
        f"data.num_samples={args.num_samples}",
        "data.batch_size=128",
        "schedule.name=cosine",
        f"train.threads={args.threads}",
        "train.progress=false",
        "train.tensorboard=false",
        "train.plots=false",
        "train.log_every=100000",
    ]
    resnet = [*common, "model.name=resnet18-exits", f"model.width={args.width}"]
    sgd = ["optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9", "optimizer.weight_decay=5.0e-4"]
    plain_dir = args.out / "plain"
    weights = f"model.weights={plain_dir / 'best.pt'}"
    steps: dict[str, list[str]] = {
        "plain": [*resnet, *sgd, "model.exits=1", "rule.name=joint", f"train.epochs={args.epochs_plain}"],
        "heads": [*resnet, *sgd, "model.exits=4", weights, "train.freeze=trunk", "rule.name=joint",
                  f"train.epochs={args.epochs_ft}"],
        "ft-joint": [*resnet, *sgd, "optimizer.lr=0.01", "model.exits=4", weights, "rule.name=joint",
                     f"train.epochs={args.epochs_ft}"],
        "ft-osgd": [*resnet, *sgd, "optimizer.lr=0.01", "model.exits=4", weights, "rule.name=osgd",
                    f"train.epochs={args.epochs_ft}"],
        "vit": [*common, "model.name=vit-exits", f"model.width={args.vit_width}", f"model.depth={args.vit_depth}",
                "model.exits=3", "data.augment=false", "rule.name=joint", "optimizer.name=adamw", "optimizer.lr=2.0e-3",
                "optimizer.weight_decay=0.05", f"train.epochs={args.epochs_vit}"],
    }  # fmt: skip
    summary: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    for name, ov in steps.items():
        if args.only and name not in args.only:
            continue
        m = run(args.out / name, ov)
        summary["runs"][name] = {
            "test_acc": [e["test"] for e in m["exits"]],
            "val_acc": [e["val"] for e in m["exits"]],
            "macs": [e["flops"] for e in m["exits"]],
            "auc": m["auc"],
            "budgeted": m["budgeted"],
            "epochs": m["epochs"],
            "split_sizes": m["split_sizes"],
            "seconds": m["train_seconds_this_session"],
        }
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("| run | epochs | test accuracy per exit | MACs per exit | AUC |")
    print("|---|---|---|---|---|")
    for name, r in summary["runs"].items():
        acc = " / ".join(f"{a:.4f}" for a in r["test_acc"])
        macs = " / ".join(f"{f / 1e6:.2f}M" for f in r["macs"])
        print(f"| {name} | {r['epochs']} | {acc} | {macs} | {r['auc']:.4f} |")


if __name__ == "__main__":
    main()
