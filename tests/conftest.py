"""Shared test fixtures: one local Ray instance for the whole session, and a session-wide asset cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builtin assets (tiny tokenizer, demo data) built once per session."""
    return tmp_path_factory.mktemp("sftray-cache")


@pytest.fixture(scope="session")
def ray_local():
    """One Ray instance shared by every test that needs it (start-up costs seconds; keep launches few)."""
    import ray

    if not ray.is_initialized():
        # The dashboard stays on: Ray Train V2 needs it to free stopped trials.
        ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
