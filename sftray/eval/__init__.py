"""Evaluation: the driver's eval plan (probes, generation limit, base-eval cache), held-out losses, forgetting, and
generation probes for format compliance."""
