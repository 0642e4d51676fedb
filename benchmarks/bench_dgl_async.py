"""Asynchronous DGL with replay buffers: accuracy vs slow-down and vs buffer size (single-process simulation).

MNIST-1D, ``cnn1d-exits`` with K=3 modules and conv1x1 heads. At each tick module ``j`` steps with probability
``p_j``; one module is slowed down by a factor ``S`` (``p = 1/S``), the others run at full speed. Two options
of ``AsyncConfig`` (see ``anytrain.greedy.async_dgl``): ``updates`` — ``until_first_done`` (the run ends when
module 0 has made ``epochs`` passes, so a slow module makes fewer updates) or ``equal`` (every module makes the
same number of updates, as in the authors' code) — and ``sampling`` of the buffers (``uniform`` or
``least_used``). Comparing the two ``updates`` rules at the same slow-down separates the cost of staleness from
the cost of fewer updates. Each module has its own cosine schedule over the number of updates it is expected to
make (``p_j / p_0`` × the producer's under ``until_first_done``, the producer's under ``equal``).

    python benchmarks/bench_dgl_async.py --seeds 2   # writes runs/benchmarks/dgl_async.json (--out to change)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from _output import default_out

from anytrain.data import BatchLoader, load_dataset
from anytrain.eval.anytime import accuracy_per_exit, exit_logits
from anytrain.greedy import AsyncConfig, build_module_optimizers, partition_stages, train_async_dgl
from anytrain.nets import build_model


def run(
    seed: int, slow_module: int, slowdown: float, buffer: int, sampling: str, updates: str, epochs: int, k: int = 3
) -> dict[str, Any]:
    data = load_dataset("mnist1d", seed=0)
    torch.manual_seed(seed)
    net = build_model("cnn1d-exits", in_shape=data.input_shape, num_classes=data.num_classes, exits=k, head="conv1x1")
    part = partition_stages(k)
    opts = build_module_optimizers(
        net, part, lambda n, p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4)
    ).optimizers
    loader = BatchLoader(data.x_train, data.y_train, 64, seed=seed, drop_last=True)
    probs = [1.0] * k
    probs[slow_module] = 1.0 / slowdown
    producer_steps = epochs * len(loader)
    expected = [max(1, int(producer_steps * (1 if updates == "equal" else probs[j] / probs[0]))) for j in range(k)]
    scheds = [
        torch.optim.lr_scheduler.LambdaLR(
            o, (lambda tot: lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / tot))))(expected[j])
        )
        for j, o in enumerate(opts)
    ]
    net.train()
    stats = train_async_dgl(
        net,
        part,
        opts,
        loader,
        epochs,
        AsyncConfig(step_prob=probs, buffer_size=buffer, sampling=sampling, updates=updates, seed=seed),
        on_step=lambda j: scheds[j].step(),
    )
    acc = accuracy_per_exit(exit_logits(net, data.x_test, 1000), data.y_test)
    return {
        "seed": seed,
        "slow_module": slow_module,
        "slowdown": slowdown,
        "buffer": buffer,
        "sampling": sampling,
        "updates": updates,
        "epochs": epochs,
        "acc_per_exit": acc,
        "final": acc[-1],
        "steps": stats.steps,
        "forward_only": stats.forward_only,
        "buffers": stats.buffers,
        "seconds": stats.seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", default=str(default_out("dgl_async.json")))
    ap.add_argument("--only-new", action="store_true", help="run only the equal-updates / least-used grid")
    args = ap.parse_args()
    torch.set_num_threads(1)
    u, first = "uniform", "until_first_done"
    grid = [(0, 1.0, 1, u, first), (0, 1.0, 10, u, first)]  # full speed: capacity 1 = synchronous DGL; replay
    grid += [(m, s, 10, u, first) for m in (0, 1) for s in (2.0, 4.0)]  # slow-down of the first / middle module
    grid += [(1, 2.0, b, u, first) for b in (1, 3, 30, 100)]  # buffer size at a 2x slower middle module
    # the same slow-downs with every module making the same number of updates, and least-used sampling
    new = [(0, 2.0, 10, u, "equal"), (1, 2.0, 10, u, "equal"), (1, 4.0, 10, u, "equal")]
    new += [(1, 2.0, 10, "least_used", first), (1, 2.0, 10, "least_used", "equal")]
    grid = new if args.only_new else grid + new
    out = Path(args.out)
    records: list[dict[str, Any]] = json.loads(out.read_text()) if out.exists() else []
    for r in records:  # records written before the two options existed
        r.setdefault("sampling", u)
        r.setdefault("updates", first)

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["slow_module"], r["slowdown"], r["buffer"], r["sampling"], r["updates"])

    done = {(r["seed"], *key(r)) for r in records}
    for seed in range(args.seeds):
        for m, s, b, samp, upd in grid:
            if (seed, m, s, b, samp, upd) in done:
                continue
            r = run(seed, m, s, b, samp, upd, args.epochs)
            records.append(r)
            print(
                f"seed={seed} slow module {m} x{s:g} buffer={b} {samp} {upd}: final={r['final']:.4f} "
                f"per-exit={[round(a, 3) for a in r['acc_per_exit']]} steps={r['steps']}",
                flush=True,
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(records, indent=1) + "\n")
            tmp.replace(out)
    print(
        "| slowed module | slow-down | buffer | sampling | updates | final acc (mean) | per-exit acc (mean) "
        "| updates per module | seeds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for g in grid:
        m, s, b, samp, upd = g
        rs = [r for r in records if key(r) == g]
        if not rs:
            continue
        per = [statistics.mean(100 * r["acc_per_exit"][i] for r in rs) for i in range(len(rs[0]["acc_per_exit"]))]
        steps = [round(statistics.mean(r["steps"][i] for r in rs)) for i in range(len(rs[0]["steps"]))]
        who = "none" if s == 1.0 else str(m)
        print(
            f"| {who} | {s:g}x | {b} | {samp} | {upd} | {statistics.mean(100 * r['final'] for r in rs):.2f} | "
            f"{' / '.join(f'{a:.1f}' for a in per)} | {steps} | {len(rs)} |"
        )


if __name__ == "__main__":
    main()
