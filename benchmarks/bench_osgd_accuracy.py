"""Anytime accuracy on MNIST-1D: nets × gradient rules × seeds, plus independently trained sub-networks.

For each (net, rule, seed) a lean training loop (SGD momentum 0.9, weight decay 5e-4, cosine learning rate,
batch 128) trains on the 3600 MNIST-1D training samples (400 more are held out for validation) and evaluates
every exit on the validation set (``val_acc``: what a learning-rate choice may look at) and on the 1000 test
samples (``acc``: reported only).
The "independent" baseline trains, for each exit k, stages ≤ k and head k on L_k alone (``upto=k``): the
sub-network of the same size trained by itself.

    python benchmarks/bench_osgd_accuracy.py --epochs 30 --seeds 0 1 2

Results go to ``--out`` (default ``runs/benchmarks/osgd_accuracy.json``; one entry per run, appended as runs
finish, so an interrupted benchmark resumes where it stopped) and a summary table is printed (mean ± std per exit, mean
exit accuracy, area under the accuracy-vs-FLOPs curve).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _output import default_out

from anytrain.data import load_dataset
from anytrain.eval.anytime import anytime_auc
from anytrain.nets import build_model
from anytrain.rules import build_rule

NETS = {
    "cnn1d-exits": dict(name="cnn1d-exits", width=16, exits=4),
    "nested-width": dict(name="nested-width", stages=4, width=8),
    "nested-depth": dict(name="nested-depth", stages=4, width=16),
    "nested-width-depth": dict(name="nested-width-depth", stages=3, width=8),
}
RULES = {
    "joint": ("joint", {}),
    "adaloss": ("adaloss", {}),
    "osgd": ("osgd", {}),
    "osgd-amortized10": ("osgd", {"amortize": 10}),
    "torchjd:PCGrad": ("torchjd:PCGrad", {}),
    "torchjd:UPGrad": ("torchjd:UPGrad", {}),
    "torchjd:MGDA": ("torchjd:MGDA", {}),
    "torchjd:CAGrad": ("torchjd:CAGrad", {}),
}


def make_net(key: str, num_classes: int):
    kw = dict(NETS[key])
    name = kw.pop("name")
    return build_model(name, in_shape=(1, 40), num_classes=num_classes, **kw)


@torch.no_grad()
def evaluate(net, x, y) -> list[float]:
    net.eval()
    out = net(x)
    net.train()
    return [float((z.argmax(1) == y).float().mean()) for z in out]


def train(net_key: str, rule_key: str, seed: int, epochs: int, data, lr: float, only_exit: int | None = None):
    torch.manual_seed(seed)
    net = make_net(net_key, data.num_classes)
    flops = net.flops_per_exit((1, 40))
    rule = None
    if only_exit is None:
        name, kw = RULES[rule_key]
        rule = build_rule(name, **kw)
        rule.bind(net)
        params = [p for p in net.parameters()]
    else:  # independent sub-network: stages ≤ k and head k only
        params = [p for j in range(only_exit + 1) for p in net.stage_parameters(j)]
        params += list(net.exit_parameters(only_exit))
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    xtr, ytr = data.x_train.float(), data.y_train.long()
    n, bs = xtr.shape[0], 128
    steps_per_epoch = n // bs
    total = epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    step = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * bs : (i + 1) * bs]
            x, y = xtr[idx], ytr[idx]
            for group in opt.param_groups:  # cosine schedule
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            if rule is None:
                F.cross_entropy(net(x, upto=only_exit)[-1], y).backward()
            else:
                losses = [F.cross_entropy(z, y) for z in rule.forward(net, x)]
                rule.backward(net, losses)
            opt.step()
            step += 1
    secs = time.perf_counter() - t0
    acc = evaluate(net, data.x_test.float(), data.y_test.long())
    val = evaluate(net, data.x_val, data.y_val)  # choose hyper-parameters (learning rate) on this, never on acc
    if only_exit is not None:
        acc, val = acc[: only_exit + 1], val[: only_exit + 1]
    return {"acc": acc, "val_acc": val, "flops": flops, "seconds": secs}


def summarize(results: list[dict]) -> str:
    from collections import defaultdict

    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["net"], r["rule"])].append(r)
    lines = [
        "| net | rule | seeds | acc per exit (mean ± std, %) | mean exit acc | AUC acc-vs-FLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for (net, rule), rs in sorted(groups.items()):
        K = len(rs[0]["acc"])
        per = []
        for k in range(K):
            v = [100 * r["acc"][k] for r in rs]
            per.append(f"{statistics.mean(v):.1f}±{statistics.stdev(v) if len(v) > 1 else 0:.1f}")
        means = [100 * statistics.mean(r["acc"]) for r in rs]
        aucs = [100 * anytime_auc(r["flops"], r["acc"]) for r in rs]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        lines.append(
            f"| {net} | {rule} | {len(rs)} | {' / '.join(per)} | {statistics.mean(means):.1f}±{sd(means):.1f} | "
            f"{statistics.mean(aucs):.1f}±{sd(aucs):.1f} |"
        )
    return "\n".join(lines)


def target_check(results: list[dict]) -> str:
    """The issue's target: OSGD beats joint on mean exit accuracy and on the earliest exit, beyond one std."""
    out = []
    for net in sorted({r["net"] for r in results}):

        def stats(rule, f, net=net):
            v = [f(r["acc"]) for r in results if r["net"] == net and r["rule"] == rule]
            return (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) if v else None

        for f, what in ((lambda a: statistics.mean(a), "mean exit"), (lambda a: a[0], "earliest exit")):
            o, j = stats("osgd", f), stats("joint", f)
            if o and j:
                beat = o[0] - o[1] > j[0] + j[1]
                out.append(
                    f"{net}: {what} osgd {100 * o[0]:.1f}±{100 * o[1]:.1f} vs joint "
                    f"{100 * j[0]:.1f}±{100 * j[1]:.1f} -> {'MET' if beat else 'not met'}"
                )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nets", nargs="+", default=list(NETS))
    ap.add_argument("--rules", nargs="+", default=list(RULES) + ["independent"])
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", default=str(default_out("osgd_accuracy.json")))
    ap.add_argument("--summarize", nargs="+", metavar="JSON", help="only print the table of these result files")
    a = ap.parse_args()
    if a.summarize:
        runs = [r for f in a.summarize for r in json.loads(Path(f).read_text())["runs"] if r["epochs"] == a.epochs]
        print(summarize(runs))
        print(target_check(runs))
        return
    torch.set_num_threads(1)
    data = load_dataset("mnist1d", seed=0)
    out = Path(a.out)
    results: list[dict] = json.loads(out.read_text())["runs"] if out.exists() else []
    done = {(r["net"], r["rule"], r["seed"], r["epochs"]) for r in results}
    for seed in a.seeds:  # seeds outermost: a cut-short run still has every (net, rule) cell
        for net_key in a.nets:
            for rule_key in a.rules:
                if (net_key, rule_key, seed, a.epochs) in done:
                    continue
                if rule_key == "independent":
                    K = make_net(net_key, data.num_classes).num_exits
                    parts = [train(net_key, rule_key, seed, a.epochs, data, a.lr, only_exit=k) for k in range(K)]
                    r = {
                        "acc": [p["acc"][-1] for p in parts],
                        "val_acc": [p["val_acc"][-1] for p in parts],
                        "flops": parts[-1]["flops"],
                        "seconds": sum(p["seconds"] for p in parts),
                    }
                else:
                    r = train(net_key, rule_key, seed, a.epochs, data, a.lr)
                r.update(net=net_key, rule=rule_key, seed=seed, epochs=a.epochs)
                results.append(r)
                print(
                    f"{net_key:20s} {rule_key:18s} seed {seed}: acc {[round(v, 3) for v in r['acc']]} "
                    f"({r['seconds']:.0f}s)",
                    flush=True,
                )
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps({"machine": "CPU, 1 thread, shared with other jobs", "runs": results}))
                tmp.replace(out)
    print(summarize([r for r in results if r["epochs"] == a.epochs]))
    print(target_check([r for r in results if r["epochs"] == a.epochs]))


if __name__ == "__main__":
    main()
