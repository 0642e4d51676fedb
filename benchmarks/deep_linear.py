"""Deep-linear teacher–student study of curvature-corrected learning (Huh, ICML 2020), CPU, float64.

The paper's claims are about the learning *flow* (continuous time): natural gradient follows gradient descent's
path, each singular mode only faster, and so conserves weight balance; block-diagonal NGD (NGD-d, α = 1)
destroys it; the partially corrected rule α = ½ keeps most of NGD-d's speed while staying close to balanced.
This script integrates the four flows — GD, full NGD (pseudo-inverse / Levenberg–Marquardt of the whole
Gauss–Newton matrix), NGD-d and α = ½ — with an adaptive ODE solver (SciPy's DOP853) for student depths
L = 2..6, records the loss, the strength of every teacher mode and the weight balance
max_l ‖W_{l+1}ᵀW_{l+1} − W_l W_lᵀ‖_F at every accepted solver step, checks that tightening the tolerances does
not change the result, sweeps α, and separately runs the same rules with a *finite* step η = 0.05 (every step
recorded), which is a different dynamical system.

    python benchmarks/deep_linear.py            # 5-11 min on one shared core
    python benchmarks/deep_linear.py --quick    # depths 2-3 only
    python benchmarks/deep_linear.py --smoke    # depth 2, short: seconds (the tests run it)

Writes deep_linear.json (deep_linear_quick/_smoke.json with --quick/--smoke) into ``--out-dir`` and the figures
deeplinear_*.png into ``--figures-dir`` (both default to runs/benchmarks/deep_linear/, outside the source tree).
The committed copies are refreshed on purpose, with a full run pointed at them:

    python benchmarks/deep_linear.py --out-dir benchmarks/results --figures-dir docs/figures
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from _output import default_out

from anytrain.optim import deeplinear as dl

RULES = {  # label: (rule, alpha, damping)
    "GD": ("gd", 0.0, 0.0),
    "full NGD": ("ngd", 0.0, 1e-6),
    "NGD-d (α=1)": ("fractional", 1.0, 1e-4),
    "α=½": ("fractional", 0.5, 1e-4),
}
COLORS = {"GD": "tab:blue", "full NGD": "tab:gray", "NGD-d (α=1)": "tab:red", "α=½": "tab:green"}
STYLES = {"GD": "-", "full NGD": "--", "NGD-d (α=1)": "-", "α=½": "-"}  # full NGD's balance lies on GD's
TOL = {"rtol": 1e-9, "atol": 1e-12}  # the reported flows
LOOSE = {"rtol": 1e-7, "atol": 1e-10}  # the same flows at looser tolerances: the result must not change
T_END, STOP = 2.0e4, 1e-7  # integrate until the loss is below STOP × initial, or until T_END
WIDTH, SVALS, SCALE, LR, FINITE_STEPS = 8, [3.0, 2.0, 1.0], 0.1, 0.05, 3000


def time_to(hist: dl.History, fraction: float) -> float | None:
    """First time the loss falls below ``fraction`` × initial, interpolating log-loss between recorded points."""
    target = math.log(fraction * hist.loss[0])
    for i in range(1, len(hist.loss)):
        if hist.loss[i] < fraction * hist.loss[0]:
            a, b = math.log(max(hist.loss[i - 1], 1e-300)), math.log(max(hist.loss[i], 1e-300))
            t0, t1 = hist.times[i - 1], hist.times[i]
            return t0 + (t1 - t0) * (a - target) / (a - b) if a != b else t1
    return None


def summarize(hist: dl.History, teacher: dl.Teacher) -> dict:
    bal = [max(b) for b in hist.balance]
    return {
        "time_to_1e-3": time_to(hist, 1e-3),
        "time_to_1e-6": time_to(hist, 1e-6),
        "final_time": hist.times[-1],
        "final_loss": hist.loss[-1],
        "peak_loss_ratio": max(hist.loss) / hist.loss[0],
        "diverged_at": hist.diverged_at,
        "recorded_points": len(hist.loss),
        "balance_initial": bal[0],
        "balance_max": max(bal),
        "balance_final": bal[-1],
        "balance_growth": max(bal) / bal[0],
        "mode_error_final": max(abs(m - s) for m, s in zip(hist.modes[-1], teacher.s.tolist())),
    }


def curve(hist: dl.History, points: int = 150) -> dict:
    """About ``points`` recorded points (6 significant digits) for the JSON; the summaries use every point."""
    k = max(1, len(hist.loss) // points)

    def r(v: float) -> float:
        return float(f"{v:.6g}")

    return {
        "times": [r(t) for t in hist.times[::k]],
        "loss": [r(v) for v in hist.loss[::k]],
        "balance": [r(max(b)) for b in hist.balance][::k],
        "modes": [[r(m) for m in ms] for ms in hist.modes[::k]],
    }


def atomic_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def flow(ws0: list[torch.Tensor], teacher: dl.Teacher, label: str, tol: dict, t_end: float = T_END) -> dl.History:
    rule, alpha, lam = RULES[label]
    return dl.integrate([w.clone() for w in ws0], teacher, rule, t_end, alpha, lam, stop_below=STOP, **tol)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="depth 2, short flows, no extra sweep: seconds, for tests")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=default_out("deep_linear"), help="where the JSON goes")
    ap.add_argument("--figures-dir", type=Path, default=None, help="where the figures go (default: --out-dir)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    depths = (2,) if args.smoke else (2, 3) if args.quick else (2, 3, 4, 5, 6)
    finite_depths = (2,) if args.smoke else (2, 3) if args.quick else (2, 3, 4)
    t_end, finite_steps = (50.0, 100) if args.smoke else (T_END, FINITE_STEPS)
    check_depth = 3 if 3 in depths else depths[-1]
    teacher = dl.make_teacher(WIDTH, WIDTH, SVALS, seed=0)
    setup = {
        "width": WIDTH,
        "teacher_singular_values": SVALS,
        "init_scale": SCALE,
        "flow": {"solver": "scipy solve_ivp DOP853", **TOL, "t_end": t_end, "stop_below": STOP},
        "finite_step": {"lr": LR, "steps": finite_steps, "recorded": "every step"},
        "rules": {k: {"rule": r, "alpha": a, "damping": lam} for k, (r, a, lam) in RULES.items()},
    }
    results: dict = {"setup": setup, "flow": {}, "tolerance_check": {}, "finite_step": {}, "alpha_sweep": {}}
    flows: dict = {}
    finite: dict = {}
    t0 = time.perf_counter()
    for L in depths:
        ws0 = dl.init_student([WIDTH] * (L + 1), SCALE, seed=1)
        results["flow"][L] = {}
        for label in RULES:
            h = flows[(L, label)] = flow(ws0, teacher, label, TOL, t_end)
            s = results["flow"][L][label] = {**summarize(h, teacher), "curve": curve(h)}
            print(
                f"flow L={L} {label:12s} t(1e-3)={s['time_to_1e-3']} t(1e-6)={s['time_to_1e-6']} "
                f"imbalance x{s['balance_growth']:.4g} (max {s['balance_max']:.3g}) points={s['recorded_points']}",
                flush=True,
            )
    # the same flows at looser tolerances (depth 3): the figures must not move
    ws0 = dl.init_student([WIDTH] * (check_depth + 1), SCALE, seed=1)
    for label in RULES:
        loose = flow(ws0, teacher, label, LOOSE, t_end)
        a, b = summarize(flows[(check_depth, label)], teacher), summarize(loose, teacher)
        results["tolerance_check"][label] = {
            k: abs(a[k] - b[k]) / abs(a[k]) for k in ("time_to_1e-3", "time_to_1e-6", "balance_growth") if a[k]
        }
        print(f"tolerance check L=3 {label}: {results['tolerance_check'][label]}", flush=True)
    for L in finite_depths:
        ws0 = dl.init_student([WIDTH] * (L + 1), SCALE, seed=1)
        results["finite_step"][L] = {}
        for label, (rule, alpha, lam) in RULES.items():
            h = finite[(L, label)] = dl.simulate(
                [w.clone() for w in ws0], teacher, rule, LR, finite_steps, alpha=alpha, damping=lam, record_every=1
            )
            s = results["finite_step"][L][label] = {**summarize(h, teacher), "curve": curve(h)}
            print(
                f"finite L={L} {label:12s} t(1e-3)={s['time_to_1e-3']} peak loss x{s['peak_loss_ratio']:.3g} "
                f"imbalance x{s['balance_growth']:.4g} (max {s['balance_max']:.3g})",
                flush=True,
            )
    alphas = [0.0, 0.5, 1.0] if args.smoke else [0.0, 0.25, 0.5, 0.75, 1.0]
    for L in finite_depths:
        ws0 = dl.init_student([WIDTH] * (L + 1), SCALE, seed=1)
        results["alpha_sweep"][L] = {}
        for a in alphas:
            known = {0.0: "GD", 0.5: "α=½", 1.0: "NGD-d (α=1)"}.get(a)
            if known is not None:
                s = summarize(flows[(L, known)], teacher)
            else:
                h = dl.integrate(
                    [w.clone() for w in ws0], teacher, "fractional", t_end, a, 1e-4, stop_below=STOP, **TOL
                )
                s = summarize(h, teacher)
            results["alpha_sweep"][L][a] = s
            print(f"sweep L={L} alpha={a:.3f} t(1e-3)={s['time_to_1e-3']} x{s['balance_growth']:.4g}", flush=True)
    results["seconds"] = time.perf_counter() - t0
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    name = "deep_linear_smoke.json" if args.smoke else "deep_linear_quick.json" if args.quick else "deep_linear.json"
    atomic_json(out / name, results)
    if not args.no_figures:
        figures(args.figures_dir or out, flows, finite, results, teacher, alphas, depths, finite_depths)
    print(f"done in {results['seconds']:.1f} s")


def figures(
    figdir: Path,
    flows: dict,
    finite: dict,
    results: dict,
    teacher: dl.Teacher,
    alphas: list[float],
    depths,
    finite_depths,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir.mkdir(parents=True, exist_ok=True)
    shown = [L for L in (2, 3, 4) if L in finite_depths]
    # 1. loss and balance: the flows (top two rows) and, labelled, the finite-step runs (bottom two rows)
    fig, axes = plt.subplots(4, len(shown), figsize=(4 * len(shown), 12), squeeze=False)
    for j, L in enumerate(shown):
        for label in RULES:
            for row, runs in ((0, flows), (2, finite)):
                h = runs[(L, label)]
                style = dict(label=label, color=COLORS[label], ls=STYLES[label])
                axes[row, j].semilogy(h.times, [max(v, 1e-30) for v in h.loss], **style)
                axes[row + 1, j].semilogy(h.times, [max(b) for b in h.balance], **style)
        axes[0, j].set_title(f"gradient flows (DOP853), depth L={L}", fontsize=10)
        axes[2, j].set_title(f"finite steps η={LR} (not the flow), depth L={L}", fontsize=10)
        for row in range(4):
            axes[row, j].set_xscale("symlog", linthresh=1.0)
            axes[row, j].set_xlim(0, 300 if row < 2 else LR * len(finite[(L, "GD")].loss))
        axes[1, j].set_xlabel("time t")
        axes[3, j].set_xlabel("time t = η·step")
    for row, what in enumerate(["loss", "imbalance", "loss", "imbalance"]):
        axes[row, 0].set_ylabel("loss ½‖W_tot − M‖²" if what == "loss" else "max_l ‖W_{l+1}ᵀW_{l+1} − W_l W_lᵀ‖")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figdir / "deeplinear_loss_balance.png", dpi=80)
    plt.close(fig)
    # 2. learned singular modes over time, flows at depth 4 (3 in a quick run)
    Lm = max(shown)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), sharey=True)
    for ax, label in zip(axes, RULES):
        h = flows[(Lm, label)]
        modes = torch.tensor(h.modes)
        for i, s in enumerate(teacher.s.tolist()):
            ax.plot(h.times, modes[:, i], label=f"mode s={s:g}")
            ax.axhline(s, color="k", lw=0.5, ls=":")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(0, 300)
        ax.set_title(f"flow, L={Lm}, {label}", fontsize=10)
        ax.set_xlabel("time t")
        ax.set_ylim(-0.5, 3.5)
    axes[0].set_ylabel("u_iᵀ W_tot v_i")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figdir / "deeplinear_modes.png", dpi=80)
    plt.close(fig)
    # 3. alpha sweep (flows) and α=½ / NGD-d imbalance growth against depth
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for L in finite_depths:
        sw = results["alpha_sweep"][L]
        hit = [sw[a]["time_to_1e-3"] if sw[a]["time_to_1e-3"] is not None else float("nan") for a in alphas]
        axes[0].plot(alphas, hit, "o-", label=f"L={L}")
        axes[1].semilogy(alphas, [sw[a]["balance_growth"] for a in alphas], "o-", label=f"L={L}")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("α")
    axes[0].set_ylabel("flow time to loss < 1e-3·initial")
    axes[1].set_xlabel("α")
    axes[1].set_ylabel("peak imbalance / initial")
    axes[0].legend()
    for label in RULES:
        axes[2].semilogy(
            depths,
            [results["flow"][L][label]["balance_growth"] for L in depths],
            "o-",
            label=label,
            color=COLORS[label],
        )
    axes[2].set_xlabel("depth L")
    axes[2].set_ylabel("peak imbalance / initial (flow)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figdir / "deeplinear_alpha_sweep.png", dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
