"""Data-parallel overheads on CPU (gloo): the finite-gradient check, and one coalesced all-reduce vs one call per
parameter tensor.

    python benchmarks/bench_distributed.py            # prints a table, writes runs/benchmarks/distributed.json
    python benchmarks/bench_distributed.py --out benchmarks/results/distributed.json   # refresh the committed copy

(1) Per-step cost of the trainer's finite-gradient flag (``distributed.grads_finite``: one fused L1-norm pass,
no host sync), measured as train-step time with and without it on the default MNIST-1D-sized CNN.
(2) Averaging the gradients of that net over 2 gloo ranks: one all-reduce of a flat buffer (what the trainer
does) vs one all-reduce per parameter tensor (what a naive loop does).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from _output import default_out

CFG = [
    "data.name=synthetic",
    "data.options.shape=[1,40]",
    "data.options.num_classes=10",
    "data.options.n_train=2048",
    "data.options.n_test=64",
    "data.batch_size=128",
    "data.augment=false",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
    "schedule.name=none",
]


def _trainer():
    from anytrain.config import load_config
    from anytrain.train import Trainer

    return Trainer(load_config(None, CFG), "/tmp/anytrain-bench-dist-unused")


def bench_finite_check(steps: int = 60, repeats: int = 5) -> dict[str, float]:
    from anytrain.train import distributed as dp

    tr = _trainer()
    batches = list(tr.loader)[:steps]
    real = dp.grads_finite

    def run(check: bool) -> float:
        dp.grads_finite = real if check else (lambda params: None)  # type: ignore[assignment]
        try:
            t0 = time.perf_counter()
            for x, y in batches:
                tr.train_step(x, y)
            return (time.perf_counter() - t0) / len(batches)
        finally:
            dp.grads_finite = real

    run(True)  # warm-up
    with_check, without = [], []
    for _ in range(repeats):  # interleave to share the machine's noise
        with_check.append(run(True))
        without.append(run(False))
    params = sum(p.numel() for p in tr.net.parameters())
    tr.train_step(*batches[0])  # leaves gradients in place for the isolated timing of the check itself
    t0 = time.perf_counter()
    for _ in range(200):
        real(tr._params)
    check_ms = 1e3 * (time.perf_counter() - t0) / 200
    w, wo = statistics.median(with_check), statistics.median(without)
    return {
        "params": params,
        "step_ms_with_check": 1e3 * w,
        "step_ms_without": 1e3 * wo,
        "overhead_pct": 100 * (w / wo - 1),
        "check_alone_ms": check_ms,
    }


def _allreduce_worker(rank: int, port: int, sizes: list[int], reps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    grads = [torch.randn(n) for n in sizes]
    res: dict[str, float] = {}
    for mode in ("coalesced", "per_tensor", "coalesced", "per_tensor"):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            if mode == "coalesced":
                flat = torch.cat(grads)
                dist.all_reduce(flat)
                flat.div_(2)
                torch._foreach_copy_(grads, list(flat.split(sizes)))
            else:
                for g in grads:
                    dist.all_reduce(g)
                    g.div_(2)
        res[mode] = 1e3 * (time.perf_counter() - t0) / reps  # the second round (warm) is kept
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def bench_allreduce(reps: int = 200) -> dict[str, float]:
    tr = _trainer()
    sizes = [p.numel() for p in tr.net.parameters()]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = "/tmp/anytrain-bench-allreduce.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_allreduce_worker, args=(r, port, sizes, reps, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    res = json.loads(Path(out).read_text())
    return {
        "tensors": len(sizes),
        "params": sum(sizes),
        "coalesced_ms": res["coalesced"],
        "per_tensor_ms": res["per_tensor"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=default_out("distributed.json"))
    out = ap.parse_args().out
    torch.set_num_threads(1)
    r1 = bench_finite_check()
    r2 = bench_allreduce()
    print(
        f"finite-gradient check: {r1['params']:,} params, step {r1['step_ms_without']:.2f} ms -> "
        f"{r1['step_ms_with_check']:.2f} ms ({r1['overhead_pct']:+.1f}%); the check alone {r1['check_alone_ms']:.3f} ms"
    )
    print(
        f"2-rank gloo gradient average, {r2['tensors']} tensors / {r2['params']:,} params: "
        f"coalesced {r2['coalesced_ms']:.3f} ms, per tensor {r2['per_tensor_ms']:.3f} ms"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"finite_check": r1, "allreduce": r2, "python": sys.version.split()[0], "torch": torch.__version__},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
