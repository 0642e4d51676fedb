"""SLBI step time / SGD-momentum step time on the same net (CPU, 1 thread), interleaved to cancel drifting
load on a shared machine; and the optimizer step alone.

    python benchmarks/bench_slbi_speed.py --steps 40

Writes ``--out`` (default ``runs/benchmarks/slbi_speed.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _output import default_out

from anytrain.nets import build_model
from anytrain.optim import build_optimizer

NETS = {
    "cnn1d-exits(w32), MNIST-1D 128x1x40": ("cnn1d-exits", dict(in_shape=(1, 40), width=32, exits=4), (1, 40)),
    "vgg11-exits(x0.25), 128x3x32x32": ("vgg11-exits", dict(in_shape=(3, 32, 32), width_mult=0.25), (3, 32, 32)),
    "preresnet20-exits, 128x3x32x32": ("preresnet20-exits", dict(in_shape=(3, 32, 32)), (3, 32, 32)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=str(default_out("slbi_speed.json")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = {}
    for label, (name, kw, shape) in NETS.items():
        torch.manual_seed(0)
        nets = {k: build_model(name, num_classes=10, **kw) for k in ("sgd", "slbi")}
        nets["slbi"].load_state_dict(nets["sgd"].state_dict())
        opts = {
            "sgd": build_optimizer("sgd", nets["sgd"], lr=0.1, momentum=0.9, weight_decay=5e-4),
            "slbi": build_optimizer("slbi", nets["slbi"], lr=0.1, kappa=1.0, mu=100.0, weight_decay=5e-4),
        }
        x = torch.randn(128, *shape)
        y = torch.randint(0, 10, (128,))
        times: dict[str, dict[str, list[float]]] = {k: {"step": [], "opt": []} for k in opts}
        for i in range(args.steps + 3):
            for k in ("sgd", "slbi") if i % 2 == 0 else ("slbi", "sgd"):  # interleave, alternate order
                net, opt = nets[k], opts[k]
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                sum(F.cross_entropy(z, y) for z in net(x)).backward()
                t1 = time.perf_counter()
                opt.step()
                t2 = time.perf_counter()
                if i >= 3:
                    times[k]["step"].append(t2 - t0)
                    times[k]["opt"].append(t2 - t1)

        def med(v: list[float]) -> float:
            return sorted(v)[len(v) // 2]

        r = {k: {"step_s": med(v["step"]), "opt_step_s": med(v["opt"])} for k, v in times.items()}
        r["ratio_step"] = r["slbi"]["step_s"] / r["sgd"]["step_s"]
        r["ratio_opt_step"] = r["slbi"]["opt_step_s"] / r["sgd"]["opt_step_s"]
        res[label] = r
        print(label, json.dumps(r), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
