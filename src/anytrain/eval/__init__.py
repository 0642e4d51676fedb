"""Anytime evaluation and plots."""

from anytrain.eval.anytime import (
    ConfidencePoint,
    accuracy_per_exit,
    anytime_auc,
    confidence_exit,
    deadline_exit,
    deadline_predict,
    exit_logits,
)

__all__ = [
    "ConfidencePoint",
    "accuracy_per_exit",
    "anytime_auc",
    "confidence_exit",
    "deadline_exit",
    "deadline_predict",
    "exit_logits",
]
