"""Evaluation: held-out losses, forgetting, and generation probes for format compliance."""
