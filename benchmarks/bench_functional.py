"""Cost of ``anytrain.rules.backward(losses, rule, shared=...)`` (exit partition read off the autograd graph)
against ``rule.backward(net, losses)`` on a StagedNet (partition from the structure), same net and batch.

    python benchmarks/bench_functional.py [--model nested-width] [--batch 128] [--reps 30]

Prints the median step time of each path (forward + backward, no optimizer step) and of the graph walk alone.
The machine it was run on is shared and loaded: compare the lines of one run, not runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from anytrain.nets import build_model
from anytrain.rules import OSGD, backward, build_rule
from anytrain.rules._pergrad import graph_partition


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="nested-width")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = build_model(args.model, in_shape=(1, 40), num_classes=10)
    x, y = torch.randn(args.batch, 1, 40), torch.randint(0, 10, (args.batch,))
    trunk = net.trunk_parameters()

    def losses() -> list[torch.Tensor]:
        return [F.cross_entropy(z, y) for z in net(x)]

    def staged(rule_name: str, **kw: str) -> None:
        rule = build_rule(rule_name, **kw)
        net.zero_grad(set_to_none=True)
        rule.backward(net, losses())

    def functional(rule_name: str, **kw: str) -> None:
        net.zero_grad(set_to_none=True)
        backward(losses(), build_rule(rule_name, **kw), shared=trunk)

    held = losses()

    def walk() -> None:  # on one graph, kept alive: the walk alone
        graph_partition(held, trunk)

    def forward_only() -> None:
        losses()

    def median(fn, *a, **kw) -> float:  # type: ignore[no-untyped-def]
        ts = []
        for i in range(args.reps + 3):
            t0 = time.perf_counter()
            fn(*a, **kw)
            if i >= 3:
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    assert isinstance(build_rule("osgd"), OSGD)
    fwd = median(forward_only)
    print(f"model {args.model}, batch {args.batch}, {net.num_exits} exits, 1 thread, median of {args.reps}")
    print(f"forward only                     {1e3 * fwd:7.2f} ms")
    print(f"graph walk alone                 {1e3 * median(walk):7.2f} ms")
    for r in ("joint", "osgd"):
        print(f"{r:6s} rule.backward(StagedNet)   {1e3 * median(staged, r):7.2f} ms")
        print(f"{r:6s} rules.backward(shared=)    {1e3 * median(functional, r):7.2f} ms")
    print(f"osgd   batched, StagedNet         {1e3 * median(staged, 'osgd', grad_method='batched'):7.2f} ms")
    print(f"osgd   batched, rules.backward    {1e3 * median(functional, 'osgd', grad_method='batched'):7.2f} ms")


if __name__ == "__main__":
    main()
