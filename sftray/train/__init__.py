"""Training on Ray Train workers: loss, parallelism, checkpoints, the per-worker loop, and the driver-side run."""
