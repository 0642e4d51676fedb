"""The prepared GPU script (issue 21, item 5): one run on a CUDA device, inside 10 minutes, writing a file to commit.

Three parts, in this order, each within its share of ``--budget`` seconds:

1. **sync check** — for every rule (with sgd), every optimizer (with joint) and every precision this branch has,
   a few real training steps (``Trainer.train_step`` on batches from the trainer's own loader) run under
   ``torch.cuda.set_sync_debug_mode("error")``: a step that synchronises with the host raises, and the row
   says where.
2. **throughput** — the table of ``benchmarks/bench_throughput.py`` on the device: plain loop, Trainer joint,
   every rule and optimizer, and the fp16 / bf16 / compile / channels-last rows (when ``train.precision`` …
   exist), for the Fashion-MNIST nets at batch 256 and the default run; images/s and the fraction of the
   float32 matmul peak measured in the same run (TF32 off, so the peak is true float32).
3. **cifar** — step time and peak memory of each method's CIFAR-sized config on generated 3×32×32 batches (the
   script's earlier content), if time is left.

    python benchmarks/bench_cuda.py                      # writes runs/benchmarks/cuda/{cuda.md,cuda.json,...}

Without a CUDA device it says so in one line and exits with status 0 (nothing is written): CI never depends on
it. The four papers' claims trained on CIFAR-10 at the papers' sizes are a separate script, run in pieces that
resume: ``benchmarks/claims_cifar.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_throughput as bt  # noqa: E402
from _output import default_out  # noqa: E402

DEFAULT_OUT = default_out("cuda")  # copy to benchmarks/results/cuda/ to commit
RECIPES = {
    "joint (nested-width-vgg)": ("configs/osgd-cifar10-nested-width-vgg.yaml", ["rule.name=joint"]),
    "osgd (nested-width-vgg)": ("configs/osgd-cifar10-nested-width-vgg.yaml", []),
    "dgl (vgg13-exits)": ("configs/dgl-cifar10-vgg13.yaml", []),
    "backprop (vgg13-exits)": ("configs/dgl-cifar10-vgg13-backprop.yaml", []),
    "slbi (vgg16-exits)": ("configs/slbi-cifar10-vgg16.yaml", []),
    "curvature a=1/2 (vgg13-exits)": ("configs/curvature-cifar10-vgg13.yaml", []),
}
PARTS = ("sync", "throughput", "cifar")


def sync_rows(keys: set[str]) -> list[tuple[str, list[str]]]:
    """(label, overrides) of the sync check: every rule, every optimizer, every precision option ``keys``
    (the ``train.*`` config keys of this branch) has; on the default config."""
    rows = [("joint", ["rule.name=joint"])]
    rows += [(label, o) for label, o in bt.RULES.items()]
    rows += [(f"joint + {label}", ["rule.name=joint", *o]) for label, o in bt.OPTIMIZERS.items()]
    for label, o, key, _ in bt.PRECISION:
        if key in keys:
            rows.append((f"osgd + {label}", o))
    return rows


def sync_check(overrides: list[str], steps: int = 3, device: str = "cuda") -> str:
    """``ok``, or the first line of the error a training step raised under sync-debug mode ``error``."""
    from anytrain.config import load_config
    from anytrain.train import Trainer

    cfg = load_config(None, [*bt.QUIET, f"train.device={device}", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, tmp)
        tr.rule.on_epoch_start(0, tr.epochs)
        tr.net.train()
        tr.loader.set_epoch(0)
        batches = iter(tr.loader)
        for _ in range(2):  # warm-up: lazy state, cuDNN plans, compilation
            tr.train_step(*next(batches))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                tr.train_step(*next(batches))  # the loader's gather is inside the checked region too
        except RuntimeError as e:
            return "sync: " + (str(e).strip().splitlines() or ["?"])[0][:160]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    return "ok"


def measure_recipe(config: str, overrides: list[str], steps: int, warmup: int) -> dict[str, float]:
    """Median step time and peak memory of ``Trainer.train_step`` on a CIFAR-sized config (generated data)."""
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


def sync_table(results: dict[str, str]) -> str:
    lines = ["| row | sync-debug mode `error` over 3 training steps |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results.items()]
    return "\n".join(lines) + "\n"


def cifar_table(results: dict[str, Any]) -> str:
    lines = ["| recipe | batch | median step | peak memory |", "|---|---|---|---|"]
    for k, r in results.items():
        if isinstance(r, str):
            lines.append(f"| {k} | | {r} | |")
        else:
            lines.append(f"| {k} | {r['batch']} | {r['median_step_ms']:.2f} ms | {r['peak_memory_mib']:.0f} MiB |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), metavar="P", help=", ".join(PARTS))
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole script (default 540)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per throughput row")
    ap.add_argument("--cifar-steps", type=int, default=60)
    ap.add_argument("--nets", nargs="+", default=list(bt.NETS), metavar="NET", help=", ".join(bt.NETS))
    a = ap.parse_args(argv)
    bad = [p for p in a.parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part {bad[0]!r}; known: {', '.join(PARTS)}")
    if a.budget <= 0 or a.steps < 1 or a.cifar_steps < 2:
        ap.error("--budget must be positive, --steps at least 1 and --cifar-steps at least 2")
    try:
        bt.plan_rows(bt.SECTIONS, a.nets, bt.GROUPS)
    except ValueError as e:
        ap.error(str(e))
    return a


def _within(deadline: float, fn: Callable[[], Any]) -> Any:
    return fn() if time.perf_counter() < deadline else "not run (time budget)"


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_cuda: no CUDA device available (torch {torch.__version__}); nothing measured, nothing written")
        return 0
    start = time.perf_counter()
    end = start + a.budget
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False  # the peak and the fp32 rows are true float32
    torch.backends.cudnn.allow_tf32 = False
    a.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save() -> None:
        (a.out / "cuda.json").write_text(json.dumps(report, indent=1))
        md = [f"# CUDA run: {report['device']}, torch {report['torch']}", ""]
        if "sync" in report:
            md += ["## Sync check", "", sync_table(report["sync"])]
        if "throughput" in report:
            md += ["## Throughput", "", (a.out / "throughput.md").read_text()]
        if "cifar" in report:
            md += ["## CIFAR-sized step time and memory", "", cifar_table(report["cifar"])]
        (a.out / "cuda.md").write_text("\n".join(md))

    if "sync" in a.parts:
        report["sync"] = {}
        for label, o in sync_rows(bt.train_keys()):
            try:
                report["sync"][label] = _within(start + 0.15 * a.budget, lambda o=o: sync_check(o))
            except Exception as e:  # a row that cannot run is reported; the others still run
                report["sync"][label] = f"error: {type(e).__name__}: {str(e).strip()[:160]}"
            print(f"sync {label:32s} {report['sync'][label]}", flush=True)
        save()
    if "throughput" in a.parts:
        ta = bt.parse_args(["--out", str(a.out), "--device", "cuda", "--steps", str(a.steps), "--nets", *a.nets])
        ta.force = True
        budget_end = end - (0.15 * a.budget if "cifar" in a.parts else 0.0)
        bt.run(ta, deadline=budget_end)
        report["throughput"] = json.loads((a.out / "throughput.json").read_text())
        save()
    if "cifar" in a.parts:
        report["cifar"] = {}
        for name, (config, overrides) in RECIPES.items():
            try:
                r = _within(end, lambda c=config, o=overrides: measure_recipe(c, o, a.cifar_steps, a.cifar_steps // 5))
            except Exception as e:
                r = f"error: {type(e).__name__}: {str(e).strip()[:160]}"
            report["cifar"][name] = r
            print(f"cifar {name:32s} {r}", flush=True)
            torch.cuda.empty_cache()
        save()
    print(f"wrote {a.out / 'cuda.md'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
