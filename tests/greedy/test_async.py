"""Replay buffer policy (bounded waits, drop-oldest) and the asynchronous DGL simulation."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from greedy_helpers import batches, small_net

from anytrain.greedy.async_dgl import AsyncConfig, train_async_dgl
from anytrain.greedy.buffer import ReplayBuffer
from anytrain.rules import build_rule


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


def test_async_with_full_speed_and_capacity_one_is_synchronous_dgl() -> None:
    data = batches(6)
    a = small_net(3)
    b = copy.deepcopy(a)
    rule = build_rule("dgl")
    rule.bind(a)
    opt = rule.make_optimizer(a, lambda n, p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    stats = train_async_dgl(a, rule.partition, opt.optimizers, data, 1, AsyncConfig(step_prob=[1, 1, 1], buffer_size=1))
    assert stats.steps == [6, 6, 6]
    rule_b = build_rule("dgl")
    rule_b.bind(b)
    opt_b = rule_b.make_optimizer(b, lambda n, p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    for x, y in data:
        opt_b.zero_grad()
        rule_b.backward(b, [F.cross_entropy(z, y) for z in rule_b.forward(b, x)])
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_async_slow_producer_consumer_replays_and_slow_consumer_steps_less() -> None:
    data = batches(40, batch=4)
    net = small_net(2)
    rule = build_rule("dgl")
    rule.bind(net)
    opt = rule.make_optimizer(net, lambda n, p: torch.optim.SGD(p, lr=0.01))
    slow_prod = train_async_dgl(
        net, rule.partition, opt.optimizers, data, 1, AsyncConfig(step_prob=[0.25, 1.0], buffer_size=5, seed=1)
    )
    assert slow_prod.steps[0] == 40
    assert slow_prod.steps[1] > 2 * slow_prod.steps[0]  # the consumer did not wait for the producer
    assert slow_prod.buffers[0]["reuse"] > 2
    slow_cons = train_async_dgl(
        net, rule.partition, opt.optimizers, data, 1, AsyncConfig(step_prob=[1.0, 0.25], buffer_size=5, seed=1)
    )
    assert slow_cons.steps[0] == 40 and 3 <= slow_cons.steps[1] <= 20
    assert slow_cons.buffers[0]["dropped"] == 40 - 5  # uniform draws keep entries: only eviction removes
    with pytest.raises(ValueError):
        AsyncConfig(step_prob=[0.0, 1.0])
