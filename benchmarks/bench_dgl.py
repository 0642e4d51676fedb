"""Backprop vs decoupled (DGL) vs sequential (SGL) greedy learning on MNIST-1D and digits, K = 2, 3, 4 modules.

Every method trains the same branched net (one stage per module, conv1x1 auxiliary heads) with the same data
order, optimizer (SGD, momentum 0.9, cosine schedule) and number of epochs:

- ``backprop``: rule ``joint`` with ``last_only: true`` (only the last exit's loss, end to end);
- ``dgl``: rule ``dgl`` (one optimizer per module, no gradient across modules);
- ``sgl``: rule ``sgl``; the epochs are split evenly over the modules and each phase gets its own cosine
  schedule (each module sees a full schedule, as when it is trained to completion).

Reports final (last-exit) and per-exit test accuracy, mean ± std over seeds.

    python benchmarks/bench_dgl.py --seeds 3   # writes runs/benchmarks/dgl_accuracy.json (--out to change)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _output import default_out

from anytrain.data import BatchLoader, load_dataset
from anytrain.eval.anytime import accuracy_per_exit, exit_logits
from anytrain.greedy import GreedyProcedure
from anytrain.nets import build_model
from anytrain.optim import build_optimizer
from anytrain.rules import build_rule
from anytrain.train.trainer import optimizer_for

SETTINGS = {
    "mnist1d": {"model": "cnn1d-exits", "epochs": 24, "lr": 0.05},
    "digits": {"model": "cnn2d-exits", "epochs": 30, "lr": 0.1},
}


def cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))


def train_one(
    dataset: str,
    method: str,
    k: int,
    seed: int,
    epochs: int | None = None,
    head: str = "conv1x1",
    batch_size: int = 64,
    rule_kw: dict[str, Any] | None = None,
) -> dict[str, Any]:
    s = SETTINGS[dataset]
    epochs = int(epochs or s["epochs"])
    data = load_dataset(dataset, seed=0)  # the data set is fixed; the seed varies init and batch order
    torch.manual_seed(seed)
    net = build_model(s["model"], in_shape=data.input_shape, num_classes=data.num_classes, exits=k, head=head)
    name, kw = {"backprop": ("joint", {"last_only": True}), "dgl": ("dgl", {}), "sgl": ("sgl", {})}[method]
    rule = build_rule(name, **kw, **(rule_kw or {}))
    rule.bind(net)
    opt = optimizer_for(
        rule, net, lambda n, p: build_optimizer("sgd", n, p, lr=s["lr"], momentum=0.9, weight_decay=5e-4)
    )
    loader = BatchLoader(data.x_train, data.y_train, batch_size, seed=seed, drop_last=True, augment=data.augment)
    spe = len(loader)
    if method == "sgl":
        phases = rule.phases(epochs, k)  # type: ignore[attr-defined]
        starts = [sum(phases[:j]) * spe for j in range(k)]

        def lr_at(step: int) -> float:
            j = max(i for i in range(k) if starts[i] <= step)
            return cosine(step - starts[j], phases[j] * spe)
    else:

        def lr_at(step: int) -> float:
            return cosine(step, epochs * spe)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        rule.on_epoch_start(epoch, epochs)
        net.train()
        loader.set_epoch(epoch)
        for x, y in loader:
            if isinstance(rule, GreedyProcedure):  # every module steps its own optimizer
                rule.step(net, x, y, opt)
            else:
                opt.zero_grad(set_to_none=True)
                rule.backward(net, [F.cross_entropy(z, y) for z in rule.forward(net, x)])
                opt.step()
            sched.step()
    secs = time.perf_counter() - t0
    acc = accuracy_per_exit(exit_logits(net, data.x_test, 1000), data.y_test)
    return {
        "dataset": dataset,
        "method": method,
        "K": k,
        "seed": seed,
        "epochs": epochs,
        "head": head,
        "acc_per_exit": acc,
        "final": acc[-1],
        "train_seconds": secs,
    }


def summarize(records: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| data set | K | method | final acc (mean ± std) | per-exit acc (mean) | seeds |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["dataset"], r["K"], r["method"], r["head"]) for r in records})
    for ds, k, m, head in keys:
        rs = [r for r in records if (r["dataset"], r["K"], r["method"], r["head"]) == (ds, k, m, head)]
        fin = [100 * r["final"] for r in rs]
        sd = statistics.stdev(fin) if len(fin) > 1 else 0.0
        per = [statistics.mean(100 * r["acc_per_exit"][i] for r in rs) for i in range(k)]
        label = m if head == "conv1x1" else f"{m} ({head} heads)"
        rows.append(
            f"| {ds} | {k} | {label} | {statistics.mean(fin):.2f} ± {sd:.2f} | "
            f"{' / '.join(f'{a:.1f}' for a in per)} | {len(rs)} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"])
    ap.add_argument("--ks", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=["backprop", "dgl", "sgl"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--head", default="conv1x1")
    ap.add_argument("--out", default=str(default_out("dgl_accuracy.json")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    records: list[dict[str, Any]] = json.loads(out.read_text()) if out.exists() else []
    done = {(r["dataset"], r["method"], r["K"], r["seed"], r["head"]) for r in records}
    for ds in args.datasets:
        for seed in range(args.seeds):
            for k in args.ks:
                for m in args.methods:
                    if (ds, m, k, seed, args.head) in done:
                        continue
                    r = train_one(ds, m, k, seed, args.epochs, head=args.head)
                    records.append(r)
                    print(
                        f"{ds} K={k} {m:8s} seed={seed} final={r['final']:.4f} per-exit="
                        f"{[round(a, 3) for a in r['acc_per_exit']]} ({r['train_seconds']:.0f}s)",
                        flush=True,
                    )
                    out.parent.mkdir(parents=True, exist_ok=True)
                    tmp = out.with_suffix(".tmp")
                    tmp.write_text(json.dumps(records, indent=1) + "\n")
                    tmp.replace(out)
    print("\n".join(summarize(records)))


if __name__ == "__main__":
    main()
