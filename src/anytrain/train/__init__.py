"""anytrain.train."""
