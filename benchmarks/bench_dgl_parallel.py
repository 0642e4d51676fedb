"""Throughput and memory of the multi-process DGL runner (one module per process) vs single-process DGL.

1. Activation memory: bytes of tensors autograd saves for the backward pass (``saved_tensors_hooks``, storages
   de-duplicated), for one batch: end-to-end backprop of the whole net vs each DGL module (a rank holds one).
2. Throughput: samples/s of ``anytrain dgl-parallel`` with K ranks (1 thread each) vs the same synchronous DGL
   in one process (1 thread), same net, data, batch size and epochs; plus the peak RSS of each process.

    python benchmarks/bench_dgl_parallel.py   # writes runs/benchmarks/dgl_parallel.json (--out to change)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _output import default_out

from anytrain.data import BatchLoader, load_dataset
from anytrain.greedy import DGL, build_module_optimizers, module_forward, partition_stages
from anytrain.nets import build_model
from anytrain.optim import build_optimizer

CONFIG = """\
seed: 0
data: {{name: mnist1d, batch_size: {batch}}}
model: {{name: cnn1d-exits, exits: {k}, width: {width}, head: conv1x1}}
rule: {{name: dgl}}
optimizer: {{name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005}}
schedule: {{name: cosine}}
train: {{epochs: {epochs}, device: cpu, threads: 1, progress: false, tensorboard: false, plots: false}}
"""


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves while ``fn()`` builds its graph."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_memory(k: int, width: int, batch: int) -> dict[str, Any]:
    data = load_dataset("mnist1d", seed=0)
    torch.manual_seed(0)
    net = build_model("cnn1d-exits", in_shape=data.input_shape, num_classes=10, exits=k, width=width, head="conv1x1")
    x, y = data.x_train[:batch], data.y_train[:batch]
    backprop = saved_bytes(lambda: F.cross_entropy(net(x)[-1], y))
    per_module, heads = [], []
    state = x
    for stages in partition_stages(k):
        inp = state.detach()
        per_module.append(
            saved_bytes(lambda st=stages, i=inp: [F.cross_entropy(z, y) for z in module_forward(net, st, i)[1]])
        )
        with torch.no_grad():
            state = module_forward(net, stages, inp)[0]
        heads.append(saved_bytes(lambda h=net.exits[stages[-1]], s=state: F.cross_entropy(h(s.requires_grad_()), y)))
    stage, head = net.flops_breakdown(data.input_shape)
    module_macs = [sum(stage[i] + head[i] for i in st) for st in partition_stages(k)]
    return {
        "K": k,
        "batch": batch,
        "backprop_bytes": backprop,
        "dgl_module_bytes": per_module,
        "dgl_head_bytes": heads,
        "max_module_over_backprop": max(per_module) / backprop,
        "module_macs": module_macs,
        "ideal_pipeline_speedup": sum(module_macs) / max(module_macs),
    }


def single_process(k: int, width: int, batch: int, epochs: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    data = load_dataset("mnist1d", seed=0)
    torch.manual_seed(0)
    net = build_model("cnn1d-exits", in_shape=data.input_shape, num_classes=10, exits=k, width=width, head="conv1x1")
    rule = DGL()
    opt = build_module_optimizers(
        net, rule.bind(net), lambda n, p: build_optimizer("sgd", n, p, lr=0.05, momentum=0.9, weight_decay=5e-4)
    )
    loader = BatchLoader(data.x_train, data.y_train, batch, seed=0, drop_last=True)
    t0 = time.perf_counter()
    n = 0
    for e in range(epochs):
        loader.set_epoch(e)
        for xb, yb in loader:
            rule.step(net, xb, yb, opt)
            n += len(yb)
    secs = time.perf_counter() - t0
    return {
        "samples": n,
        "seconds": secs,
        "samples_per_second": n / secs,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def parallel(k: int, width: int, batch: int, epochs: int, buffer: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "cfg.yaml"
        cfg.write_text(CONFIG.format(k=k, width=width, batch=batch, epochs=epochs))
        out = Path(d) / "run"
        cmd = [sys.executable, "-m", "anytrain.train.parallel", str(cfg), "--out", str(out), "--buffer", str(buffer)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ))
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-2000:])
        m = json.loads((out / "metrics.json").read_text())
    par = m["parallel"]
    return {
        "world_size": par["world_size"],
        "buffer": buffer,
        "samples": par["samples"],
        "seconds": par["wall_seconds"],
        "samples_per_second": par["samples_per_second"],
        "ranks": par["ranks"],
        "final_acc": m["exits"][-1]["accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--single-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(default_out("dgl_parallel.json")))
    args = ap.parse_args()
    if args.single_only:  # a fresh process, so its peak RSS is its own
        print(json.dumps(single_process(args.ks[0], args.width, args.batch, args.epochs)))
        return
    torch.set_num_threads(1)
    results: dict[str, Any] = {"cpu_count": os.cpu_count(), "memory": [], "throughput": []}
    for k in args.ks:
        mem = activation_memory(k, args.width, args.batch)
        results["memory"].append(mem)
        print(
            f"K={k}: backprop saves {mem['backprop_bytes'] / 2**20:.2f} MiB; DGL modules "
            f"{[round(b / 2**20, 2) for b in mem['dgl_module_bytes']]} MiB "
            f"(max/backprop = {mem['max_module_over_backprop']:.2f}, 1/K = {1 / k:.2f}); module MACs "
            f"{mem['module_macs']} → ideal pipeline speed-up {mem['ideal_pipeline_speedup']:.2f}",
            flush=True,
        )
    for k in args.ks:
        cmd = [
            sys.executable,
            __file__,
            "--single-only",
            "--ks",
            str(k),
            "--width",
            str(args.width),
            "--batch",
            str(args.batch),
            "--epochs",
            str(args.epochs),
        ]
        single = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        for buffer in (0, 8):
            par = parallel(k, args.width, args.batch, args.epochs, buffer)
            speedup = par["samples_per_second"] / single["samples_per_second"]
            results["throughput"].append({"K": k, "single": single, "parallel": par, "speedup": speedup})
            print(
                f"K={k} buffer={buffer}: single {single['samples_per_second']:.0f} samples/s "
                f"(RSS {single['peak_rss_mb']:.0f} MB), {k} ranks {par['samples_per_second']:.0f} samples/s "
                f"(RSS per rank {[round(r['peak_rss_mb']) for r in par['ranks']]} MB): speed-up {speedup:.2f} "
                f"(target {0.8 * min(k, os.cpu_count() or 1):.1f} with {os.cpu_count()} cores)",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
