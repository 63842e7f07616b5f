"""Training on Ray Train workers: the optimizer step, the per-worker loop, checkpoints, and the driver-side run."""
