"""Typed configs: sections as dataclasses, YAML and ``--set`` layers, name selection, the YAML form kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from anytrain.config import (
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    ScheduleConfig,
    dump_config,
    load_config,
    resume_changes,
    safe_load,
)
from anytrain.registry import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_yaml_form_round_trips(tmp_path, path):
    """config.yaml (dump) reads back as the same config, and its YAML form is the file's keys over the defaults."""
    cfg = load_config(path)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "config.yaml") == cfg
    d, raw = cfg.to_dict(), safe_load(path.read_text())
    for sec, body in raw.items():
        if isinstance(body, dict) and sec not in ("data", "train"):
            assert d[sec] == body  # a named section holds exactly what the file gives it (a new name: nothing else)


def test_sections_validate_themselves():
    with pytest.raises(ConfigError, match=r"^optimizer.lr must be > 0, got -1$"):
        OptimizerConfig(name="sgd", lr=-1)
    with pytest.raises(ConfigError, match=r"^model.width must be an integer, got 2.5$"):
        ModelConfig(name="cnn1d-exits", width=2.5)
    with pytest.raises(ConfigError, match=r"^data.batch_size must be > 0"):
        DataConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"^schedule.milestones must be >= 0"):
        ScheduleConfig(name="step", milestones=[-1])
    with pytest.raises(ConfigError, match=r"^seed must be in \[0, 4294967296\)"):
        RunConfig(seed=-1)
    assert OptimizerConfig(name="adam").kwargs() == {}  # unset typed fields leave the builder's defaults
    o = OptimizerConfig(name="sgd", lr=0.1, options={"nesterov": True, "momentum_typo": 1})
    assert o.kwargs() == {"lr": 0.1, "nesterov": True, "momentum_typo": 1}


def test_null_is_a_value_only_where_the_key_allows_it():
    assert load_config(None, ["data.data_dir=null"]).data.data_dir is None
    with pytest.raises(ConfigError, match="optimizer.lr must be a number, got None"):
        load_config(None, ["optimizer.lr=null"])


def test_bare_section_name_selects_its_name():
    for sec, name in [("rule", "joint"), ("optimizer", "adam"), ("model", "cnn1d-exits"), ("data", "digits")]:
        assert load_config(None, [f"{sec}={name}"]) == load_config(None, [f"{sec}.name={name}"])
    assert load_config(None, ["rule=torchjd:UPGrad"]).rule.name == "torchjd:UPGrad"
    assert load_config(None, ["rule={name: weighted, weights: [1, 2, 3, 4]}"]).rule.options == {"weights": [1, 2, 3, 4]}
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(None, ["train=5"])  # train names nothing


def test_a_new_name_drops_the_previous_builders_options(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "data: {name: synthetic, batch_size: 16, options: {n_train: 64}}\n"
        "optimizer: {name: sgd, lr: 0.05, nesterov: true, momentum: 0.9}\nrule: {name: weighted, weights: [1, 2]}\n"
    )
    base = load_config(f)
    assert base.optimizer.options == {"nesterov": True}
    # a different optimizer: sgd's lr, momentum and nesterov are not adam's; the --set layer's own keys stay,
    # in whichever order they were given
    for sets in (["optimizer=adam", "optimizer.lr=0.01"], ["optimizer.lr=0.01", "optimizer.name=adam"]):
        assert load_config(f, sets).optimizer == OptimizerConfig(name="adam", lr=0.01)
    # the same name keeps everything; a change of a typed field keeps the options
    assert load_config(f, ["optimizer=sgd"]).optimizer == base.optimizer
    assert load_config(f, ["optimizer.lr=0.2"]).optimizer.options == {"nesterov": True}
    assert load_config(f, ["rule=osgd"]).rule.options == {}
    # data: a new data set drops the old one's options but keeps the generic keys (batch size, ...)
    d = load_config(f, ["data=digits"]).data
    assert d.name == "digits" and d.options == {} and d.batch_size == 16
    assert load_config(f, ["data.options.n_test=8"]).data.options == {"n_train": 64, "n_test": 8}
    # the file is a layer over the defaults too: its optimizer (same name) keeps the default weight decay
    assert base.optimizer.weight_decay == 5.0e-4


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'; known here: .*epochs"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'"):
        load_config(None, ["trian.epochs=3"])


@pytest.mark.parametrize(
    "sets,msg",
    [
        (["model.depth=3"], "model 'nested-width': unknown option(s) depth; allowed: stages, width, layers"),
        (["rule.bogus=1"], "rule 'osgd': unknown option(s) bogus; allowed:"),
        (
            ["data.options.bogus=1", "data=digits"],
            "data set 'digits': unknown option(s) bogus in data.options; it takes test_fraction",
        ),
    ],
)
def test_builders_check_options_against_their_signature(sets, msg):
    from anytrain.train import build_components

    with pytest.raises(ConfigError) as e:
        build_components(load_config(None, ["data=synthetic", *sets]))
    assert str(e.value).startswith(msg), str(e.value)


def test_build_scheduler_takes_a_name_and_options():
    import torch

    from anytrain.train.schedule import build_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    s = load_config(None, ["schedule=step", "schedule.milestones=[1]", "schedule.gamma=0.5"]).schedule
    sched = build_scheduler(s.name, opt, 4, 2, **s.kwargs())
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0, 1.0, 0.5, 0.5]
    with pytest.raises(ConfigError, match=r"^schedule 'cosine': unknown option\(s\) gamma; allowed: warmup_epochs"):
        build_scheduler("cosine", opt, 4, 2, gamma=0.5)


OLD_RUN = """# anytrain run: the fully resolved config of this run directory
seed: 0
data:
  name: synthetic
  data_dir: null
  num_samples: null
  batch_size: 32
  eval_batch_size: 1000
  augment: true
  val_size: auto
  options: {}
model:
  name: cnn1d-exits
  exits: 2
  width: 8
rule:
  name: joint
optimizer:
  name: adam
  betas: [0.9, 0.99]
  lr: 0.01
schedule:
  name: cosine
train:
  epochs: 2
  device: auto
  log_every: 20
  checkpoint_every: 1
  threads: 0
  progress: false
  tensorboard: false
  plots: false
  label_smoothing: 0.0
"""


def test_resumes_a_run_written_by_the_previous_version(tmp_path):
    """config.yaml as the dict-based version wrote it (a named section in the user's key order, options first)."""
    from anytrain.cli import main
    from anytrain.train import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OLD_RUN)
    cfg = load_config(run / "config.yaml")
    assert resume_changes(safe_load(OLD_RUN), cfg.to_dict()) == []
    # one epoch, then the checkpoint carries the old text as its config, as the previous version wrote it
    assert main(["train", "--resume", str(run), "--set", "train.threads=1"]) == 0
    ck = load_checkpoint(run / "checkpoint.pt")
    ck["epoch"], ck["config"] = 0, OLD_RUN
    save_checkpoint(run / "checkpoint.pt", ck)
    (run / "metrics.json").unlink()
    (run / "config.yaml").write_text(OLD_RUN)
    assert main(["train", "--resume", str(run)]) == 0


def test_docs_config_example_runs():
    import re

    text = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    exec(compile(code, "docs/config.md", "exec"), {})
