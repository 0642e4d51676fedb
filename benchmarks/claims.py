"""The four papers' claims at convergence on the full Fashion-MNIST (issue 25): 3 seeds per arm, the learning rate
of each arm chosen once on validation, every verdict computed from its own numbers.

    python benchmarks/claims.py --results benchmarks/claims/results.json   # all four studies, 2 processes
    python benchmarks/claims.py --results benchmarks/claims/results.json --studies dgl --jobs 1
    python benchmarks/claims.py --results benchmarks/claims/results.json --report-only   # verdicts only
    python benchmarks/claims.py --smoke               # the machinery on 3,000 images, 2 epochs (never a result)

Data: Fashion-MNIST, all of it: 55,000 training images, 5,000 validation images (a seeded, class-stratified
split of the 60,000, ``data.val_size: auto``), the 10,000 test images, touched once per run when it finishes.

Protocol, the same for every study:

- **Learning rate.** Each arm (a rule or optimizer on a net) trains seed 0 at every value of its grid
  (``GRIDS``: three values a factor 2 apart around the usual setting; per optimizer family, documented below),
  and the value with the highest final mean validation accuracy over the exits the arm trains is its learning
  rate for every seed. Those seed-0 runs are part of the results; seeds 1 and 2 run at the chosen value only.
- **Convergence.** Every run trains ``EPOCHS`` epochs with the step schedule the four papers use: the learning
  rate ×0.1 at 50 % and at 75 % of the epochs (SGL: constant, one phase per module). A run is converged when each
  trained exit's validation accuracy moves by less than 0.3 points (max − min) over the last 20 % of its epochs
  (rounded up: 3 of 12); every record says whether it is, and a verdict lists the runs that are not. (A first
  attempt with a cosine schedule, on 2026-12-05, left 7 of its first 8 runs unconverged by this test: at 83 %
  of the run the cosine rate is still 7 % of its peak, and exit 0 moved up to 6.6 points over the last 3 epochs.)
- **Test accuracy** is that of the final model, per exit, earliest first. Nothing is chosen on it.
- **Verdicts.** A paired comparison over seeds (same seed = same initialisation, data order and split): the mean
  and sample std of the per-seed differences and a one-sided t interval at 90 % (t with n − 1 degrees of
  freedom). A "better than" claim holds when the interval lies above 0, does not hold when the mean difference
  is ≤ 0 and the interval lies below +``MARGIN``, and is inconclusive otherwise. A "matches" claim holds
  when the interval lies above −``MARGIN`` (1 point), does not hold when it lies below, inconclusive otherwise.

Studies:

- ``osgd`` (Wan et al.): OSGD vs joint, SDN weighting and gradient equilibrium on the width-nested net,
  ``cnn2d-exits`` and MSDNet (``NETS``: the same architectures, narrower: 2.2–3.1 M MACs per sample at the last
  exit).
- ``dgl`` (Belilovsky et al.): DGL (K = 4 modules, the released ``mlp-sr`` heads) vs end-to-end backprop vs SGL
  on the same trunk.
- ``curvature`` (Huh): curvature-corrected α = ½ vs α = 1 vs SGD vs Adam on ``cnn2d-exits``; validation accuracy
  per epoch against steps and against the run's CPU seconds (one thread per process, so CPU seconds are the time
  on a quiet core, which wall time on a shared machine is not).
- ``slbi`` (Fu et al.): the SLBI path on ``cnn2d-exits`` (a snapshot every ``PATH_EVERY`` steps, 11 per epoch;
  learning rate = the dense SGD arm's), the stopping point on validation (``anytrain.sparsity.stopping_point``:
  the densest snapshot whose W* still removes ≥ 50 % of prunable channels), the exported W*, and three
  retrained tickets of that size (SLBI's support, magnitude and random, rewound to the initial weights) vs the
  dense net (the curvature study's SGD runs). (The first SLBI study, on 2026-12-05, kept one snapshot per
  epoch: the path went from 65–68 % of channels removed after epoch 1, where W* is at chance, to 2–5 % after
  epoch 2, so every stopping point was epoch 1's; snapshots within the epoch resolve that stretch.)

Every run is an ordinary ``anytrain`` run directory under ``--root`` (default ``runs/benchmarks/claims/runs``), with
its config and log beside it. A killed benchmark resumes: the runs recorded in ``--results`` are not run again (so
the suite continues on another machine from the committed file), unfinished ones resume with
``anytrain train --resume``, and ``--results`` is rewritten (atomically) each time a run finishes.

The same studies on CIFAR-10 at the papers' sizes, on a GPU in 10-minute pieces: ``benchmarks/claims_cifar.py``
(it imports this module's arms, records and verdicts).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from _output import default_out

ROOT = Path(__file__).resolve().parents[1]
RESULTS = default_out("claims", "results.json")  # the committed copy: --results benchmarks/claims/results.json
EPOCHS = 12
MARGIN = 0.01  # "matches": within 1 point
CONVERGED = 0.003  # max − min of validation accuracy over the last 20 % of epochs
TARGET_REMOVED = 0.5  # SLBI: fraction of prunable channels removed at the stopping point
PATH_EVERY = 39  # steps between the SLBI path's snapshots: 11 per epoch (429 steps of 128 of 55,000 images)
ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30)}
ANYTRAIN = [
    sys.executable,
    "-c",
    "from anytrain.cli import main; raise SystemExit(main())",
]  # this interpreter's anytrain
QUIET = {"threads": 1, "progress": False, "tensorboard": False, "plots": False}

NETS: dict[str, dict[str, Any]] = {
    "nested-width": {"name": "nested-width", "stages": 4, "width": 4},
    "cnn2d-exits": {"name": "cnn2d-exits", "width": 8, "exits": 4},
    "msdnet-small": {
        "name": "msdnet",
        **{"blocks": 4, "base": 1, "step": 1, "scales": 3, "channels": 6, "growth": 4},
        **{"bottleneck": False, "head_channels": 12},
    },
}
SGD = {"name": "sgd", "momentum": 0.9, "weight_decay": 5.0e-4}
CURVATURE = {
    "name": "curvature",
    **{"damping": 0.1, "adaptive_damping": True, "momentum": 0.9, "kl_clip": 1.0e-3},
    **{"factor_every": 10, "inverse_every": 100, "curvature": "empirical"},
}
SMOKE: dict[str, Any] = {}  # --smoke: a quick check of the machinery on a subset (never recorded as a result)
GRIDS = {"sgd": [0.05, 0.1, 0.2], "adam": [5e-4, 1e-3, 2e-3], "curvature": [0.015, 0.03, 0.06]}


@dataclass
class Arm:
    """One method on one net: ``rule`` and ``optimizer`` config sections (``lr`` filled in per run)."""

    study: str
    name: str
    net: str
    rule: dict[str, Any]
    optimizer: dict[str, Any]
    grid: str = "sgd"
    model: dict[str, Any] = field(default_factory=dict)  # extra model options (heads)
    schedule: str = "step"  # ×0.1 at 50 % and 75 % of the epochs, or "none" (constant)

    @property
    def key(self) -> str:
        return f"{self.study}/{self.name}-{self.net}"

    def config(self, lr: float, seed: int) -> dict[str, Any]:
        e = SMOKE.get("epochs", EPOCHS)
        return {
            "seed": seed,
            "data": {"name": "fashion-mnist", "batch_size": 128, "val_size": "auto", **SMOKE.get("data", {})},
            "model": {**NETS[self.net], **self.model},
            "rule": self.rule,
            "optimizer": {**self.optimizer, "lr": lr},
            "schedule": {"name": "none"}
            if self.schedule == "none"
            else {"name": "step", "milestones": [e / 2, 3 * e / 4]},
            "train": {"epochs": e, **QUIET},
        }


def arms() -> list[Arm]:
    out = []
    for net in NETS:  # Wan et al.
        for rule in ({"name": "osgd", "mode": "global"}, {"name": "joint"}, {"name": "sdn"}):
            out.append(Arm("osgd", rule["name"], net, rule, SGD))
        out.append(Arm("osgd", "gradient-equilibrium", net, {"name": "gradient-equilibrium"}, SGD))
    heads = {"head": "mlp-sr"}  # Belilovsky et al.: the released auxiliary heads, K = 4
    out.append(Arm("dgl", "dgl", "cnn2d-exits", {"name": "dgl"}, SGD, model=heads))
    out.append(Arm("dgl", "backprop", "cnn2d-exits", {"name": "joint", "last_only": True}, SGD, model=heads))
    out.append(Arm("dgl", "sgl", "cnn2d-exits", {"name": "sgl"}, SGD, model=heads, schedule="none"))
    joint = {"name": "joint"}  # Huh
    out.append(Arm("curvature", "sgd", "cnn2d-exits", joint, SGD))
    out.append(Arm("curvature", "adam", "cnn2d-exits", joint, {"name": "adam", "weight_decay": 0.0}, grid="adam"))
    for a, tag in ((0.5, "alpha=0.5"), (1.0, "alpha=1")):
        out.append(Arm("curvature", tag, "cnn2d-exits", joint, {**CURVATURE, "alpha": a}, grid="curvature"))
    return out


STUDY_ORDER = ["curvature", "dgl", "slbi", "osgd"]  # cheapest first, so whole verdicts land early
# The nets each verdict compares on: osgd's nets, dgl's and curvature's net, and slbi's dense arm (study, arm,
# net). claims_cifar.py passes its own.
VERDICT_NETS: dict[str, Any] = {
    "osgd": list(NETS),
    "dgl": "cnn2d-exits",
    "curvature": "cnn2d-exits",
    "slbi": ("curvature", "sgd", "cnn2d-exits"),
}


def run_key(arm: Arm, seed: int, lr: float) -> str:
    """A run's directory under the root, also its record's ``run_dir``."""
    return f"{arm.key}/lr{lr:g}/seed{seed}"


def chosen_lr(records: dict[str, dict[str, Any]], arm: Arm) -> float | None:
    """The arm's learning rate: the grid value whose seed-0 run has the highest ``val_score`` (ties: the smaller
    value); None until every grid value's seed-0 run is in ``records`` (keyed by ``run_dir``)."""
    runs = [records.get(run_key(arm, 0, lr)) for lr in GRIDS[arm.grid]]
    if any(r is None for r in runs):
        return None
    return max(runs, key=lambda r: (r["val_score"], -r["lr"]))["lr"]  # type: ignore[index]


# ---- jobs ------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One unit of work: a training run (``arm``, ``seed``, ``lr``) or an SLBI part (``part``)."""

    key: str  # the run directory, relative to the root; also the record's ``run_dir``
    study: str
    arm: str
    net: str
    seed: int
    lr: float | None = None
    cfg: dict[str, Any] | None = None  # a training run's config
    part: str | None = None  # "stop" or "ticket-<kind>": run as `claims.py --part ...`
    deps: list[str] = field(default_factory=list)  # job keys that must be recorded first
    grid: list[float] = field(default_factory=list)


class Suite:
    """The job list, the recorded results and the scheduler. Records are keyed by ``run_dir``."""

    def __init__(self, root: Path, results: Path, studies: list[str]) -> None:
        self.root, self.results, self.studies = root, results, studies
        data = json.loads(results.read_text()) if results.exists() else []
        self.records: dict[str, dict[str, Any]] = {r["run_dir"]: r for r in data if r.get("record") == "run"}
        self.lock = threading.Lock()
        self.arms = {a.key: a for a in arms()}

    # -- learning rates: chosen on seed 0's final validation accuracy, once per arm --
    def chosen_lr(self, arm: Arm) -> float | None:
        return chosen_lr(self.records, arm)

    @staticmethod
    def run_key(arm: Arm, seed: int, lr: float) -> str:
        return run_key(arm, seed, lr)

    def jobs(self) -> list[Job]:
        """Every job that can be named now (seeds 1 and 2 of an arm once its learning rate is chosen), once."""
        out: dict[str, Job] = {}
        for study in (s for s in STUDY_ORDER if s in self.studies):
            if study == "slbi":
                todo = self.slbi_jobs()
            else:
                todo = [j for a in self.arms.values() if a.study == study for j in self.arm_jobs(a)]
            out.update((j.key, out.get(j.key, j)) for j in todo)
        return list(out.values())

    def arm_jobs(self, arm: Arm) -> list[Job]:
        grid = GRIDS[arm.grid]
        lr = self.chosen_lr(arm)
        todo = [(0, x) for x in grid] + ([(s, lr) for s in (1, 2)] if lr is not None else [])
        return [
            Job(self.run_key(arm, s, x), arm.study, arm.name, arm.net, s, x, arm.config(x, s), grid=grid)
            for s, x in todo
        ]

    def slbi_jobs(self) -> list[Job]:
        """The SLBI study: its dense net is the curvature study's SGD arm, whose learning rate it also takes."""
        dense = self.arms["curvature/sgd-cnn2d-exits"]
        lr = self.chosen_lr(dense)
        if lr is None:  # wait for the dense arm's learning rate
            return self.arm_jobs(dense)
        out = self.arm_jobs(dense)
        for seed in (0, 1, 2):
            cfg = dense.config(lr, seed)
            cfg["optimizer"] = {"name": "slbi", "lr": lr, "kappa": 1.0, "mu": 100.0}
            cfg["optimizer"] |= {"momentum": 0.9, "weight_decay": 5e-4}
            cfg["train"]["keep_every_steps"] = SMOKE.get("path_every", PATH_EVERY)  # the path's points
            path = f"slbi/slbi-path-cnn2d-exits/lr{lr:g}/seed{seed}"
            out.append(Job(path, "slbi", "slbi-path", dense.net, seed, lr, cfg))
            stop = f"slbi/stop-cnn2d-exits/seed{seed}"
            out.append(
                Job(stop, "slbi", "stop", dense.net, seed, lr, part="stop", deps=[self.run_key(dense, seed, lr), path])
            )
            for kind in ("slbi", "magnitude", "random"):
                key = f"slbi/ticket-{kind}-cnn2d-exits/lr{lr:g}/seed{seed}"
                job = Job(key, "slbi", f"ticket-{kind}", dense.net, seed, lr, dense.config(lr, seed))
                job.part, job.deps = f"ticket-{kind}", [stop]
                out.append(job)
        return out

    # -- running --
    def run(self, jobs: int) -> None:
        started: set[str] = set()
        running: dict[str, threading.Thread] = {}
        while True:
            with self.lock:
                pending = [j for j in self.jobs() if j.key not in self.records and j.key not in started]
                ready = [j for j in pending if all(d in self.records for d in j.deps)]
            for t in [k for k, t in running.items() if not t.is_alive()]:
                running.pop(t)
            if not pending and not running:
                break
            while ready and len(running) < jobs:
                j = ready.pop(0)
                started.add(j.key)
                t = threading.Thread(target=self.one, args=(j,), daemon=True)
                running[j.key] = t
                t.start()
            time.sleep(2)

    def one(self, job: Job) -> None:
        """Run (or resume) one job in its own process, then record it; a finished run is only recorded."""
        run_dir = self.root / job.key
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = run_dir.parent / f"{run_dir.name}.log"
        finished = lambda: (run_dir / "metrics.json").exists() or (run_dir / "stop.json").exists()  # noqa: E731
        rc, t0 = 0, time.time()
        if not finished():
            me = [sys.executable, __file__, "--root", str(self.root), "--results", str(self.results)]
            me += ["--smoke"] if SMOKE else []
            if job.cfg is not None:
                cfg_file = run_dir.parent / f"{run_dir.name}.yaml"
                cfg_file.write_text(yaml.safe_dump(job.cfg, sort_keys=False))
            if job.part:  # the stopping point, or a ticket (our own net, trained by the Trainer)
                cmd = [*me, "--part", job.part, "--seed", str(job.seed), "--deps", *job.deps, "--out", job.key]
            elif (run_dir / "config.yaml").exists():
                cmd = [*ANYTRAIN, "train", "--resume", str(run_dir)]
            else:
                cmd = [*ANYTRAIN, "train", str(cfg_file), "--out", str(run_dir)]
            with open(log, "a") as f:
                f.write(f"$ {' '.join(cmd)}\n")
                f.flush()
                env = {**os.environ, **ENV}
                run = subprocess.run(["nice", "-n", "10", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                rc = run.returncode
                f.write(f"# exit {rc}, wall {time.time() - t0:.1f} s\n")
        ok = rc == 0 and finished()
        status = "ok" if ok else f"FAILED (exit {rc}, see {log})"
        print(f"{time.strftime('%H:%M:%S')} {job.key}: {status}, {time.time() - t0:.0f} s", flush=True)
        if ok:
            rec = record(job, run_dir)
            with self.lock:
                self.records[job.key] = rec
                self.write()

    def write(self) -> None:
        runs = sorted(self.records.values(), key=lambda r: (STUDY_ORDER.index(r["study"]), r["run_dir"]))
        out = runs + [verdict(s, runs) for s in STUDY_ORDER]
        self.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.results.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        os.replace(tmp, self.results)


# ---- records ---------------------------------------------------------------------------------------------
def tail_move(val_history: list[list[float]], exits: list[int]) -> float:
    """The largest move (max − min) of validation accuracy over the last 20 % of the epochs, over ``exits``."""
    tail = val_history[-max(2, math.ceil(0.2 * len(val_history))) :]
    return max(max(v[k] for v in tail) - min(v[k] for v in tail) for k in exits)


def converged(val_history: list[list[float]], exits: list[int]) -> bool:
    """Each of ``exits`` moves by less than CONVERGED (max − min) over the last 20 % of the epochs."""
    return tail_move(val_history, exits) < CONVERGED


def record(job: Job, run_dir: Path) -> dict[str, Any]:
    head = {"record": "run", "study": job.study, "arm": job.arm, "net": job.net, "seed": job.seed, "lr": job.lr}
    if job.part == "stop":
        return {**head, "run_dir": job.key, **json.loads((run_dir / "stop.json").read_text())}
    m = json.loads((run_dir / "metrics.json").read_text())
    h = json.loads((run_dir / "history.json").read_text())
    val = [e["val_acc"] for e in h]
    k = len(m["exits"])
    last_only = bool(job.cfg and job.cfg["rule"].get("last_only"))
    trained = [k - 1] if last_only else list(range(k))  # the exits the rule trains
    return {
        **head,
        "train_size": m["split_sizes"]["train"],
        "val_size": m["split_sizes"]["val"],
        "epochs": m["epochs"],
        "steps": m["steps"],
        "lr_grid": job.grid,
        "test_acc": [e["test"] for e in m["exits"]],
        "test_acc_selected": [e["test"] for e in m["selected"]["exits"]],
        "val_history": val,
        "val_score": statistics.fmean(val[-1][i] for i in trained),  # what the learning rate is chosen on
        "trained_exits": trained,
        "converged": converged(val, trained),
        "macs": [e["flops"] for e in m["exits"]],
        "auc": m["auc"],
        "budgeted": [
            {"budget": b["budget"], "test_acc": b["test"]["accuracy"], "mean_macs": b["test"]["mean_flops"]}
            for b in m["budgeted"]
        ],
        "seconds": sum(e["seconds"] for e in h),
        "cpu_seconds": [e.get("cpu_seconds") for e in h],
        "run_dir": job.key,
    }


# ---- SLBI parts (each in its own process: `claims.py --part stop|ticket-<kind>`) -------------------------
def _accuracy(net: Any, x: Any, y: Any) -> list[float]:
    """Per-exit accuracy in eval mode, in chunks; on a copy on the GPU when there is one (``net`` stays put)."""
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.eval()
    if dev.type != "cpu":
        net = copy.deepcopy(net).to(dev)
    right = None
    with torch.no_grad():
        for i in range(0, len(y), 1000):
            xb, yb = x[i : i + 1000].to(dev), y[i : i + 1000].to(dev)
            hits = torch.stack([(z.argmax(1) == yb).sum() for z in net(xb)])
            right = hits if right is None else right + hits
    return (right.double() / len(y)).tolist()


def _built(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """A run's config and freshly built components (the net at its initial weights: the trainer's seeding), on
    the CPU whatever the run's device (a ticket's Trainer moves it to the run's device)."""
    import torch

    from anytrain.config import load_config
    from anytrain.train.trainer import build_components

    cfg = load_config(run_dir / "config.yaml")
    return cfg, build_components(cfg, torch.device("cpu"))


def part_stop(root: Path, dense_dir: Path, path_dir: Path, out: Path) -> None:
    """The SLBI path's points (W* = P_supp(Γ)(W) at every snapshot: prunable channels removed, validation
    accuracy), the stopping point on validation, and W* there exported to a physically smaller net."""
    import torch

    from anytrain.sparsity import (
        count_macs,
        count_params,
        cpu_latency,
        export_pruned,
        stopping_point,
        zero_channel_plan,
    )
    from anytrain.train.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    _, c = _built(path_dir)
    net, opt, data = c["net"], c["optimizer"], c["data"]
    x1 = data.x_val[:1]
    per_epoch = json.loads((path_dir / "history.json").read_text())[0]["step"]
    points = []
    for ck in (path_dir / "checkpoints").glob("*.pt"):  # step_*.pt (claims.py), epoch_*.pt (claims_cifar.py)
        state = load_checkpoint(ck)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        star = opt.projected_model(net).eval()
        points.append(
            {
                "file": ck.name,
                "step": state["step"],
                "epoch": state["step"] / per_epoch,
                "removed": zero_channel_plan(star, x1).fraction(),
                "wstar_val_acc": _accuracy(star, data.x_val, data.y_val)[-1],
                "support": opt.epoch_metrics()["support/all"],
            }
        )
    points.sort(key=lambda p: p["step"])
    stop = stopping_point(points, TARGET_REMOVED)
    state = load_checkpoint(path_dir / "checkpoints" / stop["file"])
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    star = opt.projected_model(net).eval()
    small, plan = export_pruned(star, x1)
    convs = (torch.nn.Conv1d, torch.nn.Conv2d)

    def filters(m: Any) -> int:
        return sum(c.out_channels for c in m.stages.modules() if isinstance(c, convs))

    xb = data.x_test[:256]
    with torch.no_grad():
        err = max(float((a - b).abs().max()) for a, b in zip(star(xb), small(xb)))
    res = {
        "path_run": str(path_dir.relative_to(root)),
        "dense_run": str(dense_dir.relative_to(root)),
        "path": points,
        "stop": stop,
        "conv_filters_removed": 1.0 - filters(small) / filters(star),
        "channels_removed": plan.fraction(),
        "params": [count_params(star), count_params(small)],
        "macs": [count_macs(star, x1), count_macs(small, x1)],
        "latency_s_bs256": [cpu_latency(star, xb), cpu_latency(small, xb)],
        "max_abs_diff_vs_wstar": err,
        # reported only (the stopping point was chosen above, on validation)
        "wstar_test_acc": _accuracy(star, data.x_test, data.y_test),
        "exported_test_acc": _accuracy(small, data.x_test, data.y_test),
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "stop.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out / "stop.json")


def part_ticket(root: Path, kind: str, seed: int, stop_dir: Path, out: Path, cfg_file: Path) -> None:
    """Retrain a ticket of the stopping point's size: SLBI's support, the dense net's largest filters
    (magnitude) or random ones, in every coupled group the same count; rewound to the initial weights."""
    import torch

    from anytrain.config import load_config
    from anytrain.sparsity import magnitude_plan, make_ticket, random_plan, zero_channel_plan
    from anytrain.train.checkpoint import load_checkpoint
    from anytrain.train.trainer import Trainer

    torch.set_num_threads(1)
    rec = json.loads((stop_dir / "stop.json").read_text())
    path_dir = root / rec["path_run"]
    dense_dir = root / rec["dense_run"]
    _, c = _built(path_dir)
    x1 = c["data"].x_val[:1]
    net, opt = c["net"], c["optimizer"]
    init = copy.deepcopy(net)  # the initial weights: the path run and the dense run share the seed's initialisation
    state = load_checkpoint(path_dir / "checkpoints" / rec["stop"]["file"])
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    plan = zero_channel_plan(opt.projected_model(net).eval(), x1)
    if kind == "magnitude":
        dense = copy.deepcopy(init)
        dense.load_state_dict(load_checkpoint(dense_dir / "checkpoint.pt")["model"])
        plan = magnitude_plan(dense, plan, x1)
    elif kind == "random":
        plan = random_plan(plan, seed)
    ticket = make_ticket(init, plan, x1, rewind=True, seed=seed)
    cfg = load_config(cfg_file)
    Trainer(cfg, out, resume=(out / "config.yaml").exists(), net=ticket, data=c["data"]).fit()


# ---- verdicts --------------------------------------------------------------------------------------------
def paired(a: dict[int, float], b: dict[int, float], kind: str) -> dict[str, Any]:
    """``a`` − ``b`` over the seeds both have: mean, sample std, a one-sided 90 % t bound, and the outcome of
    a "better" claim (a > b) or a "matches" claim (a ≥ b − MARGIN); see the module docstring."""
    from scipy.stats import t as student

    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    res: dict[str, Any] = {"seeds": seeds, "a": _ms([a[s] for s in seeds]), "b": _ms([b[s] for s in seeds])}
    if len(d) < 2:
        return {**res, "outcome": "inconclusive", "why": f"{len(d)} paired seed(s)"}
    m, sd = statistics.fmean(d), statistics.stdev(d)
    half = float(student.ppf(0.9, len(d) - 1)) * sd / math.sqrt(len(d))
    lo, hi = m - half, m + half
    if kind == "better":
        outcome = "holds" if lo > 0 else "does not hold" if m <= 0 and hi < MARGIN else "inconclusive"
    else:
        outcome = "holds" if lo > -MARGIN else "does not hold" if hi < -MARGIN else "inconclusive"
    return {**res, "diff": {"mean": m, "std": sd, "lo90": lo, "hi90": hi}, "test": kind, "outcome": outcome}


def _ms(v: list[float]) -> dict[str, float] | None:
    if not v:
        return None
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}


def combine(parts: list[dict[str, Any]]) -> str:
    outs = [p["outcome"] for p in parts]
    return (
        "holds" if all(o == "holds" for o in outs) else "does not hold" if "does not hold" in outs else "inconclusive"
    )


def per_seed(runs: list[dict[str, Any]], study: str, arm: str, net: str, value: Any) -> dict[int, float]:
    """``value(record)`` of each seed of an arm at its chosen learning rate (the one seeds 1 and 2 ran at)."""
    mine = [r for r in runs if r["study"] == study and r["arm"] == arm and r["net"] == net]
    lrs = {r["lr"] for r in mine if r["seed"] > 0}
    if len(lrs) != 1:  # the arm's learning rate is not chosen yet (or nothing ran)
        return {}
    return {r["seed"]: value(r) for r in mine if r["lr"] in lrs}


def mean_exit(r: dict[str, Any]) -> float:
    return statistics.fmean(r["test_acc"])


def val_auc_steps(r: dict[str, Any]) -> float:
    """Mean over epochs of the mean validation accuracy over exits: the area under accuracy vs steps."""
    return statistics.fmean(statistics.fmean(v) for v in r["val_history"])


def verdict(study: str, runs: list[dict[str, Any]], nets: dict[str, Any] | None = None) -> dict[str, Any]:
    """The verdict record of one study from its run records; ``nets``: which nets it compares on
    (``VERDICT_NETS`` by default)."""
    nets = nets or VERDICT_NETS
    unconverged = sorted(r["run_dir"] for r in runs if r["study"] == study and r.get("converged") is False)
    parts: dict[str, dict[str, Any]] = {}
    if study == "osgd":
        claim = "OSGD gives anytime nets higher test accuracy, averaged over the exits, than joint training"
        a_all: dict[int, float] = {}
        b_all: dict[int, float] = {}
        for i, net in enumerate(nets["osgd"]):
            a = per_seed(runs, "osgd", "osgd", net, mean_exit)
            for other in ("joint", "sdn", "gradient-equilibrium"):
                b = per_seed(runs, "osgd", other, net, mean_exit)
                parts[f"osgd vs {other}, {net}, mean exit"] = paired(a, b, "better")
                if other == "joint":
                    a_all.update({10 * i + s: v for s, v in a.items()})
                    b_all.update({10 * i + s: v for s, v in b.items() if s in a})
            parts[f"osgd vs joint, {net}, exit 0"] = paired(
                per_seed(runs, "osgd", "osgd", net, lambda r: r["test_acc"][0]),
                per_seed(runs, "osgd", "joint", net, lambda r: r["test_acc"][0]),
                "better",
            )
        primary = paired(a_all, b_all, "better")  # (net, seed) pairs pooled: nets as blocks
        parts = {"osgd vs joint, all nets pooled, mean exit": primary, **parts}
        outcome = primary["outcome"] if len(a_all) == 3 * len(nets["osgd"]) else "inconclusive"
    elif study == "dgl":
        claim = "DGL (K = 4) matches end-to-end backprop at the last exit, within 1 point"
        last = lambda r: r["test_acc"][-1]  # noqa: E731
        a = per_seed(runs, "dgl", "dgl", nets["dgl"], last)
        parts["dgl vs backprop, last exit"] = paired(a, per_seed(runs, "dgl", "backprop", nets["dgl"], last), "matches")
        parts["dgl vs sgl, last exit"] = paired(a, per_seed(runs, "dgl", "sgl", nets["dgl"], last), "matches")
        outcome = parts["dgl vs backprop, last exit"]["outcome"]
    elif study == "curvature":
        claim = (
            "curvature correction with α = ½ trains faster than α = 1 and than SGD: a larger area under "
            "validation accuracy vs steps"
        )
        net = nets["curvature"]
        a = per_seed(runs, "curvature", "alpha=0.5", net, val_auc_steps)
        for other in ("alpha=1", "sgd", "adam"):
            parts[f"alpha=0.5 vs {other}, area under val acc vs steps"] = paired(
                a, per_seed(runs, "curvature", other, net, val_auc_steps), "better"
            )
        for other in ("alpha=1", "sgd", "adam"):
            parts[f"alpha=0.5 vs {other}, final test acc, mean exit"] = paired(
                per_seed(runs, "curvature", "alpha=0.5", net, mean_exit),
                per_seed(runs, "curvature", other, net, mean_exit),
                "better",
            )
        outcome = combine(
            [
                parts["alpha=0.5 vs alpha=1, area under val acc vs steps"],
                parts["alpha=0.5 vs sgd, area under val acc vs steps"],
            ]
        )
    else:
        claim = (
            "a ticket from the SLBI path with ≥ 50 % of prunable channels removed, retrained, matches the "
            "dense net within 1 point at the last exit, and beats magnitude- and random-pruned nets of its size"
        )
        last = lambda r: r["test_acc"][-1]  # noqa: E731
        dense = per_seed(runs, *nets["slbi"], last)
        tick = {
            k: {r["seed"]: last(r) for r in runs if r["arm"] == f"ticket-{k}"} for k in ("slbi", "magnitude", "random")
        }
        parts["ticket-slbi vs dense, last exit"] = paired(tick["slbi"], dense, "matches")
        parts["ticket-slbi vs ticket-magnitude"] = paired(tick["slbi"], tick["magnitude"], "better")
        parts["ticket-slbi vs ticket-random"] = paired(tick["slbi"], tick["random"], "better")
        outcome = combine(list(parts.values()))
    return {
        "record": "verdict",
        "study": study,
        "claim": claim,
        "compared": parts,
        "test": f"paired over seeds, one-sided 90 % t interval; 'matches' margin {MARGIN * 100:g} point",
        "outcome": outcome,
        "unconverged_runs": unconverged,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", nargs="+", choices=STUDY_ORDER, default=STUDY_ORDER)
    ap.add_argument("--root", type=Path, default=default_out("claims", "runs"), help="run directories")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--jobs", type=int, default=2, help="training processes at a time (one thread each)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the verdicts; start nothing")
    ap.add_argument("--smoke", action="store_true", help="2 epochs on 3,000 images: checks the machinery only")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--deps", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        SMOKE.update(epochs=2, data={"num_samples": 3000}, path_every=4)
    if args.part == "stop":
        part_stop(args.root, args.root / args.deps[0], args.root / args.deps[1], args.root / args.out)
        return
    if args.part:
        out = args.root / args.out
        cfg = out.parent / f"{out.name}.yaml"
        part_ticket(args.root, args.part.removeprefix("ticket-"), args.seed, args.root / args.deps[0], out, cfg)
        return
    suite = Suite(args.root, args.results, args.studies)
    if not args.report_only:
        suite.run(args.jobs)
    with suite.lock:
        suite.write()
    for v in json.loads(args.results.read_text()):
        if v["record"] == "verdict":
            print(f"{v['study']}: {v['outcome']} — {v['claim']}")


if __name__ == "__main__":
    main()
