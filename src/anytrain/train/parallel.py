"""Decoupled greedy learning in parallel: one module per process on ``torch.distributed``.

Rank ``j`` holds module ``j`` only (its stages, its exit heads, its optimizer and LR schedule). Rank 0 reads the
data; every rank sends the *detached* output of its module, with the labels, to rank ``j+1`` with point-to-point
operations (``isend``/``irecv``; shapes are known from a dry run, so no shape messages are needed). Because no
gradient crosses a module boundary, nothing ever flows backwards: the modules form a forward-only pipeline, and
with ``K`` ranks up to ``K`` batches are in flight (module ``j`` works on batch ``t`` while module ``j-1`` works on
``t+1``).

Two consumption modes:

- ``buffer=0`` (synchronous): each rank consumes every batch once, in order. The weights are then *identical*
  to single-process synchronous DGL (``rule: dgl`` in the trainer) with the same seed: module ``j`` sees module
  ``j-1``'s output computed with the same weights in both runs. (Exactness needs a net without dropout, whose
  random draws interleave differently across processes.)
- ``buffer=M`` (asynchronous, replay): a receiver thread puts incoming batches into a ``ReplayBuffer`` of ``M``
  batches (full → oldest dropped) and the rank trains on uniform draws from it, so it never waits for a slow
  producer once the buffer holds something. Every rank takes exactly its scheduled ``epochs × batches per
  epoch`` steps, so its LR schedule ends where it should: a rank faster than its producer stops updating when
  it has made them (it still checkpoints at the markers), one slower keeps drawing from its buffer after the
  producer's end-of-data until it has made them; only then does it pass the end-of-data on.

Messages from rank ``j`` to ``j+1`` are a pair (header, activation). The header is ``int64[2 + B]``:
``[flag, epoch, y_1..y_B]`` with flag ``DATA``, ``MARK`` (end of an epoch: checkpoint) or ``END`` (end of the
data: the sentinel that shuts the pipeline down). ``MARK``/``END`` carry a zero activation so that every message
is a pair.

Checkpoints are a Chandy–Lamport snapshot along the pipeline: on ``MARK e`` a rank saves its shard
(``checkpoints/epoch_{e:04d}/rank{j}.pt``, e.g. ``epoch_0003``: module, optimizer, schedule, buffer, RNG)
*before* forwarding the marker, so when the last rank has its shard every shard exists; it then writes
``COMPLETE``. In replay mode the receiver
thread pauses at a marker until the shard is written, so the saved buffer holds exactly the pre-marker batches.
``--resume`` restarts every rank from the newest complete epoch.

Failure handling: every wait on a peer is bounded by ``--timeout`` (a timed-out or closed connection raises);
a rank that fails prints one line naming itself and the peer, and exits non-zero. The local launcher polls its
children, and when one exits non-zero it names that rank, stops the others (SIGTERM, then SIGKILL) and exits
non-zero, so a dead rank never leaves a hanging job. Under ``torchrun`` the elastic agent does the same.

Run it with ``anytrain dgl-parallel CONFIG --out DIR`` (local launcher, one process per module) or
``torchrun --nproc-per-node K -m anytrain.train.parallel CONFIG --out DIR``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from anytrain.config import RunConfig
from anytrain.greedy import ReplayBuffer, module_step
from anytrain.nets import StagedNet
from anytrain.registry import ConfigError
from anytrain.train import precision

DATA, MARK, END = 1, 2, 0
PEER_FAILURE = 3  # exit code of a rank that stopped because a peer failed (peer unknown)
PEER_BASE = 64  # exit code PEER_BASE + p: this rank stopped because peer rank p died or stopped answering
#: How the local launcher starts a rank: ``python WORKER ARGS --worker`` (the tests start their own entry point).
WORKER = ["-m", "anytrain.train.parallel"]


@dataclass(kw_only=True)
class ParallelOptions:
    """Options of the multi-process runner.

    Args:
        buffer: 0 for the synchronous pipeline; ``M > 0`` for a replay buffer of ``M`` batches per rank.
        timeout: seconds any wait on a peer may last before the rank gives up (and the job fails).
        inflight: sends a rank may have outstanding before it waits for the oldest (bounds its memory).
        resume: continue from the newest complete checkpoint in the run directory.
    """

    buffer: int = 0
    timeout: float = 120.0
    inflight: int = 2
    resume: bool = False

    def __post_init__(self) -> None:
        if int(self.buffer) < 0:
            raise ConfigError(f"--buffer must be >= 0, got {self.buffer}")
        if float(self.timeout) <= 0:
            raise ConfigError(f"--timeout must be > 0, got {self.timeout}")
        if int(self.inflight) < 1:
            raise ConfigError(f"--inflight must be >= 1, got {self.inflight}")


class PeerError(RuntimeError):
    """A peer rank died, closed its connection or did not answer within the timeout."""

    def __init__(self, message: str, peer: int | None = None) -> None:
        super().__init__(message)
        self.peer = peer

    @property
    def exit_code(self) -> int:
        return PEER_BASE + self.peer if self.peer is not None and 0 <= self.peer < 256 - PEER_BASE else PEER_FAILURE


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


# ---- the part of the run one rank owns ---------------------------------------------------------------------
def _own(net: StagedNet, stages: Sequence[int]) -> nn.ModuleDict:
    """A module's stages and heads, keyed as in its checkpoint shard (``stage3``, ``exit3``)."""
    return nn.ModuleDict({f"stage{k}": net.stages[k] for k in stages} | {f"exit{k}": net.exits[k] for k in stages})


class RankModule:
    """Module ``rank`` of the config's network, its optimizer and schedule, and the shapes it exchanges: built
    by the trainer's own pieces (``build_components``, ``make_train_loader``, ``build_scheduler``), so the
    weights, batches and learning rates are those of ``anytrain train`` with ``rule: dgl``."""

    def __init__(self, cfg: RunConfig, rank: int, world: int, device: torch.device) -> None:
        from anytrain.greedy import DGL
        from anytrain.train.schedule import build_scheduler
        from anytrain.train.trainer import build_components, make_loss_fn, make_train_loader

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        # Built on the CPU, then only this rank's part moves to the device.
        c = build_components(cfg, torch.device("cpu"))
        data, net, rule = c["data"], c["net"], c["rule"]
        if not isinstance(rule, DGL):
            raise ConfigError(f"dgl-parallel needs rule.name: dgl, got {cfg.rule.name!r}")
        part = rule.bind(net)
        if len(part) != world:
            raise ConfigError(
                f"the network has {len(part)} DGL modules but {world} processes were started; "
                "use one process per module"
            )
        self.partition = part
        self.stages = part[rank]
        self.loader = make_train_loader(cfg, data, device)
        self.data = data if rank == 0 else None
        self.batch = cfg.data.batch_size
        self.epochs = cfg.train.epochs
        self.steps_per_epoch = len(self.loader)
        self.loss_fn = make_loss_fn(cfg)
        # Dry run (eval mode, no grad: running statistics untouched) for the shapes crossing the boundaries.
        net.eval()
        with torch.no_grad():
            x0 = torch.zeros(1, *data.input_shape)
            states = [x0, *net.states(x0)]
        net.train()
        if not all(isinstance(s, Tensor) for s in states):
            raise ConfigError("dgl-parallel sends tensors between ranks; this network's stage states are not tensors")
        shapes = [tuple(s.shape[1:]) for s in states]
        self.in_shape = shapes[self.stages[0]]
        self.out_shape = shapes[self.stages[-1] + 1]
        self.dtype = next(net.parameters()).dtype
        self.optimizer = c["optimizer"].optimizers[rank]
        s = cfg.schedule
        total = self.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(s.name, self.optimizer, total, self.steps_per_epoch, **s.kwargs())
        # Keep only this rank's stages and heads; the rest of the network is freed.
        self.net = net
        self.own = _own(net, self.stages)
        for k in range(net.num_exits):
            if k not in self.stages:
                net.stages[k] = nn.Identity()
                net.exits[k] = nn.Identity()
        net.to(device)
        # train.precision: autocast in the module's forward; under fp16 this rank's own loss scaler (one per
        # module, as in the trainer's DGL: no gradient crosses modules, and no rank waits for another's scale)
        self.autocast = precision.autocast_dtype(cfg.train.precision)
        self.scaler = torch.amp.GradScaler(device.type) if self.autocast == torch.float16 else None
        self.steps = 0
        # progress: the mean loss of each of the module's exits over the steps since its last checkpoint (summed
        # on device, no sync); saved in the epoch's shard, from which rank 0 writes history.json at the end
        self.loss_sum = torch.zeros(len(self.stages), device=device)
        self.loss_steps = 0
        self.since = time.perf_counter()

    def step(self, x: Tensor, y: Tensor, send: Callable[[Tensor], None] | None = None) -> None:
        """One DGL module step (``anytrain.greedy.module_step``, as in the trainer), then the schedule's.
        ``send`` gets the detached output before the backward pass, so the next rank starts at once."""
        s = module_step(
            self.net, self.stages, x, y, self.optimizer, loss_fn=self.loss_fn, emit=send,
            autocast=self.autocast, scaler=self.scaler,
        )  # fmt: skip
        if self.scaler is None:
            self.scheduler.step()
        else:  # a first step skipped by the scaler is expected: torch's scheduler-order warning does not apply
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before", UserWarning)
                self.scheduler.step()
        self.steps += 1
        self.loss_sum += s.losses
        self.loss_steps += 1

    def mean_losses(self) -> list[float]:
        """The mean training loss of each of the module's exits since its last checkpoint."""
        return (self.loss_sum / max(1, self.loss_steps)).tolist()

    def report(self, epoch: int) -> None:
        """One progress line per rank and epoch (printed when the rank checkpoints the epoch)."""
        mean = sum(self.mean_losses())
        secs = time.perf_counter() - self.since
        print(
            f"rank {self.rank} (stages {list(self.stages)}): epoch {epoch + 1}/{self.epochs}  loss {mean:.4f}  "
            f"{self.loss_steps} steps  {secs:.1f}s",
            flush=True,
        )
        self.loss_sum.zero_()
        self.loss_steps = 0
        self.since = time.perf_counter()

    def shard(self, epoch: int, buffer: ReplayBuffer | None) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world": self.world,
            "stages": list(self.stages),
            "epoch": epoch,
            "steps": self.steps,
            "module": self.own.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "buffer": None if buffer is None else buffer.state_dict(),
            "train_loss": self.mean_losses(),  # per exit of the module, over the epoch (history.json)
        }

    def restore(self, shard: dict[str, Any]) -> None:
        if shard["world"] != self.world or list(shard["stages"]) != list(self.stages):
            raise ConfigError(f"checkpoint of rank {self.rank} was written for another partition of the network")
        self.own.load_state_dict(shard["module"])
        self.optimizer.load_state_dict(shard["optimizer"])
        self.scheduler.load_state_dict(shard["scheduler"])
        torch.set_rng_state(shard["rng"].cpu())
        if self.scaler is not None and shard.get("scaler"):
            self.scaler.load_state_dict(shard["scaler"])
        self.steps = int(shard["steps"])


# ---- point-to-point channel -----------------------------------------------------------------------------------
class Channel:
    """Typed messages between neighbouring ranks, every wait bounded by ``timeout`` seconds."""

    def __init__(
        self,
        rank: int,
        batch: int,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
        timeout: float,
        inflight: int,
    ) -> None:
        self.rank, self.batch, self.device, self.dtype = rank, batch, device, dtype
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.timeout = datetime.timedelta(seconds=float(timeout))
        self.inflight = int(inflight)
        self.sends: deque[tuple[Any, Any, Tensor, Tensor]] = deque()

    def _wait(self, work: Any, peer: int, what: str) -> None:
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise PeerError(f"{what} rank {peer} failed: {first}", peer) from None

    def send(self, flag: int, epoch: int, y: Tensor | None, x: Tensor | None) -> None:
        dst = self.rank + 1
        header = torch.zeros(2 + self.batch, dtype=torch.long, device=self.device)
        header[0], header[1] = flag, epoch
        if y is not None:
            header[2:] = y
        act = (
            x.contiguous()
            if x is not None
            else torch.zeros(self.batch, *self.out_shape, dtype=self.dtype, device=self.device)
        )
        try:
            w1 = dist.isend(header, dst)
            w2 = dist.isend(act, dst)
        except RuntimeError as e:
            raise PeerError(f"sending to rank {dst} failed: {str(e).strip().splitlines()[0][:160]}", dst) from None
        self.sends.append((w1, w2, header, act))  # keep the tensors alive until the sends complete
        while len(self.sends) > self.inflight:
            self._drain_one()

    def send_data(self, epoch: int, y: Tensor, x: Tensor) -> None:
        self.send(DATA, epoch, y, x)

    def _drain_one(self) -> None:
        w1, w2, _, _ = self.sends.popleft()
        self._wait(w1, self.rank + 1, "sending to")
        self._wait(w2, self.rank + 1, "sending to")

    def flush(self) -> None:
        while self.sends:
            self._drain_one()

    def post_recv(self) -> tuple[Any, Any, Tensor, Tensor]:
        src = self.rank - 1
        header = torch.empty(2 + self.batch, dtype=torch.long, device=self.device)
        act = torch.empty(self.batch, *self.in_shape, dtype=self.dtype, device=self.device)
        try:
            return dist.irecv(header, src), dist.irecv(act, src), header, act
        except RuntimeError as e:
            raise PeerError(f"receiving from rank {src} failed: {str(e).strip().splitlines()[0][:160]}", src) from None

    def complete(self, pending: tuple[Any, Any, Tensor, Tensor]) -> tuple[int, int, Tensor, Tensor]:
        w1, w2, header, act = pending
        self._wait(w1, self.rank - 1, "receiving from")
        self._wait(w2, self.rank - 1, "receiving from")
        h = header.tolist()[:2]
        return int(h[0]), int(h[1]), header[2:], act


# ---- checkpoints --------------------------------------------------------------------------------------------
def _ckpt_dir(out: Path, epoch: int | None) -> Path:
    return out / "checkpoints" / ("final" if epoch is None else f"epoch_{epoch:04d}")


def latest_complete_epoch(out: Path) -> int | None:
    """Newest epoch whose checkpoint has every rank's shard (marked ``COMPLETE`` by the last rank)."""
    best = None
    root = out / "checkpoints"
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith("epoch_") and (d / "COMPLETE").is_file():
                e = int(d.name.split("_")[1])
                best = e if best is None or e > best else best
    return best


def _save_shard(rm: RankModule, out: Path, epoch: int | None, buffer: ReplayBuffer | None) -> None:
    from anytrain.train.checkpoint import atomic_write_text, save_checkpoint

    d = _ckpt_dir(out, epoch)
    save_checkpoint(d / f"rank{rm.rank}.pt", rm.shard(-1 if epoch is None else epoch, buffer))
    if epoch is not None:
        rm.report(epoch)
    if rm.rank == rm.world - 1:  # the marker reached the last rank: every earlier shard is on disk
        atomic_write_text(d / "COMPLETE", f"{rm.world}\n")


# ---- the per-rank loops -------------------------------------------------------------------------------------
def _run_producer(rm: RankModule, ch: Channel | None, out: Path, start_epoch: int) -> None:
    for epoch in range(start_epoch, rm.epochs):
        rm.loader.set_epoch(epoch)
        for x, y in rm.loader:
            rm.step(x, y, None if ch is None else functools.partial(ch.send_data, epoch, y))
        _save_shard(rm, out, epoch, None)
        if ch is not None:
            ch.send(MARK, epoch, None, None)
    _save_shard(rm, out, None, None)
    if ch is not None:
        ch.send(END, rm.epochs, None, None)
        ch.flush()


def _consume_sync(rm: RankModule, ch: Channel, out: Path, last: bool) -> None:
    pending = ch.post_recv()
    while True:
        flag, epoch, y, x = ch.complete(pending)
        if flag != END:
            pending = ch.post_recv()  # prefetch the next message while this one is processed
        if flag == DATA:
            rm.step(x, y, None if last else functools.partial(ch.send_data, epoch, y))
        elif flag == MARK:
            _save_shard(rm, out, epoch, None)
            if not last:
                ch.send(MARK, epoch, None, None)
        else:
            _save_shard(rm, out, None, None)
            if not last:
                ch.send(END, epoch, None, None)
            break
    ch.flush()


def _consume_replay(
    rm: RankModule,
    ch: Channel,
    out: Path,
    last: bool,
    capacity: int,
    timeout: float,
    saved_buffer: dict[str, Any] | None,
) -> None:
    buf = ReplayBuffer(capacity, seed=rm.cfg.seed * 1000 + rm.rank)
    if saved_buffer is not None:
        buf.load_state_dict(saved_buffer)
    control: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    resume = threading.Event()
    failure: list[BaseException] = []

    def receive() -> None:
        try:
            while True:
                flag, epoch, y, x = ch.complete(ch.post_recv())
                if flag == DATA:
                    buf.put(x, y)
                    continue
                control.put((flag, epoch))
                if flag == END:
                    return
                # Pause at a marker until the shard is written, so the saved buffer is the pre-marker one.
                if not resume.wait(timeout):
                    raise PeerError(f"rank {rm.rank} did not checkpoint within {timeout:.0f}s")
                resume.clear()
        except BaseException as e:  # handed to the training thread, which exits non-zero
            failure.append(e)

    th = threading.Thread(target=receive, name=f"dgl-recv-{rm.rank}", daemon=True)
    th.start()
    epoch = 0
    total = rm.epochs * rm.steps_per_epoch  # the scheduled number of steps, whatever the producer's pace
    ended = False  # the producer's end-of-data has arrived
    while not (ended and rm.steps >= total):
        if failure:
            raise failure[0]
        finished = rm.steps >= total
        try:  # a rank that has made its steps only waits for control messages (bounded wait)
            flag, epoch = control.get(timeout=0.05) if finished else control.get_nowait()
        except queue.Empty:
            flag = DATA
        if flag == MARK:
            _save_shard(rm, out, epoch, buf)
            if not last:
                ch.send(MARK, epoch, None, None)
            resume.set()
            continue
        if flag == END:
            ended = True
            continue
        if not ended and not th.is_alive() and not failure and control.empty():
            raise PeerError(f"the receiver of rank {rm.rank} stopped before the end of the data", rm.rank - 1)
        if finished:
            continue
        got = buf.sample(timeout=0.05)
        if got is None:  # nothing buffered yet; the receiver thread's own waits are bounded by the timeout
            if ended:
                raise PeerError(f"rank {rm.rank} received no data before the end of the data", rm.rank - 1)
            continue
        x, y = got
        rm.step(x, y, None if last else functools.partial(ch.send_data, epoch, y))
    _save_shard(rm, out, None, buf)
    if not last:
        ch.send(END, epoch, None, None)
    ch.flush()
    th.join(timeout)
    (out / f"buffer_rank{rm.rank}.json").write_text(json.dumps(buf.stats()) + "\n")


def _load_shards(net: StagedNet, out: Path, world: int, epoch: int | None) -> list[dict[str, Any]]:
    """Load every rank's shard of ``epoch`` (``None``: the final one) into ``net``; returns the shards."""
    from anytrain.train.checkpoint import load_checkpoint

    shards = [load_checkpoint(_ckpt_dir(out, epoch) / f"rank{r}.pt", map_location="cpu") for r in range(world)]
    for shard in shards:
        _own(net, shard["stages"]).load_state_dict(shard["module"])
    return shards


def _assemble(cfg: RunConfig, out: Path, world: int, data: Any, device: torch.device) -> StagedNet:
    """Rank 0, after every rank is done: the full network from the final shards."""
    from anytrain.train.trainer import model_from_config

    net = model_from_config(cfg, data)
    _load_shards(net, out, world, None)
    return net.to(device)


def epoch_history(cfg: RunConfig, out: Path, world: int, data: Any, device: torch.device) -> list[dict[str, Any]]:
    """Rank 0, at the end: the records of ``history.json`` as ``anytrain train`` writes them (per epoch: the
    mean training loss of every exit, and the validation accuracy of every exit), rebuilt from the epoch
    checkpoints: each is a consistent snapshot of all modules at that epoch's marker, so evaluating it gives
    what the trainer measures at the end of the epoch. Epochs without a complete checkpoint are left out."""
    from anytrain.eval.anytime import exit_scores
    from anytrain.train.trainer import model_from_config

    net = model_from_config(cfg, data).to(device)
    has_val = data.split_len("val") > 0
    history: list[dict[str, Any]] = []
    for epoch in range(cfg.train.epochs):
        if not (_ckpt_dir(out, epoch) / "COMPLETE").is_file():
            continue
        shards = sorted(_load_shards(net, out, world, epoch), key=lambda sh: sh["stages"][0])
        if any(sh.get("train_loss") is None for sh in shards):  # written before the losses were kept
            continue
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": int(shards[0]["steps"]),
            "train_loss": [v for sh in shards for v in sh["train_loss"]],
        }
        if has_val:
            correct = exit_scores(net, data.batches("val", cfg.data.eval_batch_size))[1]
            rec["val_acc"] = correct.double().mean(1).tolist()
        history.append(rec)
    return history


def _barrier() -> None:
    try:
        dist.barrier()
    except RuntimeError as e:  # a rank died or hangs; the process group's timeout bounds the wait
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise PeerError(f"barrier failed: {first}") from None


def worker(cfg: RunConfig, out: Path, opts: ParallelOptions) -> int:
    """Body of one rank (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` in the environment)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        dev_name = cfg.train.device
        use_cuda = torch.cuda.is_available() and dev_name in ("auto", "cuda")
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=opts.timeout),
        )
    except Exception as e:
        print(f"rank {rank}: cannot join the process group: {e}", file=sys.stderr, flush=True)
        return PEER_FAILURE
    try:
        out.mkdir(parents=True, exist_ok=True)
        if rank == 0 and not (out / "config.yaml").exists():  # under torchrun no launcher wrote it
            from anytrain.config import dump_config
            from anytrain.train.checkpoint import atomic_write_text

            atomic_write_text(out / "config.yaml", dump_config(cfg))
        rm = RankModule(cfg, rank, world, device)
        start_epoch = 0
        saved_buffer = None
        if opts.resume:
            from anytrain.train.checkpoint import load_checkpoint

            last_epoch = latest_complete_epoch(out)
            if last_epoch is not None:
                shard = load_checkpoint(_ckpt_dir(out, last_epoch) / f"rank{rank}.pt", map_location=device)
                rm.restore(shard)
                saved_buffer = shard["buffer"]
                start_epoch = last_epoch + 1
        ch = None
        if world > 1:
            ch = Channel(rank, rm.batch, rm.in_shape, rm.out_shape, rm.dtype, device, opts.timeout, opts.inflight)
        _barrier()
        t0 = time.perf_counter()
        steps0 = rm.steps
        if rank == 0:
            _run_producer(rm, ch if world > 1 else None, out, start_epoch)
        elif opts.buffer == 0:
            assert ch is not None
            _consume_sync(rm, ch, out, last=rank == world - 1)
        else:
            assert ch is not None
            _consume_replay(rm, ch, out, rank == world - 1, opts.buffer, opts.timeout, saved_buffer)
        seconds = time.perf_counter() - t0
        stats = {
            "rank": rank,
            "stages": rm.stages,
            "steps": rm.steps - steps0,
            "seconds": seconds,
            "peak_rss_mb": _peak_rss_mb(),
        }
        (out / f"rank{rank}.json").write_text(json.dumps(stats) + "\n")
        _barrier()  # every final shard is on disk
        wall = time.perf_counter() - t0
        if rank == 0:
            _finish(cfg, out, world, device, opts, wall, start_epoch, rm)
        dist.destroy_process_group()
        return 0
    except PeerError as e:
        print(f"rank {rank}: {e}", file=sys.stderr, flush=True)
        os._exit(e.exit_code)  # do not wait for a broken process group to shut down
    except ConfigError as e:
        print(f"rank {rank}: {e}", file=sys.stderr, flush=True)
        os._exit(2)
    except Exception as e:
        print(f"rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)


def _finish(
    cfg: RunConfig,
    out: Path,
    world: int,
    device: torch.device,
    opts: ParallelOptions,
    wall: float,
    start_epoch: int,
    rm: RankModule,
) -> None:
    """Rank 0: the assembled network's ``model.pt`` and the trainer's evaluation and ``metrics.json``, with the
    runner's timings under ``parallel``."""
    from anytrain.train.checkpoint import atomic_write_json, save_checkpoint
    from anytrain.train.trainer import write_metrics

    assert rm.data is not None  # rank 0 keeps its data for the evaluation
    net = _assemble(cfg, out, world, rm.data, device)
    save_checkpoint(out / "model.pt", {"model": net.state_dict()})
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    samples = (rm.epochs - start_epoch) * rm.steps_per_epoch * rm.batch
    parallel = {
        "world_size": world,
        "buffer": opts.buffer,
        "backend": dist.get_backend(),
        "partition": rm.partition,
        "wall_seconds": wall,
        "samples": samples,
        "samples_per_second": samples / wall if wall > 0 else 0.0,
        "ranks": ranks,
    }
    atomic_write_json(out / "history.json", epoch_history(cfg, out, world, rm.data, device))  # training_curves.png
    m = write_metrics(cfg, rm.data, net, out, steps=rm.steps, seconds=wall, extra={"parallel": parallel})
    print(
        f"dgl-parallel: {world} ranks, {samples / max(wall, 1e-9):.0f} samples/s; test accuracy per exit: "
        + " ".join(f"{e['accuracy']:.3f}" for e in m["exits"]),
        flush=True,
    )


# ---- local launcher -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _is_peer_code(c: int) -> bool:
    return c == PEER_FAILURE or c >= PEER_BASE


def _culprit(failed: list[tuple[int, int]]) -> str:
    """One line naming the rank that caused the failure, from the exit codes seen so far."""
    own = [(r, c) for r, c in failed if not _is_peer_code(c)]
    if own:  # a rank that failed by itself (crash, fault, bad input) rather than because of a peer
        r, c = min(own)
        return f"rank {r} failed (exit code {c})"
    r, c = min(failed)
    if c >= PEER_BASE:  # only ranks that lost a peer have exited: the peer died or hangs
        return f"rank {c - PEER_BASE} died or stopped responding (rank {r} gave up waiting for it)"
    return f"rank {r} failed (exit code {c}: it lost a peer)"


def launch(worker_argv: list[str], nproc: int, env: dict[str, str] | None = None) -> int:
    """Start ``nproc`` ranks of ``python -m anytrain.train.parallel WORKER_ARGV --worker`` on this machine and
    watch them. Returns 0 if all succeed; otherwise names the first rank that failed, stops the others and
    returns 1."""
    port = _free_port()
    base = dict(os.environ if env is None else env)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc))
    procs = []
    for r in range(nproc):
        e = dict(base, RANK=str(r), LOCAL_RANK=str(r))
        procs.append(subprocess.Popen([sys.executable, *WORKER, *worker_argv, "--worker"], env=e))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                _stop(procs)
                print(
                    f"anytrain dgl-parallel: {_culprit(failed)}; stopped the other ranks", file=sys.stderr, flush=True
                )
                return 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(procs)
        print("anytrain dgl-parallel: interrupted; stopped all ranks", file=sys.stderr, flush=True)
        return 130


# ---- command line -------------------------------------------------------------------------------------------
def build_parser(prog: str = "anytrain dgl-parallel") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Decoupled greedy learning with one process per module "
        "(torch.distributed: gloo on CPU, nccl on GPU).",
    )
    p.add_argument("config", nargs="?", help="YAML config (rule.name must be dgl)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--out", help="run directory to create")
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the unfinished run in DIR from its newest complete checkpoint (with DIR's config.yaml)",
    )
    p.add_argument("--buffer", type=int, default=0, help="0: synchronous pipeline; M>0: replay buffer of M batches")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a rank waits for a peer before failing")
    p.add_argument("--inflight", type=int, default=2, help="outstanding sends per rank")
    p.add_argument("--nproc", type=int, default=None, help="processes to start (default: one per DGL module)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``anytrain dgl-parallel`` (local launcher) or one rank (``--worker`` / under torchrun)."""
    from anytrain.config import dump_config, load_config
    from anytrain.train.checkpoint import atomic_write_text, check_new_run_dir, resume_config

    args = build_parser().parse_args(argv)
    is_rank = args.worker or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)
    try:
        if args.resume:
            if args.config or args.out:
                extra = "CONFIG" if args.config else "--out"
                raise ConfigError(f"--resume DIR continues the run with DIR's own config.yaml; drop {extra}")
            out = Path(args.resume)
            cfg = resume_config(out, args.set)
        else:
            if args.out is None:
                raise ConfigError("dgl-parallel needs --out DIR (or --resume DIR)")
            out = Path(args.out)
            cfg = load_config(args.config, args.set)
        if cfg.rule.name != "dgl":
            raise ConfigError(f"dgl-parallel needs rule.name: dgl, got {cfg.rule.name!r}")
        opts = ParallelOptions(
            buffer=args.buffer, timeout=args.timeout, inflight=args.inflight, resume=bool(args.resume)
        )
        if args.nproc is not None and args.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
        if is_rank:
            if not args.worker and not args.resume and os.environ["RANK"] == "0":  # under torchrun
                check_new_run_dir(out, overwrite=None)
            return worker(cfg, out, opts)
        if not args.resume:
            check_new_run_dir(out, overwrite=None)
        modules = _check_components(cfg)
        if args.nproc is not None and args.nproc != modules:
            raise ConfigError(f"the network has {modules} DGL modules: --nproc must be {modules}, got {args.nproc}")
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.yaml", dump_config(cfg))
        except OSError as e:
            raise ConfigError(f"cannot create run directory {out}: {e.strerror or e}") from None
    except ConfigError as e:
        print(f"anytrain dgl-parallel: {e}", file=sys.stderr)
        return 2
    # Rebuilt from the parsed options, so it does not matter how the caller's argv looked.
    worker_argv = (
        ["--resume", str(out)] if args.resume else [*([str(args.config)] if args.config else []), "--out", str(out)]
    )
    for item in args.set:
        worker_argv += ["--set", item]
    worker_argv += ["--buffer", str(opts.buffer), "--timeout", str(opts.timeout), "--inflight", str(opts.inflight)]
    env = dict(os.environ)
    threads = rank_threads(cfg, modules, env)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    print(startup_note(cfg, modules, env), flush=True)
    return launch(worker_argv, modules, env)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _on_cuda(cfg: RunConfig) -> bool:
    return torch.cuda.is_available() and cfg.train.device in ("auto", "cuda")


def rank_threads(cfg: RunConfig, nproc: int, env: dict[str, str]) -> int | None:
    """The CPU threads each rank gets when neither ``train.threads`` nor ``OMP_NUM_THREADS`` says: the usable
    cores shared out (at least one each), as torchrun does, rather than every rank starting one thread per core.
    ``None``: the config or the environment decides (or the ranks run on GPUs)."""
    if cfg.train.threads or "OMP_NUM_THREADS" in env or _on_cuda(cfg):
        return None
    return max(1, _usable_cores() // nproc)


def startup_note(cfg: RunConfig, nproc: int, env: dict[str, str]) -> str:
    """What the launcher is about to start, and why it may be slower than ``anytrain train`` on a small CPU
    machine: ranks against cores, threads per rank, the process group over loopback."""
    if _on_cuda(cfg):
        return (
            f"anytrain dgl-parallel: {nproc} processes, one per DGL module, each on its own GPU "
            f"({torch.cuda.device_count()} visible); activations pass between them over nccl"
        )
    cores = _usable_cores()
    threads = cfg.train.threads or int(env.get("OMP_NUM_THREADS", "0") or 0) or torch.get_num_threads()
    note = (
        f"anytrain dgl-parallel: {nproc} processes (one per DGL module) on {cores} CPU core(s), {threads} "
        f"thread(s) each; every batch's activations pass from rank to rank through a gloo process group over "
        f"loopback TCP (127.0.0.1), copied at each module boundary"
    )
    if nproc * threads > cores:
        note += (
            f". {nproc * threads} threads on {cores} core(s): the ranks take turns, so expect this to be slower "
            "than `anytrain train` with the same config (measured in docs/distributed.md); it pays off with a "
            "core or a GPU per rank"
        )
    return note


def _check_components(cfg: RunConfig) -> int:
    """Build what the ranks will build (data, net, rule, optimizers, schedule) once, so that bad input is one
    line before the run directory is written; returns the number of DGL modules (= processes)."""
    import torch

    from anytrain.data import DataBundle
    from anytrain.train.schedule import build_scheduler
    from anytrain.train.trainer import build_components, resolve_device

    comps = build_components(cfg, torch.device("cpu"))
    t = cfg.train
    precision.check_precision(t.precision, resolve_device(t.device))
    for key, on in (("accumulate", t.accumulate > 1), ("compile", t.compile), ("channels_last", t.channels_last)):
        if on:
            raise ConfigError(f"dgl-parallel does not support train.{key} (each rank streams whole eager batches)")
    if not isinstance(comps["data"], DataBundle):
        raise ConfigError(
            f"dgl-parallel reads data held in memory, and data set {cfg.data.name!r} streams from disk here "
            "(raise data.options.memory_limit_mb, or train it with anytrain train)"
        )
    build_scheduler(cfg.schedule.name, comps["optimizer"], cfg.train.epochs, 1, **cfg.schedule.kwargs())
    return len(comps["rule"].partition)


if __name__ == "__main__":
    sys.exit(main())
