"""Training on Ray Train workers: the optimizer step, the per-worker loop, checkpoints and resuming, and the
driver-side run."""
