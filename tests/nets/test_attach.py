"""attach_exits: a staged net cut out of a user's model (ResNet-18, a transformers ViT, a non-sequential net)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from anytrain.nets import StagedNet, attach_exits, build_model


# ---- torchvision's ResNet-18 layout, written here (torchvision is not installed in the test environment) -------
class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)  # called twice, as in torchvision
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class _ResNet18(nn.Module):
    def __init__(self, w: int = 4, classes: int = 7) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, layers = w, []
        for i, c in enumerate([w, 2 * w, 4 * w, 8 * w]):
            layers.append(nn.Sequential(_Basic(cin, c, 1 if i == 0 else 2), _Basic(c, c, 1)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


AT = ["layer1", "layer2.0", "layer3"]


def _hooked(model: nn.Module, names: list[str], x: Tensor) -> tuple[list[Tensor], Tensor]:
    seen: dict[str, Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.clone())) for n in names
    ]
    out = model(x)
    for h in handles:
        h.remove()
    return [seen[n] for n in names], out


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)


def test_resnet18_eval_exact_and_features_are_the_hooked_ones() -> None:
    model = _ResNet18()
    _randomize_bn(model)
    model.eval()
    net = attach_exits(model, AT, 7, input_shape=(3, 32, 32))
    assert isinstance(net, StagedNet) and net.num_exits == 4 and not net.training
    x = torch.randn(5, 3, 32, 32)
    feats, want = _hooked(model, AT, x)
    assert torch.equal(net(x)[-1], want)
    states = net.states(x)
    for k, f in enumerate(feats):
        assert torch.equal(states[k][0], f)
        assert torch.equal(net(x)[k], net.exits[k].head(f))
    # upto / continue_from / forward_exit, and any batch size (1 too)
    assert len(net(x, upto=1)) == 2
    assert torch.equal(net.continue_from(states[1], 2)[-1], want)
    assert torch.equal(net.forward_exit(x[:1], 3), model(x[:1]))


def test_resnet18_train_mode_matches_model_and_batchnorm_statistics() -> None:
    model = _ResNet18()
    ref = copy.deepcopy(model)
    net = attach_exits(model, AT, 7, input_shape=(3, 32, 32))
    net.train()
    ref.train()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(net(x)[-1], ref(x))
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n  # running statistics updated exactly as the model's own forward does


def test_parameters_are_the_models_own_and_train_it() -> None:
    model = _ResNet18()
    net = attach_exits(model, AT, 7, input_shape=(3, 32, 32))
    own = {id(p) for p in model.parameters()}
    trunk = net.trunk_parameters()
    assert {id(p) for p in trunk} == own  # every weight the forward uses, no copies
    assert [n for n, _ in net.named_parameters()][: len(own)] == [f"backbone.{n}" for n, _ in model.named_parameters()]
    # stage partition: disjoint, in forward order
    per_stage = [{id(p) for p in st.parameters()} for st in net.stages]
    assert sum(len(s) for s in per_stage) == len(own)
    assert id(model.layer1[0].conv1.weight) in per_stage[0] and id(model.fc.weight) in per_stage[-1]
    # gradients reach the model; a step through the staged net changes the model
    w0 = model.layer2[0].conv1.weight.detach().clone()
    sum(o.square().mean() for o in net(torch.randn(2, 3, 32, 32))).backward()
    assert model.layer2[0].conv1.weight.grad is not None
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert not torch.equal(model.layer2[0].conv1.weight, w0)
    # state dict: the model's keys under backbone., heads under exits.; round trip
    sd = net.state_dict()
    assert all(k.startswith(("backbone.", "exits.")) for k in sd)
    net.load_state_dict(copy.deepcopy(sd))


class _TwoPath(nn.Module):
    """A user's net whose forward is not a chain: two branches, a skip from the input, a shared layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.c = nn.Linear(8, 8)
        self.out = nn.Linear(8 + 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        u = self.b(h)
        v = self.c(u) + h * 0.5  # h lives across the cut after b
        return self.out(torch.cat([v, x], dim=1))  # x too


def test_non_sequential_forward_carries_what_crosses_the_cut() -> None:
    model = _TwoPath().eval()
    net = attach_exits(model, ["a", "b"], 3, input_shape=(6,))
    x = torch.randn(5, 6)
    feats, want = _hooked(model, ["a", "b"], x)
    out = net(x)
    assert torch.equal(out[-1], want)
    s0, s1 = net.states(x, upto=1)
    assert torch.equal(s0[0], feats[0]) and torch.equal(s1[0], feats[1])
    carried = [t for t in s1[1:] if isinstance(t, Tensor)]
    assert any(torch.equal(t, x) for t in carried)  # the input is still needed by the last stage
    assert any(t.shape == (5, 8) for t in carried)  # relu(a(x)), the skip


def test_bad_split_points_are_one_line() -> None:
    model = _ResNet18()
    for at, msg in [
        (["layer9"], "not a submodule"),
        (["layer3", "layer1"], "out of order"),
        (["fc"], "model's output"),
    ]:
        with pytest.raises(ValueError, match=msg) as e:
            attach_exits(model, at, 7, input_shape=(3, 32, 32))
        assert "\n" not in str(e.value)


def test_branch_on_training_is_refused() -> None:
    class Sneaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.a(x)
            return self.b(h * 2 if self.training else h)

    with pytest.raises(ValueError, match="self.training"):
        attach_exits(Sneaky(), ["a"], 2, input_shape=(4,))


def test_recipes_for_small_images() -> None:
    for name, kw in [("resnet18-exits", {"width": 4}), ("vit-exits", {"width": 16, "depth": 2, "exits": 2})]:
        for shape in [(1, 28, 28), (3, 32, 32)]:
            net = build_model(name, in_shape=shape, num_classes=10, **kw)
            out = net(torch.randn(3, *shape))
            assert len(out) == net.num_exits and all(o.shape == (3, 10) for o in out)
            macs = net.flops_per_exit(shape)
            assert macs == sorted(macs) and macs[0] > 0


def _tiny_vit() -> nn.Module:
    tf = pytest.importorskip("transformers")
    cfg = tf.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=5,
    )
    torch.manual_seed(0)
    return tf.ViTForImageClassification(cfg)


def test_transformers_vit_exact_with_token_heads() -> None:
    model = _tiny_vit()
    layers = [n for n, _ in model.named_modules() if n.count(".") == 2 and n.startswith("vit.")]
    layers = [n for n in layers if n.rsplit(".", 1)[-1].isdigit()][:2]  # vit.layers.0/1 (or vit.encoder.layer.*)
    net = attach_exits(model, layers, 5, input_shape=(1, 16, 16), token_pool="mean")
    net.eval()
    x = torch.randn(3, 1, 16, 16)
    feats, want = _hooked(model, layers, x)
    want_logits = want.logits
    out = net(x)
    assert torch.equal(out[-1], want_logits)
    for k, f in enumerate(feats):
        f = f if isinstance(f, Tensor) else f[0]
        assert torch.equal(net.states(x)[k][0], f)
        head = net.exits[k].head
        assert torch.equal(out[k], head.fc(head.norm(f.mean(dim=1))))
    assert net(x[:1])[-1].shape == (1, 5)


def test_torchvision_resnet18_when_available() -> None:
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=4).eval()
    net = attach_exits(model, ["layer1", "layer2", "layer3"], 4, input_shape=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(net(x)[-1], model(x))
