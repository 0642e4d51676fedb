"""Faults and bad input: SIGKILL at random points, hostile checkpoints, bad configs, numerical faults.

Tests, not promises: every case here states what the user sees (one line, non-zero exit) and what must hold
afterwards (a loadable checkpoint, the same final weights after ``--resume``, an untouched run directory).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from anytrain.cli import main
from anytrain.config import load_config
from anytrain.train import Trainer, TrainingDiverged, build_components, load_checkpoint, save_checkpoint

RUN = [
    "data.name=synthetic",
    "data.options.n_train=128",
    "data.options.n_test=64",
    "data.batch_size=16",
    "model.name=cnn1d-exits",
    "rule.name=joint",
    "model.width=8",
    "model.exits=3",
    "train.epochs=4",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
    "train.threads=1",
    "optimizer.lr=0.05",
]


def sets(items: list[str]) -> list[str]:
    return [a for kv in items for a in ("--set", kv)]


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def model_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["model"]


# ---- SIGKILL at random points ------------------------------------------------------------------------------
EPOCHS = 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The final weights of an uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *sets(RUN), "--out", str(out)]) == 0
    return model_tensors(out)


def _epochs_done(out: Path) -> int:
    try:
        return len(json.loads((out / "history.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def kill_and_resume(tmp_path: Path, target: int, jitter: float, reference: dict[str, torch.Tensor]) -> str:
    """Start a training subprocess, SIGKILL it ``jitter`` seconds after it finished ``target`` epochs (``target
    = -1``: after it created the run directory, i.e. during the first epoch; ``-2``: after start, usually while
    the interpreter is still importing), then check the run directory and finish the run with ``--resume`` (or
    with the same command when the directory was never created)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "anytrain.cli", "train", *sets(RUN), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120

    def started() -> bool:
        return (out / "config.yaml").is_file() if target == -1 else _epochs_done(out) >= target + 1

    while target > -2 and not started() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(jitter)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ck = out / "checkpoint.pt"
    if (out / "metrics.json").is_file():
        outcome = "finished before the kill"
    elif ck.is_file():
        epoch = load_checkpoint(ck)["epoch"]  # loadable, with a sane epoch
        assert 0 <= epoch < EPOCHS
        assert main(["train", "--resume", str(out)]) == 0
        outcome = f"resumed after epoch {epoch + 1}"
    elif out.exists():  # killed during the first epoch: resumable from the beginning
        assert (out / "config.yaml").is_file()
        assert main(["train", "--resume", str(out)]) == 0
        outcome = "resumed from the beginning"
    else:  # killed before the run directory was created: the same command starts it
        assert main(["train", *sets(RUN), "--out", str(out)]) == 0
        outcome = "started again"
    got = model_tensors(out)
    assert got.keys() == reference.keys()
    for k in got:
        assert torch.equal(got[k], reference[k]), (outcome, k)
    return outcome


def _plan(n: int, seed: int) -> list[tuple[int, float]]:
    """Kill points spread over the run: while importing, during the first epoch (before any checkpoint) and
    after each epoch, with random jitter (so the kill may land while a checkpoint, best.pt, history.json, the
    plots or metrics.json is being written)."""
    rng = random.Random(seed)
    targets = [-2, -1, -1, *range(EPOCHS)]
    return [
        (t, rng.uniform(0.0, 3.0) if t == -2 else rng.uniform(0.0, 0.08 if t == -1 else 0.25))
        for t in (targets[i % len(targets)] for i in range(n))
    ]


@pytest.mark.parametrize("trial", range(2))
def test_sigkill_then_resume_reaches_same_weights(tmp_path, reference, trial):
    target, jitter = [(-1, 0.02), (1, 0.01)][trial]  # inside the first epoch; after the second checkpoint
    kill_and_resume(tmp_path, target, jitter, reference)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_sigkill_then_resume_many(tmp_path, reference, trial):
    target, jitter = _plan(20, seed=2)[trial]
    kill_and_resume(tmp_path, target, jitter, reference)


# ---- hostile checkpoints through the CLI --------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # executed by a plain pickle.load: must never happen
        return (os.system, (f"touch {self.marker}",))


def _unfinished_run(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    assert main(["train", *sets([*RUN, "train.epochs=1"]), "--out", str(out)]) == 0
    (out / "metrics.json").unlink()  # now it looks like a run killed after its last checkpoint
    return out


@pytest.mark.parametrize(
    "kind", ["truncated", "garbage", "foreign", "evil", "tagged-but-empty", "missing-rng", "mistyped", "other-net"]
)
def test_bad_checkpoint_on_resume_is_one_line_and_touches_nothing(tmp_path, capsys, kind):
    out = _unfinished_run(tmp_path)
    capsys.readouterr()
    ck = out / "checkpoint.pt"
    marker = tmp_path / "pwned"
    if kind == "truncated":
        ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 3])
    elif kind == "garbage":
        ck.write_bytes(os.urandom(4096))
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.ones(2)}}, ck)
    elif kind == "evil":
        torch.save({"format": "anytrain-checkpoint-v1", "model": _Evil(marker)}, ck)
        with pytest.raises(pickle.UnpicklingError):  # the file really is an exploit for an unsafe loader ...
            torch.load(ck, weights_only=True)
    elif kind == "tagged-but-empty":
        save_checkpoint(ck, {"epoch": 0})
    elif kind in ("missing-rng", "mistyped"):
        payload = {k: v for k, v in load_checkpoint(ck).items() if k != "format"}
        if kind == "missing-rng":
            del payload["rng"]
        else:
            payload["epoch"] = [1, 2]
        save_checkpoint(ck, payload)
    else:  # a real checkpoint of another architecture
        other = tmp_path / "other"
        assert main(["train", *sets([*RUN, "train.epochs=1", "model.width=4"]), "--out", str(other)]) == 0
        ck.write_bytes((other / "checkpoint.pt").read_bytes())
    capsys.readouterr()
    before = snapshot(out)
    code = main(["train", "--resume", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("anytrain: error:"), err
    assert "checkpoint" in err
    if kind == "evil":  # names what it refused to call
        assert "posix.system" in err or "os.system" in err, err
    if kind == "other-net":  # says which tensors differ
        assert "differ in shape" in err and "stages." in err, err
    assert not marker.exists()  # no code ran
    assert snapshot(out) == before  # nothing overwritten, nothing added


# ---- bad configs (beyond tests/test_cli.py) ------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra,msg",
    [
        (["optimizer.lr=0"], "optimizer.lr must be > 0"),
        (["optimizer.lr=abc"], "optimizer.lr must be a number"),
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay must be >= 0"),
        (["optimizer.momentum=true"], "optimizer.momentum must be a number"),
        (["optimizer.name=adam", "optimizer.betas=[2, 0.9]"], "adam"),
        (["optimizer.nesterov_typo=1"], "optimizer 'sgd'"),
        (["seed=abc"], "seed must be an integer"),
        (["data.batch_size=0"], "data.batch_size must be > 0"),
        (["data.batch_size=2.5"], "data.batch_size must be an integer"),
        (["data.batch_size=100000"], "exceeds"),
        (["data.options=[1]"], "data.options must be a mapping"),
        (["train.device=tpu"], "train.device"),
        (["rule.name=adaloss", "rule.beta=1.5"], "beta"),
        (["rule.name=weighted", "rule.weights=[1, 1, 1, 1]"], "4 weights but the network has 3"),
        (["rule.name=weighted", "rule.weights=[-1, 1, 1]"], "non-negative"),
        (["rule.name=osgd", "rule.mode=sideways"], "mode"),
        (["rule.name=dgl", "rule.modules=7"], "rule 'dgl'"),
        (["rule.name=torchjd:NoSuchAggregator"], "unknown TorchJD aggregator"),
        (["schedule.name=nope"], "schedule"),
        (["model.exits=0"], "model.exits must be > 0"),
    ],
)
def test_bad_config_is_one_line(tmp_path, capsys, extra, msg):
    out = tmp_path / "run"
    code = main(["train", *sets([*RUN, *extra]), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("anytrain: error:"), err
    assert msg.lower() in err.lower(), err
    assert not out.exists()


@pytest.mark.parametrize("where", ["missing", "partial", "corrupt"])
def test_cifar_dir_missing_or_partial_is_one_line(tmp_path, capsys, where):
    d = tmp_path / "cifar-10-batches-py"
    if where != "missing":
        d.mkdir()
        for name in ["batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
            if where == "corrupt" or name != "test_batch":
                (d / name).write_bytes(b"\x80\x04 not really a pickle")
    cifar = [kv for kv in RUN if not kv.startswith("data.options")] + ["data.name=cifar10", f"data.data_dir={d}"]
    out = tmp_path / "r"
    code = main(["train", *sets(cifar), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("anytrain: error:"), err
    assert str(d) in err or "cifar" in err.lower(), err
    if where == "partial":
        assert "test_batch" in err, err
    assert not out.exists()


def test_finished_run_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    small = sets([*RUN, "train.epochs=1"])
    assert main(["train", *small, "--out", str(out)]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", *small, "--out", str(out)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert snapshot(out) == before
    # --overwrite with a config error, or one found only when the data is loaded, leaves the run untouched ...
    assert main(["train", *small, "--set", "rule.name=nope", "--out", str(out), "--overwrite"]) == 2
    assert main(["train", *small, "--set", "data.batch_size=100000", "--out", str(out), "--overwrite"]) == 2
    assert snapshot(out) == before
    # ... so does one whose run holds a file anytrain did not write ...
    (out / "marker").write_text("the user's")
    assert main(["train", *small, "--out", str(out), "--overwrite"]) == 2
    assert "did not write (marker)" in capsys.readouterr().err
    (out / "marker").unlink()
    # ... and a valid one replaces it, leaving no staging directory behind
    assert main(["train", *small, "--set", "seed=5", "--out", str(out), "--overwrite"]) == 0
    assert load_config(out / "config.yaml").seed == 5 and (out / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---- numerical faults ----------------------------------------------------------------------------------------
def _trainer(tmp_path: Path, *extra: str) -> Trainer:
    cfg = load_config(None, [*RUN, "train.log_every=1", *extra])
    return Trainer(cfg, tmp_path, components=build_components(cfg))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_gradient_with_finite_loss_stops_run(tmp_path, value):
    tr = _trainer(tmp_path)
    poison_at = tr.steps_per_epoch + 3  # second epoch
    p = next(iter(tr.net.stages[0].parameters()))
    calls = {"n": 0}

    def hook(g: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return g * value if calls["n"] == poison_at + 1 else g

    p.register_hook(hook)
    with pytest.raises(TrainingDiverged, match=rf"non-finite gradient at step {poison_at} \(epoch 2\)"):
        tr.fit()
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


def test_inf_loss_is_reported_as_loss(tmp_path):
    tr = _trainer(tmp_path)

    def hook(mod: nn.Module, inp: object, out: torch.Tensor) -> torch.Tensor:
        return out * float("inf") if mod.training else out

    tr.net.exits[2].register_forward_hook(hook)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 0 \(epoch 1\) on exit 2; no checkpoint"):
        tr.fit()
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "opt",
    [
        ["optimizer.lr=1.0e+12", "optimizer.momentum=0.99"],  # SGD blows up within the first epochs
        ["optimizer.name=curvature", "optimizer.lr=1.0e+8"],  # exploding Kronecker factors / preconditioned steps
    ],
    ids=["sgd", "curvature"],
)
def test_diverged_run_exit_code_and_resumable_checkpoint(tmp_path, capsys, opt):
    out = tmp_path / "run"
    code = main(["train", *sets([*RUN, *opt]), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 3, err
    assert len(err.splitlines()) == 1 and "non-finite" in err
    if (out / "checkpoint.pt").exists():
        ck = load_checkpoint(out / "checkpoint.pt")
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("mode", ["global", "per_tensor"])
def test_osgd_all_zero_gradient_rows_give_no_nan(mode):
    from anytrain.nets import StagedNet
    from anytrain.rules import build_rule

    net = StagedNet([nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 2) for _ in range(3)])
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    trunk0 = list(net.stages[0].parameters())
    ref = torch.autograd.grad(nn.functional.cross_entropy(net(x)[1], y), trunk0)
    rule = build_rule("osgd", mode=mode)
    rule.bind(net)
    ce = [nn.functional.cross_entropy(z, y) for z in rule.forward(net, x)]
    # exit 0 contributes an all-zero gradient row; exit 2's row duplicates exit 1's on stage 0
    rule.backward(net, [0.0 * ce[0], ce[1], ce[1] + 0.0 * ce[2]])
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the zero row drops out and the dependent row adds nothing: stage 0 moves along exit 1's gradient alone
    for p, r in zip(trunk0, ref):
        torch.testing.assert_close(p.grad, r)


# ---- bad input: one line, the right exit code, nothing changed anywhere ----------------------------------------
# Every case runs in a folder holding a finished run, an unfinished one (killed after its checkpoint) and a
# user's folder that is not a run; the whole folder must be byte-for-byte the same afterwards. Placeholders:
# {run}, {live}, {user}, {tmp}. Cases that train would replace {run} (--overwrite), the most dangerous path.
ONE = [*RUN, "train.epochs=1"]


def tree(d: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory (None) under ``d``: a snapshot that also sees new folders."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("runs")
    assert main(["train", *sets(ONE), "--out", str(d / "run")]) == 0
    assert main(["train", *sets(ONE), "--out", str(d / "live")]) == 0
    (d / "live" / "metrics.json").unlink()  # as if killed after its last checkpoint
    (d / "user").mkdir()
    (d / "user" / "notes.txt").write_text("keep\n")
    (d / "user" / "config.yaml").write_text("mine\n")
    return d


def _write(rel: str, data: str | bytes):
    def prep(tmp: Path) -> None:
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())

    return prep


def _edit_config(tmp: Path) -> None:  # a hand edit of an unfinished run's config.yaml
    p = tmp / "live" / "config.yaml"
    p.write_text(p.read_text().replace("lr: 0.05", "lr: 0.5"))


def _bomb(levels: int = 9) -> str:
    lines = ["n0: &n0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"n{i}: &n{i} [{', '.join([f'*n{i - 1}'] * 9)}]" for i in range(1, levels)]
    body = "\n".join("    " + ln for ln in lines)
    return f"data:\n  options:\n{body}\n"


def T(overrides: list[str], msg: str, code: int = 2):
    """A config case: train with these overrides, replacing {run}."""
    argv = ["train", *sets([*ONE, *overrides]), "--out", "{run}", "--overwrite"]
    return (argv, None, code, msg)


def A(argv: list[str], msg: str, prep=None, code: int = 2):
    return (argv, prep, code, msg)


TRAIN = ["train", *sets(ONE)]
DGL = ["dgl-parallel", *sets([*ONE, "rule.name=dgl", "model.exits=2"])]
CASES = {
    # -- from the issue: data loss
    "overwrite-user-folder": A([*TRAIN, "--out", "{user}", "--overwrite"], "not an anytrain run"),
    "overwrite-then-bad-batch": T(["data.name=synthetic", "data.batch_size=100000"], "exceeds"),
    "dgl-resume-user-folder": A(["dgl-parallel", "--resume", "{user}"], "not an anytrain run directory"),
    # -- from the issue: dead ends and the error contract
    "resume-set-lr": A(["train", "--resume", "{live}", "--set", "optimizer.lr=0.001"], "optimizer.lr on --resume"),
    "seed-huge": T(["seed=99999999999999999999"], "seed is out of range"),
    "epochs-inf": T(["train.epochs=.inf"], "train.epochs must be finite"),
    "batch-nan": T(["data.batch_size=.nan"], "data.batch_size must be finite"),
    "label-smoothing-5": T(["train.label_smoothing=5"], "train.label_smoothing must be in [0, 1)"),
    "threads-negative": T(["train.threads=-3"], "train.threads must be >= 0"),
    "milestones-abc": T(["schedule.milestones=abc"], "schedule.milestones must be a list"),
    "config-binary": A(
        [*TRAIN[:1], "{tmp}/bin.yaml", "--out", "{tmp}/new"], "not a text file", _write("bin.yaml", bytes(range(256)))
    ),
    "out-is-file": A([*TRAIN, "--out", "{tmp}/afile"], "is a file, not a directory", _write("afile", "x")),
    "eval-metrics-not-json": A(["eval", "{run}"], "is not valid JSON", _write("run/metrics.json", "{bad")),
    "eval-metrics-malformed": A(["eval", "{run}"], "is malformed", _write("run/metrics.json", '{"exits": 3}')),
    "plot-metrics-malformed": A(["plot", "{run}"], "is malformed", _write("run/metrics.json", '{"exits": [{}]}')),
    "plot-history-malformed": A(["plot", "{run}"], "is malformed", _write("run/history.json", '[{"epoch": 1}]')),
    "plot-step-loss-malformed": A(
        ["plot", "{run}"],
        "is malformed",
        _write("run/history.json", '[{"epoch": 1, "step": 8, "train_loss": [1.0], "step_loss": [[8, 0.1, ["x"]]]}]'),
    ),
    "lr-nan": T(["optimizer.lr=.nan"], "optimizer.lr must be finite"),
    "lr-inf": T(["optimizer.lr=.inf"], "optimizer.lr must be finite"),
    "momentum-nan": T(["optimizer.momentum=.nan"], "optimizer.momentum must be finite"),
    "final-factor-nan": T(["schedule.final_factor=.nan"], "schedule.final_factor must be finite"),
    "augment-maybe": T(["data.augment=maybe"], "data.augment must be true or false"),
    "warmup-negative": T(["schedule.warmup_epochs=-2"], "schedule.warmup_epochs must be >= 0"),
    "momentum-5": T(["optimizer.momentum=5"], "optimizer.momentum must be in [0, 1)"),
    "dgl-nproc-negative": A([*DGL, "--nproc", "-1", "--out", "{tmp}/d"], "--nproc must be >= 1"),
    "dgl-nproc-zero": A([*DGL, "--nproc", "0", "--out", "{tmp}/d"], "--nproc must be >= 1"),
    "prefix-not-doubled": T(["optimizer.nesterov_typo=1"], "error: optimizer 'sgd': SGD"),
    "config-is-directory": A([*TRAIN[:1], "{user}", "--out", "{tmp}/new"], "is a directory, not a YAML file"),
    # -- more config values
    "lr-zero": T(["optimizer.lr=0"], "optimizer.lr must be > 0"),
    "lr-bool": T(["optimizer.lr=true"], "optimizer.lr must be a number"),
    "lr-list": T(["optimizer.lr=[1]"], "optimizer.lr must be a number"),
    "lr-null": T(["optimizer.lr=null"], "optimizer.lr must be a number"),
    "momentum-one": T(["optimizer.momentum=1"], "optimizer.momentum must be in [0, 1)"),
    "momentum-negative": T(["optimizer.momentum=-0.1"], "optimizer.momentum must be in [0, 1)"),
    "weight-decay-inf": T(["optimizer.weight_decay=.inf"], "optimizer.weight_decay must be finite"),
    "label-smoothing-one": T(["train.label_smoothing=1"], "train.label_smoothing must be in [0, 1)"),
    "label-smoothing-negative": T(["train.label_smoothing=-0.5"], "train.label_smoothing must be in [0, 1)"),
    "epochs-fraction": T(["train.epochs=2.5"], "train.epochs must be an integer"),
    "epochs-bool": T(["train.epochs=true"], "train.epochs must be an integer"),
    "epochs-overflowing-float": T(["train.epochs=1e400"], "train.epochs must be finite"),
    "log-every-zero": T(["train.log_every=0"], "train.log_every must be > 0"),
    "checkpoint-every-negative": T(["train.checkpoint_every=-1"], "train.checkpoint_every must be > 0"),
    "keep-every-negative": T(["train.keep_every=-1"], "train.keep_every must be >= 0"),
    "threads-fraction": T(["train.threads=1.5"], "train.threads must be an integer"),
    "progress-maybe": T(["train.progress=maybe"], "train.progress must be true or false"),
    "tensorboard-int": T(["train.tensorboard=2"], "train.tensorboard must be true or false"),
    "device-int": T(["train.device=7"], "train.device must be a string"),
    "batch-zero": T(["data.batch_size=0"], "data.batch_size must be > 0"),
    "batch-float": T(["data.batch_size=1e3"], "data.batch_size must be an integer"),
    "batch-2-to-70": T([f"data.batch_size={2**70}"], "fit in 64 bits"),
    "eval-batch-zero": T(["data.eval_batch_size=0"], "data.eval_batch_size must be > 0"),
    "num-samples-negative": T(["data.num_samples=-3"], "data.num_samples must be > 0"),
    "data-dir-int": T(["data.data_dir=5"], "data.data_dir must be a string"),
    "seed-negative": T(["seed=-1"], "seed must be in [0, 4294967296)"),
    "seed-2-to-32": T(["seed=4294967296"], "seed must be in [0, 4294967296)"),
    "seed-fraction": T(["seed=1.5"], "seed must be an integer"),
    "seed-date": T(["seed=2020-01-01"], "seed must be a number, string"),
    "gamma-zero": T(["schedule.name=step", "schedule.gamma=0"], "schedule.gamma must be > 0"),
    "final-factor-high": T(["schedule.final_factor=1.5"], "schedule.final_factor must be in [0, 1]"),
    "milestones-mixed": T(["schedule.name=step", "schedule.milestones=[1, a]"], "schedule.milestones must be a list"),
    "milestones-negative": T(["schedule.name=step", "schedule.milestones=[-1]"], "schedule.milestones must be >= 0"),
    "warmup-inf": T(["schedule.warmup_epochs=.inf"], "schedule.warmup_epochs must be finite"),
    "rule-weight-nan": T(["rule.name=weighted", "rule.weights=[1, .nan, 1]"], "rule.weights[1] must be finite"),
    "model-width-nan": T(["model.width=.nan"], "model.width must be finite"),
    "data-option-inf": T(["data.options.noise=-.inf"], "data.options.noise must be finite"),
    "schedule-unknown-key": T(["schedule.bogus=1"], "schedule 'cosine'"),
    # -- keys and --set syntax
    "set-empty-key": A([*TRAIN, "--set", "=3", "--out", "{tmp}/new"], "dotted key"),
    "set-double-dot": A([*TRAIN, "--set", "optimizer..lr=1", "--out", "{tmp}/new"], "dotted key"),
    "set-no-equals": A([*TRAIN, "--set", "lr", "--out", "{tmp}/new"], "expects key=value"),
    "section-scalar": T(["train=5"], "section 'train' must be a mapping"),
    "data-options-scalar": T(["data.options=3"], "data.options must be a mapping"),
    "python-tag-is-a-string": T(['model.name=!!python/object/apply:os.system ["true"]'], "unknown model"),
    # -- config files
    "file-list": A(
        [*TRAIN[:1], "{tmp}/c.yaml", "--out", "{tmp}/new"], "mapping at the top level", _write("c.yaml", "- 1\n")
    ),
    "file-bad-yaml": A(
        [*TRAIN[:1], "{tmp}/c.yaml", "--out", "{tmp}/new"], "not valid YAML", _write("c.yaml", "a: [\n")
    ),
    "file-python-tag": A(
        [*TRAIN[:1], "{tmp}/c.yaml", "--out", "{tmp}/new"],
        "not valid YAML",
        _write("c.yaml", "seed: !!python/object/apply:os.system ['touch pwned']\n"),
    ),
    "file-null-byte": A(
        [*TRAIN[:1], "{tmp}/c.yaml", "--out", "{tmp}/new"], "not valid YAML", _write("c.yaml", "a: \x00\n")
    ),
    "file-alias-bomb": A([*TRAIN[:1], "{tmp}/c.yaml", "--out", "{tmp}/new"], "n0", _write("c.yaml", _bomb())),
    "file-missing": A([*TRAIN[:1], "{tmp}/nope.yaml", "--out", "{tmp}/new"], "config file not found"),
    "file-unknown-key": A(
        [*TRAIN[:1], "{tmp}/c.yaml", "--out", "{tmp}/new"],
        "unknown config key 'trian'",
        _write("c.yaml", "trian: {}\n"),
    ),
    # -- run directories
    "resume-with-out": A(["train", "--resume", "{live}", "--out", "{tmp}/x"], "drop --out"),
    "resume-with-config": A(
        ["train", "{tmp}/c.yaml", "--resume", "{live}"], "drop CONFIG", _write("c.yaml", "seed: 1\n")
    ),
    "resume-with-overwrite": A(["train", "--resume", "{live}", "--overwrite"], "drop --overwrite"),
    "train-without-out": A(TRAIN, "needs --out"),
    "resume-missing": A(["train", "--resume", "{tmp}/nope"], "no such directory"),
    "resume-finished": A(["train", "--resume", "{run}"], "already holds a finished run"),
    "resume-user-folder": A(["train", "--resume", "{user}"], "not an anytrain run directory"),
    "resume-set-epochs": A(["train", "--resume", "{live}", "--set", "train.epochs=9"], "train.epochs on --resume"),
    "resume-edited-config": A(["train", "--resume", "{live}"], "differs from the config its checkpoint", _edit_config),
    "out-unfinished": A([*TRAIN, "--out", "{live}"], "holds an unfinished run; continue it with --resume"),
    "out-finished": A([*TRAIN, "--out", "{run}"], "already holds a finished run; pass --overwrite"),
    "out-below-file": A([*TRAIN, "--out", "{tmp}/afile/sub"], "cannot create run directory", _write("afile", "x")),
    "overwrite-run-with-notes": A(
        [*TRAIN, "--out", "{run}", "--overwrite"], "(notes.txt)", _write("run/notes.txt", "x")
    ),
    "overwrite-run-with-own-json": A(  # a user's own .json/.pt/.png beside anytrain's files is theirs too
        [*TRAIN, "--out", "{run}", "--overwrite"], "(notes.json)", _write("run/notes.json", "{}")
    ),
    "overwrite-run-with-own-weights": A(
        [*TRAIN, "--out", "{run}", "--overwrite"], "(mine.pt)", _write("run/mine.pt", "x")
    ),
    "dgl-resume-with-config": A(
        ["dgl-parallel", "{tmp}/c.yaml", "--resume", "{live}"], "drop CONFIG", _write("c.yaml", "")
    ),
    "dgl-without-out": A(DGL, "needs --out"),
    "dgl-out-finished": A([*DGL, "--out", "{run}"], "already holds a finished run"),
    "dgl-nproc-mismatch": A([*DGL, "--nproc", "3", "--out", "{tmp}/d"], "--nproc must be 2"),
    "dgl-resume-joint-run": A(["dgl-parallel", "--resume", "{live}"], "needs rule.name: dgl"),
    # -- eval and plot
    "eval-missing": A(["eval", "{tmp}/nope"], "holds no metrics.json"),
    "eval-metrics-list": A(["eval", "{run}"], "is malformed", _write("run/metrics.json", "[]")),
    "eval-metrics-binary": A(["eval", "{run}"], "is not valid JSON", _write("run/metrics.json", b"\xff\xfe\x00")),
    "eval-budget-nan": A(["eval", "{run}", "--budget", "nan"], "--budget must be a finite"),
    "plot-missing": A(["plot", "{tmp}/nope"], "is not a directory"),
    "plot-history-not-json": A(["plot", "{run}"], "is not valid JSON", _write("run/history.json", "[")),
    "plot-user-folder": A(["plot", "{user}"], "holds no metrics.json or history.json"),
}


def _fill(argv: list[str], tmp: Path) -> list[str]:
    names = {"run": tmp / "run", "live": tmp / "live", "user": tmp / "user", "tmp": tmp}
    return [a.format(**{k: str(v) for k, v in names.items()}) if "{" in a and "}" in a else a for a in argv]


def test_case_table_is_large_enough():
    assert len(CASES) >= 27 + 40


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_one_line_and_nothing_changed(tmp_path, capsys, runs, case):

    argv, prep, code, msg = CASES[case]
    for name in ("run", "live", "user"):
        shutil.copytree(runs / name, tmp_path / name)
    if prep is not None:
        prep(tmp_path)
    before = tree(tmp_path)
    capsys.readouterr()
    got = main(_fill(argv, tmp_path))
    err = capsys.readouterr().err.strip()
    assert got == code, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(("anytrain: error: ", "anytrain dgl-parallel: ")), err
    assert msg in err, err
    assert tree(tmp_path) == before  # nothing created, changed or deleted, anywhere
    assert not (Path.cwd() / "pwned").exists()


def test_bad_input_through_the_console_script(tmp_path):
    """The table above calls ``main`` in-process; one case through a real process: exit status 2, one line on
    stderr (no warning or traceback around it), nothing written."""
    argv = ["train", "--set", "seed=99999999999999999999", "--out", str(tmp_path / "r")]
    p = subprocess.run([sys.executable, "-m", "anytrain.cli", *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "seed is out of range" in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []


# ---- interrupts and faults during a run: truthful one-liners, and the run can always be finished -------------
def _stop_at_step(monkeypatch: pytest.MonkeyPatch, step: int, exc: BaseException) -> None:
    """Make training raise ``exc`` at optimisation step ``step`` (0-based, counted over the session)."""
    orig = Trainer.train_step

    def train_step(self, x, y):
        if self.step == step:
            raise exc
        return orig(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize("step,says", [(3, "no checkpoint was written yet"), (11, "the last good checkpoint")])
def test_ctrl_c_message_is_true_and_resume_finishes_identically(tmp_path, capsys, monkeypatch, reference, step, says):
    out = tmp_path / "run"
    _stop_at_step(monkeypatch, step, KeyboardInterrupt())  # 8 steps per epoch: in epoch 1, then in epoch 2
    assert main(["train", *sets(RUN), "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and f"--resume {out}" in err, err
    monkeypatch.undo()
    assert main(["train", "--resume", str(out)]) == 0
    if step < 8:
        assert "no checkpoint yet: training it from the beginning" in capsys.readouterr().out
    got = model_tensors(out)
    assert all(torch.equal(got[k], reference[k]) for k in reference)


@pytest.mark.parametrize("fault", ["interrupt", "diverge", "disk-full"])
def test_failed_replacement_leaves_the_old_run_as_it_was(tmp_path, capsys, monkeypatch, runs, fault):
    old = tmp_path / "run"
    shutil.copytree(runs / "run", old)
    before = tree(tmp_path)
    exc: BaseException = {
        "interrupt": KeyboardInterrupt(),
        "diverge": TrainingDiverged("non-finite loss at step 2 (epoch 1) on exit 0"),
        "disk-full": OSError(errno.ENOSPC, "No space left on device", str(old / "best.pt")),
    }[fault]
    _stop_at_step(monkeypatch, 2, exc)
    code = main(["train", *sets([*ONE, "seed=7"]), "--out", str(old), "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert code == {"interrupt": 130, "diverge": 3, "disk-full": 3}[fault], err
    assert len(err.splitlines()) == 1, err
    if fault != "diverge":  # (the injected divergence carries its own message)
        assert f"{old} is unchanged" in err, err
    assert tree(tmp_path) == before  # the old run byte for byte, and no staging directory left


def test_killed_while_plotting_is_not_finished_and_resume_finishes(tmp_path, capsys, monkeypatch):
    import anytrain.eval.plots as plots

    out = tmp_path / "run"
    args = sets([*ONE, "train.plots=true"])

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_run", killed)
    assert main(["train", *args, "--out", str(out)]) == 130
    assert "the last good checkpoint" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()  # not counted as finished
    monkeypatch.undo()
    assert main(["train", "--resume", str(out)]) == 0
    assert (out / "accuracy_vs_flops.png").is_file() and (out / "metrics.json").is_file()
    ref = tmp_path / "ref"
    assert main(["train", *sets(ONE), "--out", str(ref)]) == 0  # (plots do not change the metrics)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert m1["exits"] == m2["exits"] and m1["steps"] == m2["steps"]


def test_disk_full_during_training_exits_3_keeping_the_checkpoint(tmp_path, capsys, monkeypatch, reference):
    """ENOSPC on the write after the first checkpoint: exit 3, one line, the checkpoint of epoch 1 intact."""

    out = tmp_path / "run"
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 5:  # config.yaml, best.pt, checkpoint.pt, history.json; then epoch 2's best.pt
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["train", *sets(RUN), "--out", str(out)]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "the last good checkpoint" in err, err
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written temp file left
    assert main(["train", "--resume", str(out)]) == 0
    got = model_tensors(out)
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_read_only_file_system_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """(Simulated: the tests may run as root, for whom chmod does not make a folder read-only.)"""

    def mkdir(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(["train", *sets(ONE), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Read-only file system" in err, err
    assert list(tmp_path.iterdir()) == []


def test_resume_accepts_settings_that_do_not_change_the_math(tmp_path, capsys, runs, reference):

    live = tmp_path / "live"
    shutil.copytree(runs / "live", live)
    (live / "checkpoint.pt").unlink()  # killed during its first epoch
    argv = [
        "train",
        "--resume",
        str(live),
        *sets(["train.log_every=3", "data.eval_batch_size=7", "train.keep_every=1"]),
    ]
    assert main(argv) == 0
    cfg = load_config(live / "config.yaml")
    assert cfg.train.log_every == 3 and cfg.data.eval_batch_size == 7  # recorded, and in effect
    assert cfg.train.keep_every == 1 and (live / "checkpoints" / "epoch_0001.pt").is_file()
    steps = [p[0] for p in json.loads((live / "history.json").read_text())[0]["step_loss"]]
    assert steps == [3, 6, 7]  # 7 steps an epoch: every 3rd and the last


def test_tensorboard_keeps_the_checkpoint_step_after_resume(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = sets([*RUN, "train.epochs=2", "train.tensorboard=true"])
    _stop_at_step(monkeypatch, 10, KeyboardInterrupt())  # epoch 2, after the checkpoint at step 7
    assert main(["train", *args, "--out", str(out)]) == 130
    monkeypatch.undo()
    assert main(["train", "--resume", str(out)]) == 0
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/acc_exit0")] == [7, 14]  # one point per epoch (7 steps), none lost
    assert [e.step for e in acc.Scalars("train/loss_exit0")] == [7, 14]


def test_dgl_parallel_resume_of_a_directory_without_checkpoints_keeps_the_users_files(tmp_path, capsys):
    d = tmp_path / "X"
    d.mkdir()
    (d / "config.yaml").write_text("mine\n")
    before = tree(tmp_path)
    assert main(["dgl-parallel", "--resume", str(d)]) == 2
    assert "not an anytrain run directory" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_dgl_parallel_refuses_streamed_data_in_one_line(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    root = tmp_path / "img"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((8, 8), 40 * c + i, np.uint8), mode="L").save(root / f"c{c}" / f"{i}.png")
    before = tree(tmp_path)
    run = [kv for kv in ONE if not kv.startswith(("data.", "model.name="))] + ["data.batch_size=4"]
    run += ["rule.name=dgl", "model.exits=2", "model.name=cnn2d-exits", "data.name=imagefolder"]
    run += [f"data.data_dir={root}", "data.options.grayscale=true", "data.options.memory_limit_mb=0.0001"]
    argv = ["dgl-parallel", *sets(run)]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "streams from disk" in err, err
    assert tree(tmp_path) == before


def test_shipped_configs_resolve_from_anywhere(tmp_path, monkeypatch):
    """The wheel ships configs/*.yaml inside the package; `configs/NAME.yaml` finds them outside the repo."""
    from anytrain.config import read_config_file

    monkeypatch.chdir(tmp_path)
    assert read_config_file("configs/dgl-mnist1d.yaml")["rule"]["name"] == "dgl"
    assert read_config_file("default.yaml") == read_config_file(Path(__file__).parents[1] / "configs/default.yaml")


@pytest.mark.slow
def test_wheel_contains_the_configs(tmp_path):

    root = Path(__file__).parents[1]
    src = tmp_path / "src"  # a copy: building in place would leave build/ and *.egg-info in the checkout
    skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "runs", "__pycache__", ".*cache")
    shutil.copytree(root, src, symlinks=True, ignore=skip)
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("anytrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("anytrain/configs/")}
    assert shipped == {p.name for p in (root / "configs").glob("*.yaml")}


# ---- config fuzzing (hypothesis): the validator against an oracle written here ------------------------------

# key → predicate a value must satisfy (the independent statement of each rule)
INF = float("inf")


def _num(lo: float, hi: float, lo_in: bool, hi_in: bool, integer: bool = False):
    def ok(v: object) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            return False
        if isinstance(v, float) and v != v or v in (INF, -INF):
            return False
        if isinstance(v, int) and not -(2**63) <= v < 2**63:
            return False
        return (lo < v or (lo_in and v == lo)) and (v < hi or (hi_in and v == hi))

    return ok


ORACLE = {
    "seed": _num(0, 2**32, True, False, True),
    "data.batch_size": _num(0, INF, False, False, True),
    "train.epochs": _num(0, INF, False, False, True),
    "train.threads": _num(0, INF, True, False, True),
    "train.label_smoothing": _num(0, 1, True, False),
    "optimizer.lr": _num(0, INF, False, False),
    "optimizer.momentum": _num(0, 1, True, False),
    "optimizer.weight_decay": _num(0, INF, True, False),
    "schedule.warmup_epochs": _num(0, INF, True, False),
    "schedule.final_factor": _num(0, 1, True, True),
    "data.augment": lambda v: isinstance(v, bool),
    "train.plots": lambda v: isinstance(v, bool),
}
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2, 2),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 10),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.lists(st.integers(0, 3), max_size=2),
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(key=st.sampled_from(sorted(ORACLE)), value=VALUES)
def test_validator_agrees_with_oracle(key, value):
    from anytrain.config import RunConfig
    from anytrain.registry import ConfigError

    cfg = load_config(None).to_dict()
    sec, _, name = key.rpartition(".")
    (cfg[sec] if sec else cfg)[name] = value
    try:
        RunConfig.from_dict(cfg)
        accepted = True
    except ConfigError as e:
        accepted = False
        assert key in str(e) and "\n" not in str(e), str(e)
    assert accepted == ORACLE[key](value), (key, value)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(alphabet=st.sampled_from(list("abc:{}[]-,&*!.#|>'\" \n\t0123456789e\x00")), max_size=60))
def test_any_config_text_is_accepted_or_one_line(tmp_path_factory, text):
    from anytrain.registry import ConfigError

    p = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    p.write_text(text)
    try:
        load_config(p)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e), str(e)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(
        st.tuples(
            st.sampled_from(["model.width", "model.exits", "rule.name", "optimizer.name", "data.options.n_train"]),
            st.sampled_from(["0", "1", "3", "-1", "2.5", "osgd", "adam", "x", "[1]", ".nan", "null"]),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_builders_fail_only_with_one_line(tmp_path_factory, picks):
    """Past the validator, the builders (data, net, rule, optimizer, schedule) raise one-line ConfigErrors only."""
    from anytrain.registry import ConfigError

    try:
        cfg = load_config(None, [*ONE, *(f"{k}={v}" for k, v in picks)])
        Trainer(cfg, tmp_path_factory.getbasetemp() / "never", components=build_components(cfg))
    except ConfigError as e:
        assert str(e) and "\n" not in str(e).strip(), str(e)
    assert not (tmp_path_factory.getbasetemp() / "never").exists()
