"""The bench's shared inputs: the tiny tokenizer, tokenized demo and synthetic examples, and a random tiny Llama."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sftray.bench.sizes import ModelSize
from sftray.data.chat import IGNORE_INDEX, encode_chat

SEED = 0
"""Seed of every draw the bench makes (data order, synthetic lengths, model init)."""
SYNTHETIC_MEDIAN_TOKENS = 200
"""Median length of the synthetic examples; with sigma 1.0: p90 ~ 720, p99 ~ 2050 tokens (chat-like long tail)."""
SYNTHETIC_SIGMA = 1.0
"""Log-space standard deviation of the synthetic lengths."""
SYNTHETIC_MIN_TOKENS = 8
NO_MIX = ("mix=none",)
"""Config overrides for no pretraining tokens in training rows (the pipeline still windows the corpus for its
held-out slice)."""


def tiny_tokenizer(*, cache_dir: Path) -> Any:
    """The builtin tiny ChatML tokenizer (built once into ``cache_dir``)."""
    from transformers import AutoTokenizer

    from sftray.models.tiny import ensure_tiny_tokenizer

    return AutoTokenizer.from_pretrained(ensure_tiny_tokenizer(Path(cache_dir)))


def demo_conversations(*, n: int) -> list[dict]:
    """The first ``n`` builtin demo conversations (``builtin:demo`` is the first 2000 of the same seeded stream)."""
    from sftray.data.builtin import generate_demo_conversations

    return generate_demo_conversations(n, seed=SEED)


def encode_conversations(conversations: Sequence[dict], *, tokenizer: Any) -> list[dict[str, list[int]]]:
    """``encode_chat`` per conversation (assistant turns trained): ``input_ids`` and ``labels``."""
    return [encode_chat(c["messages"], tokenizer, example_id=f"demo[{i}]") for i, c in enumerate(conversations)]


def synthetic_examples(*, n: int, vocab_size: int) -> list[dict[str, list[int]]]:
    """Lognormal lengths (many short, few long, like real chat data); the first 30-70% of each is an untrained prompt.

    Token ids are random non-special ids: only lengths and masks matter to packing.
    """
    rng = random.Random(SEED)
    out = []
    for _ in range(n):
        length = max(
            SYNTHETIC_MIN_TOKENS, round(rng.lognormvariate(math.log(SYNTHETIC_MEDIAN_TOKENS), SYNTHETIC_SIGMA))
        )
        ids = [rng.randrange(3, vocab_size) for _ in range(length)]  # 0-2 are the tiny tokenizer's specials
        prompt = max(1, int(length * rng.uniform(0.3, 0.7)))
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def trl_dataset(examples: Sequence[dict]) -> Any:
    """Pre-tokenized examples as the ``datasets.Dataset`` TRL packs and trains on (``input_ids`` + ``labels``)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": [ex["input_ids"] for ex in examples], "labels": [ex["labels"] for ex in examples]}
    )


def fitting(examples: Sequence[dict], *, max_seq_len: int) -> list[dict]:
    """Examples of at most ``max_seq_len`` tokens: sftray's default ``data.overlength=drop``, applied for every method
    so all of them see the same tokens (TRL's BFD would truncate the rest instead)."""
    return [ex for ex in examples if len(ex["input_ids"]) <= max_seq_len]


def shuffled(examples: Sequence[dict]) -> list[dict]:
    """A seeded permutation (sftray packs groups of examples in seeded-hash order, not file order)."""
    out = list(examples)
    random.Random(SEED).shuffle(out)
    return out


def build_model(*, out_dir: Path, tokenizer: Any, size: ModelSize) -> Path:
    """A randomly initialised tiny Llama of ``size`` with the tokenizer, saved once under ``out_dir`` (safetensors)."""
    import torch
    from transformers import LlamaForCausalLM

    from sftray.models.cache import build_once
    from sftray.models.tiny import tiny_llama_config

    name = f"llama-h{size.hidden_size}-l{size.num_hidden_layers}-v{len(tokenizer)}"

    def build(folder: Path) -> None:
        torch.manual_seed(SEED)
        config = tiny_llama_config(
            vocab_size=len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **size.overrides(),
        )
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return build_once(Path(out_dir) / name, markers=("config.json", "model.safetensors", "tokenizer.json"), build=build)
