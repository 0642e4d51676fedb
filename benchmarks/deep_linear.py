"""Deep-linear teacher–student study of curvature-corrected learning (Huh, ICML 2020), CPU, float64.

Compares gradient descent, full natural gradient (pseudo-inverse / Levenberg–Marquardt of the whole Gauss–Newton
matrix), NGD-d (α = 1, block diagonal) and the partially corrected rule α = ½, plus a sweep of α, for student
depth L ∈ {2, 3, 4} from small random weights, at one common step size. Records loss vs steps, the learned
strength of every teacher mode, and the weight balance ‖W_{l+1}ᵀW_{l+1} − W_l W_lᵀ‖_F.

    python benchmarks/deep_linear.py            # ~1-2 min on one core
    python benchmarks/deep_linear.py --quick    # fewer steps, for a smoke run

Writes benchmarks/results/deep_linear.json and docs/figures/deeplinear_*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from anytrain.optim import deeplinear as dl

ROOT = Path(__file__).resolve().parents[1]
RULES = {  # label: (rule, alpha, damping)
    "GD": ("gd", 0.0, 0.0),
    "full NGD": ("ngd", 0.0, 1e-6),
    "NGD-d (α=1)": ("fractional", 1.0, 1e-4),
    "α=½": ("fractional", 0.5, 1e-4),
}
COLORS = {"GD": "tab:blue", "full NGD": "tab:gray", "NGD-d (α=1)": "tab:red", "α=½": "tab:green"}


def first_below(hist: dl.History, fraction: float) -> int | None:
    return next((t for t, loss in zip(hist.steps, hist.loss) if loss < fraction * hist.loss[0]), None)


def summarize(hist: dl.History, teacher: dl.Teacher) -> dict:
    bal = [max(b) for b in hist.balance]
    modes_final = hist.modes[-1]
    return {
        "steps_to_1e-3": first_below(hist, 1e-3),
        "steps_to_1e-6": first_below(hist, 1e-6),
        "final_loss": hist.loss[-1],
        "diverged_at": hist.diverged_at,
        "balance_initial": bal[0],
        "balance_max": max(bal),
        "balance_final": bal[-1],
        "balance_growth": max(bal) / bal[0],
        "mode_error_final": max(abs(m - s) for m, s in zip(modes_final, teacher.s.tolist())),
    }


def atomic_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    width, svals, scale, lr = 8, [3.0, 2.0, 1.0], 0.1, 0.05
    steps = 300 if args.quick else 3000
    every = 5
    teacher = dl.make_teacher(width, width, svals, seed=0)
    setup = {
        "width": width,
        "teacher_singular_values": svals,
        "init_scale": scale,
        "lr": lr,
        "steps": steps,
        "rules": {k: {"rule": r, "alpha": a, "damping": lam} for k, (r, a, lam) in RULES.items()},
        "gd_stability_limit_at_solution": {L: 2 / (L * max(svals) ** (2 * (L - 1) / L)) for L in (2, 3, 4)},
    }
    results: dict = {"setup": setup, "depths": {}, "alpha_sweep": {}}
    histories: dict = {}
    t0 = time.perf_counter()
    for L in (2, 3, 4):
        ws0 = dl.init_student([width] * (L + 1), scale, seed=1)
        results["depths"][L] = {}
        for label, (rule, alpha, lam) in RULES.items():
            h = dl.simulate(
                [w.clone() for w in ws0], teacher, rule, lr, steps, alpha=alpha, damping=lam, record_every=every
            )
            histories[(L, label)] = h
            results["depths"][L][label] = {
                **summarize(h, teacher),
                "curve": {
                    "steps": h.steps[::4],
                    "loss": h.loss[::4],
                    "balance": [max(b) for b in h.balance][::4],
                    "modes": h.modes[::4],
                },
            }
            s = results["depths"][L][label]
            print(
                f"L={L} {label:12s} to1e-3={s['steps_to_1e-3']} to1e-6={s['steps_to_1e-6']} "
                f"final={s['final_loss']:.2e} balance {s['balance_initial']:.2e} -> max {s['balance_max']:.2e} "
                f"(x{s['balance_growth']:.1f}) diverged={s['diverged_at']}",
                flush=True,
            )
    alphas = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    for L in (2, 3, 4):
        ws0 = dl.init_student([width] * (L + 1), scale, seed=1)
        results["alpha_sweep"][L] = {}
        for a in alphas:
            h = dl.simulate(
                [w.clone() for w in ws0], teacher, "fractional", lr, steps, alpha=a, damping=1e-4, record_every=every
            )
            results["alpha_sweep"][L][a] = summarize(h, teacher)
            s = results["alpha_sweep"][L][a]
            print(
                f"sweep L={L} alpha={a:.3f} to1e-3={s['steps_to_1e-3']} balance_max={s['balance_max']:.2e}", flush=True
            )
    results["seconds"] = time.perf_counter() - t0
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    atomic_json(out / ("deep_linear_quick.json" if args.quick else "deep_linear.json"), results)
    if not args.no_figures:
        figures(histories, results, teacher, alphas)
    print(f"done in {results['seconds']:.1f} s")


def figures(histories: dict, results: dict, teacher: dl.Teacher, alphas: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir = ROOT / "docs" / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    # 1. loss and balance vs steps, one column per depth
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True)
    for j, L in enumerate((2, 3, 4)):
        for label in RULES:
            h = histories[(L, label)]
            axes[0, j].semilogy(h.steps, [max(v, 1e-30) for v in h.loss], label=label, color=COLORS[label])
            axes[1, j].semilogy(h.steps, [max(b) for b in h.balance], label=label, color=COLORS[label])
        axes[0, j].set_title(f"depth L={L}")
        axes[1, j].set_xlabel("step")
    axes[0, 0].set_ylabel("loss ½‖W_tot − M‖²")
    axes[1, 0].set_ylabel("max_l ‖W_{l+1}ᵀW_{l+1} − W_l W_lᵀ‖")
    axes[0, 0].legend(fontsize=8)
    for ax in axes.flat:
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(0, histories[(2, "GD")].steps[-1])
    fig.tight_layout()
    fig.savefig(figdir / "deeplinear_loss_balance.png", dpi=90)
    plt.close(fig)
    # 2. learned singular modes over time, depth 4
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), sharey=True)
    for ax, label in zip(axes, RULES):
        h = histories[(4, label)]
        modes = torch.tensor(h.modes)
        for i, s in enumerate(teacher.s.tolist()):
            ax.plot(h.steps, modes[:, i], label=f"mode s={s:g}")
            ax.axhline(s, color="k", lw=0.5, ls=":")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(0, h.steps[-1])
        ax.set_title(f"L=4, {label}")
        ax.set_xlabel("step")
        ax.set_ylim(-0.5, 3.5)
    axes[0].set_ylabel("u_iᵀ W_tot v_i")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figdir / "deeplinear_modes.png", dpi=90)
    plt.close(fig)
    # 3. alpha sweep
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for L in (2, 3, 4):
        sw = results["alpha_sweep"][L]
        hit = [sw[a]["steps_to_1e-3"] if sw[a]["steps_to_1e-3"] is not None else float("nan") for a in alphas]
        axes[0].plot(alphas, hit, "o-", label=f"L={L}")
        axes[1].semilogy(alphas, [sw[a]["balance_max"] for a in alphas], "o-", label=f"L={L}")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("α")
    axes[0].set_ylabel("steps to loss < 1e-3·initial")
    axes[1].set_xlabel("α")
    axes[1].set_ylabel("max imbalance over training")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(figdir / "deeplinear_alpha_sweep.png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
