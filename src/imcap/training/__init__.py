"""Training: config, cached-feature batches, the cross-entropy and self-critical loops, plots."""
