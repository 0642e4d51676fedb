"""Curvature-corrected optimizer benchmarks (CPU, one thread, small nets).

    python benchmarks/bench_curvature.py --part speed       # time per step vs SGD (T_f=10, T_inv=100)
    python benchmarks/bench_curvature.py --part kfac        # factors and timing vs curvlinops' KFAC
    python benchmarks/bench_curvature.py --part accuracy    # SGD / Adam / alpha=1/2 / alpha=1, 3 seeds
    python benchmarks/bench_curvature.py                    # all three

Prints a table per part and writes benchmarks/results/curvature_<part>.json. curvlinops is a benchmark-only
dependency (never imported by the library).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anytrain.data import load_dataset
from anytrain.optim import CurvatureCorrected

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ---- models --------------------------------------------------------------------------------------------
def cnn1d(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 10, num_classes),
    )  # fmt: skip


def cnn2d(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 16, num_classes),
    )  # fmt: skip


def mlp(d_in: int, num_classes: int = 10, width: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, num_classes),
    )  # fmt: skip


SETUPS: dict[str, tuple[str, Callable[[], nn.Module], float, int]] = {
    # name: (dataset, model, target validation accuracy, epochs)
    "mnist1d-cnn": ("mnist1d", cnn1d, 0.85, 30),
    "mnist1d-mlp": ("mnist1d", lambda: mlp(40), 0.55, 30),
    "digits-cnn": ("digits", cnn2d, 0.97, 15),
    "digits-mlp": ("digits", lambda: mlp(64), 0.95, 15),
}

OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd": lambda net: torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
    "adam": lambda net: torch.optim.Adam(net.parameters(), lr=1e-3),
    # alpha = 1/2 tolerates the cheap schedule (factors every 10 steps, eigh every 100); alpha = 1 (NGD-d) with
    # the empirical Fisher diverged or stalled at chance with it in every setting tried (lr 1e-4..1e-1,
    # momentum 0/0.9, KL clip, MC Fisher), so it runs with fresh factors (T_f=1, T_inv=10) and no momentum.
    "alpha=1/2": lambda net: CurvatureCorrected(
        net,
        lr=0.03,
        alpha=0.5,
        damping=0.1,
        adaptive_damping=True,
        momentum=0.9,
        kl_clip=1e-3,
        factor_every=10,
        inverse_every=100,
    ),
    "alpha=1": lambda net: CurvatureCorrected(
        net, lr=1e-3, alpha=1.0, damping=0.1, adaptive_damping=True, kl_clip=1e-3, factor_every=1, inverse_every=10
    ),
}


def atomic_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


# ---- accuracy --------------------------------------------------------------------------------------------
def run_accuracy(seeds: int, batch: int = 128, eval_every: int = 10) -> dict:
    out: dict = {}
    for setup, (data_name, make, target, epochs) in SETUPS.items():
        data = load_dataset(data_name, augment=False)
        out[setup] = {"target": target, "epochs": epochs, "batch": batch, "runs": {}}
        for opt_name, make_opt in OPTIMIZERS.items():
            runs = []
            for seed in range(seeds):
                torch.manual_seed(seed)
                net = make()
                opt = make_opt(net)
                gen = torch.Generator().manual_seed(seed)
                n = data.x_train.shape[0]
                step, hit_step, hit_time, train_time = 0, None, None, 0.0
                curve = []
                for _ in range(epochs):
                    perm = torch.randperm(n, generator=gen)
                    for i in range(0, n - batch + 1, batch):
                        idx = perm[i : i + batch]
                        t0 = time.perf_counter()
                        opt.zero_grad(set_to_none=True)
                        F.cross_entropy(net(data.x_train[idx]), data.y_train[idx]).backward()
                        opt.step()
                        train_time += time.perf_counter() - t0
                        step += 1
                        if step % eval_every == 0:  # time-to-target is measured on validation
                            acc = accuracy(net, data.x_val, data.y_val)
                            curve.append((step, acc))
                            if hit_step is None and acc >= target:
                                hit_step, hit_time = step, train_time
                final = accuracy(net, data.x_test, data.y_test)
                runs.append(
                    {
                        "seed": seed,
                        "steps_to_target": hit_step,
                        "seconds_to_target": hit_time,
                        "final_accuracy": final,
                        "train_seconds": train_time,
                        "steps": step,
                        "curve": curve[::5],
                    }
                )
            out[setup]["runs"][opt_name] = runs
            finals = [r["final_accuracy"] for r in runs]
            hits = [r["steps_to_target"] for r in runs]
            secs = [r["seconds_to_target"] for r in runs]
            print(
                f"{setup:12s} {opt_name:10s} final {statistics.mean(finals):.3f}±{statistics.pstdev(finals):.3f} "
                f"steps->{target}: {hits} s->target: {[None if s is None else round(s, 2) for s in secs]} "
                f"train {statistics.mean(r['train_seconds'] for r in runs):.1f}s",
                flush=True,
            )
    return out


# ---- speed -----------------------------------------------------------------------------------------------
def time_steps(net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, steps: int) -> float:
    for _ in range(5):  # warm-up (also runs the first factor update and eigendecomposition)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def run_speed(steps: int = 200, repeats: int = 5) -> dict:
    out: dict = {}
    cases = {
        "mnist1d-cnn": (cnn1d, (1, 40), 128),
        "mnist1d-mlp": (lambda: mlp(40), (1, 40), 128),
        "digits-cnn": (cnn2d, (1, 8, 8), 128),
        "mnist1d-cnn-b512": (cnn1d, (1, 40), 512),
        "mnist1d-mlp-b512": (lambda: mlp(40), (1, 40), 512),
    }
    for name, (make, shape, batch) in cases.items():
        x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
        times: dict[str, list[float]] = {"sgd": [], "curvature": []}
        for _ in range(repeats):  # interleave to share the machine's load fairly
            torch.manual_seed(0)
            net = make()
            times["sgd"].append(time_steps(net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), x, y, steps))
            torch.manual_seed(0)
            net = make()
            opt = CurvatureCorrected(
                net,
                lr=0.03,
                alpha=0.5,
                damping=0.1,
                adaptive_damping=True,
                momentum=0.9,
                kl_clip=1e-3,
                factor_every=10,
                inverse_every=100,
            )
            times["curvature"].append(time_steps(net, opt, x, y, steps))
        med = {k: statistics.median(v) for k, v in times.items()}
        out[name] = {
            "ms_per_step": {k: 1e3 * v for k, v in med.items()},
            "ratio": med["curvature"] / med["sgd"],
            "all_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
            "batch": batch,
            "steps": steps,
        }
        print(
            f"{name:16s} sgd {1e3 * med['sgd']:.2f} ms  curvature(T_f=10,T_inv=100) "
            f"{1e3 * med['curvature']:.2f} ms  ratio {out[name]['ratio']:.2f}",
            flush=True,
        )
    return out


# ---- comparison with curvlinops KFAC --------------------------------------------------------------------
def run_kfac(repeats: int = 5) -> dict:
    try:
        from curvlinops import KFACLinearOperator
    except ImportError:
        print("curvlinops not installed: skipped")
        return {"skipped": "curvlinops not installed"}
    out: dict = {}
    # curvlinops' KFAC supports Linear and Conv2d layers (not Conv1d)
    cases = {"digits-cnn": (cnn2d, (1, 8, 8)), "mnist1d-mlp": (lambda: mlp(40), (1, 40))}
    for name, (make, shape) in cases.items():
        torch.manual_seed(0)
        net = make()
        x, y = torch.randn(128, *shape), torch.randint(0, 10, (128,))
        keys = [str(i) for i, m in enumerate(net) if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
        t_ref, t_ours, t_plain = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ref = KFACLinearOperator(
                net,
                nn.CrossEntropyLoss(),
                list(net.parameters()),
                [(x, y)],
                fisher_type="empirical",
                separate_weight_and_bias=False,
                check_deterministic=False,
            )
            ref.compute_kronecker_factors()
            t_ref.append(time.perf_counter() - t0)
            # ours: one forward/backward with hooks live (a factor step), factors folded in by step(lr=0)
            opt = CurvatureCorrected(net, lr=0.0, factor_every=1, inverse_every=10**9, factor_decay=0.0)
            net.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            F.cross_entropy(net(x), y).backward()
            opt._update_factors()
            t_ours.append(time.perf_counter() - t0)
            opt.remove_hooks()
            net.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            F.cross_entropy(net(x), y).backward()
            t_plain.append(time.perf_counter() - t0)
        errs = {}
        for key, layer in zip(keys, opt.layers):
            st = opt.state[layer.weight]
            a_ref, g_ref = ref._input_covariances[key], ref._gradient_covariances[key]
            errs[key] = {
                "A_rel_err": float((st["A"] - a_ref).norm() / a_ref.norm()),
                "G_rel_err": float((st["G"] - g_ref).norm() / g_ref.norm()),
                "shapes": [list(a_ref.shape), list(g_ref.shape)],
            }
        med = {
            k: 1e3 * statistics.median(v)
            for k, v in (("curvlinops", t_ref), ("ours", t_ours), ("plain_fwd_bwd", t_plain))
        }
        out[name] = {"ms": med, "layers": errs}
        worst = max(max(e["A_rel_err"], e["G_rel_err"]) for e in errs.values())
        print(
            f"{name:12s} factors: curvlinops {med['curvlinops']:.1f} ms, ours (fwd+bwd+factors) {med['ours']:.1f} ms,"
            f" plain fwd+bwd {med['plain_fwd_bwd']:.1f} ms; max relative factor difference {worst:.1e}",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["speed", "kfac", "accuracy", "all"], default="all")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    meta = {
        "machine": "CPU, 2 cores, shared with other jobs; torch threads = 1",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    parts = ["speed", "kfac", "accuracy"] if args.part == "all" else [args.part]
    for part in parts:
        t0 = time.perf_counter()
        res = {"speed": run_speed, "kfac": run_kfac, "accuracy": lambda: run_accuracy(args.seeds)}[part]()
        atomic_json(RESULTS / f"curvature_{part}.json", {"meta": meta, "seconds": time.perf_counter() - t0, **res})


if __name__ == "__main__":
    main()
