"""The multi-process DGL runner: equality with single-process DGL, dead rank → bounded non-zero exit, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dgl_faults import FAULT_ENV, SLOW_ENV

from anytrain.config import load_config
from anytrain.train import Trainer
from anytrain.train.parallel import latest_complete_epoch

CONFIG = """\
seed: 3
data: {name: synthetic, batch_size: 32}
model: {name: cnn1d-exits, exits: 2, width: 8}
rule: {name: dgl}
optimizer: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005}
schedule: {name: cosine}
train: {epochs: 2, device: cpu, threads: 1, progress: false, tensorboard: false, plots: false}
"""


FAULTY = str(Path(__file__).with_name("dgl_faults.py"))  # the runner with fault injection, for these tests only


def run(cfg: Path, out: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 120):
    e = dict(os.environ, **(env or {}))
    entry = [FAULTY] if env else ["-m", "anytrain.train.parallel"]
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, *entry, str(cfg), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
    )
    return p, time.monotonic() - t0


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Single-process synchronous DGL through the trainer."""
    d = tmp_path_factory.mktemp("dglp")
    cfg = d / "cfg.yaml"
    cfg.write_text(CONFIG)
    Trainer(load_config(cfg), d / "single").fit()
    return cfg, weights(d / "single" / "checkpoint.pt")


@pytest.mark.distributed
def test_two_ranks_equal_single_process_dgl(reference, tmp_path: Path) -> None:
    cfg, ref = reference
    p, _ = run(cfg, tmp_path / "par", "--set", "train.plots=true")
    assert p.returncode == 0, p.stderr[-2000:]
    par = weights(tmp_path / "par" / "model.pt")
    assert sorted(par) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(par[k], ref[k], rtol=0, atol=0, msg=k)
    m = json.loads((tmp_path / "par" / "metrics.json").read_text())
    assert [e["index"] for e in m["exits"]] == [0, 1] and m["parallel"]["world_size"] == 2
    # (512 - 51 validation samples) // 32 batches × 2 epochs, each once
    assert [r["steps"] for r in m["parallel"]["ranks"]] == [28, 28]
    for r in (0, 1):  # one progress line per rank and epoch, as `anytrain train` prints per epoch
        assert f"rank {r} (stages [{r}]): epoch 2/2  loss " in p.stdout, p.stdout
    # the start-up line says what runs where: processes against cores, threads per rank, loopback process group
    first = p.stdout.splitlines()[0]
    assert first.startswith("anytrain dgl-parallel: 2 processes (one per DGL module) on "), first
    assert "1 thread(s) each" in first and "gloo process group over loopback" in first, first
    # history.json as the trainer writes it, rebuilt from the epoch snapshots: the same per-exit training loss
    # and validation accuracy per epoch as single-process DGL (the weights are identical epoch by epoch)
    single = json.loads((cfg.parent / "single" / "history.json").read_text())
    par_hist = json.loads((tmp_path / "par" / "history.json").read_text())
    assert [r["epoch"] for r in par_hist] == [r["epoch"] for r in single] == [1, 2]
    for a, b in zip(par_hist, single):
        assert a["val_acc"] == b["val_acc"]
        torch.testing.assert_close(torch.tensor(a["train_loss"]), torch.tensor(b["train_loss"]), rtol=1e-6, atol=0)
    assert (tmp_path / "par" / "training_curves.png").stat().st_size > 0


@pytest.mark.distributed
@pytest.mark.slow
def test_dead_rank_exits_nonzero_naming_it_then_resume_matches(reference, tmp_path: Path) -> None:
    cfg, ref = reference
    out = tmp_path / "par"
    # rank 1 dies in the middle of epoch 1 (14 steps per epoch)
    p, secs = run(cfg, out, "--timeout", "20", env={FAULT_ENV: "1:20"})
    assert p.returncode != 0
    assert "rank 1 failed" in p.stderr and secs < 60, (secs, p.stderr[-2000:])
    assert latest_complete_epoch(out) == 0
    resume = [sys.executable, "-m", "anytrain.train.parallel", "--resume", str(out)]
    p = subprocess.run(resume, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    par = weights(out / "model.pt")
    for k in ref:
        torch.testing.assert_close(par[k], ref[k], rtol=0, atol=0, msg=k)
    # replay-buffer mode runs to the end of the data and shuts down cleanly
    p, _ = run(cfg, tmp_path / "replay", "--buffer", "4")
    assert p.returncode == 0, p.stderr[-2000:]
    stats = json.loads((tmp_path / "replay" / "buffer_rank1.json").read_text())
    assert stats["puts"] == 28 and stats["draws"] >= 1


@pytest.mark.distributed
def test_replay_every_rank_takes_exactly_its_scheduled_steps_at_unequal_speeds(tmp_path: Path) -> None:
    # 3 ranks, 3 epochs of 14 batches: every rank's schedule has 42 steps. Rank 1 is made slower than its
    # producer (it must keep replaying after the producer's end of data) and rank 2 is then faster than its
    # producer (it must stop at 42 and wait, not keep stepping at lr 0 until the end of the data arrives).
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG.replace("exits: 2", "exits: 3").replace("epochs: 2", "epochs: 3"))
    out = tmp_path / "replay"
    p, _ = run(cfg, out, "--buffer", "3", env={SLOW_ENV: "1:0.03"})
    assert p.returncode == 0, p.stderr[-2000:]
    total = 3 * ((512 - 51) // 32)  # 51 of the 512 samples are the validation split
    for r in range(3):
        assert json.loads((out / f"rank{r}.json").read_text())["steps"] == total, r
        shard = torch.load(out / "checkpoints" / "final" / f"rank{r}.pt", map_location="cpu", weights_only=True)
        assert shard["steps"] == total and shard["scheduler"]["last_epoch"] == total, r
        assert shard["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12), r  # cosine's end
    puts = json.loads((out / "buffer_rank2.json").read_text())["puts"]
    assert puts == total  # rank 1 sent one batch per step it took


def test_bad_input_is_one_line_error(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG.replace("rule: {name: dgl}", "rule: {name: joint}"))
    p, _ = run(cfg, tmp_path / "x")
    assert p.returncode == 2 and "needs rule.name: dgl" in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.distributed
@pytest.mark.slow
def test_hanging_rank_is_named_and_job_ends_within_timeout(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    p, secs = run(cfg, tmp_path / "par", "--timeout", "5", env={FAULT_ENV: "1:3:hang"})
    assert p.returncode != 0
    assert "rank 1 died or stopped responding" in p.stderr, p.stderr[-2000:]
    assert secs < 60


def test_startup_note_explains_ranks_cores_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from anytrain.train import parallel

    monkeypatch.setattr(parallel, "_usable_cores", lambda: 2)
    monkeypatch.setattr(parallel.torch.cuda, "is_available", lambda: False)
    cfg = load_config(None, ["rule.name=dgl", "train.device=cpu"])
    # threads unset: the cores are shared out (torchrun's habit), one at least; the environment or config wins
    assert parallel.rank_threads(cfg, 4, {}) == 1
    assert parallel.rank_threads(cfg, 1, {}) == 2
    assert parallel.rank_threads(cfg, 4, {"OMP_NUM_THREADS": "3"}) is None
    assert parallel.rank_threads(load_config(None, ["rule.name=dgl", "train.threads=2"]), 4, {}) is None
    busy = parallel.startup_note(cfg, 4, {"OMP_NUM_THREADS": "1"})
    assert "4 processes (one per DGL module) on 2 CPU core(s), 1 thread(s) each" in busy
    assert "loopback" in busy and "4 threads on 2 core(s): the ranks take turns" in busy
    roomy = parallel.startup_note(cfg, 2, {"OMP_NUM_THREADS": "1"})
    assert "2 processes" in roomy and "take turns" not in roomy


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_two_ranks_in_half_precision_equal_single_process_dgl(tmp_path: Path, prec: str) -> None:
    # train.precision in dgl-parallel: the same autocast and per-module loss scalers as the trainer's DGL, the
    # boundary tensors in float32 in both: the weights agree bit for bit.
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        CONFIG.replace("epochs: 2,", "epochs: 1,").replace("plots: false}", f"plots: false, precision: {prec}}}")
    )
    Trainer(load_config(cfg), tmp_path / "single").fit()
    p, _ = run(cfg, tmp_path / "par")
    assert p.returncode == 0, p.stderr[-2000:]
    ref, par = weights(tmp_path / "single" / "checkpoint.pt"), weights(tmp_path / "par" / "model.pt")
    for k in ref:
        torch.testing.assert_close(par[k], ref[k], rtol=0, atol=0, msg=k)
