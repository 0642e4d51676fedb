"""The training loop, checkpoints, schedules, data parallelism and the multi-process DGL runner (`parallel`)."""

from anytrain.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from anytrain.train.trainer import Trainer, TrainingDiverged, build_components

__all__ = [
    "CheckpointError",
    "Trainer",
    "TrainingDiverged",
    "build_components",
    "load_checkpoint",
    "save_checkpoint",
]
