"""Where a training step's time goes (issue 21, item 4): per phase and per op, for the small anytime nets.

For each net at its default batch size — the default run (``nested-width`` on MNIST-1D, batch 128), the
``nested-depth`` and ``nested-width-depth`` recipes (MNIST-1D, batch 128) and ``msdnet-small`` (Fashion-MNIST
subset, batch 128) — and for ``joint`` and exact ``osgd``: the median wall time of the forward pass, the rule's
backward and the optimizer step (phases interleaved step by step), the forward multiply-adds, and the
``torch.profiler`` table of the ops with the most self time over a few whole steps, with their call counts.

    python benchmarks/profile_step.py --out /tmp/anytrain-profile      # writes profile.md there
    python benchmarks/profile_step.py --ratios 24 --threads 1          # instead: OSGD against joint, round robin

``--ratios REPS`` times joint, exact OSGD and amortized OSGD (K=4) on each net stepping round robin, ``REPS`` steps
each, so a load that drifts hits the three alike: the side-by-side figure for the issue's ratio targets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import NETS  # noqa: E402  (the same net definitions as the throughput table)

CASES = {
    "default run (nested-width)": [],
    "nested-depth": ["model.name=nested-depth", "model.stages=4", "model.width=16"],
    "nested-width-depth": ["model.name=nested-width-depth", "model.stages=3", "model.width=8"],
    "msdnet-small": ["data.name=fashion-mnist", "data.num_samples=1024", *NETS["msdnet-small"]],
}


def profile_case(overrides: list[str], rule: str, steps: int, top: int) -> tuple[dict[str, float], str, int]:
    from anytrain.config import load_config
    from anytrain.train.trainer import build_components

    cfg = load_config(None, [*overrides, f"rule.name={rule}", "train.device=cpu"])
    c = build_components(cfg)
    net, r, opt, data = c["net"], c["rule"], c["optimizer"], c["data"]
    net.train()
    x, y = data.x_train[: cfg.data.batch_size], data.y_train[: cfg.data.batch_size]
    phases: dict[str, list[float]] = {"forward": [], "backward (rule)": [], "optimizer": []}

    def step(record: bool) -> None:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses = [F.cross_entropy(z, y) for z in r.forward(net, x)]
        t1 = time.perf_counter()
        r.backward(net, losses)
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if record:
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[k].append(v)

    for _ in range(3):
        step(False)
    for _ in range(steps):
        step(True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step(False)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=45)
    stage, head = net.flops_breakdown(data.input_shape)
    return {k: 1000 * statistics.median(v) for k, v in phases.items()}, table, int(sum(stage) + sum(head))


def interleaved(overrides: list[str], rules: dict[str, list[str]], reps: int) -> dict[str, float]:
    """Mean ms per training step of each rule on one net, the rules stepping round robin (a drifting load hits
    all alike); ``reps`` a multiple of 4 so amortized OSGD's refresh steps come in their true proportion."""
    from anytrain.config import load_config
    from anytrain.train.trainer import build_components

    steps = {}
    for name, o in rules.items():
        cfg = load_config(None, [*overrides, *o, "train.device=cpu"])
        c = build_components(cfg)
        net, r, opt, data = c["net"], c["rule"], c["optimizer"], c["data"]
        net.train()
        x, y = data.x_train[: cfg.data.batch_size], data.y_train[: cfg.data.batch_size]

        def step(net=net, r=r, opt=opt, x=x, y=y) -> None:
            opt.zero_grad(set_to_none=True)
            r.backward(net, [F.cross_entropy(z, y) for z in r.forward(net, x)])
            opt.step()

        steps[name] = step
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(reps + 4):
        for k, f in steps.items():
            t = time.perf_counter()
            f()
            if i >= 4:
                times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.mean(v) for k, v in times.items()}


RATIO_RULES = {"joint": ["rule.name=joint"], "osgd": ["rule.name=osgd"], "osgd amortize=4": ["rule.amortize=4"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(tempfile.gettempdir()) / "anytrain-profile"
    ap.add_argument("--out", type=Path, default=default, help=f"output folder (default {default})")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE")
    ap.add_argument("--rules", nargs="+", default=["joint", "osgd"])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--ratios",
        type=int,
        default=0,
        metavar="REPS",
        help="instead of the profile: OSGD against joint, round robin, REPS steps each",
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    md = [f"# Step profile (threads {a.threads}, load at start {os.getloadavg()[0]:.1f})", ""]
    for case in a.cases:
        for rule in a.rules if not a.ratios else []:
            ph, table, macs = profile_case(CASES[case], rule, a.steps, a.top)
            total = sum(ph.values())
            line = ", ".join(f"{k} {v:.1f} ms" for k, v in ph.items())
            md += [f"## {case}, {rule}: {total:.1f} ms per step ({line}); forward {macs} MACs per sample", ""]
            md += ["```", table.strip(), "```", ""]
            print(f"{case:28s} {rule:6s} {total:7.1f} ms  ({line})", flush=True)
    if a.ratios:
        md += ["## OSGD against joint, round robin", "", "| net | joint ms | osgd ms (×) | amortized K=4 ms (×) |"]
        md.append("|---|---|---|---|")
        for case in a.cases:
            rules = {k: ["rule.name=osgd", *v] if k != "joint" else v for k, v in RATIO_RULES.items()}
            t = interleaved(CASES[case], rules, 4 * max(1, a.ratios // 4))
            j, o, am = t["joint"], t["osgd"], t["osgd amortize=4"]
            md.append(f"| {case} | {j:.1f} | {o:.1f} ({o / j:.2f}×) | {am:.1f} ({am / j:.2f}×) |")
            print(md[-1], flush=True)
        md.append("")
    md.append(f"load at end {os.getloadavg()[0]:.1f}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "profile.md").write_text("\n".join(md) + "\n")
    print("wrote", a.out / "profile.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
