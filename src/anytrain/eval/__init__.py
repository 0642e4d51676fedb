"""anytrain.eval."""
