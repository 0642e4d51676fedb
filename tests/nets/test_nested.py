"""Recursively nested nets: cost of ``upto=k``, containment, reuse, width/depth doubling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anytrain.nets import build_model, macs_of
from anytrain.nets.nested import BaseStage, GrowStage, nested_net

SMALL = [
    ("nested-width", (1, 40)),
    ("nested-depth", (1, 40)),
    ("nested-width-depth", (1, 40)),
    ("nested-width", (1, 8, 8)),
    ("nested-depth", (1, 8, 8)),
    ("nested-width-depth", (1, 8, 8)),
]


def _build(name, shape, **kw):
    torch.manual_seed(0)
    net = build_model(name, in_shape=shape, num_classes=5, **kw)
    net.eval()  # batch-norm statistics fixed: outputs are a function of the parameters only
    return net


@pytest.mark.parametrize("name,shape", SMALL)
def test_upto_costs_only_earlier_stages(name, shape):
    net = _build(name, shape)
    flops = net.flops_per_exit(shape)
    x = torch.randn(1, *shape)
    for k in range(net.num_exits):
        # the dispatched matmul/conv work of forward(upto=k) is exactly stages 0..k plus heads 0..k
        stage, head = net.flops_breakdown(shape)
        assert macs_of(net.forward, x, k) == sum(stage[: k + 1]) + sum(head[: k + 1])
        assert macs_of(net.forward_exit, x, k) == flops[k]
    assert all(a < b for a, b in zip(flops, flops[1:]))


def test_width_flops_by_hand():
    # 1-D, 2 layers of width 4, strides (1, 2), kernel 3, input (1, 16), 2 stages, no norm
    net = nested_net((1, 16), 3, stages=2, widths=[4, 4], strides=[1, 2], widen=True, deepen=False, norm="none")
    stage, head = net.flops_breakdown((1, 16))
    # stage 0: conv 1→4 at L=16 (3·1·4·16) + conv 4→4 at L=8 (3·4·4·8); head 4→3
    assert stage[0] == 3 * 1 * 4 * 16 + 3 * 4 * 4 * 8 and head[0] == 4 * 3
    # stage 1: new block of layer 1 reads x (1 ch) → 4 new ch at L=16; layer 2 reads 8 ch → 4 new ch at L=8
    assert stage[1] == 3 * 1 * 4 * 16 + 3 * 8 * 4 * 8 and head[1] == 8 * 3


def test_depth_flops_by_hand():
    net = nested_net((1, 16), 3, stages=2, widths=[4, 4], strides=[1, 2], widen=False, deepen=True, norm="none")
    stage, head = net.flops_breakdown((1, 16))
    # stage 1 inserts c_1 = f(conv(x, s1) + conv(h_1, 1)) at L=16 and c_2 = f(conv(c_1, s2) + conv(h_2, 1)) at L=8
    assert stage[1] == (3 * 1 * 4 * 16 + 3 * 4 * 4 * 16) + (3 * 4 * 4 * 8 + 3 * 4 * 4 * 8)
    assert head[1] == 4 * 3


@pytest.mark.parametrize("name,shape", SMALL)
def test_continue_from_equals_full_forward(name, shape):
    net = _build(name, shape)
    x = torch.randn(3, *shape)
    full = net(x)
    for k in range(net.num_exits - 1):
        state = net.states(x, upto=k)[-1]
        rest = net.continue_from(state, k + 1)
        early = net(x, upto=k)
        for a, b in zip(early + rest, full):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name,shape", SMALL)
def test_containment_later_params_do_not_change_earlier_outputs(name, shape):
    net = _build(name, shape)
    x = torch.randn(3, *shape)
    before = [o.clone() for o in net(x)]
    states_before = net.states(x)
    last = net.num_exits - 1
    with torch.no_grad():
        for p in list(net.stages[last].parameters()) + list(net.exits[last].parameters()):
            p.add_(torch.randn_like(p))
    after = net(x)
    for k in range(last):
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert not torch.allclose(after[last], before[last])
    # old channel blocks of the final state are unchanged: old channels never read new ones
    states_after = net.states(x)
    for pos_b, pos_a in zip(states_before[-2], states_after[-2]):
        for b, a in zip(pos_b, pos_a):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    final_b, final_a = states_before[-1], states_after[-1]
    prev = states_before[-2]
    # every block the previous stage produced is still there, unchanged, in the new state
    old_blocks = [t for blocks in prev for t in blocks]
    new_blocks = [t for blocks in final_a for t in blocks]
    for t in old_blocks:
        assert any(t.shape == u.shape and torch.equal(t, u) for u in new_blocks)
    del final_b


def test_state_reuse_is_by_reference():
    net = _build("nested-width-depth", (1, 40))
    x = torch.randn(2, 1, 40)
    s0 = net.states(x, upto=0)[-1]
    s1 = net.stages[1](s0)
    ids1 = {id(t) for blocks in s1 for t in blocks}
    assert all(id(t) in ids1 for blocks in s0 for t in blocks)  # no recomputation, no copy


def test_width_doubles_per_stage():
    net = nested_net((1, 16), 3, stages=4, widths=[4, 6], strides=[1, 2], widen=True, deepen=False)
    x = torch.randn(2, 1, 16)
    for k, st in enumerate(net.states(x)):
        assert len(st) == 3  # positions fixed
        assert [_width(b) for b in st[1:]] == [4 * 2**k, 6 * 2**k]


def test_depth_doubles_per_stage():
    net = nested_net((1, 16), 3, stages=4, widths=[4, 4], strides=[1, 2], widen=False, deepen=True)
    x = torch.randn(2, 1, 16)
    for k, st in enumerate(net.states(x)):
        assert len(st) - 1 == 2 * 2**k  # chain length (positions after the input) doubles
    # the newest column of stage k is a chain of 2^(k−1)·D new layers (its own path)
    assert [len(s.deep) for s in net.stages[1:]] == [2, 4, 8]
    assert all(isinstance(s, GrowStage) for s in net.stages[1:]) and isinstance(net.stages[0], BaseStage)


def test_width_depth_doubles_both():
    net = nested_net((1, 16), 3, stages=3, widths=[4, 4], strides=[1, 2], widen=True, deepen=True)
    x = torch.randn(2, 1, 16)
    sts = net.states(x)
    assert [len(s) - 1 for s in sts] == [2, 4, 8]
    assert [_width(s[-1]) for s in sts] == [4, 8, 16]


def test_new_layer_reads_previous_stage_at_that_depth():
    # perturbing h_2 (the previous stage's activation at depth 2) must change c_2 but not c_1
    net = nested_net((1, 16), 3, stages=2, widths=[4, 4], strides=[1, 2], widen=False, deepen=True)
    net.eval()
    x = torch.randn(2, 1, 16)
    s0 = net.stages[0](x)
    s1 = net.stages[1](s0)
    s0b = [list(b) for b in s0]
    s0b[2] = [s0b[2][0] + 1.0]
    s1b = net.stages[1](s0b)
    torch.testing.assert_close(s1b[2][0], s1[2][0], rtol=0, atol=0)  # c_1
    assert not torch.allclose(s1b[4][0], s1[4][0])  # c_2


@pytest.mark.parametrize("name", ["nested-width-vgg", "nested-depth-vgg", "nested-width-depth-vgg"])
def test_cifar_sized_builders(name):
    net = build_model(name, in_shape=(3, 32, 32), num_classes=100)
    flops = net.flops_per_exit((3, 32, 32))
    assert all(a < b for a, b in zip(flops, flops[1:]))
    assert flops[-1] > 5e7  # CIFAR-sized


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        build_model("nested-width", in_shape=(40,), num_classes=3)
    with pytest.raises(ValueError, match="stages"):
        build_model("nested-depth", in_shape=(1, 40), num_classes=3, stages=0)
    with pytest.raises(ValueError, match="norm"):
        build_model("nested-width", in_shape=(1, 40), num_classes=3, norm="layer")


def _width(blocks: list[torch.Tensor]) -> int:
    return sum(b.shape[1] for b in blocks)


def test_trains_all_exits():
    net = _build("nested-width", (1, 40), stages=2)
    net.train()
    x, y = torch.randn(16, 1, 40), torch.randint(0, 5, (16,))
    loss = sum(nn.functional.cross_entropy(z, y) for z in net(x))
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
