"""The command line: a short end-to-end run, eval/plot/list, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from anytrain.cli import main

SMALL = [
    "--set",
    "data.name=synthetic",
    "--set",
    "model.width=8",
    "--set",
    "train.epochs=1",
    "--set",
    "train.progress=false",
    "--set",
    "data.batch_size=32",
]


def test_train_eval_plot_list(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "exit" in text and "accuracy" in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "synthetic" and len(m["exits"]) == 4
    assert main(["eval", str(out)]) == 0
    assert "area under" in capsys.readouterr().out
    f = [e["flops"] for e in m["exits"]]
    assert main(["eval", str(out), "--deadline", str(f[1] + 1)]) == 0
    assert f"exit 1 ({f[1]:,d} MACs)" in capsys.readouterr().out
    assert main(["eval", str(out), "--deadline", "1"]) == 2
    assert "below the first exit" in capsys.readouterr().err
    # budgeted: thresholds fitted on validation, the realised validation mean within the budget
    budget = m["early_exit_flops"][0] * 0.5 + m["early_exit_flops"][-1] * 0.5
    assert main(["eval", str(out), "--budget", str(budget)]) == 0
    text = capsys.readouterr().out
    assert "fitted on validation" in text and "test:" in text
    val_mean = float(text.split("validation: accuracy")[1].split("mean")[1].split("MACs")[0].replace(",", ""))
    assert val_mean <= budget + 1
    assert main(["eval", str(out), "--budget", "1"]) == 2
    assert "below the first exit" in capsys.readouterr().err
    assert main(["plot", str(out)]) == 0
    assert "accuracy_vs_flops.png" in capsys.readouterr().out
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    for word in ("cnn1d-exits", "joint", "sgd", "mnist1d", "cosine"):
        assert word in listing
    # a finished run is never overwritten by accident
    before = (out / "metrics.json").read_bytes()
    assert main(["train", *SMALL, "--out", str(out)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before
    assert main(["train", "--resume", str(out)]) == 2


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--set", "model.name=nope"], "unknown model 'nope'; known:"),
        (["--set", "rule.name=nope"], "unknown rule 'nope'; known:"),
        (["--set", "optimizer.name=nope"], "unknown optimizer 'nope'; known:"),
        (["--set", "data.name=nope"], "unknown data set 'nope'; known:"),
        (["--set", "optimizer.lr=-1"], "optimizer.lr must be > 0"),
        (["--set", "train.epochs=0"], "train.epochs must be > 0"),
        (["--set", "train.epochz=3"], "unknown config key 'train.epochz'"),
        (["--set", "data.batch_size=abc"], "data.batch_size must be an integer"),
        (["--set", "data.name=cifar10"], "cifar"),
        (["--set", "rule.name=weighted", "--set", "rule.weights=[1,2]"], "2 weights but the network has 4"),
        (["--set", "model.bogus=1"], "model 'nested-width'"),
        (["no-such-config.yaml"], "config file not found"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, msg):
    out = tmp_path / "run"
    code = main(["train", *args, "--set", "train.progress=false", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("anytrain: error:")
    assert msg in err
    assert not out.exists()


def test_data_options_pass_through(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *SMALL, "--set", "data.options.shape=[1,12]", "--set", "data.options.num_classes=3"]
    assert main([*args, "--out", str(out)]) == 0
    assert "(1, 12)" in (out / "config.yaml").read_text() or "- 12" in (out / "config.yaml").read_text()
    assert main(["train", *SMALL, "--set", "data.options.nope=1", "--out", str(tmp_path / "b")]) == 2
    assert "nope" in capsys.readouterr().err


def test_any_torch_optimizer_by_name(tmp_path):
    assert (
        main(
            [
                "train",
                *SMALL,
                "--set",
                "optimizer.name=rmsprop",
                "--set",
                "optimizer.lr=0.001",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["optimizer"] == "rmsprop"


def test_exponent_floats_are_numbers(tmp_path):
    """PyYAML's YAML 1.1 reads ``1e-3`` as a string; configs and --set must get a float."""
    from anytrain.config import load_config, parse_value

    assert parse_value("1e-3") == pytest.approx(1e-3) and isinstance(parse_value("1e-3"), float)
    assert parse_value("-2E+2") == -200.0 and parse_value("5") == 5 and parse_value("1e3x") == "1e3x"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optimizer: {name: adam, lr: 1e-3, weight_decay: 5e-4}\n")
    cfg = load_config(cfg_file, ["schedule.warmup_epochs=0"])
    assert cfg.optimizer.lr == pytest.approx(1e-3) and cfg.optimizer.weight_decay == pytest.approx(5e-4)


def test_dgl_parallel_subcommand_is_wired(capsys):
    with pytest.raises(SystemExit) as e:
        main(["dgl-parallel", "--help"])
    assert e.value.code == 0
    assert "anytrain dgl-parallel" in capsys.readouterr().out
    assert main(["dgl-parallel", "--out", "unused", "--set", "rule.name=joint"]) == 2
    assert "needs rule.name: dgl" in capsys.readouterr().err


def test_ctrl_c_says_how_far_the_run_got_and_how_to_continue(tmp_path, capsys, monkeypatch):
    from anytrain.train.trainer import Trainer

    end_epoch = Trainer._end_epoch

    def interrupt_after_second(self, epoch, loss):
        end_epoch(self, epoch, loss)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_end_epoch", interrupt_after_second)
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--set", "train.epochs=4", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("anytrain: error: interrupted (epoch 2 of 4 done); the last good checkpoint"), err
    assert f"continue with --resume {out}" in err
