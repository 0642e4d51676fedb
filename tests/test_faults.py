"""Faults and bad input: SIGKILL at random points, hostile checkpoints, bad configs, numerical faults.

Tests, not promises: every case here states what the user sees (one line, non-zero exit) and what must hold
afterwards (a loadable checkpoint, the same final weights after ``--resume``, an untouched run directory).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
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
    = -1``: ``jitter`` seconds after start, usually while the interpreter is still importing), then check the
    run directory and finish the run with ``--resume`` (or a fresh start when no checkpoint was written)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "anytrain.cli", "train", *sets(RUN), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while target >= 0 and _epochs_done(out) < target + 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
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
    else:  # killed before the first epoch ended: nothing to resume; a fresh start must work
        assert main(["train", *sets(RUN), "--out", str(out), "--overwrite"]) == 0
        outcome = "restarted"
    got = model_tensors(out)
    assert got.keys() == reference.keys()
    for k in got:
        assert torch.equal(got[k], reference[k]), (outcome, k)
    return outcome


def _plan(n: int, seed: int) -> list[tuple[int, float]]:
    """Kill points spread over the run: before the first checkpoint and after each epoch, with random jitter
    (so the kill may land while a checkpoint, best.pt or history.json is being written)."""
    rng = random.Random(seed)
    return [((i % (EPOCHS + 1)) - 1, rng.uniform(0.0, 0.25 if i % (EPOCHS + 1) else 3.0)) for i in range(n)]


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_then_resume_reaches_same_weights(tmp_path, reference, trial):
    target, jitter = _plan(5, seed=1)[[0, 2, 4][trial]]
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
        (["model.exits=0"], "model 'cnn1d-exits'"),
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
    (out / "marker").write_text("keep me unless --overwrite")
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", *small, "--out", str(out)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert snapshot(out) == before
    # --overwrite with a config error still leaves the run untouched ...
    assert main(["train", *small, "--set", "rule.name=nope", "--out", str(out), "--overwrite"]) == 2
    assert snapshot(out) == before
    # ... and a valid one replaces it
    assert main(["train", *small, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "marker").exists() and (out / "metrics.json").is_file()


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
    from anytrain.optim import OPTIMIZERS

    if "optimizer.name=curvature" in opt and "curvature" not in OPTIMIZERS:
        pytest.skip("curvature optimizer not registered")
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
