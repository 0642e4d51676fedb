"""The four papers' claims on CIFAR-10 at the papers' sizes, on a GPU (issue 25, item 4): in pieces that each fit a
10-minute command, every piece resuming where the last one stopped.

    python benchmarks/claims_cifar.py --data-dir DATA_DIR                    # one piece of 540 s
    python benchmarks/claims_cifar.py --data-dir DATA_DIR --results benchmarks/claims/cifar10.json
    python benchmarks/claims_cifar.py --report-only      # verdicts, what is left, the estimate; trains nothing

``DATA_DIR`` holds ``cifar-10-batches-py/`` (or is it): anytrain's ``cifar10`` data set, ``data.data_dir``.
anytrain never downloads, and the device machine has no internet: the folder must already be there. Without a
CUDA device the script says so in one line and exits 0; without ``--data-dir``, or with no complete CIFAR-10
folder in it, it names what is missing in one line and exits 2.

**What runs.** ``claims.py``'s studies, arms, record format and verdicts, imported from it; only the nets and the
recipes change, to those of the papers' CIFAR-10 experiments (each a shipped config):

- ``osgd`` (Wan et al.): OSGD vs joint, SDN weighting and gradient equilibrium on ``nested-width-vgg`` (the
  recursively nested net) and on the branched pre-activation ResNet-56 with 3 exits
  (``configs/osgd-cifar10-nested-width-vgg.yaml``: 300 epochs; ``osgd-cifar10-preresnet56-exits.yaml``: 200
  epochs; SGD 0.1 with step decay, the common CIFAR recipe: the paper's own schedule is not confirmed). claims.py's
  third net, ``msdnet-small``, has no counterpart here; ``nested-depth-vgg`` and ``nested-width-depth-vgg``
  (7.5× and 26× the MACs of ``nested-width-vgg``) are left out for time.
- ``dgl`` (Belilovsky et al.): DGL (K = 4) vs backprop vs SGL on VGG-13 with the released MLP-SR heads, SGD 0.1,
  50 epochs, LR ×0.2 every 15 (``configs/dgl-cifar10-vgg13.yaml``, the paper's Table 2 setting); SGL at a constant
  learning rate, as in claims.py.
- ``curvature`` (Huh): α = ½ vs α = 1 vs SGD vs Adam on ``vgg13-exits``, 100 epochs, cosine
  (``configs/curvature-cifar10-vgg13.yaml``). The paper has no CIFAR experiment, so its epochs and the
  curvature lr 0.05 are anytrain's; SGD takes 0.1, Adam 1e-3 (its usual default).
- ``slbi`` (Fu et al.): on VGG-16, the dense net (SGD 0.1, 160 epochs, ×0.1 at 80 and 120: the released
  retraining recipe), the SLBI path (``configs/slbi-cifar10-vgg16.yaml``: 200 epochs at a constant lr 0.1, as the
  released lottery-ticket code; a snapshot every ``PATH_EVERY`` epochs), the stopping point on validation and three
  retrained tickets of its size (the dense recipe), by claims.py's ``--part stop|ticket-*``. Once a stopping point
  is recorded, the path's other snapshots are deleted (they are hundreds of MB each).

**Learning rates** are the papers' published values (the configs'), one per arm for every seed: there is no
learning-rate grid on the GPU. The grid chosen on validation is claims.py's CPU protocol. Everything else is
claims.py's: 3 seeds, 5,000 validation images carved from the 50,000 (45,000 train), the test set touched once
per run, the paired verdicts. Records carry ``dataset: cifar10`` and the device's name.

**Pieces.** Each run is an ordinary anytrain run directory under ``--root``. A piece takes the unfinished work in
order, seed 0 of every arm first (then seed 1, then seed 2; within a seed, claims.py's study order, cheapest
first), so every piece finishes something that counts. A run resumes from its last epoch checkpoint
(``anytrain train --resume``); at the piece's deadline the training process gets SIGINT (the trainer keeps its
last checkpoint: at most one epoch is lost) and SIGKILL if it has not left ``GRACE`` seconds later; SIGTERM to
this script does the same at once. What finished is recorded in ``--results`` (rewritten atomically), and the
piece prints what is left and how many more pieces it needs. The results root must survive between pieces: a
VGG-16 run directory holds about 170 MiB (checkpoint and ``best.pt``), an SLBI path snapshot about 225 MiB, so on
a device machine that is given back between pieces the root has to be copied away and back.

**Time.** No CIFAR step time has been measured on a GPU yet (``bench_cuda.py`` has not run on one): every figure
here is an estimate. Until a piece has measured an arm, the estimate assumes ``ASSUMED_MAC_RATE`` (10¹³
multiply-adds per second, a guess for an H100 on 32×32 images at batch 128) for 3× the forward MACs of each
training image and 1× of each validation image. At that rate, with 3 seeds: ``osgd`` 2.6 h, ``slbi`` 3.2 h
(tickets counted at the dense net's size, an upper bound), ``curvature`` 1.1 h, ``dgl`` 0.45 h; 7.4 hours in all,
55 pieces of 540 s. That leaves out the rules' own costs; with those measured on the CPU (``× joint time`` in
``benchmarks/results/throughput_cpu.md``: OSGD 1.7–2.4, SDN 1.5, gradient equilibrium 1.6, curvature 1.5, DGL 1.2)
it is about 9 hours, 67 pieces. Each piece replaces the assumption, arm by arm, with the wall time per epoch it
measured (start-up included) and scales arms not yet measured by their MACs from the measured ones.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

START = time.monotonic()  # a piece's clock starts here, before torch is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims  # noqa: E402
from _output import default_out  # noqa: E402

from anytrain.train.checkpoint import atomic_write_json, atomic_write_text  # noqa: E402

ROOT = claims.ROOT
DATASET = "cifar10"
# claims.py's net -> the paper-size CIFAR-10 net of the same kind, per study; and each net's recipe
NET_FOR = {
    ("osgd", "nested-width"): "nested-width-vgg",
    ("osgd", "cnn2d-exits"): "preresnet56-exits",
    ("dgl", "cnn2d-exits"): "vgg13-exits",
    ("curvature", "cnn2d-exits"): "vgg13-exits",
}
LEFT_OUT = {("osgd", "msdnet-small")}  # no paper-size counterpart
SLBI_NET = "vgg16-exits"
RECIPES = {
    ("osgd", "nested-width-vgg"): "configs/osgd-cifar10-nested-width-vgg.yaml",
    ("osgd", "preresnet56-exits"): "configs/osgd-cifar10-preresnet56-exits.yaml",
    ("dgl", "vgg13-exits"): "configs/dgl-cifar10-vgg13.yaml",
    ("curvature", "vgg13-exits"): "configs/curvature-cifar10-vgg13.yaml",
    ("slbi", SLBI_NET): "configs/slbi-cifar10-vgg16.yaml",
}
VERDICT_NETS: dict[str, Any] = {
    "osgd": [NET_FOR["osgd", "nested-width"], NET_FOR["osgd", "cnn2d-exits"]],
    "dgl": NET_FOR["dgl", "cnn2d-exits"],
    "curvature": NET_FOR["curvature", "cnn2d-exits"],
    "slbi": ("slbi", "sgd", SLBI_NET),
}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5.0e-4}
ADAM = {"name": "adam", "lr": 1.0e-3, "weight_decay": 0.0}
RETRAIN = {"epochs": 160, "schedule": {"name": "step", "milestones": [80, 120], "gamma": 0.1}}  # dense and tickets
PATH_EVERY = 5  # epochs between the SLBI path's snapshots
SEEDS = (0, 1, 2)
GRACE = 20.0  # seconds a training process gets to leave after SIGINT (at most)
ASSUMED_MAC_RATE = 1.0e13  # multiply-adds per second, until an epoch has been measured
STOP_GUESS = 180.0  # seconds of a stopping-point part, until one has been measured
QUIET = {"progress": False, "tensorboard": False, "plots": False}
SMOKE_NET = {"nested-width-vgg": "nested-width", "preresnet56-exits": "cnn2d-exits"}  # others: cnn2d-exits


@dataclass(frozen=True)
class Options:
    data_dir: str
    device: str = "auto"
    smoke: int = 0  # > 0: claims.py's small nets, this many epochs, batch 32 (checks the machinery only)


def cifar_arms() -> list[claims.Arm]:
    """claims.py's arms of the osgd, dgl and curvature studies on their CIFAR-10 nets."""
    out = []
    for arm in claims.arms():
        if (arm.study, arm.net) in LEFT_OUT:
            continue
        if (arm.study, arm.net) not in NET_FOR:
            raise ValueError(f"claims.py's arm {arm.key} has no CIFAR-10 net here; add it to NET_FOR or LEFT_OUT")
        out.append(replace(arm, net=NET_FOR[arm.study, arm.net]))
    return out


def recipe(study: str, net: str) -> dict[str, Any]:
    """The shipped config of (study, net), as a fresh dict."""
    return copy.deepcopy(_read_recipe(RECIPES[study, net]))


@functools.cache
def _read_recipe(path: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / path).read_text())


def optimizer(arm: claims.Arm, base: dict[str, Any]) -> dict[str, Any]:
    """The arm's optimizer at the recipe's published values (claims.py's arms name the family in ``grid``)."""
    mine = base["optimizer"]
    if arm.grid == "sgd":
        return dict(mine) if mine["name"] == "sgd" else dict(SGD)
    if arm.grid == "adam":
        return dict(ADAM)
    if mine["name"] != "curvature":
        raise ValueError(f"{arm.key}: the recipe of {arm.net} has no curvature optimizer")
    return {**mine, "alpha": arm.optimizer["alpha"]}


def run_config(study: str, net: str, seed: int, opts: Options, **parts: Any) -> dict[str, Any]:
    """A run's config: the recipe of (study, net), ``parts`` replacing whole sections (``epochs`` too)."""
    base = recipe(study, net)
    cfg: dict[str, Any] = {"seed": seed, **{k: base[k] for k in ("model", "rule", "optimizer", "schedule")}}
    cfg["data"] = {**base["data"], "data_dir": opts.data_dir, "val_size": "auto"}
    cfg["train"] = {**base["train"], **QUIET, "device": opts.device}
    epochs, heads = parts.pop("epochs", None), parts.pop("heads", {})
    cfg.update(parts)
    if epochs is not None:
        cfg["train"]["epochs"] = epochs
    if opts.device == "cpu":
        cfg["train"]["threads"] = 1
    if opts.smoke:  # claims.py's small net of the same kind, with its heads (the recipes name their own)
        cfg["model"] = {**claims.NETS[SMOKE_NET.get(net, "cnn2d-exits")], **heads}
        cfg["data"]["batch_size"] = 32
        cfg["train"]["epochs"] = opts.smoke
    return cfg


class Suite:
    """The job list (in order), the recorded results, one piece's scheduler, and the estimate of what is left."""

    def __init__(self, root: Path, results: Path, studies: list[str], seeds: list[int], opts: Options) -> None:
        self.root, self.results, self.studies, self.seeds, self.opts = root, results, studies, seeds, opts
        data = json.loads(results.read_text()) if results.exists() else []
        self.records: dict[str, dict[str, Any]] = {r["run_dir"]: r for r in data if r.get("record") == "run"}
        self.arms = cifar_arms()
        self.ledger_path = root / "timing.json"  # wall seconds and epochs each job's processes took
        self.ledger: dict[str, dict[str, float]] = (
            json.loads(self.ledger_path.read_text()) if self.ledger_path.exists() else {}
        )
        self.device_name = "cpu"
        macs = root / "macs.json"
        self._macs: dict[str, float] = json.loads(macs.read_text()) if macs.exists() else {}  # by model section
        self._models: dict[str, dict[str, Any]] = {}  # each arm's model section

    # -- the work, in order --
    def jobs(self, every: bool = False) -> list[claims.Job]:
        """The jobs of the chosen studies and seeds (``every``: of all of them), in the order they run."""
        out = []
        for seed in SEEDS if every else self.seeds:
            for study in (s for s in claims.STUDY_ORDER if every or s in self.studies):
                out += self.slbi_jobs(seed) if study == "slbi" else self.arm_jobs(study, seed)
        return out

    def arm_jobs(self, study: str, seed: int) -> list[claims.Job]:
        out = []
        for arm in (a for a in self.arms if a.study == study):
            base = recipe(study, arm.net)
            parts: dict[str, Any] = {"rule": arm.rule, "optimizer": optimizer(arm, base)}
            if arm.schedule == "none":
                parts["schedule"] = {"name": "none"}
            if arm.model:
                parts["heads"] = arm.model
            cfg = run_config(study, arm.net, seed, self.opts, **parts)
            lr = cfg["optimizer"]["lr"]
            key = claims.Suite.run_key(arm, seed, lr)
            out.append(claims.Job(key, study, arm.name, arm.net, seed, lr, cfg, grid=[lr]))
        return out

    def slbi_jobs(self, seed: int) -> list[claims.Job]:
        net, o = SLBI_NET, self.opts
        dense = run_config("slbi", net, seed, o, optimizer=dict(SGD), **RETRAIN)
        lr = dense["optimizer"]["lr"]
        path = run_config("slbi", net, seed, o)
        path["train"]["keep_every"] = 1 if o.smoke else PATH_EVERY
        plr = path["optimizer"]["lr"]
        dense_key = f"slbi/sgd-{net}/lr{lr:g}/seed{seed}"
        path_key = f"slbi/slbi-path-{net}/lr{plr:g}/seed{seed}"
        stop_key = f"slbi/stop-{net}/seed{seed}"
        out = [
            claims.Job(dense_key, "slbi", "sgd", net, seed, lr, dense, grid=[lr]),
            claims.Job(path_key, "slbi", "slbi-path", net, seed, plr, path, grid=[plr]),
            claims.Job(stop_key, "slbi", "stop", net, seed, plr, part="stop", deps=[dense_key, path_key]),
        ]
        for kind in ("slbi", "magnitude", "random"):
            key = f"slbi/ticket-{kind}-{net}/lr{lr:g}/seed{seed}"
            job = claims.Job(key, "slbi", f"ticket-{kind}", net, seed, lr, dense, grid=[lr])
            job.part, job.deps = f"ticket-{kind}", [stop_key]
            out.append(job)
        return out

    def pending(self) -> list[claims.Job]:
        return [j for j in self.jobs() if j.key not in self.records]

    # -- one piece --
    def piece(self, seconds: float, start: float) -> None:
        """Run jobs from ``start`` (a ``time.monotonic()`` reading) until ``seconds`` later at most."""
        grace = min(GRACE, 0.1 * seconds)
        stop_at = start + seconds - grace - min(10.0, 0.05 * seconds)  # SIGINT here; then leave, write, report
        done: list[str] = []
        failed: set[str] = set()
        interrupted = None
        try:
            while True:
                ready = [j for j in self.pending() if j.key not in failed and all(d in self.records for d in j.deps)]
                left = stop_at - time.monotonic()
                if not ready or left < max(0.05 * seconds, self.least_seconds(ready[0])):
                    break
                job = ready[0]
                status = self.run_job(job, stop_at, grace)
                if status == "done":
                    done.append(job.key)
                elif status == "interrupted":
                    interrupted = job
                    break
                else:
                    failed.add(job.key)
        except KeyboardInterrupt:  # SIGTERM or Ctrl-C between two jobs: what is recorded stays recorded
            print("piece: interrupted", flush=True)
        took = time.monotonic() - start
        print(f"piece: {took:.0f} s, {len(done)} finished, {len(failed)} failed", flush=True)
        if interrupted is not None:
            e, of = self.epochs_done(interrupted), self.epochs(interrupted)
            print(f"  stopped at the deadline: {interrupted.key}" + (f" (epoch {e} of {of} kept)" if of else ""))
        self.report(seconds)

    def run_job(self, job: claims.Job, stop_at: float, grace: float) -> str:
        """Run or resume one job until it finishes or ``stop_at``: ``done`` (recorded), ``interrupted`` or
        ``failed``."""
        run_dir = self.root / job.key
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = run_dir.parent / f"{run_dir.name}.log"
        rc, stopped = 0, False
        if not self.finished(run_dir):
            if job.cfg is not None:
                cfg_file = run_dir.parent / f"{run_dir.name}.yaml"
                cfg_file.write_text(yaml.safe_dump(job.cfg, sort_keys=False))
            if job.part:
                cmd = [sys.executable, claims.__file__, "--root", str(self.root), "--part", job.part]
                cmd += ["--seed", str(job.seed), "--deps", *job.deps, "--out", job.key]
            elif (run_dir / "config.yaml").exists():
                cmd = [*claims.ANYTRAIN, "train", "--resume", str(run_dir)]
            else:
                cmd = [*claims.ANYTRAIN, "train", str(cfg_file), "--out", str(run_dir)]
            env = {**os.environ, **(claims.ENV if self.opts.device == "cpu" else {})}
            before, t0 = self.epochs_done(job), time.monotonic()
            with open(log, "a") as f:
                f.write(f"$ {' '.join(cmd)}\n")
                f.flush()
                p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                rc, stopped = wait_until(p, stop_at, grace)
                f.write(f"# exit {rc}{' (stopped at the piece deadline)' if stopped else ''}\n")
            self.log_time(job, time.monotonic() - t0, self.epochs_done(job) - before)
        if self.finished(run_dir) and (rc == 0 or stopped):  # a run may finish just as the deadline comes
            self.record(job, run_dir)
            print(f"{time.strftime('%H:%M:%S')} {job.key}: ok", flush=True)
            return "done"
        if stopped:
            return "interrupted"
        print(f"{time.strftime('%H:%M:%S')} {job.key}: FAILED (exit {rc}, see {log})", flush=True)
        return "failed"

    @staticmethod
    def finished(run_dir: Path) -> bool:
        return (run_dir / "metrics.json").exists() or (run_dir / "stop.json").exists()

    def record(self, job: claims.Job, run_dir: Path) -> None:
        self.records[job.key] = {**claims.record(job, run_dir), "dataset": DATASET, "device": self.device_name}
        self.write()
        if job.part == "stop":  # the tickets need the stopping point's snapshot only
            stop = json.loads((run_dir / "stop.json").read_text())
            for ck in (self.root / stop["path_run"] / "checkpoints").glob("*.pt"):
                if ck.name != stop["stop"]["file"]:
                    ck.unlink()

    def write(self) -> None:
        runs = sorted(self.records.values(), key=lambda r: (claims.STUDY_ORDER.index(r["study"]), r["run_dir"]))
        verdicts = [{**claims.verdict(s, runs, nets=VERDICT_NETS), "dataset": DATASET} for s in claims.STUDY_ORDER]
        self.results.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.results, json.dumps(runs + verdicts, indent=1) + "\n")

    # -- time --
    def log_time(self, job: claims.Job, seconds: float, epochs: int) -> None:
        e = self.ledger.setdefault(job.key, {"seconds": 0.0, "epochs": 0})
        e["seconds"] += seconds
        e["epochs"] += max(0, epochs)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.ledger_path, self.ledger)

    def epochs(self, job: claims.Job) -> int:
        return int(job.cfg["train"]["epochs"]) if job.cfg is not None else 0

    def epochs_done(self, job: claims.Job) -> int:
        h = self.root / job.key / "history.json"
        return len(json.loads(h.read_text())) if h.exists() else 0

    def measured(self) -> dict[str, float]:
        """Seconds per epoch of each arm (``study/arm-net``) whose processes have trained at least one epoch."""
        per: dict[str, list[float]] = {}
        for key, e in self.ledger.items():
            if e["epochs"] > 0:
                arm = key.split("/lr")[0]
                per.setdefault(arm, []).append(e["seconds"] / e["epochs"])
        return {arm: statistics.median(v) for arm, v in per.items()}

    def stop_seconds(self) -> float:
        """Seconds of a stopping-point part: measured, or ``STOP_GUESS``."""
        stops = [e["seconds"] for k, e in self.ledger.items() if "/stop-" in k and e["seconds"] > 0]
        return statistics.median(stops) if stops else STOP_GUESS

    def least_seconds(self, job: claims.Job) -> float:
        """What a job needs to be worth starting: one epoch as measured (nothing if unmeasured), a whole
        stopping-point part."""
        return self.stop_seconds() if job.part == "stop" else self.epoch_seconds(job, measured_only=True)

    def epoch_seconds(self, job: claims.Job, measured_only: bool = False) -> float:
        """Estimated seconds per epoch of a training job (0 for a part, or when unmeasured and ``measured_only``)."""
        if job.cfg is None:
            return 0.0
        m = self.measured()
        arm = job.key.split("/lr")[0]
        if arm in m or measured_only:
            return m.get(arm, 0.0)
        per_mac = [s / self.macs(a) for a, s in m.items() if a in self.models()]  # seconds per epoch and MAC
        if per_mac:
            return statistics.median(per_mac) * self.macs(arm)
        images = 3 * 45_000 + 5_000  # one epoch's training (forward and backward) and validation, in forward passes
        return images * self.macs(arm) / ASSUMED_MAC_RATE

    def models(self) -> dict[str, dict[str, Any]]:
        """Each arm's model section (``study/arm-net``: ``model``), of every study and seed."""
        if not self._models:
            for j in self.jobs(every=True):
                if j.cfg is not None:
                    self._models.setdefault(j.key.split("/lr")[0], j.cfg["model"])
        return self._models

    def macs(self, arm: str) -> float:
        """Multiply-adds per image of an arm's net (every exit), from its job config."""
        key = json.dumps(self.models()[arm], sort_keys=True)
        if key not in self._macs:
            import torch

            from anytrain.config import ModelConfig
            from anytrain.nets import build_model
            from anytrain.sparsity import count_macs

            m = ModelConfig.from_dict(self.models()[arm])
            net = build_model(m.name, in_shape=(3, 32, 32), num_classes=10, **m.kwargs()).eval()
            self._macs[key] = float(count_macs(net, torch.zeros(1, 3, 32, 32)))
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.root / "macs.json", self._macs)
        return self._macs[key]

    def macs_all(self) -> None:
        for j in self.pending():
            if j.cfg is not None:
                self.macs(j.key.split("/lr")[0])

    def report(self, piece_seconds: float) -> None:
        """What is left, by study and seed, and the pieces it needs."""
        todo = self.pending()
        if not todo:
            print("all recorded: nothing left")
            return
        stop, m = self.stop_seconds(), self.measured()
        total, by_study = 0.0, {}
        for j in todo:
            s = stop if j.part == "stop" else self.epoch_seconds(j) * (self.epochs(j) - self.epochs_done(j))
            total += s
            by_study[j.study] = by_study.get(j.study, 0.0) + s
        seeds = {s: sum(j.seed == s for j in todo) for s in self.seeds}
        print(f"left: {len(todo)} jobs (" + ", ".join(f"seed {s}: {n}" for s, n in seeds.items()) + ")")
        for study, s in by_study.items():
            print(f"  {study}: about {s / 3600:.2f} h")
        how = f"measured: {len(m)} of the arms, the rest scaled by MACs" if m else "assumed rate: nothing measured"
        usable = max(1.0, 0.9 * piece_seconds)
        print(f"about {total / 3600:.2f} device-hours ({how}): {math.ceil(total / usable)} more pieces")


def wait_until(p: subprocess.Popen[bytes], stop_at: float, grace: float) -> tuple[int, bool]:
    """Wait for ``p``; at ``stop_at`` (or when this script is interrupted) send it SIGINT, and SIGKILL after
    ``grace`` seconds. Returns (exit status, whether it was stopped)."""
    try:
        return p.wait(timeout=max(0.0, stop_at - time.monotonic())), False
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    p.send_signal(signal.SIGINT)
    try:
        return p.wait(timeout=grace), True
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait(), True


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # stop the running job as at the deadline, record, report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="the folder holding cifar-10-batches-py/ (anytrain's data.data_dir)")
    ap.add_argument("--piece-seconds", type=float, default=540.0, help="stop cleanly within this (default 540)")
    ap.add_argument("--studies", nargs="+", choices=claims.STUDY_ORDER, default=claims.STUDY_ORDER)
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), choices=SEEDS)
    ap.add_argument("--root", type=Path, default=default_out("claims_cifar", "runs"), help="run directories")
    ap.add_argument("--results", type=Path, default=default_out("claims_cifar", "results.json"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the verdicts and print what is left")
    ap.add_argument("--device", default="auto", help=argparse.SUPPRESS)  # cpu: the CPU test of the machinery
    ap.add_argument("--smoke", type=int, default=0, metavar="EPOCHS", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.piece_seconds <= 0:
        ap.error("--piece-seconds must be positive")
    return a


def main(argv: list[str] | None = None, start: float | None = None) -> int:
    """One piece (or, with ``--report-only``, the report); ``start``: when the piece's clock started."""
    a = parse_args(argv)
    data_dir = str(Path(a.data_dir).resolve()) if a.data_dir else ""
    suite = Suite(a.root, a.results, a.studies, a.seeds, Options(data_dir, a.device, a.smoke))
    if a.report_only:
        suite.write()
        suite.report(a.piece_seconds)
        return 0
    import torch

    if a.device != "cpu" and not torch.cuda.is_available():
        print(f"claims_cifar: no CUDA device available (torch {torch.__version__}); nothing run, nothing written")
        return 0
    from anytrain.data._cifar import find_cifar_dir
    from anytrain.registry import ConfigError

    if not a.data_dir:
        print("claims_cifar: needs --data-dir DIR, a folder holding cifar-10-batches-py/", file=sys.stderr)
        return 2
    try:
        find_cifar_dir(DATASET, data_dir)
    except ConfigError as e:
        print(f"claims_cifar: {e}", file=sys.stderr)
        return 2
    suite.device_name = torch.cuda.get_device_name() if a.device != "cpu" else "cpu"
    signal.signal(signal.SIGTERM, _sigterm)
    suite.macs_all()  # before the clock runs short: the estimate at the end needs them
    suite.piece(a.piece_seconds, time.monotonic() if start is None else start)
    return 0


if __name__ == "__main__":
    sys.exit(main(start=START))
