"""benchmarks/claims_cifar.py: the CIFAR-10 claims on a GPU, in pieces. Checked here on the CPU: the plan (the
papers' recipes, seed 0 first), the verdicts on the CIFAR nets, the one-line refusals, and pieces on a small
generated CIFAR-10 folder that stop at their deadline and resume."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from benchmark_modules import load

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


claims = load("claims")
cc = load("claims_cifar")


def fake_cifar10(root: Path, per_batch: int = 40, test: int = 40) -> Path:
    """A cifar-10-batches-py folder of random images in the official pickle layout (protocol 2, bytes keys)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]:
        batch = {b"labels": rng.integers(0, 10, n).tolist(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def published(config: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / config).read_text())


# ---- the plan ----------------------------------------------------------------------------------------------
def test_the_plan_runs_claims_arms_on_the_papers_nets_with_their_published_recipes(tmp_path):
    suite = cc.Suite(tmp_path / "runs", tmp_path / "r.json", claims.STUDY_ORDER, [0, 1, 2], cc.Options("/data"))
    jobs = suite.jobs()
    assert len({j.key for j in jobs}) == len(jobs)
    seeds = [j.seed for j in jobs]
    assert seeds == sorted(seeds)  # seed 0 of every arm first, then 1, then 2
    # every arm of claims.py but msdnet's, by study and name, each with 3 seeds
    want = {(a.study, a.name) for a in claims.arms() if a.net != "msdnet-small"}
    want |= {("slbi", n) for n in ("sgd", "slbi-path", "stop", "ticket-slbi", "ticket-magnitude", "ticket-random")}
    got: dict[tuple[str, str], list[int]] = {}
    for j in jobs:
        got.setdefault((j.study, j.arm), []).append(j.seed)
    assert set(got) == want
    assert all(sorted(set(s)) == [0, 1, 2] for s in got.values())
    dgl, curv = published("dgl-cifar10-vgg13.yaml"), published("curvature-cifar10-vgg13.yaml")
    slbi, osgd_vgg = published("slbi-cifar10-vgg16.yaml"), published("osgd-cifar10-nested-width-vgg.yaml")
    osgd_res = published("osgd-cifar10-preresnet56-exits.yaml")
    from anytrain.config import RunConfig

    for j in (j for j in jobs if j.cfg is not None):
        RunConfig.from_dict(j.cfg)  # every run's config is valid as written
        assert j.cfg["data"] == {**j.cfg["data"], "name": "cifar10", "data_dir": "/data", "val_size": "auto"}
        o, t = j.cfg["optimizer"], j.cfg["train"]
        assert j.lr == o["lr"] and j.cfg["seed"] == j.seed
        if j.study == "dgl":
            assert j.cfg["model"] == dgl["model"] and t["epochs"] == 50 and o == dgl["optimizer"]
            assert j.cfg["schedule"] == (dgl["schedule"] if j.arm != "sgl" else {"name": "none"})
        elif j.study == "curvature":
            assert j.cfg["model"] == curv["model"] and t["epochs"] == 100 and j.cfg["schedule"] == curv["schedule"]
            lr = {"sgd": 0.1, "adam": 1e-3, "alpha=0.5": curv["optimizer"]["lr"], "alpha=1": curv["optimizer"]["lr"]}
            assert o["lr"] == lr[j.arm]
            if j.arm.startswith("alpha"):
                assert o == {**curv["optimizer"], "alpha": float(j.arm.split("=")[1])}
        elif j.study == "osgd":
            ref = osgd_vgg if j.net == "nested-width-vgg" else osgd_res
            assert j.net in ("nested-width-vgg", "preresnet56-exits") and j.cfg["model"] == ref["model"]
            assert o == ref["optimizer"] and t["epochs"] == ref["train"]["epochs"]
            assert j.cfg["schedule"] == ref["schedule"]
        else:
            assert j.cfg["model"] == slbi["model"]
            if j.arm == "slbi-path":
                assert o == slbi["optimizer"] and t["epochs"] == 200 and t["keep_every"] == cc.PATH_EVERY
                assert j.cfg["schedule"] == {"name": "none"}
            else:  # the dense net and the tickets: the released retraining recipe
                assert o["name"] == "sgd" and o["lr"] == 0.1 and t["epochs"] == 160
                assert j.cfg["schedule"] == {"name": "step", "milestones": [80, 120], "gamma": 0.1}
    stop = next(j for j in jobs if j.arm == "stop" and j.seed == 1)
    assert stop.deps == ["slbi/sgd-vgg16-exits/lr0.1/seed1", "slbi/slbi-path-vgg16-exits/lr0.1/seed1"]
    ticket = next(j for j in jobs if j.arm == "ticket-random" and j.seed == 1)
    assert ticket.part == "ticket-random" and ticket.deps == [stop.key]


@pytest.mark.parametrize(("gap", "outcome"), [(-0.002, "holds"), (-0.05, "does not hold")])
def test_verdicts_compare_the_cifar_nets(gap, outcome):
    # DGL's last exit `gap` below backprop's on every seed (± 0.001): within 1 point holds, 5 points does not
    runs = []
    for s, noise in enumerate((0.0, 0.001, -0.001)):
        for arm, acc in (("dgl", 0.90 + gap + noise), ("backprop", 0.90), ("sgl", 0.85)):
            runs.append({"record": "run", "study": "dgl", "arm": arm, "net": "vgg13-exits", "seed": s, "lr": 0.1})
            runs[-1]["test_acc"] = [0.5, acc]
    v = claims.verdict("dgl", runs, nets=cc.VERDICT_NETS)
    assert v["outcome"] == outcome
    assert v["compared"]["dgl vs backprop, last exit"]["diff"]["mean"] == pytest.approx(gap, abs=1e-9)
    assert claims.verdict("dgl", runs)["outcome"] == "inconclusive"  # claims.py's own nets: no such runs


def test_the_estimate_uses_measured_epochs_and_scales_the_rest_by_macs(tmp_path, capsys):
    root = tmp_path / "runs"
    root.mkdir()
    ledger = {"dgl/dgl-vgg13-exits/lr0.1/seed0": {"seconds": 30.0, "epochs": 10}}  # 3 s an epoch, start-up in
    (root / "timing.json").write_text(json.dumps(ledger))
    suite = cc.Suite(root, tmp_path / "r.json", ["dgl", "curvature"], [0, 1, 2], cc.Options("/d", smoke=2))
    jobs = {j.key: j for j in suite.jobs()}
    assert suite.epoch_seconds(jobs["dgl/dgl-vgg13-exits/lr0.1/seed2"]) == pytest.approx(3.0)
    sgd = jobs["curvature/sgd-vgg13-exits/lr0.1/seed0"]  # not measured: scaled from dgl by MACs per image
    ratio = suite.macs("curvature/sgd-vgg13-exits") / suite.macs("dgl/dgl-vgg13-exits")
    assert ratio != 1.0 and suite.epoch_seconds(sgd) == pytest.approx(3.0 * ratio)
    assert suite.epoch_seconds(sgd, measured_only=True) == 0.0
    assert cc.main(["--report-only", "--smoke", "2", "--studies", "dgl", "curvature"] + _where(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "left: 21 jobs (seed 0: 7, seed 1: 7, seed 2: 7)" in out and "measured: 1 of the arms" in out
    records = json.loads((tmp_path / "r.json").read_text())
    assert [r["record"] for r in records] == ["verdict"] * 4 and all(r["dataset"] == "cifar10" for r in records)


def _where(tmp_path: Path) -> list[str]:
    return ["--root", str(tmp_path / "runs"), "--results", str(tmp_path / "r.json")]


# ---- refusals ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path, capsys):
    args = ["--data-dir", str(tmp_path), "--root", str(tmp_path / "runs"), "--results", str(tmp_path / "r.json")]
    assert cc.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "r.json").exists()


def test_missing_data_is_named_in_one_line_and_exits_2(tmp_path, capsys):
    out = ["--root", str(tmp_path / "runs"), "--results", str(tmp_path / "r.json"), "--device", "cpu"]
    assert cc.main(out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data-dir" in err and "cifar-10-batches-py" in err
    (tmp_path / "empty").mkdir()
    assert cc.main([*out, "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data_batch_1" in err and "batches.meta" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "r.json").exists()


# ---- pieces ------------------------------------------------------------------------------------------------
def _piece(tmp_path: Path, seconds: float, *extra: str) -> str:
    cmd = [sys.executable, str(BENCH / "claims_cifar.py"), "--data-dir", str(tmp_path / "data"), "--device", "cpu"]
    cmd += ["--root", str(tmp_path / "runs"), "--results", str(tmp_path / "r.json"), "--piece-seconds", str(seconds)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*cmd, *extra], capture_output=True, text=True, env=env, cwd=ROOT, timeout=seconds + 60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.mark.slow
def test_a_piece_stops_at_its_deadline_and_the_next_one_resumes_the_run(tmp_path):
    fake_cifar10(tmp_path / "data")
    long = ["--smoke", "1000", "--studies", "dgl", "--seeds", "0"]  # 1000 short epochs: no piece finishes the run
    run = tmp_path / "runs" / "dgl" / "dgl-vgg13-exits" / "lr0.1" / "seed0"
    outs = []
    for _ in range(3):  # until a deadline falls after the run's first checkpoint (a busy machine starts slowly)
        outs.append(_piece(tmp_path, 20, *long))
        if (run / "checkpoint.pt").exists():
            break
    out = outs[-1]
    kept = json.loads((run / "history.json").read_text())
    assert 1 <= len(kept) < 1000 and not (run / "metrics.json").exists(), "\n".join(outs)
    assert f"stopped at the deadline: dgl/dgl-vgg13-exits/lr0.1/seed0 (epoch {len(kept)} of 1000 kept)" in out
    assert "left: 3 jobs" in out and "more pieces" in out
    assert not (tmp_path / "r.json").exists()  # nothing finished, nothing recorded
    history = kept
    for _ in range(3):  # the next piece resumes the run where the last one stopped
        out = _piece(tmp_path, 20, *long)
        history = json.loads((run / "history.json").read_text())
        if len(history) > len(kept):
            break
    assert len(history) > len(kept), out
    assert history[: len(kept)] == kept  # resumed, not restarted: the first piece's epochs are kept as they were
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    assert "train --resume" in (run.parent / f"{run.name}.log").read_text()
    # what finishes is recorded: a study of short runs, in the same root and results file
    out = _piece(tmp_path, 150, "--smoke", "3", "--studies", "curvature", "--seeds", "0")
    assert "all recorded: nothing left" in out, out
    records = json.loads((tmp_path / "r.json").read_text())
    runs = [r for r in records if r["record"] == "run"]
    assert sorted(r["arm"] for r in runs) == ["adam", "alpha=0.5", "alpha=1", "sgd"]
    for r in runs:
        assert r["dataset"] == "cifar10" and r["study"] == "curvature" and r["net"] == "vgg13-exits"
        assert r["epochs"] == 3 and len(r["val_history"]) == 3 and r["train_size"] == 180 and r["val_size"] == 20
    verdicts = {r["study"]: r for r in records if r["record"] == "verdict"}
    assert set(verdicts) == set(claims.STUDY_ORDER) and verdicts["curvature"]["dataset"] == "cifar10"
    assert not (run / "metrics.json").exists()  # the unfinished dgl run waits for its own pieces


@pytest.mark.slow
def test_the_slbi_study_runs_its_path_stopping_point_and_tickets_on_cifar_shaped_data(tmp_path):
    fake_cifar10(tmp_path / "data")
    out = _piece(tmp_path, 400, "--smoke", "2", "--studies", "slbi", "--seeds", "0")
    assert "all recorded: nothing left" in out, out
    records = json.loads((tmp_path / "r.json").read_text())
    runs = {r["arm"]: r for r in records if r["record"] == "run"}
    assert set(runs) == {"sgd", "slbi-path", "stop", "ticket-slbi", "ticket-magnitude", "ticket-random"}
    assert all(r["dataset"] == "cifar10" for r in records)
    stop = runs["stop"]
    assert [p["epoch"] for p in stop["path"]] == [1, 2] and stop["stop"]["epoch"] in (1, 2)
    snaps = sorted(p.name for p in (tmp_path / "runs" / stop["path_run"] / "checkpoints").glob("*.pt"))
    assert snaps == [stop["stop"]["file"]]  # the others are deleted once the stop is recorded
    assert all(len(runs[f"ticket-{k}"]["test_acc"]) == 4 for k in ("slbi", "magnitude", "random"))
