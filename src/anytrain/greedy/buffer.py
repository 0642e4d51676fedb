"""A bounded replay buffer of (activation, label) batches between two greedy modules.

Asynchronous DGL (Belilovsky et al., ICML 2020, §3.3) decouples a module from its producer: the producer puts
each output batch into a buffer of capacity ``M``; the consumer draws a stored batch uniformly at random for
each of its steps. So a slow or stalled producer does not stop the consumer (it re-uses stored batches), and a
slow consumer does not stop the producer.

Policy, chosen so that nothing ever blocks without bound:

- ``put`` never blocks: when the buffer is full the *oldest* entry is dropped (the stalest activations, computed
  by the oldest version of the producer, go first).
- ``sample``/``get`` wait at most ``timeout`` seconds for a non-empty buffer and return ``None`` if it stays
  empty (``timeout=0``: do not wait). There is no unbounded wait anywhere.
- ``sample`` draws a stored entry (it stays until evicted) by the buffer's ``sampling`` rule:
  ``"uniform"``: uniformly at random; ``"least_used"``: an entry drawn the fewest times so far, the freshest
  among ties (the rule the DGL authors describe for their buffer experiments: new batches first, and no batch
  re-used before every stored one has been used as often). ``get`` instead takes the oldest entry out (FIFO),
  which with capacity 1 and one consumer step per producer step is exactly synchronous DGL.

The buffer is thread-safe (one lock; a condition variable wakes a waiting consumer), and its random draws use
its own seeded generator, so a run is reproducible and the global torch RNG is untouched.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import torch
from torch import Tensor

Entry = tuple[Tensor, Tensor]
SAMPLING = ("uniform", "least_used")


class ReplayBuffer:
    """Bounded FIFO of ``(x, y)`` batches; full → drop oldest; uniform or least-used sampling; bounded waits.

    Args:
        capacity: maximum number of stored batches ``M`` (>= 1).
        seed: seed of the generator used by ``sample`` (``"uniform"``).
        sampling: ``"uniform"`` or ``"least_used"`` (least-used first, freshest among ties).

    Example:
        >>> buf = ReplayBuffer(2)
        >>> for i in range(3):
        ...     _ = buf.put(torch.full((1,), float(i)), torch.zeros(1))
        >>> [float(x) for x, _ in buf.entries()], buf.dropped
        ([1.0, 2.0], 1)
        >>> ReplayBuffer(1).sample(timeout=0.01) is None
        True
        >>> lu = ReplayBuffer(3, sampling="least_used")
        >>> for i in range(3):
        ...     _ = lu.put(torch.full((1,), float(i)), torch.zeros(1))
        >>> [float(lu.sample()[0]) for _ in range(4)]  # freshest first, then the next least used
        [2.0, 1.0, 0.0, 2.0]
    """

    def __init__(self, capacity: int, seed: int = 0, sampling: str = "uniform") -> None:
        if int(capacity) < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        if sampling not in SAMPLING:
            raise ValueError(f"buffer sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
        self.capacity = int(capacity)
        self.sampling = sampling
        self._items: deque[Entry] = deque()
        self._uses: deque[int] = deque()  # times each stored entry was drawn, aligned with _items
        self._cond = threading.Condition()
        self._gen = torch.Generator().manual_seed(int(seed))
        self.puts = 0
        self.dropped = 0
        self.draws = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def entries(self) -> list[Entry]:
        with self._cond:
            return list(self._items)

    def put(self, x: Tensor, y: Tensor) -> bool:
        """Store a batch; returns True when the oldest entry was dropped to make room. Never blocks."""
        with self._cond:
            dropped = len(self._items) >= self.capacity
            if dropped:
                self._items.popleft()
                self._uses.popleft()
                self.dropped += 1
            self._items.append((x, y))
            self._uses.append(0)
            self.puts += 1
            self._cond.notify()
            return dropped

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + max(0.0, float(timeout))
        while not self._items:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._cond.wait(left)
        return True

    def sample(self, timeout: float = 0.0) -> Entry | None:
        """A stored batch drawn by the ``sampling`` rule (it stays stored), or ``None`` if empty after ``timeout``
        seconds."""
        with self._cond:
            if not self._wait(timeout):
                return None
            if self.sampling == "uniform":
                i = int(torch.randint(len(self._items), (1,), generator=self._gen))
            else:  # least used; the newest (rightmost) among ties
                fewest = min(self._uses)
                i = max(k for k, u in enumerate(self._uses) if u == fewest)
            self._uses[i] += 1
            self.draws += 1
            return self._items[i]

    def get(self, timeout: float = 0.0) -> Entry | None:
        """Remove and return the oldest batch, or ``None`` if empty after ``timeout`` seconds."""
        with self._cond:
            if not self._wait(timeout):
                return None
            self.draws += 1
            self._uses.popleft()
            return self._items.popleft()

    def stats(self) -> dict[str, float]:
        with self._cond:
            return {
                "puts": self.puts,
                "dropped": self.dropped,
                "draws": self.draws,
                "reuse": self.draws / max(1, self.puts),
            }

    def state_dict(self) -> dict[str, Any]:
        with self._cond:
            return {
                "capacity": self.capacity,
                "items": [(x.clone(), y.clone()) for x, y in self._items],
                "uses": list(self._uses),
                "gen": self._gen.get_state(),
                "puts": self.puts,
                "dropped": self.dropped,
                "draws": self.draws,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._cond:
            if int(state["capacity"]) != self.capacity:
                raise ValueError(f"buffer capacity {state['capacity']} in the state, {self.capacity} here")
            self._items = deque((x, y) for x, y in state["items"])
            self._uses = deque(int(u) for u in state.get("uses", [0] * len(self._items)))
            self._gen.set_state(state["gen"])
            self.puts, self.dropped, self.draws = int(state["puts"]), int(state["dropped"]), int(state["draws"])
            self._cond.notify_all()


__all__ = ["ReplayBuffer"]
