"""The throughput benchmark and the prepared GPU script: planning, measuring on tiny data, tables, CPU fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmark_modules import load

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


bt = load("bench_throughput")
bc = load("bench_cuda")

TINY = ["data.name=synthetic", "data.batch_size=16", "model.name=cnn1d-exits", "model.width=4", "model.exits=2"]


def test_plan_every_net_gets_plain_joint_osgd_and_the_default_net_every_rule_and_optimizer():
    rows = bt.plan_rows(bt.SECTIONS, list(bt.NETS), bt.GROUPS)
    keys = [r.key for r in rows]
    assert len(keys) == len(set(keys))
    for net in bt.NETS:
        for label in ("plain loop", "joint", "osgd", "osgd amortize=4", "bf16", "compile", "channels-last"):
            assert f"fashion/{net}/{label}" in keys
    for label in bt.RULES:
        assert f"fashion/nested-width/{label}" in keys
        assert label.startswith("osgd") or f"fashion/cnn2d-exits/{label}" not in keys
    assert all(f"fashion/nested-width/joint + {o}" in keys for o in bt.OPTIMIZERS)
    assert "default/nested-width/channels-last" not in keys  # 1-D: no channels-last row
    assert "default-run/nested-width/default run (30 epochs)" in keys
    assert {r.needs for r in rows if r.label in ("bf16", "fp16")} == {"precision"}


@pytest.mark.parametrize(("arg", "value"), [("--sections", "nope"), ("--nets", "resnet"), ("--groups", "all")])
def test_unknown_names_are_refused_in_one_line(arg, value, capsys):
    with pytest.raises(SystemExit) as e:
        bt.parse_args([arg, value])
    assert e.value.code == 2
    assert f"unknown {arg[2:-1]} {value!r}" in capsys.readouterr().err


def test_rows_measure_images_per_second_and_macs(tmp_path):
    plain = bt.Row("fashion", "tiny", "plain loop", "plain", TINY + ["rule.name=joint"])
    joint = bt.Row("fashion", "tiny", "joint", "trainer", TINY + ["rule.name=joint"])
    for row in (plain, joint):
        r = bt.measure(row, steps=2, device=torch.device("cpu"), threads=1, work=tmp_path)
        assert r["status"] == "ok" and r["batch"] == 16 and r["seconds"] > 0
        assert r["images_per_s"] == pytest.approx(r["steps"] * 16 / r["seconds"])
        assert r["train_macs_per_s"] == pytest.approx(3 * r["forward_macs"] * r["images_per_s"])


def test_forward_macs_count_every_stage_and_every_head():
    from anytrain.nets import build_model

    net = build_model("cnn1d-exits", in_shape=(1, 40), num_classes=10, width=4, exits=3)
    stage, head = net.flops_breakdown((1, 40))
    assert bt.forward_macs(net, (1, 40)) == sum(stage) + sum(head) > net.flops_per_exit((1, 40))[-1]


def test_an_option_this_branch_lacks_is_reported_not_run(tmp_path):
    row = bt.Row("fashion", "tiny", "bf16", "trainer", TINY + ["train.nothing=1"], needs="no_such_key")
    r = bt.measure(row, steps=1, device=torch.device("cpu"), threads=1, work=tmp_path)
    assert r == {"status": "not available on this branch (no train.no_such_key)"}


def test_table_fractions_ratios_and_targets():
    res = {
        "fashion/n/plain loop": {"status": "ok", "batch": 256, "images_per_s": 100.0, "train_macs_per_s": 5e9},
        "fashion/n/joint": {"status": "ok", "batch": 256, "images_per_s": 98.0, "train_macs_per_s": 4.9e9},
        "fashion/n/osgd": {"status": "ok", "batch": 256, "images_per_s": 49.0, "train_macs_per_s": 2.45e9},
        "fashion/n/osgd amortize=4": {"status": "ok", "batch": 256, "images_per_s": 90.0, "train_macs_per_s": 4.5e9},
        "fashion/n/bf16": {"status": "not available on this branch (no train.precision)"},
        "default/d/fashion epoch (osgd, batch 128)": {
            "status": "ok", "batch": 128, "images_per_s": 500.0, "train_macs_per_s": 1e9,
        },
        "default-run/d/default run (30 epochs)": {"status": "ok", "seconds": 31.0, "train_seconds": 25.0},
    }  # fmt: skip
    md = bt.build_table(res, peak=10e9)
    assert "| fashion | n | plain loop | 256 | 100 | 5.00 G | 50% | 0.98 |" in md
    assert "| fashion | n | osgd | 256 | 49 | 2.45 G | 24% | 2.00 |" in md
    assert "not available on this branch (no train.precision)" in md
    assert "| ≥ 40% of peak (fashion, n, joint) | 49% | met |" in md
    assert "| Trainer ≤ 1.05× plain loop time (fashion, n) | 1.02× | met |" in md
    assert "| osgd ≤ 1.6× joint (fashion, n) | 2.00× | **not met** |" in md
    assert "| osgd amortize=4 ≤ 1.15× joint (fashion, n) | 1.09× | met |" in md
    assert "≤ 120 s (from the timed window) | 110 s | met |" in md
    assert "| default run ≤ 30 s | 31.0 s | **not met** |" in md


def test_cuda_script_parts_and_sync_rows(capsys):
    a = bc.parse_args(["--parts", "sync", "cifar", "--budget", "60"])
    assert a.parts == ["sync", "cifar"] and a.budget == 60.0
    with pytest.raises(SystemExit):
        bc.parse_args(["--parts", "everything"])
    assert "unknown part 'everything'" in capsys.readouterr().err
    labels = [label for label, _ in bc.sync_rows(set())]
    assert labels[0] == "joint" and all(r in labels for r in bt.RULES)
    assert all(f"joint + {o}" in labels for o in bt.OPTIMIZERS) and "osgd + bf16" not in labels
    with_amp = [label for label, _ in bc.sync_rows({"precision", "compile", "channels_last"})]
    assert {"osgd + bf16", "osgd + fp16", "osgd + compile", "osgd + channels-last"} <= set(with_amp)


def test_cuda_tables():
    assert "| osgd | ok |" in bc.sync_table({"osgd": "ok"})
    t = bc.cifar_table({"a": {"batch": 64, "median_step_ms": 12.345, "peak_memory_mib": 900.4}, "b": "not run"})
    assert "| a | 64 | 12.35 ms | 900 MiB |" in t and "| b | | not run | |" in t


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
def test_cuda_script_without_a_device_says_so_and_writes_nothing(tmp_path, capsys):
    assert bc.main(["--out", str(tmp_path / "cuda")]) == 0
    assert "no CUDA device available" in capsys.readouterr().out
    assert not (tmp_path / "cuda").exists()


def test_repeats_run_round_robin_and_keep_the_median(tmp_path):
    a = bt.parse_args(["--out", str(tmp_path), "--threads", "1", "--steps", "1", "--repeats", "2"])
    rows = [bt.Row("fashion", "tiny", "joint", "trainer", TINY + ["rule.name=joint"])]
    state = bt.run(a, rows=rows)
    r = state["rows"]["fashion/tiny/joint"]
    assert len(r["samples"]) == 2 and r["images_per_s"] == pytest.approx(sum(r["samples"]) / 2)
    assert r["seconds"] == pytest.approx(r["steps"] * 16 / r["images_per_s"])
    assert (tmp_path / "throughput.md").is_file()
    again = bt.run(a, rows=rows)  # everything is there: nothing runs again
    assert again["rows"]["fashion/tiny/joint"]["samples"] == r["samples"]


def test_merge_repeat_median_of_three():
    base = {"status": "ok", "steps": 2, "batch": 10, "forward_macs": 100, "load": 1.0}
    r = bt.merge_repeat({}, {**base, "images_per_s": 30.0})
    r = bt.merge_repeat(r, {**base, "images_per_s": 10.0, "load": 3.0})
    r = bt.merge_repeat(r, {**base, "images_per_s": 20.0, "load": 2.0})
    assert r["samples"] == [30.0, 10.0, 20.0] and r["images_per_s"] == 20.0
    assert r["train_macs_per_s"] == 3 * 100 * 20.0 and r["seconds"] == 1.0 and r["load"] == pytest.approx(2.0)


def test_sync_check_runs_real_steps_and_reports_a_synchronising_one(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    tiny = [*TINY, "train.epochs=1"]
    assert bc.sync_check([*tiny, "rule.name=osgd"], steps=2, device="cpu") == "ok"
    assert modes == ["error", 0]  # on, then off again

    from anytrain.train import Trainer

    plain_step = Trainer.train_step

    def syncing_step(self, x, y):
        if modes[-1] == "error":
            raise RuntimeError("called a synchronizing CUDA operation\nmore")
        return plain_step(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", syncing_step)
    assert bc.sync_check(tiny, device="cpu") == "sync: called a synchronizing CUDA operation"


def test_profile_step_round_robin_times_every_rule():
    ps = load("profile_step")
    rules = {"joint": ["rule.name=joint"], "osgd": ["rule.name=osgd"], "osgd amortize=4": ["rule.amortize=4"]}
    t = ps.interleaved([*TINY, "rule.name=osgd"], rules, reps=4)
    assert set(t) == set(rules) and all(v > 0 for v in t.values())
