"""LoRA adapters via peft: config -> PeftModel, with rows of newly added tokens trainable too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftray.config import LoraConfig

ADAPTER_NOTE = "sftray_adapter.json"
"""Beside a saved adapter: its base, the tokens training added to the base's vocabulary, and how to load it."""


def apply_lora(model: Any, *, cfg: LoraConfig, new_token_ids: list[int]) -> Any:
    """Wraps ``model`` with adapters; base weights frozen except ``modules_to_save`` and new token rows."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets: Any = cfg.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=list(cfg.modules_to_save) or None,
        # Tokens the template needed but the base lacked have no trained embedding: train just those rows.
        trainable_token_indices=list(new_token_ids) or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def write_adapter_note(adapter_dir: Path, *, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Writes ``ADAPTER_NOTE`` into a saved adapter's folder and returns it.

    An adapter that trained rows of added tokens (``trainable_token_indices``) beyond the base's embedding needs
    that embedding grown to the saved tokenizer first: plain ``PeftModel.from_pretrained`` on the unmodified base
    fails with an IndexError. Tokens on spare rows of a padded embedding need no growth.
    """
    from transformers import PretrainedConfig

    peft_cfg = model.peft_config["default"]
    indices = peft_cfg.trainable_token_indices or []
    if isinstance(indices, dict):  # per-layer form: {layer name: ids}
        indices = sorted({i for ids in indices.values() for i in ids})
    added = {str(i): tokenizer.convert_ids_to_tokens(i) for i in indices}
    # The base's config.json as plain JSON: no remote code runs for an architecture transformers lacks.
    base_rows = PretrainedConfig.get_config_dict(peft_cfg.base_model_name_or_path)[0].get("vocab_size")
    load = ["model = AutoModelForCausalLM.from_pretrained(base_model)"]
    if added and (base_rows is None or len(tokenizer) > base_rows):  # no rows for them yet: grow to the tokenizer
        load.append("model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter_dir)))")
    load.append("model = PeftModel.from_pretrained(model, adapter_dir)")
    note = {
        "base_model": peft_cfg.base_model_name_or_path,
        "added_tokens": added,  # id -> token: tokens the base lacks, their rows trained with the adapter; {} = none
        "base_vocab_size": base_rows,  # the base's embedding rows
        "vocab_size": len(tokenizer),
        "load": load,  # plain transformers + peft; sftray.models.loading.load_trained does the same
    }
    (Path(adapter_dir) / ADAPTER_NOTE).write_text(json.dumps(note, indent=1) + "\n")
    return note
