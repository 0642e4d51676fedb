"""anytrain.greedy."""
