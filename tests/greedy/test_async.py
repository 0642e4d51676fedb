"""Replay buffer policy (bounded waits, drop-oldest) and the asynchronous DGL simulation."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from greedy_helpers import batches, small_net

from anytrain.greedy import DGL, build_module_optimizers
from anytrain.greedy.async_dgl import AsyncConfig, train_async_dgl
from anytrain.greedy.buffer import ReplayBuffer


def t(v: float) -> torch.Tensor:
    return torch.tensor([v])


def test_buffer_drops_oldest_first_and_put_never_blocks() -> None:
    buf = ReplayBuffer(3)
    drops = [buf.put(t(i), t(-i)) for i in range(7)]
    assert drops == [False, False, False, True, True, True, True]
    assert [float(x) for x, _ in buf.entries()] == [4.0, 5.0, 6.0]
    assert buf.dropped == 4 and buf.puts == 7
    assert [float(buf.get()[0]) for _ in range(3)] == [4.0, 5.0, 6.0]  # FIFO
    # a producer with no consumer at all finishes at once
    full = ReplayBuffer(1)
    th = threading.Thread(target=lambda: [full.put(t(i), t(i)) for i in range(1000)])
    th.start()
    th.join(timeout=5)
    assert not th.is_alive() and len(full) == 1 and float(full.entries()[0][0]) == 999.0


def test_buffer_waits_are_bounded_and_woken_by_put() -> None:
    buf = ReplayBuffer(2)
    t0 = time.monotonic()
    assert buf.sample(timeout=0.2) is None and buf.get(timeout=0.0) is None
    assert 0.15 < time.monotonic() - t0 < 2.0
    threading.Timer(0.1, lambda: buf.put(t(1), t(2))).start()
    t0 = time.monotonic()
    got = buf.sample(timeout=10.0)
    assert got is not None and float(got[0]) == 1.0 and time.monotonic() - t0 < 5.0


def test_buffer_sampling_is_uniform_and_state_round_trips() -> None:
    buf = ReplayBuffer(4, seed=3)
    for i in range(4):
        buf.put(t(i), t(i))
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[int(buf.sample()[0])] += 1
    # chi-square against uniform, 3 dof: p=0.001 critical value 16.3
    chi2 = ((counts - 1000) ** 2 / 1000).sum()
    assert chi2 < 16.3
    s = buf.state_dict()
    a = [float(buf.sample()[0]) for _ in range(20)]
    other = ReplayBuffer(4)
    other.load_state_dict(s)
    assert [float(other.sample()[0]) for _ in range(20)] == a
    with pytest.raises(ValueError):
        ReplayBuffer(0)


def test_least_used_sampling_matches_a_hand_written_reference() -> None:
    # Reference: a list of [value, uses], oldest first; put appends (drops the oldest when full); a draw takes
    # the entry with the fewest uses, the newest (highest index) among ties.
    gen = torch.Generator().manual_seed(5)
    buf = ReplayBuffer(4, sampling="least_used")
    ref: list[list[float]] = []
    drawn, expected = [], []
    for i in range(300):
        if float(torch.rand((), generator=gen)) < 0.35:
            buf.put(t(i), t(i))
            if len(ref) == 4:
                ref.pop(0)
            ref.append([float(i), 0])
        elif ref:
            fewest = min(u for _, u in ref)
            k = max(j for j, (_, u) in enumerate(ref) if u == fewest)
            ref[k][1] += 1
            expected.append(ref[k][0])
            drawn.append(float(buf.sample()[0]))
    assert drawn == expected and len(drawn) > 100
    # the use counts survive a state round trip
    other = ReplayBuffer(4, sampling="least_used")
    other.load_state_dict(buf.state_dict())
    assert [float(other.sample()[0]) for _ in range(9)] == [float(buf.sample()[0]) for _ in range(9)]
    with pytest.raises(ValueError, match="sampling"):
        ReplayBuffer(2, sampling="lifo")


@pytest.mark.parametrize("sampling,updates", [("uniform", "until_first_done"), ("least_used", "equal")])
def test_async_with_full_speed_and_capacity_one_is_synchronous_dgl(sampling: str, updates: str) -> None:
    data = batches(6)
    a = small_net(3)
    b = copy.deepcopy(a)
    part = DGL().bind(a)
    opt = build_module_optimizers(a, part, lambda n, p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    cfg = AsyncConfig(step_prob=[1, 1, 1], buffer_size=1, sampling=sampling, updates=updates)
    stats = train_async_dgl(a, part, opt.optimizers, data, 1, cfg)
    assert stats.steps == [6, 6, 6] and stats.forward_only == [0, 0, 0]
    # reference: the authors' synchronous step written out by hand (Belilovsky et al., Algorithm 1): each
    # stage on the detached output of the previous one, its own exit's loss, its own optimizer
    opts_b = [
        torch.optim.SGD([*b.stages[k].parameters(), *b.exits[k].parameters()], lr=0.05, momentum=0.9) for k in range(3)
    ]
    for x, y in data:
        h = x
        for k, o in enumerate(opts_b):
            o.zero_grad()
            h = b.stages[k](h.detach())
            F.cross_entropy(b.exits[k](h), y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_async_slow_producer_consumer_replays_and_slow_consumer_steps_less() -> None:
    data = batches(40, batch=4)
    net = small_net(2)
    part = DGL().bind(net)
    opt = build_module_optimizers(net, part, lambda n, p: torch.optim.SGD(p, lr=0.01))
    slow_prod = train_async_dgl(
        net, part, opt.optimizers, data, 1, AsyncConfig(step_prob=[0.25, 1.0], buffer_size=5, seed=1)
    )
    assert slow_prod.steps[0] == 40
    assert slow_prod.steps[1] > 2 * slow_prod.steps[0]  # the consumer did not wait for the producer
    assert slow_prod.buffers[0]["reuse"] > 2
    slow_cons = train_async_dgl(
        net, part, opt.optimizers, data, 1, AsyncConfig(step_prob=[1.0, 0.25], buffer_size=5, seed=1)
    )
    assert slow_cons.steps[0] == 40 and 3 <= slow_cons.steps[1] <= 20
    assert slow_cons.buffers[0]["dropped"] == 40 - 5  # uniform draws keep entries: only eviction removes
    with pytest.raises(ValueError):
        AsyncConfig(step_prob=[0.0, 1.0])


def test_equal_updates_every_module_makes_the_same_number_and_finished_modules_only_forward() -> None:
    data = batches(12, batch=4)
    base = small_net(3)
    runs = {}
    for updates in ("until_first_done", "equal"):
        net = copy.deepcopy(base)
        part = DGL().bind(net)
        opt = build_module_optimizers(net, part, lambda n, p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
        cfg = AsyncConfig(step_prob=[1.0, 0.5, 1.0], buffer_size=3, seed=2, updates=updates)
        runs[updates] = (net, train_async_dgl(net, part, opt.optimizers, data, 2, cfg))
    first, equal = runs["until_first_done"][1], runs["equal"][1]
    assert first.steps[0] == 24 and first.steps[1] < 20  # the 2x slower module got about half the updates
    assert equal.steps == [24, 24, 24]
    assert equal.forward_only[0] > 0 and equal.forward_only[2] == 0  # module 0 kept feeding the slow module
    # module 0's updates do not depend on the others, and its forward-only passes (eval mode, no grad) change
    # nothing: its weights and batch-norm statistics are the same in both runs
    a, b = runs["until_first_done"][0], runs["equal"][0]
    for (k, v), (_, w) in zip(a.stages[0].state_dict().items(), b.stages[0].state_dict().items()):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
    assert all(m.training for m in b.modules())
    with pytest.raises(ValueError, match="updates"):
        AsyncConfig(step_prob=[1.0], updates="all")
