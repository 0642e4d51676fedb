"""anytrain.data."""
