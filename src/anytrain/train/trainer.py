"""The training loop: config → data, net, rule, optimizer → run directory.

Run directory layout::

    config.yaml      fully resolved config; its first line marks the directory as an anytrain run
    checkpoint.pt    last completed epoch (model, optimizer, scheduler, rule, RNG, history), atomic
    checkpoints/     epoch_NNNN.pt: the same, kept for every ``train.keep_every``-th epoch (off by default);
                     step_NNNNNNN.pt: weights, optimizer and rule state after every ``train.keep_every_steps``-th
                     step (off by default; a point to go back to, not to resume from)
    best.pt          weights only, at the best mean *validation* accuracy of the exits the rule trains (all
                     but for backprop, ``joint`` with ``last_only``: its last exit; early stopping)
    exit_scores.pt   per-exit top softmax probability and correctness on validation and test (final model),
                     for budgeted evaluation (``anytrain eval DIR --budget B``)
    history.json     one record per epoch, rewritten each epoch: ``epoch``, ``step`` (steps done at its end),
                     ``train_loss`` (per exit, mean over the epoch), ``lr``, ``val_acc`` (per exit), ``seconds``,
                     ``cpu_seconds``, ``images_per_s``, optimizer/rule series (``opt/...``, ``rule/...``) and
                     ``step_loss``: ``[step, lr, [loss per exit]]`` at each of the epoch's log points (every
                     ``train.log_every`` steps and its last step; the values TensorBoard's ``train/loss_exit*`` get)
    tb/events.*      TensorBoard scalars
    *.png            plots
    metrics.json     written last, when the run finishes (contract: rule, optimizer, dataset, epochs, exits)

Lifecycle: the directory is resumable from the moment it exists (``--resume`` of a run without a checkpoint
starts it from the beginning, which reaches the same weights); it is finished once metrics.json exists. A run
that replaces another (``--overwrite``) is built in a hidden sibling directory and swapped in at its first
checkpoint, so a replacement that fails or is interrupted before then leaves the old run as it was.

Exactness of ``--resume``: the batch order and augmentation of epoch ``e`` are a pure function of
``(seed, e)``, and the checkpoint holds every other piece of state (weights, optimizer and scheduler state,
rule state, torch RNG), so a run resumed from the end of any epoch reaches the same weights as one that
never stopped.

Protocol: everything chosen during or after training (``best.pt``, the budgeted-evaluation thresholds) is
chosen on the validation split carved from the training set (``data.val_size``). The test split is evaluated
once, when the run finishes, on the final model and on the selected one.
"""

from __future__ import annotations

import functools
import math
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from anytrain.config import RunConfig, dump_config, resume_changes, safe_load
from anytrain.data import DataBundle, StreamingData, load_dataset, train_loader
from anytrain.eval.anytime import (
    anytime_auc,
    budgeted_curve,
    default_budgets,
    exit_costs,
    exit_scores,
)
from anytrain.greedy import GreedyProcedure, ModuleOptimizers, build_module_optimizers
from anytrain.nets import StagedNet, build_model
from anytrain.nets.weights import freeze, load_weights
from anytrain.optim import build_optimizer
from anytrain.registry import ConfigError, as_config_error
from anytrain.rules import GradientRule, build_rule
from anytrain.train import distributed as dp
from anytrain.train import precision
from anytrain.train.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    clear_staging,
    load_checkpoint,
    save_checkpoint,
    staging_dir,
    state_dict_mismatch,
    swap_in,
)
from anytrain.train.clock import EpochClock, epoch_line
from anytrain.train.schedule import build_scheduler


class TrainingFault(RuntimeError):
    """A fault during training (non-finite values, a failed write): the run stops and keeps its last good
    checkpoint. The message is one line."""


class TrainingDiverged(TrainingFault):
    """A non-finite loss or gradient: the run stops and keeps its last good checkpoint."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available")
    return dev


def data_from_config(cfg: RunConfig, augment: bool | None = None) -> Any:
    """The ``DataBundle`` a config names (``augment`` overrides ``data.augment``)."""
    d = cfg.data
    with as_config_error(f"data set {d.name!r}"):  # a data-set option of the wrong type or value
        return load_dataset(
            d.name,
            **d.options,
            data_dir=d.data_dir,
            seed=cfg.seed,
            num_samples=d.num_samples,
            augment=d.augment if augment is None else augment,
            val_size=d.val_size,
        )


def model_from_config(cfg: RunConfig, data: DataBundle | StreamingData) -> StagedNet:
    """The staged net a config names, shaped for ``data``; a bad keyword is a one-line ``ConfigError``."""
    m = cfg.model
    try:
        with warnings.catch_warnings(), as_config_error(f"model {m.name!r}"):
            warnings.filterwarnings("error", "Initializing zero-element tensors", UserWarning)  # a size of 0
            return build_model(m.name, in_shape=data.input_shape, num_classes=data.num_classes, **m.kwargs())
    except UserWarning:
        raise ConfigError(f"model {m.name!r}: a layer would have no weights (a size of 0)") from None


def optimizer_for(
    rule: GradientRule | GreedyProcedure, net: StagedNet, factory: Callable[..., torch.optim.Optimizer]
) -> torch.optim.Optimizer:
    """The optimizer of a run: ``factory(net, params)`` over every trainable parameter, or, for a greedy
    procedure, one such optimizer per module (``ModuleOptimizers``)."""
    if isinstance(rule, GreedyProcedure):
        return build_module_optimizers(net, rule.bind(net), factory)
    return factory(net, [p for p in net.parameters() if p.requires_grad])


def prepare_net(cfg: RunConfig, net: StagedNet) -> StagedNet:
    """Apply ``model.weights`` and ``train.freeze`` to ``net`` (one-line ``ConfigError`` on bad input)."""
    if not isinstance(net, StagedNet):
        raise ConfigError(f"net must be an anytrain.nets.StagedNet, got {type(net).__name__}")
    if cfg.model.weights:
        with as_config_error("model.weights"):
            load_weights(net, cfg.model.weights)
    with as_config_error("train.freeze"):
        freeze(net, cfg.train.freeze)
    return net


def build_components(
    cfg: RunConfig,
    device: torch.device | None = None,
    data: DataBundle | StreamingData | None = None,
    net: StagedNet | None = None,
) -> dict[str, Any]:
    """Everything a run needs, built from a validated config. Raises ``ConfigError`` on bad input, before
    anything is written anywhere. ``data`` (for example ``anytrain.data.from_datasets(...)``) replaces the
    data set the config names; the config's other ``data`` keys (batch sizes, augment) still apply. ``net``
    (your own ``StagedNet``) replaces the model the config names; ``model.weights`` and ``train.freeze`` apply."""
    device = device or resolve_device(cfg.train.device)
    data = data_from_config(cfg) if data is None else data
    torch.manual_seed(cfg.seed)
    net = prepare_net(cfg, model_from_config(cfg, data) if net is None else net)
    net.to(device)
    with as_config_error(f"rule {cfg.rule.name!r}"):
        rule = build_rule(cfg.rule.name, **cfg.rule.kwargs())
        rule.bind(net)
    o = cfg.optimizer

    def factory(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return build_optimizer(o.name, model, params, **o.kwargs())

    with as_config_error(f"optimizer {o.name!r}"):
        optimizer = optimizer_for(rule, net, factory)
    return {"device": device, "data": data, "net": net, "rule": rule, "optimizer": optimizer}


def make_loss_fn(cfg: RunConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-exit training loss a config asks for: cross-entropy (with ``train.label_smoothing``)."""
    return functools.partial(F.cross_entropy, label_smoothing=cfg.train.label_smoothing)


def make_train_loader(
    cfg: RunConfig, data: DataBundle | StreamingData, device: torch.device, rank: int = 0, world_size: int = 1
) -> Any:
    """The training loader a config asks for (shuffled, dropping the last partial batch; ``rank``'s shard for
    data parallelism); a batch larger than the training set is a one-line ``ConfigError``."""
    d = cfg.data
    loader = train_loader(
        data,
        d.batch_size,
        shuffle=True,
        seed=cfg.seed,
        augment=data.augment if d.augment else None,
        drop_last=True,
        device=device,
        rank=rank,
        world_size=world_size,
    )
    if len(loader) == 0:
        raise ConfigError(f"data.batch_size={d.batch_size} exceeds the {data.split_len('train')} training samples")
    return loader


class Trainer:
    """Trains one config into one run directory. See the module docstring for the files it writes.

    ``net``: your own :class:`StagedNet` (``StagedNet(stages, exits)`` or ``attach_exits(model, ...)``) trained in
    place of the model ``cfg.model`` names; ``model.weights`` and ``train.freeze`` still apply to it. To resume
    such a run, build the same net again and pass it with ``resume=True`` (the command line can resume it only
    when ``model.name`` builds it: ``package.module:function``)."""

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | Path,
        *,
        resume: bool = False,
        replace: bool = False,
        components: dict[str, Any] | None = None,
        data: DataBundle | StreamingData | None = None,
        net: StagedNet | None = None,
    ) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        self.final_out = self.out  # ``out`` differs while a replacement (``replace=True``) is staged
        self.replace = replace
        self._staging = False
        self.resumed = resume
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        # ``net``: your own StagedNet instead of the config's model (pass the same net again to resume)
        c = components or build_components(cfg, data=data, net=net)
        self.device: torch.device = c["device"]
        self.data: DataBundle | StreamingData = c["data"]
        self.net: StagedNet = c["net"]
        self.rule: GradientRule | GreedyProcedure = c["rule"]
        self.optimizer: torch.optim.Optimizer = c["optimizer"]
        if isinstance(self.rule, GreedyProcedure) and not isinstance(self.optimizer, ModuleOptimizers):
            raise ConfigError(f"rule {self.rule.name!r} steps one optimizer per module: pass a ModuleOptimizers")
        self.epochs = t.epochs
        # Data parallelism (torchrun): each rank trains on its shard; only rank 0 writes (see train.distributed).
        self.dist = dp.current_context()
        if self.dist.enabled:
            dp.prepare(self.net, self.optimizer)
        self.reduce = dp.average_ if self.dist.enabled else None  # passed to the rule on every step
        self._params = [p for p in self.net.parameters() if p.requires_grad]
        self._grads_ok: Tensor | None = None
        self.loss_fn = make_loss_fn(cfg)
        self.loader = make_train_loader(cfg, self.data, self.device, self.dist.rank, self.dist.world_size)
        self.steps_per_epoch = len(self.loader)
        s = cfg.schedule
        total = self.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(s.name, self.optimizer, total, self.steps_per_epoch, **s.kwargs())
        self.start_epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._step_loss: list[list[Any]] = []  # the current epoch's log points: its record's ``step_loss``
        self.best_score = -1.0
        self.net.flops_breakdown(self.data.input_shape)  # a dry run: a net that cannot take the input fails here
        # precision, micro-batches, compile, channels-last: checked here, before anything is written
        precision.check_setup(t, self.device, self.net, self.rule, cfg.data.batch_size)
        self.amp = precision.StepRunner(t, self.net, self.rule, self.optimizer, self.loss_fn, self.device, self.reduce)
        precision.prepare_net(self.net, t)
        if resume:
            self._restore()
        self.writer: Any = None
        self.clock = EpochClock(self.epochs, self.steps_per_epoch * cfg.data.batch_size * self.dist.world_size)
        self._timing: dict[str, float] = {}

    # ---- state ------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _payload(self, epoch: int) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "epoch": epoch,
            "step": self.step,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rule": self.rule.state_dict(),
            "amp": self.amp.state_dict(),
            "rng": rng,
            "history": self.history,
            "best_score": self.best_score,
            "config": dump_config(self.cfg),
        }

    def _restore(self) -> None:
        if not self.checkpoint_path.exists():  # stopped before its first checkpoint: start from the beginning
            return
        ck = load_checkpoint(self.checkpoint_path, map_location=self.device)
        mismatch = state_dict_mismatch(self.net.state_dict(), ck.get("model"))
        if mismatch:
            raise ConfigError(f"checkpoint {self.checkpoint_path} was written for another model: {mismatch}")
        saved = ck.get("config")
        try:
            old = safe_load(saved) if isinstance(saved, str) else None
        except yaml.YAMLError:
            old = None  # not ours to judge here: the model and state checks below still apply
        changed = resume_changes(old, self.cfg.to_dict()) if isinstance(old, dict) else []
        if changed:
            raise ConfigError(
                f"{self.out / 'config.yaml'} differs from the config its checkpoint was written with "
                f"({', '.join(changed[:3])}); resuming would change the run half-way: restore it or start a new run"
            )
        # Everything read from the file is inside the try: a tagged checkpoint with missing or mistyped entries
        # is a one-line error too (nothing has been written yet, so the run directory is untouched).
        try:
            self.net.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            self.rule.load_state_dict(ck["rule"])
            self.amp.load_state_dict(ck.get("amp", {}))
            torch.set_rng_state(ck["rng"]["torch"].cpu())
            if "cuda" in ck["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(ck["rng"]["cuda"].cpu(), self.device)
            self.start_epoch = int(ck["epoch"]) + 1
            self.step = int(ck["step"])
            self.history = list(ck["history"])
            self.best_score = float(ck["best_score"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ConfigError(f"checkpoint {self.checkpoint_path} does not match this config: {first}") from None

    # ---- one step ---------------------------------------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One optimisation step. Returns the per-exit losses (detached, on device) and the rule's stats.
        Nothing here synchronises with the host (but a float16 loss scaler's step). The step itself, under
        ``train.precision`` and ``train.accumulate``: ``anytrain.train.precision.StepRunner``."""
        losses, stats, self._grads_ok = self.amp.step(x, y)  # greedy procedures step one optimizer per module
        self.amp.scheduler_step(self.scheduler)
        self.step += 1
        return losses, stats

    # ---- evaluation ---------------------------------------------------------------------------------------
    def evaluate(self, split: str) -> tuple[Tensor, Tensor]:
        """Per-exit ``(conf, correct)`` of the net on ``split``."""
        return exit_scores(self.net, self.data.batches(split, self.cfg.data.eval_batch_size))

    @property
    def has_val(self) -> bool:
        return self.data.split_len("val") > 0

    # ---- loop -------------------------------------------------------------------------------------------
    def _log(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def progress_note(self) -> str:
        """How far the run got, in words ("epoch 5 of 30 done"): for the one-line message of an interrupt."""
        return f"epoch {max(self.start_epoch, self._epochs_done)} of {self.epochs} done"

    def checkpoint_note(self) -> str:
        """What is left after a stop, in words: for the one-line messages of faults and interrupts."""
        if self.replace and self.out != self.final_out:
            return f"{self.final_out} is unchanged (the replacement run never reached its first checkpoint)"
        if self.checkpoint_path.exists():
            return f"the last good checkpoint ({self.checkpoint_path}) is kept; continue with --resume {self.out}"
        return f"no checkpoint was written yet; --resume {self.out} starts the run from the beginning"

    def _open_run_dir(self) -> None:
        """Create the run directory (or, replacing a run, its staging sibling) and write config.yaml."""
        if self.replace and self.out.is_dir() and any(self.out.iterdir()):
            self.out = staging_dir(self.final_out)
            clear_staging(self.out)
            self._staging = True
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", dump_config(self.cfg))
        except OSError as e:  # nothing of the user's was touched: bad input (read-only, not a directory, ...)
            if self._staging:
                shutil.rmtree(self.out, ignore_errors=True)
                self.out = self.final_out
            raise ConfigError(f"cannot create run directory {self.out}: {e.strerror or e}") from None

    def _open_writer(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # On resume, drop events logged after the checkpoint step by the interrupted session (they will be
        # logged again); events at the checkpoint step itself were flushed before the checkpoint and stay.
        self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1 if self.resumed else None)

    def _close_writer(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()

    def fit(self) -> dict[str, Any]:
        if self.dist.is_main:
            self._open_run_dir()
        try:
            if self.dist.is_main and self.cfg.train.tensorboard:
                self._open_writer()
            return self._fit()
        except OSError as e:  # disk full, read-only remount, ... while training: a fault, not bad input
            where = f" {e.filename}" if e.filename else ""
            raise TrainingFault(f"cannot write{where}: {e.strerror or e}; {self.checkpoint_note()}") from None
        finally:
            try:
                self._close_writer()
            except OSError:
                pass  # already failing; TensorBoard events are best effort
            if self._staging:  # stopped before the replacement's first checkpoint: the old run stays as it was
                shutil.rmtree(self.out, ignore_errors=True)

    def _fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        t = self.cfg.train
        main = self.dist.is_main
        log_every, keep_steps = t.log_every, t.keep_every_steps
        K = self.net.num_exits
        started = time.perf_counter()
        try:
            for epoch in range(self.start_epoch, self.epochs):
                self.rule.on_epoch_start(epoch, self.epochs)
                self.net.train()
                self.loader.set_epoch(epoch)
                self.clock.start()
                loss_sum = torch.zeros(K, device=self.device)
                self._step_loss = []
                bad_step = torch.full((2,), -1, dtype=torch.long, device=self.device)  # first bad (loss, grad)
                bar = tqdm(
                    self.loader,
                    desc=f"epoch {epoch + 1}/{self.epochs}",
                    leave=False,
                    disable=None if t.progress and main else True,
                    dynamic_ncols=True,
                )
                for i, (x, y) in enumerate(bar):
                    losses, stats = self.train_step(x, y)
                    loss_sum += losses
                    # Remember the first non-finite step without a host sync; it is checked at log points.
                    finite = torch.isfinite(losses).all()
                    if self._grads_ok is not None:
                        finite = torch.stack([finite, self._grads_ok])
                    bad_step = torch.where((bad_step < 0) & ~finite, self.step - 1, bad_step)
                    if keep_steps and self.step % keep_steps == 0 and main:
                        self._keep_step(epoch)
                    if (i + 1) % log_every == 0 or i + 1 == self.steps_per_epoch:
                        self._check_finite(bad_step, losses, epoch)
                        lv = losses.tolist()
                        lr = self.optimizer.param_groups[0]["lr"]
                        self._step_loss.append([self.step, lr, lv])
                        bar.set_postfix(loss=f"{lv[-1]:.3f}", lr=f"{lr:.3g}")
                        for k, v in enumerate(lv):
                            self._log(f"train/loss_exit{k}", v, self.step)
                        self._log("train/lr", lr, self.step)
                        for name, v in stats.items():
                            if isinstance(v, Tensor) and v.numel() == 1:
                                self._log(f"rule/{name}", float(v), self.step)
                bar.close()
                dp.average_(loss_sum)  # the global mean training loss (no-op single-process)
                train_loss = (loss_sum / self.steps_per_epoch).tolist()  # waits for the epoch's last step
                self._timing = self.clock.trained()
                self._end_epoch(epoch, train_loss)
                if t.compile and main and epoch == self.start_epoch:  # graphs, graph breaks, recompilations
                    tqdm.write(precision.compile_report())
        finally:
            if self.writer is not None:
                self.writer.flush()
                self.writer.close()
                self.writer = None
        return self.finish(time.perf_counter() - started)

    def _check_finite(self, bad_step: Tensor, losses: Tensor, epoch: int) -> None:
        loss_step, grad_step = dp.first_bad_step(bad_step).tolist()  # every rank takes the same decision
        if loss_step < 0 and grad_step < 0:
            return
        keep = self.checkpoint_note()
        if loss_step < 0 or 0 <= grad_step < loss_step:
            raise TrainingDiverged(
                f"non-finite gradient at step {grad_step} (epoch {epoch + 1}) with finite exit losses; {keep}"
            )
        bad = [k for k, v in enumerate(losses.tolist()) if not math.isfinite(v)]
        where = f"exit {bad[0]}" if bad else "an exit"
        raise TrainingDiverged(f"non-finite loss at step {loss_step} (epoch {epoch + 1}) on {where}; {keep}")

    def _keep_step(self, epoch: int) -> None:
        """A snapshot inside an epoch (``train.keep_every_steps``): the weights and the optimizer's and rule's
        state after this step, to go back to (a point of an SLBI path); not a point to resume from."""
        state = {
            "epoch": epoch,  # the epoch this step belongs to (0-based, not yet complete)
            "step": self.step,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rule": self.rule.state_dict(),
            "config": dump_config(self.cfg),
        }
        (self.out / "checkpoints").mkdir(exist_ok=True)
        save_checkpoint(self.out / "checkpoints" / f"step_{self.step:07d}.pt", state)

    def _extra_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for prefix, obj in (("opt", self.optimizer), ("rule", self.rule), ("amp", self.amp)):
            fn = getattr(obj, "epoch_metrics", None)
            if callable(fn):
                for k, v in fn().items():
                    out[f"{prefix}/{k}"] = float(v)
        return out

    _epochs_done = 0  # epochs trained in this session's loop (set at each epoch's end, on every rank)

    def _end_epoch(self, epoch: int, train_loss: list[float]) -> None:
        self._epochs_done = epoch + 1
        if not self.dist.is_main:  # replicas are identical; rank 0 evaluates and writes
            return
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": self.step,
            "train_loss": train_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            **self._timing,
            **self._extra_metrics(),
            "step_loss": self._step_loss,
        }
        acc: list[float] = []
        if self.has_val:  # model selection sees the validation split only; test waits for finish()
            acc = self.evaluate("val")[1].double().mean(1).tolist()
            rec["val_acc"] = acc
        self.history.append(rec)
        for k, a in enumerate(acc):
            self._log(f"val/acc_exit{k}", a, self.step)
        for key, v in rec.items():
            if "/" in key:
                self._log(key, v, self.step)
        score = selection_score(acc, self.selection_exits())
        if acc and score > self.best_score:
            self.best_score = score
            state = {"epoch": epoch, "model": self.net.state_dict(), "score": self.best_score}
            save_checkpoint(self.out / "best.pt", state)
        keep = self.cfg.train.keep_every
        if keep and (epoch + 1) % keep == 0:  # a snapshot to go back to (an SLBI path point, say)
            # Before the checkpoint: a run killed between the two redoes this epoch and writes it again.
            (self.out / "checkpoints").mkdir(exist_ok=True)
            save_checkpoint(self.out / "checkpoints" / f"epoch_{epoch + 1:04d}.pt", self._payload(epoch))
        every = self.cfg.train.checkpoint_every
        if (epoch + 1) % every == 0 or epoch + 1 == self.epochs:
            if self.writer is not None:
                self.writer.flush()  # the events up to the checkpoint step are on disk before the checkpoint
            save_checkpoint(self.checkpoint_path, self._payload(epoch))
            if self._staging:
                self._swap_in()
        atomic_write_json(self.out / "history.json", self.history)
        from tqdm.auto import tqdm

        left = self.clock.left(epoch)
        tqdm.write(epoch_line(epoch, self.epochs, self._timing or self.clock.trained(), train_loss, acc, left))

    def selection_exits(self) -> list[int]:
        """The exits ``best.pt`` is selected on: those the rule trains (``rule.trained_exits``; all of them for a
        rule or procedure that does not say), so a backprop run is judged on its last exit only."""
        fn = getattr(self.rule, "trained_exits", None)
        K = self.net.num_exits
        return list(fn(K)) if callable(fn) else list(range(K))

    def _selected(self) -> dict[str, Any] | None:
        """Validation and test accuracy per exit of ``best.pt`` (the model selected on validation)."""
        path = self.out / "best.pt"
        if not self.has_val or not path.is_file():
            return None
        best = load_checkpoint(path, map_location=self.device)
        # Swap the weights in and back rather than copying the net: optimizers may hold hooks on its modules.
        final = {k: v.clone() for k, v in self.net.state_dict().items()}
        self.net.load_state_dict(best["model"])
        try:
            val = self.evaluate("val")[1].double().mean(1).tolist()
            test = self.evaluate("test")[1].double().mean(1).tolist()
        finally:
            self.net.load_state_dict(final)
        return {
            "epoch": int(best["epoch"]) + 1,
            "criterion": f"mean validation accuracy over exits {self.selection_exits()} (those the rule trains)",
            "exits": [{"index": k, "val": v, "test": t} for k, (v, t) in enumerate(zip(val, test))],
        }

    def _swap_in(self) -> None:
        """The replacement run has its first checkpoint: it takes the old run's place."""
        reopen = self.writer is not None
        self._close_writer()
        swap_in(self.out, self.final_out)
        self.out, self._staging = self.final_out, False
        if reopen:
            self._open_writer()

    def finish(self, seconds: float) -> dict[str, Any]:
        if not self.dist.is_main:
            return {}
        extra = {"selected": self._selected(), **self._extra_metrics()}
        return write_metrics(self.cfg, self.data, self.net, self.out, steps=self.step, seconds=seconds, extra=extra)


def selection_score(val_acc: list[float], exits: list[int]) -> float:
    """The model-selection score of an epoch: mean validation accuracy over ``exits`` (-1 without any)."""
    return sum(val_acc[k] for k in exits) / len(exits) if val_acc and exits else -1.0


def write_metrics(
    cfg: RunConfig,
    data: DataBundle | StreamingData,
    net: StagedNet,
    out: Path,
    *,
    steps: int,
    seconds: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the final ``net`` once on the test split (and validation), write ``exit_scores.pt``, the plots
    and, last, ``metrics.json`` (whose presence marks the run as finished); return the metrics. ``extra`` keys
    are added (the selected model, optimizer figures, the multi-process runner's timings)."""
    bs = cfg.data.eval_batch_size
    test = exit_scores(net, data.batches("test", bs))
    acc = test[1].double().mean(1).tolist()
    val = exit_scores(net, data.batches("val", bs)) if data.split_len("val") > 0 else None
    val_acc = val[1].double().mean(1).tolist() if val is not None else [None] * len(acc)
    stage_flops, head_flops = net.flops_breakdown(data.input_shape)
    flops = net.flops_per_exit(data.input_shape)
    costs = exit_costs(stage_flops, head_flops)
    metrics: dict[str, Any] = {
        "rule": cfg.rule.name,
        "optimizer": cfg.optimizer.name,
        "dataset": data.name,
        "model": cfg.model.name,
        "epochs": cfg.train.epochs,
        "seed": cfg.seed,
        "steps": steps,
        "split_sizes": {s: data.split_len(s) for s in ("train", "val", "test")},
        # accuracy (contract) and test: the final model on the test split; val: the same on validation
        "exits": [
            {"index": k, "accuracy": a, "flops": int(f), "val": v, "test": a}
            for k, (a, v, f) in enumerate(zip(acc, val_acc, flops))
        ],
        "auc": anytime_auc(flops, acc),
        "mean_exit_accuracy": sum(acc) / len(acc),
        "stage_flops": stage_flops,
        "head_flops": head_flops,
        "early_exit_flops": costs,
        # thresholds fitted on validation for each average budget, then applied once to test
        "budgeted": budgeted_curve(val, test, costs, default_budgets(costs)) if val is not None else [],
        "train_seconds_this_session": seconds,
        **(extra or {}),
    }
    scores = {"test_conf": test[0], "test_correct": test[1], "costs": torch.tensor(costs)}
    if val is not None:
        scores.update(val_conf=val[0], val_correct=val[1])
    save_checkpoint(out / "exit_scores.pt", scores)
    if cfg.train.plots:
        from anytrain.eval.plots import plot_run

        plot_run(out, metrics)
    atomic_write_json(out / "metrics.json", metrics)  # last: its presence marks the run as finished
    return metrics
