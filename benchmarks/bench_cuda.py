"""Step time and peak GPU memory of each method's CIFAR-sized config, on generated data (a few minutes on one GPU).

For each recipe below (the repository's CIFAR-10 config with the data replaced by generated 3×32×32 inputs),
the real training step (``Trainer.train_step``: the rule's forward/backward, the optimizer step, the scheduler)
runs ``--steps`` times on random batches already on the device; the median step time over the steps after
``--warmup`` and ``torch.cuda.max_memory_allocated`` are printed and written as JSON.

    python benchmarks/bench_cuda.py --steps 300   # writes runs/benchmarks/cuda.json (--out to change)

Without a CUDA device it prints a message and exits with status 0; CI never depends on it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "joint (nested-width-vgg)": ("configs/osgd-cifar10-nested-width-vgg.yaml", ["rule.name=joint"]),
    "osgd (nested-width-vgg)": ("configs/osgd-cifar10-nested-width-vgg.yaml", []),
    "dgl (vgg13-exits)": ("configs/dgl-cifar10-vgg13.yaml", []),
    "backprop (vgg13-exits)": ("configs/dgl-cifar10-vgg13-backprop.yaml", []),
    "slbi (vgg16-exits)": ("configs/slbi-cifar10-vgg16.yaml", []),
    "curvature a=1/2 (vgg13-exits)": ("configs/curvature-cifar10-vgg13.yaml", []),
}


def measure(config: str, overrides: list[str], steps: int, warmup: int) -> dict[str, float]:
    from anytrain.config import load_config
    from anytrain.train import Trainer

    data = ["data.name=synthetic", "data.data_dir=null", "data.augment=false", "data.val_size=0"]
    data += ["data.options={shape: [3, 32, 32], num_classes: 10, n_train: 512, n_test: 64}"]
    cfg = load_config(ROOT / config, [*data, *overrides, "train.device=cuda", "train.tensorboard=false"])
    bs = cfg.data.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, tmp)
        tr.rule.on_epoch_start(0, tr.epochs)
        tr.net.train()
        g = torch.Generator(device="cuda").manual_seed(0)
        xs = torch.randn(8, bs, 3, 32, 32, device="cuda", generator=g)
        ys = torch.randint(0, 10, (8, bs), device="cuda", generator=g)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            tr.train_step(xs[i % 8], ys[i % 8])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return {
            "batch": bs,
            "steps": steps,
            "median_step_ms": 1000 * statistics.median(times[warmup:]),
            "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20,
        }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "cuda.json"))  # outside the source tree
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device available; nothing measured")
        return 0
    torch.backends.cudnn.benchmark = True
    res: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}
    for name, (config, overrides) in RECIPES.items():
        r = measure(config, overrides, a.steps, a.warmup)
        res["runs"][name] = r  # type: ignore[index]
        print(f"{name:32s} batch {r['batch']:4.0f}  {r['median_step_ms']:8.2f} ms/step  "
              f"peak {r['peak_memory_mib']:8.0f} MiB", flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
