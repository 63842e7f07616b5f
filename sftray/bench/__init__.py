"""Benchmarks of sftray against Hugging Face TRL's SFTTrainer and against the limits: ``python -m sftray.bench``.

One module per measured thing (``packing``, ``throughput``, ``preprocess``, ``overhead``, ``memory``), the shared
inputs (``workload``) and size presets (``sizes``), one run (``run``) and its JSON + markdown (``report``).
"""
