"""Structural sparsity: Γ's support (the DessiLBI regularization path), pruning, export and winning tickets.

- ``zero_channel_plan`` / ``apply_plan`` / ``export_pruned``: remove zero filters/neurons for real with
  Torch-Pruning; the exported module equals ``W*`` (``SLBI.projected_model``) in eval mode.
- ``magnitude_plan`` / ``random_plan`` / ``make_ticket``: winning tickets and their baselines.
- ``support_path`` / ``plot_path``: the path recorded by the trainer; ``stopping_point``: where to stop on it,
  chosen on validation.
"""

from anytrain.sparsity.path import plot_path, stopping_point, support_path
from anytrain.sparsity.prune import (
    ConstantInputShift,
    PruningPlan,
    apply_plan,
    count_macs,
    count_params,
    cpu_latency,
    export_pruned,
    zero_channel_plan,
)
from anytrain.sparsity.tickets import magnitude_plan, make_ticket, random_plan

__all__ = [
    "ConstantInputShift",
    "PruningPlan",
    "apply_plan",
    "count_macs",
    "count_params",
    "cpu_latency",
    "export_pruned",
    "magnitude_plan",
    "make_ticket",
    "plot_path",
    "random_plan",
    "stopping_point",
    "support_path",
    "zero_channel_plan",
]
