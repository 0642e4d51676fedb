"""MSDNet: shapes per exit, the layer plan, and multiply-adds against a count written out by hand."""

from __future__ import annotations

import pytest
import torch

from anytrain.nets import StagedNet, build_model
from anytrain.nets.msdnet import block_steps, scale_plan

TINY = dict(
    in_shape=(1, 8, 8),
    num_classes=3,
    blocks=2,
    base=1,
    step=2,
    scales=2,
    channels=2,
    growth=2,
    scale_widths=[1, 2],
    bottleneck_widths=[1, 2],
    head_channels=4,
    reduction=0.5,
)


def test_block_steps_and_scale_plans_follow_msdnet():
    assert block_steps(4, 4, 2, "even") == [4, 2, 2, 2]
    assert block_steps(5, 1, 1, "lin_grow") == [1, 2, 3, 4, 5]  # step·k + 1
    # max pruning, 7 layers, 3 scales: interval ⌈7/3⌉ = 3; layer l keeps 3 − ⌊(l−1)/3⌋ and reads 3 − ⌊(l−2)/3⌋
    assert scale_plan(7, 3, "max") == [
        (3, 3, False),
        (3, 3, False),
        (3, 3, False),
        (3, 2, True),
        (2, 2, False),
        (2, 2, False),
        (2, 1, True),
    ]
    # min pruning keeps min(3, L−l+1) scales; transitions after layers ⌊7/3⌋ = 2 and ⌊14/3⌋ = 4
    assert scale_plan(7, 3, "min") == [
        (3, 3, False),
        (3, 3, True),
        (3, 3, False),
        (3, 3, True),
        (3, 3, False),
        (3, 2, False),
        (2, 1, False),
    ]


def test_tiny_shapes_per_stage_and_exit():
    net = build_model("msdnet", **TINY)
    assert isinstance(net, StagedNet) and net.num_exits == 2
    x = torch.randn(5, 1, 8, 8)
    s0, s1 = net.states(x)
    # after block 0 (stem + 1 layer, c = 2 + 2): scale 0 holds 4·1 channels at 8×8, scale 1 holds 4·2 at 4×4
    assert [tuple(t.shape) for t in s0] == [(5, 4, 8, 8), (5, 8, 4, 4)]
    # block 1: two layers (c = 8), the second drops scale 0; the transition compresses to ⌊0.5·8⌋·2 = 8 channels
    assert [tuple(t.shape) for t in s1] == [(5, 8, 4, 4)]
    assert [tuple(o.shape) for o in net(x)] == [(5, 3), (5, 3)]


def test_tiny_macs_match_a_hand_count():
    net = build_model("msdnet", **TINY)
    # Multiply-adds of one 8×8 grey image (conv: H_out·W_out·k²·C_in·C_out; linear: in·out).
    # Stem: 3×3 1→2 at 8×8 = 64·9·2 = 1152; 3×3/2 2→4 to 4×4 = 16·9·8 = 1152.
    stem = 1152 + 1152
    # Layer 1 (c = 2; scale 0: 2 ch, scale 1: 4 ch). Scale 0 (finest, nothing finer): same-scale branch of
    # growth·1 = 2 channels, bottleneck min(2, 1·2) = 2: 1×1 64·2·2 = 256, 3×3 64·9·2·2 = 2304.
    # Scale 1: 2·2 = 4 new channels, half per branch. same: bottleneck min(4, 2·2) = 4: 16·4·4 = 256,
    # 3×3 4→2: 16·9·4·2 = 1152; down from scale 0: bottleneck min(2, 1·2) = 2: 64·2·2 = 256, 3×3/2 2→2: 16·9·4 = 576.
    layer1 = (256 + 2304) + (256 + 1152 + 256 + 576)
    # Exit head on scale 1 (c·2 channels at 4×4): 3×3/2 → 2×2: 4·9·C·4; 3×3/2 4→4 → 1×1: 9·16 = 144; linear 4·3 = 12.
    head = lambda C: 4 * 9 * C * 4 + 144 + 12  # noqa: E731
    # Layer 2 (c = 4; 4 and 8 ch). Scale 0: bottleneck min(4, 2) = 2: 64·4·2 = 512, 3×3: 2304.
    # Scale 1: same: min(8, 4) = 4: 16·8·4 = 512, 3×3 4→2: 1152; down: min(4, 2) = 2: 64·4·2 = 512, 3×3/2: 576.
    layer2 = (512 + 2304) + (512 + 1152 + 512 + 576)
    # Layer 3 (c = 6; 6 and 12 ch) keeps scale 1 only, reading scale 0 through its down branch.
    # same: min(12, 4) = 4: 16·12·4 = 768, 3×3: 1152; down: min(6, 2) = 2: 64·6·2 = 768, 3×3/2: 576.
    layer3 = 768 + 1152 + 768 + 576
    # Transition after the scale was dropped (c = 8 → ⌊0.5·8⌋ = 4): 1×1 16→8 at 4×4 = 16·16·8 = 2048.
    transition = 2048
    stage, heads = net.flops_breakdown((1, 8, 8))
    assert stage == [stem + layer1, layer2 + layer3 + transition]
    assert heads == [head(8), head(8)]
    assert net.flops_per_exit((1, 8, 8)) == [
        stem + layer1 + head(8),
        stem + layer1 + layer2 + layer3 + transition + head(8),
    ]


@pytest.mark.parametrize(
    ("shape", "kw", "exits", "coarsest"),
    [
        ((1, 28, 28), {}, 7, 7),  # Fashion-MNIST: cifar stem, scales 28/14/7
        ((3, 32, 32), {"blocks": 3, "prune": "min", "stepmode": "lin_grow", "base": 1, "step": 1}, 3, 8),
    ],
)
def test_sizes_for_grey_and_cifar_inputs(shape, kw, exits, coarsest):
    net = build_model("msdnet", in_shape=shape, num_classes=10, **kw)
    assert net.num_exits == exits
    x = torch.randn(2, *shape)
    assert net.states(x)[-1][-1].shape[-1] == coarsest
    assert all(o.shape == (2, 10) for o in net(x))
    f = net.flops_per_exit(shape)
    assert all(a < b for a, b in zip(f, f[1:]))


@pytest.mark.slow
def test_imagenet_variant_matches_published_flops():
    # The ImageNet MSDNet with 5 blocks of 7 layers (base = step = 7, 4 scales, 32 channels, growth 16) is the
    # model whose costs are published as 0.62 / 1.44 / 2.28 / 2.97 / 3.25 GFLOPs (MSDNet, IMTA). Those figures count
    # the classifiers of every exit up to k (anytime evaluation runs them all) and also ReLU/pooling elements
    # (under 0.006 G): conv + linear multiply-adds alone lie at most that plus the rounding (0.005) below them.
    net = build_model("msdnet", in_shape=(3, 224, 224), num_classes=1000, base=7, step=7)
    assert net.stages[0].stem is not None and len(net.stages[0].stem.layers) == 4  # 7×7 stem + 3 coarser scales
    stage, head = net.flops_breakdown((3, 224, 224))
    ours = [(sum(stage[: k + 1]) + sum(head[: k + 1])) / 1e9 for k in range(5)]
    for o, p in zip(ours, [0.62, 1.44, 2.28, 2.97, 3.25]):
        assert p - 0.011 <= o <= p + 0.005, ours
    with torch.no_grad():
        assert [tuple(o.shape) for o in net.eval()(torch.zeros(1, 3, 224, 224))] == [(1, 1000)] * 5


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"stepmode": "linear"}, "stepmode"),
        ({"prune": "none"}, "prune"),
        ({"growth": 3, "scale_widths": [1, 1, 1]}, "even"),
        ({"scale_widths": [1, 2]}, "one entry per scale"),
        ({"reduction": 1.5}, "reduction"),
        ({"bottleneck": "no"}, "bottleneck"),
        ({"scale_widths": [1, 2.5, 4]}, "scale_widths"),
        ({"head_channels": 0}, "head_channels"),
        ({"stem": "tiny"}, "stem"),
        ({"in_shape": (1, 40)}, "shape"),
    ],
)
def test_bad_options_are_one_line_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_model("msdnet", **{"in_shape": (1, 28, 28), **kw})


def test_trains_in_the_trainer_with_gradient_equilibrium(tmp_path):
    import json

    from anytrain.config import load_config
    from anytrain.train import Trainer

    sets = [
        "data.name=synthetic",
        "data.batch_size=32",
        "data.options.shape=[1, 8, 8]",
        "data.options.num_classes=4",
        "data.options.noise=0.5",
        "data.options.n_train=256",
        "data.options.n_test=64",
        "model.name=msdnet",
        "model.blocks=3",
        "model.base=1",
        "model.step=1",
        "model.scales=2",
        "model.channels=4",
        "model.growth=4",
        "model.head_channels=8",
        "rule.name=gradient-equilibrium",
        "optimizer.name=sgd",
        "optimizer.lr=0.05",
        "optimizer.momentum=0.9",
        "train.epochs=2",
        "train.progress=false",
        "train.tensorboard=false",
        "train.plots=false",
    ]
    m = Trainer(load_config(None, sets), tmp_path / "run").fit()
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    first, last = history[0]["train_loss"], history[-1]["train_loss"]
    assert all(b < a for a, b in zip(first, last)), (first, last)
    assert [e["flops"] for e in m["exits"]] == build_model(
        "msdnet", in_shape=(1, 8, 8), num_classes=4, blocks=3, base=1, step=1, scales=2, channels=4, growth=4,
        head_channels=8,
    ).flops_per_exit((1, 8, 8))  # fmt: skip
