"""Wall time of a training run, per epoch: what the per-epoch line and ``history.json`` report.

The clock reads ``time.perf_counter()`` at the start of an epoch and once the epoch's training steps are known
to be finished: the trainer calls :meth:`EpochClock.trained` right after it has copied the epoch's mean loss to
the host, which waits for every queued step on an asynchronous device. No step is timed on its own, so timing
adds no host–device synchronisation inside the step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence


def format_duration(seconds: float) -> str:
    """``4.2s``, ``3m07s``, ``1h05m``: short and fixed in shape, for a line printed every epoch."""
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class EpochClock:
    """Seconds and images per second of each epoch, and an estimate of the time left.

    Args:
        epochs: the run's number of epochs.
        images_per_epoch: training samples one epoch visits on all ranks together (steps × batch × ranks).

    The time left is the mean wall time of the epochs completed in this session (training, validation and
    checkpoint together) times the epochs still to run.
    """

    def __init__(self, epochs: int, images_per_epoch: int) -> None:
        self.epochs = int(epochs)
        self.images_per_epoch = int(images_per_epoch)
        self._session_start: float | None = None
        self._epoch_start = 0.0
        self._epoch_cpu = 0.0
        self._started = 0  # epochs started in this session
        self.seconds = 0.0  # training seconds of the last epoch

    def start(self) -> None:
        now = time.perf_counter()
        if self._session_start is None:
            self._session_start = now
        self._epoch_start = now
        self._epoch_cpu = time.process_time()
        self._started += 1

    def trained(self) -> dict[str, float]:
        """Call once the epoch's steps are finished: its training seconds, images per second, and the CPU
        seconds this process spent (all its threads; with ``train.threads=1`` on a busy machine this is what
        the epoch would take on a quiet core, which wall time is not)."""
        self.seconds = time.perf_counter() - self._epoch_start
        return {
            "seconds": self.seconds,
            "images_per_s": self.images_per_epoch / max(self.seconds, 1e-9),
            "cpu_seconds": time.process_time() - self._epoch_cpu,
        }

    def left(self, epoch: int) -> float:
        """Estimated seconds to finish the run once epoch ``epoch`` (0-based, the one being finished) is done."""
        if self._session_start is None:
            return 0.0
        per_epoch = (time.perf_counter() - self._session_start) / max(self._started, 1)
        return per_epoch * max(0, self.epochs - epoch - 1)


def epoch_line(
    epoch: int,
    epochs: int,
    timing: dict[str, float],
    train_loss: Sequence[float],
    val_acc: Sequence[float],
    left: float,
) -> str:
    """The one line printed after every epoch (also when output is not a terminal)."""
    accs = " ".join(f"{a:.3f}" for a in val_acc) if val_acc else "(no validation split)"
    return (
        f"epoch {epoch + 1}/{epochs}  {format_duration(timing['seconds'])}  {timing['images_per_s']:.0f} img/s  "
        f"loss {train_loss[-1]:.4f}  val acc per exit: {accs}  left {format_duration(left)}"
    )
