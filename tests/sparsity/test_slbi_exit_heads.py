"""SLBI and the pruned export never change an exit's output shape, on plain multi-exit modules too (issue 22)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anytrain.nets import StagedNet
from anytrain.nets.outputs import output_layers
from anytrain.optim import build_optimizer
from anytrain.sparsity import PruningPlan, apply_plan, export_pruned


class MyNet(nn.Module):
    """The README's own multi-exit CNN: forward returns one logits tensor per exit."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.ReLU()),
                nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.ReLU()),
            ]
        )
        self.heads = nn.ModuleList([nn.Sequential(nn.Flatten(), nn.Linear(8 * 40, 10)) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for block, head in zip(self.blocks, self.heads):
            x = block(x)
            out.append(head(x))
        return out


class Untraceable(MyNet):
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if float(x.sum()) > 1e9:  # data-dependent control flow: torch.fx cannot trace it
            return []
        return super().forward(x)


def _train_slbi(net: nn.Module, steps: int = 60, **kw: object) -> torch.optim.Optimizer:
    opt = build_optimizer("slbi", net, lr=0.1, mu=0.2, momentum=0.9, **kw)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 40, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        sum(F.cross_entropy(z, y) for z in net(x)).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("given", ["fx", "example", "names"])
def test_slbi_on_a_plain_module_leaves_every_exit_head_dense(given: str) -> None:
    net = MyNet()
    kw: dict[str, object] = {}
    if given == "example":
        kw["example_inputs"] = torch.randn(2, 1, 40)
    elif given == "names":
        kw["output_layers"] = ["heads.0.1", "heads.1.1"]
    opt = _train_slbi(net, **kw)
    assert set(opt.sparsified()) == {"blocks.0.0.weight", "blocks.1.0.weight"}  # type: ignore[attr-defined]
    star = opt.projected_model(net).eval()  # type: ignore[attr-defined]
    assert sum(int((m.weight.flatten(1).abs().sum(1) == 0).sum()) for m in (star.blocks[0][0], star.blocks[1][0])) > 0
    x = torch.randn(5, 1, 40)
    small, plan = export_pruned(star, x[:1])
    assert plan.removed > 0  # the trunk did shrink
    out, ref = small(x), star(x)
    assert [tuple(o.shape) for o in out] == [(5, 10), (5, 10)]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_output_layers_are_found_with_and_without_an_input_and_match_a_staged_wrap() -> None:
    net = MyNet()
    heads = [net.heads[0][1], net.heads[1][1]]
    for found in (output_layers(net), output_layers(net, torch.randn(2, 1, 40))):
        assert len(found) == 2 and all(any(f is h for h in heads) for f in found)
    # the same modules wrapped in a StagedNet: the heads are its exits, and the same weights are left dense
    staged = StagedNet(list(net.blocks), list(net.heads))
    a = build_optimizer("slbi", net).sparsified()  # type: ignore[attr-defined]
    b = build_optimizer("slbi", staged).sparsified()  # type: ignore[attr-defined]
    assert sorted(k.split(".", 1)[1] for k in a) == sorted(k.split(".", 1)[1] for k in b)


def test_untraceable_plain_module_asks_for_an_input_in_one_line() -> None:
    with pytest.raises(ValueError, match="pass example_inputs") as e:
        build_optimizer("slbi", Untraceable())
    assert "\n" not in str(e.value)
    opt = build_optimizer("slbi", Untraceable(), example_inputs=torch.randn(2, 1, 40))
    assert set(opt.sparsified()) == {"blocks.0.0.weight", "blocks.1.0.weight"}  # type: ignore[attr-defined]


def test_heads_true_sparsifies_heads_and_a_plan_that_cuts_an_exit_is_refused() -> None:
    net = MyNet()
    assert "heads.0.1.weight" in build_optimizer("slbi", net, heads=True).sparsified()  # type: ignore[attr-defined]
    with torch.no_grad():
        net.heads[0][1].weight[3:] = 0
    plan = PruningPlan(groups=[("heads.0.1", list(range(3, 10)))], channels={"heads.0.1": 10})
    with pytest.raises(ValueError, match=r"output 0 \(exit 0\) from shape \[1, 10\] to \[1, 3\]: refused") as e:
        apply_plan(net.eval(), plan, torch.randn(1, 1, 40))
    assert "\n" not in str(e.value)
