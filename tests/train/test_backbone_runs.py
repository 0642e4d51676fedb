"""Backbones in the trainer: model.weights, train.freeze (heads only), Trainer(net=...), model.name pkg.mod:fn."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from anytrain.config import load_config
from anytrain.nets import StagedNet, build_model
from anytrain.nets.weights import freeze, load_weights
from anytrain.registry import ConfigError
from anytrain.train import Trainer

FAST = [
    "data.name=synthetic",
    "data.options={shape: [1, 12, 12], num_classes: 4}",
    "data.batch_size=16",
    "data.augment=false",
    "model.name=resnet18-exits",
    "model.width=2",
    "train.epochs=2",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
    "optimizer.lr=0.05",
    "rule.name=joint",
]


def cfg_of(*extra: str):
    return load_config(None, FAST + list(extra))


def _plain_weights(tmp_path) -> str:
    # a backbone trained "without exits": the same recipe with one exit
    torch.manual_seed(1)
    plain = build_model("resnet18-exits", in_shape=(1, 12, 12), num_classes=4, width=2, exits=1)
    path = tmp_path / "plain.pt"
    torch.save(plain.backbone.state_dict(), path)
    return str(path)


def test_heads_only_leaves_trunk_and_batchnorm_statistics_bit_for_bit(tmp_path) -> None:
    weights = _plain_weights(tmp_path)
    tr = Trainer(cfg_of(f"model.weights={weights}", "train.freeze=trunk"), tmp_path / "run")
    before = {k: v.clone() for k, v in tr.net.backbone.state_dict().items()}
    heads_before = [p.detach().clone() for p in tr.net.head_parameters()]
    saved = torch.load(weights, weights_only=True)
    assert all(torch.equal(before[k], saved[k]) for k in saved)  # the file was loaded
    opt_params = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in tr.net.head_parameters()}  # the optimizer sees the heads only
    tr.fit()
    after = tr.net.backbone.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # weights, running means/vars, num_batches_tracked
    assert any(not torch.equal(a, b) for a, b in zip(tr.net.head_parameters(), heads_before))
    tr.net.train()
    assert not tr.net.backbone.bn1.training and tr.net.exits[0].training


def test_freeze_glob_and_bad_inputs(tmp_path) -> None:
    net = build_model("resnet18-exits", in_shape=(1, 12, 12), num_classes=4, width=2)
    names = freeze(net, "backbone.layer1.*")
    assert names and all(n.startswith("backbone.layer1.") for n in names)
    net.train()
    assert not net.backbone.layer1[0].bn1.training and net.backbone.layer2[0].bn1.training
    with pytest.raises(ValueError, match="freezes no parameter"):
        freeze(net, "nothing.*")
    with pytest.raises(ConfigError, match="train.freeze") as e:
        Trainer(cfg_of("train.freeze=backbone.nope*"), tmp_path / "bad")
    assert "\n" not in str(e.value) and not (tmp_path / "bad").exists()


def test_weights_of_another_model_and_safetensors(tmp_path) -> None:
    other = build_model("resnet18-exits", in_shape=(1, 12, 12), num_classes=4, width=4)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    net = build_model("resnet18-exits", in_shape=(1, 12, 12), num_classes=4, width=2)
    with pytest.raises(ValueError, match="another model; other shape") as e:
        load_weights(net, tmp_path / "other.pt")
    assert "\n" not in str(e.value)
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not in this model: (backbone.)?foo.weight"):
        load_weights(net, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match="model.weights"):
        Trainer(cfg_of(f"model.weights={tmp_path / 'foreign.pt'}"), tmp_path / "bad")
    st = pytest.importorskip("safetensors.torch")
    src = build_model("resnet18-exits", in_shape=(1, 12, 12), num_classes=4, width=2)
    st.save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    assert load_weights(net, tmp_path / "w.safetensors") == []
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), src.state_dict().values()))


class _Mine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(144, 16), nn.ReLU())
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.body(x))


def make_mine(in_shape, num_classes):
    """A user's builder for ``model.name: <module>:make_mine``."""
    from anytrain.nets import attach_exits

    return attach_exits(_Mine(), ["body"], num_classes, input_shape=in_shape)


def test_user_net_in_trainer_resumes(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = cfg_of("train.epochs=2")
    full = Trainer(cfg, tmp_path / "full", net=make_mine((1, 12, 12), 4))
    full.fit()
    torch.manual_seed(0)
    part = Trainer(cfg, tmp_path / "part", net=make_mine((1, 12, 12), 4))
    part.epochs = 1
    part.fit()
    torch.manual_seed(0)
    resumed = Trainer(cfg, tmp_path / "part", resume=True, net=make_mine((1, 12, 12), 4))
    assert resumed.start_epoch == 1
    resumed.fit()
    for a, b in zip(full.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)


def test_model_name_package_function(tmp_path) -> None:
    net = build_model(f"{__name__}:make_mine", in_shape=(1, 12, 12), num_classes=4)
    assert isinstance(net, StagedNet) and net.num_exits == 2
    with pytest.raises(ConfigError, match="cannot import"):
        build_model("no_such_pkg_xyz.mod:fn", in_shape=(1, 12, 12), num_classes=4)
    with pytest.raises(ConfigError, match="no function"):
        build_model(f"{__name__}:nope", in_shape=(1, 12, 12), num_classes=4)
    sys.modules[__name__].not_staged = lambda in_shape, num_classes: nn.Linear(2, 2)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="not a StagedNet"):
        build_model(f"{__name__}:not_staged", in_shape=(1, 12, 12), num_classes=4)


@pytest.mark.parametrize(
    "bad",
    ["train.freeze=nothing.*", "model.weights=/nonexistent/w.pt", "model.at=[layer9]", "model.at=[layer3,layer1]"],
)
def test_cli_bad_backbone_input_exits_2_and_writes_nothing(tmp_path, capsys, bad) -> None:
    from anytrain.cli import main

    out = tmp_path / "run"
    args = ["train", "--out", str(out)]
    for s in [*FAST, bad]:
        args += ["--set", s]
    assert main(args) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err
