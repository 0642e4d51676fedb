"""Time per training step of OSGD and its peers against the unavoidable work.

The *bound* is what any exact per-exit-gradient method must do: one forward pass plus, for each exit k, a
backward of L_k through stages ≤ k (``torch.autograd.grad``), plus the optimizer step. We time that directly
and report every rule's step time as a ratio to it and to ``joint`` (one forward + one backward).

Also measured: the K×K Gramian by ``torchjd.autogram.Engine`` (+ the one weighted backward it then needs)
versus K truncated backward passes + ``G Gᵀ``, on the same net without batch norm (autogram's batched mode
does not accept BatchNorm; we use ``batch_dim=None``, the mode that works for any module).

    python benchmarks/bench_osgd_speed.py [--quick]

Prints a table and writes ``--out`` (default ``runs/benchmarks/osgd_speed.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _output import default_out

from anytrain.nets import build_model
from anytrain.rules import build_rule
from anytrain.rules._pergrad import exit_partition, per_exit_grads


def _net(name: str, K: int, norm: bool = True):
    torch.manual_seed(0)
    if name == "cnn1d-exits":
        net = build_model("cnn1d-exits", in_shape=(1, 40), num_classes=10, width=32, exits=K)
        if not norm:
            for m in net.modules():
                for n, c in list(m.named_children()):
                    if isinstance(c, torch.nn.BatchNorm1d):
                        setattr(m, n, torch.nn.Identity())
        return net
    return build_model(name, in_shape=(1, 40), num_classes=10, stages=K, norm="batch" if norm else "none")


def _bench(fns: dict, reps: int, warm: int) -> dict[str, float]:
    """Seconds per call; methods interleaved round-robin so drift on a shared machine hits all alike.

    The median, except for amortized rules, whose every N-th step is an expensive refresh: for them the mean
    over a whole number of periods (``reps`` is a multiple of 10) is the honest cost per step.
    """
    for f in fns.values():
        for _ in range(warm):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.mean(v) if "amortized" in k else statistics.median(v) for k, v in times.items()}


def step_fns(name: str, K: int, batch: int) -> dict:
    net = _net(name, K)
    x, y = torch.randn(batch, 1, 40), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    part = exit_partition(net, K)

    def rule_step(rule):
        rule.bind(net)

        def f():
            opt.zero_grad(set_to_none=True)
            losses = [F.cross_entropy(z, y) for z in rule.forward(net, x)]
            rule.backward(net, losses)
            opt.step()

        return f

    def bound():
        opt.zero_grad(set_to_none=True)
        losses = [F.cross_entropy(z, y) for z in net(x)]
        for k in range(K):
            ps = part.trunk[: part.trunk_count[k]] + part.heads[k]
            torch.autograd.grad(losses[k], ps, retain_graph=k < K - 1)
        opt.step()

    fns = {"bound": bound, "joint": rule_step(build_rule("joint"))}
    fns["osgd"] = rule_step(build_rule("osgd"))
    fns["osgd-batched"] = rule_step(build_rule("osgd", grad_method="batched"))
    fns["osgd-per_tensor"] = rule_step(build_rule("osgd", mode="per_tensor"))
    fns["osgd-amortized10"] = rule_step(build_rule("osgd", amortize=10))
    fns["torchjd:UPGrad"] = rule_step(build_rule("torchjd:UPGrad"))
    fns["torchjd:PCGrad"] = rule_step(build_rule("torchjd:PCGrad"))
    return fns


def gram_fns(name: str, K: int, batch: int) -> dict:
    from torchjd.autogram import Engine

    net = _net(name, K, norm=False)
    hooked = _net(name, K, norm=False)  # the engine hooks every forward of its modules: keep it separate
    x, y = torch.randn(batch, 1, 40), torch.randint(0, 10, (batch,))
    part = exit_partition(net, K)
    engine = Engine(*hooked.stages, batch_dim=None)

    def per_exit():
        losses = [F.cross_entropy(z, y) for z in net(x)]
        G, _ = per_exit_grads(losses, part)
        return G @ G.T

    def autogram():
        losses = torch.stack([F.cross_entropy(z, y) for z in hooked(x)])
        gram = engine.compute_gramian(losses)
        losses.backward(torch.ones_like(losses))  # the weighted backward autogram still needs
        hooked.zero_grad(set_to_none=True)
        return gram

    # sanity: both give the same Gramian
    g1, g2 = per_exit(), autogram()
    assert torch.allclose(g1, g2, rtol=1e-3, atol=1e-6 * g1.abs().max().item()), (g1, g2)
    return {"per-exit backward + GGᵀ (+0 backward)": per_exit, "autogram Engine + 1 backward": autogram}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=str(default_out("osgd_speed.json")))
    a = ap.parse_args()
    torch.set_num_threads(1)
    reps, warm = (10, 2) if a.quick else (a.reps, 10)  # warm-up of 10 keeps amortized periods aligned
    cases = [("cnn1d-exits", 4), ("cnn1d-exits", 8), ("nested-width", 4)]
    results = {
        "machine": f"CPU ({platform.processor() or platform.machine()}), 1 thread, shared with other jobs",
        "torch": torch.__version__,
        "batch": a.batch,
        "reps": reps,
        "steps": {},
        "gramian": {},
    }
    for name, K in cases:
        r = _bench(step_fns(name, K, a.batch), reps, warm)
        key = f"{name} K={K}"
        results["steps"][key] = r
        print(f"\n{key}: ms/step (ratio to bound, to joint)")
        for k, v in r.items():
            print(f"  {k:22s} {1e3 * v:8.2f}  ({v / r['bound']:.2f}x bound, {v / r['joint']:.2f}x joint)")
        g = _bench(gram_fns(name, K, a.batch), reps, warm)
        results["gramian"][key] = g
        for k, v in g.items():
            print(f"  gramian: {k:40s} {1e3 * v:8.2f} ms")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
