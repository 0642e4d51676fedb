"""Curvature-corrected optimizer benchmarks (CPU, one thread, small nets).

    python benchmarks/bench_curvature.py --part speed       # time per step vs SGD and kfac-pytorch, fresh batches
    python benchmarks/bench_curvature.py --part profile     # where the time goes: step, capture, decomposition
    python benchmarks/bench_curvature.py --part kfac        # factors and timing vs curvlinops' KFAC
    python benchmarks/bench_curvature.py --part accuracy    # SGD / Adam / alpha=1/2 (10/100, 20/500) / alpha=1
    python benchmarks/bench_curvature.py --part schedule    # alpha=1/2 only: T_f/T_inv 10/100 against 20/500
    python benchmarks/bench_curvature.py --part ab --old OLD.py  # this CurvatureCorrected against an older one
    python benchmarks/bench_curvature.py                    # all three

Prints a table per part and writes curvature_<part>.json into ``--out-dir`` (default runs/benchmarks/; the
committed copies are refreshed with ``--out-dir benchmarks/results``). curvlinops is a benchmark-only
dependency (never imported by the library).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _output import default_out
from torch import Tensor, nn

from anytrain.data import load_dataset
from anytrain.optim import CurvatureCorrected


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
    "alpha=1/2 (20/500)": lambda net: CurvatureCorrected(
        net,
        lr=0.03,
        alpha=0.5,
        damping=0.1,
        adaptive_damping=True,
        momentum=0.9,
        kl_clip=1e-3,
        factor_every=20,
        inverse_every=500,
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
def run_accuracy(seeds: int, batch: int = 128, eval_every: int = 10, only: list[str] | None = None) -> dict:
    out: dict = {}
    optimizers = {k: v for k, v in OPTIMIZERS.items() if only is None or k in only}
    for setup, (data_name, make, target, epochs) in SETUPS.items():
        data = load_dataset(data_name, augment=False)
        out[setup] = {"target": target, "epochs": epochs, "batch": batch, "runs": {}}
        for opt_name, make_opt in optimizers.items():
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


# ---- speed ----------------------------------------------------------------------------------------------
def kfac_pytorch() -> object | None:
    """gpauloski/kfac-pytorch if importable (not on PyPI: built from its public source into a separate venv,
    never a dependency of anytrain). Returns its ``KFACPreconditioner`` class or None."""
    try:
        from kfac.preconditioner import KFACPreconditioner  # type: ignore[import-not-found]
    except ImportError:
        return None
    return KFACPreconditioner


def make_stepper(kind: str, net: nn.Module, curvature_cls: type = CurvatureCorrected) -> Callable[[], None]:
    """The optimizer step of ``kind`` on ``net`` (called after the backward pass)."""
    if kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        return opt.step
    if kind.startswith("curvature"):  # "curvature-10/100"
        t_f, t_inv = (int(v) for v in kind.split("-")[1].split("/"))
        opt = curvature_cls(
            net, lr=0.03, alpha=0.5, damping=0.1, adaptive_damping=True, momentum=0.9, kl_clip=1e-3,
            factor_every=t_f, inverse_every=t_inv,
        )  # fmt: skip
        return opt.step
    if kind.startswith("kfac-pytorch"):  # its K-FAC (alpha = 1) at the same schedule, inverse method
        cls = kfac_pytorch()
        assert cls is not None
        t_f, t_inv = (int(v) for v in kind.split("-")[2].split("/"))
        opt = torch.optim.SGD(net.parameters(), lr=0.03, momentum=0.9)
        pre = cls(  # type: ignore[operator]
            net, factor_update_steps=t_f, inv_update_steps=t_inv, damping=0.003, kl_clip=1e-3, lr=0.03,
            compute_method="inverse", loglevel=logging.WARNING,
        )  # fmt: skip

        def step() -> None:
            pre.step()
            opt.step()

        return step
    raise ValueError(kind)


def run_speed(steps: int = 500, chunk: int = 20, cases: list[str] | None = None) -> dict:
    """Side by side in one run: one net + optimizer per kind, stepped in interleaved chunks of ``chunk`` steps
    (kind after kind) so that the load of the shared machine falls on all kinds alike; the time of a kind is
    the sum over its chunks (capture steps and decompositions included, amortized over ``steps``).

    Each step draws the next of 64 distinct random batches (the old version reused one batch, which the
    curvature optimizer fitted to a loss of ~1e-7, slowing its backward pass with subnormal floats)."""
    out: dict = {}
    all_cases = {
        "mnist1d-cnn": (cnn1d, (1, 40), 128),
        "digits-cnn": (cnn2d, (1, 8, 8), 128),
        "mnist1d-mlp": (lambda: mlp(40), (1, 40), 128),
        "mnist1d-cnn-b512": (cnn1d, (1, 40), 512),
        "digits-cnn-b512": (cnn2d, (1, 8, 8), 512),
        "mnist1d-mlp-b512": (lambda: mlp(40), (1, 40), 512),
    }
    kinds = ["sgd", "curvature-10/100", "curvature-20/500"]
    if kfac_pytorch() is not None:
        kinds.append("kfac-pytorch-10/100")
    for name in cases or list(all_cases):
        make, shape, batch = all_cases[name]
        gen = torch.Generator().manual_seed(0)
        batches = [
            (torch.randn(batch, *shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(64)
        ]
        runs = {}
        for kind in kinds:
            torch.manual_seed(0)
            net = make()
            runs[kind] = (net, make_stepper(kind, net))
            time_steps_from(net, runs[kind][1], batches, 5, 0)  # warm-up: first factors and decomposition
        chunks: dict[str, list[float]] = {k: [] for k in kinds}
        for c in range(steps // chunk):
            for kind in kinds:
                net, step = runs[kind]
                chunks[kind].append(chunk * time_steps_from(net, step, batches, chunk, 5 + c * chunk))
        total = {k: sum(v) / (len(v) * chunk) for k, v in chunks.items()}
        out[name] = {
            "batch": batch,
            "steps": steps,
            "chunk": chunk,
            "ms_per_step": {k: 1e3 * v for k, v in total.items()},
            "ratio_to_sgd": {k: total[k] / total["sgd"] for k in kinds},
            "chunk_ms": {k: [1e3 * t for t in v] for k, v in chunks.items()},
            "load_average": os.getloadavg(),
        }
        print(
            f"{name:17s} " + "  ".join(f"{k} {1e3 * total[k]:.2f} ms ({total[k] / total['sgd']:.2f}x)" for k in kinds),
            flush=True,
        )
    return out


def run_ab(old_path: str, cases: list[str] | None = None, reps: int = 2000) -> dict:
    """This ``CurvatureCorrected`` against the one in ``old_path`` (a standalone copy of an older curvature.py,
    e.g. ``git show REV:src/anytrain/optim/curvature.py > old.py``), speed-part settings (α = ½), same init and
    batches, the two stepped alternately (order alternating) and timed step by step; medians per kind of step:
    ``step`` is ``opt.step()`` alone on a step that neither records nor decomposes (the hot path), ``capture``
    a training step (forward, backward, step) that records factors, ``decompose`` one that also decomposes.
    Reports whether the two trajectories end on bit-identical weights."""
    spec = importlib.util.spec_from_file_location("curvature_old", old_path)
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old
    spec.loader.exec_module(old)
    all_cases = {"digits-cnn": (cnn2d, (1, 8, 8), 128), "mnist1d-cnn": (cnn1d, (1, 40), 128)}
    out: dict = {}
    for name in cases or list(all_cases):
        make, shape, batch = all_cases[name]
        gen = torch.Generator().manual_seed(0)
        batches = [
            (torch.randn(batch, *shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(16)
        ]
        out[name] = {}
        for phase, t_f, t_inv, n in (
            ("step", 0, 0, reps),
            ("capture", 1, 0, reps // 10),
            ("decompose", 1, 1, reps // 100),
        ):
            runs = {}
            for kind, cls in (("old", old.CurvatureCorrected), ("new", CurvatureCorrected)):
                torch.manual_seed(0)
                net = make()
                step = make_stepper("curvature-1/1", net, cls)
                time_steps_from(net, step, batches, 1, 0)  # first factors and decomposition
                opt = step.__self__  # type: ignore[attr-defined]
                opt.factor_every, opt.inverse_every = t_f or 10**9, t_inv or 10**9
                opt._capturing = t_f == 1
                runs[kind] = (net, step)
            ms: dict[str, list[float]] = {"old": [], "new": []}
            for i in range(n):
                for kind in ("old", "new") if i % 2 == 0 else ("new", "old"):
                    net, step = runs[kind]
                    t0 = time.perf_counter()
                    if phase != "step":  # forward and backward; the hot path alone reuses the warm-up's gradients
                        time_steps_from(net, lambda: None, batches, 1, i)
                    step()
                    ms[kind].append(1e3 * (time.perf_counter() - t0))
            med = {k: statistics.median(v) for k, v in ms.items()}
            same = all(torch.equal(a, b) for a, b in zip(runs["old"][0].parameters(), runs["new"][0].parameters()))
            out[name][phase] = {
                "n": n,
                "median_ms": med,
                "ratio_new_to_old": med["new"] / med["old"],
                "bit_identical": same,
            }
            print(f"{name:12s} {phase:9s} old {med['old']:8.3f} ms  new {med['new']:8.3f} ms  "
                  f"ratio {med['new'] / med['old']:.3f}  bit-identical weights: {same}", flush=True)  # fmt: skip
        out[name]["load_average"] = os.getloadavg()
    return out


def time_steps_from(
    net: nn.Module, step: Callable[[], None], batches: list[tuple[Tensor, Tensor]], steps: int, start: int
) -> float:
    """Seconds per step of ``steps`` training steps on batches ``start, start + 1, ...`` (no warm-up)."""
    t0 = time.perf_counter()
    for i in range(start, start + steps):
        x, y = batches[i % len(batches)]
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        step()
    return (time.perf_counter() - t0) / steps


def _ms(fn: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e3 * (time.perf_counter() - t0) / n


def _profile_one(net: nn.Module, x: Tensor, y: Tensor, reps: int) -> dict[str, float]:
    opt = make_stepper("curvature-20/500", net).__self__  # type: ignore[attr-defined]
    sgd = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)

    def fwd_bwd() -> None:
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()

    def plain_step() -> None:
        opt.steps = 1  # a non-capture, non-decomposition step
        opt.step()

    def capture_fwd_bwd_fold() -> None:
        opt._capturing = True
        fwd_bwd()
        opt._update_factors()

    fwd_bwd()
    opt.step()  # step 0: first factors and decomposition
    fwd_bwd()
    res = {"fwd_bwd": _ms(fwd_bwd, reps), "sgd_step": _ms(sgd.step, reps), "curvature_step": _ms(plain_step, reps)}
    res["capture_extra"] = _ms(capture_fwd_bwd_fold, reps // 2) - res["fwd_bwd"]
    opt._capturing = False
    res["decomposition"] = _ms(lambda: opt._decompose(only_missing=False), 5)
    return res


def run_profile(batch: int = 128, reps: int = 100) -> dict:
    """Where the time of the curvature optimizer goes (α = ½ at T_f/T_inv = 20/500), ms per event."""
    out: dict = {}
    for name, make, shape in (
        ("mnist1d-cnn", cnn1d, (1, 40)),
        ("digits-cnn", cnn2d, (1, 8, 8)),
        ("mnist1d-mlp", lambda: mlp(40), (1, 40)),
    ):
        torch.manual_seed(0)
        out[name] = _profile_one(make(), torch.randn(batch, *shape), torch.randint(0, 10, (batch,)), reps)
        print(f"{name:12s} " + "  ".join(f"{k} {v:.2f}" for k, v in out[name].items()), flush=True)
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
    ap.add_argument("--part", choices=["speed", "profile", "kfac", "accuracy", "schedule", "ab", "all"], default="all")
    ap.add_argument("--old", help="ab: a standalone older curvature.py to time against")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cases", nargs="*", default=None, help="speed: only these cases (default: all six)")
    ap.add_argument("--out-dir", type=Path, default=default_out(), help="where curvature_<part>.json goes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    meta = {
        "machine": "CPU, 2 cores, shared with other jobs; torch threads = 1",
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    parts = ["speed", "kfac", "accuracy"] if args.part == "all" else [args.part]
    for part in parts:
        t0 = time.perf_counter()
        res = {
            "speed": lambda: run_speed(cases=args.cases),
            "kfac": run_kfac,
            "profile": run_profile,
            "accuracy": lambda: run_accuracy(args.seeds),
            "schedule": lambda: run_accuracy(args.seeds, only=["alpha=1/2", "alpha=1/2 (20/500)"]),
            "ab": lambda: run_ab(args.old, cases=args.cases),
        }[part]()
        atomic_json(args.out_dir / f"curvature_{part}.json", {"meta": meta, "seconds": time.perf_counter() - t0, **res})


if __name__ == "__main__":
    main()
