"""anytrain: anytime networks, OSGD, decoupled greedy learning, DessiLBI and curvature-corrected learning."""

__version__ = "0.1.0"
