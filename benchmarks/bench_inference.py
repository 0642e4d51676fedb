"""Anytime inference, measured (issue 22, item 2): latency and throughput of the early-exit predictor at each
average MAC budget against the full network, next to the MAC ratio.

    python benchmarks/bench_inference.py --out /tmp/bench_inference

For each net kind a short Fashion-MNIST run is trained first through the ``anytrain`` CLI (the shipped
``configs/fashion-mnist-joint-*.yaml`` recipes where there is one: a seeded 6,000-image training subset, 600 of it
held out for validation, 2 epochs, rule joint; ``--epochs``/``--num-samples`` change that), one thread, under
``nice``. Then, in one process with one thread:

- thresholds are fitted on the validation split for each budget (``anytrain.eval.default_budgets``: from the first
  exit's early-exit cost to the last's), as ``anytrain eval --budget`` does;
- **throughput at batch 256**: the first ``--samples`` test images in batches of 256, the predictor and the full
  network (stages ``0..K−1`` and the last head: ``StagedNet.forward_exit``) timed alternately, ``--repeats`` times,
  median of each; speed-up = full time / predictor time;
- **latency at batch 1**: ``--latency-samples`` test images one at a time, each timed ``3`` times for either
  (minimum kept), mean over the images (a budget is an average, so is the latency);
- **MAC ratio** = the full network's MACs per sample / the predictor's mean MACs per sample on those images, the
  predictor's count being checked against the per-sample sum of the stages and heads it ran.

Target (issue 22): speed-up at batch 256 ≥ 0.7 × the MAC ratio. Writes ``inference.json`` and ``inference.md`` into
``--out`` (default ``/tmp/bench_inference``, outside the source tree; the committed copies in
``benchmarks/results/`` are copied there on purpose).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
NETS: dict[str, tuple[str | None, list[str]]] = {  # net -> (shipped config, extra --set)
    "cnn2d-exits": ("fashion-mnist-joint-cnn2d-exits.yaml", []),
    "nested-width": ("fashion-mnist-joint-nested-width.yaml", []),
    "nested-depth": ("fashion-mnist-joint-nested-width.yaml", ["model=nested-depth", "model.stages=3"]),
    "nested-width-depth": ("fashion-mnist-joint-nested-width.yaml", ["model=nested-width-depth", "model.stages=3"]),
    "msdnet-small": ("fashion-mnist-joint-msdnet-small.yaml", []),
}
QUIET = ["train.threads=1", "train.progress=false", "train.tensorboard=false", "train.plots=false"]


def train(net: str, runs: Path, epochs: int | None, num_samples: int | None) -> Path:
    run = runs / net
    if (run / "metrics.json").is_file():
        return run
    config, extra = NETS[net]
    sets = [*extra, *QUIET]
    if epochs is not None:
        sets.append(f"train.epochs={epochs}")
    if num_samples is not None:
        sets.append(f"data.num_samples={num_samples}")
    base = ["nice", "-n", "10", sys.executable, "-m", "anytrain.cli", "train"]
    if run.exists():  # an interrupted run: continue it
        cmd = [*base, "--resume", str(run)]
    else:
        cmd = [*base, str(ROOT / "configs" / str(config)), *[a for s in sets for a in ("--set", s)], "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    return run


def _time(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(run: Path, budgets_n: int, samples: int, latency_samples: int, repeats: int) -> dict[str, Any]:
    from anytrain.config import load_config
    from anytrain.eval import default_budgets, exit_costs
    from anytrain.inference import AnytimePredictor, Budget
    from anytrain.train.deploy import load_run
    from anytrain.train.trainer import data_from_config

    r = load_run(run)
    net = r.net.eval()
    data = data_from_config(load_config(run / "config.yaml"), augment=False)
    x = data.x_test[:samples].contiguous()
    y = data.y_test[:samples]
    stage, head = net.flops_breakdown(r.input_shape)
    costs = exit_costs(stage, head)
    full_macs = net.flops_per_exit(r.input_shape)[-1]
    K = net.num_exits
    assert r.val is not None
    batches = [x[i : i + 256] for i in range(0, x.shape[0], 256)]
    one = [x[i : i + 1] for i in range(latency_samples)]

    def full(b: torch.Tensor) -> torch.Tensor:
        return net.forward_exit(b, K - 1)

    rows = []
    with torch.inference_mode():
        full_acc = float((torch.cat([full(b).argmax(-1) for b in batches]) == y).double().mean())
        for budget in default_budgets(costs, budgets_n):
            pol = Budget.fit(r.val[0], r.val[1], costs, budget)
            pred = AnytimePredictor(net, pol, input_shape=r.input_shape)
            p = pred.predict(x, batch_size=256)
            macs_ok = p.macs.tolist() == [int(costs[e]) for e in p.exits.tolist()]
            mean_macs = float(p.macs.double().mean())
            t_full, t_pred = [], []
            for _ in range(repeats):  # alternate, so that a load spike hits both
                t_full.append(_time(lambda: [full(b) for b in batches]))
                t_pred.append(_time(lambda pred=pred: [pred.predict(b) for b in batches]))
            lat_full, lat_pred = [], []
            for s in one:
                lat_full.append(min(_time(lambda: full(s)) for _ in range(3)))  # noqa: B023
                lat_pred.append(min(_time(lambda: pred.predict(s)) for _ in range(3)))  # noqa: B023
            tf, tp = statistics.median(t_full), statistics.median(t_pred)
            lf, lp = statistics.fmean(lat_full), statistics.fmean(lat_pred)
            ratio = full_macs / mean_macs
            rows.append(
                {
                    "budget": budget,
                    "thresholds": pol.thresholds,
                    "accuracy": float((p.labels.cpu() == y).double().mean()),
                    "exit_histogram": torch.bincount(p.exits, minlength=K).tolist(),
                    "mean_macs": mean_macs,
                    "mac_ratio": ratio,
                    "macs_equal_stages_and_heads_run": macs_ok,
                    "throughput_full": x.shape[0] / tf,
                    "throughput_predictor": x.shape[0] / tp,
                    "speedup_b256": tf / tp,
                    "latency_full_ms": 1e3 * lf,
                    "latency_predictor_ms": 1e3 * lp,
                    "speedup_b1": lf / lp,
                    "target_met": tf / tp >= 0.7 * ratio,
                }
            )
            print(
                f"  budget {budget:>12,.0f}: MAC ratio {ratio:5.2f}  speed-up b256 {tf / tp:5.2f}  b1 {lf / lp:5.2f}"
                f"  acc {rows[-1]['accuracy']:.4f}  exits {rows[-1]['exit_histogram']}",
                flush=True,
            )
    return {
        "run": str(run),
        "stage_macs": stage,
        "head_macs": head,
        "full_macs": full_macs,
        "full_accuracy": full_acc,
        "rows": rows,
    }


def report(res: dict[str, Any]) -> str:
    lines = [
        f"Measured {res['date']} on {res['machine']}; load average before / after: {res['load_before']} / "
        f"{res['load_after']}; torch {res['torch']}, {res['threads']} thread(s). Command: `{res['command']}`.",
        "",
        "| net | budget (MACs) | mean MACs | MAC ratio | speed-up b256 | target 0.7×ratio | met | b256 samples/s "
        "(full → early exit) | b1 latency ms (full → early exit) | accuracy (full → early exit) | exits |",
        "|---|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---|",
    ]
    for name, r in res["nets"].items():
        for row in r["rows"]:
            lines.append(
                f"| {name} | {row['budget']:,.0f} | {row['mean_macs']:,.0f} | {row['mac_ratio']:.2f} | "
                f"{row['speedup_b256']:.2f} | {0.7 * row['mac_ratio']:.2f} | {'yes' if row['target_met'] else 'no'} | "
                f"{row['throughput_full']:,.0f} → {row['throughput_predictor']:,.0f} | "
                f"{row['latency_full_ms']:.2f} → {row['latency_predictor_ms']:.2f} | "
                f"{r['full_accuracy']:.4f} → {row['accuracy']:.4f} | {row['exit_histogram']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/bench_inference", help="runs and results folder (outside the tree)")
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--epochs", type=int, help="override the recipes' 2 epochs")
    ap.add_argument("--num-samples", type=int, help="override the recipes' 6,000 training images")
    ap.add_argument("--budgets", type=int, default=5, help="budgets per net (default_budgets)")
    ap.add_argument("--samples", type=int, default=2560, help="test images for throughput (batches of 256)")
    ap.add_argument("--latency-samples", type=int, default=200, help="test images for batch-1 latency")
    ap.add_argument("--repeats", type=int, default=5, help="alternating timing repeats at batch 256")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [train(n, out / "runs", args.epochs, args.num_samples) for n in args.nets]
    torch.set_num_threads(1)
    res: dict[str, Any] = {
        "command": "python benchmarks/bench_inference.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'cpu'})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_before": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "nets": {},
    }
    for name, run in zip(args.nets, runs):
        print(name, flush=True)
        res["nets"][name] = measure(run, args.budgets, args.samples, args.latency_samples, args.repeats)
    res["load_after"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    (out / "inference.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "inference.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
