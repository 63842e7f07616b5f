"""Shared test fixtures: one local Ray instance for the whole session, and a session-wide asset cache."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")  # never reach W&B from tests, even with a developer's credentials
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builtin assets (tiny tokenizer, demo data) built once per session."""
    return tmp_path_factory.mktemp("sftray-cache")


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache holding the tiny tokenizer, one per test module (a module's tests may write builtin files)."""
    from sftray.models.tiny import ensure_tiny_tokenizer

    cache = tmp_path_factory.mktemp("sftray-cli-cache")
    ensure_tiny_tokenizer(cache)
    return cache


@pytest.fixture
def cli_env(cli_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment a user's shell gives ``sftray``: ``cli_cache`` as SFTRAY_CACHE, no other SFTRAY_* variable,
    the test's tmp_path as the working folder. Returns the cache."""
    monkeypatch.setenv("SFTRAY_CACHE", str(cli_cache))
    for var in ("SFTRAY_DATA", "SFTRAY_CONF", "SFTRAY_OUTPUT", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return cli_cache


@pytest.fixture(scope="session")
def ray_local():
    """One Ray instance shared by every test that needs it (start-up costs seconds; keep launches few)."""
    import ray

    if not ray.is_initialized():
        # The dashboard stays on: Ray Train V2 needs it to free stopped trials.
        ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_untouched():
    """A command under test must fail before it starts Ray: Ray's state after it is what it was before (not started
    when the test runs alone; a whole-suite run may have started the shared instance earlier)."""
    import ray

    was = ray.is_initialized()
    yield
    assert ray.is_initialized() == was, "the command started Ray before failing"


@pytest.fixture(scope="session")
def random_base(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer tiny Llama with the tiny tokenizer, saved as an ordinary HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from sftray.models.tiny import ensure_tiny_tokenizer, tiny_llama_config

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_tokenizer(cache_dir))
    base = tmp_path_factory.mktemp("random-base")
    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_hidden_layers=2,
    )
    LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


@pytest.fixture(scope="session")
def write_sums() -> Callable[[Path, Iterable[int]], Path]:
    """Writes a messages-format JSONL of "Add i and i." -> "2i" conversations, one per number; returns the path."""

    def write(path: Path, numbers: Iterable[int]) -> Path:
        chats = (
            {
                "messages": [
                    {"role": "user", "content": f"Add {i} and {i}."},
                    {"role": "assistant", "content": str(2 * i)},
                ]
            }
            for i in numbers
        )
        path.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
        return path

    return write


@pytest.fixture(scope="session")
def training_run(cache_dir: Path) -> Callable[[Path, Path], list[str]]:
    """The training tests' run: writes their 30 conversations ("Add i and i+3.", every fourth with a second "Now
    double it." exchange, so multi-turn masks are trained too) under ``root`` and returns the overrides every
    training test shares (full fine-tuning of the random base, constant lr, a lax forgetting budget), with outputs
    in ``output_dir``. Each test appends its own layout."""

    def setup(root: Path, output_dir: Path) -> list[str]:
        out = []
        for i in range(30):
            msgs = [
                {"role": "user", "content": f"Add {i} and {i + 3}."},
                {"role": "assistant", "content": str(2 * i + 3)},
            ]
            if i % 4 == 0:
                msgs += [
                    {"role": "user", "content": "Now double it."},
                    {"role": "assistant", "content": str(4 * i + 6)},
                ]
            out.append({"messages": msgs})
        data = root / "chats.jsonl"
        data.write_text("".join(json.dumps(c) + "\n" for c in out))
        return [
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={output_dir}",
            "data=files",
            f"data.sources=[{{path:'{data}'}}]",
            "data.max_seq_len=64",
            "data.val_fraction=0.2",
            "mix.ratio=0.1",
            "eval.num_probes=4",
            "eval.max_new_tokens=6",
            "eval.forgetting_budget=10",
            "train.method=full",
            "train.lr=1e-3",
            "train.warmup_ratio=0",
            "train.schedule=constant",
        ]

    return setup
