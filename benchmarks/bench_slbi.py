"""DessiLBI on MNIST-1D (CPU, 1 thread): SLBI vs SGD accuracy, the path (sparsity vs W* accuracy), winning
tickets vs magnitude vs random pruning at equal sparsity, exported-model size/FLOPs/latency.

    python benchmarks/bench_slbi.py --seeds 0 1 2 --epochs 30
    python benchmarks/bench_slbi.py --dataset fashion-mnist --num-samples 8000 --model cnn2d-exits --width 16 \
        --epochs 4 --speed-steps 0 --seeds 0 --out RUNDIR/slbi-seed0.json   # as bench_fashion.py runs it

Writes ``--out`` (default ``runs/benchmarks/slbi.json``). Lean loop (no trainer): joint loss over the exits of
``cnn1d-exits`` (or ``--model``); accuracy is that of the last exit.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _output import default_out
from torch import nn

from anytrain.data import load_dataset
from anytrain.nets import build_model
from anytrain.optim import SLBI, build_optimizer
from anytrain.sparsity import (
    count_macs,
    count_params,
    cpu_latency,
    export_pruned,
    magnitude_plan,
    make_ticket,
    random_plan,
    stopping_point,
    zero_channel_plan,
)


def batches(n: int, bs: int, seed: int, epoch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g)
    return [perm[i : i + bs] for i in range(0, n - bs + 1, bs)]


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    was = net.training
    net.eval()
    right = sum(int((net(x[i : i + chunk])[-1].argmax(1) == y[i : i + chunk]).sum()) for i in range(0, len(y), chunk))
    net.train(was)
    return right / len(y)


def train(
    net: nn.Module, opt: torch.optim.Optimizer, data, epochs: int, seed: int, on_epoch=None, every: int = 0
) -> float:
    """Train; ``on_epoch(step)`` is called after every epoch and, with ``every > 0``, every ``every`` steps."""
    steps = epochs * len(batches(len(data.y_train), 128, seed, 0))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)  # per-step cosine decay
    step = 0
    for e in range(epochs):
        net.train()
        for idx in batches(len(data.y_train), 128, seed, e):
            x, y = data.x_train[idx], data.y_train[idx]
            opt.zero_grad(set_to_none=True)
            sum(F.cross_entropy(z, y) for z in net(x)).backward()
            opt.step()
            sched.step()
            step += 1
            if on_epoch is not None and every > 0 and step % every == 0:
                on_epoch(step)
        if on_epoch is not None and not (every > 0 and step % every == 0):
            on_epoch(step)
    return accuracy(net, data.x_test, data.y_test)


MODEL = {"name": "cnn1d-exits", "in_shape": (1, 40)}  # set from --model and the data in main()


def make_net(seed: int, width: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(MODEL["name"], in_shape=MODEL["in_shape"], num_classes=10, width=width, exits=4)


def sgd(net: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def conv_filter_fraction_removed(dense: nn.Module, small: nn.Module) -> float:
    def filters(m: nn.Module) -> int:
        return sum(c.out_channels for c in m.stages.modules() if isinstance(c, (nn.Conv1d, nn.Conv2d)))

    return 1.0 - filters(small) / filters(dense)


def run_seed(seed: int, args, data) -> dict:
    x1 = data.x_test[:1]
    res: dict = {"seed": seed}
    # dense SGD reference
    init = make_net(seed, args.width)
    dense = copy.deepcopy(init)
    res["sgd_acc"] = train(dense, sgd(dense, args.lr), data, args.epochs, seed)
    # SLBI with the path recorded each epoch
    net = copy.deepcopy(init)
    opt: SLBI = build_optimizer("slbi", net, lr=args.lr, kappa=args.kappa, mu=args.mu, momentum=0.9, weight_decay=5e-4)
    path: list[dict] = []
    snaps: dict[int, nn.Module] = {}

    def record(step: int) -> None:
        star = opt.projected_model(net).eval()
        m = opt.epoch_metrics()
        plan = zero_channel_plan(star, x1)
        path.append(
            {
                "step": step,
                "support": m["support/all"],
                "w_acc": accuracy(net, data.x_test, data.y_test),
                "wstar_acc": accuracy(star, data.x_test, data.y_test),  # reported only
                "wstar_val_acc": accuracy(star, data.x_val, data.y_val),  # the stopping point looks at this
                "removed": plan.fraction(),
            }
        )
        snaps[step] = star

    res["slbi_acc"] = train(net, opt, data, args.epochs, seed, on_epoch=record, every=args.record_every)
    res["path"] = path
    # early stopping on validation (anytrain.sparsity.stopping_point)
    stop = stopping_point(path, args.target)
    res["stop"] = stop
    star = snaps[stop["step"]]
    small, plan = export_pruned(star, x1)
    with torch.no_grad():
        err = max(float((a - b).abs().max()) for a, b in zip(star(data.x_test[:256]), small(data.x_test[:256])))
    res["export"] = {
        "max_abs_diff_vs_wstar": err,
        "exported_acc": accuracy(small, data.x_test, data.y_test),
        "params": [count_params(star), count_params(small)],
        "macs": [count_macs(star, x1), count_macs(small, x1)],
        "latency_s_bs256": [cpu_latency(star, data.x_test[:256]), cpu_latency(small, data.x_test[:256])],
        "conv_filters_removed": conv_filter_fraction_removed(star, small),
        "channels_removed": plan.fraction(),
    }
    # tickets at equal sparsity (same number of channels removed from every coupled group)
    plans = {"slbi": plan, "magnitude": magnitude_plan(dense, plan, x1), "random": random_plan(plan, seed)}
    res["tickets"] = {}
    for kind, p in plans.items():
        for rewind in (True, False) if kind == "slbi" else (True,):
            ticket = make_ticket(init, p, x1, rewind=rewind, seed=seed)
            acc = train(ticket, sgd(ticket, args.lr), data, args.epochs, seed)
            res["tickets"][f"{kind}-{'rewind' if rewind else 'reinit'}"] = acc
    return res


def step_time(args, data) -> dict:
    """Median seconds per training step (forward+backward+step) and per optimizer step alone."""
    out = {}
    for name in ("sgd", "slbi"):
        net = make_net(0, args.width)
        opt = (
            sgd(net, args.lr)
            if name == "sgd"
            else build_optimizer("slbi", net, lr=args.lr, kappa=args.kappa, mu=args.mu, weight_decay=5e-4)
        )
        x, y = data.x_train[:128], data.y_train[:128]
        full, only = [], []
        for i in range(args.speed_steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            sum(F.cross_entropy(z, y) for z in net(x)).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if i >= 5:
                full.append(t2 - t0)
                only.append(t2 - t1)
        full.sort()
        only.sort()
        out[name] = {"step_s": full[len(full) // 2], "opt_step_s": only[len(only) // 2]}
    out["ratio_step"] = out["slbi"]["step_s"] / out["sgd"]["step_s"]
    out["ratio_opt_step"] = out["slbi"]["opt_step_s"] / out["sgd"]["opt_step_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--kappa", type=float, default=1.0)
    ap.add_argument("--mu", type=float, default=2.0)
    ap.add_argument("--target", type=float, default=0.5, help="filter fraction to remove at the stopping point")
    ap.add_argument("--record-every", type=int, default=8, help="path points every this many steps")
    ap.add_argument("--speed-steps", type=int, default=60, help="0: skip the step-time measurement")
    ap.add_argument("--dataset", default="mnist1d")
    ap.add_argument("--num-samples", type=int, default=None, help="data.num_samples (a seeded training subset)")
    ap.add_argument("--model", default="cnn1d-exits", help="a branched net with a `width` and `exits` option")
    ap.add_argument("--out", default=str(default_out("slbi.json")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    data = load_dataset(args.dataset, seed=0, num_samples=args.num_samples)
    MODEL.update(name=args.model, in_shape=tuple(data.x_train.shape[1:]))
    t0 = time.time()
    result = {"args": vars(args), "speed": step_time(args, data) if args.speed_steps else None, "seeds": []}
    print(json.dumps(result["speed"]), flush=True)
    for s in args.seeds:
        r = run_seed(s, args, data)
        result["seeds"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "path"}), flush=True)
        print("path:", [(p["step"], round(p["removed"], 3), round(p["wstar_acc"], 3)) for p in r["path"]], flush=True)
    result["wall_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
