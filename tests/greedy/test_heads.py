"""Auxiliary heads: shapes, closed-form multiply-add counts, no in-place changes to the input."""

from __future__ import annotations

import pytest
import torch

from anytrain.nets.heads import HEADS, head_macs, make_head
from anytrain.registry import ConfigError


@pytest.mark.parametrize("dims,shape", [(0, (16,)), (1, (16, 9)), (2, (16, 7, 5))])
@pytest.mark.parametrize("kind", ["linear", "mlp-sr"])
def test_head_shapes_and_input_untouched(kind: str, dims: int, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    head = make_head(kind, 16, 10, dims)
    x = torch.randn(3, *shape)
    x0 = x.clone()
    out = head(x)
    assert out.shape == (3, 10)
    assert torch.equal(x, x0)


def test_linear_head_is_mean_then_affine() -> None:
    head = make_head("linear", 4, 3, dims=2)
    x = torch.randn(2, 4, 5, 6)
    lin = head[-1]
    ref = x.mean(dim=(2, 3)) @ lin.weight.T + lin.bias
    torch.testing.assert_close(head(x), ref)


def test_mlp_sr_pools_to_2x2_regardless_of_resolution() -> None:
    # The head sees only the 2x2 block means: two inputs with equal block means give equal logits.
    torch.manual_seed(1)
    head = make_head("mlp-sr", 3, 4, dims=2)
    x = torch.randn(1, 3, 8, 8)
    blocks = x.unfold(2, 4, 4).unfold(3, 4, 4).mean(dim=(-1, -2))  # (1, 3, 2, 2)
    y = blocks.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    torch.testing.assert_close(head(x), head(y))


@pytest.mark.parametrize("dims,spatial", [(1, (11,)), (2, (9, 9))])
def test_head_macs_closed_form(dims: int, spatial: tuple[int, ...]) -> None:
    c, h, k, layers = 16, 24, 10, 3
    grid = 2**dims
    head = make_head("mlp-sr", c, k, dims, hidden=h, layers=layers)
    # 1x1 convs on the 2x2 (or length-2) grid, then the linear classifier on hidden*grid features.
    expected = grid * (c * h + (layers - 1) * h * h) + h * grid * k
    assert head_macs(head, (c, *spatial)) == expected
    assert head_macs(make_head("linear", c, k, dims), (c, *spatial)) == c * k


def test_unknown_head_and_bad_options() -> None:
    assert set(HEADS) >= {"linear", "mlp-sr"}
    with pytest.raises(ConfigError, match="unknown head"):
        make_head("nope", 4, 2, 2)
    with pytest.raises(ConfigError, match="mlp-sr"):
        make_head("mlp-sr", 4, 2, 2, widht=3)
    with pytest.raises(ValueError, match="dims"):
        make_head("linear", 4, 2, 3)
