"""Anytime inference that really stops early: policies (the decision), the predictor (the loop over undecided
rows), and export of stages and heads (``torch.export`` / ONNX) with a manifest.

- ``AnytimePredictor(net, policy="max-prob", thresholds=...)``; ``predict(x)`` → ``Prediction`` (labels, exits,
  macs, logits per sample); ``AnytimePredictor.load(DIR)`` runs exported parts.
- Policies: ``MaxProb``, ``Entropy``, ``Budget`` (fitted on validation), ``Patience`` (PABEE), ``Deadline``.
- ``export_parts(net, DIR, input_shape=..., format="pt2"|"onnx")``; ``read_manifest(DIR)``.
"""

from anytrain.inference.export import export_parts
from anytrain.inference.parts import ExportedParts, read_manifest
from anytrain.inference.policies import (
    POLICIES,
    Budget,
    Deadline,
    Entropy,
    MaxProb,
    Patience,
    Policy,
    ThresholdPolicy,
    make_policy,
    policy_from_dict,
)
from anytrain.inference.predictor import AnytimePredictor, EagerParts, Parts, Prediction, gather_rows

__all__ = [
    "POLICIES",
    "AnytimePredictor",
    "Budget",
    "Deadline",
    "EagerParts",
    "Entropy",
    "ExportedParts",
    "MaxProb",
    "Parts",
    "Patience",
    "Policy",
    "Prediction",
    "ThresholdPolicy",
    "export_parts",
    "gather_rows",
    "make_policy",
    "policy_from_dict",
    "read_manifest",
]
