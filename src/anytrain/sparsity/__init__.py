"""anytrain.sparsity."""
