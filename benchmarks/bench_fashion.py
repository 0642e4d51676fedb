"""Fashion-MNIST results for the four methods (issue 14, item 5): every run through the `anytrain` CLI, 3 seeds.

    python benchmarks/bench_fashion.py --groups anytime dgl slbi curvature --seeds 0 1 2 --jobs 2

Groups (each a table in ``benchmarks/RESULTS.md``):

- ``anytime``: OSGD, joint, UPGrad, PCGrad, AdaLoss on ``cnn2d-exits`` and ``nested-width``
  (``configs/fashion-mnist-<rule>-<net>.yaml``), plus independently trained sub-networks: for exit k, the same
  net cut after stage k (``model.exits``/``model.stages`` = k+1, the identical prefix) trained alone on its
  last exit's loss (``rule: joint`` over one exit is plain backprop). Per-exit test accuracy of ``best.pt``
  (chosen on validation), MACs per exit, and the budgeted curve (thresholds fitted on validation, in
  ``metrics.json``).
- ``baselines`` (issue 16): the same measurements for ``sdn`` and ``gradient-equilibrium`` on the two nets and all six
  rules (joint, sdn, gradient-equilibrium, adaloss, UPGrad, osgd) on ``msdnet-small``, config-major, plus the area
  under the accuracy-vs-MACs curve; ``--borrow fashion_anytime.json`` fills the two nets' other rows (marked *).
- ``dgl``: DGL vs SGL vs backprop at K=4 on ``cnn2d-exits`` with ``mlp-sr`` heads.
- ``slbi``: ``benchmarks/bench_slbi.py`` on Fashion-MNIST (there is no prune CLI): dense SGD, the SLBI path,
  the stopping point chosen on validation (≥ 50 % of prunable channels removed), the exported net, and
  retrained tickets (SLBI rewind / re-init, magnitude, random) at the same sparsity.
- ``curvature``: SGD, Adam, α=½ and α=1 at equal steps; then per-step times measured in one interleaved run
  (``--part steptime``: the four optimizers step side by side in chunks, medians) and the curvature runs
  repeated with their epochs cut by the measured step-time ratio to SGD (equal wall time, converted from
  per-step time rather than measured per run, since wall time on a shared machine is noise).

Every training process runs under ``nice -n 10`` with ``train.threads=1``; at most ``--jobs`` at a time. glibc's
malloc is told to keep freed memory (``MALLOC_*`` below): without it the 10,000-image evaluations page-fault
their buffers back in on every batch (measured: ~4x less system time). Run directories go to ``--out`` (default
``runs/benchmarks/fashion/runs``): a finished run (its ``metrics.json`` or result file exists) is skipped, an
unfinished one is resumed with ``anytrain train --resume``; nothing is deleted. Results:
``fashion_<group>.json`` and ``.md`` in ``--results`` (default ``runs/benchmarks/fashion``; the committed copies
are refreshed with ``--results benchmarks/results``); ``--report-only`` rebuilds them from what has finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _output import default_out

ROOT = Path(__file__).resolve().parents[1]
RESULTS = default_out("fashion")  # --results
CONFIGS = ROOT / "configs"
NICE = ["nice", "-n", "10"]
ENV = {
    "OMP_NUM_THREADS": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TOP_PAD_": str(2**30),
}
QUIET = ["train.threads=1", "train.progress=false", "train.tensorboard=false", "train.plots=false"]
RULES = ["osgd", "joint", "upgrad", "pcgrad", "adaloss"]
NETS = {"cnn2d-exits": "exits", "nested-width": "stages"}  # net -> the option that cuts it after a stage
CURV = {"sgd": "sgd-cnn2d", "adam": "adam-cnn2d", "alpha=1/2": "curvature-half-cnn2d", "alpha=1": "curvature-one-cnn2d"}
SLBI_ARGS = ["--dataset", "fashion-mnist", "--num-samples", "6000", "--model", "cnn2d-exits", "--width", "16"]
SLBI_ARGS += ["--lr", "0.1", "--speed-steps", "0"]  # + --epochs E --record-every (every third of an epoch)


# ---- running ---------------------------------------------------------------------------------------------
class Run:
    """One training process: ``cmd`` creates ``out``; done when ``done`` (a file) exists."""

    def __init__(self, name: str, cmd: list[str], out: Path, done: Path, resume: list[str] | None = None):
        self.name, self.cmd, self.out, self.done, self.resume = name, cmd, out, done, resume


def train_run(group_dir: Path, name: str, seed: int, config: str, sets: list[str] = ()) -> Run:
    out = group_dir / name / f"seed{seed}"
    sets = [*sets, f"seed={seed}", *QUIET]
    cmd = ["anytrain", "train", str(CONFIGS / f"fashion-mnist-{config}.yaml")]
    cmd += [a for s in sets for a in ("--set", s)] + ["--out", str(out)]
    resume = ["anytrain", "train", "--resume", str(out)] + [a for s in QUIET for a in ("--set", s)]
    return Run(f"{name}/seed{seed}", cmd, out, out / "metrics.json", resume)


def execute(runs: list[Run], jobs: int) -> None:
    """Run what is not finished, ``jobs`` at a time; each writes its own log beside its run directory."""
    todo = [r for r in runs if not r.done.exists()]
    if jobs == 0:  # --report-only
        return
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to run", flush=True)
    env = {**os.environ, **ENV}

    def one(r: Run) -> None:
        r.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = r.resume if (r.resume and r.out.exists()) else r.cmd
        log = r.out.parent / f"{r.out.name}.log"
        t0 = time.time()
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(NICE + cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
            f.write(f"# exit {rc}, wall {time.time() - t0:.1f} s\n")
        status = "ok" if rc == 0 and r.done.exists() else f"FAILED (exit {rc}, see {log})"
        print(f"{time.strftime('%H:%M:%S')} {r.name}: {status}, {time.time() - t0:.0f} s", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))


def wall_of(run_dir: Path) -> float | None:
    """Wall seconds of a run, from the last ``# exit`` line of its log (None if never timed here)."""
    log = run_dir.parent / f"{run_dir.name}.log"
    if not log.exists():
        return None
    walls = [float(line.split("wall ")[1].split()[0]) for line in log.read_text().splitlines() if "# exit 0" in line]
    return walls[-1] if walls else None


# ---- statistics ------------------------------------------------------------------------------------------
def ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` (sample std over seeds) of ``values`` times ``scale``."""
    if not values:
        return "—"
    m = statistics.fmean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def load_metrics(run: Run) -> dict[str, Any] | None:
    return json.loads(run.done.read_text()) if run.done.exists() else None


def write(group: str, data: dict[str, Any], md: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(data, indent=1)), (".md", md)):
        path = RESULTS / f"fashion_{group}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(md)


# ---- groups ----------------------------------------------------------------------------------------------
def anytime(
    args: argparse.Namespace,
    group: str = "anytime",
    rows: dict[str, list[str]] | None = None,
    show: tuple[str, ...] = (*RULES, "independent"),
    borrowed: dict[str, Any] | None = None,
) -> None:
    """``rows``: net -> rules to run, config-major (default: RULES on NETS seed-major, plus the independent
    sub-networks); ``show``: the table's rows; ``borrowed``: another group's result JSON, whose runs fill the
    rows this group does not run (marked *)."""
    from anytrain.eval.anytime import anytime_auc

    gdir = Path(args.out) / group
    runs: dict[tuple[str, str, int], Run] = {}
    for net, rules in (rows or {net: RULES for net in NETS}).items():
        for rule in rules:
            for seed in args.seeds:
                runs[net, rule, seed] = train_run(gdir, f"{rule}-{net}", seed, f"{rule}-{net}")
        for seed in args.seeds if rows is None else ():
            for k in range(4):  # independent sub-network for exit k
                sets = [f"model.{NETS[net]}={k + 1}", "rule.name=joint"]
                runs[net, f"independent{k}", seed] = train_run(
                    gdir, f"independent{k}-{net}", seed, f"joint-{net}", sets
                )
    # anytime: the rules first, seed by seed; the independent sub-networks (the reference point) after them
    order = sorted(runs, key=lambda key: (key[1].startswith("independent"), key[2], key[0], key[1]))
    execute([runs[k] for k in (order if rows is None else runs)], args.jobs)
    borrowed = borrowed or {"runs": {}, "summary": {}}

    def metrics(net: str, rule: str, seed: int) -> dict[str, Any] | None:
        if (net, rule, seed) in runs:
            return load_metrics(runs[net, rule, seed])
        return borrowed["runs"].get(f"{rule}-{net}/seed{seed}")

    data: dict[str, Any] = {"runs": {}, "summary": {}}
    md = [
        "Per-exit test accuracy (%) of `best.pt` (chosen on validation), mean ± std over seeds; n = finished seeds. "
        "AUC (%): area under the accuracy-vs-MACs step curve over budgets b × the last exit's MACs, b in [0, 1] (at "
        "each b the most accurate exit that fits, 0 below the first exit; `anytrain.eval.anytime.anytime_auc`).",
        "",
    ]
    for net in rows or NETS:
        macs: list[int] = []
        md += [
            f"**{net}**",
            "",
            "| rule | n | exit 0 | exit 1 | exit 2 | exit 3 | mean exit | AUC | wall s / run |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for rule in show:
            per_exit: list[list[float]] = [[], [], [], []]
            walls: list[float] = []
            aucs: list[float] = []
            n = 0
            for seed in args.seeds:
                if rule == "independent":
                    ms_ = [load_metrics(runs[net, f"independent{k}", seed]) for k in range(4)]
                    if any(m is None for m in ms_):
                        continue
                    accs = [m["selected"]["exits"][-1]["test"] for m in ms_]
                    walls += [w for k in range(4) if (w := wall_of(runs[net, f"independent{k}", seed].out))]
                else:
                    m = metrics(net, rule, seed)
                    if m is None:
                        continue
                    accs = [e["test"] for e in m["selected"]["exits"]]
                    macs = [e["flops"] for e in m["exits"]]
                    aucs.append(anytime_auc(macs, accs))
                    data["runs"][f"{rule}-{net}/seed{seed}"] = m
                    if (net, rule, seed) in runs and (w := wall_of(runs[net, rule, seed].out)) is not None:
                        walls.append(w)
                n += 1
                for k, a in enumerate(accs):
                    per_exit[k].append(a)
            if (net, rule, args.seeds[0]) not in runs and rule != "independent":
                walls = borrowed["summary"].get(f"{rule}-{net}", {}).get("wall_s", [])
            means = [statistics.fmean(v) for v in zip(*per_exit)] if n else []
            data["summary"][f"{rule}-{net}"] = {
                "n": n,
                "exits": [summary(v) for v in per_exit] if n else [],
                "mean_exit": summary(means) if n else None,
                "auc": summary(aucs) if aucs else None,
                "wall_s": walls,
            }
            wall = f"{statistics.fmean(walls):.0f}" if walls else "—"
            star = "*" if (net, rule, args.seeds[0]) not in runs and rule != "independent" else ""
            md.append(
                f"| {rule}{star} | {n} | "
                + " | ".join(ms(v) for v in per_exit)
                + f" | {ms(means)} | {ms(aucs)} | {wall} |"
            )
        md += ["| MACs / sample | | " + " | ".join(f"{m:,}" for m in macs) + " | | | |", ""]
        data["summary"][f"macs-{net}"] = macs
        # budgeted curve: the same budget grid for every run of a net (it is a function of the exits' MACs)
        md += [
            f"Budgeted ({net}; thresholds fitted on validation, applied once to test): test accuracy (%) / "
            "realised mean MACs (M) at each target budget, mean over seeds.",
            "",
        ]
        shown = [r for r in show if r != "independent"]
        head = "| budget (M MACs) | " + " | ".join(shown) + " |"
        md += [head, "|---" * (len(shown) + 1) + "|"]
        curves: dict[str, list[tuple[list[float], list[float]]]] = {}
        budgets: list[float] = []
        for rule in shown:
            ms_ = [m for s in args.seeds if (m := metrics(net, rule, s)) is not None]
            if not ms_:
                continue
            budgets = [b["budget"] for b in ms_[0]["budgeted"]]
            curves[rule] = [
                (
                    [m["budgeted"][i]["test"]["accuracy"] for m in ms_],
                    [m["budgeted"][i]["test"]["mean_flops"] for m in ms_],
                )
                for i in range(len(budgets))
            ]
        data["summary"][f"budgeted-{net}"] = {
            "budgets": budgets,
            "curves": {
                r: [{"test_accuracy": summary(a), "mean_macs": summary(f)} for a, f in c] for r, c in curves.items()
            },
        }
        for i, b in enumerate(budgets):
            cells = [
                f"{ms(curves[r][i][0])} / {statistics.fmean(curves[r][i][1]) / 1e6:.2f}" if r in curves else "—"
                for r in shown
            ]
            md.append(f"| {b / 1e6:.2f} | " + " | ".join(cells) + " |")
        md.append("")
    write(group, data, "\n".join(md))


def baselines(args: argparse.Namespace) -> None:
    """Issue 16: sdn and gradient-equilibrium on the two anytime nets, all six rules on msdnet-small; the other
    rules' rows on the two nets come from the anytime group's ``fashion_anytime.json`` (``--borrow``) if given."""
    borrowed = json.loads(Path(args.borrow).read_text()) if args.borrow else None
    two = ["sdn", "gradient-equilibrium"]
    rows = {"msdnet-small": ["joint", *two, "adaloss", "upgrad", "osgd"], "cnn2d-exits": two, "nested-width": two}
    anytime(args, "baselines", rows, ("joint", *two, "adaloss", "upgrad", "osgd"), borrowed)


def dgl(args: argparse.Namespace) -> None:
    gdir = Path(args.out) / "dgl"
    methods = ["backprop", "dgl", "sgl"]
    runs = {(m, s): train_run(gdir, f"{m}-cnn2d", s, f"{m}-cnn2d") for s in args.seeds for m in methods}
    execute([runs[m, s] for s in args.seeds for m in methods], args.jobs)
    data: dict[str, Any] = {"runs": {}, "summary": {}}
    md = [
        "K=4 modules of `cnn2d-exits` (width 16, `mlp-sr` heads); test accuracy (%) of `best.pt` (chosen on "
        "validation), mean ± std over seeds. Backprop trains the last exit only, so its side exits are untrained.",
        "",
        "| method | n | exit 0 | exit 1 | exit 2 | exit 3 (last) | wall s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    macs: list[int] = []
    for m in methods:
        ms_ = [x for s in args.seeds if (x := load_metrics(runs[m, s])) is not None]
        per_exit = [[x["selected"]["exits"][k]["test"] for x in ms_] for k in range(4)]
        walls = [w for s in args.seeds if (w := wall_of(runs[m, s].out)) is not None]
        for s in args.seeds:
            if (x := load_metrics(runs[m, s])) is not None:
                data["runs"][f"{m}/seed{s}"] = x
                macs = [e["flops"] for e in x["exits"]]
        data["summary"][m] = {"n": len(ms_), "exits": [summary(v) for v in per_exit] if ms_ else [], "wall_s": walls}
        wall = f"{statistics.fmean(walls):.0f}" if walls else "—"
        md.append(f"| {m} | {len(ms_)} | " + " | ".join(ms(v) for v in per_exit) + f" | {wall} |")
    md.append("| MACs / sample | | " + " | ".join(f"{x:,}" for x in macs) + " | |")
    write("dgl", data, "\n".join(md) + "\n")


def slbi(args: argparse.Namespace) -> None:
    tag = "slbi" if args.slbi_epochs == 2 else f"slbi_{args.slbi_epochs}ep"
    gdir = Path(args.out) / tag
    slbi_args = [*SLBI_ARGS, "--epochs", str(args.slbi_epochs), "--record-every", str(14 * args.slbi_epochs // 2)]
    runs = []
    for s in args.seeds:
        out = gdir / f"seed{s}.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_slbi.py"), *slbi_args, "--seeds", str(s)]
        runs.append(Run(f"slbi/seed{s}", cmd + ["--out", str(out)], gdir / f"seed{s}", out))
    execute(runs, args.jobs)
    seeds = [json.loads(r.done.read_text())["seeds"][0] for r in runs if r.done.exists()]
    walls = [json.loads(r.done.read_text())["wall_s"] for r in runs if r.done.exists()]
    pick: dict[str, Callable[[dict], float]] = {
        "dense SGD": lambda r: r["sgd_acc"],
        "SLBI, final W": lambda r: r["slbi_acc"],
        "SLBI W* at the stopping point, exported": lambda r: r["export"]["exported_acc"],
        "ticket: SLBI support, rewound": lambda r: r["tickets"]["slbi-rewind"],
        "ticket: SLBI support, re-initialised": lambda r: r["tickets"]["slbi-reinit"],
        "ticket: magnitude (dense SGD), rewound": lambda r: r["tickets"]["magnitude-rewind"],
        "ticket: random, rewound": lambda r: r["tickets"]["random-rewind"],
    }
    md = [
        f"`cnn2d-exits` (width 16), last-exit test accuracy (%), mean ± std over {len(seeds)} seeds; "
        "tickets retrained with SGD for the same epochs.",
        "",
        "| model | test accuracy |",
        "|---|---|",
    ]
    md += [f"| {k} | {ms([f(r) for r in seeds])} |" for k, f in pick.items()]
    if seeds:
        ex = [r["export"] for r in seeds]
        md += [
            "",
            "| at the stopping point (chosen on validation) | mean over seeds |",
            "|---|---|",
            f"| conv filters removed | {ms([e['conv_filters_removed'] for e in ex])} % |",
            f"| prunable channels removed | {ms([e['channels_removed'] for e in ex])} % |",
            f"| parameters dense → exported | {statistics.fmean(e['params'][0] for e in ex):,.0f} → "
            f"{statistics.fmean(e['params'][1] for e in ex):,.0f} |",
            f"| MACs dense → exported | {statistics.fmean(e['macs'][0] for e in ex):,.0f} → "
            f"{statistics.fmean(e['macs'][1] for e in ex):,.0f} |",
            f"| CPU latency, batch 256, dense → exported (ms; noisy, shared machine) | "
            f"{statistics.fmean(e['latency_s_bs256'][0] for e in ex) * 1e3:.1f} → "
            f"{statistics.fmean(e['latency_s_bs256'][1] for e in ex) * 1e3:.1f} |",
            f"| max abs difference exported vs W* | {max(e['max_abs_diff_vs_wstar'] for e in ex):.1e} |",
            f"| stopping step (of {seeds[0]['path'][-1]['step']}) | "
            + ", ".join(str(r["stop"]["step"]) for r in seeds)
            + " |",
            f"| wall s per seed (6 trainings) | {', '.join(f'{w:.0f}' for w in walls)} |",
        ]
    write(tag, {"args": slbi_args, "seeds": seeds, "wall_s": walls}, "\n".join(md) + "\n")


def curvature(args: argparse.Namespace) -> None:
    gdir = Path(args.out) / "curvature"
    eq_steps = {(k, s): train_run(gdir, k.replace("/", "_"), s, c) for s in args.seeds for k, c in CURV.items()}
    execute(list(eq_steps.values()), args.jobs)
    timing = gdir / "steptime_mean.json"  # (steptime.json: an earlier median-based timing, superseded)
    execute(
        [
            Run(
                "steptime",
                [sys.executable, __file__, "--part", "steptime", "--timing-out", str(timing)],
                gdir / "steptime",
                timing,
            )
        ],
        min(args.jobs, 1),
    )
    t = json.loads(timing.read_text()) if timing.exists() else None
    eq_time: dict[tuple[str, int], Run] = {}
    epochs = 3  # the configs' epochs
    if t is not None:
        for k in ("alpha=1/2", "alpha=1", "adam"):
            e = max(1, int(epochs * t["sgd"] / t[k] + 0.5))
            if e != epochs:
                for s in args.seeds:
                    eq_time[k, s] = train_run(
                        gdir, f"{k.replace('/', '_')}-eqtime-{e}ep", s, CURV[k], [f"train.epochs={e}"]
                    )
        execute(list(eq_time.values()), args.jobs)
    data: dict[str, Any] = {"timing_ms_per_step": t, "runs": {}, "summary": {}}
    md = [
        "`cnn2d-exits` (width 16, 4 exits, joint loss), last-exit test accuracy (%) of `best.pt` (chosen on "
        "validation), mean ± std over seeds.",
        "",
    ]
    if t is not None:
        md += [
            "Per-step CPU time (batch 128, one thread, mean over interleaved chunks; "
            + t["note"]
            + "): "
            + ", ".join(f"{k} {t[k]:.1f} ms ({t[k] / t['sgd']:.2f}× SGD)" for k in CURV),
            "",
        ]
    md += [
        "| optimizer | equal steps (3 epochs) | mean exit | equal wall time (epochs) | wall s / run |",
        "|---|---|---|---|---|",
    ]
    for k in CURV:
        ms_ = [x for s in args.seeds if (x := load_metrics(eq_steps[k, s])) is not None]
        last = [x["selected"]["exits"][-1]["test"] for x in ms_]
        mean_exit = [statistics.fmean(e["test"] for e in x["selected"]["exits"]) for x in ms_]
        eqt = [x for s in args.seeds if (k, s) in eq_time and (x := load_metrics(eq_time[k, s])) is not None]
        eqt_cell = (
            "same as equal steps"
            if k == "sgd" or (t is not None and (k, args.seeds[0]) not in eq_time)
            else (
                f"{ms([x['selected']['exits'][-1]['test'] for x in eqt])} ({eqt[0]['epochs']} ep, n={len(eqt)})"
                if eqt
                else "—"
            )
        )
        walls = [w for s in args.seeds if (w := wall_of(eq_steps[k, s].out)) is not None]
        for s in args.seeds:
            for tag, r in (("steps", eq_steps.get((k, s))), ("time", eq_time.get((k, s)))):
                if r is not None and (x := load_metrics(r)) is not None:
                    data["runs"][f"{k}/{tag}/seed{s}"] = x
        data["summary"][k] = {
            "equal_steps": summary(last) if last else None,
            "equal_time": summary([x["selected"]["exits"][-1]["test"] for x in eqt]) if eqt else None,
            "wall_s": walls,
        }
        wall = f"{statistics.fmean(walls):.0f}" if walls else "—"
        md.append(f"| {k} | {ms(last)} (n={len(ms_)}) | {ms(mean_exit)} | {eqt_cell} | {wall} |")
    write("curvature", data, "\n".join(md) + "\n")


def steptime(out: str, chunks: int = 10, chunk: int = 20) -> None:
    """Mean ms per training step of the four curvature-row optimizers on the Fashion-MNIST ``cnn2d-exits``,
    stepping side by side in interleaved chunks (fresh batches). Both the process CPU time (one thread; what the
    equal-wall-time conversion uses, since it does not count the time other jobs on a shared machine hold the
    core) and the wall time of each step are recorded. The mean, over a multiple of the curvature optimizer's
    inverse interval (200 steps vs ``inverse_every: 100``), carries its amortized factor and inverse updates, which a
    median would hide."""
    import torch
    import torch.nn.functional as F

    from anytrain.config import load_config
    from anytrain.data import load_dataset
    from anytrain.nets import build_model
    from anytrain.optim import build_optimizer

    torch.set_num_threads(1)
    data = load_dataset("fashion-mnist", seed=0, num_samples=6000)
    steppers = {}
    for k, c in CURV.items():
        cfg = load_config(str(CONFIGS / f"fashion-mnist-{c}.yaml"))
        torch.manual_seed(0)
        kw = {a: v for a, v in cfg["model"].items() if a != "name"}
        net = build_model(cfg["model"]["name"], in_shape=tuple(data.x_train.shape[1:]), num_classes=10, **kw)
        okw = {a: v for a, v in cfg["optimizer"].items() if a != "name"}
        steppers[k] = (net, build_optimizer(cfg["optimizer"]["name"], net, **okw), [], [])
    g = torch.Generator().manual_seed(0)
    for c in range(chunks + 1):  # chunk 0 warms up
        for net, opt, cpu, wall in steppers.values():
            for _ in range(chunk):
                idx = torch.randint(len(data.y_train), (128,), generator=g)
                t0, c0 = time.perf_counter(), time.process_time()
                opt.zero_grad(set_to_none=True)
                sum(F.cross_entropy(z, data.y_train[idx]) for z in net(data.x_train[idx])).backward()
                opt.step()
                if c:
                    cpu.append(time.process_time() - c0)
                    wall.append(time.perf_counter() - t0)
    res: dict[str, Any] = {k: statistics.fmean(v[2]) * 1e3 for k, v in steppers.items()}
    res["wall_ms"] = {k: statistics.fmean(v[3]) * 1e3 for k, v in steppers.items()}
    res["note"] = (
        f"CPU time; {chunks} chunks of {chunk} steps each, interleaved; "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    Path(out).write_text(json.dumps(res, indent=1))


GROUPS: dict[str, Callable[[argparse.Namespace], None]] = {
    "anytime": anytime,
    "dgl": dgl,
    "slbi": slbi,
    "curvature": curvature,
    "baselines": baselines,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(default_out("fashion", "runs")), help="run directories")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where fashion_<group>.json and .md go")
    ap.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    ap.add_argument("--slbi-epochs", type=int, default=2, help="epochs of every slbi-group training")
    ap.add_argument("--borrow", help="baselines: fashion_anytime.json whose runs fill the rows not run here")
    ap.add_argument("--report-only", action="store_true", help="aggregate what has finished; start nothing")
    ap.add_argument("--part", choices=["steptime"], help=argparse.SUPPRESS)
    ap.add_argument("--timing-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global RESULTS
    RESULTS = args.results
    if args.part == "steptime":
        steptime(args.timing_out)
        return
    if args.report_only:
        args.jobs = 0
    for g in args.groups:
        GROUPS[g](args)


if __name__ == "__main__":
    main()
