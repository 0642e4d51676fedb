"""Training throughput against a plain PyTorch loop and the machine's float32 matmul peak (issue 21).

In one process, side by side: images per second and achieved training multiply-adds per second
(``3 × forward MACs × images/s``, the forward MACs of every stage and every exit head) as a fraction of the
float32 matmul peak measured in the same run (a 2048² matmul, best of several windows, re-measured before
each net), for

- ``plain``: a hand-written loop (``net(x)``, the sum of the exit losses, ``backward``, ``torch.optim.SGD``, a
  cosine schedule) over the same in-memory batches;
- ``joint``: the ``Trainer`` with ``rule: joint`` (its real epoch loop: ``Trainer.fit``; the figure is the
  second epoch's ``seconds`` from ``history.json``, so start-up, evaluation and checkpoints are not counted);
- ``rules`` / ``optimizers``: every gradient rule (with sgd) and every optimizer (with joint) in the Trainer;
- ``precision``: bf16 / fp16 / ``train.compile`` / ``train.channels_last`` rows, run when the config has
  those keys (``train.precision`` …) and reported as not available on this branch otherwise.

Settings (``--sections``): ``fashion`` — Fashion-MNIST batches of 256 for the default net (``nested-width``),
``cnn2d-exits``, ``nested-depth``, ``nested-width-depth`` and ``msdnet-small`` (``--nets`` picks some);
``default`` — the default run as shipped (MNIST-1D, ``nested-width``, OSGD, batch 128) and, on the default net
at batch 128, the Fashion-MNIST epoch estimate (the timed window's images/s extrapolated to the 55,000
training images of ``anytrain train --set data.name=fashion-mnist``); ``default-run`` — the whole default run
(``Trainer.fit`` of the default config, 30 epochs), timed end to end.

Each row times ``--steps`` optimizer steps (after an untimed warm-up epoch of as many), a few seconds each.
Results accumulate in ``OUT/throughput.json`` (a row already there is skipped unless ``--force``), and the
table is rewritten to ``OUT/throughput.md`` after every row, so an interrupted run resumes where it stopped.

    python benchmarks/bench_throughput.py --out /tmp/anytrain-throughput            # the whole table, ~15 min
    python benchmarks/bench_throughput.py --sections fashion --nets cnn2d-exits --groups plain joint
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import default_out  # noqa: E402

FASHION_BATCH = 256
DEFAULT_OUT = default_out("throughput")
QUIET = ["train.progress=false", "train.tensorboard=false", "train.plots=false"]
SGD = ["optimizer.name=sgd", "optimizer.lr=0.1", "optimizer.momentum=0.9", "optimizer.weight_decay=5.0e-4"]
# Fashion-MNIST nets: the configs of benchmarks/bench_fashion.py (model section), at batch 256.
NETS: dict[str, list[str]] = {
    "nested-width": ["model.name=nested-width", "model.stages=4", "model.width=8"],
    "cnn2d-exits": ["model.name=cnn2d-exits", "model.width=16", "model.exits=4"],
    "nested-depth": ["model.name=nested-depth"],
    "nested-width-depth": ["model.name=nested-width-depth"],
    "msdnet-small": [
        "model.name=msdnet",
        "model.blocks=4",
        "model.base=1",
        "model.step=1",
        "model.scales=3",
        "model.channels=8",
        "model.growth=4",
        "model.bottleneck=false",
        "model.head_channels=16",
    ],
}
RULES: dict[str, list[str]] = {
    "weighted": ["rule.name=weighted", "rule.weights=[0.1,0.2,0.3,0.4]"],
    "adaloss": ["rule.name=adaloss"],
    "sdn": ["rule.name=sdn"],
    "gradient-equilibrium": ["rule.name=gradient-equilibrium"],
    "osgd": ["rule.name=osgd"],
    "osgd amortize=4": ["rule.name=osgd", "rule.amortize=4"],
    "torchjd:UPGrad": ["rule.name=torchjd:UPGrad"],
    "torchjd:PCGrad": ["rule.name=torchjd:PCGrad"],
    "dgl": ["rule.name=dgl"],
    "sgl": ["rule.name=sgl", "train.epochs=4"],  # one epoch per module; the 2nd trains module 1
}
OPTIMIZERS: dict[str, list[str]] = {
    "adam": ["optimizer.name=adam", "optimizer.lr=0.001"],
    "adamw": ["optimizer.name=adamw", "optimizer.lr=0.001"],
    "slbi": ["optimizer.name=slbi"],
    "curvature": ["optimizer.name=curvature"],
}
# (row label, config overrides, the config key that must exist, a 2-D-only option)
PRECISION: list[tuple[str, list[str], str, bool]] = [
    ("bf16", ["train.precision=bf16"], "precision", False),
    ("fp16", ["train.precision=fp16"], "precision", False),
    ("compile", ["train.compile=true"], "compile", False),
    ("channels-last", ["train.channels_last=true"], "channels_last", True),
]
GROUPS = ("plain", "joint", "rules", "optimizers", "precision")
SECTIONS = ("fashion", "default", "default-run")
# Targets of issue 21 (fractions of the measured peak; ratios to joint; seconds).
PEAK_TARGET = 0.40
TRAINER_TARGET = 1.05
OSGD_TARGET = {"osgd": 1.6, "osgd amortize=4": 1.15}
FASHION_EPOCH_TARGET = 120.0
DEFAULT_RUN_TARGET = 30.0
FASHION_TRAIN_IMAGES = 55_000  # 60,000 minus the 5,000 validation images of data.val_size: auto


@dataclasses.dataclass
class Row:
    """One measurement: ``kind`` is ``plain`` (hand-written loop) or ``trainer``."""

    section: str
    net: str
    label: str
    kind: str
    overrides: list[str]
    needs: str | None = None  # a train.* config key this row needs

    @property
    def key(self) -> str:
        return f"{self.section}/{self.net}/{self.label}"


def train_keys() -> set[str]:
    """The ``train.*`` config keys this branch knows."""
    from anytrain.config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def plan_rows(sections: Sequence[str], nets: Sequence[str], groups: Sequence[str]) -> list[Row]:
    """The rows of the table, in order. Every net gets ``plain``, ``joint``, OSGD exact and amortized (with
    ``rules``) and ``precision``; every rule and every optimizer runs on the default net (``nested-width``).
    Unknown section, net or group names are a one-line ``ValueError``."""
    for what, got, known in (("section", sections, SECTIONS), ("net", nets, NETS), ("group", groups, GROUPS)):
        bad = [g for g in got if g not in known]
        if bad:
            raise ValueError(f"unknown {what} {bad[0]!r}; known: {', '.join(known)}")
    rows: list[Row] = []

    def add(section: str, net: str, base: list[str], every_rule: bool) -> None:
        if "plain" in groups:
            rows.append(Row(section, net, "plain loop", "plain", base + ["rule.name=joint"]))
        if "joint" in groups:
            rows.append(Row(section, net, "joint", "trainer", base + ["rule.name=joint"]))
        if "rules" in groups:
            for label, o in RULES.items():
                if every_rule or label.startswith("osgd"):
                    rows.append(Row(section, net, label, "trainer", base + o))
        if "optimizers" in groups and every_rule:
            for label, o in OPTIMIZERS.items():
                own = [b for b in base if not b.startswith("optimizer.")]  # not sgd's momentum and weight decay
                rows.append(Row(section, net, f"joint + {label}", "trainer", own + ["rule.name=joint"] + o))
        if "precision" in groups:
            for label, o, key, two_d in PRECISION:
                if not two_d or section == "fashion":
                    rows.append(Row(section, net, label, "trainer", base + ["rule.name=joint"] + o, needs=key))

    if "fashion" in sections:
        for net in nets:
            base = ["data.name=fashion-mnist", f"data.batch_size={FASHION_BATCH}", *SGD, *NETS[net]]
            add("fashion", net, base, every_rule=net == "nested-width")
    if "default" in sections:  # the default config as shipped (its rule is osgd)
        add("default", "nested-width", [], every_rule=False)
        fashion_default = ["data.name=fashion-mnist", "rule.name=osgd"]  # `anytrain train --set data.name=...`
        rows.append(Row("default", "nested-width", "fashion epoch (osgd, batch 128)", "trainer", fashion_default))
    if "default-run" in sections:
        rows.append(Row("default-run", "nested-width", "default run (30 epochs)", "full", []))
    return rows


# ---- measurement ------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, seconds: float = 1.0, n: int = 2048) -> float:
    """Multiply-adds per second of an ``n×n`` float32 matmul: the best of several short windows."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    torch.mm(a, b, out=c)
    sync(device)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        reps = 4 if device.type == "cpu" else 50
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        sync(device)
        best = max(best, reps * n**3 / (time.perf_counter() - t))
    return best


def subset(bundle: Any, n_train: int, n_eval: int) -> Any:
    """The first ``n_train`` training images and ``n_eval`` validation and test images of a ``DataBundle``:
    the timed window sees real images; evaluation (not timed) stays short."""
    return dataclasses.replace(
        bundle,
        x_train=bundle.x_train[:n_train],
        y_train=bundle.y_train[:n_train],
        x_val=bundle.x_val[:n_eval] if bundle.x_val is not None else None,
        y_val=bundle.y_val[:n_eval] if bundle.y_val is not None else None,
        x_test=bundle.x_test[:n_eval],
        y_test=bundle.y_test[:n_eval],
    )


def load_data(cfg: Any, steps: int) -> Any:
    """The row's data: Fashion-MNIST cut to ``steps`` batches per epoch; MNIST-1D as shipped."""
    from anytrain.train.trainer import data_from_config

    bundle = data_from_config(cfg)
    if cfg.data.name == "fashion-mnist":
        bundle = subset(bundle, steps * cfg.data.batch_size, 256)
    return bundle


def forward_macs(net: Any, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one training forward pass for one sample: every stage and every exit head."""
    stage, head = net.flops_breakdown(input_shape)
    return int(sum(stage) + sum(head))


def time_plain(cfg: Any, data: Any, device: torch.device) -> float:
    """Seconds of one epoch of the hand-written loop (after an untimed warm-up epoch)."""
    from anytrain.train.trainer import model_from_config

    torch.manual_seed(cfg.seed)
    net = model_from_config(cfg, data).to(device).train()
    o = cfg.optimizer
    opt = torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum or 0.0, weight_decay=o.weight_decay or 0.0)
    bs = cfg.data.batch_size
    x_all, y_all = data.x_train.to(device), data.y_train.to(device)
    steps = len(y_all) // bs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 2 * steps)
    seconds = 0.0
    for _ in range(2):
        perm = torch.randperm(len(y_all), device=device)
        sync(device)
        t = time.perf_counter()
        total = torch.zeros((), device=device)
        for i in range(steps):
            idx = perm[i * bs : (i + 1) * bs]
            x, y = x_all[idx], y_all[idx]
            opt.zero_grad(set_to_none=True)
            loss = sum(F.cross_entropy(z, y) for z in net(x))
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
            total += loss.detach()  # type: ignore[union-attr]
        total.item()  # waits for the last step
        seconds = time.perf_counter() - t
    return seconds


def time_trainer(cfg: Any, data: Any, out: Path) -> tuple[float, int]:
    """Seconds of the Trainer's second epoch (its own clock: history.json) and the epoch's steps."""
    from anytrain.train import Trainer

    tr = Trainer(cfg, out, data=data)
    tr.fit()
    return float(tr.history[-1]["seconds"]), tr.steps_per_epoch


def measure(row: Row, steps: int, device: torch.device, threads: int, work: Path) -> dict[str, Any]:
    """Run one row; returns its figures (or ``status``: why it did not run)."""
    from anytrain.config import load_config
    from anytrain.train.trainer import model_from_config

    if row.needs is not None and row.needs not in train_keys():
        return {"status": f"not available on this branch (no train.{row.needs})"}
    dev = [f"train.device={device.type}", f"train.threads={threads}"]
    if row.kind == "full":
        cfg = load_config(None, [*QUIET, *dev, *row.overrides])
        from anytrain.train import Trainer

        t = time.perf_counter()
        tr = Trainer(cfg, work / "full")
        tr.fit()
        wall = time.perf_counter() - t
        secs = [h["seconds"] for h in tr.history]
        return {"seconds": wall, "train_seconds": sum(secs), "epochs": len(secs), "status": "ok"}
    cfg = load_config(None, [*QUIET, *dev, "train.epochs=2", *row.overrides])
    data = load_data(cfg, steps)
    net = model_from_config(cfg, data)
    macs = forward_macs(net, data.input_shape)
    if row.kind == "plain":
        seconds = time_plain(cfg, data, device)
        n_steps = len(data.y_train) // cfg.data.batch_size
    else:
        seconds, n_steps = time_trainer(cfg, data, work / "run")
    images = n_steps * cfg.data.batch_size
    return {
        "status": "ok",
        "batch": cfg.data.batch_size,
        "steps": n_steps,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "forward_macs": macs,
        "train_macs_per_s": 3 * macs * images / seconds,
    }


# ---- the table --------------------------------------------------------------------------------------------
def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def build_table(results: dict[str, dict[str, Any]], peak: float) -> str:
    """The markdown table of ``results`` (keyed by ``Row.key``): per row images/s, fraction of ``peak``, ratio
    to the Trainer's joint row of the same net; then the issue's targets, each met or not."""
    lines = [
        f"float32 matmul peak measured in this run: {peak / 1e9:.1f} G multiply-adds/s",
        "",
        "| setting | net | row | batch | images/s | train MAC/s | of peak | × joint time | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        section, net, label = key.split("/", 2)
        if r.get("status") != "ok":
            lines.append(f"| {section} | {net} | {label} | | {r.get('status', '?')} | | | | |")
            continue
        if "images_per_s" not in r:  # the whole default run
            lines.append(
                f"| {section} | {net} | {label} | 128 | {r['seconds']:.1f} s in all "
                f"({r['train_seconds']:.1f} s training) | | | | {r.get('load', 0):.1f} |"
            )
            continue
        joint = results.get(f"{section}/{net}/joint", {})
        same = joint.get("images_per_s") and joint.get("batch") == r["batch"] and "epoch" not in label
        ratio = f"{joint['images_per_s'] / r['images_per_s']:.2f}" if same else "–"
        lines.append(
            f"| {section} | {net} | {label} | {r['batch']} | {r['images_per_s']:.0f} | "
            f"{r['train_macs_per_s'] / 1e9:.2f} G | {r['train_macs_per_s'] / peak:.0%} | {ratio} | "
            f"{r.get('load', 0):.1f} |"
        )
    lines += ["", "| target | measured | |", "|---|---|---|"]
    for key, r in results.items():
        section, net, label = key.split("/", 2)
        if r.get("status") != "ok":
            continue
        if label in ("joint", "plain loop") and "train_macs_per_s" in r:
            frac = r["train_macs_per_s"] / peak
            ok = _met(frac >= PEAK_TARGET)
            lines.append(f"| ≥ {PEAK_TARGET:.0%} of peak ({section}, {net}, {label}) | {frac:.0%} | {ok} |")
        joint = results.get(f"{section}/{net}/joint", {})
        if label == "plain loop" and joint.get("status") == "ok":
            ratio = r["images_per_s"] / joint["images_per_s"]
            lines.append(
                f"| Trainer ≤ {TRAINER_TARGET:.2f}× plain loop time ({section}, {net}) | {ratio:.2f}× | "
                f"{_met(ratio <= TRAINER_TARGET)} |"
            )
        if label in OSGD_TARGET and joint.get("status") == "ok":
            ratio = joint["images_per_s"] / r["images_per_s"]
            lim = OSGD_TARGET[label]
            lines.append(f"| {label} ≤ {lim}× joint ({section}, {net}) | {ratio:.2f}× | {_met(ratio <= lim)} |")
        if label.startswith("fashion epoch"):
            est = FASHION_TRAIN_IMAGES / r["images_per_s"]
            lines.append(
                f"| one Fashion-MNIST epoch, default net + OSGD ≤ {FASHION_EPOCH_TARGET:.0f} s (from the timed "
                f"window) | {est:.0f} s | {_met(est <= FASHION_EPOCH_TARGET)} |"
            )
        if label.startswith("default run"):
            s = r["seconds"]
            lines.append(f"| default run ≤ {DEFAULT_RUN_TARGET:.0f} s | {s:.1f} s | {_met(s <= DEFAULT_RUN_TARGET)} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, state: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "throughput.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, out / "throughput.json")
    peak = max(state["peaks"]) if state["peaks"] else math.nan
    head = f"{state['machine']}; torch {state['torch']}; device {state['device']}; threads {state['threads']}\n\n"
    (out / "throughput.md").write_text(head + build_table(state["rows"], peak))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), metavar="S", help=", ".join(SECTIONS))
    ap.add_argument("--nets", nargs="+", default=list(NETS), metavar="NET", help=", ".join(NETS))
    ap.add_argument(
        "--groups", nargs="+", default=["plain", "joint", "rules", "optimizers", "precision"], metavar="G",
        help=f"{', '.join(GROUPS)} (every rule and optimizer on the default net; OSGD on every net)",
    )  # fmt: skip
    ap.add_argument("--labels", nargs="+", default=None, metavar="ROW", help="only the rows with these labels")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per row (after as many warm-up steps)")
    ap.add_argument("--repeats", type=int, default=1, help="measure every row this many times, round robin (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--force", action="store_true", help="re-run rows already in OUT/throughput.json")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.threads < 1 or a.repeats < 1:
        ap.error("--steps, --threads and --repeats must be at least 1")
    try:
        plan_rows(a.sections, a.nets, a.groups)
    except ValueError as e:
        ap.error(str(e))
    return a


def merge_repeat(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A row measured again: images/s (and what follows from it) become the median over every repetition
    (``samples``); the load is the mean."""
    if old.get("status") != "ok" or new.get("status") != "ok" or "images_per_s" not in new:
        return {**new, "samples": [new["images_per_s"]]} if "images_per_s" in new else new
    samples = [*old.get("samples", [old["images_per_s"]]), new["images_per_s"]]
    ips = statistics.median(samples)
    images = new["steps"] * new["batch"]
    loads = old.get("load", new["load"]) * (len(samples) - 1) + new["load"]
    return {
        **new,
        "samples": samples,
        "images_per_s": ips,
        "seconds": images / ips,
        "train_macs_per_s": 3 * new["forward_macs"] * ips,
        "load": loads / len(samples),
    }


def run(a: argparse.Namespace, rows: list[Row] | None = None, deadline: float | None = None) -> dict[str, Any]:
    """Measure ``rows`` (default: the plan of ``a``), appending to ``a.out``; rows left when
    ``time.perf_counter()`` passes ``deadline`` are recorded as not run."""
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    path = a.out / "throughput.json"
    state: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"rows": {}, "peaks": []}
    state.update(
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        torch=torch.__version__,
        device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        threads=a.threads,
    )
    last_net = None
    if rows is None:
        rows = [r for r in plan_rows(a.sections, a.nets, a.groups) if not a.labels or r.label in a.labels]
    if a.force:
        for row in rows:
            state["rows"].pop(row.key, None)
    for rep in range(a.repeats):  # round robin: load that drifts hits every row alike
        for row in rows:
            old = state["rows"].get(row.key, {})
            if old.get("status") == "ok" and len(old.get("samples", [0.0])) > rep:
                continue
            if deadline is not None and time.perf_counter() > deadline:
                state["rows"].setdefault(row.key, {"status": "not run (time budget)"})
                continue
            if row.net != last_net or not state["peaks"]:
                state["peaks"].append(matmul_peak(device))
                last_net = row.net
            with tempfile.TemporaryDirectory(dir=a.out) as work:
                try:
                    r = measure(row, a.steps, device, a.threads, Path(work))
                except Exception as e:  # a row that fails is reported, the others still run
                    r = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
            r["load"] = os.getloadavg()[0]
            state["rows"][row.key] = merge_repeat(old, r)
            r = state["rows"][row.key]
            shown = f"{r['images_per_s']:.0f} images/s" if "images_per_s" in r else r.get("status")
            print(f"{row.key:60s} {shown}", flush=True)
            write_report(a.out, state)
    write_report(a.out, state)
    return state


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    run(a)
    print(f"wrote {a.out / 'throughput.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
