"""Experiment tracking: MLflow (always) and W&B (optional), fed from the Tune driver."""
