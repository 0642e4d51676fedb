"""Auxiliary heads: shapes, closed-form multiply-add counts, no in-place changes to the input, and the DGL
heads against the authors' released layout (state dicts written out by hand here, forward recomputed with
functional calls)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from anytrain.nets import build_model
from anytrain.nets.heads import HEADS, head_macs, make_head
from anytrain.registry import ConfigError


@pytest.mark.parametrize("dims,shape", [(0, (16,)), (1, (16, 9)), (2, (16, 7, 5))])
@pytest.mark.parametrize("kind", ["linear", "conv1x1", "cnn", "mlp", "mlp-sr"])
def test_head_shapes_and_input_untouched(kind: str, dims: int, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    if dims == 0 and kind in ("cnn", "mlp", "mlp-sr"):
        with pytest.raises(ValueError, match="1-D or 2-D"):
            make_head(kind, 16, 10, dims)
        return
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


def test_conv1x1_pools_to_2x2_regardless_of_resolution() -> None:
    # The head sees only the 2x2 block means: two inputs with equal block means give equal logits.
    torch.manual_seed(1)
    head = make_head("conv1x1", 3, 4, dims=2)
    x = torch.randn(1, 3, 8, 8)
    blocks = x.unfold(2, 4, 4).unfold(3, 4, 4).mean(dim=(-1, -2))  # (1, 3, 2, 2)
    y = blocks.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    torch.testing.assert_close(head(x), head(y))


@pytest.mark.parametrize("dims,spatial", [(1, (11,)), (2, (9, 9))])
def test_head_macs_closed_form(dims: int, spatial: tuple[int, ...]) -> None:
    c, h, k, layers = 16, 24, 10, 3
    grid = 2**dims
    head = make_head("conv1x1", c, k, dims, hidden=h, layers=layers)
    # 1x1 convs on the 2x2 (or length-2) grid, then the linear classifier on hidden*grid features.
    expected = grid * (c * h + (layers - 1) * h * h) + h * grid * k
    assert head_macs(head, (c, *spatial)) == expected
    assert head_macs(make_head("linear", c, k, dims), (c, *spatial)) == c * k
    # mlp-sr: 1x1 convs on the ceil(S/4) map, then the MLP on g*C features
    cells = math.prod(math.ceil(s / 4) for s in spatial)
    f = grid * c
    assert head_macs(make_head("mlp-sr", c, k, dims), (c, *spatial)) == 3 * cells * c * c + 3 * f * f + f * k


def test_unknown_head_and_bad_options() -> None:
    assert set(HEADS) >= {"linear", "conv1x1", "cnn", "mlp", "mlp-sr"}
    with pytest.raises(ConfigError, match="unknown head"):
        make_head("nope", 4, 2, 2)
    with pytest.raises(ConfigError, match="conv1x1"):
        make_head("conv1x1", 4, 2, 2, widht=3)
    with pytest.raises(ValueError, match="dims"):
        make_head("linear", 4, 2, 3)
    with pytest.raises(ValueError, match="layers"):
        make_head("mlp", 4, 2, 2, layers=0)


# ---------------------------------------------------------------------------------------------------------
# The released layout (eugenium/DGL, auxiliary_nets_study/models.py, class auxillary_classifier2), written
# out by hand: n_lin conv(no bias)+BN blocks of width C (3x3 for "cnn", 1x1 otherwise), a BN "bn" on the
# pooled map (built always, used only without an MLP), and a classifier: mlp_layers x (Linear 4C->4C, BN1d,
# ReLU) then Linear 4C->classes, or a single Linear 4C->classes.

RELEASED = {  # aux_type: (n_lin, mlp_layers, cnn)
    "mlp": (0, 3, False),
    "mlp-sr": (3, 3, False),
    "cnn": (2, 0, True),
    "last": (0, 2, False),  # the head of the last module
}


def _bn_entries(prefix: str, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": 1 + 0.1 * torch.randn(n, generator=gen),
        f"{prefix}.bias": 0.1 * torch.randn(n, generator=gen),
        f"{prefix}.running_mean": 0.1 * torch.randn(n, generator=gen),
        f"{prefix}.running_var": 1 + torch.rand(n, generator=gen),
        f"{prefix}.num_batches_tracked": torch.tensor(7),
    }


def _released_state(aux: str, c: int, classes: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    n_lin, mlp_layers, cnn = RELEASED[aux]
    k = 3 if cnn else 1
    sd: dict[str, torch.Tensor] = {}
    for i in range(n_lin):
        sd[f"blocks.{i}.0.weight"] = torch.randn(c, c, k, k, generator=gen) / math.sqrt(c * k * k)
        sd |= _bn_entries(f"blocks.{i}.1", c, gen)
    sd |= _bn_entries("bn", c, gen)
    f = 4 * c
    if mlp_layers:
        for i in range(mlp_layers):
            sd[f"classifier.{3 * i}.weight"] = torch.randn(f, f, generator=gen) / math.sqrt(f)
            sd[f"classifier.{3 * i}.bias"] = 0.1 * torch.randn(f, generator=gen)
            sd |= _bn_entries(f"classifier.{3 * i + 1}", f, gen)
        last = f"classifier.{3 * mlp_layers}"
    else:
        last = "classifier"
    sd[f"{last}.weight"] = torch.randn(classes, f, generator=gen) / math.sqrt(f)
    sd[f"{last}.bias"] = 0.1 * torch.randn(classes, generator=gen)
    return sd


def _released_forward(aux: str, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The released forward in eval mode, with functional calls on the hand-written state dict."""
    n_lin, mlp_layers, cnn = RELEASED[aux]

    def bn(prefix: str, t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            t, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"]
        )

    in_size = x.shape[-1]
    if not cnn:
        x = F.adaptive_avg_pool2d(x, (math.ceil(in_size / 4), math.ceil(in_size / 4)))
    for i in range(n_lin):
        x = F.relu(bn(f"blocks.{i}.1", F.conv2d(x, sd[f"blocks.{i}.0.weight"], padding=1 if cnn else 0)))
    x = F.adaptive_avg_pool2d(x, (2, 2))
    if not mlp_layers:
        x = bn("bn", x)
        return F.linear(x.flatten(1), sd["classifier.weight"], sd["classifier.bias"])
    x = x.flatten(1)
    for i in range(mlp_layers):
        x = F.relu(
            bn(f"classifier.{3 * i + 1}", F.linear(x, sd[f"classifier.{3 * i}.weight"], sd[f"classifier.{3 * i}.bias"]))
        )
    return F.linear(x, sd[f"classifier.{3 * mlp_layers}.weight"], sd[f"classifier.{3 * mlp_layers}.bias"])


@pytest.mark.parametrize("aux", ["mlp", "mlp-sr", "cnn", "last"])
@pytest.mark.parametrize("size", [16, 8, 5])
def test_dgl_heads_load_the_released_layout_and_compute_the_released_forward(aux: str, size: int) -> None:
    c, classes = 32, 10
    gen = torch.Generator().manual_seed(0)
    sd = _released_state(aux, c, classes, gen)
    head = make_head("mlp", c, classes, dims=2, layers=2) if aux == "last" else make_head(aux, c, classes, dims=2)
    head.load_state_dict(sd)  # strict: every key of the released layout, shape for shape
    uses_bn = RELEASED[aux][1] == 0
    own = head.state_dict()
    expected = {k: v.shape for k, v in sd.items() if uses_bn or not k.startswith("bn.")}
    assert {k: v.shape for k, v in own.items()} == expected
    x = torch.randn(6, c, size, size, generator=gen)
    torch.testing.assert_close(head.eval()(x), _released_forward(aux, sd, x), rtol=1e-5, atol=1e-5)


def test_released_mlp_sr_parameter_count_at_32_channels() -> None:
    # 3 x (1x1 conv 32x32 + BN 2x32) + 3 x (Linear 128x128+128 + BN 2x128) + Linear 128x10+10 = 54,858
    # (the released module also holds the unused BN: 64 more)
    head = make_head("mlp-sr", 32, 10, dims=2)
    assert sum(p.numel() for p in head.parameters()) == 3 * (32 * 32 + 64) + 3 * (128 * 128 + 128 + 256) + 1290


def test_last_head_option_gives_the_last_exit_its_own_head() -> None:
    net = build_model(
        "cnn2d-exits", in_shape=(1, 8, 8), exits=3, head="mlp-sr", last_head="mlp", last_head_kwargs={"layers": 2}
    )
    kinds = [(len(h.blocks), len(h.classifier)) for h in net.exits]
    assert kinds == [(3, 10), (3, 10), (0, 7)]
    with pytest.raises(ValueError, match="last_head"):
        build_model("cnn2d-exits", in_shape=(1, 8, 8), exits=3, last_head_kwargs={"layers": 2})
